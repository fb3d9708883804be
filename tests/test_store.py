"""The store's public interface: timelines, branches, reads, time, errors."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest

from engine import (
    AlreadyExistsError,
    HasChildrenError,
    InvalidArgumentError,
    LsnOutOfRangeError,
    NotFoundError,
    Retention,
    Store,
    StoreClosedError,
    StoreConfig,
    StoreLockedError,
)
from engine.fs import OsFileSystem

from .conftest import SMALL, page


def test_reads_see_the_newest_version_at_or_below_an_lsn(store):
    tl = store.create_timeline()
    l1 = tl.commit({1: b"one", 2: b"two"})
    l2 = tl.commit({1: b"uno", 2: None})
    l3 = tl.commit({3: b"tres"})
    assert l1 < l2 < l3 == tl.head_lsn
    assert (tl.get(1, lsn=l1), tl.get(2, lsn=l1), tl.get(3, lsn=l1)) == (b"one", b"two", None)
    assert (tl.get(1, lsn=l2), tl.get(2, lsn=l2)) == (b"uno", None)
    assert tl.get(1) == b"uno" and tl.get(3) == b"tres"
    assert tl.get(1, lsn=tl.branch_lsn) is None
    assert dict(tl.scan()) == {1: b"uno", 3: b"tres"}
    assert list(tl.keys(lsn=l1)) == [1, 2]


def test_a_branch_sees_its_parent_at_the_branch_point_and_nothing_after(store):
    root = store.create_timeline()
    l1 = root.commit({1: b"a", 2: b"b"})
    root.commit({1: b"a2"})
    child = store.branch(root, at_lsn=l1)
    assert (child.ancestor_id, child.ancestor_lsn, child.head_lsn) == (root.id, l1, l1)
    assert child.get(1) == b"a" and child.get(2) == b"b"
    c1 = child.commit({2: b"child", 3: b"new"})
    assert c1 > root.head_lsn > l1  # LSNs grow along a lineage
    root.commit({3: b"root"})
    assert (root.get(2), root.get(3)) == (b"b", b"root")
    assert (child.get(1), child.get(2), child.get(3)) == (b"a", b"child", b"new")
    grandchild = store.branch(child)
    child.commit({1: None})
    assert grandchild.get(1) == b"a" and child.get(1) is None
    assert store.children(root) == [child.id] and store.children(child) == [grandchild.id]


def test_branching_beyond_the_head_or_below_the_horizon_is_refused(store):
    root = store.create_timeline()
    old = root.commit({1: b"x"})
    for i in range(5):
        root.commit({1: b"y%d" % i})
    with pytest.raises(LsnOutOfRangeError) as e:
        store.branch(root, at_lsn=root.head_lsn + 1)
    assert e.value.high == root.head_lsn
    root.set_retention(Retention(period=None, lsn_distance=2))
    store.gc()
    assert root.horizon == root.head_lsn - 2
    with pytest.raises(LsnOutOfRangeError, match="horizon"):
        store.branch(root, at_lsn=old)
    with pytest.raises(LsnOutOfRangeError):
        root.get(1, lsn=old)
    n = len(store.timeline_ids())
    with pytest.raises(InvalidArgumentError):
        store.branch(root, at_lsn="12")  # type: ignore[arg-type]
    assert len(store.timeline_ids()) == n


def test_reads_beyond_the_head_are_refused(store):
    tl = store.create_timeline()
    tl.commit({1: b"x"})
    with pytest.raises(LsnOutOfRangeError, match="beyond the head"):
        tl.get(1, lsn=tl.head_lsn + 1)
    with pytest.raises(InvalidArgumentError):
        tl.get(-1)
    with pytest.raises(InvalidArgumentError):
        tl.get(1, lsn=1.5)  # type: ignore[arg-type]


def test_unknown_and_malformed_timelines(store):
    with pytest.raises(NotFoundError):
        store.timeline("0" * 32)
    with pytest.raises(NotFoundError):
        store.branch("f" * 32)
    with pytest.raises(InvalidArgumentError):
        store.timeline("not-an-id")
    with pytest.raises(NotFoundError):
        store.delete_timeline("1" * 32)
    tl = store.create_timeline("a" * 32)
    with pytest.raises(AlreadyExistsError):
        store.create_timeline("a" * 32)
    with pytest.raises(AlreadyExistsError):
        store.branch(tl, timeline_id="a" * 32)
    assert store.timeline_ids() == ["a" * 32]


def test_bad_commits_change_nothing(store):
    tl = store.create_timeline()
    tl.commit({1: b"keep"}, durable=True)
    head, last = tl.head_lsn, store.last_lsn
    for bad in ({}, {1: "str"}, {2**64: b"x"}, {1: b"x" * 70000}, {1: b"ok", -5: b"x"}):
        with pytest.raises(InvalidArgumentError):
            tl.commit(bad)  # type: ignore[arg-type]
    assert (tl.head_lsn, store.last_lsn, tl.get(1), tl.get(2)) == (head, last, b"keep", None)


def test_deleting_a_parent_is_refused_until_its_children_are_detached(store):
    root = store.create_timeline()
    root.commit({k: page(root.id, k, 1) for k in range(20)})
    child = store.branch(root)
    child.commit({0: b"mine"})
    with pytest.raises(HasChildrenError) as e:
        store.delete_timeline(root)
    assert e.value.children == (child.id,)
    assert root.get(5) == page(root.id, 5, 1)  # nothing changed
    store.detach(child)
    assert child.ancestor_id is None and store.children(root) == []
    store.delete_timeline(root)
    assert [child.get(k) for k in range(1, 20)] == [page(root.id, k, 1) for k in range(1, 20)]
    assert child.get(0) == b"mine"
    with pytest.raises(NotFoundError):
        root.get(1)
    with pytest.raises(NotFoundError):
        store.timeline(root.id)
    with pytest.raises(InvalidArgumentError, match="no ancestor"):
        store.detach(child)


def test_deleting_a_timeline_reclaims_its_files(store_path):
    with Store.open(store_path, background=False) as store:
        keep, drop = store.create_timeline(), store.create_timeline()
        for tl in (keep, drop):
            tl.commit({k: page(tl.id, k, 1) for k in range(100)})
        store.flush()
        before = store.disk_usage()
        store.delete_timeline(drop)
        after = store.disk_usage()
        assert before - after > 100 * 4096
        assert not os.path.exists(os.path.join(store_path, "timelines", drop.id))
    with Store.open(store_path, background=False) as store:
        assert store.timeline_ids() == [keep.id]
        assert store.timeline(keep.id).get(7) == page(keep.id, 7, 1)


def test_everything_survives_close_and_reopen(store_path):
    with Store.open(store_path, background=False, config=SMALL) as store:
        root = store.create_timeline()
        lsns = [root.commit({k % 7: page(root.id, k % 7, k)}) for k in range(50)]
        child = store.branch(root, at_lsn=lsns[20])
        child.commit({100: b"c"})
        store.compact()
        ids = (root.id, child.id)
    with Store.open(store_path, background=False, config=SMALL) as store:
        root, child = store.timeline(ids[0]), store.timeline(ids[1])
        assert root.head_lsn == lsns[-1] and child.ancestor_lsn == lsns[20]
        for i, lsn in enumerate(lsns):
            assert root.get(i % 7, lsn=lsn) == page(root.id, i % 7, i)
        assert child.get(100) == b"c" and child.get(20 % 7) == page(root.id, 20 % 7, 20)


def test_a_second_process_gets_store_locked(store_path):
    with Store.open(store_path, background=False):
        code = (
            "import sys; from engine import Store, StoreLockedError\n"
            f"try:\n    Store.open({store_path!r})\nexcept StoreLockedError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert p.returncode == 3, p.stderr
        assert "locked" in p.stdout and f"pid {os.getpid()}" in p.stdout
    with pytest.raises(StoreLockedError):
        with Store.open(store_path, background=False):
            Store.open(store_path, background=False)


def test_a_closed_store_refuses_work(store_path):
    store = Store.open(store_path, background=False)
    tl = store.create_timeline()
    store.close()
    with pytest.raises(StoreClosedError):
        tl.commit({1: b"x"})
    with pytest.raises(StoreClosedError):
        store.create_timeline()
    store.close()  # idempotent


def test_a_store_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        Store.open(f)


def test_bad_config_is_refused():
    with pytest.raises(InvalidArgumentError, match="image_threshold"):
        StoreConfig(image_threshold=0)
    with pytest.raises(InvalidArgumentError):
        Retention(period=-1)


# --- time ----------------------------------------------------------------------


def test_lsn_at_finds_the_state_as_of_a_time(store_path, clock):
    store = Store.open(store_path, background=False, clock=clock, config=SMALL)
    clock.set(1000.0)
    root = store.create_timeline()
    stamps = []
    for i in range(30):
        clock.advance(10)
        stamps.append((clock(), root.commit({i % 5: b"v%d" % i})))
    t_branch = clock.advance(5)
    child = store.branch(root)
    clock.advance(5)
    c1 = child.commit({0: b"child"})

    def check(s: Store) -> None:
        r = s.timeline(root.id)
        for t, lsn in stamps:
            assert r.lsn_at(t) == lsn
            assert r.lsn_at(t + 9.9) == lsn
        assert r.lsn_at(dt.datetime.fromtimestamp(stamps[3][0], dt.UTC)) == stamps[3][1]
        assert r.lsn_at(1000.5) == r.branch_lsn  # created, nothing committed yet
        with pytest.raises(LsnOutOfRangeError):
            r.lsn_at(999.0)  # before the timeline existed
        c = s.timeline(child.id)
        assert c.lsn_at(t_branch) == c.ancestor_lsn  # before its own first commit
        assert c.lsn_at(clock()) == c1
        with pytest.raises(LsnOutOfRangeError):
            c.lsn_at(stamps[0][0])  # the parent's past, before the branch point
        with pytest.raises(InvalidArgumentError):
            c.lsn_at("yesterday")  # type: ignore[arg-type]

    check(store)
    store.compact(force_images=True)  # times now come from layer files
    check(store)
    store.close()
    store = Store.open(store_path, background=False, clock=clock, config=SMALL)
    check(store)
    store.close()


def test_time_retention_moves_the_horizon(store_path, clock):
    with Store.open(store_path, background=False, clock=clock, config=SMALL) as store:
        root = store.create_timeline(retention=Retention(period=100.0, lsn_distance=None))
        stamps = []
        for i in range(20):
            clock.advance(10)
            stamps.append(root.commit({i % 3: b"v%d" % i}))
        store.compact(force_images=True)
        store.gc()
        # 100 s before the last commit was the 10th commit
        assert root.horizon == stamps[9]
        assert root.get(0, lsn=stamps[9]) == b"v9"
        with pytest.raises(LsnOutOfRangeError):
            root.get(0, lsn=stamps[8])


# --- O(1) branches ---------------------------------------------------------------


class CountingFS(OsFileSystem):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if callable(attr) and not name.startswith("_") and name != "calls":
            def counted(*args, **kwargs):
                object.__getattribute__(self, "calls").append((name, str(args[0]) if args else ""))
                return attr(*args, **kwargs)
            return counted
        return attr


@pytest.mark.parametrize("pages", [10, 2000])
def test_branching_touches_no_data(store_path, pages):
    fs = CountingFS()
    with Store.open(store_path, fs=fs, background=False) as store:
        root = store.create_timeline()
        for start in range(0, pages, 500):
            root.commit({k: page(root.id, k, 1) for k in range(start, min(pages, start + 500))})
        store.flush()
        store.compact(force_images=True)
        fs.calls.clear()
        store.branch(root)
        # one log append and its fsync; nothing about the parent's layers
        assert [c for c in fs.calls if ".layer" in c[1]] == []
        assert len(fs.calls) <= 2, fs.calls


def test_opening_a_store_loads_timelines_lazily(store_path):
    with Store.open(store_path, background=False) as store:
        root = store.create_timeline()
        root.commit({1: b"x"})
        ids = [store.branch(root).id for _ in range(50)]
    with Store.open(store_path, background=False) as store:
        assert sorted(store.timeline_ids()) == sorted(ids + [root.id])
        assert all(v is None for v in store._timelines.values())
        assert store.timeline(ids[7]).get(1) == b"x"
        decoded = [t for t, v in store._timelines.items() if v is not None]
        assert sorted(t.hex() for t in decoded) == sorted([ids[7], root.id])


def test_deep_chains_read_through_every_level_and_survive_detach(store):
    root = store.create_timeline()
    root.commit({k: b"root%d" % k for k in range(50)})
    chain = [root]
    for depth in range(1, 12):
        tl = store.branch(chain[-1])
        tl.commit({depth: b"level%d" % depth})
        chain.append(tl)
    leaf = chain[-1]

    def expected(k: int, upto: int) -> bytes:
        return b"level%d" % k if 1 <= k <= upto else b"root%d" % k

    assert [leaf.get(k) for k in range(50)] == [expected(k, 11) for k in range(50)]
    # writes in the middle after the branch points are invisible below
    chain[5].commit({40: b"late"})
    assert leaf.get(40) == b"root40"
    store.detach(chain[6])
    store.delete_timeline(chain[11])  # a leaf may go at any time
    leaf = chain[10]
    assert [leaf.get(k) for k in range(50)] == [expected(k, 10) for k in range(50)]
    for tl in reversed(chain[:6]):
        if not store.children(tl):
            store.delete_timeline(tl)
    assert [leaf.get(k) for k in range(50)] == [expected(k, 10) for k in range(50)]


def test_files_the_manifest_does_not_list_are_removed_on_open(store_path):
    with Store.open(store_path, background=False) as store:
        tl = store.create_timeline()
        tl.commit({1: b"x" * 100})
        store.flush()
        tdir = os.path.join(store_path, "timelines", tl.id)
        listed = sorted(os.listdir(tdir))
    # what a crash in the middle of a flush, a compaction or a delete leaves
    stray = "delta-0000000000000000-0000000000000001-0000000000000001-0000000000000009-deadbeef.layer"
    for name in (stray, "new-0badf00d.layer.tmp"):
        with open(os.path.join(tdir, name), "wb") as f:
            f.write(b"junk")
    orphan = os.path.join(store_path, "timelines", "c" * 32)
    os.makedirs(orphan)
    open(os.path.join(orphan, "x.layer"), "wb").close()
    open(os.path.join(store_path, "manifest.tmp"), "wb").close()
    with Store.open(store_path, background=False) as store:
        assert sorted(os.listdir(tdir)) == listed
        assert not os.path.exists(orphan)
        assert not os.path.exists(os.path.join(store_path, "manifest.tmp"))
        assert store.timeline(tl.id).get(1) == b"x" * 100


@pytest.mark.parametrize("bad", [dict(period=1e300), dict(period=True), dict(lsn_distance=2**64),
                                 dict(lsn_distance=-1), dict(lsn_distance=1.5)])
def test_out_of_range_retention_is_refused_before_anything_changes(store, bad):
    tl = store.create_timeline()
    with pytest.raises(InvalidArgumentError):
        tl.set_retention(Retention(**bad))
    assert tl.retention == store.config.retention
