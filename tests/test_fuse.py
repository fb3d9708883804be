"""The FUSE adapter: errors PostgreSQL can report, renameat2's flags,
durable O_TRUNC, detach against operations in flight, and libfuse 3
whatever else is installed (real mounts where it says so)."""

from __future__ import annotations

import ctypes.util
import errno
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from engine import Store, Timeline
from pageserver.fuse.filesystem import RENAME_EXCHANGE, RENAME_NOREPLACE, Mount, StrataFS, renameat2
from pageserver.pgdata.datadir import DataDir
from pageserver.pgdata.layout import ROOT, Inode, inode_key

from .conftest import in_ci
from .interleave import Pause, finished, run
from .pg import requires_fuse


@dataclass
class Mounted:
    store: Store
    tl: Timeline
    ops: StrataFS
    root: str  # the attachment's directory on the mount

    def dd(self) -> DataDir:
        return self.ops._t.attachments["att"].datadir

    def synced(self) -> int:
        return self.store._log._synced_lsn


def _store_with_tree(path: str) -> tuple[Store, Timeline]:
    store = Store.open(path, background=False)
    tl = store.create_timeline()
    DataDir.format(tl, uid=0, gid=0)
    return store, tl


@pytest.fixture
def unmounted(tmp_path) -> Iterator[Mounted]:
    """The operations without a kernel mount: called directly, as libfuse would."""
    store, tl = _store_with_tree(str(tmp_path / "store"))
    ops = StrataFS()
    ops.attach("att", DataDir(tl), str(tmp_path / "local"), os.getuid(), os.getgid())
    try:
        yield Mounted(store, tl, ops, "/att")
    finally:
        ops.detach("att")
        store.close()


@pytest.fixture
def mounted(tmp_path) -> Iterator[Mounted]:
    store, tl = _store_with_tree(str(tmp_path / "store"))
    mnt = tempfile.mkdtemp(prefix="strata-fuse-test-")
    mount = Mount(mnt, statfs_path=str(tmp_path))
    try:
        mount.start()
        mount.ops.attach("att", DataDir(tl), str(tmp_path / "local"), 0, 0)
        yield Mounted(store, tl, mount.ops, os.path.join(mnt, "att"))
    finally:
        mount.stop()
        os.rmdir(mnt)
        store.close()


def _file(m: Mounted, name: bytes, data: bytes) -> int:
    dd = m.dd()
    ino = dd.create(ROOT, name, 0o600, 0, 0)
    dd.write(ino, 0, data, durable=True)
    return ino


@requires_fuse
def test_an_unexpected_error_becomes_eio_logged_once_with_path_and_timeline(mounted, caplog, monkeypatch):
    _file(mounted, b"16384", b"x" * 20000)
    dd = mounted.dd()
    calls = []

    def broken(*args):
        calls.append(args)
        raise KeyError("a bug")

    monkeypatch.setattr(dd, "read", broken)
    with caplog.at_level(logging.ERROR, logger="strata.fuse"):
        fd = os.open(os.path.join(mounted.root, "16384"), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 100, 0)
        finally:
            os.close(fd)
    assert e.value.errno == errno.EIO  # not EINVAL: PostgreSQL says "could not read block"
    ours = [r for r in caplog.records if r.name == "strata.fuse"]
    assert calls and len(ours) == len(calls), [r.getMessage() for r in ours]  # once per failed request
    for r in ours:
        line = r.getMessage()
        assert "read" in line and "/att/16384" in line and mounted.tl.id in line, line
        assert "KeyError" in (r.exc_text or "") + line, line


