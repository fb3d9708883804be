"""pageserver.pgdata.diff and heap: a data directory's files, relations and
blocks that differ between two points, with PostgreSQL's heap masking;
built on synthetic pages (the control plane's tests run PostgreSQL)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.diff import point
from pageserver.pgdata.datadir import DataDir
from pageserver.pgdata.heap import HEADER, heap_mask, is_heap_page, items
from pageserver.pgdata.layout import ROOT

PAGE = 8192


def heap_page(rows: list[bytes], *, infomask: int = 0, lsn: int = 1, flags: int = 0, junk: int = 0) -> bytes:
    """A heap page holding `rows` as tuples (23-byte header + data)."""
    p = bytearray(PAGE)
    upper = PAGE
    lps = []
    for i, data in enumerate(rows):
        tup = struct.pack("<IIIHHHHHB", 100 + i, 0, 7, 0, 0, i + 1, len(rows), infomask, 24) + b"\0" + data
        upper -= (len(tup) + 7) // 8 * 8
        p[upper : upper + len(tup)] = tup
        lps.append(upper | (1 << 15) | (len(tup) << 17))
    lower = HEADER.size + 4 * len(rows)
    HEADER.pack_into(p, 0, lsn, 0, flags, lower, upper, PAGE, PAGE | 4, 0)
    for i, lp in enumerate(lps):
        struct.pack_into("<I", p, HEADER.size + 4 * i, lp)
    p[lower:upper] = bytes([junk]) * (upper - lower)
    return bytes(p)


@given(rows=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=20),
       hints=st.integers(0, 0xFFF0 // 16).map(lambda x: x * 16 & 0xFCF0),
       lsn=st.integers(0, 2**64 - 1), flags=st.integers(0, 7), junk=st.integers(0, 255))
def test_heap_mask_ignores_hints_lsn_and_free_space_but_not_rows(rows, hints, lsn, flags, junk):
    plain = heap_page(rows)
    assert is_heap_page(plain) and len(items(plain)) == len(rows)
    noisy = heap_page(rows, infomask=hints, lsn=lsn, flags=flags, junk=junk)
    assert heap_mask(noisy, 0) == heap_mask(plain, 0)
    changed = heap_page(rows[:-1] + [bytes([rows[-1][0] ^ 1]) + rows[-1][1:]])
    assert heap_mask(changed, 0) != heap_mask(plain, 0)


def test_a_frozen_tuple_keeps_its_xmin_bits_and_an_index_page_is_left_alone():
    frozen = heap_page([b"x"], infomask=0x0300)
    assert heap_mask(frozen, 0) != heap_mask(heap_page([b"x"]), 0)
    index = bytearray(heap_page([b"x"]))
    struct.pack_into("<H", index, 16, PAGE - 16)  # (special space: not a heap page)
    assert not is_heap_page(bytes(index)) and heap_mask(bytes(index), 0) == bytes(index)


@pytest.fixture
def tree(store):
    root = store.create_timeline()
    DataDir.format(root, uid=0, gid=0)
    dd = DataDir(root)
    base = dd.mkdir(ROOT, b"base", 0o700, 0, 0)
    db = dd.mkdir(base, b"5", 0o700, 0, 0)
    files = {}
    for name, pages in [(b"1259", 2), (b"16384", 3), (b"16384_vm", 1), (b"16385", 2), (b"PG_VERSION", 0)]:
        ino = files[name] = dd.create(db, name, 0o600, 0, 0)
        for blk in range(pages):
            dd.write(ino, blk * PAGE, heap_page([b"%s row %d" % (name, blk)]))
    dd.fsync()
    return store, root, db, files


def test_files_relations_and_blocks_that_differ(tree):
    store, root, db, files = tree
    child = store.branch(root)
    dd = DataDir(child)
    t = files[b"16384"]
    dd.write(t, 1 * PAGE, heap_page([b"b16384 row 1", b"a new row"]))  # a row added
    dd.write(t, 2 * PAGE, heap_page([b"16384 row 2"], infomask=0x0900, lsn=99))  # hint bits only
    dd.write(files[b"16384_vm"], 0, b"\1" * PAGE)
    new = dd.create(db, b"16390", 0o600, 0, 0)
    dd.write(new, 0, heap_page([b"created"]))
    dd.unlink(db, b"16385")
    dd.fsync()
    parent = DataDir(root)
    parent.write(files[b"1259"], 0, heap_page([b"catalog row on the parent"]))
    parent.fsync()

    from pageserver.pgdata.diff import diff_pages

    d = diff_pages(point(root), point(child))
    rels = {r.relfilenode: r for r in d.relations}
    assert set(rels) == {1259, 16384, 16385, 16390}
    assert rels[16384].status == "modified" and rels[16384].blocks == [1] and rels[16384].masked == 1
    assert rels[16384].b_wrote == 1 and rels[16384].a_wrote == 0 and rels[16384].forks == {"vm": 1}
    assert rels[16385].status == "dropped" and rels[16390].status == "created" and rels[16390].blocks == [0]
    assert rels[1259].catalog and rels[1259].a_wrote == 1 and d.catalog_changed
    assert not rels[16384].catalog
    assert d.base is not None and d.base.timeline.id == root.id
    # the same two points the other way round: sides swap
    back = {r.relfilenode: r for r in diff_pages(point(child), point(root)).relations}
    assert back[16385].status == "created" and back[16390].status == "dropped"
    assert back[16384].a_wrote == 1


def test_one_relfilenode_made_on_both_sides_is_compared_whole(tree):
    """Two branches each create base/5/16400 for different tables."""
    store, root, db, files = tree
    left, right = store.branch(root), store.branch(root)
    for tl, rows in [(left, [[b"l0"], [b"same"]]), (right, [[b"r0"], [b"same"], [b"r2"]])]:
        dd = DataDir(tl)
        ino = dd.create(db, b"16400", 0o600, 0, 0)
        for blk, r in enumerate(rows):
            dd.write(ino, blk * PAGE, heap_page(r))
        dd.fsync()

    from pageserver.pgdata.diff import diff_pages

    d = diff_pages(point(left), point(right))
    (r,) = d.relations
    assert (r.relfilenode, r.status, r.blocks, r.a_blocks, r.b_blocks) == (16400, "replaced", [0, 2], 2, 3)


def test_a_truncated_relation_says_so(tree):
    store, root, db, files = tree
    child = store.branch(root)
    dd = DataDir(child)
    dd.truncate(files[b"16384"], PAGE)
    dd.fsync()

    from pageserver.pgdata.diff import diff_pages

    (r,) = diff_pages(point(root), point(child)).relations
    assert (r.status, r.a_blocks, r.b_blocks, r.blocks) == ("truncated", 3, 1, [1, 2])


def test_a_relation_growing_into_a_new_segment_is_extended_not_created(tree):
    store, root, db, files = tree
    child = store.branch(root)
    dd = DataDir(child)
    seg = dd.create(db, b"16384.1", 0o600, 0, 0)
    for blk in range(2):
        dd.write(seg, blk * PAGE, heap_page([b"in segment 1"]))
    dd.fsync()

    from pageserver.pgdata.diff import SEGMENT_BLOCKS, diff_pages

    (r,) = diff_pages(point(root), point(child)).relations
    assert (r.status, r.a_blocks, r.b_blocks) == ("extended", 3, 5)
    assert r.blocks == [SEGMENT_BLOCKS, SEGMENT_BLOCKS + 1]


def test_pages_both_sides_wrote_alike_are_twins_only_where_a_transaction_ended_differently(tree):
    """The same insert on two branches writes the same bytes with the same
    transaction id (100); committed on one side, aborted on the other, its
    row shows on one side only: the page is kept for the row diff. A page
    whose ids ended alike is not."""
    store, root, db, files = tree
    left, right = store.branch(root), store.branch(root)
    for tl, status in ((left, 1), (right, 2)):  # (pg_xact: 2 bits a transaction; 1 committed, 2 aborted)
        dd = DataDir(tl)
        dd.write(files[b"16384"], PAGE, heap_page([b"the same insert on both"]))  # (xmin 100)
        dd.write(files[b"16384"], 2 * PAGE, heap_page([b"settled"], infomask=0x0100))
        xact = dd.mkdir(ROOT, b"pg_xact", 0o700, 0, 0)
        clog = bytearray(PAGE)
        clog[100 // 4] = status << ((100 % 4) * 2)
        dd.write(dd.create(xact, b"0000", 0o600, 0, 0), 0, bytes(clog))
        dd.fsync()

    from pageserver.pgdata.diff import diff_pages

    d = diff_pages(point(left), point(right))
    (r,) = [r for r in d.relations if r.relfilenode == 16384]
    assert r.blocks == [] and r.twins == [1]  # (block 2: its xmin's hint bit says committed on both)


def test_a_mapped_catalog_moved_by_vacuum_full_is_still_a_catalog(tree):
    """pg_class after VACUUM FULL lives in a relfilenode above 16384, named
    in pg_filenode.map: a change to it is a catalog change."""
    store, root, db, files = tree
    dd = DataDir(root)
    mapping = struct.pack("<ii", 0x592717, 2) + struct.pack("<4I", 1259, 16500, 1249, 16501)
    dd.write(dd.create(db, b"pg_filenode.map", 0o600, 0, 0), 0, mapping + bytes(524 - len(mapping)))
    moved = dd.create(db, b"16500", 0o600, 0, 0)
    dd.write(moved, 0, heap_page([b"pg_class row"]))
    dd.fsync()
    child = store.branch(root)
    kid = DataDir(child)
    kid.write(moved, 0, heap_page([b"pg_class row, altered"]))
    kid.fsync()

    from pageserver.pgdata.diff import diff_pages, relmap

    assert relmap(mapping) == {16500: 1259, 16501: 1249} and relmap(b"junk" * 10) == {}
    d = diff_pages(point(root), point(child))
    (r,) = d.relations
    assert (r.relfilenode, r.catalog, r.mapped_oid) == (16500, True, 1259) and d.catalog_changed


def _clog(dd, status: int, xid: int = 100) -> None:
    xact = dd.mkdir(ROOT, b"pg_xact", 0o700, 0, 0)
    clog = bytearray(PAGE)
    clog[xid // 4] = status << ((xid % 4) * 2)
    dd.write(dd.create(xact, b"0000", 0o600, 0, 0), 0, bytes(clog))


def test_hint_bits_that_record_different_outcomes_are_not_just_masked(tree):
    """Each side's reads set the hint its own commit log gives: 'committed'
    on one, 'invalid' on the other. Masking hides both, so the block must
    still go to the row diff."""
    store, root, db, files = tree
    left, right = store.branch(root), store.branch(root)
    for tl, status, hint in ((left, 1, 0x0100), (right, 2, 0x0200)):
        dd = DataDir(tl)
        dd.write(files[b"16384"], PAGE, heap_page([b"the same insert on both"], infomask=hint))
        _clog(dd, status)
        dd.fsync()

    from pageserver.pgdata.diff import diff_pages

    (r,) = [r for r in diff_pages(point(left), point(right)).relations if r.relfilenode == 16384]
    assert r.blocks == [] and r.masked == 1 and r.twins == [1]


def test_a_file_made_alike_on_both_sides_is_read_where_outcomes_differ(tree):
    store, root, db, files = tree
    left, right = store.branch(root), store.branch(root)
    for tl, status in ((left, 1), (right, 2)):
        dd = DataDir(tl)
        dd.write(dd.create(db, b"16400", 0o600, 0, 0), 0, heap_page([b"made alike"]))
        _clog(dd, status)
        dd.fsync()

    from pageserver.pgdata.diff import diff_pages

    (r,) = [r for r in diff_pages(point(left), point(right)).relations if r.relfilenode == 16400]
    assert (r.status, r.blocks, r.twins) == ("replaced", [], [0])
