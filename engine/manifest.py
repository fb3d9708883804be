"""The manifest: which timelines exist and which layer files each one owns.

The manifest is the commit log's edits (timeline created, dropped, layers
added or removed, horizon moved, detached) applied on top of the last
*snapshot*, a file written write-temp, fsync, rename, fsync-directory at each
checkpoint. The snapshot names the last edit it includes (`applied_lsn`) and
the oldest log segment that may hold commits not yet in a layer file
(`replay_from`). Opening a store reads the snapshot and replays the log from
there; layer files that no timeline lists are then removed.

Each timeline's entry is a block with its own checksum, found through a table,
so a damaged entry breaks only that timeline, and entries are decoded only
when their timeline is first used (opening 10,000 timelines reads the table).

Snapshot file `manifest`::

    0        8         10     12     16            24             32            40             48           56            64
    +--------+---------+------+------+-------------+--------------+-------------+--------------+------------+-------------+
    | magic  | version | zero | zero | applied LSN | last time µs | replay_from | n timelines  | table      | header      |
    |"STRATMAN"  u16   | u16  | u32  | u64         | u64          | u64 (LSN)   | u64          | xxh3_64    | xxh64       |
    +--------+---------+------+------+-------------+--------------+-------------+--------------+------------+-------------+
    | table: n x 56 bytes: timeline id 16s | ancestor id 16s (zeros: none) |                                           |
    |        block offset u64 | block length u32 | block xxh3_64 u64 | flags u32 (1: out of service)                  |
    +------------------------------------------------------------------------------------------------------------------+
    | blocks: per timeline, TIMELINE (108 bytes), n_layers x LAYER (70 bytes), then a note of note_len bytes          |
    +------------------------------------------------------------------------------------------------------------------+

TIMELINE: id 16s | ancestor 16s | ancestor_lsn u64 | start_lsn u64 | head_lsn u64 |
disk_consistent_lsn u64 | horizon u64 | created µs u64 | retention period µs u64 |
retention LSN distance u64 | flags u32 (4: the timeline has its own retention,
1: with a period, 2: with an LSN distance) | n_layers u32 | note_len u32

The note (UTF-8) says why a timeline was taken out of service; a damaged
timeline keeps its entry (and its files) until it is deleted, so the damage
outlives checkpoints. A block that fails its checksum is carried over with
its original checksum, so it keeps failing.

LAYER: kind u8 | complete u8 | key_first u64 | key_last u64 | lsn_start u64 |
lsn_end u64 | file_size u64 | entries u64 | time_min µs u64 | time_max µs u64 | gen u32

Edit payloads (the log record names the timeline): an op byte, then
  OP_CREATE  TIMELINE with n_layers = 0
  OP_DROP    nothing
  OP_LAYERS  flags u32 (1: detach from ancestor) | disk_consistent_lsn u64 |
             head u64 (newest commit now in a layer) | n_added u32 |
             n_removed u32 | LAYER x (n_added + n_removed)
  OP_HORIZON horizon u64
  OP_RETAIN  flags u32 | period µs u64 | LSN distance u64
Edits are applied in log order and skipped if at or below `applied_lsn`.
Op numbers are never reused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .checksums import check_header, seal, xxh3
from .config import Retention
from .errors import CorruptionError
from .layer_file import KIND_NAMES, LayerDesc

MAGIC = b"STRATMAN"
VERSION = 1

HEADER = struct.Struct("<8sHHIQQQQQQ")
assert HEADER.size == 64
TABLE_ENTRY = struct.Struct("<16s16sQIQI")
assert TABLE_ENTRY.size == 56
TIMELINE = struct.Struct("<16s16sQQQQQQQQIII")
assert TIMELINE.size == 108
LAYER = struct.Struct("<BBQQQQQQQQI")
assert LAYER.size == 70
LAYERS_EDIT = struct.Struct("<IQQII")
HORIZON_EDIT = struct.Struct("<Q")
RETAIN_EDIT = struct.Struct("<IQQ")

OP_CREATE = 1
OP_DROP = 2
OP_LAYERS = 3
OP_HORIZON = 4
OP_RETAIN = 5

RET_PERIOD = 1
RET_DISTANCE = 2
RET_OWN = 4
LAYERS_DETACH = 1
TABLE_DAMAGED = 1  # table entry flag: the timeline is out of service
MAX_NOTE = 1024

NO_ID = bytes(16)



@dataclass
class TimelineMeta:
    id: bytes
    ancestor: bytes | None
    ancestor_lsn: int
    start_lsn: int
    head_lsn: int
    disk_consistent_lsn: int
    horizon: int
    created_us: int
    retention: Retention | None = None  # None: the store's default
    layers: dict[str, LayerDesc] = field(default_factory=dict)
    damage: str | None = None  # why the timeline is out of service, if it is

    def copy(self) -> TimelineMeta:
        return replace(self, layers=dict(self.layers))


# --- codecs ------------------------------------------------------------------


def encode_layer(d: LayerDesc) -> bytes:
    return LAYER.pack(
        d.kind, int(d.complete), d.key_first, d.key_last, d.lsn_start, d.lsn_end,
        d.file_size, d.entries, d.time_min_us, d.time_max_us, d.gen,
    )


def decode_layer(buf: bytes | memoryview, pos: int, where: str) -> LayerDesc:
    kind, complete, kf, kl, l0, l1, size, n, t0, t1, gen = LAYER.unpack_from(buf, pos)
    if kind not in KIND_NAMES or complete > 1 or kf > kl or l1 <= l0:
        raise CorruptionError(where, pos, "malformed layer descriptor")
    return LayerDesc(kind, bool(complete), kf, kl, l0, l1, size, n, t0, t1, gen)


def _retention_fields(r: Retention | None) -> tuple[int, int, int]:
    if r is None:
        return 0, 0, 0
    flags = RET_OWN | (RET_PERIOD if r.period is not None else 0)
    flags |= RET_DISTANCE if r.lsn_distance is not None else 0
    period = int(r.period * 1_000_000) if r.period is not None else 0
    return flags, period, r.lsn_distance or 0


def _retention_from(flags: int, period_us: int, dist: int) -> Retention | None:
    if not flags & RET_OWN:
        return None
    return Retention(
        period=period_us / 1_000_000 if flags & RET_PERIOD else None,
        lsn_distance=dist if flags & RET_DISTANCE else None,
    )


def encode_timeline(m: TimelineMeta) -> bytes:
    flags, period, dist = _retention_fields(m.retention)
    note = (m.damage or "").encode()[:MAX_NOTE]
    parts = [
        TIMELINE.pack(
            m.id, m.ancestor or NO_ID, m.ancestor_lsn, m.start_lsn, m.head_lsn,
            m.disk_consistent_lsn, m.horizon, m.created_us, period, dist, flags, len(m.layers),
            len(note),
        )
    ]
    parts.extend(encode_layer(d) for d in sorted(m.layers.values(), key=lambda d: d.name))
    parts.append(note)
    return b"".join(parts)


def decode_timeline(buf: bytes | memoryview, pos: int, length: int, where: str) -> TimelineMeta:
    if length < TIMELINE.size:
        raise CorruptionError(where, pos, "timeline entry too short")
    (tid, anc, anc_lsn, start, head, dcl, horizon, created, period, dist, flags, n, note_len) = (
        TIMELINE.unpack_from(buf, pos)
    )
    if length != TIMELINE.size + n * LAYER.size + note_len:
        raise CorruptionError(where, pos, "timeline entry length does not match its layer count")
    meta = TimelineMeta(
        id=tid,
        ancestor=None if anc == NO_ID else anc,
        ancestor_lsn=anc_lsn,
        start_lsn=start,
        head_lsn=head,
        disk_consistent_lsn=dcl,
        horizon=horizon,
        created_us=created,
        retention=_retention_from(flags, period, dist),
    )
    p = pos + TIMELINE.size
    for _ in range(n):
        d = decode_layer(buf, p, where)
        meta.layers[d.name] = d
        p += LAYER.size
    if note_len:
        meta.damage = bytes(buf[p : p + note_len]).decode(errors="replace")
    return meta


# --- edits -------------------------------------------------------------------


def edit_create(m: TimelineMeta) -> bytes:
    return bytes([OP_CREATE]) + encode_timeline(replace(m, layers={}))


def edit_drop() -> bytes:
    return bytes([OP_DROP])


def edit_layers(
    added: list[LayerDesc], removed: list[LayerDesc], dcl: int = 0, head: int = 0, detach: bool = False
) -> bytes:
    fixed = LAYERS_EDIT.pack(LAYERS_DETACH if detach else 0, dcl, head, len(added), len(removed))
    return bytes([OP_LAYERS]) + fixed + b"".join(encode_layer(d) for d in added + removed)


def edit_horizon(horizon: int) -> bytes:
    return bytes([OP_HORIZON]) + HORIZON_EDIT.pack(horizon)


def edit_retention(r: Retention | None) -> bytes:
    return bytes([OP_RETAIN]) + RETAIN_EDIT.pack(*_retention_fields(r))


class Edit(NamedTuple):
    op: int
    meta: TimelineMeta | None = None
    added: tuple[LayerDesc, ...] = ()
    removed: tuple[LayerDesc, ...] = ()
    dcl: int = 0
    head: int = 0
    detach: bool = False
    horizon: int = 0
    retention: Retention | None = None


def decode_edit(payload: bytes, where: str, offset: int) -> Edit:
    """Decode an edit whose record checksum has already matched."""
    if not payload:
        raise CorruptionError(where, offset, "empty edit")
    op = payload[0]
    body = memoryview(payload)[1:]
    try:
        if op == OP_CREATE:
            return Edit(op, meta=decode_timeline(body, 0, len(body), where))
        if op == OP_DROP:
            return Edit(op)
        if op == OP_LAYERS:
            flags, dcl, head, na, nr = LAYERS_EDIT.unpack_from(body, 0)
            if len(body) != LAYERS_EDIT.size + (na + nr) * LAYER.size:
                raise CorruptionError(where, offset, "layer edit length does not match its counts")
            descs = [decode_layer(body, LAYERS_EDIT.size + i * LAYER.size, where) for i in range(na + nr)]
            return Edit(op, added=tuple(descs[:na]), removed=tuple(descs[na:]), dcl=dcl,
                        head=head, detach=bool(flags & LAYERS_DETACH))
        if op == OP_HORIZON:
            (h,) = HORIZON_EDIT.unpack(body)
            return Edit(op, horizon=h)
        if op == OP_RETAIN:
            return Edit(op, retention=_retention_from(*RETAIN_EDIT.unpack(body)))
    except struct.error as e:
        raise CorruptionError(where, offset, f"malformed edit (op {op}): {e}") from None
    raise CorruptionError(where, offset, f"unknown edit op {op}")


def apply_edit(meta: TimelineMeta, e: Edit) -> None:
    """Apply a layers/horizon/retention edit to a timeline's metadata."""
    if e.op == OP_LAYERS:
        for d in e.removed:
            meta.layers.pop(d.name, None)
        for d in e.added:
            meta.layers[d.name] = d
        meta.disk_consistent_lsn = max(meta.disk_consistent_lsn, e.dcl)
        meta.head_lsn = max(meta.head_lsn, e.head)
        if e.detach:
            meta.ancestor = None
    elif e.op == OP_HORIZON:
        meta.horizon = max(meta.horizon, e.horizon)
    elif e.op == OP_RETAIN:
        meta.retention = e.retention


