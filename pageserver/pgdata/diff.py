"""What changed between two points of a data directory: files, relations
and pages, from the engine alone (no PostgreSQL running).

`engine.diff` gives the keys that differ (layout.py: inodes, directory
buckets, file pages). Here they become files and relations:

- Each side's tree is listed (directory entries only, no file read) to
  name its inodes. A name on both sides with one inode that was already
  there at the common point is the same file (inode numbers are never
  reused within a lineage, but two branches hand out the same new ones);
  its differing page keys are its changed blocks. A name whose inode
  differs was replaced on one side or created on both (two branches
  allocate the same relfilenode to different tables): every block is
  compared, which costs what the new files hold. A name on one side only
  was created or dropped there.
- Paths map to relations as PostgreSQL lays them out:
  `base/<db oid>/<relfilenode>[_fsm|_vm|_init][.<segment>]`, and
  `global/...` for shared catalogs (db oid 0); block numbers across
  segments (1 GiB, 131072 blocks each) are the relation's.
- A differing heap page is compared after PostgreSQL's own masking
  (`heap.heap_mask`): hint bits, the page LSN and checksum, free space.
  Pages equal after it count as `masked`, not as changed.
- Catalog relations are those with a relfilenode below 16384 (where
  initdb puts them) or named in a `pg_filenode.map` (the mapped catalogs:
  pg_class, pg_attribute, pg_proc, pg_type, the shared ones, their
  indexes, wherever VACUUM FULL moved them); a change to one, or to a map,
  sets `catalog_changed`: the schema may differ. A non-mapped catalog
  that VACUUM FULL moved is known only by its oid, which the control
  plane asks PostgreSQL for.

What this does not see: rows whose pages are unchanged but whose
visibility differs (a transaction in flight at the branch point that
committed on one side); and changes a running PostgreSQL holds only in its
buffers and WAL (the control plane checkpoints a running compute first).
"""

from __future__ import annotations

import re
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from engine.diff import Diff, Point, diff, read, version_id
from pageserver.pgdata.heap import ABORTED, COMMITTED, MULTI, heap_mask, is_heap_page, tuple_states
from pageserver.pgdata.layout import (
    BUCKETS,
    DIRECTORY,
    KIND_DIR,
    KIND_INODE,
    KIND_PAGE,
    PAGE,
    ROOT,
    SUPER_KEY,
    Inode,
    decode_bucket,
    decode_super,
    dir_key,
    inode_key,
    page_key,
)

SEGMENT_BLOCKS = 131072  # 1 GiB segments of 8 KiB blocks
# pg_filenode.map (PostgreSQL's relmapper.c; read only): magic i32 0x592717 | count i32 |
# count x (catalog oid u32, relfilenode u32) | ... | crc32c (of all before it)
RELMAP_MAGIC = 0x592717
RELMAP = struct.Struct("<ii")
FIRST_NORMAL_OID = 16384
_REL = re.compile(r"^(?:base/(\d+)|global)/(\d+)(?:_(fsm|vm|init))?(?:\.(\d+))?$")


@dataclass
class FileDiff:
    path: str
    status: str  # "created", "dropped", "modified", "replaced"
    a_size: int | None  # bytes (None: absent on that side)
    b_size: int | None
    blocks: list[int] = field(default_factory=list)  # blocks whose contents differ
    a_wrote: int = 0  # of those, blocks side a changed after the common point
    b_wrote: int = 0
    masked: int = 0  # blocks that differ only where PostgreSQL's masking ignores
    twins: list[int] = field(default_factory=list)  # blocks both sides wrote alike after the common point

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "a_size": self.a_size, "b_size": self.b_size,
                "blocks": len(self.blocks), "a_wrote": self.a_wrote, "b_wrote": self.b_wrote,
                "masked": self.masked}


@dataclass
class RelationDiff:
    """One relation (database oid, relfilenode): its forks and segments."""

    db: int  # 0: a shared catalog (global/)
    relfilenode: int
    status: str  # of its main fork: created, dropped, modified, replaced, truncated, extended
    blocks: list[int]  # main-fork blocks (relation block numbers) that differ
    a_blocks: int  # main-fork size on each side, in blocks (None: absent)
    b_blocks: int
    a_wrote: int
    b_wrote: int
    masked: int
    forks: dict[str, int]  # fork -> differing blocks (fsm, vm, init)
    catalog: bool  # below 16384 (initdb's) or in a pg_filenode.map (not a non-mapped catalog VACUUM FULL moved)
    twins: list[int] = field(default_factory=list)  # main-fork blocks both sides wrote alike
    mapped_oid: int | None = None  # a mapped catalog's oid, from pg_filenode.map

    def as_dict(self) -> dict[str, Any]:
        return {"db": self.db, "relfilenode": self.relfilenode, "status": self.status,
                "blocks": self.blocks, "a_blocks": self.a_blocks, "b_blocks": self.b_blocks,
                "a_wrote": self.a_wrote, "b_wrote": self.b_wrote, "masked": self.masked,
                "forks": self.forks, "catalog": self.catalog, "twins": len(self.twins),
                "mapped_oid": self.mapped_oid}


