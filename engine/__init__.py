"""Strata's storage engine: versioned pages in immutable layers, O(1) branches.

    from engine import Store
    with Store.open(path) as store:
        root = store.create_timeline()
        lsn = root.commit({key: page}, durable=True)
        child = store.branch(root)          # O(1): one log record
        child.get(key), root.get(key, lsn=lsn)

See docs/architecture.md for how the pieces fit.
"""

from .clock import Clock, ManualClock
from .compaction import CompactionResult
from .config import KEEP_ALL, Retention, StoreConfig
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
from .gc import GcResult
from .store import Store
from .timeline import Timeline, TimelineUsage
from .values import MAX_KEY, MAX_VALUE_SIZE, PAGE_SIZE

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