@requires_fuse
def test_renameat2_flags_are_honoured(mounted):
    _file(mounted, b"a", b"first")
    _file(mounted, b"b", b"second")
    a, b = os.path.join(mounted.root, "a"), os.path.join(mounted.root, "b")
    with pytest.raises(OSError) as e:
        renameat2(a, b, RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    assert open(a, "rb").read() == b"first" and open(b, "rb").read() == b"second"
    renameat2(a, b, RENAME_EXCHANGE)
    assert open(a, "rb").read() == b"second" and open(b, "rb").read() == b"first"
    with pytest.raises(OSError) as e:
        renameat2(a, os.path.join(mounted.root, "missing"), RENAME_EXCHANGE)
    assert e.value.errno == errno.ENOENT
    renameat2(a, os.path.join(mounted.root, "c"), RENAME_NOREPLACE)
    fresh = DataDir(mounted.tl)  # the timeline holds the same
    assert sorted(n for n, _, _ in fresh.readdir(ROOT)) == [b"b", b"c"]
    assert fresh.read(fresh.resolve("c"), 0, 100) == b"second"


def test_open_with_o_trunc_is_durable_when_it_returns(unmounted):
    ino = _file(unmounted, b"pg_control", b"y" * 9000)
    fh = unmounted.ops.open("/att/pg_control", os.O_WRONLY | os.O_TRUNC)
    try:
        assert Inode.decode(unmounted.tl.get(inode_key(ino), unmounted.synced())).size == 0
    finally:
        unmounted.ops.release("/att/pg_control", fh)


def test_detach_waits_for_an_operation_in_flight(unmounted, monkeypatch):
    """Regression: detach closed a compute-local fd while a write still used
    it; a reused fd number could take the compute's bytes into a layer file."""
    local = unmounted.ops._t.attachments["att"].local_root
    open(os.path.join(local, "postmaster.opts"), "wb").close()
    fh = unmounted.ops.open("/att/postmaster.opts", os.O_RDWR)
    with Pause(os, "pwrite", thread="writer", before=True) as p:
        writer, wrote = run(lambda: unmounted.ops.write(None, b"postgres -D ...", 0, fh), "writer")
        p.reached()  # it holds the handle's fd and has not written yet
        detacher, _ = run(lambda: unmounted.ops.detach("att"), "detacher")
        assert not finished(detacher, 0.3), "detach returned while a write was in flight"
    writer.join(10)
    assert finished(detacher, 10)
    assert wrote.get("result") == 15, wrote
    assert open(os.path.join(local, "postmaster.opts"), "rb").read() == b"postgres -D ..."
    with pytest.raises(OSError) as e:  # and nothing reaches it any more
        unmounted.ops.read(None, 10, 0, fh)
    assert e.value.errno == errno.EBADF
    unmounted.ops.attach("att", DataDir(unmounted.tl), local, os.getuid(), os.getgid())  # for the fixture


def test_an_operation_on_a_detached_attachment_fails_cleanly(unmounted):
    _file(unmounted, b"f", b"z")
    fh = unmounted.ops.open("/att/f", os.O_RDONLY)
    unmounted.ops.detach("att")
    for call in (lambda: unmounted.ops.read(None, 1, 0, fh), lambda: unmounted.ops.getattr("/att/f"),
                 lambda: unmounted.ops.open("/att/f", os.O_RDONLY)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno in (errno.EBADF, errno.ENOENT)
    unmounted.ops.attach("att", DataDir(unmounted.tl), "/tmp/strata-test-unused", os.getuid(), os.getgid())


def test_libfuse_3_is_loaded_even_with_libfuse_2_installed():
    """mfusepy alone loads find_library('fuse') first: libfuse 2 where both
    are installed, and every mount then fails. `make system` installs both."""
    fuse2 = ctypes.util.find_library("fuse")
    if fuse2 is None:
        msg = "libfuse 2 is not installed beside libfuse 3 (apt-get install libfuse2; `make system` does it)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    code = "import pageserver.fuse.filesystem, mfusepy; print(mfusepy._libfuse_path, mfusepy.fuse_version_major)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "FUSE_LIBRARY_PATH"}).stdout
    path, major = out.split()
    assert "fuse3" in path and major == "3", out
    assert "FUSE_LIBRARY_PATH" not in subprocess.run(  # the choice does not leak to child processes
        [sys.executable, "-c", "import os, pageserver.fuse.filesystem; print(sorted(os.environ))"],
        capture_output=True, text=True, check=True).stdout
