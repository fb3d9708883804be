"""engine.diff: the keys that differ between two points of a store's
history, found from what each side wrote after their common point, agree
with a full comparison of every key, through branches, flushes,
compaction (images included), deletes and detach; and the work follows
the change, not the size."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine import LsnOutOfRangeError, Store
from engine.config import Retention
from engine.diff import Point, common_point, diff, point, read

from .conftest import SMALL

KEYS = 24


def full(a: Point, b: Point, base: Point | None) -> tuple[set[int], set[int], set[int]]:
    """By reading every key at every point."""
    keys, a_wrote, b_wrote = set(), set(), set()
    for k in range(KEYS):
        va, vb = a.timeline.get(k, a.lsn), b.timeline.get(k, b.lsn)
        if va == vb:
            continue
        keys.add(k)
        vbase = read(base.timeline, k, base.lsn) if base is not None else None  # (may be a retained branch point)
        if va != vbase:
            a_wrote.add(k)
        if vb != vbase:
            b_wrote.add(k)
    return keys, a_wrote, b_wrote


class DiffMachine(RuleBasedStateMachine):
    """Random commits on a tree of branches; every diff of two recorded
    points equals the full comparison."""

    @initialize()
    def open(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="diff-")
        self.store = Store.open(os.path.join(self.dir, "s"), config=SMALL, background=False)
        root = self.store.create_timeline()
        self.timelines = [root]
        self.points: list[Point] = [point(root)]

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(data=st.data(), n=st.integers(1, 6), delete=st.booleans())
    def commit(self, data, n, delete) -> None:
        tl = data.draw(st.sampled_from(self.timelines))
        keys = data.draw(st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=n, unique=True))
        batch = {k: (None if delete and i == 0 else os.urandom(8) * data.draw(st.integers(1, 600)))
                 for i, k in enumerate(keys)}
        if data.draw(st.booleans()):  # (the same value again: a write that changes nothing)
            k = keys[0]
            batch[k] = tl.get(k)
        tl.commit(batch)
        self.points.append(point(tl))

    @precondition(lambda self: len(self.timelines) < 6)
    @rule(data=st.data())
    def branch(self, data) -> None:
        p = data.draw(st.sampled_from([p for p in self.points if p.lsn >= p.timeline.horizon]))
        child = self.store.branch(p.timeline, at_lsn=p.lsn)
        self.timelines.append(child)
        self.points.append(point(child))

    @rule(data=st.data())
    def flush(self, data) -> None:
        self.store.flush(data.draw(st.sampled_from(self.timelines)))

    @rule(data=st.data(), images=st.booleans())
    def compact(self, data, images) -> None:
        self.store.compact(data.draw(st.sampled_from(self.timelines)), force_images=images)

    @rule(data=st.data(), keep=st.integers(1, 40))
    def gc(self, data, keep) -> None:
        tl = data.draw(st.sampled_from(self.timelines))
        tl.set_retention(Retention(period=None, lsn_distance=keep))
        self.store.compact(tl, force_images=True)
        self.store.gc(tl)

    @invariant()
    def diffs_agree_with_full_comparison(self) -> None:
        live = [p for p in self.points if p.lsn >= p.timeline.horizon]  # (GC took the others)
        for a, b in [(live[-1], live[0]), (live[0], live[-1]), (live[len(live) // 2], live[-1])]:
            d = diff(a, b)
            want = full(a, b, d.base)
            assert (set(d.keys), set(d.a_wrote), set(d.b_wrote)) == want, (a, b, d.base)


DiffMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_diff_machine = DiffMachine.TestCase


def test_the_common_point_is_where_lineages_part(store):
    root = store.create_timeline()
    l1 = root.commit({1: b"a"})
    left = store.branch(root)
    l2 = root.commit({1: b"b"})
    right = store.branch(root, at_lsn=l1)
    grandchild = store.branch(left)
    assert common_point(point(left), point(right)) == Point(root, l1)
    assert common_point(point(grandchild), point(root)) == Point(root, l1)
    assert common_point(Point(root, l2), Point(root, l1)) == Point(root, l1)
    other = store.create_timeline()
    assert common_point(point(other), point(root)) is None
    d = diff(point(other), point(root))
    assert set(d.keys) == {1} and d.base is None


def test_work_follows_the_change_not_the_size(store):
    """100,000 keys in layer files under a branch that changes three:
    three candidates, not a hundred thousand."""
    root = store.create_timeline()
    for i in range(0, 100_000, 10_000):
        root.commit({k: b"v%d" % k for k in range(i, i + 10_000)})
    store.compact(root, force_images=True)
    child = store.branch(root)
    child.commit({5: b"new", 77_777: None, 100_001: b"added"})
    d = diff(point(root), point(child))
    assert set(d.keys) == {5, 77_777, 100_001} and d.candidates == 3
    assert set(d.b_wrote) == {5, 77_777, 100_001} and not d.a_wrote
    assert d.values(5) == (b"v5", b"v5", b"new")
    # and the range form, [first, last]
    assert set(diff(point(root), point(child), 6, 100_000).keys) == {77_777}


def test_a_point_below_the_retention_horizon_is_refused(tmp_path):
    s = Store.open(str(tmp_path / "s"), config=SMALL, background=False)
    try:
        tl = s.create_timeline(retention=Retention(period=None, lsn_distance=1))
        old = tl.commit({1: b"x"})
        for i in range(60):
            tl.commit({i % 5: os.urandom(500)})
        s.compact(tl, force_images=True)
        s.gc(tl)
        assert tl.horizon > old
        with pytest.raises(LsnOutOfRangeError):
            diff(Point(tl, old), point(tl))
    finally:
        s.close()


@pytest.mark.parametrize("later", [b"v2", None], ids=["write", "delete"])
def test_writes_and_deletes_gc_folded_into_images_past_a_branch_point_still_show(tmp_path, later):
    """The parent writes (or deletes) after a child's branch point, then
    compaction folds that into images and GC drops the deltas (the horizon
    passed them; the branch point below it is kept): the diff still finds
    it. A root's complete image leaves a deleted key out, so every key
    there at the common point is a candidate."""
    s = Store.open(str(tmp_path / "s"), config=dataclasses.replace(SMALL, merge_threshold=1000), background=False)
    try:
        root = s.create_timeline()
        root.commit({k: b"v1-%d" % k for k in range(10)})
        s.flush(root)  # (so that the deltas with the parent's later writes start above the branch point)
        child = s.branch(root)
        root.commit({3: later})
        for i in range(40):
            root.commit({20 + i % 4: os.urandom(400)})
        root.set_retention(Retention(period=None, lsn_distance=1))
        s.compact(root, force_images=True)
        for _ in range(3):
            root.commit({15: os.urandom(400)})
        s.gc(root)
        assert root.horizon > child.branch_lsn and root.get(3) == later and child.get(3) == b"v1-3"
        assert not [ly for ly in root._map.layers if not ly.is_image and 3 in ly.keys and ly.lsn_start > 2]
        d = diff(point(child), point(root))
        assert 3 in d.keys and 3 in d.b_wrote and 3 not in d.a_wrote
        assert set(d.keys) == full(point(child), point(root), d.base)[0]
    finally:
        s.close()


def test_twins_are_keys_both_sides_wrote_alike(store):
    """The same bytes written on two branches: not a difference, but kept
    apart (a row there may be visible on one side only)."""
    root = store.create_timeline()
    root.commit({1: b"base", 2: b"base"})
    left, right = store.branch(root), store.branch(root)
    for tl in (left, right):
        tl.commit({1: b"same on both", 3: b"new on both"})
    left.commit({2: b"left only"})
    d = diff(point(left), point(right))
    assert set(d.keys) == {2} and set(d.twins) == {1, 3}
