"""Layer files: immutable sets of key versions, the store's data at rest.

A *delta* layer holds every version a timeline committed to any key within an
LSN range [lsn_start, lsn_end). An *image* layer holds, for one key range at
one LSN L (lsn_start = L, lsn_end = L + 1), the newest version of every key:
a *complete* image holds everything visible at L (ancestors included; deleted
keys are simply absent), a *local* image holds only keys the timeline itself
wrote (tombstones included, so they hide the ancestor's versions).

The file name encodes the kind and the key and LSN rectangle, so a directory
listing is readable: `delta-<first key>-<last key>-<lsn start>-<lsn end>-<gen>.layer`
(hex). Files are written to a `.tmp` name, fsynced, renamed, and the
directory is fsynced.

Layout (all integers little-endian)::

    0                                                                     64
    +----------------------------------------------------------------------+
    | header: magic "STRATLYR" 8s | version u16 | kind u8 | flags u8 |     |
    |   zero u32 | lsn_start u64 | lsn_end u64 | timeline id 16s |         |
    |   zero u64 | header xxh64 u64 (of bytes 0..56)                       |
    +----------------------------------------------------------------------+ 64
    | values: the stored (lz4 or raw) bytes of each version, back to back  |
    +----------------------------------------------------------------------+ index_off
    | index: 48 bytes per version, sorted by (key, LSN):                   |
    |   key u64 | lsn u64 | offset u64 | stored_len u32 | raw_len u32 |    |
    |   value xxh3_64 u64 | flags u8 | zero 7 B                            |
    +----------------------------------------------------------------------+
    | key bitmap: serialized pyroaring BitMap64 of the keys in the layer   |
    +----------------------------------------------------------------------+
    | commit times: 16 bytes per commit, by LSN: lsn u64 | time µs u64     |
    +----------------------------------------------------------------------+
    | footer, 88 bytes: index_off u64 | entries u64 | index xxh3_64 u64 |  |
    |   bitmap_len u64 | bitmap xxh3_64 u64 | times_len u64 |              |
    |   times xxh3_64 u64 | key_first u64 | key_last u64 |                 |
    |   footer xxh64 u64 (of the 72 bytes before) | magic "STRATEND" 8s    |
    +----------------------------------------------------------------------+

Every value carries its own checksum in the index; the index, the bitmap, the
commit times, the header and the footer each carry one too. A read verifies
the checksum of every value it returns. The key bitmap lets a read skip a
layer without touching its index; the index is loaded on first use.
"""

from __future__ import annotations

import bisect
import os
import random
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

from lz4.block import LZ4BlockError
from lz4.block import decompress as _decompress
from pyroaring import BitMap64, FrozenBitMap64

from . import failpoints
from .checksums import check_header, seal, sealed_ok, xxh3, xxh64
from .errors import CorruptionError
from .fs import TMP_SUFFIX, FileSystem, ReadFile
from .values import FLAG_LZ4, FLAG_TOMBSTONE, KNOWN_FLAGS, MAX_KEY, MAX_VALUE_SIZE

MAGIC = b"STRATLYR"
END_MAGIC = b"STRATEND"
VERSION = 1

KIND_DELTA = 1
KIND_IMAGE = 2
KIND_NAMES = {KIND_DELTA: "delta", KIND_IMAGE: "image"}
FLAG_COMPLETE = 0x01

HEADER = struct.Struct("<8sHBBIQQ16sQQ")
assert HEADER.size == 64
INDEX_ENTRY = struct.Struct("<QQQIIQB7x")
assert INDEX_ENTRY.size == 48
FOOTER = struct.Struct("<QQQQQQQQQQ8s")
assert FOOTER.size == 88
TIME_ENTRY = struct.Struct("<QQ")
assert TIME_ENTRY.size == 16



@dataclass(frozen=True, slots=True)
class LayerDesc:
    """What the manifest knows about a layer file without opening it."""

    kind: int
    complete: bool
    key_first: int
    key_last: int
    lsn_start: int
    lsn_end: int  # exclusive; an image at L has lsn_end = L + 1
    file_size: int
    entries: int
    time_min_us: int
    time_max_us: int
    gen: int

    @property
    def is_image(self) -> bool:
        return self.kind == KIND_IMAGE

    @property
    def name(self) -> str:
        return (
            f"{KIND_NAMES[self.kind]}-{self.key_first:016x}-{self.key_last:016x}"
            f"-{self.lsn_start:016x}-{self.lsn_end:016x}-{self.gen:08x}.layer"
        )


