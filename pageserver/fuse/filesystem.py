"""The FUSE file system that serves branches as PostgreSQL data directories.

One mount per page server. Its root lists *attachments*: each is a
directory `<mount>/<name>` that serves one `DataDir` (a timeline at its head,
or read-only at a past LSN). A compute's data directory is its attachment.

Compute-local files never travel to a branch: `postmaster.pid`,
`postmaster.opts`, the directories PostgreSQL empties or rebuilds at start
(`pg_dynshmem`, `pg_notify`, `pg_serial`, `pg_snapshots`, `pg_stat_tmp`,
`pg_subtrans`, `pg_replslot`), temporary files (`pgsql_tmp*`) and relcache
init files (`pg_internal.init`, and the `pg_internal.init.<pid>` each is
written as before its rename). They live in the attachment's local
directory and are passed through to it, much as `pg_basebackup` leaves them
out of a backup.

Kernel settings, from measurements of this design: the writeback cache (the
kernel gathers writes and sends them at fsync or writeback), long attribute
and entry timeouts (every change comes through this one mount, so the
kernel's caches stay right, and it keeps cached pages across opens),
`hard_remove` (a file unlinked while open stays readable through its
handle), and no `auto_inval_data` (which would drop the kernel's cached
pages at every mtime change).

Durability is write-through below the kernel's cache: every write the
kernel sends, every truncate and every change of mode or owner is durable
in the engine before it is answered. So `fsync` needs nothing more from
this process once the kernel has sent the file's dirty pages, and FUSE's
FSYNC is left unimplemented: the kernel takes the ENOSYS that libfuse
answers for it as success and stops sending it (fuse_lowlevel.h, `fsync`).
A commit of PostgreSQL's is then one round trip (WRITE), not two (WRITE,
FSYNC); measured, that is about 10% more TPC-B. Namespace changes
(create, rename, unlink, ...) are committed at once and become durable at
the next durable write or at an fsync of any directory (FSYNCDIR is
implemented), as POSIX asks of a file system; so is an `open` with
O_TRUNC once it returns.

Concurrency: libfuse calls the operations from up to 64 threads at once.

    StrataFS._mu   guards the table (attachments by name, open file and
                   directory handles, the counters). Held for dict updates
                   only, never across I/O. Lookups of a handle or an
                   attachment read the dicts without it (one atomic read).
    Attachment.cv  guards its `inflight` count and `dead`. Each operation
                   *enters* the attachments it resolves (by path or by
                   handle) and leaves them when it returns (`operation`).
                   `detach` takes the attachment out of the table, marks
                   it dead (entering it fails from then on) and waits until
                   nothing is in flight before it closes the compute-local
                   files of its handles: an fd number is never closed while
                   a read or write may still use it, so it can never be
                   reused by a layer file and receive a compute's bytes.
    DataDir        has its own lock (see pageserver.datadir).

An operation that fails with something other than an `OSError` (an engine
error, or a bug) answers EIO, and logs it once with the operation, the
path and the timeline: PostgreSQL then reports an I/O error naming the
file, never "Invalid argument".

libfuse 3 is loaded explicitly (`pageserver.libfuse`), whatever else is
installed: mfusepy on its own prefers libfuse 2 when both are there.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine import StrataError
from pageserver.fuse import libfuse
from pageserver.pgdata.datadir import DataDir
from pageserver.pgdata.layout import DIRECTORY, FILE, ROOT, SYMLINK, Inode
from pageserver.pgdata.policy import LOCAL_DIRS, RELATION_FILE, is_local, lenient

libfuse.bind()  # before mfusepy is imported: it picks its library then
import mfusepy  # noqa: E402

log = logging.getLogger("strata.fuse")

FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2(2)
_TYPE = {FILE: stat.S_IFREG, DIRECTORY: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}
TIMEOUT = 3600.0
DETACH_WARN_AFTER = 10.0  # seconds detach waits before it says what it waits for


_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int = 0) -> None:
    """rename(2) with renameat2's flags (RENAME_NOREPLACE, RENAME_EXCHANGE)."""
    if not flags:
        os.rename(old, new)
        return
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