@dataclass
class PageDiff:
    a: Point
    b: Point
    base: Point | None
    files: list[FileDiff]
    relations: list[RelationDiff]
    candidates: int  # keys compared
    seconds: float

    @property
    def catalog_changed(self) -> bool:
        return any(r.catalog for r in self.relations) or any(
            f.path.endswith("pg_filenode.map") for f in self.files)

    def relation(self, db: int, relfilenode: int) -> RelationDiff | None:
        return next((r for r in self.relations if (r.db, r.relfilenode) == (db, relfilenode)), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "base": {"timeline": self.base.timeline.id, "lsn": self.base.lsn} if self.base else None,
            "relations": [r.as_dict() for r in self.relations],
            "files": [f.as_dict() for f in self.files if _REL.match(f.path) is None],
            "catalog_changed": self.catalog_changed, "candidates": self.candidates,
            "seconds": round(self.seconds, 4),
        }


class _Side:
    """One point's tree, listed lazily: directory entries and inodes."""

    def __init__(self, p: Point) -> None:
        self.p = p
        self.paths: dict[int, str] = {}
        self.names: dict[str, int] = {}
        self._list(ROOT, "")

    def get(self, key: int) -> bytes | None:
        return read(self.p.timeline, key, self.p.lsn)

    def _list(self, ino: int, prefix: str) -> None:
        for bucket in range(BUCKETS):  # (a read each, not a scan: a scan's cost grows with the data)
            raw = self.get(dir_key(ino, bucket))
            if raw is None:
                continue
            for name, (child, kind) in decode_bucket(raw).items():
                path = prefix + name.decode("utf-8", "surrogateescape")
                self.paths[child] = path
                self.names[path] = child
                if kind == DIRECTORY:
                    self._list(child, path + "/")

    def size(self, ino: int) -> int:
        raw = self.get(inode_key(ino))
        return Inode.decode(raw).size if raw is not None else 0


def _blocks(size: int | None) -> int:
    return 0 if size is None else (size + PAGE - 1) // PAGE


def diff_pages(a: Point, b: Point, *, engine_diff: Diff | None = None) -> PageDiff:
    """Files, relations and pages that differ between two points of a
    timeline holding a data directory (see the top)."""
    t0 = time.perf_counter()
    d = engine_diff or diff(a, b)
    a, b = d.a, d.b
    pages: dict[int, list[int]] = defaultdict(list)
    twins: dict[int, list[int]] = defaultdict(list)
    for key in d.twins:
        if key >> 56 == KIND_PAGE:
            twins[(key >> 24) & 0xFFFFFFFF].append(key & 0xFFFFFF)
    touched: set[int] = set(twins)
    dirs_changed = False
    for key in d.keys:
        kind, ino, low = key >> 56, (key >> 24) & 0xFFFFFFFF, key & 0xFFFFFF
        if kind == KIND_PAGE:
            pages[ino].append(low)
            touched.add(ino)
        elif kind == KIND_INODE:
            touched.add(ino)
        elif kind == KIND_DIR:
            dirs_changed = True
    sa, sb = _Side(a), _Side(b)
    # Inode numbers are never reused within a lineage, but two sides allocate the same new ones:
    # one inode number is one file only if it was there at the common point.
    shared_below = decode_super(read(d.base.timeline, SUPER_KEY, d.base.lsn) or b"") if d.base else 1 << 32
    files: list[FileDiff] = []
    names: set[str] = {sa.paths[i] for i in touched if i in sa.paths} | {sb.paths[i] for i in touched if i in sb.paths}
    if dirs_changed:  # (created, dropped or renamed: names whose inode differs)
        names |= {n for n in sa.names.keys() | sb.names.keys() if sa.names.get(n) != sb.names.get(n)}
    for name in sorted(names):
        ia, ib = sa.names.get(name), sb.names.get(name)
        if (ia is not None and sa.p.timeline.get(inode_key(ia), sa.p.lsn) is None) or (
                ib is not None and sb.p.timeline.get(inode_key(ib), sb.p.lsn) is None):
            continue
        a_size = sa.size(ia) if ia is not None else None
        b_size = sb.size(ib) if ib is not None else None
        if ia is not None and ia == ib and ia < shared_below:
            f = FileDiff(name, "modified", a_size, b_size)
            limit = max(_blocks(a_size), _blocks(b_size))
            for block in sorted(pages.get(ia, ())):
                if block < limit:
                    _compare(f, d, sa, sb, ia, ib, block, block < _blocks(a_size), block < _blocks(b_size))
            page_of = sa.get
            f.twins = sorted(set(f.twins) | {
                b for b in twins.get(ia, ()) if b < min(_blocks(a_size), _blocks(b_size))
                and not _same_rows(page := page_of(page_key(ia, b)), page, sa, sb)})
        else:
            status = "created" if ia is None else "dropped" if ib is None else "replaced"
            f = FileDiff(name, status, a_size, b_size)
            for block in range(max(_blocks(a_size), _blocks(b_size))):
                _compare(f, d, sa, sb, ia, ib, block, block < _blocks(a_size), block < _blocks(b_size))
        if f.blocks or f.twins or f.status in ("created", "dropped") or a_size != b_size:  # (replaced, alike: none)
            files.append(f)
    return PageDiff(a, b, d.base, files, _relations(files, sa, sb), d.candidates, time.perf_counter() - t0)


