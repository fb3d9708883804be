"""Typed errors of the page server (the engine's own live in `engine.errors`).

    PageServerError
     +-- NotADataDirectoryError   an import source that is not one
     +-- DestinationNotEmptyError an export target that has files in it
     +-- BranchBusyError          a second read-write compute on a branch
     +-- ComputeError             postgres would not start, or died
     |    +-- PostgresVersionError  the PostgreSQL version a data directory needs is missing
     +-- ComputeNotFoundError     (also a LookupError)
     +-- ControlPlaneError        what the control plane refuses (HTTP status)
          +-- UnknownObjectError       no such database or branch (404)
          +-- ObjectExistsError        a name already taken (409)
          +-- BadRequestError          a malformed or contradictory request (400)
          +-- ProtectedError           a protected branch cannot be deleted or reset (409)
          +-- MergeConflictError       rows changed on both sides of a merge: nothing merged (409)
          +-- MergeFailedError         the target refused the patch (a constraint, a dropped column): nothing merged (409)
          +-- DiffFailedError          a compute a diff or merge read from failed or stopped meanwhile (503)
          +-- ComputeLimitError        every compute slot is busy (503)
          +-- RateLimitedError         a token made too much too fast (429, with retry_after)
          +-- ServiceNotRunningError   no service to talk to (client side)
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


class PostgresVersionError(ComputeError):
    def __init__(self, major: str | None, why: str) -> None:
        PageServerError.__init__(self, why)
        self.compute_id, self.log_tail, self.major = "-", "", major


class UnsafeDirectoryError(PageServerError, PermissionError):
    """A directory Strata keeps private is not: another user owns it, it is a
    symlink, or it is not a directory."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}; refusing to use it (remove it, or set it right)")
        self.path = path


class AnotherServiceError(PageServerError):
    def __init__(self, home: str, pid: int | None) -> None:
        super().__init__(f"another Strata service (pid {pid if pid is not None else '?'}) serves {home}")
        self.home = home
        self.pid = pid


class ComputeNotFoundError(PageServerError, LookupError):
    def __init__(self, compute_id: str) -> None:
        super().__init__(f"compute {compute_id!r} not found")
        self.compute_id = compute_id


class ControlPlaneError(PageServerError):
    status = 400


class UnknownObjectError(ControlPlaneError, LookupError):
    status = 404

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"no {kind} named {name!r}")
        self.kind = kind
        self.name = name


class ObjectExistsError(ControlPlaneError):
    status = 409

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"a {kind} named {name!r} already exists")
        self.kind = kind
        self.name = name


class BadRequestError(ControlPlaneError, ValueError):
    status = 400


class ProtectedError(ControlPlaneError):
    status = 409

    def __init__(self, name: str, action: str) -> None:
        super().__init__(f"branch {name} is protected: it cannot be {action} (unprotect it first)")
        self.name = name


class MergeConflictError(ControlPlaneError):
    status = 409


class MergeFailedError(ControlPlaneError):
    status = 409


class DiffFailedError(ControlPlaneError):
    status = 503


class ComputeLimitError(ControlPlaneError):
    status = 503

    def __init__(self, limit: int) -> None:
        super().__init__(f"all {limit} compute slots are in use by branches with open connections")
        self.limit = limit


class RateLimitedError(ControlPlaneError):
    status = 429
    retry_after: float = 1.0  # seconds until the next creation is allowed

    def __init__(self, what: str, per_minute: int, retry_after: float) -> None:
        super().__init__(f"{what} may make {per_minute} databases, branches or passwords a minute: "
                         f"try again in {max(1, round(retry_after))} s")
        self.retry_after = retry_after


class ServiceNotRunningError(ControlPlaneError):
    status = 503