@dataclass(eq=False)
class Attachment:
    name: str
    slot: int
    datadir: DataDir
    local_root: str
    uid: int
    gid: int
    dead: bool = False  # detached: entering fails (under cv)
    inflight: int = 0  # operations using it now (under cv)
    cv: threading.Condition = field(default_factory=lambda: threading.Condition(threading.Lock()), repr=False)

    def enter(self) -> None:
        """Count an operation in (it must leave: `operation` does that)."""
        entered = _current.entered
        if entered is None:
            raise RuntimeError("an attachment is entered only inside a FUSE operation")
        with self.cv:
            if self.dead:
                raise OSError(errno.ENOENT, f"data directory {self.name} is detached")
            self.inflight += 1
        entered.append(self)

    def leave(self) -> None:
        with self.cv:
            self.inflight -= 1
            if self.dead and not self.inflight:
                self.cv.notify_all()

    def timeline_id(self) -> str:
        return self.datadir.timeline.id if self.datadir is not None else "-"


@dataclass
class _Handle:
    att: Attachment
    ino: int = 0  # a DataDir file
    fd: int = -1  # or a local file
    rel: str = ""  # its path in the data directory (for logs)
    capped: bool = False  # a relation file of a capped branch: direct I/O, its growth checked
    lenient: bool = False  # ... against the cap's headroom (a map or a catalog: see policy.lenient)


class _Current(threading.local):
    entered: list[Attachment] | None = None  # attachments the running operation entered
    path: str | None = None  # what it is about, for its log line


_current = _Current()
F = TypeVar("F", bound=Callable[..., Any])


def operation(func: F) -> F:
    """Make a method a FUSE operation: the attachments it enters are left
    when it returns, however it returns, and anything but an OSError
    becomes EIO, logged once with the operation, the path and the
    timeline. (A call from inside another operation, such as a subclass
    calling its base, is part of the outer one.)"""
    name = func.__name__

    @functools.wraps(func)
    def op(self: StrataFS, *args: Any, **kwargs: Any) -> Any:
        cur = _current
        if cur.entered is not None:
            return func(self, *args, **kwargs)
        entered: list[Attachment] = []
        cur.entered, cur.path = entered, None
        try:
            return func(self, *args, **kwargs)
        except StrataError as e:  # the engine's: damage, a failed store (also a FailpointError)
            log.error("FUSE %s %s failed: %s", name, _where(args, entered), e)
            raise OSError(errno.EIO, str(e)) from e
        except OSError as e:
            if isinstance(e.errno, int) and e.errno > 0:
                raise
            log.error("FUSE %s %s failed: %r", name, _where(args, entered), e)
            raise OSError(errno.EIO, str(e)) from e
        except Exception as e:
            log.exception("FUSE %s %s failed unexpectedly", name, _where(args, entered))
            raise OSError(errno.EIO, f"{type(e).__name__}: {e}") from e
        finally:
            cur.entered = None
            for att in entered:
                att.leave()

    return op  # type: ignore[return-value]


def _where(args: tuple[Any, ...], entered: list[Attachment]) -> str:
    path = _current.path or (args[0] if args and isinstance(args[0], str) else None)
    timelines = ",".join(sorted({a.timeline_id() for a in entered})) or "-"
    return f"path={path or '-'} timeline={timelines}"


@dataclass
class _Table:
    attachments: dict[str, Attachment] = field(default_factory=dict)
    handles: dict[int, _Handle] = field(default_factory=dict)
    dirs: dict[int, str] = field(default_factory=dict)  # open directory handles -> path
    next_fh: int = 1
    next_slot: int = 1


