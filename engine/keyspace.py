"""Key ranges over the 64-bit key space, and key bitmaps restricted to them.

Ranges are inclusive (first, last) so that the whole space, up to 2**64 - 1,
is expressible in unsigned 64-bit integers.
"""

from __future__ import annotations

from pyroaring import AbstractBitMap64, BitMap64

from .values import MAX_KEY

KeyRange = tuple[int, int]
FULL: KeyRange = (0, MAX_KEY)


def count_in(keys: AbstractBitMap64, first: int, last: int) -> int:
    """How many of `keys` lie in [first, last]."""
    below = keys.rank(first - 1) if first > 0 else 0
    return keys.rank(last) - below


def clip(keys: BitMap64, first: int, last: int) -> BitMap64:
    """Remove from `keys` (in place) everything outside [first, last]."""
    if first > 0:
        keys.remove_range(0, first)
    if last < MAX_KEY:
        keys.remove_range(last + 1, MAX_KEY)
        keys.discard(MAX_KEY)
    return keys


def partitions(keys: AbstractBitMap64, per: int) -> list[KeyRange]:
    """Cut the key space into ranges holding `per` of `keys` each. The ranges
    tile [0, 2**64) so that images written from them cover the whole space."""
    n = len(keys)
    if n == 0:
        return []
    starts = [0] + [keys[i] for i in range(per, n, per)]
    ends = [s - 1 for s in starts[1:]] + [MAX_KEY]
    return list(zip(starts, ends))
