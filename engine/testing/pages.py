"""Helpers for tests and benchmarks of code built on the engine.

`page()` makes an 8 KiB page that describes itself (the timeline that wrote
it, its key, a sequence number) so that every read can check itself; the
rest of the page is half noise and half pattern, so lz4 stores it in about
half its size, like a typical database page.
"""

from __future__ import annotations

import random
import struct

_PAGE_HEAD = struct.Struct("<16sQQ")


def page(timeline: str, key: int, seq: int, size: int = 8192) -> bytes:
    head = _PAGE_HEAD.pack(bytes.fromhex(timeline), key, seq)
    noise = random.Random(key * 1_000_003 + seq).randbytes(max(0, size // 2 - len(head)))
    return (head + noise + b"pattern!" * (size // 8))[:size]


def page_owner(value: bytes) -> tuple[str, int, int]:
    """(timeline id, key, sequence number) that `page()` wrote into a page."""
    tl, key, seq = _PAGE_HEAD.unpack_from(value, 0)
    return tl.hex(), key, seq
