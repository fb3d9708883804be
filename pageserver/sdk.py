"""The SDK under its first name: `from pageserver.sdk import Strata` keeps
working. It lives in `pageserver.clients.sdk`."""

from pageserver.clients.sdk import Branch, Database, Strata

__all__ = ["Branch", "Database", "Strata"]
