"""An in-memory file system that loses what was not synced, for crash tests.

`FaultFileSystem` implements the `engine.fs.FileSystem` seam in memory and
tracks, for every file, the bytes as of its last fsync and, for every
directory, its entries as of its last directory fsync. `crash()` simulates a
power loss the way LevelDB's fault-injection environment does:

- file contents revert to what was last synced, except that the unsynced
  tail of a file may survive in part: a prefix of it, its end garbled, or
  (as page-cache writeback does) some 4 KiB pages of it and not others,
  the missing ones reading as zeros;
- a file or directory created, renamed or removed since its parent directory
  was last synced reverts to its state as of that sync;
- open handles of the crashed "process" fail with EIO; locks are released;
- a directory rename is durable at once (the engine renames directories
  only to remove them).

A failed fsync behaves as Linux's does: the pages that were dirty are
marked clean without reaching the disk, so a later fsync that succeeds
does not write them, and a crash loses them. An engine that retries a
failed fsync and reports success is caught.

It can also fail the Nth mutating operation (or every one after it) with an
errno such as EIO or ENOSPC, to check that the engine fails closed.
"""

from __future__ import annotations

import errno as errno_mod
import os
import random
import threading
from dataclasses import dataclass, field

from ..errors import StoreLockedError

MUTATING_OPS = frozenset(
    {"write", "sync", "rename", "remove", "makedirs", "rmdir", "truncate", "sync_dir", "create"}
)


PAGE = 4096


