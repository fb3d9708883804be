"""Strata's storage engine: versioned pages in immutable layers, O(1) branches.

    from engine import Store
    with Store.open(path) as store:
        root = store.create_timeline()
        lsn = root.commit({key: page}, durable=True)
        child = store.branch(root)          # O(1): one log record
        child.get(key), root.get(key, lsn=lsn)

See docs/architecture.md for how the pieces fit.
"""

from typing import TYPE_CHECKING

from .errors import (
    AlreadyExistsError,
    CorruptionError,
    HasChildrenError,
    InvalidArgumentError,
    LsnOutOfRangeError,
    NotFoundError,
    StoreClosedError,
    StoreFailedError,
    StoreLockedError,
    StrataError,
)

if TYPE_CHECKING:
    from .clock import Clock, ManualClock
    from .compaction import CompactionResult
    from .config import KEEP_ALL, Retention, StoreConfig
    from .gc import GcResult
    from .store import Store
    from .timeline import Timeline, TimelineUsage
    from .values import MAX_KEY, MAX_VALUE_SIZE, PAGE_SIZE

# The store and what it returns are imported on first use (PEP 562): a process
# that needs only the errors or a file helper (the CLI, the supervisor) does
# not pay for the whole engine.
_LAZY = {"CompactionResult": "compaction", "GcResult": "gc", "Store": "store", "Timeline": "timeline",
         "TimelineUsage": "timeline", "Clock": "clock", "ManualClock": "clock", "KEEP_ALL": "config",
         "Retention": "config", "StoreConfig": "config", "MAX_KEY": "values", "MAX_VALUE_SIZE": "values",
         "PAGE_SIZE": "values"}  # (the errors alone are imported at once: a CLI needs nothing else)


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AlreadyExistsError",
    "Clock",
    "CompactionResult",
    "CorruptionError",
    "GcResult",
    "HasChildrenError",
    "InvalidArgumentError",
    "KEEP_ALL",
    "LsnOutOfRangeError",
    "MAX_KEY",
    "MAX_VALUE_SIZE",
    "ManualClock",
    "NotFoundError",
    "PAGE_SIZE",
    "Retention",
    "Store",
    "StoreClosedError",
    "StoreConfig",
    "StoreFailedError",
    "StoreLockedError",
    "StrataError",
    "Timeline",
    "TimelineUsage",
]
