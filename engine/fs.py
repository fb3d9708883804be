"""The one seam for file I/O.

Everything the engine reads or writes goes through a `FileSystem`: opening,
reading at an offset, appending, fsync, rename, fsync of a directory, removal
and the store lock. Nothing else in the engine calls `os.fsync`, `os.rename`
or `open`. Tests swap in `engine.faultfs.FaultFileSystem`, which keeps only
what was synced when it "crashes" and can fail chosen operations.

Crash-safe replacement of a file is `write_atomically`: write a temporary
file, fsync it, rename it over the target, fsync the directory. The temporary
name ends in `.tmp`; an interrupted write leaves only such a file, which the
owner of the directory removes on open.

What this module does not guarantee: data written and not synced survives a
process crash (it is in the OS page cache) but not a power loss.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
from collections.abc import Callable, Iterator
from typing import Protocol

from .errors import StoreLockedError

TMP_SUFFIX = ".tmp"


class ReadFile(Protocol):
    path: str
    # pread(length, offset): read_at with the arguments of os.pread, for hot
    # paths (the real file system makes it a C call, no Python frame)
    pread: Callable[[int, int], bytes]

    def read_at(self, offset: int, length: int) -> bytes: ...
    def size(self) -> int: ...
    def close(self) -> None: ...


class WriteFile(Protocol):
    path: str

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def sync(self) -> None: ...
    def tell(self) -> int: ...
    def close(self) -> None: ...


class RWFile(Protocol):
    """A file written in place: `pwrite` at an offset, `sync` is fdatasync."""

    path: str

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


class FileLock(Protocol):
    def release(self) -> None: ...


class FileSystem(Protocol):
    """The operations the engine performs on files and directories."""

    def open_read(self, path: str) -> ReadFile: ...
    def open_write(self, path: str) -> WriteFile: ...
    def open_append(self, path: str) -> WriteFile: ...
    def open_rw(self, path: str) -> RWFile: ...
    def read_file(self, path: str) -> bytes: ...
    def rename(self, src: str, dst: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def makedirs(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def listdir(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool: ...
    def isdir(self, path: str) -> bool: ...
    def file_size(self, path: str) -> int: ...
    def truncate(self, path: str, size: int) -> None: ...
    def sync_dir(self, path: str) -> None: ...
    def lock(self, path: str) -> FileLock: ...


# --- helpers over any FileSystem ---------------------------------------------


def write_atomically(fs: FileSystem, path: str, chunks: bytes | list[bytes]) -> None:
    """Replace `path` with `chunks` so that a crash leaves the old or the new file."""
    tmp = path + TMP_SUFFIX
    f = fs.open_write(tmp)
    try:
        for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
            f.write(chunk)
        f.sync()
    finally:
        f.close()
    fs.rename(tmp, path)
    fs.sync_dir(os.path.dirname(path))


def remove_tree(fs: FileSystem, path: str) -> None:
    """Remove a directory and everything below it (no fsync: callers that need
    the removal to be durable have already recorded it in the log)."""
    if not fs.exists(path):
        return
    for name in fs.listdir(path):
        child = os.path.join(path, name)
        if fs.isdir(child):
            remove_tree(fs, child)
        else:
            fs.remove(child)
    fs.rmdir(path)


def ensure_dir(fs: FileSystem, path: str) -> None:
    """Create `path` (and parents) durably: each new entry's parent is
    synced. If `path` exists, its parent is synced anyway: an earlier call
    may have created it and then failed to sync its parent, and a crash
    would then lose it with everything written in it since."""
    missing: list[str] = []
    p = path
    while not fs.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        fs.makedirs(d)
        fs.sync_dir(os.path.dirname(d))
    if not missing:
        fs.sync_dir(os.path.dirname(path))


# --- the real file system ----------------------------------------------------


class OsReadFile:
    __slots__ = ("path", "_fd", "_size", "pread", "__weakref__")

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size
        self.pread: Callable[[int, int], bytes] = functools.partial(os.pread, self._fd)

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if self._fd >= 0:
            self.pread = _closed_pread
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        # Layers are shared by concurrent readers; the descriptor lives exactly
        # as long as the last reference to its layer.
        try:
            self.close()
        except OSError:
            pass


def _closed_pread(length: int, offset: int) -> bytes:
    raise OSError(errno.EBADF, "read from a closed layer file")


class OsWriteFile:
    """Buffered sequential writer. `sync` flushes the buffer and fsyncs."""

    __slots__ = ("path", "_fd", "_buf", "_pos", "_append")

    _FLUSH_AT = 1 << 20

    def __init__(self, path: str, append: bool) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_APPEND if append else os.O_TRUNC
        self._fd = os.open(path, flags, 0o600)  # private from its first byte, whatever the umask
        self._append = append
        self._pos = os.lseek(self._fd, 0, os.SEEK_END)
        self._buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._append:
            # Log appends go straight to the OS so that a process crash after
            # the call returns does not lose them.
            _write_all(self._fd, data)
        elif len(data) >= self._FLUSH_AT:  # (large: written as it is, not copied into the buffer)
            self._flush()
            _write_all(self._fd, data)
        else:
            self._buf += data
            if len(self._buf) >= self._FLUSH_AT:
                self._flush()
        self._pos += len(data)

    def _flush(self) -> None:
        if self._buf:
            _write_all(self._fd, self._buf)
            self._buf.clear()

    def sync(self) -> None:
        self._flush()
        if self._append:
            os.fdatasync(self._fd)
        else:
            os.fsync(self._fd)

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self._flush()
            finally:
                os.close(self._fd)
                self._fd = -1


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class OsRWFile:
    __slots__ = ("path", "_fd")

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _flock(fd: int, path: str, how: int) -> int:
    """Take `how` (LOCK_EX, LOCK_SH) on `fd` without waiting; the fd, or
    StoreLockedError naming who holds the lock (closing the fd)."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise StoreLockedError(os.path.dirname(path), holder) from None
        raise
    return fd


