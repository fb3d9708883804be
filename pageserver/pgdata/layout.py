"""How a data directory is laid out in a timeline's keys.

A timeline holds one file-system tree: inodes (files, directories, symlinks),
directory entries and 8 KiB file pages, all as engine keys, so that the whole
tree as of any LSN is one consistent image. Inode numbers are never reused
within a lineage (the superblock counts them), so stale keys of a deleted
file can never be read as another file's.

Keys (64 bits)::

    63      56 55                                  24 23                    0
    +---------+--------------------------------------+----------------------+
    | kind u8 | inode (32 bits)                      | block / bucket / 0   |
    +---------+--------------------------------------+----------------------+

    kind 0  SUPER  key 0: the superblock          key 1: orphan inodes
    kind 1  INODE  inode's attributes
    kind 2  DIR    directory inode, bucket = xxh3(name) % 64: its entries
    kind 3  PAGE   file inode, block = offset // 8192: 8 KiB of data

A page that is absent (or deleted) reads as zeros up to the file size, so
files are sparse and all-zero pages cost nothing. Values are checksummed by
the engine; each begins with a format version byte.

SUPER (key 0)::   version u8 | zero 7 B | magic "STRATAFS" | next inode u64
ORPHANS (key 1):: version u8 | count u32 | inode u32 x count
    (unlinked while open; freed when closed, or on the next mount)
INODE::           version u8 | kind u8 (1 file, 2 dir, 3 symlink) | zero u16 |
                  mode u32 | uid u32 | gid u32 | nlink u32 | size u64 |
                  mtime ns i64 | ctime ns i64 | then a symlink's target
DIR bucket::      version u8 | count u32 | per entry: name length u16 | name |
                  inode u32 | kind u8          (sorted by name)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from engine import CorruptionError

PAGE = 8192
FORMAT = 1

KIND_SUPER = 0
KIND_INODE = 1
KIND_DIR = 2
KIND_PAGE = 3

FILE = 1
DIRECTORY = 2
SYMLINK = 3

ROOT = 1  # the root directory's inode
BUCKETS = 64
MAX_INODE = (1 << 32) - 1
MAX_BLOCK = (1 << 24) - 1
MAX_FILE_SIZE = (MAX_BLOCK + 1) * PAGE  # 128 GiB
MAX_NAME = 255

SUPER_KEY = 0
ORPHANS_KEY = 1
SUPER_MAGIC = b"STRATAFS"
_SUPER = struct.Struct("<B7x8sQ")
_ORPHANS_HEAD = struct.Struct("<BI")
_INODE = struct.Struct("<BBHIIIIQqq")
assert _INODE.size == 44
_DIR_HEAD = struct.Struct("<BI")
_ENTRY = struct.Struct("<IB")


def inode_key(ino: int) -> int:
    return (KIND_INODE << 56) | (ino << 24)


def dir_key(ino: int, bucket: int) -> int:
    return (KIND_DIR << 56) | (ino << 24) | bucket


def page_key(ino: int, block: int) -> int:
    return (KIND_PAGE << 56) | (ino << 24) | block


def page_range(ino: int) -> tuple[int, int]:
    """First and last key of a file's pages."""
    return page_key(ino, 0), page_key(ino, MAX_BLOCK)


def bucket_of(name: bytes) -> int:
    return xxhash.xxh3_64_intdigest(name) % BUCKETS


def _bad(what: str, detail: str) -> CorruptionError:
    return CorruptionError(f"<data directory {what}>", 0, detail)


# --- superblock --------------------------------------------------------------


def encode_super(next_ino: int) -> bytes:
    return _SUPER.pack(FORMAT, SUPER_MAGIC, next_ino)


def decode_super(raw: bytes) -> int:
    if len(raw) != _SUPER.size:
        raise _bad("superblock", "wrong size")
    version, magic, next_ino = _SUPER.unpack(raw)
    if version != FORMAT or magic != SUPER_MAGIC:
        raise _bad("superblock", f"not a data directory superblock (version {version}, magic {magic!r})")
    return next_ino


def encode_orphans(inodes: set[int]) -> bytes:
    return _ORPHANS_HEAD.pack(FORMAT, len(inodes)) + struct.pack(f"<{len(inodes)}I", *sorted(inodes))


def decode_orphans(raw: bytes) -> set[int]:
    version, n = _ORPHANS_HEAD.unpack_from(raw, 0)
    if version != FORMAT or len(raw) != _ORPHANS_HEAD.size + 4 * n:
        raise _bad("orphans", "malformed orphan list")
    return set(struct.unpack_from(f"<{n}I", raw, _ORPHANS_HEAD.size))


# --- inodes ------------------------------------------------------------------


@dataclass
class Inode:
    kind: int
    mode: int  # permission bits (and setuid etc.), without the type
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int
    ctime_ns: int
    target: bytes = b""  # a symlink's target

    def encode(self) -> bytes:
        return _INODE.pack(
            FORMAT, self.kind, 0, self.mode, self.uid, self.gid, self.nlink,
            self.size, self.mtime_ns, self.ctime_ns,
        ) + self.target

    @classmethod
    def decode(cls, raw: bytes) -> Inode:
        if len(raw) < _INODE.size:
            raise _bad("inode", "too short")
        version, kind, _, mode, uid, gid, nlink, size, mtime, ctime = _INODE.unpack_from(raw, 0)
        if version != FORMAT or kind not in (FILE, DIRECTORY, SYMLINK):
            raise _bad("inode", f"unknown inode (version {version}, kind {kind})")
        return cls(kind, mode, uid, gid, nlink, size, mtime, ctime, bytes(raw[_INODE.size:]))


# --- directory buckets ---------------------------------------------------------


def encode_bucket(entries: dict[bytes, tuple[int, int]]) -> bytes:
    """entries: name -> (inode, kind)."""
    parts = [_DIR_HEAD.pack(FORMAT, len(entries))]
    for name in sorted(entries):
        ino, kind = entries[name]
        parts.append(struct.pack("<H", len(name)) + name + _ENTRY.pack(ino, kind))
    return b"".join(parts)


def decode_bucket(raw: bytes) -> dict[bytes, tuple[int, int]]:
    version, n = _DIR_HEAD.unpack_from(raw, 0)
    if version != FORMAT:
        raise _bad("directory", f"unknown format version {version}")
    pos = _DIR_HEAD.size
    out = {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<H", raw, pos)
        pos += 2
        name = bytes(raw[pos : pos + ln])
        pos += ln
        ino, kind = _ENTRY.unpack_from(raw, pos)
        pos += _ENTRY.size
        out[name] = (ino, kind)
    if pos != len(raw):
        raise _bad("directory", "trailing bytes in a directory bucket")
    return out