class StrataFS(mfusepy.Operations):
    """Operations of the mount (thread-safe: libfuse calls from many threads)."""

    use_ns = True
    flag_nullpath_ok = True
    flag_nopath = True
    is_local = staticmethod(is_local)  # which paths are compute-local files

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._t = _Table()
        self.ready = threading.Event()

    # --- attachments ------------------------------------------------------------

    def attach(self, name: str, datadir: DataDir, local_root: str, uid: int, gid: int) -> Attachment:
        with self._mu:
            if name in self._t.attachments:
                raise FileExistsError(errno.EEXIST, f"attachment {name} exists")
            os.makedirs(local_root, mode=0o700, exist_ok=True)
            os.chown(local_root, uid, gid)
            for d in LOCAL_DIRS:
                p = os.path.join(local_root, d)
                os.makedirs(p, mode=0o700, exist_ok=True)
                os.chown(p, uid, gid)
            att = Attachment(name, self._t.next_slot, datadir, local_root, uid, gid)
            self._t.next_slot += 1
            self._t.attachments[name] = att
            return att

    def detach(self, name: str) -> Attachment | None:
        """Stop serving an attachment. Returns once no operation uses it any
        more (its compute-local files are closed then, not before)."""
        with self._mu:
            att = self._t.attachments.pop(name, None)
        if att is None:
            return None
        with att.cv:
            att.dead = True
            while att.inflight:
                if not att.cv.wait(DETACH_WARN_AFTER):
                    log.warning("detaching %s: waiting for %d operations in flight", name, att.inflight)
        with self._mu:
            gone = [self._t.handles.pop(fh) for fh, h in list(self._t.handles.items()) if h.att is att]
        for h in gone:
            if h.fd >= 0:
                os.close(h.fd)
        return att

    def attachments(self) -> list[str]:
        with self._mu:
            return sorted(self._t.attachments)

    def attachment(self, name: str) -> Attachment | None:
        return self._t.attachments.get(name)  # (one atomic read)

    # --- resolution ---------------------------------------------------------------

    def _split(self, path: str | None) -> tuple[Attachment | None, str]:
        """(attachment, path inside it) of a mount path; enters the attachment."""
        if path is None:
            raise OSError(errno.EBADF, "no path and no open handle")
        parts = path.strip("/").split("/", 1)
        if not parts[0]:
            return None, ""
        att = self._t.attachments.get(parts[0])
        if att is None:
            raise OSError(errno.ENOENT, path)
        att.enter()
        return att, parts[1] if len(parts) > 1 else ""

    def _handle(self, fh: int) -> _Handle:
        """An open file's handle; enters its attachment."""
        h = self._t.handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "the file's data directory is no longer attached")
        h.att.enter()
        _current.path = f"/{h.att.name}/{h.rel}"
        return h

    def _handle_or_none(self, fh: int | None) -> _Handle | None:
        """For calls that may come with a handle (setattr-style)."""
        if fh is None or fh not in self._t.handles:
            return None
        return self._handle(fh)

    def _local(self, att: Attachment, rel: str) -> str:
        return os.path.join(att.local_root, rel)

    def _parent(self, att: Attachment, rel: str) -> tuple[int, bytes]:
        parent, _, name = rel.rpartition("/")
        return att.datadir.resolve(parent), name.encode("utf-8", "surrogateescape")

    def _attrs(self, att: Attachment, ino: int, node: Inode) -> dict[str, Any]:
        return {
            "st_mode": _TYPE[node.kind] | node.mode,
            "st_ino": (att.slot << 32) | ino,
            "st_nlink": max(node.nlink, 1),
            "st_uid": node.uid,
            "st_gid": node.gid,
            "st_size": node.size,
            "st_blocks": (node.size + 511) // 512,
            "st_blksize": 8192,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.ctime_ns,
            "st_atime": node.mtime_ns,
        }

    @staticmethod
    def _stat_dict(st: os.stat_result) -> dict[str, Any]:
        return {
            "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
            "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
            "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
            "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns, "st_atime": st.st_atime_ns,
        }

    # --- libfuse -------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            if conn.capable & FUSE_CAP_WRITEBACK_CACHE:
                conn.want |= FUSE_CAP_WRITEBACK_CACHE
            conn.want &= ~FUSE_CAP_AUTO_INVAL_DATA
        if config is not None:
            config.use_ino = 1
            config.hard_remove = 1
            config.attr_timeout = TIMEOUT
            config.entry_timeout = TIMEOUT
            config.negative_timeout = 0
            config.kernel_cache = 1  # keep cached pages across opens: nothing changes behind the kernel
            config.auto_cache = 0
            config.nullpath_ok = 1
        self.ready.set()

    @operation
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        h = self._handle_or_none(fh)
        if h is not None:
            if h.fd >= 0:
                return self._stat_dict(os.fstat(h.fd))
            return self._attrs(h.att, h.ino, h.att.datadir.inode(h.ino))
        att, rel = self._split(path)
        if att is None:
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_ino": 1}
        if self.is_local(rel):
            return self._stat_dict(os.lstat(self._local(att, rel)))
        ino = att.datadir.resolve(rel)
        return self._attrs(att, ino, att.datadir.inode(ino))

    @operation
    def opendir(self, path: str) -> int:
        self._split(path)  # ENOENT for an unknown attachment
        with self._mu:
            fh = self._t.next_fh
            self._t.next_fh += 1
            self._t.dirs[fh] = path
            return fh

    @operation
    def releasedir(self, path: str | None, fh: int) -> int:
        with self._mu:
            self._t.dirs.pop(fh, None)
        return 0

    @operation
    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # every entry needs a non-zero inode number: readdir(3) skips zeros
        path = self._t.dirs.get(fh, path)
        if path is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        att, rel = self._split(path)
        out = [(".", {"st_mode": stat.S_IFDIR, "st_ino": 1}, 0), ("..", {"st_mode": stat.S_IFDIR, "st_ino": 1}, 0)]
        if att is None:
            with self._mu:
                atts = sorted(self._t.attachments.values(), key=lambda a: a.name)
            return out + [(a.name, {"st_mode": stat.S_IFDIR, "st_ino": a.slot << 32 | ROOT}, 0) for a in atts]
        if self.is_local(rel):
            with os.scandir(self._local(att, rel)) as it:
                return out + [(e.name, {"st_mode": e.stat(follow_symlinks=False).st_mode, "st_ino": e.inode()}, 0)
                              for e in it]
        ino = att.datadir.resolve(rel)
        for name, child, kind in att.datadir.readdir(ino):
            out.append((name.decode("utf-8", "surrogateescape"),
                        {"st_mode": _TYPE[kind], "st_ino": att.slot << 32 | child}, 0))
        local = self._local(att, rel)
        if os.path.isdir(local):  # compute-local entries that live in this directory
            with os.scandir(local) as it:
                for e in it:
                    if self.is_local(f"{rel}/{e.name}" if rel else e.name):
                        out.append((e.name, {"st_mode": e.stat(follow_symlinks=False).st_mode,
                                             "st_ino": e.inode()}, 0))
        return out

    @operation
    def readlink(self, path: str) -> str:
        att, rel = self._split(path)
        if att is None:
            raise OSError(errno.EINVAL, path)
        if self.is_local(rel):
            return os.readlink(self._local(att, rel))
        return att.datadir.readlink(att.datadir.resolve(rel)).decode("utf-8", "surrogateescape")

    def _new_handle(self, att: Attachment, rel: str, ino: int = 0, fd: int = -1) -> int:
        capped = ino > 0 and att.datadir.max_data is not None and RELATION_FILE.match(rel) is not None
        with self._mu:
            if att.dead:  # detach waits for us, then closes what the table holds
                if fd >= 0:
                    os.close(fd)
                raise OSError(errno.ENOENT, "detached")
            fh = self._t.next_fh
            self._t.next_fh += 1
            self._t.handles[fh] = _Handle(att, ino, fd, rel, capped, capped and lenient(rel))
            return fh

    def direct_io(self, fh: int) -> bool:
        """Does the kernel send this handle's reads and writes to us as they
        are made (not through its cache)? Only a capped branch's relation
        files: their writes must be refused when they are made."""
        h = self._t.handles.get(fh)
        return h is not None and h.capped

    @staticmethod
    def _local_flags(flags: int) -> int:
        # the kernel's writeback cache may read through any handle, and owns
        # appending: open read-write, without O_APPEND or O_DIRECT
        flags &= ~(os.O_APPEND | getattr(os, "O_DIRECT", 0) | os.O_ACCMODE)
        return flags | os.O_RDWR

    @operation
    def open(self, path: str, flags: int) -> int:
        att, rel = self._split(path)
        if att is None:
            raise OSError(errno.EISDIR, path)
        if self.is_local(rel):
            return self._new_handle(att, rel, fd=os.open(self._local(att, rel), self._local_flags(flags)))
        ino = att.datadir.resolve(rel)
        if flags & os.O_TRUNC:
            att.datadir.truncate(ino, 0, durable=True)
        att.datadir.opened(ino)
        return self._new_handle(att, rel, ino=ino)

    def _new_entry(self, path: str) -> tuple[Attachment, str, int, int, str | None]:
        """For a call that makes something at `path`: (attachment, relative
        path, caller's uid and gid, local path if compute-local, its parent
        directory made)."""
        att, rel = self._split(path)
        if att is None:
            raise OSError(errno.EACCES, path)
        uid, gid, _ = mfusepy.fuse_get_context()
        local = None
        if self.is_local(rel):
            local = self._local(att, rel)
            os.makedirs(os.path.dirname(local), exist_ok=True)
        return att, rel, uid, gid, local

    @operation
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        att, rel, uid, gid, local = self._new_entry(path)
        if local is not None:
            fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode & 0o7777)
            os.fchown(fd, uid, gid)
            return self._new_handle(att, rel, fd=fd)
        parent, name = self._parent(att, rel)
        ino = att.datadir.create(parent, name, mode, uid, gid)
        att.datadir.opened(ino)
        return self._new_handle(att, rel, ino=ino)

    @operation
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        h = self._handle(fh)
        if h.fd >= 0:
            return os.pread(h.fd, size, offset)
        return h.att.datadir.read(h.ino, offset, size)

    @operation
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        h = self._handle(fh)
        if h.fd >= 0:
            return os.pwrite(h.fd, data, offset)
        if h.capped:  # (durable at the next sync of the branch: see pageserver.pgdata.datadir)
            return h.att.datadir.write(h.ino, offset, data, enforce=True, lenient=h.lenient)
        return h.att.datadir.write(h.ino, offset, data, durable=True)

    @operation
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        h = self._handle_or_none(fh)
        if h is not None:
            if h.fd >= 0:
                os.ftruncate(h.fd, length)
            else:
                h.att.datadir.truncate(h.ino, length, durable=True, enforce=h.capped, lenient=h.lenient)
            return 0
        att, ino, local = self._target(path, None)
        if local is not None:
            os.truncate(local, length)
        else:
            att.datadir.truncate(ino, length, durable=True)
        return 0

    @operation
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        path = self._t.dirs.get(fh, path)
        if path:
            att, rel = self._split(path)
            if att is not None and not self.is_local(rel):
                att.datadir.sync_tree()
        return 0

    @operation
    def flush(self, path: str, fh: int) -> int:
        return 0

    @operation
    def release(self, path: str, fh: int) -> int:
        h = self._t.handles.get(fh)
        if h is None:
            return 0
        try:
            h.att.enter()  # detach waits for this too (freeing an orphan commits)
        except OSError:
            return 0  # detached: detach closes what the table holds
        with self._mu:
            h = self._t.handles.pop(fh, None)
        if h is None:
            return 0
        if h.fd >= 0:
            os.close(h.fd)
        elif not h.att.dead:
            h.att.datadir.released(h.ino)
        return 0

    @operation
    def mkdir(self, path: str, mode: int) -> int:
        att, rel, uid, gid, local = self._new_entry(path)
        if local is not None:
            os.mkdir(local, mode & 0o7777)
            os.chown(local, uid, gid)
            return 0
        parent, name = self._parent(att, rel)
        att.datadir.mkdir(parent, name, mode, uid, gid)
        return 0

    @operation
    def symlink(self, target: str, source: str) -> int:
        att, rel, uid, gid, local = self._new_entry(target)
        if local is not None:
            os.symlink(source, local)
            os.lchown(local, uid, gid)
            return 0
        parent, name = self._parent(att, rel)
        att.datadir.symlink(parent, name, source.encode("utf-8", "surrogateescape"), uid, gid)
        return 0

    def _remove(self, path: str, local_op: Any, dd_op: str) -> int:
        att, rel = self._split(path)
        if att is None:
            raise OSError(errno.EACCES, path)
        if self.is_local(rel):
            local_op(self._local(att, rel))
        else:
            getattr(att.datadir, dd_op)(*self._parent(att, rel))
        return 0

    @operation
    def unlink(self, path: str) -> int:
        return self._remove(path, os.unlink, "unlink")

    @operation
    def rmdir(self, path: str) -> int:
        return self._remove(path, os.rmdir, "rmdir")

    @operation
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, f"rename flags {flags:#x}")
        att, rel = self._split(old)
        att2, rel2 = self._split(new)
        if att is None or att2 is not att:
            raise OSError(errno.EXDEV, new)
        local, local2 = self.is_local(rel), self.is_local(rel2)
        if local != local2:
            raise OSError(errno.EXDEV, new)  # mv copies across: correct either way
        if local:
            renameat2(self._local(att, rel), self._local(att, rel2), flags)
        else:
            att.datadir.rename(*self._parent(att, rel), *self._parent(att, rel2),
                               noreplace=bool(flags & RENAME_NOREPLACE), exchange=bool(flags & RENAME_EXCHANGE))
        return 0

    @operation
    def link(self, target: str, source: str) -> int:
        raise OSError(errno.EPERM, "hard links are not supported")

    def _target(self, path: str | None, fh: int | None) -> tuple[Attachment, int, str | None]:
        """What a setattr-style call is about: (attachment, inode, local
        path or None), from the handle if there is one, else the path."""
        h = self._handle_or_none(fh)
        if h is not None:
            if h.fd >= 0:
                return h.att, 0, f"/proc/self/fd/{h.fd}"
            return h.att, h.ino, None
        if path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        att, rel = self._split(path)
        if att is None:
            raise OSError(errno.EPERM, path)
        if self.is_local(rel):
            return att, 0, self._local(att, rel)
        return att, att.datadir.resolve(rel), None

    @operation
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        att, ino, local = self._target(path, fh)
        if local is not None:
            os.chmod(local, mode & 0o7777)
        else:
            att.datadir.setattr(ino, mode=mode, durable=True)
        return 0

    @operation
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        att, ino, local = self._target(path, fh)
        if local is not None:
            os.chown(local, uid, gid, follow_symlinks=False)
        else:
            att.datadir.setattr(ino, uid=uid, gid=gid, durable=True)
        return 0

    @operation
    def utimens(self, path: str | None, times: tuple[int, int] | None = None, fh: int | None = None) -> int:
        try:
            att, ino, local = self._target(path, fh)
        except OSError:
            if path in (None, "/"):
                return 0
            raise
        if local is not None:
            os.utime(local, ns=times) if times else os.utime(local)
        else:
            att.datadir.touch(ino, times[1] if times else None)
        return 0

    @operation
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._statfs_path)
        return {
            "f_bsize": st.f_bsize, "f_frsize": st.f_frsize, "f_blocks": st.f_blocks,
            "f_bfree": st.f_bfree, "f_bavail": st.f_bavail, "f_files": 1 << 32,
            "f_ffree": 1 << 31, "f_favail": 1 << 31, "f_namemax": 255,
        }

    _statfs_path = "/"

    @operation
    def access(self, path: str, amode: int) -> int:
        return 0  # default_permissions: the kernel checks modes


