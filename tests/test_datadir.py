"""The file tree over a timeline against the real thing: a local directory.

A Hypothesis state machine does the same operations on a `DataDir` and on a
temporary directory of the local file system and compares every file's
bytes, size and every listing; it also records the tree at LSNs and checks
that a read-only `DataDir` at each LSN, and a branch made there, show
exactly that tree.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import Store, Timeline
from engine.testing.faultfs import FaultFileSystem
from pageserver.fuse.filesystem import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from pageserver.pgdata.datadir import MIN_HEADROOM, DataDir
from pageserver.pgdata.layout import DIRECTORY, PAGE, ROOT, SYMLINK

from .conftest import SMALL

NAMES = st.sampled_from(["a", "b", "c", "pg_wal", "16384", "x.tmp", "base", "global"])
OFFSETS = st.one_of(st.integers(0, 3 * PAGE), st.sampled_from([PAGE - 1, PAGE, 2 * PAGE + 5, 40 * PAGE]))
DATA = st.one_of(
    st.binary(min_size=1, max_size=3 * PAGE),
    st.integers(1, 2 * PAGE).map(bytes),  # zeros: holes
)


def snapshot_local(root: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel + "/"
        for d in dirnames:
            p = os.path.join(dirpath, d)
            out[rel + d] = ("link", os.readlink(p)) if os.path.islink(p) else "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                out[rel + f] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as fh:
                    out[rel + f] = fh.read()
    return out


def snapshot_dd(dd: DataDir) -> dict[str, object]:
    out: dict[str, object] = {}
    for path, ino, node in dd.walk():
        if node.kind == DIRECTORY:
            out[path] = "dir"
        elif node.kind == SYMLINK:
            out[path] = ("link", node.target.decode())
        else:
            out[path] = dd.read(ino, 0, node.size + 10)
            assert len(out[path]) == node.size  # type: ignore[arg-type]
    return out


class DataDirMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fs = FaultFileSystem()
        self.store = Store.open("/s", fs=self.fs, config=SMALL, background=False)
        self.tl = self.store.create_timeline()
        DataDir.format(self.tl, uid=0, gid=0)
        self.dd = DataDir(self.tl)
        self.local = tempfile.mkdtemp(prefix="dd-model-")
        self.points: list[tuple[int, dict[str, object]]] = []
        self.cap: int | None = None  # the model's cap on the relation files (base/, global/)

    def counted(self) -> int:
        """What the cap counts, from the local tree: the files below a top-level base/ or global/."""
        total = 0
        for root in ("base", "global"):
            top = os.path.join(self.local, root)
            if os.path.isdir(top) and not os.path.islink(top):
                for d, _, files in os.walk(top):
                    total += sum(os.lstat(os.path.join(d, f)).st_size for f in files
                                 if not os.path.islink(os.path.join(d, f)))
        return total

    def refused(self, path: str, new_size: int) -> bool:
        """Would the cap refuse growing `path` to `new_size`?"""
        top = path.split("/", 1)[0]
        if self.cap is None or top not in ("base", "global") or "/" not in path:
            return False
        old = os.path.getsize(os.path.join(self.local, path))
        limit = self.cap + (max(MIN_HEADROOM, self.cap // 16) if old == 0 else 0)  # (a first page: the headroom)
        return new_size > old and self.counted() + new_size - old > limit

    def teardown(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)
        self.store.close()

    # paths that exist, by kind
    def entries(self, kind: str) -> list[str]:
        snap = snapshot_local(self.local)
        if kind == "dir":
            return [""] + sorted(p for p, v in snap.items() if v == "dir")
        if kind == "file":
            return sorted(p for p, v in snap.items() if isinstance(v, bytes))
        return sorted(p for p in snap)

    def both(self, local_op, dd_op) -> None:
        """Run an operation on both; they must fail alike or succeed alike."""
        try:
            local_op()
        except OSError as e:
            with pytest.raises(OSError) as got:
                dd_op()
            assert got.value.errno == e.errno, (got.value, e)
            return
        dd_op()

    def split(self, path: str) -> tuple[int, bytes]:
        parent, _, name = path.rpartition("/")
        return self.dd.resolve(parent), name.encode()

    @rule(data=st.data(), name=NAMES)
    def create(self, data, name) -> None:
        d = data.draw(st.sampled_from(self.entries("dir")))
        path = f"{d}/{name}" if d else name

        def local():
            fd = os.open(os.path.join(self.local, path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)

        self.both(local, lambda: self.dd.create(*self.split(path), 0o600, 0, 0))

    @rule(data=st.data(), name=NAMES)
    def mkdir(self, data, name) -> None:
        d = data.draw(st.sampled_from(self.entries("dir")))
        path = f"{d}/{name}" if d else name
        self.both(lambda: os.mkdir(os.path.join(self.local, path), 0o700),
                  lambda: self.dd.mkdir(*self.split(path), 0o700, 0, 0))

    @rule(data=st.data(), name=NAMES)
    def symlink(self, data, name) -> None:
        d = data.draw(st.sampled_from(self.entries("dir")))
        path = f"{d}/{name}" if d else name
        self.both(lambda: os.symlink("../target", os.path.join(self.local, path)),
                  lambda: self.dd.symlink(*self.split(path), b"../target", 0, 0))

    @precondition(lambda self: self.entries("file"))
    @rule(data=st.data(), offset=OFFSETS, payload=DATA)
    def write(self, data, offset, payload) -> None:
        path = data.draw(st.sampled_from(self.entries("file")))
        if self.refused(path, max(offset + len(payload), os.path.getsize(os.path.join(self.local, path)))):
            with pytest.raises(OSError) as e:
                self.dd.write(self.dd.resolve(path), offset, payload, enforce=True)
            assert e.value.errno == errno.ENOSPC
            return
        with open(os.path.join(self.local, path), "r+b") as f:
            f.seek(offset)
            f.write(payload)
        assert self.dd.write(self.dd.resolve(path), offset, payload, enforce=True) == len(payload)

    @precondition(lambda self: self.entries("file"))
    @rule(data=st.data(), size=OFFSETS)
    def truncate(self, data, size) -> None:
        path = data.draw(st.sampled_from(self.entries("file")))
        if self.refused(path, size):
            with pytest.raises(OSError) as e:
                self.dd.truncate(self.dd.resolve(path), size, enforce=True)
            assert e.value.errno == errno.ENOSPC
            return
        os.truncate(os.path.join(self.local, path), size)
        self.dd.truncate(self.dd.resolve(path), size, enforce=True)

    @precondition(lambda self: self.entries("file"))
    @rule(data=st.data(), offset=OFFSETS, size=st.integers(0, 3 * PAGE))
    def read(self, data, offset, size) -> None:
        path = data.draw(st.sampled_from(self.entries("file")))
        with open(os.path.join(self.local, path), "rb") as f:
            f.seek(offset)
            want = f.read(size)
        assert self.dd.read(self.dd.resolve(path), offset, size) == want

    @precondition(lambda self: self.entries("any"))
    @rule(data=st.data())
    def unlink(self, data) -> None:
        path = data.draw(st.sampled_from(self.entries("any")))
        self.both(lambda: os.unlink(os.path.join(self.local, path)),
                  lambda: self.dd.unlink(*self.split(path)))

    @precondition(lambda self: self.entries("dir")[1:])
    @rule(data=st.data())
    def rmdir(self, data) -> None:
        path = data.draw(st.sampled_from(self.entries("dir")[1:]))
        self.both(lambda: os.rmdir(os.path.join(self.local, path)),
                  lambda: self.dd.rmdir(*self.split(path)))

    @precondition(lambda self: self.entries("any"))
    @rule(data=st.data(), name=NAMES)
    def rename(self, data, name) -> None:
        src = data.draw(st.sampled_from(self.entries("any")))
        d = data.draw(st.sampled_from(self.entries("dir")))
        dst = f"{d}/{name}" if d else name
        self.both(lambda: os.rename(os.path.join(self.local, src), os.path.join(self.local, dst)),
                  lambda: self.dd.rename(*self.split(src), *self.split(dst)))

    @precondition(lambda self: self.entries("any"))
    @rule(data=st.data(), name=NAMES, flags=st.sampled_from([RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename_with_flags(self, data, name, flags) -> None:
        """renameat2's flags, against Linux's own answers on the local side."""
        src = data.draw(st.sampled_from(self.entries("any")))
        d = data.draw(st.sampled_from(self.entries("dir")))
        dst = f"{d}/{name}" if d else name
        self.both(lambda: renameat2(os.path.join(self.local, src), os.path.join(self.local, dst), flags),
                  lambda: self.dd.rename(*self.split(src), *self.split(dst),
                                         noreplace=flags == RENAME_NOREPLACE, exchange=flags == RENAME_EXCHANGE))

    @precondition(lambda self: self.entries("file"))
    @rule(data=st.data())
    def unlink_while_open(self, data) -> None:
        path = data.draw(st.sampled_from(self.entries("file")))
        ino = self.dd.resolve(path)
        self.dd.opened(ino)
        with open(os.path.join(self.local, path), "rb") as f:
            want = f.read()
        os.unlink(os.path.join(self.local, path))
        self.dd.unlink(*self.split(path))
        assert self.dd.read(ino, 0, len(want) + 1) == want  # still readable while open
        self.dd.released(ino)
        with pytest.raises(OSError) as e:
            self.dd.inode(ino)
        assert e.value.errno == errno.ENOENT

    @rule()
    def remember(self) -> None:
        self.dd.fsync()  # pending writes reach the timeline at fsync
        self.points.append((self.tl.head_lsn, snapshot_local(self.local)))

    @rule()
    def remount(self) -> None:
        self.dd.fsync()
        self.dd = DataDir(self.tl)
        if self.cap is not None:
            self.dd.set_max_data(self.cap)  # (counted again from the tree)

    @rule(room=st.integers(0, 4 * PAGE) | st.none())
    def set_cap(self, room) -> None:
        """Cap the relation files at what they hold now plus `room` (None: no cap)."""
        self.cap = None if room is None else self.counted() + room
        self.dd.set_max_data(self.cap)

    @invariant()
    def counted_alike(self) -> None:
        if self.cap is not None:
            assert self.dd.data_bytes == self.counted()

    @precondition(lambda self: self.entries("file"))
    @rule(data=st.data())
    def fsync_one(self, data) -> None:
        self.dd.fsync(self.dd.resolve(data.draw(st.sampled_from(self.entries("file")))))

    @invariant()
    def same_tree(self) -> None:
        assert snapshot_dd(self.dd) == snapshot_local(self.local)

    def teardown_check(self) -> None:
        pass

    @precondition(lambda self: self.points)
    @rule(data=st.data())
    def past_states(self, data) -> None:
        lsn, snap = data.draw(st.sampled_from(self.points))
        assert snapshot_dd(DataDir(self.tl, lsn=lsn)) == snap
        child = self.store.branch(self.tl, at_lsn=lsn)
        assert snapshot_dd(DataDir(child)) == snap
        self.store.delete_timeline(child)


DataDirMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("DATADIR_EXAMPLES", 200)), stateful_step_count=40, deadline=None
)
test_datadir_against_local_fs = DataDirMachine.TestCase


def _fresh(store: Store) -> tuple[Timeline, DataDir]:
    tl = store.create_timeline()
    DataDir.format(tl, uid=0, gid=0)
    return tl, DataDir(tl)


def test_read_only_datadir_refuses_changes():
    with Store.open("/s", fs=FaultFileSystem(), background=False) as store:
        tl, dd = _fresh(store)
        ino = dd.create(ROOT, b"f", 0o600, 0, 0)
        dd.write(ino, 0, b"hello")
        dd.fsync(ino)
        ro = DataDir(tl, lsn=tl.head_lsn)
        for op in (lambda: ro.write(ino, 0, b"x"), lambda: ro.create(ROOT, b"g", 0o600, 0, 0),
                   lambda: ro.truncate(ino, 0), lambda: ro.unlink(ROOT, b"f")):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EROFS
        assert ro.read(ino, 0, 10) == b"hello"


def test_zero_pages_are_holes_and_cost_nothing():
    with Store.open("/s", fs=FaultFileSystem(), background=False) as store:
        tl, dd = _fresh(store)
        ino = dd.create(ROOT, b"wal", 0o600, 0, 0)
        dd.write(ino, 0, bytes(16 * 1024 * 1024))  # a preallocated WAL segment
        dd.fsync(ino)
        assert dd.inode(ino).size == 16 * 1024 * 1024
        assert dd.read(ino, 5 * PAGE, 3) == b"\0\0\0"
        store.flush()
        assert tl.usage().physical_size < 64 * 1024


def test_the_cap_counts_relation_files_as_they_move_and_refuses_growth_past_it(tmp_path):
    store = Store.open(str(tmp_path / "s"), config=SMALL, background=False)
    try:
        tl, dd = _fresh(store)
        base = dd.mkdir(ROOT, b"base", 0o700, 0, 0)
        db = dd.mkdir(base, b"5", 0o700, 0, 0)
        wal = dd.mkdir(ROOT, b"pg_wal", 0o700, 0, 0)
        rel = dd.create(db, b"16384", 0o600, 0, 0)
        seg = dd.create(wal, b"000000010000000000000001", 0o600, 0, 0)
        dd.write(rel, 0, b"r" * PAGE)
        dd.set_max_data(3 * PAGE)
        assert dd.data_bytes == PAGE
        dd.write(seg, 0, b"w" * (10 * PAGE))  # WAL is not counted: never refused
        dd.write(rel, PAGE, b"r" * (2 * PAGE), enforce=True)  # up to the cap exactly
        with pytest.raises(OSError) as e:
            dd.write(rel, 3 * PAGE, b"r", enforce=True)
        assert e.value.errno == errno.ENOSPC
        assert dd.inode(rel).size == 3 * PAGE  # nothing of the refused write
        dd.write(rel, 0, b"x" * (3 * PAGE), enforce=True)  # rewriting in place is never refused
        dd.write(rel, 3 * PAGE, b"k" * PAGE)  # (from the kernel's cache: counted, never refused)
        assert dd.data_bytes == 4 * PAGE
        dd.truncate(rel, 3 * PAGE)
        fsm = dd.create(db, b"16384_fsm", 0o600, 0, 0)
        dd.write(fsm, 0, b"f" * PAGE, enforce=True)  # a first page: the headroom
        dd.write(fsm, PAGE, b"f" * PAGE, enforce=True, lenient=True)  # a map: the headroom
        with pytest.raises(OSError):
            dd.write(fsm, 2 * PAGE, b"f" * MIN_HEADROOM, enforce=True, lenient=True)  # past it
        dd.may_refuse = lambda: False  # (postgres is recovering)
        dd.write(rel, 3 * PAGE, b"r" * PAGE, enforce=True)
        dd.may_refuse = None
        dd.truncate(rel, 3 * PAGE)
        dd.unlink(db, b"16384_fsm")
        assert dd.data_bytes == 3 * PAGE
        dd.rename(wal, b"000000010000000000000001", db, b"moved")  # into base/: counted
        assert dd.data_bytes == 13 * PAGE
        with pytest.raises(OSError):
            dd.truncate(rel, 3 * PAGE + 1, enforce=True)
        dd.rename(db, b"moved", wal, b"back")  # out again
        assert dd.data_bytes == 3 * PAGE
        dd.opened(rel)
        dd.unlink(db, b"16384")  # gone from the tree, though still open
        assert dd.data_bytes == 0
        dd.released(rel)
        other = dd.create(db, b"16390", 0o600, 0, 0)
        dd.write(other, 0, b"o" * (3 * PAGE))
        dd.set_max_data(2 * PAGE)  # below what it holds: it may only shrink
        with pytest.raises(OSError):
            dd.write(other, 3 * PAGE, b"o", enforce=True)
        dd.truncate(other, PAGE)
        dd.write(other, PAGE, b"o" * PAGE, enforce=True)
        dd.set_max_data(None)
        dd.write(other, 0, b"o" * (100 * PAGE), enforce=True)
        dd.fsync()
        again = DataDir(tl)
        assert again.data_bytes == 100 * PAGE  # counted from the tree
    finally:
        store.close()


@pytest.mark.parametrize("barrier", ["durable write", "fsync of another file", "directory sync", "truncate"])
def test_a_sync_makes_every_write_before_it_durable(barrier):
    """A capped branch's relation files are written without a sync each
    (their fsync never reaches us): any later sync of the branch must take
    them with it, or a checkpoint could outlive the pages it flushed."""
    fs = FaultFileSystem(seed=1)
    store = Store.open("/s", fs=fs, config=SMALL, background=False)
    tl, dd = _fresh(store)
    rel = dd.create(ROOT, b"rel", 0o600, 0, 0)
    wal = dd.create(ROOT, b"wal", 0o600, 0, 0)
    dd.fsync()
    dd.write(rel, 0, b"r" * (2 * PAGE), enforce=True)  # pending
    if barrier == "durable write":
        dd.write(wal, 0, b"w" * 100, durable=True)
    elif barrier == "fsync of another file":
        dd.write(wal, 0, b"w" * 100)
        dd.fsync(wal)
    elif barrier == "directory sync":
        dd.sync_tree()
    else:
        dd.truncate(wal, 10, durable=True)
    fs.crash()
    store = Store.open("/s", fs=fs, config=SMALL, background=False)
    try:
        again = DataDir(store.timeline(tl.id))
        assert again.read(again.resolve("rel"), 0, 3 * PAGE) == b"r" * (2 * PAGE)
    finally:
        store.close()
