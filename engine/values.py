"""Keys, values and how a value version is encoded.

Keys are integers in [0, 2**64). Values are bytes of at most 64 KiB (pages
are 8 KiB). A *version* of a key is what one commit wrote to it: a value or
a tombstone (the key was deleted). The engine encodes a version once, when it
is committed, and the same stored bytes travel unchanged from the commit log
to the in-memory layer, to delta layers and to image layers:

    flags    u8    FLAG_LZ4: stored is an lz4 block; FLAG_TOMBSTONE: deleted
    raw_len  u32   length of the value before compression
    stored   bytes what is written to disk
    checksum u64   xxh3_64 of `stored`, checked on every read from disk
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import lz4.block

from .checksums import xxh3 as checksum
from .errors import InvalidArgumentError

PAGE_SIZE = 8192
MAX_VALUE_SIZE = 64 * 1024
KEY_LIMIT = 1 << 64
MAX_KEY = KEY_LIMIT - 1
MAX_BATCH = 1 << 20  # entries in one commit

FLAG_LZ4 = 0x01
FLAG_TOMBSTONE = 0x02
KNOWN_FLAGS = FLAG_LZ4 | FLAG_TOMBSTONE

_COMPRESS_FROM = 64  # smaller values are stored as they are

_compress = lz4.block.compress
_decompress = lz4.block.decompress


class Version(NamedTuple):
    """One encoded version of one key, as it is committed."""

    key: int
    flags: int
    raw_len: int
    stored: bytes
    checksum: int


def encode(key: int, value: bytes | None) -> Version:
    if value is None:
        return Version(key, FLAG_TOMBSTONE, 0, b"", _EMPTY_SUM)
    raw_len = len(value)
    if raw_len >= _COMPRESS_FROM:
        packed = _compress(value, store_size=False)
        if len(packed) < raw_len:
            return Version(key, FLAG_LZ4, raw_len, packed, checksum(packed))
    stored = bytes(value)
    return Version(key, 0, raw_len, stored, checksum(stored))


_EMPTY_SUM = checksum(b"")


def decode(flags: int, raw_len: int, stored: bytes) -> bytes | None:
    if flags & FLAG_TOMBSTONE:
        return None
    if flags & FLAG_LZ4:
        return _decompress(stored, uncompressed_size=raw_len)
    return stored


def check_key(key: object) -> int:
    if type(key) is not int or not 0 <= key < KEY_LIMIT:
        if isinstance(key, bool) or not isinstance(key, int):
            raise InvalidArgumentError(f"key must be an int in [0, 2**64), got {type(key).__name__}")
        raise InvalidArgumentError(f"key {key} is outside [0, 2**64)")
    return key


def encode_batch(batch: object) -> list[Version]:
    """Validate and encode a commit batch {key: bytes | None}, sorted by key.

    Raises InvalidArgumentError naming the first bad key or value; nothing is
    written unless the whole batch is valid. (The checks cost little in the
    common case, a dict of int keys and bytes values: this is on the path of
    every commit.)"""
    if type(batch) is not dict and not isinstance(batch, Mapping):
        raise InvalidArgumentError(
            f"a commit takes a mapping {{key: bytes | None}}, got {type(batch).__name__}"
        )
    if not batch:
        raise InvalidArgumentError("a commit needs at least one key")
    if len(batch) > MAX_BATCH:
        raise InvalidArgumentError(f"a commit holds at most {MAX_BATCH} keys, got {len(batch)}")
    ints = all(type(key) is int for key in batch)
    out = []
    for key in sorted(batch) if ints else sorted(batch, key=_sort_key):
        if not ints or not 0 <= key < KEY_LIMIT:
            check_key(key)
        value = batch[key]
        if value is not None and type(value) is not bytes:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise InvalidArgumentError(
                    f"value for key {key} must be bytes or None, got {type(value).__name__}"
                )
            value = bytes(value)
        if value is not None and len(value) > MAX_VALUE_SIZE:
            raise InvalidArgumentError(
                f"value for key {key} is {len(value)} bytes; the limit is {MAX_VALUE_SIZE}"
            )
        out.append(encode(key, value))
    return out


def _sort_key(key: object) -> tuple[int, object]:
    # Sorting must not fail on bad keys before check_key can name them.
    return (0, key) if type(key) is int else (1, repr(key))
