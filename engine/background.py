"""The store's background thread: flushes, checkpoints, compaction, GC.

Frozen in-memory layers are flushed as soon as they appear; a checkpoint
runs when the log grows past `log_checkpoint_bytes`, and, with a remote,
once the log has been idle `idle_checkpoint_s` since it last grew (so the
remote's index soon covers what an idle store holds), at most once per
`idle_checkpoint_gap_s` (a trickle of writes makes no layer per pause); every
`background_interval`, timelines whose layers changed are compacted and the
timelines in use are garbage collected; every `full_gc_interval`, all of
them. Timelines nobody has used since the store opened cost nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .checkpoint import flush_timeline
from .compaction import compact_timeline
from .errors import NotFoundError, StoreFailedError

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("strata.engine")


class Background:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"strata-bg:{store.path}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        store = self._store
        cfg = store.config
        last_maint = last_full = time.monotonic()
        idle = _Idle(store._log._written)
        remote = store._remote is not None
        wait = min(cfg.background_interval, cfg.idle_checkpoint_s / 2) if remote else cfg.background_interval
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                for tl in store._loaded():
                    if tl._map.frozen:
                        with _unless_deleted():
                            flush_timeline(store, tl)
                now = time.monotonic()
                if store._log.segment_bytes_total() > cfg.log_checkpoint_bytes:
                    store.checkpoint()
                    idle.checkpointed(store._log._written)
                elif remote and idle.due(store._log._written, now, cfg.idle_checkpoint_s, cfg.idle_checkpoint_gap_s):
                    store.checkpoint()
                    idle.checkpointed(store._log._written, now)
                if now - last_maint >= cfg.background_interval:
                    last_maint = now
                    for tl in store._loaded():
                        gen = tl._layers_gen
                        if gen != tl._compacted_gen:
                            with _unless_deleted():
                                compact_timeline(store, tl)
                                tl._compacted_gen = gen
                    if now - last_full >= cfg.full_gc_interval:
                        last_full = now
                        store._gc_pass(list(store._timelines), skip_small=True)
                    else:
                        store._gc_pass([t._tid for t in store._loaded()], skip_small=True)
            except StoreFailedError as e:
                self.error = e
                log.error("background work stopped: %s", e)
                return
            except Exception as e:  # keep serving; say what went wrong
                self.error = e
                log.exception("background pass failed: %s", e)


class _Idle:
    """When the log last grew, where it stood at the last checkpoint, and
    when the last idle checkpoint ran (the background thread's own: not
    shared)."""

    def __init__(self, pos: int, now: float | None = None) -> None:
        self.pos, self.since, self.done = pos, time.monotonic() if now is None else now, pos
        self.last_idle = float("-inf")

    def due(self, pos: int, now: float, idle_s: float, gap_s: float) -> bool:
        """Has the log grown since the last checkpoint, and not for `idle_s`,
        and is the last idle checkpoint `gap_s` ago?"""
        if pos != self.pos:
            self.pos, self.since = pos, now
        return pos != self.done and now - self.since >= idle_s and now - self.last_idle >= gap_s

    def checkpointed(self, pos: int, idle_at: float | None = None) -> None:
        """A checkpoint covered the log to `pos` (an idle one, at `idle_at`)."""
        self.pos = self.done = pos
        if idle_at is not None:
            self.last_idle = idle_at


@contextlib.contextmanager
def _unless_deleted() -> Iterator[None]:
    """A timeline deleted while the pass works on it is skipped: the pass
    goes on with the others (it used to end the whole pass, logged as a
    failure)."""
    try:
        yield
    except NotFoundError:
        pass
