"""The one seam for wall-clock time.

Commit times come from a `Clock`, a callable returning seconds since the
epoch. Tests pass a `ManualClock` to control time; everything else uses
`time.time`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Clock = Callable[[], float]

system_clock: Clock = time.time


class ManualClock:
    """A clock that moves only when told to (thread-safe)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mu = threading.Lock()

    def __call__(self) -> float:
        with self._mu:
            return self._now

    def advance(self, seconds: float) -> float:
        with self._mu:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        with self._mu:
            self._now = now
