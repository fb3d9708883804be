"""`DataDir` under many threads, as libfuse's 64 threads use it.

Deterministic interleavings pause a reader between its read of the
timeline and its cache fill while a writer changes the same inode or
directory; the stress test runs readers against writers on fresh (cold)
`DataDir`s and compares the tree, at the end and at every LSN a change
committed at, with the same operations done on a local directory.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys
import tempfile
import threading

import pytest

from engine import Store, StoreConfig
from engine.testing.faultfs import FaultFileSystem
from pageserver.pgdata.datadir import DataDir
from pageserver.pgdata.layout import DIRECTORY, PAGE, ROOT, Inode, bucket_of, inode_key

from .interleave import Pause, finished, run
from .test_datadir import snapshot_dd, snapshot_local


@pytest.fixture
def tl():
    with Store.open("/s", fs=FaultFileSystem(), background=False) as store:
        t = store.create_timeline()
        DataDir.format(t, uid=0, gid=0)
        yield t


def _pages(n: int, fill: int) -> bytes:
    return bytes([fill]) * (n * PAGE)


def test_a_reader_filling_the_inode_cache_cannot_undo_a_write(tl):
    """Regression: a reader missed the cache and read the inode (2 pages), a
    writer grew the file to 4 pages and cached that, then the reader stored
    its stale copy; the next durable write committed a 2-page file."""
    ino = DataDir(tl).create(ROOT, b"16384", 0o600, 0, 0)
    DataDir(tl).write(ino, 0, _pages(2, 1), durable=True)
    dd = DataDir(tl)  # a compute's start: every cache cold
    with Pause(tl, "get", thread="reader", when=lambda key, lsn=None: key == inode_key(ino)) as p:
        reader, _ = run(lambda: dd.inode(ino), "reader")  # getattr
        p.reached()  # it has read the inode, and not yet cached it
        writer, wrote = run(lambda: dd.write(ino, 2 * PAGE, _pages(2, 2), durable=True), "writer")
        finished(writer, 0.3)  # today's code: done; with the fill under the lock: waiting for it
    reader.join(10)
    writer.join(10)
    assert "error" not in wrote, wrote
    dd.write(ino, 0, b"\x03", durable=True)  # commits the cached inode
    assert dd.inode(ino).size == 4 * PAGE
    assert Inode.decode(tl.get(inode_key(ino), tl._store._log._synced_lsn)).size == 4 * PAGE
    assert DataDir(tl).read(ino, 0, 4 * PAGE) == b"\x03" + _pages(2, 1)[1:] + _pages(2, 2)


def _same_bucket(n: int) -> list[bytes]:
    """n WAL segment names that land in one directory bucket."""
    names: dict[int, list[bytes]] = {}
    for i in range(1, 10_000):
        name = f"{i:024X}".encode()
        names.setdefault(bucket_of(name), []).append(name)
        if len(names[bucket_of(name)]) == n:
            return names[bucket_of(name)]
    raise AssertionError("no bucket took n names")


def test_a_reader_filling_the_directory_cache_cannot_drop_an_entry(tl):
    """Regression: a lookup missed the cache and scanned pg_wal's buckets,
    a create added a segment and cached the bucket, then the lookup stored
    its stale buckets; the next create in that bucket durably lost the
    first one's entry."""
    first, second, third = _same_bucket(3)
    setup = DataDir(tl)
    wal = setup.mkdir(ROOT, b"pg_wal", 0o700, 0, 0)
    setup.create(wal, first, 0o600, 0, 0)
    setup.fsync()
    dd = DataDir(tl)
    real_scan = tl.scan

    def scan_now(*a, **kw):  # a list, so that the pause falls after the read
        return list(real_scan(*a, **kw))

    tl.scan = scan_now
    try:
        with Pause(tl, "scan", thread="reader") as p:
            reader, _ = run(lambda: dd.lookup(wal, first), "reader")
            p.reached()  # it has read the buckets, and not yet cached them
            writer, made = run(lambda: dd.create(wal, second, 0o600, 0, 0), "writer")
            finished(writer, 0.3)
        reader.join(10)
        writer.join(10)
    finally:
        del tl.scan
    assert "error" not in made, made
    dd.create(wal, third, 0o600, 0, 0)  # writes the bucket from the cache
    dd.fsync()
    for view in (dd, DataDir(tl), DataDir(tl, lsn=tl._store._log._synced_lsn)):
        assert sorted(n for n, _, _ in view.readdir(wal)) == sorted([first, second, third])