# An index entry as kept in memory: (lsn, offset, stored_len, raw_len, checksum, flags)
Entry = tuple[int, int, int, int, int, int]


class LayerWriter:
    """Streams versions, in (key, LSN) order, into a new layer file."""

    def __init__(
        self,
        fs: FileSystem,
        directory: str,
        *,
        kind: int,
        timeline: bytes,
        lsn_start: int,
        lsn_end: int,
        complete: bool = False,
        key_range: tuple[int, int] | None = None,
    ) -> None:
        """An image covers `key_range` (first, last), inclusive, at LSN
        `lsn_start` (= lsn_end - 1); a delta covers the keys it holds."""
        if lsn_end <= lsn_start:
            raise ValueError(f"empty LSN range {lsn_start}..{lsn_end}")
        self._fs = fs
        self._dir = directory
        self._kind = kind
        self._complete = complete
        self._lsn_start = lsn_start
        self._lsn_end = lsn_end
        self._gen = random.getrandbits(32)
        self._tmp = os.path.join(directory, f"new-{self._gen:08x}.layer{TMP_SUFFIX}")
        self._file = fs.open_write(self._tmp)
        flags = FLAG_COMPLETE if complete else 0
        head = HEADER.pack(MAGIC, VERSION, kind, flags, 0, lsn_start, lsn_end, timeline, 0, 0)
        self._file.write(seal(head))
        self._pos = HEADER.size
        self._index = bytearray()
        self._keys = BitMap64()
        self._last: tuple[int, int] | None = None
        self._times: list[tuple[int, int]] = []
        self._count = 0
        self._image = kind == KIND_IMAGE
        if self._image and (key_range is None or lsn_end != lsn_start + 1):
            raise ValueError("an image needs a key range and a single LSN")
        self._range = key_range

    def add(self, key: int, lsn: int, flags: int, raw_len: int, stored: bytes, csum: int) -> None:
        if self._last is not None and (key, lsn) <= self._last:
            raise ValueError(f"versions out of order: {(key, lsn)} after {self._last}")
        if lsn >= self._lsn_end or (not self._image and lsn < self._lsn_start):
            raise ValueError(f"LSN {lsn} outside layer range {self._lsn_start}..{self._lsn_end}")
        if self._range is not None and not self._range[0] <= key <= self._range[1]:
            raise ValueError(f"key {key} outside image range {self._range}")
        self._last = (key, lsn)
        self._file.write(stored)
        self._index += INDEX_ENTRY.pack(key, lsn, self._pos, len(stored), raw_len, csum, flags)
        self._pos += len(stored)
        self._keys.add(key)
        self._count += 1

    def add_times(self, times: list[tuple[int, int]]) -> None:
        self._times.extend(times)

    @property
    def count(self) -> int:
        return self._count

    def finish(self) -> LayerDesc:
        """Write index, bitmap, times and footer; fsync; rename into place."""
        try:
            times = sorted(
                t for t in set(self._times)
                if t[0] < self._lsn_end and (self._image or t[0] >= self._lsn_start)
            )
            bitmap = self._keys.serialize()
            tbytes = b"".join(TIME_ENTRY.pack(lsn, us) for lsn, us in times)
            index = bytes(self._index)
            index_off = self._pos
            if self._range is not None:
                key_first, key_last = self._range
            elif self._count:
                key_first, key_last = self._keys.min(), self._keys.max()
            else:
                key_first, key_last = 0, MAX_KEY
            foot = FOOTER.pack(
                index_off, self._count, xxh3(index), len(bitmap), xxh3(bitmap),
                len(tbytes), xxh3(tbytes), key_first, key_last, 0, END_MAGIC,
            )
            foot = seal(foot, at=72)
            for chunk in (index, bitmap, tbytes, foot):
                self._file.write(chunk)
            size = index_off + len(index) + len(bitmap) + len(tbytes) + FOOTER.size
            failpoints.hit("layer-before-fsync")
            self._file.sync()
            self._file.close()
            desc = LayerDesc(
                kind=self._kind,
                complete=self._complete,
                key_first=key_first,
                key_last=key_last,
                lsn_start=self._lsn_start,
                lsn_end=self._lsn_end,
                file_size=size,
                entries=self._count,
                time_min_us=times[0][1] if times else 0,
                time_max_us=times[-1][1] if times else 0,
                gen=self._gen,
            )
            failpoints.hit("layer-before-rename")
            self._fs.rename(self._tmp, os.path.join(self._dir, desc.name))
            self._fs.sync_dir(self._dir)
            failpoints.hit("layer-after-rename")
            return desc
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            self._file.close()
            self._fs.remove(self._tmp)
        except OSError:
            pass