# --- snapshots ---------------------------------------------------------------


@dataclass
class Snapshot:
    """A decoded snapshot header and table; blocks are decoded on demand."""

    path: str
    applied_lsn: int
    last_time_us: int
    replay_from: int
    buf: bytes
    table: dict[bytes, tuple[bytes | None, int, int, int]]  # id -> (ancestor, off, len, xxh)
    damaged: set[bytes] = field(default_factory=set)  # entries flagged TABLE_DAMAGED

    def load(self, tid: bytes) -> TimelineMeta:
        _, off, length, csum = self.table[tid]
        block = self.buf[off : off + length]
        if len(block) != length or xxh3(block) != csum:
            raise CorruptionError(self.path, off, f"manifest entry of timeline {tid.hex()} is damaged",
                                  csum, xxh3(block))
        meta = decode_timeline(block, 0, length, self.path)
        if meta.id != tid:
            raise CorruptionError(self.path, off, "manifest entry names another timeline", tid.hex(), meta.id.hex())
        return meta


class SnapshotEntry(NamedTuple):
    id: bytes
    ancestor: bytes | None
    block: bytes  # an encoded timeline
    damaged: bool = False
    checksum: int | None = None  # keep this one (a damaged block keeps failing)


def encode_snapshot(
    applied_lsn: int, last_time_us: int, replay_from: int, timelines: list[SnapshotEntry]
) -> list[bytes]:
    table = bytearray()
    off = HEADER.size + len(timelines) * TABLE_ENTRY.size
    for tid, anc, block, damaged, csum in timelines:
        csum = xxh3(block) if csum is None else csum
        table += TABLE_ENTRY.pack(tid, anc or NO_ID, off, len(block), csum, TABLE_DAMAGED if damaged else 0)
        off += len(block)
    head = HEADER.pack(MAGIC, VERSION, 0, 0, applied_lsn, last_time_us, replay_from,
                       len(timelines), xxh3(bytes(table)), 0)
    head = seal(head)
    return [head, bytes(table)] + [e.block for e in timelines]


