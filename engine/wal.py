"""The commit log: an fsynced, checksummed, append-only log of every change.

Every change to a store is first a record here: commits (page and metadata
puts and deletes) and edits (timeline created or dropped, layers added or
removed, horizons moved). Each record takes the next LSN of the store, so the
LSNs in the log are consecutive and a missing record is detectable. A durable
commit returns once its record is fsynced; concurrent durable commits share
fsyncs (group commit: one thread syncs for everyone waiting).

The log is a directory of segments named by the first LSN they may hold,
`log/<LSN as 16 hex digits>.log`. A segment is fsynced before the next one is
started, so only the last segment can end in a torn write. Records are
written in place into space zero-filled a megabyte ahead: an fdatasync then
flushes data blocks only, not the file's size and extents (as PostgreSQL
zero-fills its WAL segments). Zeros after the last record end a segment.

Segment file::

    0        8       10       12       16             24            32
    +--------+--------+--------+--------+--------------+-------------+
    | magic  |version |  zero  |  zero  | first LSN    | header xxh64|
    |"STRATLOG" u16   |  u16   |  u32   | u64          | of 0..24    |
    +--------+--------+--------+--------+--------------+-------------+
    | record | record | ...                                           |

Record (72-byte header, then the payload)::

    0       4    5      8        12     16      24          32        40           56          64          72
    +-------+----+------+--------+------+-------+-----------+---------+------------+-----------+-----------+
    | magic |type| zero | length | zero | LSN   | synced    | time µs | timeline id| payload   | header    |
    | u32   | u8 | 3 B  | u32    | u32  | u64   | LSN u64   | u64     | 16 B       | xxh3_64   | xxh64     |
    +-------+----+------+--------+------+-------+-----------+---------+------------+-----------+-----------+
    | payload: `length` bytes                                                                             |

`synced LSN` is the highest LSN known to be fsynced when the record was
written: a witness, for recovery, of how far the log was durable.

Commit payload: u32 entry count, then per entry `key u64, flags u8, raw_len
u32, stored_len u32, value xxh3_64 u64` followed by the stored bytes (see
`engine.values`). Edit payloads belong to `engine.manifest`.

Recovery reads the segments in order and stops at the first record that
fails a check (expected LSN E). In the last segment that is a *torn tail*
(a write that never completed, possibly with later pages written out of
order) unless a valid later record's `synced LSN` is at least E, proving
that E had been fsynced: then, and always in an earlier (sealed) segment, it
is damage. A torn tail is cut off and never applied. Damage to a record
whose header is intact marks the timeline it names damaged and recovery goes
on; damage to a header fails the open with a CorruptionError naming the file
and offset. A flipped bit in the very last fsynced records, with nothing
after them, looks like a torn tail and is cut: no log can tell those apart.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from . import failpoints
from .checksums import check_header, seal, sealed_ok, xxh3
from .errors import CorruptionError, StoreFailedError
from .fs import FileSystem, RWFile, ensure_dir
from .values import KNOWN_FLAGS, MAX_VALUE_SIZE, Version

SEGMENT_MAGIC = b"STRATLOG"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sHHIQQ")
assert SEGMENT_HEADER.size == 32

RECORD_MAGIC = 0x4C525453  # b"STRL" read little-endian
RECORD_HEADER = struct.Struct("<IB3xIIQQQ16sQQ")
assert RECORD_HEADER.size == 72
_RECORD_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)

COMMIT_ENTRY = struct.Struct("<QBIIQ")
assert COMMIT_ENTRY.size == 25
_COUNT = struct.Struct("<I")

REC_COMMIT = 1
REC_EDIT = 2
_KNOWN_TYPES = (REC_COMMIT, REC_EDIT)
MAX_PAYLOAD = 1 << 31

NO_TIMELINE = bytes(16)
ZERO_CHUNK = 1 << 20  # how far ahead of the records a segment is zero-filled



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


def _pack_header(
    rtype: int, length: int, lsn: int, synced: int, time_us: int, timeline: bytes, psum: int
) -> bytes:
    return seal(RECORD_HEADER.pack(RECORD_MAGIC, rtype, length, 0, lsn, synced, time_us, timeline, psum, 0))


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
    zero_tail: bool = False  # ends in zero-filled space, as every live segment does

    @property
    def torn(self) -> bool:
        return self.end < self.size and not self.zero_tail


class _Header(NamedTuple):
    rtype: int
    length: int
    lsn: int
    synced: int
    time_us: int
    timeline: bytes
    psum: int


def _header_at(buf: bytes, pos: int) -> _Header | None:
    """The record header at `pos` if it is one (magic, checksum, fields)."""
    if pos + RECORD_HEADER.size > len(buf):
        return None
    magic, rtype, length, _, lsn, synced, time_us, tl, psum, _ = RECORD_HEADER.unpack_from(buf, pos)
    if magic != RECORD_MAGIC or not sealed_ok(buf[pos : pos + RECORD_HEADER.size]):
        return None
    if rtype not in _KNOWN_TYPES or length > MAX_PAYLOAD:
        return None
    return _Header(rtype, length, lsn, synced, time_us, tl, psum)


def _payload_ok(buf: bytes, pos: int, h: _Header) -> bool:
    start = pos + RECORD_HEADER.size
    return start + h.length <= len(buf) and xxh3(buf[start : start + h.length]) == h.psum


def _durable_witness(buf: bytes, pos: int, lsn: int) -> bool:
    """Does a valid record after offset `pos` prove that the record with LSN
    `lsn` (which failed its check at `pos`) had been fsynced? Its synced-LSN
    watermark must reach `lsn`, and it must be a record that can follow in
    this log: a later LSN, no further ahead than the bytes in between allow.
    (A record that a torn write's payload happens to contain is neither.)"""
    at = buf.find(_RECORD_MAGIC_BYTES, pos + 1)
    while at >= 0:
        h = _header_at(buf, at)
        if (
            h is not None
            and lsn < h.lsn <= lsn + (at - pos) // RECORD_HEADER.size
            and lsn <= h.synced < h.lsn
            and _payload_ok(buf, at, h)
        ):
            return True
        at = buf.find(_RECORD_MAGIC_BYTES, at + 1)
    return False


def _torn_segment(buf: bytes) -> bool:
    """A new last segment whose header never reached the disk: it holds no
    valid record at all."""
    return buf.find(_RECORD_MAGIC_BYTES) < 0 or not any(
        (h := _header_at(buf, at)) is not None and _payload_ok(buf, at, h)
        for at in _all(buf, _RECORD_MAGIC_BYTES)
    )


def _all(buf: bytes, needle: bytes) -> Iterator[int]:
    at = buf.find(needle)
    while at >= 0:
        yield at
        at = buf.find(needle, at + 1)


def scan_segment(fs: FileSystem, path: str, last: bool) -> SegmentScan:
    """Read one segment. `last`: it is the newest segment (may end torn)."""
    buf = fs.read_file(path)
    name_lsn = parse_segment_name(os.path.basename(path)) or 0
    head = buf[: SEGMENT_HEADER.size]
    try:
        if len(head) < SEGMENT_HEADER.size:
            raise CorruptionError(path, 0, "log segment shorter than its header", SEGMENT_HEADER.size, len(buf))
        check_header(path, head, SEGMENT_MAGIC, SEGMENT_VERSION, "log segment")
    except CorruptionError:
        if last and _torn_segment(buf):
            return SegmentScan(path, name_lsn, [], 0, len(buf))
        raise
    first_lsn = SEGMENT_HEADER.unpack_from(buf, 0)[4]
    if first_lsn != name_lsn:
        raise CorruptionError(path, 16, "segment header does not match its name", name_lsn, first_lsn)
    scan = SegmentScan(path, first_lsn, [], SEGMENT_HEADER.size, len(buf))
    pos = SEGMENT_HEADER.size
    expect = first_lsn
    while pos < len(buf):
        h = _header_at(buf, pos)
        if h is None and buf.count(0, pos) == len(buf) - pos:
            scan.zero_tail = True  # the zero-filled space after the last record
            break
        if h is not None and h.lsn != expect:
            raise CorruptionError(path, pos, "log records out of sequence", expect, h.lsn)
        if h is not None and _payload_ok(buf, pos, h):
            scan.records.append(Record(
                h.rtype, h.lsn, h.time_us, h.timeline,
                buf[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + h.length], path, pos,
            ))
        else:
            # A record that fails a check: torn tail, or damage?
            if last and not _durable_witness(buf, pos, expect):
                break  # torn: cut here
            if h is None:
                raise CorruptionError(path, pos, "damaged log record header in the durable log")
            end = pos + RECORD_HEADER.size + h.length
            if end > len(buf):
                raise CorruptionError(path, pos, "log record cut short in the durable log")
            scan.damaged.append((h.timeline, pos, "log record payload checksum mismatch"))
        if scan.first_record is None:
            scan.first_record = expect
        scan.last_record = expect
        expect += 1
        pos += RECORD_HEADER.size + (h.length if h is not None else 0)
        scan.end = pos
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
        self._synced_lsn = last_lsn  # the recovered log was synced before we start
        self._syncing = False
        self._failed: BaseException | None = None
        self._closed = False
        # first LSN of each live segment -> {timeline: highest commit LSN in it}
        self.pins: dict[int, dict[bytes, int]] = {}
        self._file: RWFile | None = None
        self._zeroed = 0  # the segment is zero-filled up to here
        self._segment_first = 0
        self._segment_size = 0
        # first LSN of each segment this log started -> its _written at its
        # start (so a byte at offset o of it is at position base + o - header),
        # and of each it sealed -> the offset after its last record
        self.bases: dict[int, int] = {}
        self.ends: dict[int, int] = {}
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
            self._file = self._fs.open_rw(path)
        except OSError as e:
            raise self._fail(e) from e
        self._segment_first = first
        self._segment_size = SEGMENT_HEADER.size
        self._zeroed = SEGMENT_HEADER.size
        self.pins[first] = {}
        self.bases[first] = self._written

    def _zero_fill(self, upto: int) -> None:
        """Write zeros ahead of the records, a chunk at a time: an fdatasync
        of blocks already written need not touch the file's metadata, so it
        costs about half of one that grows the file."""
        assert self._file is not None
        end = max(upto, self._zeroed + ZERO_CHUNK)
        self._file.pwrite(bytes(end - self._zeroed), self._zeroed)
        self._zeroed = end

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
            head = _pack_header(rtype, len(payload), lsn, self._synced_lsn, time_us, timeline, psum)
            assert self._file is not None
            n = RECORD_HEADER.size + len(payload)
            try:
                failpoints.hit("wal-before-append")
                if self._segment_size + n > self._zeroed:
                    self._zero_fill(self._segment_size + n)
                self._file.pwrite(head + payload, self._segment_size)
                failpoints.hit("wal-after-append")
            except OSError as e:
                raise self._fail(e) from e
            self._last_lsn = lsn
            self._last_time_us = time_us
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
                upto_lsn = self._last_lsn
                f = self._file
                self._mu.release()
                err: BaseException | None = None
                try:
                    assert f is not None
                    failpoints.hit("wal-before-fsync")
                    f.sync()
                    failpoints.hit("wal-after-fsync")
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
                    self._synced_lsn = max(self._synced_lsn, upto_lsn)
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
            failpoints.hit("wal-before-rotate")
            self._file.sync()
            self._file.close()
        except OSError as e:
            raise self._fail(e) from e
        self._synced = self._written
        self._synced_lsn = self._last_lsn
        self.ends[self._segment_first] = self._segment_size
        self._start_segment()

    def durable_extents(self) -> tuple[list[tuple[int, int]], int]:
        """The segments this log started, each with the offset up to which it
        is fsynced ((first LSN, end) in log order), and the position that is."""
        with self._mu:
            out = [(f, e) for f, e in sorted(self.ends.items())]
            cur = self._segment_first
            synced_in_cur = SEGMENT_HEADER.size + max(0, self._synced - self.bases[cur])
            out.append((cur, min(synced_in_cur, self._segment_size)))
            return out, self._synced

    def position(self, first_lsn: int, offset: int) -> int:
        """The log position of an offset in a segment this log started."""
        return self.bases[first_lsn] + offset - SEGMENT_HEADER.size

    def drop_segments_before(self, first_lsn: int) -> int:
        """Delete every segment older than the one starting at `first_lsn`."""
        removed = 0
        with self._mu:
            old = [s for s in self.pins if s < first_lsn]
            for s in old:
                del self.pins[s]
            for s in [s for s in self.ends if s < first_lsn]:
                del self.ends[s]
                self.bases.pop(s, None)
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
            while self._syncing:  # let an fsync in flight finish first
                self._synced_cv.wait()
            self._closed = True
            if self._file is not None and self._failed is None:
                try:
                    self._file.sync()
                except OSError as e:
                    raise self._fail(e) from e
                finally:
                    self._file.close()
