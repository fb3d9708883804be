"""Typed errors of the page server (the engine's own live in `engine.errors`).

    PageServerError
     +-- NotADataDirectoryError   an import source that is not one
     +-- DestinationNotEmptyError an export target that has files in it
     +-- BranchBusyError          a second read-write compute on a branch
     +-- ComputeError             postgres would not start, or died
     +-- ComputeNotFoundError     (also a LookupError)
"""

from __future__ import annotations

from engine import StrataError


class PageServerError(StrataError):
    pass


class NotADataDirectoryError(PageServerError, ValueError):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path} is not a PostgreSQL data directory: {why}")
        self.path = path


class DestinationNotEmptyError(PageServerError, ValueError):
    def __init__(self, path: str) -> None:
        super().__init__(f"export destination {path} exists and is not empty")
        self.path = path


class BranchBusyError(PageServerError):
    def __init__(self, timeline_id: str, compute_id: str) -> None:
        super().__init__(
            f"timeline {timeline_id} already has a read-write compute ({compute_id}); "
            "stop it first, or start a read-only compute"
        )
        self.timeline_id = timeline_id
        self.compute_id = compute_id


class ComputeError(PageServerError):
    def __init__(self, compute_id: str, why: str, log_tail: str = "") -> None:
        tail = f"\n--- postgres log ---\n{log_tail}" if log_tail else ""
        super().__init__(f"compute {compute_id}: {why}{tail}")
        self.compute_id = compute_id
        self.log_tail = log_tail


class ComputeNotFoundError(PageServerError, LookupError):
    def __init__(self, compute_id: str) -> None:
        super().__init__(f"compute {compute_id!r} not found")
        self.compute_id = compute_id