class OsFileLock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class OsFileSystem:
    """The real thing: POSIX calls on the local file system."""

    def open_read(self, path: str) -> ReadFile:
        return OsReadFile(path)

    def open_write(self, path: str) -> WriteFile:
        return OsWriteFile(path, append=False)

    def open_append(self, path: str) -> WriteFile:
        return OsWriteFile(path, append=True)

    def open_rw(self, path: str) -> RWFile:
        return OsRWFile(path)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def remove(self, path: str) -> None:
        os.unlink(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def file_size(self, path: str) -> int:
        return os.stat(path).st_size

    def truncate(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, path: str) -> FileLock:
        fd = _flock(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), path, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        return OsFileLock(fd)


def walk_files(fs: FileSystem, root: str) -> Iterator[tuple[str, int]]:
    """Yield (path, size) of every file below `root`. Files and directories
    removed while it walks (a timeline being deleted) are left out."""
    if not fs.isdir(root):
        return
    try:
        names = sorted(fs.listdir(root))
    except FileNotFoundError:
        return
    for name in names:
        p = os.path.join(root, name)
        if fs.isdir(p):
            yield from walk_files(fs, p)
        else:
            try:
                yield p, fs.file_size(p)
            except FileNotFoundError:
                continue



# --- a read-only view: the real files, every change kept in memory -------------------


class _MemFile:
    """A file of the overlay: its bytes in memory (read, written, appended
    or written in place)."""

    def __init__(self, path: str, data: bytearray, pos: int = 0) -> None:
        self.path = path
        self.data = data
        self._pos = pos
        self.pread: Callable[[int, int], bytes] = self._pread

    def _pread(self, length: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def read_at(self, offset: int, length: int) -> bytes:
        return self._pread(length, offset)

    def size(self) -> int:
        return len(self.data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.pwrite(data, self._pos)
        self._pos += len(data)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def tell(self) -> int:
        return self._pos

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class _SharedLock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        os.close(self._fd)


class OverlayFileSystem:
    """The real file system for reading, with every change (recovery's
    truncations, a new log segment, a checkpoint at close) kept in memory
    and dropped with the object: a store opened through it is looked at,
    never changed (`strata check` on a stopped service). Its lock is a
    shared flock on the real LOCK file, so a process that holds the store
    keeps it (StoreLockedError), and the file must exist."""

    def __init__(self, base: FileSystem | None = None) -> None:
        self.base = base or OsFileSystem()
        self._files: dict[str, bytearray] = {}  # changed or new
        self._gone: set[str] = set()  # removed (files and directories)
        self._dirs: set[str] = set()  # made here

    def _real(self, path: str) -> bool:
        return path not in self._gone and path not in self._files

    def _load(self, path: str) -> bytearray:
        if path in self._files:
            return self._files[path]
        if path in self._gone:
            raise FileNotFoundError(errno.ENOENT, "no such file (removed in the overlay)", path)
        data = self._files[path] = bytearray(self.base.read_file(path))
        return data

    def open_read(self, path: str) -> ReadFile:
        if self._real(path):
            return self.base.open_read(path)
        return _MemFile(path, self._load(path))

    def open_write(self, path: str) -> WriteFile:
        self._gone.discard(path)
        self._files[path] = bytearray()
        return _MemFile(path, self._files[path])

    def open_append(self, path: str) -> WriteFile:
        if not self.exists(path):
            return self.open_write(path)
        data = self._load(path)
        return _MemFile(path, data, len(data))

    def open_rw(self, path: str) -> RWFile:
        if not self.exists(path):
            self._files[path] = bytearray()
        return _MemFile(path, self._load(path))

    def read_file(self, path: str) -> bytes:
        return self.base.read_file(path) if self._real(path) else bytes(self._load(path))

    def rename(self, src: str, dst: str) -> None:
        data = self._load(src)
        del self._files[src]
        self._gone.add(src)
        self._gone.discard(dst)
        self._files[dst] = data

    def remove(self, path: str) -> None:
        if not self.exists(path):
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        self._files.pop(path, None)
        self._gone.add(path)

    def makedirs(self, path: str) -> None:
        self._gone.discard(path)
        self._dirs.add(path)

    def rmdir(self, path: str) -> None:
        self._dirs.discard(path)
        self._gone.add(path)

    def listdir(self, path: str) -> list[str]:
        names = set(self.base.listdir(path)) if path not in self._dirs and self.base.isdir(path) else set()
        names |= {os.path.basename(p) for p in [*self._files, *self._dirs] if os.path.dirname(p) == path}
        return sorted(n for n in names if os.path.join(path, n) not in self._gone)

    def exists(self, path: str) -> bool:
        if path in self._gone:
            return False
        return path in self._files or path in self._dirs or self.base.exists(path)

    def isdir(self, path: str) -> bool:
        if path in self._gone:
            return False
        return path in self._dirs or (path not in self._files and self.base.isdir(path))

    def file_size(self, path: str) -> int:
        return self.base.file_size(path) if self._real(path) else len(self._load(path))

    def truncate(self, path: str, size: int) -> None:
        del self._load(path)[size:]

    def sync_dir(self, path: str) -> None:
        pass

    def lock(self, path: str) -> FileLock:
        # (FileNotFoundError: no store here)
        return _SharedLock(_flock(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path, fcntl.LOCK_SH))
