"""Test helpers for code built on the engine: self-describing pages
(`pages`) and a file system that drops what was not synced (`faultfs`)."""

from .faultfs import FaultFileSystem
from .pages import page, page_owner

__all__ = ["FaultFileSystem", "page", "page_owner"]
