"""Named failpoints at the durability boundaries, for crash tests.

A failpoint is a named place in the code, `<component>-<before|after>-<step>`
(REGISTERED lists them all). When one is armed and the code passes it, it
acts:

    raise   raise FailpointError there (as a failed I/O would: the
            operation fails; a failure inside the commit log fails it closed)
    exit    end the process at once with status 77 (os._exit: no cleanup,
            no flush: a crash at exactly that point)
    pause   block until disarmed (to line up races in tests)

Arm them with the environment (`STRATA_FAILPOINTS=wal-after-fsync=exit,
layer-before-rename=raise`, read at import) or, in tests, `arm(name,
action)` / `disarm()`. Free when off: `hit()` tests one module-level
boolean before anything else.
"""

from __future__ import annotations

import os
import threading

from .errors import StrataError

REGISTERED: tuple[str, ...] = (
    "wal-before-append",        # a record about to be written to the log
    "wal-after-append",         # written, not yet synced
    "wal-before-fsync",
    "wal-after-fsync",          # synced: now durable, not yet acknowledged
    "wal-before-rotate",        # sealing a full segment
    "layer-before-fsync",       # a layer file written, not yet synced
    "layer-before-rename",      # synced, still under its temporary name
    "layer-after-rename",       # in place, not yet in the log
    "manifest-before-swap",     # checkpoint: snapshot about to replace the old one
    "manifest-after-swap",
    "compaction-before-commit",  # new layers durable, the edit not yet logged
    "compaction-after-commit",
    "gc-before-commit",         # garbage chosen, the edit not yet logged
    "gc-after-commit",
    "timeline-before-create",
    "timeline-after-create",
    "timeline-before-delete",
    "timeline-after-delete",    # the drop is durable, the files not yet removed
    "fuse-before-durable-write",  # the page server: a write the kernel sent, before its commit
    "fuse-after-durable-write",   # committed and synced, not yet answered
)
ACTIONS = ("raise", "exit", "pause")
EXIT_STATUS = 77


class FailpointError(StrataError, OSError):
    """Raised by an armed failpoint with action `raise`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"failpoint {name} fired")
        self.name = name


_armed: dict[str, str] = {}
_on = False
_released = threading.Condition()
hits: dict[str, int] = {}  # how often each armed failpoint fired (tests read it)


def arm(name: str, action: str) -> None:
    global _on
    if name not in REGISTERED:
        raise ValueError(f"unknown failpoint {name!r} (see engine.failpoints.REGISTERED)")
    if action not in ACTIONS:
        raise ValueError(f"unknown failpoint action {action!r}: use one of {', '.join(ACTIONS)}")
    with _released:
        _armed[name] = action
        _on = True


def disarm(name: str | None = None) -> None:
    global _on
    with _released:
        if name is None:
            _armed.clear()
        else:
            _armed.pop(name, None)
        _on = bool(_armed)
        _released.notify_all()


def hit(name: str) -> None:
    if not _on:
        return
    _fire(name)


def _fire(name: str) -> None:
    with _released:
        action = _armed.get(name)
        if action is None:
            return
        hits[name] = hits.get(name, 0) + 1
        if action == "pause":
            while _armed.get(name) == "pause":
                _released.wait()
            return
    if action == "exit":
        os._exit(EXIT_STATUS)
    raise FailpointError(name)


def _from_env() -> None:
    spec = os.environ.get("STRATA_FAILPOINTS", "").strip()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        arm(name.strip(), (action or "raise").strip())


_from_env()