# --- stress ------------------------------------------------------------------------------

WRITERS, READERS = 3, 3
ROUNDS = int(os.environ.get("DATADIR_STRESS_ROUNDS") or (400 if os.environ.get("TORTURE") else 60))
OPS_PER_ROUND = 20
CFG = StoreConfig(inmemory_layer_bytes=256 * 1024, log_segment_bytes=1 << 20, log_checkpoint_bytes=4 << 20)


class _Writer:
    """One writer's own files (in its directory and in a shared one), done
    on the DataDir and on a local directory alike."""

    def __init__(self, i: int, local: str, rng: random.Random) -> None:
        self.i, self.local, self.rng = i, local, rng
        self.own = f"w{i}"
        self.files: list[str] = []
        self.history: list[tuple[int, dict[str, object]]] = []  # (LSN of a change, my files then)
        self.ops = 0

    def mine(self, snap: dict[str, object]) -> dict[str, object]:
        return {p: v for p, v in snap.items()
                if p == self.own or p.startswith(self.own + "/") or p.startswith(f"shared/{self.own}-")}

    def name(self) -> str:
        where = self.rng.choice([self.own, "shared"])
        return f"{where}/{self.own}-{self.rng.randrange(6)}" if where == "shared" else \
            f"{where}/f{self.rng.randrange(6)}"

    def step(self, dd: DataDir, lsns: list[int]) -> None:
        rng, local = self.rng, self.local
        op = rng.choice(["create", "write", "write", "write", "truncate", "rename", "unlink"])
        if op == "create" or not self.files:
            path = self.name()
            if path in self.files:
                return
            parent, name = path.split("/")
            dd.create(dd.resolve(parent), name.encode(), 0o600, 0, 0)
            open(os.path.join(local, path), "wb").close()
            self.files.append(path)
        elif op == "write":
            path = rng.choice(self.files)
            offset = rng.choice([0, PAGE - 3, PAGE, 3 * PAGE, rng.randrange(6 * PAGE)])
            data = rng.randbytes(rng.choice([1, 100, PAGE, 2 * PAGE + 7]))
            dd.write(dd.resolve(path), offset, data, durable=True)
            with open(os.path.join(local, path), "r+b") as f:
                f.seek(offset)
                f.write(data)
        elif op == "truncate":
            path = rng.choice(self.files)
            size = rng.choice([0, 1, PAGE, rng.randrange(5 * PAGE)])
            dd.truncate(dd.resolve(path), size, durable=True)
            os.truncate(os.path.join(local, path), size)
        elif op == "rename":
            src, dst = rng.choice(self.files), self.name()
            (sp, sn), (tp, tn) = src.split("/"), dst.split("/")
            dd.rename(dd.resolve(sp), sn.encode(), dd.resolve(tp), tn.encode())
            os.rename(os.path.join(local, src), os.path.join(local, dst))
            self.files = [f for f in self.files if f not in (src, dst)] + [dst]
        else:
            path = rng.choice(self.files)
            parent, name = path.split("/")
            dd.unlink(dd.resolve(parent), name.encode())
            os.unlink(os.path.join(local, path))
            self.files.remove(path)
        self.ops += 1
        if lsns:
            self.history.append((max(lsns), self.mine_local()))

    def mine_local(self) -> dict[str, object]:
        """My files on the local side (read without touching the others')."""
        out: dict[str, object] = {self.own: "dir"}
        for path in self.files:
            with open(os.path.join(self.local, path), "rb") as f:
                out[path] = f.read()
        return out