class Layer:
    """An open layer file. Thread-safe; parts are loaded lazily and checked.

    `keys` (the bitmap) is loaded on first use, the index on the first read
    that needs it. A layer whose file turns out damaged raises CorruptionError
    naming the file and offset on every use; other layers are unaffected.
    """

    __slots__ = (
        "desc", "path", "timeline", "_fs", "_file", "_keys", "_index", "_times",
        "_mu", "_footer", "is_image", "complete", "lsn_start",
        "key_first", "key_last", "_pread", "fetch", "used", "_epoch", "retired", "__weakref__",
    )

    def __init__(self, fs: FileSystem, directory: str, desc: LayerDesc, timeline: bytes,
                 fetch: Callable[[Layer], ReadFile | None] | None = None) -> None:
        self.desc = desc
        # a missing file, from the object store (engine.remote), if any: a file to read it
        # through meanwhile, or None once it is here
        self.fetch = fetch
        # time.monotonic() of its last lookup (the local cache evicts the least recent; a new one is recent)
        self.used = _monotonic() if fetch is not None else 0.0
        self.retired = False  # out of its timeline's layer map (set once)
        self.path = os.path.join(directory, desc.name)
        self.timeline = timeline
        self._fs = fs
        self._file: ReadFile | None = None
        self._keys: FrozenBitMap64 | None = None
        self._index: dict[int, object] | None = None
        self._times: list[tuple[int, int]] | None = None
        self._footer: tuple[int, ...] | None = None
        self._pread: Callable[[int, int], bytes] | None = None  # (length, offset) -> bytes
        self._epoch = 0  # bumped by reopen(): a file opened before it is not kept
        self._mu = threading.RLock()  # (re-entered: _open under keys and _load_index)
        self.is_image = desc.kind == KIND_IMAGE
        self.complete = desc.complete
        self.lsn_start = desc.lsn_start
        self.key_first = desc.key_first
        self.key_last = desc.key_last

    # --- loading ---------------------------------------------------------

    def _open(self) -> tuple[ReadFile, tuple[int, ...]]:
        if self._file is not None and self._footer is not None:
            return self._file, self._footer
        path = self.path
        epoch, got = self._epoch, None
        try:
            f = self._fs.open_read(path)
        except FileNotFoundError:
            if self.fetch is None:
                raise CorruptionError(path, 0, "layer file listed in the manifest is missing") from None
            got = self.fetch(self)  # (first read after a restore: read in ranges, or fetched here)
            f = got if got is not None else self._fs.open_read(path)
        size = f.size()
        d = self.desc
        if size != d.file_size:
            raise CorruptionError(path, min(size, d.file_size), "layer file size differs from the manifest", d.file_size, size)
        if size < HEADER.size + FOOTER.size:
            raise CorruptionError(path, 0, "layer file too short", HEADER.size + FOOTER.size, size)
        head = f.read_at(0, HEADER.size)
        check_header(path, head, MAGIC, VERSION, "layer")
        _, _, kind, flags, _, l0, l1, tl, _, _ = HEADER.unpack(head)
        if (kind, bool(flags & FLAG_COMPLETE), l0, l1, tl) != (d.kind, d.complete, d.lsn_start, d.lsn_end, self.timeline):
            raise CorruptionError(path, 10, "layer header does not match the manifest")
        foot_off = size - FOOTER.size
        foot = f.read_at(foot_off, FOOTER.size)
        fields = FOOTER.unpack(foot)
        if fields[10] != END_MAGIC:
            raise CorruptionError(path, foot_off + 80, "bad layer footer magic", END_MAGIC, fields[10])
        if not sealed_ok(foot, at=72):
            raise CorruptionError(path, foot_off + 72, "layer footer checksum mismatch", fields[9], xxh64(foot[:72]))
        index_off, n, _, blen, _, tlen, _, kf, kl = fields[:9]
        if n != d.entries or (kf, kl) != (d.key_first, d.key_last):
            raise CorruptionError(path, foot_off, "layer footer does not match the manifest")
        if index_off + n * INDEX_ENTRY.size + blen + tlen != foot_off or index_off < HEADER.size:
            raise CorruptionError(path, foot_off, "layer footer section sizes do not add up")
        with self._mu:
            if got is None or self._epoch == epoch:  # (not a ranged reader the download made stale)
                self._file, self._footer = f, fields
        return f, fields

    def _section(self, off: int, length: int, expected: int, what: str) -> bytes:
        f, _ = self._open()
        data = f.read_at(off, length)
        if len(data) != length:
            raise CorruptionError(self.path, off + len(data), f"layer {what} cut short", length, len(data))
        got = xxh3(data)
        if got != expected:
            raise CorruptionError(self.path, off, f"layer {what} checksum mismatch", expected, got)
        return data

    @property
    def keys(self) -> FrozenBitMap64:
        k = self._keys
        if k is None:
            with self._mu:
                if self._keys is None:
                    _, fo = self._open()
                    off = fo[0] + fo[1] * INDEX_ENTRY.size
                    raw = self._section(off, fo[3], fo[4], "key bitmap")
                    try:
                        self._keys = FrozenBitMap64.deserialize(raw)
                    except Exception as e:  # checksum matched: the writer was wrong
                        raise CorruptionError(self.path, off, f"undecodable key bitmap: {e}") from None
                k = self._keys
        return k

    def _load_index(self) -> dict[int, object]:
        with self._mu:
            if self._index is not None:
                return self._index
            _, fo = self._open()
            index_off, n = fo[0], fo[1]
            raw = self._section(index_off, n * INDEX_ENTRY.size, fo[2], "index")
            index: dict[int, object] = {}
            image = self.is_image
            d = self.desc
            prev = (-1, -1)
            for i, (key, lsn, off, slen, rlen, csum, flags) in enumerate(INDEX_ENTRY.iter_unpack(raw)):
                if (
                    (key, lsn) <= prev
                    or lsn >= d.lsn_end
                    or (lsn < d.lsn_start and not image)
                    or not d.key_first <= key <= d.key_last
                    or off < HEADER.size
                    or off + slen > index_off
                    or flags & ~KNOWN_FLAGS
                    or rlen > MAX_VALUE_SIZE
                ):
                    raise CorruptionError(self.path, index_off + i * INDEX_ENTRY.size, "malformed index entry")
                prev = (key, lsn)
                e = (lsn, off, slen, rlen, csum, flags)
                if image:
                    index[key] = e
                else:
                    cur = index.get(key)
                    if cur is None:
                        index[key] = [e]
                    else:
                        cur.append(e)  # type: ignore[attr-defined]
            if not image:
                for key, vs in index.items():
                    index[key] = tuple(vs)  # type: ignore[arg-type]
            self._index = index
            return index

    def times(self) -> list[tuple[int, int]]:
        if self._times is None:
            _, fo = self._open()
            off = fo[0] + fo[1] * INDEX_ENTRY.size + fo[3]
            raw = self._section(off, fo[5], fo[6], "commit times")
            self._times = [tuple(t) for t in TIME_ENTRY.iter_unpack(raw)]  # type: ignore[misc]
        return self._times

    # --- reading ---------------------------------------------------------

    def find(self, key: int, lsn: int) -> Entry | None:
        """The newest entry for `key` (which the key bitmap holds) at or
        below `lsn`, or None."""
        if self.fetch is not None:  # (only a cached layer, with a remote, needs its last use)
            self.used = _monotonic()
        index = self._index
        if index is None:
            index = self._load_index()
        e = index.get(key)
        if e is None:
            raise CorruptionError(self.path, self._footer[0] if self._footer else 0,
                                  f"key {key} is in the layer's key bitmap but not in its index")
        if self.is_image:
            return e  # type: ignore[return-value]
        vs: tuple[Entry, ...] = e  # type: ignore[assignment]
        last = vs[-1]
        if last[0] <= lsn:
            return last
        i = bisect.bisect_right(vs, (lsn, 1 << 64))
        return vs[i - 1] if i else None

    def reopen(self) -> None:
        """Its file is here now (it was read from the object store): the next
        read opens it. Readers holding the old file's pread finish on it."""
        with self._mu:
            self._epoch += 1
            self._file = None
            self._footer = None
            self._pread = None

    def evict(self) -> ReadFile | None:
        """Let go of the file, which the caller deletes; the next reader opens
        it anew (fetched). Returns the open file, which the caller keeps
        open a while: a reader may hold its pread (a bare descriptor, not a
        reference), and would read a closed or reused descriptor."""
        with self._mu:
            f = self._file
            self._pread = None
            self._file = None
            self._footer = None
            return f

    def try_evict(self) -> tuple[bool, ReadFile | None]:
        """`evict`, unless a reader holds the layer's lock (loading it, or
        fetching its file): (False, None) then, without waiting."""
        if not self._mu.acquire(blocking=False):
            return False, None
        try:
            return True, self.evict()
        finally:
            self._mu.release()

    def read_stored(self, e: Entry) -> bytes:
        """The stored bytes of an entry, checksum verified."""
        pread = self._pread or self._opened_pread()
        data = pread(e[2], e[1])
        if xxh3(data) != e[4]:
            self._bad_value(data, e)
        return data

    def read(self, e: Entry) -> bytes | None:
        """The value of an entry (None for a tombstone), checksum verified."""
        lsn, off, slen, rlen, csum, flags = e
        pread = self._pread or self._opened_pread()
        data = pread(slen, off)
        if xxh3(data) != csum:
            self._bad_value(data, e)
        if flags & FLAG_LZ4:
            try:
                return _decompress(data, uncompressed_size=rlen)
            except LZ4BlockError as err:  # the checksum matched: the writer was wrong
                raise CorruptionError(self.path, off, f"undecodable lz4 block: {err}") from None
        if flags & FLAG_TOMBSTONE:
            return None
        return data

    def _opened_pread(self) -> Callable[[int, int], bytes]:
        f, _ = self._open()
        if self._file is f:  # (kept: not a stale ranged reader)
            self._pread = f.pread
        return f.pread

    def _bad_value(self, data: bytes, e: Entry) -> NoReturn:
        off, slen, csum = e[1], e[2], e[4]
        if len(data) != slen:
            raise CorruptionError(self.path, off + len(data), "value cut short", slen, len(data))
        raise CorruptionError(self.path, off, "value checksum mismatch", csum, xxh3(data))

    def entries(self) -> Iterator[tuple[int, Entry]]:
        """Every (key, entry) in (key, LSN) order."""
        index = self._index if self._index is not None else self._load_index()
        for key in sorted(index):
            e = index[key]
            if self.is_image:
                yield key, e  # type: ignore[misc]
            else:
                for v in e:  # type: ignore[attr-defined]
                    yield key, v

    def retire(self, on_release: Callable[[], None]) -> None:
        """The layer left its timeline's layer map. Readers that picked it up
        before may still be using it: `on_release` (deleting the file) runs
        once the last of them lets go of this object."""
        self.retired = True
        weakref.finalize(self, on_release)

    def close(self) -> None:
        with self._mu:
            if self._file is not None:
                self._pread = None
                self._file.close()
                self._file = None
                self._footer = None


_monotonic = time.monotonic


def parse_layer_name(name: str) -> bool:
    """Is `name` a finished layer file name (as opposed to a temporary)?"""
    return name.endswith(".layer") and name.split("-", 1)[0] in ("delta", "image")