XACTS_PER_CLOG_PAGE = PAGE * 4  # pg_xact: 2 bits a transaction
CLOG_PAGES_PER_SEGMENT = 32

def _xact_status(side: _Side, xid: int, pages: dict[tuple[int, int], bytes | None]) -> int:
    """A transaction's status in the side's pg_xact: 0 in progress (or
    never), 1 committed, 2 aborted, 3 sub-committed."""
    page_no = xid // XACTS_PER_CLOG_PAGE
    seg, page = divmod(page_no, CLOG_PAGES_PER_SEGMENT)
    key = (seg, page)
    if key not in pages:
        ino = side.names.get(f"pg_xact/{seg:04X}")
        pages[key] = side.get(page_key(ino, page)) if ino is not None else None
    raw = pages[key]
    if raw is None:
        return 0
    i = xid % XACTS_PER_CLOG_PAGE
    return (raw[i // 4] >> ((i % 4) * 2)) & 3


def xact_statuses(p: Point, xids: list[int]) -> list[int]:
    """Each transaction's status in the commit log at a point (0 in
    progress or never, 1 committed, 2 aborted, 3 sub-committed), read from
    storage: no PostgreSQL needed."""
    side, clog = _Side(p), dict[tuple[int, int], bytes | None]()
    return [_xact_status(side, x & 0xFFFFFFFF, clog) for x in xids]


def _outcomes(page: bytes, side: _Side, clog: dict[tuple[int, int], bytes | None]) -> list[tuple[str, str]] | None:
    """What decides each tuple's visibility on one side: its hint bits,
    else the side's commit log (None: a multixact or a sub-transaction,
    not followed here: the page is read)."""
    out = []
    for lo, hi in tuple_states(page):
        pair = []
        for state in (lo, hi):
            if state == MULTI:
                return None
            if isinstance(state, int):
                st = _xact_status(side, state, clog)
                if st == 3:
                    return None
                state = ("in progress", COMMITTED, ABORTED)[st]
            pair.append(state)
        out.append((pair[0], pair[1]))
    return out


def _same_rows(pa: bytes | None, pb: bytes | None, sa: _Side, sb: _Side) -> bool:
    """Two heap pages equal but for what masking ignores (or equal) show
    the same rows on both sides only if every tuple's transactions ended
    the same way there: two branches hand out the same new ids to
    different transactions, hint bits differ, and the commit log is
    another file. Not a heap page: True (rows come from the heap)."""
    if pa is None or pb is None or not is_heap_page(pa) or not is_heap_page(pb):
        return True
    a, b = _outcomes(pa, sa, {}), _outcomes(pb, sb, {})
    return a is not None and a == b


def _compare(f: FileDiff, d: Diff, sa: _Side, sb: _Side, ia: int | None, ib: int | None, block: int,
             in_a: bool, in_b: bool) -> None:
    ka = page_key(ia, block) if ia is not None and in_a else None
    kb = page_key(ib, block) if ib is not None and in_b else None
    same = f.status == "modified"
    if same and in_a and in_b:
        va = vb = None
    else:
        va = version_id(sa.p.timeline, ka, sa.p.lsn) if ka is not None else None
        vb = version_id(sb.p.timeline, kb, sb.p.lsn) if kb is not None else None
        if va == vb:
            if va is not None:  # (made alike on both sides: a twin if its transactions ended differently)
                page = sa.get(ka) if ka is not None else None
                if not _same_rows(page, page, sa, sb):
                    f.twins.append(block)
            return
    pa = sa.get(ka) if ka is not None else None
    pb = sb.get(kb) if kb is not None else None
    if pa is not None and pb is not None and pa != pb and heap_mask(pa, block) == heap_mask(pb, block):
        f.masked += 1
        if not _same_rows(pa, pb, sa, sb):
            f.twins.append(block)  # (hints differ where a transaction ended differently: rows are read)
        return
    if (pa or None) == (pb or None):
        return
    f.blocks.append(block)
    if same:
        key = page_key(ia, block)  # type: ignore[arg-type]
        f.a_wrote += key in d.a_wrote
        f.b_wrote += key in d.b_wrote
    else:
        f.a_wrote += ka is not None and f.status != "created"
        f.b_wrote += kb is not None


def _segments(side: _Side, db: int, node: int) -> dict[int, int]:
    """The main-fork segments of a relation on one side: segment -> inode."""
    prefix = f"base/{db}/{node}" if db else f"global/{node}"
    out = {}
    for seg in range(1 << 16):
        ino = side.names.get(prefix if seg == 0 else f"{prefix}.{seg}")
        if ino is None:
            break
        out[seg] = ino
    return out


def relmap(raw: bytes | None) -> dict[int, int]:
    """A pg_filenode.map's mappings: relfilenode -> catalog oid ({} if absent or not one)."""
    if raw is None or len(raw) < RELMAP.size:
        return {}
    magic, n = RELMAP.unpack_from(raw, 0)
    if magic != RELMAP_MAGIC or not 0 <= n <= (len(raw) - RELMAP.size) // 8:
        return {}
    pairs = struct.unpack_from(f"<{2 * n}I", raw, RELMAP.size)
    return {pairs[i + 1]: pairs[i] for i in range(0, 2 * n, 2)}


def _mapped(side: _Side, db: int) -> dict[int, int]:
    ino = side.names.get(f"base/{db}/pg_filenode.map" if db else "global/pg_filenode.map")
    return relmap(side.get(page_key(ino, 0))) if ino is not None else {}


def _relations(files: list[FileDiff], sa: _Side, sb: _Side) -> list[RelationDiff]:
    rels: dict[tuple[int, int], RelationDiff] = {}
    maps: dict[int, dict[int, int]] = {}
    for f in files:
        m = _REL.match(f.path)
        if m is None:
            continue
        db, node, fork, seg = int(m.group(1) or 0), int(m.group(2)), m.group(3) or "main", int(m.group(4) or 0)
        r = rels.get((db, node))
        if r is None:
            if db not in maps:
                maps[db] = {**_mapped(sa, db), **_mapped(sb, db)}
            oid = maps[db].get(node)
            r = rels[(db, node)] = RelationDiff(db, node, "", [], 0, 0, 0, 0, 0, {},
                                                node < FIRST_NORMAL_OID or oid is not None, mapped_oid=oid)
        if fork != "main":
            r.forks[fork] = r.forks.get(fork, 0) + len(f.blocks)
            continue
        base = seg * SEGMENT_BLOCKS
        r.blocks += [base + blk for blk in f.blocks]
        r.twins += [base + blk for blk in f.twins]
        r.a_wrote += f.a_wrote
        r.b_wrote += f.b_wrote
        r.masked += f.masked
        if seg == 0:
            r.status = f.status
    for r in rels.values():
        r.blocks.sort()
        r.twins.sort()
        # sizes and status from every segment on each side, not only those that differ
        seg_a, seg_b = _segments(sa, r.db, r.relfilenode), _segments(sb, r.db, r.relfilenode)
        r.a_blocks = sum(_blocks(sa.size(i)) for i in seg_a.values())
        r.b_blocks = sum(_blocks(sb.size(i)) for i in seg_b.values())
        if not seg_a and not seg_b:
            r.status = r.status or "modified"  # (forks only)
        elif not seg_a:
            r.status = "created"
        elif not seg_b:
            r.status = "dropped"
        elif r.status != "replaced":
            r.status = "modified" if r.a_blocks == r.b_blocks else (
                "extended" if r.b_blocks > r.a_blocks else "truncated")
    return sorted(rels.values(), key=lambda r: (r.db, r.relfilenode))