@dataclass
class _Inode:
    data: bytearray = field(default_factory=bytearray)
    synced: bytes = b""
    dirty: set[int] = field(default_factory=set)  # pages written since the last fsync

    def written(self, start: int, end: int) -> None:
        if end > start:
            self.dirty.update(range(start // PAGE, (end - 1) // PAGE + 1))

    def sync(self) -> None:
        """What an fsync makes durable: the dirty pages, and the size."""
        n = len(self.data)
        disk = bytearray(self.synced[:n])
        disk.extend(bytes(n - len(disk)))
        for p in self.dirty:
            lo = p * PAGE
            disk[lo : lo + PAGE] = self.data[lo : lo + PAGE]
        self.synced = bytes(disk[:n])
        self.dirty.clear()

    def settle(self) -> None:
        """Everything as it is now is on disk (operations durable at once)."""
        self.synced = bytes(self.data)
        self.dirty.clear()


@dataclass
class _Fault:
    ops: frozenset[str]
    countdown: int
    err: int
    sticky: bool
    fired: bool = False


def _parent(path: str) -> str:
    return os.path.dirname(path)


class FaultFileSystem:
    def __init__(self, seed: int = 0) -> None:
        self._mu = threading.RLock()
        self._files: dict[str, _Inode] = {}
        self._dirs: set[str] = {"/"}
        self._durable_files: dict[str, _Inode] = {}
        self._durable_dirs: set[str] = {"/"}
        self._locks: set[str] = set()
        self._epoch = 0
        self._last_written: _Inode | None = None
        self._faults: list[_Fault] = []
        self.rng = random.Random(seed)
        self.op_count = 0
        self.crashes = 0

    # --- test controls ---------------------------------------------------

    def crash(self, tear: bool = True) -> None:
        """Lose everything not synced, as a power loss would."""
        with self._mu:
            dirs = {d for d in self._durable_dirs if self._durable_chain(d)}
            files: dict[str, _Inode] = {}
            for path, inode in self._durable_files.items():
                if _parent(path) not in dirs:
                    continue
                data = bytearray(inode.synced)
                if tear:
                    data = self._torn(inode)
                files[path] = _Inode(bytearray(data), bytes(data))
            self._files = files
            self._dirs = set(dirs)
            self._durable_files = dict(files)
            self._durable_dirs = set(dirs)
            self._locks.clear()
            self._epoch += 1
            self._last_written = None
            self.crashes += 1

    def _durable_chain(self, d: str) -> bool:
        while d != "/":
            if d not in self._durable_dirs:
                return False
            d = _parent(d)
        return True

    def _torn(self, inode: _Inode) -> bytearray:
        """What a crash leaves of a file: the synced bytes, plus some of the
        unsynced changes. Changed 4 KiB pages within the synced length each
        survive or not (writeback order is not write order); an unsynced
        tail survives as a prefix, possibly garbled at its end, or with
        holes of zeros where pages did not make it. Only dirty pages can
        survive: one a failed fsync marked clean never reaches the disk."""
        synced = inode.synced
        cur = bytes(inode.data)
        page = 4096
        out = bytearray(synced[: len(cur)]) if len(cur) < len(synced) else bytearray(synced)
        common = min(len(cur), len(synced))
        for start in range(0, common, page):
            end = min(start + page, common)
            if (start // page in inode.dirty and cur[start:end] != synced[start:end]
                    and self.rng.random() < 0.5):
                out[start:end] = cur[start:end]
        if len(cur) <= len(synced):
            return out
        tail = cur[len(synced):]
        limit = len(tail)
        p = len(synced) // page
        while p * page < len(cur):
            if p not in inode.dirty:
                limit = max(0, p * page - len(synced))
                break
            p += 1
        keep = self.rng.randrange(limit + 1)
        kept = bytearray(tail[:keep])
        mode = self.rng.random()
        if kept and mode < 0.3:
            # the last sector made it only in part: garble its end
            n = min(len(kept), self.rng.randrange(1, 64))
            kept[-n:] = bytes(self.rng.randrange(256) for _ in range(n))
        elif kept and mode < 0.6:
            first = (len(synced) // page) * page
            for start in range(first, len(synced) + len(kept), page):
                if self.rng.random() < 0.4:
                    lo = max(start, len(synced)) - len(synced)
                    hi = min(start + page, len(synced) + len(kept)) - len(synced)
                    kept[lo:hi] = bytes(hi - lo)
        return out + kept

    def fail(
        self,
        after: int,
        err: int = errno_mod.EIO,
        ops: frozenset[str] | set[str] | None = None,
        sticky: bool = False,
    ) -> None:
        """Fail the `after`-th next operation among `ops` (default: every
        mutating one) with `err`; with `sticky`, fail every one after it too."""
        with self._mu:
            self._faults.append(
                _Fault(frozenset(ops or MUTATING_OPS), after, err, sticky)
            )

    def clear_faults(self) -> None:
        with self._mu:
            self._faults.clear()

    def damage(self, path: str, offset: int, data: bytes) -> None:
        """Overwrite bytes of a file, durably, behind the engine's back."""
        with self._mu:
            inode = self._files[path]
            end = offset + len(data)
            if end > len(inode.data):
                inode.data.extend(bytes(end - len(inode.data)))
            inode.data[offset:end] = data
            inode.settle()

    def chop(self, path: str, size: int) -> None:
        """Truncate a file durably, behind the engine's back."""
        with self._mu:
            inode = self._files[path]
            del inode.data[size:]
            inode.settle()

    def files(self) -> dict[str, int]:
        with self._mu:
            return {p: len(i.data) for p, i in self._files.items()}

    # --- internals -------------------------------------------------------

    def _op(self, name: str) -> None:
        self.op_count += 1
        for f in self._faults:
            if name not in f.ops:
                continue
            if f.fired and f.sticky:
                raise OSError(f.err, os.strerror(f.err))
            if not f.fired:
                f.countdown -= 1
                if f.countdown <= 0:
                    f.fired = True
                    raise OSError(f.err, os.strerror(f.err))

    def _norm(self, path: str) -> str:
        return os.path.normpath(os.path.join("/", path))

    def _check_parent(self, path: str) -> None:
        if _parent(path) not in self._dirs:
            raise FileNotFoundError(errno_mod.ENOENT, "no such directory", _parent(path))

    def _inode(self, path: str) -> _Inode:
        try:
            return self._files[path]
        except KeyError:
            raise FileNotFoundError(errno_mod.ENOENT, "no such file", path) from None

    # --- FileSystem ------------------------------------------------------

    def open_read(self, path: str) -> _ReadHandle:
        with self._mu:
            path = self._norm(path)
            return _ReadHandle(self, path, self._inode(path), self._epoch)

    def open_write(self, path: str) -> _WriteHandle:
        with self._mu:
            path = self._norm(path)
            self._op("create")
            self._check_parent(path)
            inode = _Inode()
            self._files[path] = inode
            return _WriteHandle(self, path, inode, self._epoch)

    def open_append(self, path: str) -> _WriteHandle:
        with self._mu:
            path = self._norm(path)
            if path not in self._files:
                self._op("create")
                self._check_parent(path)
                self._files[path] = _Inode()
            return _WriteHandle(self, path, self._files[path], self._epoch)

    def open_rw(self, path: str) -> _RWHandle:
        with self._mu:
            path = self._norm(path)
            return _RWHandle(self, path, self._inode(path), self._epoch)

    def read_file(self, path: str) -> bytes:
        with self._mu:
            return bytes(self._inode(self._norm(path)).data)

    def rename(self, src: str, dst: str) -> None:
        with self._mu:
            src, dst = self._norm(src), self._norm(dst)
            self._op("rename")
            if src in self._dirs:
                self._check_parent(dst)
                self._rename_dir(src, dst)
                return
            inode = self._inode(src)
            self._check_parent(dst)
            del self._files[src]
            self._files[dst] = inode

    def _rename_dir(self, src: str, dst: str) -> None:
        """Move a directory and everything below it. Modeled as durable at
        once (as if the parent were synced right after): the engine only
        renames directories it is about to remove."""
        def moved(p: str) -> str:
            return dst + p[len(src):]

        under = src + "/"
        for table in (self._files, self._durable_files):
            for p in [p for p in table if p.startswith(under)]:
                table[moved(p)] = table.pop(p)
        for dirs in (self._dirs, self._durable_dirs):
            for d in [d for d in dirs if d == src or d.startswith(under)]:
                dirs.discard(d)
                dirs.add(moved(d))

    def remove(self, path: str) -> None:
        with self._mu:
            path = self._norm(path)
            self._op("remove")
            self._inode(path)
            del self._files[path]

    def makedirs(self, path: str) -> None:
        with self._mu:
            path = self._norm(path)
            if path in self._dirs:
                return
            self._op("makedirs")
            parts = []
            p = path
            while p not in self._dirs:
                parts.append(p)
                p = _parent(p)
            self._dirs.update(parts)

    def rmdir(self, path: str) -> None:
        with self._mu:
            path = self._norm(path)
            self._op("rmdir")
            if path not in self._dirs:
                raise FileNotFoundError(errno_mod.ENOENT, "no such directory", path)
            if any(_parent(p) == path for p in list(self._files) + list(self._dirs)):
                raise OSError(errno_mod.ENOTEMPTY, "directory not empty", path)
            self._dirs.discard(path)

    def listdir(self, path: str) -> list[str]:
        with self._mu:
            path = self._norm(path)
            if path not in self._dirs:
                raise FileNotFoundError(errno_mod.ENOENT, "no such directory", path)
            names = [os.path.basename(p) for p in self._files if _parent(p) == path]
            names += [os.path.basename(d) for d in self._dirs if d != "/" and _parent(d) == path]
            return sorted(names)

    def exists(self, path: str) -> bool:
        with self._mu:
            path = self._norm(path)
            return path in self._files or path in self._dirs

    def isdir(self, path: str) -> bool:
        with self._mu:
            return self._norm(path) in self._dirs

    def file_size(self, path: str) -> int:
        with self._mu:
            return len(self._inode(self._norm(path)).data)

    def truncate(self, path: str, size: int) -> None:
        with self._mu:
            path = self._norm(path)
            self._op("truncate")
            inode = self._inode(path)
            del inode.data[size:]
            inode.settle()

    def sync_dir(self, path: str) -> None:
        with self._mu:
            path = self._norm(path)
            self._op("sync_dir")
            for p in [p for p in self._durable_files if _parent(p) == path]:
                del self._durable_files[p]
            for p, inode in self._files.items():
                if _parent(p) == path:
                    self._durable_files[p] = inode
            self._durable_dirs = {
                d for d in self._durable_dirs if d == "/" or _parent(d) != path
            } | {d for d in self._dirs if d != "/" and _parent(d) == path}

    def lock(self, path: str) -> _Lock:
        with self._mu:
            path = self._norm(path)
            if path in self._locks:
                raise StoreLockedError(_parent(path), "another store in this process")
            if path not in self._files:
                self._check_parent(path)
                self._files[path] = _Inode()
            self._locks.add(path)
            return _Lock(self, path, self._epoch)


class _Handle:
    def __init__(self, fs: FaultFileSystem, path: str, inode: _Inode, epoch: int) -> None:
        self.fs = fs
        self.path = path
        self.inode = inode
        self.epoch = epoch

    def _live(self) -> None:
        if self.epoch != self.fs._epoch:
            raise OSError(errno_mod.EIO, "file handle from before a crash", self.path)

    def sync(self) -> None:
        with self.fs._mu:
            self._live()
            try:
                self.fs._op("sync")
            except OSError:
                self.inode.dirty.clear()  # marked clean, never written (fsyncgate)
                raise
            self.inode.sync()

    def close(self) -> None:
        pass


class _ReadHandle(_Handle):
    def read_at(self, offset: int, length: int) -> bytes:
        with self.fs._mu:
            self._live()
            return bytes(self.inode.data[offset : offset + length])

    def pread(self, length: int, offset: int) -> bytes:
        return self.read_at(offset, length)

    def size(self) -> int:
        with self.fs._mu:
            return len(self.inode.data)


class _WriteHandle(_Handle):
    def write(self, data: bytes | bytearray | memoryview) -> None:
        with self.fs._mu:
            self._live()
            self.fs._op("write")
            start = len(self.inode.data)
            self.inode.data += data
            self.inode.written(start, len(self.inode.data))
            self.fs._last_written = self.inode

    def tell(self) -> int:
        with self.fs._mu:
            return len(self.inode.data)


class _RWHandle(_Handle):
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        with self.fs._mu:
            self._live()
            self.fs._op("write")
            buf = self.inode.data
            end = offset + len(data)
            if end > len(buf):
                self.inode.written(len(buf), offset)
                buf.extend(bytes(end - len(buf)))
            buf[offset:end] = data
            self.inode.written(offset, end)
            self.fs._last_written = self.inode


class _Lock:
    def __init__(self, fs: FaultFileSystem, path: str, epoch: int) -> None:
        self.fs = fs
        self.path = path
        self.epoch = epoch

    def release(self) -> None:
        with self.fs._mu:
            if self.epoch == self.fs._epoch:
                self.fs._locks.discard(self.path)
