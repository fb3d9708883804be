"""The checksums of every on-disk format, and *sealed* headers.

xxh3_64 covers data: each value, each log record payload, each section of a
layer file or manifest. xxh64 covers fixed-size headers and footers, which
are *sealed*: a sealed structure of N bytes keeps in the 8 bytes at `at`
(default: its last 8) the xxh64 of the bytes before them. The headers of
log segments, layer files and the manifest also begin with an 8-byte magic
and a u16 format version, checked by `check_header`.
"""

from __future__ import annotations

import struct

import xxhash

from .errors import CorruptionError

xxh3 = xxhash.xxh3_64_intdigest
Xxh3 = xxhash.xxh3_64  # the same, fed in parts: Xxh3().update(part) ... .intdigest()
xxh64 = xxhash.xxh64_intdigest
_U64 = struct.Struct("<Q")
_VERSION = struct.Struct("<H")


def seal(raw: bytes, at: int | None = None) -> bytes:
    """`raw` with the xxh64 of raw[:at] written at raw[at:at + 8]."""
    at = len(raw) - 8 if at is None else at
    return raw[:at] + _U64.pack(xxh64(raw[:at])) + raw[at + 8 :]


def sealed_ok(raw: bytes | memoryview, at: int | None = None) -> bool:
    at = len(raw) - 8 if at is None else at
    return xxh64(raw[:at]) == _U64.unpack_from(raw, at)[0]


def check_header(path: str, raw: bytes, magic: bytes, version: int, what: str) -> None:
    """Check a sealed header that starts with `magic` and a u16 version."""
    if raw[: len(magic)] != magic:
        raise CorruptionError(path, 0, f"bad {what} magic", magic, bytes(raw[: len(magic)]))
    at = len(raw) - 8
    if not sealed_ok(raw):
        raise CorruptionError(path, at, f"{what} header checksum mismatch",
                              _U64.unpack_from(raw, at)[0], xxh64(raw[:at]))
    (got,) = _VERSION.unpack_from(raw, len(magic))
    if got != version:
        raise CorruptionError(path, len(magic), f"unsupported {what} format version", version, got)
