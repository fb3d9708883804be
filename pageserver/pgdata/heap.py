"""PostgreSQL's heap page, as far as a diff needs it: the header, the line
pointers, and the masking PostgreSQL's own WAL consistency check applies
(`heap_mask` in access/heap/heapam.c, with access/common/bufmask.c), so
that two pages that differ only where no row changed compare equal.

Page (8 KiB, little-endian; PostgreSQL's format, not ours: read only)::

    0  pd_lsn u64 (xlogid u32, xrecoff u32)   8  pd_checksum u16
    10 pd_flags u16   12 pd_lower u16   14 pd_upper u16   16 pd_special u16
    18 pd_pagesize_version u16   20 pd_prune_xid u32
    24 line pointers, 4 bytes each, up to pd_lower:
         lp_off:15 | lp_flags:2 | lp_len:15   (bits from the lowest)
    ... free space (pd_lower .. pd_upper) ...
    pd_upper: tuples;  pd_special: special space (none on a heap page)

Tuple header (at lp_off)::

    0 t_xmin u32  4 t_xmax u32  8 t_cid u32  12 t_ctid (block u32 as two
    u16, offset u16)  18 t_infomask2 u16  20 t_infomask u16  22 t_hoff u8

What `heap_mask` ignores: the page LSN and checksum; pd_prune_xid and the
PD_PAGE_FULL, PD_HAS_FREE_LINES and PD_ALL_VISIBLE hints; the free space;
per normal tuple its transaction hint bits (all of HEAP_XACT_MASK unless
xmin is frozen, else only the xmax hints), its command id, a speculative
insertion's token; and the padding after each item.
"""

from __future__ import annotations

import struct

PAGE = 8192
HEADER = struct.Struct("<QHHHHHHI")
assert HEADER.size == 24
ITEM = struct.Struct("<I")
LAYOUT_VERSION = 4

PD_HAS_FREE_LINES = 0x0001
PD_PAGE_FULL = 0x0002
PD_ALL_VISIBLE = 0x0004
LP_NORMAL = 1
HEAP_XMIN_COMMITTED = 0x0100
HEAP_XMIN_INVALID = 0x0200
HEAP_XMIN_FROZEN = HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID
HEAP_XMAX_COMMITTED = 0x0400
HEAP_XMAX_INVALID = 0x0800
HEAP_XMAX_IS_MULTI = 0x1000
HEAP_XACT_MASK = 0xFFF0
SPEC_TOKEN_OFFSET = 0xFFFE
TUPLE_MIN = 23


def is_heap_page(page: bytes) -> bool:
    """A well-formed heap page (no special space; an index page has some)."""
    if len(page) != PAGE:
        return False
    _, _, _, lower, upper, special, size_version, _ = HEADER.unpack_from(page, 0)
    return (size_version == PAGE | LAYOUT_VERSION and special == PAGE
            and HEADER.size <= lower <= upper <= special)


def items(page: bytes) -> list[tuple[int, int, int]]:
    """(offset, flags, length) of each line pointer, in offset-number order."""
    lower = HEADER.unpack_from(page, 0)[3]
    out = []
    for pos in range(HEADER.size, lower - lower % 4, 4):
        (lp,) = ITEM.unpack_from(page, pos)
        out.append((lp & 0x7FFF, (lp >> 15) & 0x3, lp >> 17))
    return out


def heap_mask(page: bytes, block: int) -> bytes:
    """`page` as PostgreSQL's heap_mask leaves it (see the top). Not a heap
    page: returned as it is."""
    if not is_heap_page(page):
        return page
    p = bytearray(page)
    _, _, flags, lower, upper, special, size_version, _ = HEADER.unpack_from(p, 0)
    flags &= ~(PD_PAGE_FULL | PD_HAS_FREE_LINES | PD_ALL_VISIBLE)
    HEADER.pack_into(p, 0, 0, 0, flags, lower, upper, special, size_version, 0)
    p[lower:upper] = bytes(upper - lower)
    for number, (off, lp_flags, length) in enumerate(items(page), 1):
        if lp_flags == LP_NORMAL and length >= TUPLE_MIN and off + length <= PAGE:
            (infomask,) = struct.unpack_from("<H", p, off + 20)
            if infomask & HEAP_XMIN_FROZEN != HEAP_XMIN_FROZEN:
                infomask &= ~HEAP_XACT_MASK
            else:
                infomask &= ~(HEAP_XMAX_INVALID | HEAP_XMAX_COMMITTED)
            struct.pack_into("<H", p, off + 20, infomask)
            struct.pack_into("<I", p, off + 8, 0)  # t_cid
            if struct.unpack_from("<H", p, off + 16)[0] == SPEC_TOKEN_OFFSET:
                struct.pack_into("<HHH", p, off + 12, block >> 16, block & 0xFFFF, number)
        if length and off + length <= PAGE:
            pad = -length % 8
            p[off + length : min(off + length + pad, PAGE)] = bytes(min(pad, PAGE - off - length))
    return bytes(p)


HEAP_XMAX_KEYSHR_LOCK = 0x0010
HEAP_XMAX_EXCL_LOCK = 0x0040
HEAP_XMAX_LOCK_ONLY = 0x0080
FIRST_NORMAL_XID = 3

# What decides a tuple's visibility on one side, besides the commit log: per id, a hint's answer
# (COMMITTED, ABORTED), NONE (no xmax, or one that only locked), MULTI (a multixact: not followed),
# or the id itself, for the side's commit log to answer.
COMMITTED, ABORTED, NONE, MULTI = "committed", "aborted", "none", "multi"


def tuple_states(page: bytes) -> list[tuple[int | str, int | str]]:
    """Per normal tuple, in line pointer order: (xmin, xmax) as what its own
    hint bits settle, else the id (see above)."""
    out: list[tuple[int | str, int | str]] = []
    for off, lp_flags, length in items(page):
        if lp_flags != LP_NORMAL or length < TUPLE_MIN or off + length > PAGE:
            continue
        xmin, xmax = struct.unpack_from("<II", page, off)
        (infomask,) = struct.unpack_from("<H", page, off + 20)
        lo: int | str
        hi: int | str
        if infomask & HEAP_XMIN_COMMITTED or xmin < FIRST_NORMAL_XID:  # (frozen sets both bits)
            lo = COMMITTED
        elif infomask & HEAP_XMIN_INVALID:
            lo = ABORTED
        else:
            lo = xmin
        lock_only = infomask & HEAP_XMAX_LOCK_ONLY or (
            infomask & (HEAP_XMAX_IS_MULTI | HEAP_XMAX_KEYSHR_LOCK | HEAP_XMAX_EXCL_LOCK) == HEAP_XMAX_EXCL_LOCK)
        if xmax == 0 or infomask & HEAP_XMAX_INVALID or lock_only:
            hi = NONE
        elif infomask & HEAP_XMAX_IS_MULTI:
            hi = MULTI
        elif infomask & HEAP_XMAX_COMMITTED:
            hi = COMMITTED
        else:
            hi = xmax
        out.append((lo, hi))
    return out