_pinned = threading.local()
_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.restype = ctypes.c_int


class _FUSE(mfusepy.FUSE):
    """mfusepy drops the file handle of setattr-style calls; with
    `nullpath_ok` (and files unlinked while open) the handle is all there is.

    It also drops renameat2's flags; they are passed on here.

    libfuse's worker threads are not Python's: for each callback, ctypes
    makes a Python thread state and throws it away after. The first
    callback on a worker pins one for good (one extra PyGILState_Ensure),
    which takes a good part of the cost out of every request after it.
    """

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(_pinned, "on", False):
            _ensure()
            _pinned.on = True
        return super()._wrapper(func, *args, **kwargs)

    def open(self, path: bytes, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.open(self._path(path), fi.flags)
        fi.direct_io = self.operations.direct_io(fi.fh)
        return 0

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.create(self._path(path), mode, fi)
        fi.direct_io = self.operations.direct_io(fi.fh)
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(self._path(old), self._path(new), flags)

    def _fh(self, fip: Any) -> int | None:
        return fip.contents.fh if fip else None

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(self._path(path), length, self._fh(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(self._path(path), mode, self._fh(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        uid = -1 if uid == 0xFFFFFFFF else uid
        gid = -1 if gid == 0xFFFFFFFF else gid
        return self.operations.chown(self._path(path), uid, gid, self._fh(fip))

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            times = (mfusepy.time_of_timespec(buf.contents.actime, use_ns=True),
                     mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True))
        return self.operations.utimens(self._path(path), times, self._fh(fip))


def _main_mount(ops: StrataFS, mountpoint: str) -> None:
    _FUSE(
        ops, mountpoint, foreground=True, allow_other=True, default_permissions=True,
        fsname="strata", subtype="strata", max_threads=64,
    )


class Mount:
    """The page server's one FUSE mount, served from a thread of this process."""

    def __init__(self, mountpoint: str, statfs_path: str = "/", ops: StrataFS | None = None) -> None:
        self.mountpoint = mountpoint
        self.ops = ops or StrataFS()
        self.ops._statfs_path = statfs_path
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> None:
        import signal

        os.makedirs(self.mountpoint, exist_ok=True)
        saved = {}
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

        def run() -> None:
            try:
                _main_mount(self.ops, self.mountpoint)
            except BaseException as e:  # noqa: BLE001 - reported to start() and logged
                self.error = e
                log.error("FUSE loop of %s ended with %r", self.mountpoint, e)
            finally:
                self.ops.ready.set()

        self._thread = threading.Thread(target=run, name="strata-fuse", daemon=True)
        self._thread.start()
        if not self.ops.ready.wait(timeout) or self.error is not None or not os.path.ismount(self.mountpoint):
            raise RuntimeError(f"could not mount FUSE at {self.mountpoint}: {self.error!r}")
        # libfuse installs its own SIGINT/SIGTERM/SIGHUP handlers (which would
        # unmount on a signal): give them back to Python
        for s, h in saved.items():
            signal.signal(s, h)
        self._tune_writeback()

    def _tune_writeback(self) -> None:
        """The kernel caps a FUSE mount at 1% of dirty memory, strictly, and
        throttles writers past it: postgres' dirty pages would stall in
        balance_dirty_pages. Lift the cap (root only; best effort)."""
        st = os.stat(self.mountpoint)
        bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        for name, value in (("max_ratio", "50"), ("strict_limit", "0")):
            try:
                with open(os.path.join(bdi, name), "w") as f:
                    f.write(value)
            except OSError as e:
                log.debug("cannot set %s/%s: %s", bdi, name, e)

    def stop(self) -> None:
        unmount(self.mountpoint)
        if self._thread is not None:
            self._thread.join(timeout=10)


def unmount(mountpoint: str, lazy: bool = False) -> bool:
    """Unmount a FUSE mount (a dead one too). True if something was mounted."""
    import subprocess

    if not os.path.ismount(mountpoint) and not _listed_in_mounts(mountpoint):
        return False
    args = ["fusermount3", "-u", "-z", mountpoint] if lazy else ["fusermount3", "-u", mountpoint]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0 and not lazy:
        return unmount(mountpoint, lazy=True)
    return r.returncode == 0


def _listed_in_mounts(mountpoint: str) -> bool:
    real = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == real for line in f)
    except OSError:
        return False
