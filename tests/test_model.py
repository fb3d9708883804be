"""The engine against a plain in-memory model, driven by Hypothesis.

Every step is checked against the model: puts, deletes, branches at the head
and at past LSNs, reads at random LSNs, flush, compaction, GC with moving
horizons, detach, delete, close and reopen, and crashes (a fault-injecting
file system that keeps only what was fsynced, tearing the last write): every
durable commit survives a crash, and what survives of the rest is a prefix
of the log, each batch whole or not at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import event, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import (
    HasChildrenError,
    LsnOutOfRangeError,
    ManualClock,
    Retention,
    Store,
)
from engine.testing.faultfs import FaultFileSystem

from .conftest import SMALL

KEYS = st.integers(min_value=0, max_value=23)


@dataclass
class ModelTimeline:
    ancestor: str | None
    ancestor_lsn: int
    start: int
    head: int
    commits: list[tuple[int, dict[int, bytes | None]]] = field(default_factory=list)
    deleted: bool = False
    attached: bool = True  # False once detached (reads still see the same data)
    distance: int | None = None  # retention by LSN distance; None keeps all

    def points(self) -> list[int]:
        return [self.start] + [lsn for lsn, _ in self.commits]


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fs = FaultFileSystem(seed=7)
        self.clock = ManualClock()
        self.store = self._open()
        self.model: dict[str, ModelTimeline] = {}
        self.durable = 0  # every record at or below this LSN is fsynced
        self.seq = 0
        self.ids = 0
        root = self.store.create_timeline(self.new_id())
        self.model[root.id] = ModelTimeline(None, 0, root.branch_lsn, root.head_lsn)
        self.durable = self.store.last_lsn

    def _open(self) -> Store:
        return Store.open("/store", fs=self.fs, clock=self.clock, config=SMALL, background=False)

    def teardown(self) -> None:
        try:
            self.store.close()
        except Exception:
            pass

    # --- helpers ---------------------------------------------------------------

    def live(self) -> list[str]:
        return sorted(t for t, m in self.model.items() if not m.deleted)

    def expect(self, tid: str, key: int, lsn: int) -> bytes | None:
        m = self.model[tid]
        for c_lsn, changes in reversed(m.commits):
            if c_lsn <= lsn and key in changes:
                return changes[key]
        if m.ancestor is not None:
            return self.expect(m.ancestor, key, min(lsn, m.ancestor_lsn))
        return None

    def new_id(self) -> str:
        # ids from a counter keep Hypothesis' choices reproducible
        self.ids += 1
        return f"{self.ids:032x}"

    def value(self, tid: str, key: int) -> bytes:
        self.seq += 1
        body = f"{tid}:{key}:{self.seq}:".encode()
        return body * (1 + (self.seq * 7 + key) % 40)

    # --- rules -----------------------------------------------------------------

    @rule(data=st.data(), keys=st.lists(KEYS, min_size=1, max_size=5, unique=True),
          deletes=st.lists(st.booleans(), min_size=5, max_size=5), durable=st.booleans())
    def commit(self, data, keys, deletes, durable) -> None:
        tid = data.draw(st.sampled_from(self.live()))
        batch = {k: (None if d else self.value(tid, k)) for k, d in zip(keys, deletes)}
        self.clock.advance(1)
        lsn = self.store.timeline(tid).commit(batch, durable=durable)
        m = self.model[tid]
        assert lsn > m.head
        m.commits.append((lsn, batch))
        m.head = lsn
        if durable:
            self.durable = lsn

    @rule(data=st.data(), at_head=st.booleans())
    def branch(self, data, at_head) -> None:
        pid = data.draw(st.sampled_from(self.live()))
        parent = self.store.timeline(pid)
        pm = self.model[pid]
        at = None if at_head else data.draw(st.sampled_from(pm.points()))
        if at is not None and at < parent.horizon:
            with pytest.raises(LsnOutOfRangeError):
                self.store.branch(parent, at_lsn=at, timeline_id=self.new_id())
            return
        child = self.store.branch(parent, at_lsn=at, timeline_id=self.new_id())
        point = pm.head if at is None else at
        assert child.ancestor_id == pid and child.ancestor_lsn == point == child.head_lsn
        self.model[child.id] = ModelTimeline(pid, point, point, point)
        self.durable = self.store.last_lsn

    @rule(data=st.data(), key=KEYS)
    def read(self, data, key) -> None:
        tid = data.draw(st.sampled_from(self.live()))
        tl = self.store.timeline(tid)
        m = self.model[tid]
        lsn = data.draw(st.sampled_from(m.points() + [m.head]))
        if lsn < tl.horizon:
            with pytest.raises(LsnOutOfRangeError):
                tl.get(key, lsn=lsn)
            return
        assert tl.get(key, lsn=lsn) == self.expect(tid, key, lsn), (tid, key, lsn)

    @rule(data=st.data())
    def read_everything(self, data) -> None:
        tid = data.draw(st.sampled_from(self.live()))
        tl = self.store.timeline(tid)
        m = self.model[tid]
        want = {k: v for k in range(24) if (v := self.expect(tid, k, m.head)) is not None}
        assert dict(tl.scan()) == want

    @rule()
    def flush(self) -> None:
        if self.store.flush():
            self.durable = self.store.last_lsn

    @rule(force=st.booleans())
    def compact(self, force) -> None:
        results = self.store.compact(force_images=force)
        if any(r.merged or r.images_written for r in results):
            self.durable = self.store.last_lsn
        event(f"compaction merged={sum(r.merged > 0 for r in results) > 0} "
              f"images={sum(r.images_written for r in results) > 0}")

    @rule(data=st.data(), distance=st.integers(min_value=0, max_value=30))
    def set_retention(self, data, distance) -> None:
        tid = data.draw(st.sampled_from(self.live()))
        self.store.timeline(tid).set_retention(Retention(period=None, lsn_distance=distance))
        self.model[tid].distance = distance
        self.durable = self.store.last_lsn

    @rule()
    def gc(self) -> None:
        before = {t: self.store.timeline(t).horizon for t in self.live()}
        result = self.store.gc()
        if result.horizons_moved or result.layers_removed:
            self.durable = self.store.last_lsn
        event(f"gc removed layers: {result.layers_removed > 0}")
        for tid in self.live():
            tl = self.store.timeline(tid)
            m = self.model[tid]
            want = before[tid]
            if m.distance is not None:
                want = max(want, min(m.head - m.distance, m.head))
            assert tl.horizon == max(want, m.start), (tid, tl.horizon, want)

    @rule(data=st.data(), distance=st.integers(min_value=0, max_value=3))
    def squeeze(self, data, distance) -> None:
        """Short retention, fresh images, GC: the path that deletes layers."""
        tid = data.draw(st.sampled_from(self.live()))
        self.store.timeline(tid).set_retention(Retention(period=None, lsn_distance=distance))
        self.model[tid].distance = distance
        self.store.compact(tid, force_images=True)
        self.gc()

    @precondition(lambda self: len(self.live()) > 1)
    @rule(data=st.data())
    def delete(self, data) -> None:
        tid = data.draw(st.sampled_from(self.live()))
        kids = [t for t in self.live() if self.model[t].ancestor == tid and self.model[t].attached]
        if kids:
            with pytest.raises(HasChildrenError):
                self.store.delete_timeline(tid)
            return
        self.store.delete_timeline(tid)
        self.model[tid].deleted = True
        self.durable = self.store.last_lsn

    @rule(data=st.data())
    def detach(self, data) -> None:
        attached = [t for t in self.live() if self.model[t].attached and self.model[t].ancestor]
        if not attached:
            return
        tid = data.draw(st.sampled_from(attached))
        self.store.detach(tid)
        self.model[tid].attached = False
        event("detached")
        assert self.store.timeline(tid).ancestor_id is None
        self.durable = self.store.last_lsn

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()
        self.durable = self.store.last_lsn

    @rule()
    def crash(self) -> None:
        self.fs.crash()  # the old Store is abandoned, as a killed process
        self.store = self._open()
        survived = self.store.last_lsn
        assert survived >= self.durable, "a durable record was lost"
        lost = sum(lsn > survived for m in self.model.values() for lsn, _ in m.commits)
        event(f"crash lost non-durable commits: {lost > 0}")
        for m in self.model.values():
            m.commits = [(lsn, c) for lsn, c in m.commits if lsn <= survived]
            m.head = m.commits[-1][0] if m.commits else m.start
        self.durable = survived

    # --- invariants ------------------------------------------------------------

    @invariant()
    def same_timelines(self) -> None:
        assert self.store.timeline_ids() == self.live()
        assert self.store.damaged() == {}

    @invariant()
    def same_heads(self) -> None:
        for tid in self.live():
            tl = self.store.timeline(tid)
            m = self.model[tid]
            assert tl.head_lsn == m.head, (tid, tl.head_lsn, m.head)
            assert tl.horizon <= tl.head_lsn


EngineMachine.TestCase.settings = settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", 400)), stateful_step_count=60, deadline=None)
test_engine_against_model = EngineMachine.TestCase
