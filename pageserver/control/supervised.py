"""What a process the supervisor runs (the page server, the front end)
does to never outlive it."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("strata.supervised")

PARENT_POLL = 0.5


def exit_with_parent(stop: Callable[[], None]) -> None:
    """Call `stop` once this process's parent (the supervisor) is gone. The
    kernel's parent-death signal does it at once; this is the backstop."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        log.warning("the supervisor (pid %d) is gone: stopping", parent)
        stop()

    threading.Thread(target=watch, name="strata-parent-watch", daemon=True).start()