def decode_snapshot(path: str, buf: bytes) -> Snapshot:
    if len(buf) < HEADER.size:
        raise CorruptionError(path, 0, "manifest shorter than its header", HEADER.size, len(buf))
    check_header(path, buf[: HEADER.size], MAGIC, VERSION, "manifest")
    _, _, _, _, applied, last_us, replay_from, n, tsum, _ = HEADER.unpack_from(buf, 0)
    tend = HEADER.size + n * TABLE_ENTRY.size
    raw = buf[HEADER.size : tend]
    if len(raw) != n * TABLE_ENTRY.size or xxh3(raw) != tsum:
        raise CorruptionError(path, HEADER.size, "manifest table damaged", tsum, xxh3(raw))
    table: dict[bytes, tuple[bytes | None, int, int, int]] = {}
    damaged = set()
    for i, (tid, anc, off, length, csum, flags) in enumerate(TABLE_ENTRY.iter_unpack(raw)):
        if off < tend or off + length > len(buf):
            raise CorruptionError(path, HEADER.size + i * TABLE_ENTRY.size, "manifest table entry out of bounds")
        table[tid] = (None if anc == NO_ID else anc, off, length, csum)
        if flags & TABLE_DAMAGED:
            damaged.add(tid)
    return Snapshot(path, applied, last_us, replay_from, buf, table, damaged)
