"""The commit log: an fsynced, checksummed, append-only log of every change.

Every change to a store is first a record here: commits (page and metadata
puts and deletes) and edits (timeline created or dropped, layers added or
removed, horizons moved). Each record takes the next LSN of the store, so the
LSNs in the log are consecutive and a missing record is detectable. A durable
commit returns once its record is fsynced; concurrent durable commits share
fsyncs (group commit: one thread syncs for everyone waiting).

The log is a directory of segments named by the first LSN they may hold,
`log/<LSN as 16 hex digits>.log`. A segment is fsynced before the next one is
started, so only the last segment can end in a torn write.

Segment file::

    0        8       10       12       16             24            32
    +--------+--------+--------+--------+--------------+-------------+
    | magic  |version |  zero  |  zero  | first LSN    | header xxh64|
    |"STRATLOG" u16   |  u16   |  u32   | u64          | of 0..24    |
    +--------+--------+--------+--------+--------------+-------------+
    | record | record | ...                                           |

Record (64-byte header, then the payload)::

    0       4    5       8        12      16      24        32           48            56            64
    +-------+----+-------+--------+-------+-------+---------+------------+-------------+-------------+
    | magic |type| zero  | length | zero  | LSN   | time µs | timeline id| payload     | header xxh64|
    | u32   | u8 | 3 B   | u32    | u32   | u64   | u64     | 16 B       | xxh3_64 u64 | of 0..56    |
    +-------+----+-------+--------+-------+-------+---------+------------+-------------+-------------+
    | payload: `length` bytes                                                                        |

Commit payload: u32 entry count, then per entry `key u64, flags u8, raw_len
u32, stored_len u32, value xxh3_64 u64` followed by the stored bytes (see
`engine.values`). Edit payloads belong to `engine.manifest`.

Recovery reads the segments in order. A record that fails a check with no
valid record after it is a torn tail: it is cut off (the file is truncated)
and never applied. A bad record followed by a valid one is corruption: if its
header is intact, the timeline it names is marked damaged and the rest of the
store recovers; otherwise opening fails with a CorruptionError naming the
file and offset.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from .checksums import check_header, seal, xxh3, xxh64
from .errors import CorruptionError, StoreFailedError
from .fs import FileSystem, WriteFile, ensure_dir
from .values import KNOWN_FLAGS, MAX_VALUE_SIZE, Version

SEGMENT_MAGIC = b"STRATLOG"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sHHIQQ")
assert SEGMENT_HEADER.size == 32

RECORD_MAGIC = 0x4C525453  # b"STRL" read little-endian
RECORD_HEADER = struct.Struct("<IB3xIIQQ16sQQ")
assert RECORD_HEADER.size == 64
_RECORD_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)

COMMIT_ENTRY = struct.Struct("<QBIIQ")
assert COMMIT_ENTRY.size == 25
_COUNT = struct.Struct("<I")

REC_COMMIT = 1
REC_EDIT = 2
_KNOWN_TYPES = (REC_COMMIT, REC_EDIT)
MAX_PAYLOAD = 1 << 31

NO_TIMELINE = bytes(16)



def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:016x}.log"


def parse_segment_name(name: str) -> int | None:
    if len(name) == 20 and name.endswith(".log"):
        try:
            return int(name[:16], 16)
        except ValueError:
            return None
    return None


class Record(NamedTuple):
    type: int
    lsn: int
    time_us: int
    timeline: bytes
    payload: bytes
    path: str
    offset: int


# --- commit payloads ---------------------------------------------------------


def encode_commit(versions: list[Version]) -> bytes:
    parts = [_COUNT.pack(len(versions))]
    pack = COMMIT_ENTRY.pack
    for v in versions:
        parts.append(pack(v.key, v.flags, v.raw_len, len(v.stored), v.checksum))
        parts.append(v.stored)
    return b"".join(parts)


def decode_commit(payload: bytes, path: str, offset: int) -> list[Version]:
    """Decode a commit payload whose record checksum has already matched."""
    view = memoryview(payload)
    if len(view) < 4:
        raise CorruptionError(path, offset, "commit payload too short")
    (count,) = _COUNT.unpack_from(view, 0)
    pos = 4
    out = []
    for _ in range(count):
        if pos + COMMIT_ENTRY.size > len(view):
            raise CorruptionError(path, offset + pos, "commit entry runs past its record")
        key, flags, raw_len, slen, csum = COMMIT_ENTRY.unpack_from(view, pos)
        pos += COMMIT_ENTRY.size
        if flags & ~KNOWN_FLAGS or raw_len > MAX_VALUE_SIZE or pos + slen > len(view):
            raise CorruptionError(path, offset + pos, "malformed commit entry")
        out.append(Version(key, flags, raw_len, bytes(view[pos : pos + slen]), csum))
        pos += slen
    if pos != len(view):
        raise CorruptionError(path, offset + pos, "trailing bytes after commit entries")
    return out


def _pack_header(rtype: int, length: int, lsn: int, time_us: int, timeline: bytes, psum: int) -> bytes:
    return seal(RECORD_HEADER.pack(RECORD_MAGIC, rtype, length, 0, lsn, time_us, timeline, psum, 0))


# --- reading -----------------------------------------------------------------


@dataclass
class SegmentScan:
    """What recovery found in one segment."""

    path: str
    first_lsn: int
    records: list[Record]
    end: int  # offset after the last good record
    size: int  # file size
    damaged: list[tuple[bytes, int, str]] = field(default_factory=list)  # (timeline, offset, why)
    first_record: int | None = None  # LSN of the first record (damaged ones too)
    last_record: int | None = None

    @property
    def torn(self) -> bool:
        return self.end < self.size


def _check_header(buf: bytes, pos: int) -> tuple[int, int, int, int, bytes, int] | None:
    """Parse and verify the record header at `pos`; None if it is not one."""
    if pos + RECORD_HEADER.size > len(buf):
        return None
    magic, rtype, length, _, lsn, time_us, tl, psum, hsum = RECORD_HEADER.unpack_from(buf, pos)
    if magic != RECORD_MAGIC or xxh64(buf[pos : pos + 56]) != hsum:
        return None
    if rtype not in _KNOWN_TYPES or length > MAX_PAYLOAD:
        return None
    return rtype, length, lsn, time_us, tl, psum


def _valid_record_at(buf: bytes, pos: int) -> int | None:
    """The LSN of a fully valid record at `pos`, else None."""
    h = _check_header(buf, pos)
    if h is None:
        return None
    rtype, length, lsn, _, _, psum = h
    start = pos + RECORD_HEADER.size
    if start + length > len(buf) or xxh3(buf[start : start + length]) != psum:
        return None
    return lsn


def _valid_record_after(buf: bytes, pos: int) -> bool:
    """Is there any valid record starting after `pos`? (Tells corruption from
    a torn tail: a torn write is the last thing in the log.)"""
    at = buf.find(_RECORD_MAGIC_BYTES, pos + 1)
    while at >= 0:
        if _valid_record_at(buf, at) is not None:
            return True
        at = buf.find(_RECORD_MAGIC_BYTES, at + 1)
    return False


def scan_segment(fs: FileSystem, path: str, last: bool) -> SegmentScan:
    """Read one segment. `last`: it is the newest segment (may be torn)."""
    buf = fs.read_file(path)
    name_lsn = parse_segment_name(os.path.basename(path))
    if len(buf) < SEGMENT_HEADER.size:
        if last:  # created, then crashed before its header was synced
            return SegmentScan(path, name_lsn or 0, [], 0, len(buf))
        raise CorruptionError(path, 0, "log segment shorter than its header", SEGMENT_HEADER.size, len(buf))
    check_header(path, buf[: SEGMENT_HEADER.size], SEGMENT_MAGIC, SEGMENT_VERSION, "log segment")
    first_lsn = SEGMENT_HEADER.unpack_from(buf, 0)[4]
    if name_lsn is not None and first_lsn != name_lsn:
        raise CorruptionError(path, 16, "segment header does not match its name", name_lsn, first_lsn)
    scan = SegmentScan(path, first_lsn, [], SEGMENT_HEADER.size, len(buf))
    pos = SEGMENT_HEADER.size
    expect = None
    while pos < len(buf):
        h = _check_header(buf, pos)
        if h is None:
            if _valid_record_after(buf, pos):
                raise CorruptionError(path, pos, "damaged log record header with valid records after it")
            break  # torn tail
        rtype, length, lsn, time_us, tl, psum = h
        start = pos + RECORD_HEADER.size
        payload = buf[start : start + length]
        if len(payload) < length or xxh3(payload) != psum:
            if not _valid_record_after(buf, pos):
                break  # torn tail
            # Durable data damaged in place: the header says whose it was.
            why = "log record payload checksum mismatch"
            scan.damaged.append((tl, pos, why))
        elif expect is not None and lsn != expect:
            raise CorruptionError(path, pos, "log records out of sequence", expect, lsn)
        else:
            scan.records.append(Record(rtype, lsn, time_us, tl, payload, path, pos))
        if scan.first_record is None:
            scan.first_record = lsn
        scan.last_record = lsn
        expect = lsn + 1
        pos = start + length
        scan.end = pos
    if scan.end < len(buf) and not last:
        raise CorruptionError(path, scan.end, "damaged record at the end of a synced log segment")
    return scan


def list_segments(fs: FileSystem, log_dir: str) -> list[tuple[int, str]]:
    out = []
    for name in fs.listdir(log_dir):
        lsn = parse_segment_name(name)
        if lsn is not None:
            out.append((lsn, os.path.join(log_dir, name)))
    return sorted(out)


# --- writing -----------------------------------------------------------------


class CommitLog:
    """Appends records, assigns LSNs, and syncs them with group commit.

    Thread-safe. `append` assigns the next LSN and writes the record to the OS
    (so it survives a crash of this process); `sync(pos)` returns once
    everything up to `pos` is fsynced. Any write or fsync failure poisons the
    log: every later call raises StoreFailedError (fail closed).
    """

    def __init__(
        self,
        fs: FileSystem,
        log_dir: str,
        *,
        last_lsn: int,
        last_time_us: int,
        segment_bytes: int,
        store_path: str,
    ) -> None:
        self._fs = fs
        self._dir = log_dir
        self._store_path = store_path
        self._segment_bytes = segment_bytes
        self._mu = threading.Lock()
        self._synced_cv = threading.Condition(self._mu)
        self._last_lsn = last_lsn
        self._last_time_us = last_time_us
        self._written = 0  # bytes written since open (all segments)
        self._synced = 0
        self._syncing = False
        self._failed: BaseException | None = None
        self._closed = False
        # first LSN of each live segment -> {timeline: highest commit LSN in it}
        self.pins: dict[int, dict[bytes, int]] = {}
        self._file: WriteFile | None = None
        self._segment_first = 0
        self._segment_size = 0
        ensure_dir(fs, log_dir)
        with self._mu:
            self._start_segment()

    @property
    def last_lsn(self) -> int:
        return self._last_lsn

    @property
    def last_time_us(self) -> int:
        return self._last_time_us

    @property
    def current_segment(self) -> int:
        return self._segment_first

    def _fail(self, exc: BaseException) -> StoreFailedError:
        if self._failed is None:
            self._failed = exc
        return StoreFailedError(self._store_path, self._failed)

    def _check(self) -> None:
        if self._failed is not None:
            raise StoreFailedError(self._store_path, self._failed)

    def _start_segment(self) -> None:
        """Start a new segment (caller holds the lock and has synced the old)."""
        first = self._last_lsn + 1
        path = os.path.join(self._dir, segment_name(first))
        try:
            f = self._fs.open_write(path)
            head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, 0, first, 0)
            f.write(seal(head))
            f.sync()
            f.close()
            self._fs.sync_dir(self._dir)
            self._file = self._fs.open_append(path)
        except OSError as e:
            raise self._fail(e) from e
        self._segment_first = first
        self._segment_size = SEGMENT_HEADER.size
        self.pins[first] = {}

    def append(
        self, rtype: int, timeline: bytes, payload: bytes, clock_us: int
    ) -> tuple[int, int, int]:
        """Write one record. Returns (lsn, time_us, position to sync to)."""
        psum = xxh3(payload)
        with self._mu:
            self._check()
            if self._segment_size >= self._segment_bytes:
                self._rotate_locked()
            lsn = self._last_lsn + 1
            time_us = clock_us if clock_us > self._last_time_us else self._last_time_us
            head = _pack_header(rtype, len(payload), lsn, time_us, timeline, psum)
            assert self._file is not None
            try:
                self._file.write(head + payload)
            except OSError as e:
                raise self._fail(e) from e
            self._last_lsn = lsn
            self._last_time_us = time_us
            n = RECORD_HEADER.size + len(payload)
            self._written += n
            self._segment_size += n
            if rtype == REC_COMMIT:
                self.pins[self._segment_first][timeline] = lsn
            return lsn, time_us, self._written

    def sync(self, pos: int | None = None) -> None:
        """Return once everything written up to `pos` (default: all) is on disk."""
        with self._mu:
            target = self._written if pos is None else pos
            while self._synced < target:
                self._check()
                if self._syncing:
                    self._synced_cv.wait()
                    continue
                self._syncing = True
                upto = self._written
                f = self._file
                self._mu.release()
                err: BaseException | None = None
                try:
                    assert f is not None
                    f.sync()
                except OSError as e:
                    err = e
                finally:
                    self._mu.acquire()
                    self._syncing = False
                    self._synced_cv.notify_all()
                if err is not None:
                    raise self._fail(err) from err
                if upto > self._synced:
                    self._synced = upto
            self._check()

    def rotate(self) -> int:
        """Seal the current segment and start a new one; returns its first LSN."""
        with self._mu:
            self._check()
            self._rotate_locked()
            return self._segment_first

    def _rotate_locked(self) -> None:
        while self._syncing:
            self._synced_cv.wait()
        assert self._file is not None
        try:
            self._file.sync()
            self._file.close()
        except OSError as e:
            raise self._fail(e) from e
        self._synced = self._written
        self._start_segment()

    def drop_segments_before(self, first_lsn: int) -> int:
        """Delete every segment older than the one starting at `first_lsn`."""
        removed = 0
        with self._mu:
            old = [s for s in self.pins if s < first_lsn]
            for s in old:
                del self.pins[s]
        for s, path in list_segments(self._fs, self._dir):
            if s < first_lsn:
                try:
                    self._fs.remove(path)
                except FileNotFoundError:
                    pass
                removed += 1
        return removed

    def segment_bytes_total(self) -> int:
        return sum(size for _, size in self.segment_sizes())

    def segment_sizes(self) -> Iterator[tuple[int, int]]:
        for s, path in list_segments(self._fs, self._dir):
            try:
                yield s, self._fs.file_size(path)
            except FileNotFoundError:
                continue

    def close(self) -> None:
        with self._mu:
            if self._closed:
                return
            self._closed = True
            if self._file is not None and self._failed is None:
                try:
                    self._file.sync()
                except OSError as e:
                    raise self._fail(e) from e
                finally:
                    self._file.close()
