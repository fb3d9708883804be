"""Typed errors raised by the storage engine.

Callers branch on these, so each carries the evidence a caller or an operator
needs (paths, offsets, LSNs, ids) as attributes as well as in its message::

    StrataError
     +-- InvalidArgumentError   (also a ValueError) bad key, value, LSN or option
     +-- NotFoundError          (also a LookupError) unknown timeline
     +-- AlreadyExistsError     a timeline id that is taken
     +-- LsnOutOfRangeError     an LSN beyond the head or below the horizon
     +-- HasChildrenError       deleting a timeline other timelines branch from
     +-- CorruptionError        a checksum, magic or length that does not match
     +-- StoreLockedError       another process has the store open
     +-- StoreClosedError       the store was closed
     +-- StoreFailedError       a write or fsync failed; the store refuses writes

An operation that raises one of these has changed nothing, with one documented
exception: StoreFailedError means the outcome of the failed write is unknown
and the store stops accepting writes until it is reopened (it never retries a
failed fsync and reports success).
"""

from __future__ import annotations

from collections.abc import Sequence


class StrataError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidArgumentError(StrataError, ValueError):
    """A caller passed a value the engine cannot accept."""


class NotFoundError(StrataError, LookupError):
    """A timeline that does not exist (or no longer exists)."""

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"{what} {ident!r} not found")
        self.what = what
        self.ident = ident


class AlreadyExistsError(StrataError):
    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"{what} {ident!r} already exists")
        self.what = what
        self.ident = ident


class LsnOutOfRangeError(StrataError):
    """An LSN outside [low, high], the range a timeline can serve or branch at."""

    def __init__(self, timeline_id: str, lsn: int, low: int, high: int, why: str = "") -> None:
        detail = f": {why}" if why else ""
        super().__init__(
            f"LSN {lsn} is out of range for timeline {timeline_id} "
            f"(readable range is {low}..{high}){detail}"
        )
        self.timeline_id = timeline_id
        self.lsn = lsn
        self.low = low
        self.high = high


class HasChildrenError(StrataError):
    def __init__(self, timeline_id: str, children: Sequence[str]) -> None:
        shown = ", ".join(sorted(children)[:5]) + (" ..." if len(children) > 5 else "")
        super().__init__(
            f"timeline {timeline_id} has {len(children)} child timeline(s) ({shown}); "
            "delete or detach them first"
        )
        self.timeline_id = timeline_id
        self.children = tuple(children)


class CorruptionError(StrataError):
    """Bytes on disk that fail a check. Names the file and the offset."""

    def __init__(
        self,
        path: str,
        offset: int,
        detail: str,
        expected: object = None,
        got: object = None,
    ) -> None:
        evidence = ""
        if expected is not None or got is not None:
            evidence = f" (expected {_show(expected)}, got {_show(got)})"
        super().__init__(f"corruption in {path} at offset {offset}: {detail}{evidence}")
        self.path = path
        self.offset = offset
        self.detail = detail
        self.expected = expected
        self.got = got


class StoreLockedError(StrataError):
    def __init__(self, path: str, holder: str = "") -> None:
        who = f" by {holder}" if holder else ""
        super().__init__(f"store {path} is locked{who}: another process has it open for writing")
        self.path = path
        self.holder = holder


class StoreClosedError(StrataError):
    def __init__(self, path: str) -> None:
        super().__init__(f"store {path} is closed")
        self.path = path


class StoreFailedError(StrataError):
    """A write or fsync failed. The store refuses further writes until reopened."""

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(
            f"store {path} failed and refuses writes until it is reopened: {cause!r}"
        )
        self.path = path
        self.cause = cause


def _show(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}"
    return repr(value)