def test_readers_and_writers_on_cold_datadirs_match_a_local_directory():
    local = tempfile.mkdtemp(prefix="dd-stress-")
    cleanup = [local]
    rng = random.Random(7)
    errors: list[BaseException] = []
    reads = [0]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # switch threads often: more interleavings per second
    try:
        # on tmpfs when there is one: fsyncs cost nothing, so more rounds of cold caches fit
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        home = tempfile.mkdtemp(prefix="dd-stress-store-", dir=shm)
        cleanup.append(home)
        with Store.open(os.path.join(home, "s"), config=CFG, background=False) as store:
            tl = store.create_timeline()
            DataDir.format(tl, uid=0, gid=0)
            setup = DataDir(tl)
            setup.mkdir(ROOT, b"shared", 0o700, 0, 0)
            os.mkdir(os.path.join(local, "shared"))
            writers = [_Writer(i, local, random.Random(rng.random())) for i in range(WRITERS)]
            for w in writers:
                setup.mkdir(ROOT, w.own.encode(), 0o700, 0, 0)
                os.mkdir(os.path.join(local, w.own))
            setup.fsync()
            made: threading.local = threading.local()
            real_commit = tl.commit

            def commit(batch, durable=False):  # which LSNs each writer's changes committed at
                lsn = real_commit(batch, durable)
                getattr(made, "lsns", []).append(lsn)
                return lsn

            tl.commit = commit
            for rnd in range(ROUNDS):
                if rnd % 10 == 9:
                    store.flush()  # the background work, done here between rounds
                    store.compact()
                dd = DataDir(tl)  # cold caches, as at every compute start
                stop = threading.Event()

                def write(w: _Writer, dd: DataDir = dd) -> None:
                    try:
                        for _ in range(OPS_PER_ROUND):
                            made.lsns = []
                            w.step(dd, made.lsns)
                    except BaseException as e:  # noqa: BLE001
                        errors.append(e)

                def read(seed: float, dd: DataDir = dd, stop: threading.Event = stop) -> None:
                    r = random.Random(seed)
                    paths = ["shared", *(w.own for w in writers)] + [p for w in writers for p in w.files]
                    try:
                        while not stop.is_set():
                            path = r.choice(paths)
                            try:
                                ino = dd.resolve(path)
                                node = dd.inode(ino)  # getattr
                                if node.kind == DIRECTORY:
                                    dd.readdir(ino)
                                else:
                                    dd.read(ino, r.randrange(4 * PAGE), r.choice([1, PAGE, 3 * PAGE]))
                                reads[0] += 1
                            except OSError as e:
                                if e.errno != errno.ENOENT:  # gone meanwhile: fine
                                    raise
                    except BaseException as e:  # noqa: BLE001
                        errors.append(e)

                threads = [threading.Thread(target=read, args=(rng.random(),)) for _ in range(READERS)]
                threads += [threading.Thread(target=write, args=(w,)) for w in writers]
                for t in threads:
                    t.start()
                for t in threads[READERS:]:
                    t.join()
                stop.set()
                for t in threads[:READERS]:
                    t.join()
                if errors:
                    raise errors[0]
                assert snapshot_dd(dd) == snapshot_local(local)
                assert snapshot_dd(DataDir(tl)) == snapshot_local(local)  # what a restart would see
            del tl.commit
            tl.sync()

            mismatches = checked = 0
            for w in writers:
                for lsn, want in w.history:
                    checked += 1
                    if w.mine(snapshot_dd(DataDir(tl, lsn=lsn))) != want:
                        mismatches += 1
            ops = sum(w.ops for w in writers)
            print(f"DataDir stress: {ROUNDS} rounds on cold DataDirs, {ops} changes by {WRITERS} writers, "
                  f"{reads[0]} reads by {READERS} readers; tree checked at {checked} LSNs: "
                  f"{mismatches} mismatches")
            assert mismatches == 0
            assert checked > ROUNDS * OPS_PER_ROUND
    finally:
        sys.setswitchinterval(old_interval)
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)


def test_reading_the_postgresql_version_leaves_a_running_computes_files_alone(tl):
    """Regression (review): starting a compute read PG_VERSION through a
    writable DataDir, whose opening frees the files unlinked while open:
    a compute already running on the timeline lost one it still read."""
    from pageserver.compute.node import pg_version_of

    live = DataDir(tl)  # the attachment of a compute that runs
    version = live.create(ROOT, b"PG_VERSION", 0o600, 0, 0)
    live.write(version, 0, b"15\n", durable=True)
    ino = live.create(ROOT, b"16384", 0o600, 0, 0)
    live.write(ino, 0, b"x" * PAGE, durable=True)
    live.opened(ino)
    live.unlink(ROOT, b"16384")  # unlinked while open: still readable through its handle
    assert pg_version_of(tl) == "15"  # what a start (read-only, or refused as busy) does first
    assert live.read(ino, 0, 4) == b"xxxx"
