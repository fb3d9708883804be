"""A POSIX-style file tree over one timeline: what a compute's data directory is.

`DataDir` gives inode-level operations (lookup, create, read, write,
truncate, rename, unlink, ...) on the tree a timeline holds (see
`pageserver.layout`). Every change to the namespace is one atomic engine
commit; writes to a file are held as pending pages until the file is
fsynced (then they are one commit, and durable), as a kernel's page cache
holds them. So the tree as of any LSN is a state a crash could have left:
branching at any LSN gives a crash-consistent data directory.

A `DataDir` opened at a past LSN is read-only (EROFS on every change).

The cap (`set_max_data`): once set, the bytes of the files below `base/`,
`global/` and `pg_tblspc/` (PostgreSQL's relations: what its databases
hold) are counted, and a write or truncate the caller asks to be checked
(`enforce`) that would grow them past the cap gets ENOSPC, whole, before
anything changes: PostgreSQL then fails the statement that extends a
relation ("could not extend file ... No space left on device") and keeps
running. A file's first page, and growth the caller calls `lenient` (the
free-space and visibility maps), may go a headroom past the cap (1/16 of
it, at least 4 MiB), so that TRUNCATE, DROP and VACUUM, which free space,
still work on a full branch. Writes within a file's size, and every other
file (WAL, pg_xact, ...), are never refused, so no commit or checkpoint
can fail on the cap; nor is anything while `may_refuse` says no (the
compute is recovering: replay must redo what was allowed before). It is
counted from the tree when first set (one walk of those directories) and
kept up to date by every change after (once it is committed).

Errors are `OSError` with the errno a file system would give.

Concurrency (libfuse calls in from up to 64 threads at once):

    _mu (RLock)   guards every change: the timeline's commits and the caches
                  below, which a change updates under it right after its
                  commit, so that under _mu the caches and the timeline agree.
    _inodes       inode -> Inode (immutable once published: a change stores a
                  new object, never edits one in place)
    _dirs         directory inode -> its buckets; a bucket is a dict replaced
                  whole by a change (copy on write), never edited in place
    _pending, _committed_size, _pending_bytes, _open, _orphans, _next_ino,
    _data_bytes, _data_files, _data_dirs, max_data:
                  changed only under _mu (max_data and _data_bytes are read
                  without it too: one atomic read, a hint)

Readers (inode, lookup, readdir, read) take no lock when the cache holds
what they need: a dict read is atomic, and what they get is immutable. A
reader that misses fills the cache *under _mu*, re-checking it there, so
it reads the timeline and stores the result with no change in between: a
fill can never install a copy older than a change another thread has
already cached (which a later commit would then write back, durably
shrinking a file or losing a directory entry). A read racing a write of
the same bytes sees the old or the new page, as POSIX allows. The sync of
a durable change happens outside _mu, so concurrent ones share an fsync.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator

from engine import Timeline, failpoints
from pageserver.pgdata.layout import (
    BUCKETS,
    DIRECTORY,
    FILE,
    MAX_FILE_SIZE,
    MAX_INODE,
    MAX_NAME,
    ORPHANS_KEY,
    PAGE,
    ROOT,
    SUPER_KEY,
    SYMLINK,
    Inode,
    bucket_of,
    decode_bucket,
    decode_orphans,
    decode_super,
    dir_key,
    encode_bucket,
    encode_orphans,
    encode_super,
    inode_key,
    page_key,
)

_ZERO = bytes(PAGE)
_NONE: dict[int, bytes] = {}
PENDING_LIMIT = 64 << 20  # pending writes past this are committed (not synced)
_FREE_CHUNK = 65536  # page tombstones per commit when a big file is freed
DATA_ROOTS = (b"base", b"global", b"pg_tblspc")  # the top-level directories whose files the cap counts
MIN_HEADROOM = 4 << 20

Batch = dict[int, bytes | None]
Entry = tuple[int, int]  # (inode, kind)


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL, repr(name))
    if len(name) > MAX_NAME:
        raise _err(errno.ENAMETOOLONG, repr(name[:40]))


class DataDir:
    def __init__(
        self,
        timeline: Timeline,
        *,
        lsn: int | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.timeline = timeline
        self.lsn = lsn
        self.read_only = lsn is not None
        self._clock = clock
        self._mu = threading.RLock()
        self._inodes: dict[int, Inode] = {}
        self._dirs: dict[int, list[dict[bytes, Entry]]] = {}
        self._open: dict[int, int] = {}  # inode -> open handles
        self._pending: dict[int, dict[int, bytes]] = {}  # inode -> block -> page, not yet committed
        self._committed_size: dict[int, int] = {}  # of files with pending pages
        self._pending_bytes = 0
        self.pending_limit = PENDING_LIMIT
        self.max_data: int | None = None  # the cap (see the top); None: none
        self.on_full: Callable[[], None] | None = None  # called for each write the cap refuses
        self.may_refuse: Callable[[], bool] | None = None  # asked before one is refused: False lets it be
        self._data_bytes: int | None = None  # counted once a cap is first set
        self._data_files: set[int] = set()
        self._data_dirs: set[int] = set()
        raw = timeline.get(SUPER_KEY, lsn)
        if raw is None:
            raise _err(errno.EINVAL, f"timeline {timeline.id} holds no data directory")
        self._next_ino = decode_super(raw)
        raw = timeline.get(ORPHANS_KEY, lsn)
        self._orphans: set[int] = decode_orphans(raw) if raw is not None else set()
        if self._orphans and not self.read_only:
            self._free_orphans()  # unlinked while open when the last user went away

    # --- the cap -----------------------------------------------------------------

    def set_max_data(self, limit: int | None) -> None:
        """Cap the bytes of the relation files (None: no cap). It may be
        below what they hold now: then they can only shrink, or be
        rewritten in place, until they are under it."""
        with self._mu:
            if limit is not None and self._data_bytes is None:
                self._count_data()
            self.max_data = limit

    @property
    def data_bytes(self) -> int:
        """The bytes the cap counts (counted now if no cap was set)."""
        with self._mu:
            if self._data_bytes is None:
                self._count_data()
            assert self._data_bytes is not None
            return self._data_bytes

    @property
    def counted_bytes(self) -> int | None:
        """The same, if they are counted (a cap was set); None otherwise."""
        return self._data_bytes

    def _count_data(self) -> None:
        self._data_files, self._data_dirs, total = set(), set(), 0
        for name, ino, kind in self.readdir(ROOT):
            if kind != DIRECTORY or name not in DATA_ROOTS:
                continue
            self._data_dirs.add(ino)
            for _, child, node in self.walk(ino):
                if node.kind == DIRECTORY:
                    self._data_dirs.add(child)
                elif node.kind == FILE:
                    self._data_files.add(child)
                    total += node.size
        self._data_bytes = total

    def _check_growth(self, ino: int, old: int, new: int, enforce: bool, lenient: bool) -> None:
        """Refuse (ENOSPC) growing a file from `old` to `new` bytes, if it is
        checked and would take the relations past the cap (caller holds the
        lock, and changes nothing before this)."""
        if not enforce or new <= old or self.max_data is None or self._data_bytes is None:
            return
        if ino not in self._data_files:
            return
        limit = self.max_data
        if lenient or old == 0:
            limit += max(MIN_HEADROOM, self.max_data // 16)
        if self._data_bytes + new - old <= limit:
            return
        if self.may_refuse is not None and not self.may_refuse():
            return
        if self.on_full is not None:
            self.on_full()
        raise _err(errno.ENOSPC, f"the branch's cap of {self.max_data} bytes of relation data is reached")

    def _count_growth(self, ino: int, old: int, new: int) -> None:
        if self._data_bytes is not None and ino in self._data_files:
            self._data_bytes += new - old

    def _counted_as(self, parent: int, name: bytes, ino: int, kind: int) -> None:
        """Count a new entry in the tree the cap counts (caller holds the lock)."""
        if self._data_bytes is None:
            return
        if parent in self._data_dirs or (parent == ROOT and name in DATA_ROOTS and kind == DIRECTORY):
            (self._data_dirs if kind == DIRECTORY else self._data_files).add(ino)
            if kind == FILE:
                self._data_bytes += self.inode(ino).size

    def _uncount(self, ino: int, size: int) -> None:
        if self._data_bytes is not None and ino in self._data_files:
            self._data_files.discard(ino)
            self._data_bytes -= size

    # --- formatting -------------------------------------------------------------

    @staticmethod
    def format(timeline: Timeline, *, uid: int, gid: int, mode: int = 0o700,
               clock: Callable[[], int] = time.time_ns) -> None:
        """Put an empty tree (just the root directory) in a new timeline."""
        if timeline.get(SUPER_KEY) is not None:
            raise _err(errno.EEXIST, f"timeline {timeline.id} already holds a data directory")
        now = clock()
        root = Inode(DIRECTORY, mode & 0o7777, uid, gid, 2, 0, now, now)
        timeline.commit({SUPER_KEY: encode_super(ROOT + 1), inode_key(ROOT): root.encode()}, durable=True)

    # --- helpers ----------------------------------------------------------------

    def _get(self, key: int) -> bytes | None:
        return self.timeline.get(key, self.lsn)

    def _commit(self, batch: Batch) -> None:
        if self.read_only:
            raise _err(errno.EROFS)
        self.timeline.commit(batch)

    def _writable(self) -> None:
        if self.read_only:
            raise _err(errno.EROFS)

    def inode(self, ino: int) -> Inode:
        node = self._inodes.get(ino)
        if node is None:
            with self._mu:  # fill under the lock: see the module's docstring
                node = self._inodes.get(ino)
                if node is None:
                    raw = self._get(inode_key(ino)) if 0 < ino <= MAX_INODE else None
                    if raw is None:
                        raise _err(errno.ENOENT, f"inode {ino}")
                    node = self._inodes[ino] = Inode.decode(raw)
        return node

    def _dir(self, ino: int) -> list[dict[bytes, Entry]]:
        buckets = self._dirs.get(ino)
        if buckets is None:
            with self._mu:  # fill under the lock: see the module's docstring
                buckets = self._dirs.get(ino)
                if buckets is None:
                    if self.inode(ino).kind != DIRECTORY:
                        raise _err(errno.ENOTDIR, f"inode {ino}")
                    buckets = [{} for _ in range(BUCKETS)]
                    first, last = dir_key(ino, 0), dir_key(ino, BUCKETS - 1)
                    for key, raw in self.timeline.scan(self.lsn, first, last):
                        buckets[key - first] = decode_bucket(raw)
                    self._dirs[ino] = buckets
        return buckets

    def _new_ino(self, batch: Batch) -> int:
        ino = self._next_ino
        if ino > MAX_INODE:
            raise _err(errno.ENOSPC, "out of inode numbers")
        batch[SUPER_KEY] = encode_super(ino + 1)
        return ino

    def _touch(self, node: Inode) -> Inode:
        now = self._clock()
        return Inode(node.kind, node.mode, node.uid, node.gid, node.nlink, node.size, now, now, node.target)

    def _put_entry(self, batch: Batch, buckets: dict[tuple[int, int], dict[bytes, Entry]], parent: int,
                   name: bytes, entry: Entry | None) -> None:
        """Stage adding (or, with None, removing) a directory entry."""
        b = bucket_of(name)
        key = (parent, b)
        if key not in buckets:
            buckets[key] = dict(self._dir(parent)[b])
        if entry is None:
            buckets[key].pop(name, None)
        else:
            buckets[key][name] = entry
        raw = encode_bucket(buckets[key])
        if len(raw) > 60 * 1024:
            raise _err(errno.ENOSPC, "directory bucket full")
        batch[dir_key(parent, b)] = raw if buckets[key] else None

    def _apply_entries(self, buckets: dict[tuple[int, int], dict[bytes, Entry]]) -> None:
        for (parent, b), entries in buckets.items():
            self._dir(parent)[b] = entries

    # --- lookups ------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int:
        entry = self._dir(parent)[bucket_of(name)].get(name)
        if entry is None:
            raise _err(errno.ENOENT, name.decode(errors="replace"))
        return entry[0]

    def resolve(self, path: str) -> int:
        """The inode of a path relative to the root ("" or "/" is the root)."""
        ino = ROOT
        for part in path.split("/"):
            if part:
                ino = self.lookup(ino, part.encode())
        return ino

    def readdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        out = [(name, e[0], e[1]) for bucket in self._dir(ino) for name, e in bucket.items()]
        return sorted(out)

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        if node.kind != SYMLINK:
            raise _err(errno.EINVAL, "not a symlink")
        return node.target

    # --- data -----------------------------------------------------------------------

    def read(self, ino: int, offset: int, size: int) -> bytes:
        node = self.inode(ino)
        if node.kind == DIRECTORY:
            raise _err(errno.EISDIR)
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        first, last = offset // PAGE, (end - 1) // PAGE
        get = self.timeline.get
        lsn = self.lsn
        pending = self._pending.get(ino, _NONE)
        parts = []
        for block in range(first, last + 1):
            page = pending.get(block)
            parts.append(page if page is not None else get(page_key(ino, block), lsn) or _ZERO)
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        start = offset - first * PAGE
        return data[start : start + (end - offset)]

    def _page(self, ino: int, block: int, committed_pages: int) -> bytes:
        """The current content of a page (pending or committed)."""
        page = self._pending.get(ino, _NONE).get(block)
        if page is None:
            page = self._get(page_key(ino, block)) if block < committed_pages else None
        return page or _ZERO

    def write(self, ino: int, offset: int, data: bytes | memoryview, *, durable: bool = False,
              enforce: bool = False, lenient: bool = False) -> int:
        """Write into the file's pending pages. They reach the timeline (in
        one commit per file) when the file is fsynced, or sooner if pending
        data passes PENDING_LIMIT: as the kernel's page cache does, and so
        that an fsync of the WAL does not wait for data files' pages. With
        `durable`, the file's pages are committed at once and synced before
        this returns (the commit made under the lock, the sync outside it,
        so concurrent durable writes share fsyncs); every pending write of
        any file is committed with it, so what was written before a durable
        write is durable when it is. With `enforce`, a write that would grow
        the relation files past the cap is refused (ENOSPC); without, it is
        only counted (it may come from the kernel's cache, after the write
        it holds was answered)."""
        self._writable()
        n = len(data)
        if n == 0:
            return 0
        end = offset + n
        if offset < 0 or end > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        if durable:
            failpoints.hit("fuse-before-durable-write")
        with self._mu:
            node = self.inode(ino)
            if node.kind != FILE:
                raise _err(errno.EISDIR if node.kind == DIRECTORY else errno.EINVAL)
            if end > node.size:
                self._check_growth(ino, node.size, end, enforce, lenient)
                self._count_growth(ino, node.size, end)  # (in memory from here: pending, or committed below)
            pending = self._pending.get(ino)
            if pending is None:
                pending = self._pending[ino] = {}
                self._committed_size[ino] = node.size
            pages = (node.size + PAGE - 1) // PAGE
            view = memoryview(data)
            block = offset // PAGE
            pos = 0
            added = 0
            while pos < n:
                start = (offset + pos) % PAGE
                take = min(PAGE - start, n - pos)
                if take == PAGE:
                    page = bytes(view[pos : pos + take])
                else:
                    buf = bytearray(self._page(ino, block, pages))
                    buf[start : start + take] = view[pos : pos + take]
                    page = bytes(buf)
                if block not in pending:
                    added += PAGE
                pending[block] = page
                pos += take
                block += 1
            self._pending_bytes += added
            now = self._clock()
            self._inodes[ino] = Inode(node.kind, node.mode, node.uid, node.gid, node.nlink,
                                      max(node.size, end), now, now, node.target)
            if durable:
                self.commit_pending()
            over = self._pending_bytes > self.pending_limit
        if durable:
            self.timeline.sync()
            failpoints.hit("fuse-after-durable-write")
        elif over:
            self.commit_pending()
        return n

    def commit_pending(self, ino: int | None = None) -> None:
        """Put pending writes (of one file, or all) in the timeline."""
        with self._mu:
            for i in [ino] if ino is not None else list(self._pending):
                pending = self._pending.get(i)
                if pending:
                    self._commit_file(i, pending)

    def _commit_file(self, ino: int, pending: dict[int, bytes]) -> None:
        """One commit of a file's pending pages and its attributes (caller
        holds the lock)."""
        committed = (self._committed_size.get(ino, 0) + PAGE - 1) // PAGE
        batch: Batch = {}
        for block, page in pending.items():
            if page != _ZERO:
                batch[page_key(ino, block)] = page
            elif block < committed:
                batch[page_key(ino, block)] = None  # zeros are holes
        node = self.inode(ino)
        batch[inode_key(ino)] = node.encode()
        self._commit(batch)
        self._pending_bytes -= len(pending) * PAGE
        del self._pending[ino]
        self._committed_size.pop(ino, None)

    def _settle(self, ino: int) -> None:
        """Commit a file's pending writes before a change that needs the
        timeline to hold all of it (truncate, unlink, rename over)."""
        pending = self._pending.get(ino)
        if pending:
            self._commit_file(ino, pending)

    def truncate(self, ino: int, size: int, *, durable: bool = False, enforce: bool = False,
                 lenient: bool = False) -> None:
        self._writable()
        if size < 0 or size > MAX_FILE_SIZE:
            raise _err(errno.EFBIG if size > 0 else errno.EINVAL)
        with self._mu:
            self._settle(ino)
            node = self.inode(ino)
            if node.kind != FILE:
                raise _err(errno.EISDIR if node.kind == DIRECTORY else errno.EINVAL)
            self._check_growth(ino, node.size, size, enforce, lenient)
            batch: Batch = {}
            if size < node.size:
                old_pages = (node.size + PAGE - 1) // PAGE
                keep = (size + PAGE - 1) // PAGE
                chunks = list(range(keep, old_pages))
                if size % PAGE:  # zero the tail of the last page that stays
                    page = self._get(page_key(ino, size // PAGE))
                    if page is not None:
                        tail = page[: size % PAGE] + bytes(PAGE - size % PAGE)
                        batch[page_key(ino, size // PAGE)] = tail if tail != _ZERO else None
                # a huge shrink: drop pages in several commits, the size first
                for block in chunks[:_FREE_CHUNK]:
                    batch[page_key(ino, block)] = None
                rest = chunks[_FREE_CHUNK:]
            else:
                rest = []
            new = self._touch(node)
            new.size = size
            batch[inode_key(ino)] = new.encode()
            self._commit(batch)
            self._inodes[ino] = new
            self._count_growth(ino, node.size, size)
            for i in range(0, len(rest), _FREE_CHUNK):
                self._commit({page_key(ino, b): None for b in rest[i : i + _FREE_CHUNK]})
            if durable:
                self.commit_pending()
        if durable:
            self.timeline.sync()

    def fsync(self, ino: int | None = None) -> None:
        """Everything written (to `ino`, or to any file) is durable when this
        returns; so is every change to the tree before it."""
        if self.read_only:
            return
        if self._pending:
            self.commit_pending()  # all of them: what was written before is durable too
        self.timeline.sync()

    def sync_tree(self) -> None:
        """Make every change to the tree durable (and every write before it)."""
        if not self.read_only:
            if self._pending:
                self.commit_pending()
            self.timeline.sync()

    # --- attributes ---------------------------------------------------------------------

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, mtime_ns: int | None = None, durable: bool = False) -> Inode:
        self._writable()
        with self._mu:
            self._settle(ino)
            node = self.inode(ino)
            new = Inode(node.kind, node.mode, node.uid, node.gid, node.nlink, node.size,
                        node.mtime_ns, self._clock(), node.target)
            if mode is not None:
                new.mode = mode & 0o7777
            if uid is not None and uid != -1 and uid != 0xFFFFFFFF:
                new.uid = uid
            if gid is not None and gid != -1 and gid != 0xFFFFFFFF:
                new.gid = gid
            if mtime_ns is not None:
                new.mtime_ns = mtime_ns
            self._commit({inode_key(ino): new.encode()})
            self._inodes[ino] = new
            if durable and self._pending:
                self.commit_pending()
        if durable:
            self.timeline.sync()
        return new

    def touch(self, ino: int, mtime_ns: int | None = None) -> None:
        """Set a file's mtime in memory only: it is written with the file's
        next change. (The kernel's writeback cache sends an mtime update
        after writes; committing each would double the commits. Nothing
        in PostgreSQL depends on a data file's mtime surviving a crash.)"""
        self._writable()
        with self._mu:
            node = self.inode(ino)
            new = Inode(node.kind, node.mode, node.uid, node.gid, node.nlink, node.size,
                        self._clock() if mtime_ns is None else mtime_ns, node.ctime_ns, node.target)
            self._inodes[ino] = new

    # --- namespace ----------------------------------------------------------------------

    def _make(self, parent: int, name: bytes, kind: int, mode: int, uid: int, gid: int,
              target: bytes = b"") -> int:
        self._writable()
        _check_name(name)
        with self._mu:
            pnode = self.inode(parent)
            if pnode.kind != DIRECTORY:
                raise _err(errno.ENOTDIR)
            if name in self._dir(parent)[bucket_of(name)]:
                raise _err(errno.EEXIST, name.decode(errors="replace"))
            batch: Batch = {}
            ino = self._new_ino(batch)
            now = self._clock()
            node = Inode(kind, mode & 0o7777, uid, gid, 2 if kind == DIRECTORY else 1,
                         len(target) if kind == SYMLINK else 0, now, now, target)
            batch[inode_key(ino)] = node.encode()
            staged: dict[tuple[int, int], dict[bytes, Entry]] = {}
            self._put_entry(batch, staged, parent, name, (ino, kind))
            pnew = self._touch(pnode)
            if kind == DIRECTORY:
                pnew.nlink += 1
            batch[inode_key(parent)] = pnew.encode()
            self._commit(batch)
            self._next_ino = ino + 1
            self._inodes[ino] = node
            self._inodes[parent] = pnew
            self._apply_entries(staged)
            if kind == DIRECTORY:
                self._dirs[ino] = [{} for _ in range(BUCKETS)]
            if kind != SYMLINK:
                self._counted_as(parent, name, ino, kind)
            return ino

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> int:
        return self._make(parent, name, FILE, mode, uid, gid)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> int:
        return self._make(parent, name, DIRECTORY, mode, uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> int:
        if not target or len(target) > 4096:
            raise _err(errno.EINVAL, "symlink target")
        return self._make(parent, name, SYMLINK, 0o777, uid, gid, target)

    def _drop(self, batch: Batch, ino: int, node: Inode) -> list[int]:
        """Stage removing the last link to `ino`. Returns blocks to free after
        the commit (none if the file is still open: it becomes an orphan)."""
        if self._open.get(ino):
            self._settle(ino)
            self._orphans.add(ino)
            batch[ORPHANS_KEY] = encode_orphans(self._orphans)
            new = self._touch(node)
            new.nlink = 0
            batch[inode_key(ino)] = new.encode()
            return []
        batch[inode_key(ino)] = None
        if node.kind != FILE:
            return []
        pending = self._pending.pop(ino, None)
        if pending:
            self._pending_bytes -= len(pending) * PAGE
            committed = self._committed_size.pop(ino, 0)
            node = Inode(node.kind, node.mode, node.uid, node.gid, node.nlink, committed,
                         node.mtime_ns, node.ctime_ns)
        pages = (node.size + PAGE - 1) // PAGE
        for block in range(min(pages, _FREE_CHUNK)):
            batch[page_key(ino, block)] = None
        return list(range(_FREE_CHUNK, pages))

    def _free_later(self, ino: int, blocks: list[int]) -> None:
        for i in range(0, len(blocks), _FREE_CHUNK):
            self._commit({page_key(ino, b): None for b in blocks[i : i + _FREE_CHUNK]})

    def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        with self._mu:
            ino = self.lookup(parent, name)
            node = self.inode(ino)
            if node.kind == DIRECTORY:
                raise _err(errno.EISDIR, name.decode(errors="replace"))
            batch: Batch = {}
            staged: dict[tuple[int, int], dict[bytes, Entry]] = {}
            self._put_entry(batch, staged, parent, name, None)
            batch[inode_key(parent)] = self._touch(self.inode(parent)).encode()
            later = self._drop(batch, ino, node)
            self._commit(batch)
            self._uncount(ino, node.size)  # (out of the tree, though an orphan keeps its pages until closed)
            self._after_drop(ino, batch)
            self._inodes[parent] = Inode.decode(batch[inode_key(parent)])  # type: ignore[arg-type]
            self._apply_entries(staged)
            self._free_later(ino, later)

    def _after_drop(self, ino: int, batch: Batch) -> None:
        raw = batch.get(inode_key(ino))
        if raw is None:
            self._inodes.pop(ino, None)
            self._dirs.pop(ino, None)
        else:
            self._inodes[ino] = Inode.decode(raw)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        with self._mu:
            ino = self.lookup(parent, name)
            node = self.inode(ino)
            if node.kind != DIRECTORY:
                raise _err(errno.ENOTDIR, name.decode(errors="replace"))
            if any(self._dir(ino)):
                raise _err(errno.ENOTEMPTY, name.decode(errors="replace"))
            batch: Batch = {}
            staged: dict[tuple[int, int], dict[bytes, Entry]] = {}
            self._put_entry(batch, staged, parent, name, None)
            pnew = self._touch(self.inode(parent))
            pnew.nlink -= 1
            batch[inode_key(parent)] = pnew.encode()
            batch[inode_key(ino)] = None
            self._commit(batch)
            self._inodes[parent] = pnew
            self._inodes.pop(ino, None)
            self._dirs.pop(ino, None)
            self._data_dirs.discard(ino)
            self._apply_entries(staged)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               *, noreplace: bool = False, exchange: bool = False) -> None:
        self._writable()
        _check_name(new_name)
        with self._mu:
            src = self.lookup(old_parent, old_name)
            snode = self.inode(src)
            if self.inode(new_parent).kind != DIRECTORY:
                raise _err(errno.ENOTDIR)
            dst_entry = self._dir(new_parent)[bucket_of(new_name)].get(new_name)
            # the checks in the order Linux makes them (do_renameat2)
            if noreplace and exchange:
                raise _err(errno.EINVAL, "RENAME_NOREPLACE and RENAME_EXCHANGE together")
            if dst_entry is not None and noreplace:
                raise _err(errno.EEXIST, new_name.decode(errors="replace"))
            if dst_entry is None and exchange:
                raise _err(errno.ENOENT, new_name.decode(errors="replace"))
            if snode.kind == DIRECTORY and self._is_within(new_parent, src):
                raise _err(errno.EINVAL, "cannot move a directory into itself")
            if (
                dst_entry is not None
                and dst_entry[1] == DIRECTORY
                and dst_entry[0] != src
                and self._is_within(old_parent, dst_entry[0])
            ):
                if exchange:  # as Linux answers renameat2(RENAME_EXCHANGE)
                    raise _err(errno.EINVAL, "the target is an ancestor of the source")
                raise _err(errno.ENOTEMPTY, "the target is an ancestor of the source")
            if (old_parent, old_name) == (new_parent, new_name):
                return
            batch: Batch = {}
            staged: dict[tuple[int, int], dict[bytes, Entry]] = {}
            later: list[int] = []
            dst = dst_entry[0] if dst_entry else None
            if exchange:
                assert dst_entry is not None
                self._put_entry(batch, staged, old_parent, old_name, dst_entry)
                self._put_entry(batch, staged, new_parent, new_name, (src, snode.kind))
                dst = None
            else:
                if dst is not None:
                    dnode = self.inode(dst)
                    if dnode.kind == DIRECTORY:
                        if snode.kind != DIRECTORY:
                            raise _err(errno.EISDIR, new_name.decode(errors="replace"))
                        if any(self._dir(dst)):
                            raise _err(errno.ENOTEMPTY, new_name.decode(errors="replace"))
                    elif snode.kind == DIRECTORY:
                        raise _err(errno.ENOTDIR, new_name.decode(errors="replace"))
                self._put_entry(batch, staged, old_parent, old_name, None)
                self._put_entry(batch, staged, new_parent, new_name, (src, snode.kind))
            parents = {old_parent: self._touch(self.inode(old_parent))}
            if new_parent != old_parent:
                parents[new_parent] = self._touch(self.inode(new_parent))
            if new_parent != old_parent:  # a subdirectory's ".." moves with it
                moved = (snode.kind == DIRECTORY) - (exchange and dst_entry is not None
                                                     and dst_entry[1] == DIRECTORY)
                parents[old_parent].nlink -= moved
                parents[new_parent].nlink += moved
            if dst is not None:
                dnode = self.inode(dst)
                if dnode.kind == DIRECTORY:
                    parents[new_parent].nlink -= 1
                    batch[inode_key(dst)] = None
                else:
                    later = self._drop(batch, dst, dnode)
            for p, pnode in parents.items():
                batch[inode_key(p)] = pnode.encode()
            self._commit(batch)
            self._inodes.update(parents)
            if dst is not None:
                self._uncount(dst, dnode.size)
                self._after_drop(dst, batch)
            self._apply_entries(staged)
            if dst is not None:
                self._free_later(dst, later)
            if self._data_bytes is not None and (snode.kind == DIRECTORY or exchange):
                self._count_data()  # (rare: count the tree again)
            elif self._data_bytes is not None and snode.kind == FILE:
                inside = new_parent in self._data_dirs
                if inside != (src in self._data_files):
                    size = self.inode(src).size
                    if inside:
                        self._data_files.add(src)
                        self._data_bytes += size
                    else:
                        self._uncount(src, size)

    def _is_within(self, ino: int, ancestor: int) -> bool:
        """Is directory `ino` equal to or below `ancestor`? (Walks down from
        `ancestor`; directories are small in a data directory.)"""
        if ino == ancestor:
            return True
        stack = [ancestor]
        while stack:
            d = stack.pop()
            for _, child, kind in self.readdir(d):
                if kind == DIRECTORY:
                    if child == ino:
                        return True
                    stack.append(child)
        return False

    # --- open files -------------------------------------------------------------------

    def opened(self, ino: int) -> None:
        with self._mu:
            self.inode(ino)
            self._open[ino] = self._open.get(ino, 0) + 1

    def released(self, ino: int) -> None:
        with self._mu:
            n = self._open.get(ino, 0) - 1
            if n > 0:
                self._open[ino] = n
                return
            self._open.pop(ino, None)
            if ino in self._orphans and not self.read_only:
                self._free_orphan(ino)

    def _free_orphan(self, ino: int) -> None:
        node = self.inode(ino)
        self._orphans.discard(ino)
        batch: Batch = {ORPHANS_KEY: encode_orphans(self._orphans) if self._orphans else None}
        later = self._drop(batch, ino, node)
        self._commit(batch)
        self._inodes.pop(ino, None)
        self._free_later(ino, later)

    def _free_orphans(self) -> None:
        with self._mu:
            for ino in sorted(self._orphans):
                self._free_orphan(ino)

    # --- walking --------------------------------------------------------------------------

    def walk(self, ino: int = ROOT, prefix: str = "") -> Iterator[tuple[str, int, Inode]]:
        """Every (relative path, inode, attributes) below `ino`, parents first."""
        for name, child, _ in self.readdir(ino):
            path = prefix + name.decode("utf-8", "surrogateescape")
            node = self.inode(child)
            yield path, child, node
            if node.kind == DIRECTORY:
                yield from self.walk(child, path + "/")
