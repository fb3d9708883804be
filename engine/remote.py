"""The remote tier: a store's durable home in an object store
(`engine.objectstore`), so that it survives the machine.

What goes up, and in which order:

1. The commit log, continuously (`ship_interval`, default 0.2 s): each
   fsynced byte range of a log segment becomes one *chunk*, under the next
   sequence number, written put-if-absent. A machine lost loses at most the
   commits not shipped yet (about `ship_interval` plus one upload).
2. At each checkpoint: every layer file the new manifest lists and the
   object store lacks, then an *index*: the manifest itself (every
   timeline's layers, ancestor and branch LSN, horizon, heads; checksummed
   per timeline) with the size and xxh3 of each layer file and the
   generation that uploaded it. An index goes up only after every layer it
   lists, and after the log up to the manifest's last record.
3. Once an index is up and the lease still ours (renewed with If-Match
   after the upload), what no later index can need is deleted: chunks of
   segments older than its `replay_from`, and layers the previous index
   listed and this one does not.

Fencing (two writers never both win):
- The *lease* names the generation that may write. Opening a store with a
  remote takes the next generation with a conditional write (If-None-Match
  for the first, If-Match of the ETag read for the next), renews it every
  third of `lease_s`, and gives it up on close. Taking it from a holder
  that did not give it up waits until it has stayed unchanged for
  `lease_s` (unless `force`: the operator knows the holder is gone); a
  holder that cannot renew for 0.8 x `lease_s` fences itself, so it stops
  taking writes before anyone can take over.
- The log is fenced by its sequence numbers: the taker writes a *fence*
  chunk at the next free number, so the old writer's next chunk, at that
  same number, is refused (put-if-absent), and it fences itself. Every
  chunk the taker did not read is one the old writer never saw accepted.
- The taker uploads an index of its own generation before it serves, so an
  index the old writer uploads later (of a lower generation) is never the
  latest. Layers carry their generation in their key, so a stale writer
  never overwrites one in use. Deletes come only after a renewal proved
  the lease ours with the index that allows them already up.
A fenced store refuses every write (StoreFailedError naming the fencing);
reads go on.

Keys (under the store's prefix)::

    strata-remote                      OBJECT kind 0: {"format": 1}, made once
    lease                              OBJECT kind 1: JSON holder, generation
    log/<seq: 16 hex>                  OBJECT kind 2: a chunk, or a fence
    index/<gen: 8 hex>-<applied LSN: 16 hex>   OBJECT kind 3
    layers/<timeline>/<layer name>.<gen: 8 hex>   a layer file, as on disk

OBJECT (every object but layers, which check themselves)::

    0        8        10       12           16              24            32            40
    +--------+--------+--------+------------+---------------+-------------+-------------+
    | magic  |version | kind   | generation | body length   | body xxh3   | header xxh64|
    |"STRATREM" u16   | u16    | u32        | u64           | u64         | of 0..32    |
    +--------+--------+--------+------------+---------------+-------------+-------------+
    | body                                                                               |

Chunk body: seq u64 | segment first LSN u64 | offset u64 | flags u32 (1:
fence) | zero u32, then the segment's bytes at [offset, offset + n).
Index body: applied LSN u64 | replay_from u64 | manifest length u64 |
n layers u64, the manifest (`engine.manifest`), then per layer: timeline
16s | generation u32 | size u64 | xxh3 u64 | name length u16 | name.

A store with a remote keeps `<store>/remote`, an OBJECT kind 4 whose JSON
body names the node (a random id) and the generation it last held: a home
whose generation was taken over by another node refuses to open (restore
into a new home instead).

Threads and locks: the shipper, the lease keeper and the uploader are
threads of their own. `Remote._mu` guards `_shipped` (segment -> offset
shipped), `_next_seq`, `_pending` (the newest checkpoint not uploaded),
`_uploaded` (layers known to be up: key, size, xxh3), `_confirmed` (what
the last index lists), `_chunk_heads`, `_fetching` (a lock per layer being
fetched, held across its download so that readers of it wait for one),
`_fenced`, the lease's ETag, and `_queued`, `_fetch_seq`, `_retry` and
`_failures` (layers waiting for the fetch thread's download, or for its
next try after a failed one); no object-store call is made
under it. A Layer's reader that holds a file reading it in ranges keeps
it only if no download reopened the layer meanwhile (`Layer._epoch`).
Lock order: a Layer's lock, then its fetch lock (a reader fetching the
file); the cache, holding a fetch lock, only tries a Layer's lock
(`Layer.try_evict`) and skips the layer if it is held. A download holds at
most FETCH_WINDOW parts in memory; the fetch thread's stops once closing,
without waiting for the GETs in flight (a reader's own fetch goes on).
`_renew_mu` keeps one renewal at a time (the lease keeper's, or the
uploader's before it deletes): two of one ETag, and the second would find
the first's and fence its own node. `_ship_mu` keeps one shipping pass at a time (the thread's, or a caller's
waiting for a checkpoint). The store calls in from a checkpoint (holding
its checkpoint lock, not `_mu`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import json
import logging
import os
import queue
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checksums import Xxh3, check_header, seal, xxh3
from .errors import CorruptionError, InvalidArgumentError, StoreClosedError, StrataError
from .fs import TMP_SUFFIX, OsFileSystem, ensure_dir, write_atomically
from .manifest import decode_snapshot
from .objectstore import (
    Listed,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    PreconditionFailedError,
    probe_conditional_writes,
)
from .wal import SEGMENT_HEADER, list_segments, scan_segment, segment_name

if TYPE_CHECKING:
    from .fs import ReadFile
    from .layer_file import Layer
    from .store import Store

log = logging.getLogger("strata.remote")

MAGIC = b"STRATREM"
VERSION = 1
OBJECT = struct.Struct("<8sHHIQQQ")
assert OBJECT.size == 40
KIND_MARKER, KIND_LEASE, KIND_CHUNK, KIND_INDEX, KIND_LOCAL = 0, 1, 2, 3, 4
CHUNK = struct.Struct("<QQQII")
INDEX = struct.Struct("<QQQQ")
LAYER_REF = struct.Struct("<16sIQQH")
FLAG_FENCE = 1
MARKER_KEY = "strata-remote"
LEASE_KEY = "lease"
LOCAL_STATE = "remote"
MAX_CHUNK = 8 * 1024 * 1024
FETCH_PART = 8 * 1024 * 1024  # a layer is fetched in ranged parts of this size
FETCH_RETRIES = 10  # a background download that failed this often is given up (the layer stays read in ranges)
FETCH_RETRY_S = 0.5  # ... tried again after this, doubled after each failure
FETCH_RETRY_MAX_S = 60.0
FETCH_WINDOW = 4  # parts of one layer fetched at once (at most this many parts in memory)
FETCH_WHOLE = 4 * 1024 * 1024  # a layer no bigger is fetched whole on its first read, not read in ranges
RESTORE_FETCHES = 16  # log chunks a restore fetches at once


class FencedError(StrataError):
    """Another node holds this store's generation now: this one may not write."""


class _Superseded(Exception):
    """An upload job names what is gone since: a newer checkpoint replaces it."""


class SupersededError(StrataError):
    """This home's generation was taken over by another node."""


# --- the object format ----------------------------------------------------------------


def frame(kind: int, generation: int, body: bytes) -> bytes:
    head = OBJECT.pack(MAGIC, VERSION, kind, generation, len(body), xxh3(body), 0)
    return seal(head) + body


def unframe(key: str, data: bytes, kind: int) -> tuple[int, bytes]:
    """(generation, body) of an object, checked; CorruptionError naming the key."""
    if len(data) < OBJECT.size:
        raise CorruptionError(key, 0, "remote object shorter than its header", OBJECT.size, len(data))
    check_header(key, data[: OBJECT.size], MAGIC, VERSION, "remote object")
    _, _, got_kind, gen, n, csum, _ = OBJECT.unpack_from(data, 0)
    if got_kind != kind:
        raise CorruptionError(key, 10, "remote object of another kind", kind, got_kind)
    body = data[OBJECT.size :]
    if len(body) != n or xxh3(body) != csum:
        raise CorruptionError(key, OBJECT.size, "remote object body damaged", csum, xxh3(body))
    return gen, body


def chunk_key(seq: int) -> str:
    return f"log/{seq:016x}"


def index_key(gen: int, applied: int) -> str:
    return f"index/{gen:08x}-{applied:016x}"


def layer_key(tid: bytes, name: str, gen: int) -> str:
    return f"layers/{tid.hex()}/{name}.{gen:08x}"


@dataclass(frozen=True)
class Chunk:
    seq: int
    generation: int
    segment: int
    offset: int
    fence: bool
    data: bytes


def encode_chunk(c: Chunk) -> bytes:
    body = CHUNK.pack(c.seq, c.segment, c.offset, FLAG_FENCE if c.fence else 0, 0) + c.data
    return frame(KIND_CHUNK, c.generation, body)


def chunk_head(key: str, head: bytes) -> tuple[int, int, bool]:
    """(generation, segment, fence) of a chunk, from its first bytes (the
    object header is checked; the body is not read)."""
    check_header(key, head[: OBJECT.size], MAGIC, VERSION, "remote object")
    _, _, kind, gen, _, _, _ = OBJECT.unpack_from(head, 0)
    if kind != KIND_CHUNK or len(head) < OBJECT.size + CHUNK.size:
        raise CorruptionError(key, 10, "not a log chunk", KIND_CHUNK, kind)
    _, seg, _, flags, _ = CHUNK.unpack_from(head, OBJECT.size)
    return gen, seg, bool(flags & FLAG_FENCE)


def decode_chunk(key: str, data: bytes) -> Chunk:
    gen, body = unframe(key, data, KIND_CHUNK)
    seq, seg, off, flags, _ = CHUNK.unpack_from(body, 0)
    return Chunk(seq, gen, seg, off, bool(flags & FLAG_FENCE), body[CHUNK.size :])


@dataclass(frozen=True)
class LayerRef:
    timeline: bytes
    name: str
    generation: int
    size: int
    checksum: int

    @property
    def key(self) -> str:
        return layer_key(self.timeline, self.name, self.generation)


@dataclass
class Index:
    generation: int
    applied_lsn: int
    replay_from: int
    manifest: bytes
    layers: dict[tuple[bytes, str], LayerRef] = field(default_factory=dict)


def encode_index(ix: Index) -> bytes:
    parts = [INDEX.pack(ix.applied_lsn, ix.replay_from, len(ix.manifest), len(ix.layers)), ix.manifest]
    for r in sorted(ix.layers.values(), key=lambda r: (r.timeline, r.name)):
        name = r.name.encode()
        parts.append(LAYER_REF.pack(r.timeline, r.generation, r.size, r.checksum, len(name)) + name)
    return frame(KIND_INDEX, ix.generation, b"".join(parts))


def decode_index(key: str, data: bytes) -> Index:
    gen, body = unframe(key, data, KIND_INDEX)
    applied, replay_from, mlen, n = INDEX.unpack_from(body, 0)
    p = INDEX.size
    manifest = body[p : p + mlen]
    decode_snapshot(key, manifest)  # (checks it)
    p += mlen
    ix = Index(gen, applied, replay_from, manifest)
    for _ in range(n):
        tid, lgen, size, csum, nlen = LAYER_REF.unpack_from(body, p)
        p += LAYER_REF.size
        name = body[p : p + nlen].decode()
        p += nlen
        ix.layers[(tid, name)] = LayerRef(tid, name, lgen, size, csum)
    if p != len(body):
        raise CorruptionError(key, OBJECT.size + p, "index has bytes after its layers")
    return ix


@dataclass(frozen=True)
class Lease:
    generation: int
    holder: str  # the node's id
    nonce: str
    released: bool = False
    renewal: int = 0  # (each renewal changes the bytes, so the ETag: takers watch it)


def encode_lease(le: Lease) -> bytes:
    body = json.dumps({"generation": le.generation, "holder": le.holder, "nonce": le.nonce,
                       "released": le.released, "renewal": le.renewal, "host": socket.gethostname()}).encode()
    return frame(KIND_LEASE, le.generation, body)


def decode_lease(data: bytes) -> Lease:
    gen, body = unframe(LEASE_KEY, data, KIND_LEASE)
    d = json.loads(body)
    return Lease(gen, d["holder"], d["nonce"], bool(d.get("released")), int(d.get("renewal", 0)))


# --- local state ------------------------------------------------------------------------


def read_local_state(path: str) -> dict | None:
    p = os.path.join(path, LOCAL_STATE)
    try:
        with open(p, "rb") as f:
            return json.loads(unframe(p, f.read(), KIND_LOCAL)[1])
    except FileNotFoundError:
        return None


def write_local_state(store_path: str, state: dict) -> None:
    write_atomically(OsFileSystem(), os.path.join(store_path, LOCAL_STATE),
                     frame(KIND_LOCAL, state["generation"], json.dumps(state).encode()))


# --- the lease --------------------------------------------------------------------------


def take_lease(
    objects: ObjectStore, node: str, *, lease_s: float, force: bool, wait: Callable[[float], None] = time.sleep,
    known_generation: int | None = None,
) -> tuple[Lease, str]:
    """Take the next generation. Returns the lease and its ETag.

    The lease of another node is taken once released, or once unchanged for
    `lease_s` (at once with `force`); raises SupersededError if
    `known_generation` (this home's) is older than the lease's and the
    lease is not this node's."""
    while True:
        try:
            cur = objects.get(LEASE_KEY)
        except ObjectNotFoundError:
            new = Lease(1, node, secrets.token_hex(8))
            try:
                return new, objects.put_if_absent(LEASE_KEY, encode_lease(new))
            except PreconditionFailedError:
                continue  # someone took the first one: read it
        held = decode_lease(cur.data)
        if known_generation is not None and held.generation > known_generation and held.holder != node:
            raise SupersededError(
                f"this home last held generation {known_generation}, and node {held.holder} has taken "
                f"the store over (generation {held.generation}): restore into a new home to use it")
        if held.holder != node and not held.released and not force:
            log.info("lease held by %s (generation %d): waiting %.1fs for it to lapse",
                     held.holder, held.generation, lease_s)
            wait(lease_s)
            again = objects.get(LEASE_KEY)
            if again.etag != cur.etag:
                continue  # renewed meanwhile: its holder lives
        new = Lease(held.generation + 1, node, secrets.token_hex(8))
        try:
            return new, objects.put_if_match(LEASE_KEY, encode_lease(new), cur.etag)
        except PreconditionFailedError:
            continue


def fence_log(objects: ObjectStore, generation: int) -> tuple[int, list[Listed]]:
    """Write a fence chunk at the next free sequence number: the old writer's
    next chunk is refused. Returns the fence's number and the chunks below
    it, in sequence order."""
    while True:
        chunks = sorted(objects.list("log"), key=lambda x: x.key)
        seq = int(chunks[-1].key.rsplit("/", 1)[1], 16) + 1 if chunks else 0
        fence = Chunk(seq, generation, 0, 0, True, b"")
        try:
            objects.put_if_absent(chunk_key(seq), encode_chunk(fence))
            return seq, chunks
        except PreconditionFailedError:
            continue  # the old writer got one more in: read again


def latest_index(objects: ObjectStore, below_generation: int | None = None) -> tuple[str, Index] | None:
    keys = sorted(x.key for x in objects.list("index"))
    for key in reversed(keys):
        gen = int(key.split("/")[1].split("-")[0], 16)
        if below_generation is None or gen <= below_generation:
            return key, decode_index(key, objects.get(key).data)
    return None


# --- attached to a store ----------------------------------------------------------------


@dataclass
class RemoteStats:
    chunks: int = 0
    chunk_bytes: int = 0
    layers: int = 0
    layer_bytes: int = 0
    indexes: int = 0
    index_bytes: int = 0
    deleted: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    evicted: int = 0
    retries: int = 0
    last_index_lsn: int = 0
    ranged_reads: int = 0  # reads of a layer not here yet, from the object store
    ranged_bytes: int = 0


class RangedObjectFile:
    """A layer file read from the object store in ranges (a ReadFile), while
    it is not here: each read is one ranged GET."""

    def __init__(self, objects: ObjectStore, key: str, size: int, path: str, stats: RemoteStats) -> None:
        self.path = path
        self._objects, self._key, self._size, self._stats = objects, key, size, stats
        self.pread: Callable[[int, int], bytes] = self._pread

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        data = self._objects.get_range(self._key, offset, end)
        self._stats.ranged_reads += 1
        self._stats.ranged_bytes += len(data)
        return data

    def _pread(self, length: int, offset: int) -> bytes:
        return self.read_at(offset, length)

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        pass


class Remote:
    """A store's link to its object store. Make one, pass it to
    `Store.open(path, remote=...)` (or `restore` into an empty path first)."""

    def __init__(
        self, objects: ObjectStore, *, lease_s: float = 10.0, ship_interval: float = 0.2,
        force: bool = False, probe: bool = True, cache_bytes: int | None = None, in_use_s: float = 1.0,
        durable: bool = False, ranged_reads: bool = True, fetch_whole_bytes: int = FETCH_WHOLE,
    ) -> None:
        if lease_s <= 0 or ship_interval <= 0:
            raise InvalidArgumentError("lease_s and ship_interval must be positive")
        if cache_bytes is not None and cache_bytes <= 0:
            raise InvalidArgumentError(f"the cache size must be positive, got {cache_bytes}")
        self.cache_bytes = cache_bytes
        self.durable_all = durable  # every timeline in durable mode
        self._durable: frozenset[bytes] = frozenset()  # these too (replaced whole: read without a lock)
        self.in_use_s = in_use_s  # a layer read this recently is in use: not evicted
        self.ranged_reads = ranged_reads  # a missing layer is read in ranges while it downloads
        self.fetch_whole_bytes = fetch_whole_bytes  # ... unless it is this small: fetched whole at once
        self.objects = objects
        self.lease_s = lease_s
        self.ship_interval = ship_interval
        self.force = force
        self._probe = probe
        self.stats = RemoteStats()
        self.generation = 0
        self.node = ""
        self._mu = threading.Lock()
        self._ship_mu = threading.Lock()
        self._renew_mu = threading.Lock()
        self._store: Store | None = None
        self._shipped: dict[int, int] = {}
        self._shipped_pos = 0  # every log position below this is in the object store
        self._next_seq = 0
        self._pending: tuple[bytes, int, int, int, list[Layer]] | None = None
        self._uploaded: dict[tuple[bytes, str], LayerRef] = {}  # in the object store
        self._confirmed: dict[tuple[bytes, str], LayerRef] = {}  # what the last index lists
        self._chunk_heads: dict[int, tuple[int, int, bool]] = {}  # seq -> (generation, segment, fence)
        self._fetching: dict[tuple[bytes, str], threading.Lock] = {}  # one fetch of a layer at a time
        # read in ranges: downloaded in the background, smallest first: (size, seq, layer)
        self._to_fetch: queue.PriorityQueue[tuple[int, int, Layer]] = queue.PriorityQueue()
        self._fetch_seq = 0
        self._queued: set[tuple[bytes, str]] = set()  # queued, downloading, or waiting to retry
        self._retry: list[tuple[float, int, Layer]] = []  # failed downloads: (due, seq, layer), a heap
        self._failures: dict[tuple[bytes, str], int] = {}  # failed attempts of a queued layer
        self._graveyard: list[tuple[float, object]] = []  # (close after, an evicted layer's open file)
        self._wake_evict = threading.Event()
        self._lease_etag = ""
        self._lease: Lease | None = None
        self._fenced: BaseException | None = None
        self._stop = threading.Event()
        self._wake_upload = threading.Event()
        self._upload_done = threading.Condition(self._mu)
        self._uploads = 0  # checkpoints uploaded (for waiters)
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        return f"Remote({self.objects!r}, generation {self.generation})"

    # --- attach and detach --------------------------------------------------------------

    def attach(self, store: Store) -> None:
        """Called by Store.open once recovery is done: take the lease, fence
        the log, ship what the log holds, upload an index of this generation
        and start the threads."""
        if self._probe:
            probe_conditional_writes(self.objects)
        state = read_local_state(store.path)
        marker = self._marker()
        if state is None:
            if marker and store._timelines:
                raise InvalidArgumentError(
                    f"{store.path} has data and {self.objects!r} holds another store's: restore into "
                    "an empty home, or give an empty remote")
            if marker and latest_index(self.objects) is not None:
                raise InvalidArgumentError(
                    f"{self.objects!r} holds a store: `restore` it into {store.path} first")
            state = {"node": secrets.token_hex(8), "generation": 0}
        if not marker:
            with contextlib.suppress(PreconditionFailedError):
                self.objects.put_if_absent(MARKER_KEY, frame(KIND_MARKER, 0, b'{"format": 1}'))
        self.node = state["node"]
        lease, etag = take_lease(self.objects, self.node, lease_s=self.lease_s, force=self.force,
                                 known_generation=state["generation"] or None)
        self._lease, self._lease_etag, self.generation = lease, etag, lease.generation
        write_local_state(store.path, dict(state, node=self.node, generation=lease.generation))
        self._last_renewed = time.monotonic()
        self._next_seq, _ = fence_log(self.objects, lease.generation)
        self._next_seq += 1
        found = latest_index(self.objects, lease.generation)
        if found is not None:
            self._uploaded = dict(found[1].layers)
            self._confirmed = dict(found[1].layers)
        for tid in list(store._timelines):  # (after this, a fetch never makes one: it was deleted)
            tdir = os.path.join(store._timelines_dir, tid.hex())
            if not store.fs.isdir(tdir):  # (a restored home's: a stat each, not an fsync each)
                ensure_dir(store.fs, tdir)
        self._store = store
        self._ship_recovered(store)
        loops = [("ship", self._ship_loop), ("lease", self._lease_loop), ("watchdog", self._watchdog_loop),
                 ("upload", self._upload_loop), ("fetch", self._fetch_loop)]
        if self.cache_bytes is not None:
            loops.append(("cache", self._evict_loop))
        for name, fn in loops:
            t = threading.Thread(target=fn, name=f"strata-remote-{name}:{store.path}", daemon=True)
            t.start()
            self._threads.append(t)
        store.checkpoint()
        self.wait_uploaded()
        self._collect_orphans()
        if "restored_through" in state:  # (the new manifest covers the restored log)
            write_local_state(store.path, {"node": self.node, "generation": self.generation})
        log.info("attached %s to %s as generation %d", store.path, self.objects, self.generation)

    def _collect_orphans(self) -> None:
        """Delete the layers of older generations that this generation's
        index does not list: uploads a crash or a stale writer left without
        an index that counts. (Once this generation's index is up and the
        lease renewed: every later index descends from it.)"""
        if not self._renew():
            return  # (tried again at the next start)
        with self._mu:
            listed = {r.key for r in self._confirmed.values()}
        doomed = []
        for x in self.objects.list("layers"):
            gen = x.key.rsplit(".", 1)[-1]
            if x.key not in listed and len(gen) == 8 and int(gen, 16) < self.generation:
                doomed.append(x.key)
        if doomed:
            self.objects.delete(doomed)
            self.stats.deleted += len(doomed)
            log.info("deleted %d layers of older generations that no index lists", len(doomed))

    def _marker(self) -> bool:
        try:
            unframe(MARKER_KEY, self.objects.get(MARKER_KEY).data, KIND_MARKER)
            return True
        except ObjectNotFoundError:
            return False

    def close(self, release: bool = True) -> None:
        """Stop the threads (after the store's last checkpoint went up) and
        give the lease up."""
        if self._store is None:
            return
        self._stop.set()
        self._wake_upload.set()
        self._wake_evict.set()
        for t in self._threads:
            t.join(60)
        if release and self._fenced is None and self._lease is not None:
            gone = dataclasses.replace(self._lease, released=True, renewal=self._lease.renewal + 1)
            with contextlib.suppress(ObjectStoreError):
                self.objects.put_if_match(LEASE_KEY, encode_lease(gone), self._lease_etag)
        self._store = None

    def abandon(self) -> None:
        """Stop at once, as a killed process would (no upload, lease kept)."""
        self._stop.set()
        self._wake_upload.set()
        self._wake_evict.set()
        for t in self._threads:
            t.join(60)
        self._store = None

    def status(self, head_lsn: int) -> dict[str, object]:
        """The generation, what went up, and the lag: LSNs of the head the
        latest index does not hold in layers (the log holds them)."""
        st = dataclasses.asdict(self.stats)
        store = self._store
        lag = max(0, store._log._synced - self._shipped_pos) if store is not None else 0
        return {"generation": self.generation, "durable": self.durable_all,
                "durable_timelines": len(self._durable), "ship_lag_bytes": lag,
                "fenced": str(self._fenced) if self._fenced else None,
                "index_lag_lsns": max(0, head_lsn - self.stats.last_index_lsn),
                "last_error": str(self.error) if self.error else None, **st}

    def open_layer(self, ly: Layer) -> ReadFile | None:
        """A layer file the store lists and lacks, on its first read: a file
        that reads it from the object store in ranges at once, while the
        fetch thread downloads it whole, smallest layers first (`ranged_reads`,
        once attached; the layer checks each section and value it reads by
        its checksum); or None, once it is fetched here (`fetch_layer`): a
        layer of at most `fetch_whole_bytes` costs one GET, about what a few
        ranged reads do. Measured on a restored 1 GB database, the first
        query took 1.0-1.3 s so, 2.7-3.4 s with every layer read in ranges
        and nothing downloaded."""
        key = (ly.timeline, ly.desc.name)
        ref = self._ref(ly.timeline, ly.desc.name, ly.path)
        if not self.ranged_reads or self._store is None or self._stop.is_set() or ref.size <= self.fetch_whole_bytes:
            self.fetch_layer(ly.timeline, ly.desc.name, ly.path)  # (small: one GET, as a few ranged reads cost)
            return None
        with self._mu:
            if key not in self._queued:
                self._queued.add(key)
                self._fetch_seq += 1
                self._to_fetch.put((ref.size, self._fetch_seq, ly))
        return RangedObjectFile(self.objects, ref.key, ref.size, ly.path, self.stats)

    def _fetch_loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._mu:
                while self._retry and self._retry[0][0] <= now:
                    _, seq, ly = heapq.heappop(self._retry)
                    self._to_fetch.put((ly.desc.file_size, seq, ly))
            try:
                _, _, ly = self._to_fetch.get(timeout=0.2)
            except queue.Empty:
                continue
            self._download(ly)
            del ly  # (a retired layer's file goes once the last holder lets go)

    def _download(self, ly: Layer) -> None:
        """The fetch thread's download of a layer read in ranges meanwhile:
        once it lands, the layer is reopened (its next read uses the file
        here); a failed one is tried again after a backoff (FETCH_RETRIES
        times, then it stays read in ranges); one no longer needed (retired
        by a compaction, its timeline deleted) is dropped, its readers kept
        on their ranged file."""
        key = (ly.timeline, ly.desc.name)
        store = self._store
        if ly.retired or store is None or ly.timeline not in store._timelines:
            with self._mu:
                self._queued.discard(key)
                self._failures.pop(key, None)
            return
        try:
            self.fetch_layer(ly.timeline, ly.desc.name, ly.path, stoppable=True)
        except BaseException as e:  # noqa: BLE001 - read in ranges meanwhile; logged, tried again
            if self._stop.is_set():
                return
            with self._mu:
                n = self._failures[key] = self._failures.get(key, 0) + 1
                if n < FETCH_RETRIES:
                    self._fetch_seq += 1
                    delay = min(FETCH_RETRY_MAX_S, FETCH_RETRY_S * 2 ** (n - 1))
                    heapq.heappush(self._retry, (time.monotonic() + delay, self._fetch_seq, ly))
                else:
                    self._queued.discard(key)
                    self._failures.pop(key, None)
            if n < FETCH_RETRIES:
                log.warning("downloading %s failed (read in ranges meanwhile; tried again in %.1f s): %s",
                            ly.path, delay, e)
            else:
                log.error("downloading %s failed %d times: it stays read in ranges (%s)", ly.path, n, e)
            return
        with self._mu:
            self._queued.discard(key)
            self._failures.pop(key, None)
        ly.reopen()  # (its next read opens the file here)

    def _ref(self, tid: bytes, name: str, path: str) -> LayerRef:
        with self._mu:
            ref = self._uploaded.get((tid, name))
        if ref is None:  # (before attach: recovery's reads)
            found = latest_index(self.objects)
            ref = found[1].layers.get((tid, name)) if found else None
        if ref is None:
            raise CorruptionError(path, 0, "layer file is missing here and in the object store's index")
        return ref

    def fetch_layer(self, tid: bytes, name: str, path: str, *, stoppable: bool = False) -> None:
        """Bring a layer file the store lists and lacks: in ranged parts (at
        most FETCH_WINDOW in flight, each written as it comes, in order: never
        the whole layer in memory), checked against the index's size and
        xxh3, written temp, fsync, rename, fsync-directory. One fetch of a
        layer at a time. A `stoppable` one (the fetch thread's) stops once
        the remote closes (StoreClosedError), without waiting for the GETs
        in flight; a reader's goes on."""
        ref = self._ref(tid, name, path)
        with self._mu:
            lock = self._fetching.setdefault((tid, name), threading.Lock())
        with lock:
            if os.path.exists(path):
                return  # (another reader fetched it meanwhile)
            t0 = time.monotonic()
            fs = OsFileSystem()
            directory = os.path.dirname(path)
            if self._store is None:  # (recovery's reads, before attach: a restore makes no directories)
                ensure_dir(fs, directory)
            # (once attached, attach made every timeline's; a missing one was deleted: not made again)
            tmp = path + TMP_SUFFIX
            f = fs.open_write(tmp)
            h, size = Xxh3(), 0
            try:
                with contextlib.closing(self._parts(ref, stoppable)) as parts:
                    for part in parts:
                        h.update(part)
                        size += len(part)
                        f.write(part)
                if size != ref.size or h.intdigest() != ref.checksum:
                    raise CorruptionError(ref.key, 0, "layer in the object store does not match its index",
                                          (ref.size, ref.checksum), (size, h.intdigest()))
                f.sync()
            except BaseException:
                f.close()
                with contextlib.suppress(OSError):
                    fs.remove(tmp)
                raise
            f.close()
            fs.rename(tmp, path)
            fs.sync_dir(directory)
            self.stats.fetched += 1
            self.stats.fetched_bytes += size
        if self.cache_bytes is not None:
            self._wake_evict.set()
        log.debug("fetched %s (%d bytes) in %.3fs", ref.key, size, time.monotonic() - t0)

    def _parts(self, ref: LayerRef, stoppable: bool) -> Generator[bytes, None, None]:
        """The layer's bytes in FETCH_PART ranges, in order, at most
        FETCH_WINDOW of them fetched ahead at once."""
        spans = [(o, min(o + FETCH_PART, ref.size)) for o in range(0, ref.size, FETCH_PART)] or [(0, 0)]
        pool = ThreadPoolExecutor(max_workers=min(FETCH_WINDOW, len(spans)), thread_name_prefix="strata-fetch-part")
        ahead: collections.deque[Future[bytes]] = collections.deque()
        stopped = False
        try:
            for span in spans:
                self._check_stop(stoppable)
                ahead.append(pool.submit(self.objects.get_range, ref.key, *span))
                if len(ahead) == FETCH_WINDOW:
                    yield self._next_part(ahead, stoppable)
            while ahead:
                yield self._next_part(ahead, stoppable)
        except BaseException:
            stopped = True
            raise
        finally:  # (stopped or failed: the GETs in flight are not waited for, their answers dropped)
            pool.shutdown(wait=not stopped, cancel_futures=True)

    def _check_stop(self, stoppable: bool) -> None:
        store = self._store
        if stoppable and self._stop.is_set():
            raise StoreClosedError(store.path if store is not None else "?")

    def _next_part(self, ahead: collections.deque[Future[bytes]], stoppable: bool) -> bytes:
        fut = ahead[0]
        while True:
            self._check_stop(stoppable)
            try:
                data = fut.result(timeout=0.1)
                break
            except FuturesTimeout:
                continue
        ahead.popleft()
        return data

    # --- the local cache -------------------------------------------------------------

    def _evict_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_evict.wait(0.5)
            self._wake_evict.clear()
            try:
                self.evict()
            except BaseException as e:  # noqa: BLE001 - kept, and tried again
                self.error = e
                log.exception("evicting layers failed")

    def local_layers(self) -> list[tuple[float, int, str, tuple[bytes, str], Layer | None]]:
        """Every layer file here: (last use, size, path, (timeline, name), its open Layer)."""
        store = self._store
        assert store is not None
        out: list[tuple[float, int, str, tuple[bytes, str], Layer | None]] = []
        for tid, tl in list(store._timelines.items()):
            if tl is not None:
                for ly in tl._map.layers:
                    out.append((ly.used, ly.desc.file_size, ly.path, (tid, ly.desc.name), ly))
                continue
            meta = store._meta_of(tid)  # (not loaded: nobody reads it)
            for name, d in (meta.layers.items() if meta is not None else ()):
                path = os.path.join(store._timelines_dir, tid.hex(), name)
                out.append((0.0, d.file_size, path, (tid, name), None))
        return [x for x in out if os.path.exists(x[2])]

    def evict(self) -> int:
        """Delete the least recently used layer files until the local ones
        fit `cache_bytes`. Never one not in the object store yet, nor one
        read in the last `in_use_s`. Returns the bytes freed."""
        now = time.monotonic()
        with self._mu:
            keep = [(t, f) for t, f in self._graveyard if t > now]
            done = [f for t, f in self._graveyard if t <= now]
            self._graveyard = keep
        for f in done:
            with contextlib.suppress(OSError):
                f.close()  # type: ignore[attr-defined]
        if self.cache_bytes is None or self._store is None:
            return 0
        layers = self.local_layers()
        total = sum(x[1] for x in layers)
        freed = 0
        for used, size, path, key, ly in sorted(layers, key=lambda x: x[0]):
            if total - freed <= self.cache_bytes:
                break
            with self._mu:
                ref = self._uploaded.get(key)
                lock = self._fetching.setdefault(key, threading.Lock())
            if ref is None or ref.size != size or now - used < self.in_use_s:
                continue  # not up yet, or in use
            with lock:
                if not os.path.exists(path):
                    continue  # (retired and deleted meanwhile)
                # (a reader holding the layer's lock may be waiting for this fetch lock: not waited for)
                ok, f = ly.try_evict() if ly is not None else (True, None)
                if not ok:
                    continue  # in use
                if f is not None:
                    with self._mu:
                        self._graveyard.append((now + 10.0, f))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            freed += size
            self.stats.evicted += 1
        return freed

    # --- fencing ------------------------------------------------------------------------

    def _fence(self, why: str) -> None:
        err = FencedError(f"{self!r} is fenced: {why}")
        with self._mu:
            if self._fenced is not None:
                return
            self._fenced = err
        log.error("%s", err)
        store = self._store
        if store is not None:
            store._log._fail(err)

    @property
    def fenced(self) -> BaseException | None:
        return self._fenced

    # --- the lease keeper ---------------------------------------------------------------

    def _renew(self) -> bool:
        """Renew the lease with If-Match: True if it is still ours, False if
        the store could not be reached (fenced if another node has it)."""
        assert self._lease is not None
        with self._renew_mu:  # (two renewals of one ETag: the second would fence us)
            sent = time.monotonic()
            with self._mu:
                self._lease = dataclasses.replace(self._lease, renewal=self._lease.renewal + 1)
                lease, etag = self._lease, self._lease_etag
            try:
                etag = self.objects.put_if_match(LEASE_KEY, encode_lease(lease), etag)
            except PreconditionFailedError:
                mine = self._own_lease(lease)  # (an earlier renewal whose answer was lost?)
                if mine is None:
                    self._fence("another node took the lease")
                    return False
                etag = mine
            except ObjectStoreError as e:
                log.warning("could not renew the lease: %s", e)
                self.stats.retries += 1
                return False
            with self._mu:
                self._lease_etag = etag
                self._last_renewed = sent
            return True

    def _own_lease(self, sent: Lease) -> str | None:
        """The lease's ETag if what it holds is ours (this renewal, or the one
        before it, whose answer was lost); else None."""
        try:
            cur = self.objects.get(LEASE_KEY)
            held = decode_lease(cur.data)
        except (ObjectStoreError, CorruptionError):
            return None
        ours = (held.generation, held.holder, held.nonce) == (sent.generation, sent.holder, sent.nonce)
        return cur.etag if ours and not held.released and held.renewal in (sent.renewal, sent.renewal - 1) else None

    def _lease_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            if self._fenced is not None:
                return
            self._renew()

    def _watchdog_loop(self) -> None:
        """Fence once the last renewal that landed was sent 0.8 x lease_s ago,
        however long a renewal in flight takes: a taker waits a whole
        lease_s of an unchanged lease, so this node stops first."""
        while not self._stop.wait(self.lease_s / 20):
            with self._mu:
                since = time.monotonic() - self._last_renewed
            if since > 0.8 * self.lease_s:
                self._fence(f"the lease could not be renewed for {0.8 * self.lease_s:.1f}s")
                return

    # --- shipping the log ---------------------------------------------------------------

    def _put_chunk(self, seg: int, offset: int, data: bytes) -> None:
        while True:
            with self._mu:
                seq = self._next_seq
            c = Chunk(seq, self.generation, seg, offset, False, data)
            try:
                self.objects.put_if_absent(chunk_key(seq), encode_chunk(c))
            except PreconditionFailedError:
                self._fence(f"log chunk {seq} was taken (fenced by a newer generation)")
                raise FencedError(f"log chunk {seq} was taken") from None
            except ObjectStoreError as e:
                if self._stop.is_set() or self._fenced is not None:
                    raise
                log.warning("shipping log chunk %d failed, retrying: %s", seq, e)
                self.stats.retries += 1
                time.sleep(0.2)
                continue
            with self._mu:
                self._next_seq = seq + 1
                self._shipped[seg] = offset + len(data)
                self._chunk_heads[seq] = (self.generation, seg, False)
            self.stats.chunks += 1
            self.stats.chunk_bytes += len(data)
            return

    def _ship_range(self, path: str, seg: int, start: int, end: int) -> None:
        with open(path, "rb") as f:
            while start < end:
                n = min(MAX_CHUNK, end - start)
                data = os.pread(f.fileno(), n, start)
                if len(data) != n:
                    raise CorruptionError(path, start, "log segment shorter than its durable extent", n, len(data))
                self._put_chunk(seg, start, data)
                start += n

    def _ship_recovered(self, store: Store) -> None:
        """Ship every segment recovery found (they are durable; what of them is
        in the object store already is sent again, harmlessly)."""
        started = set(store._log.bases)
        for first, path in list_segments(store.fs, store._log_dir):
            if first in started:
                continue
            end = scan_segment(store.fs, path, False).end
            self._ship_range(path, first, 0, end)

    def ship(self) -> int:
        """Ship every fsynced byte not shipped yet; returns the log position now shipped."""
        store = self._store
        if self._fenced is not None:
            raise FencedError(str(self._fenced))
        if store is None:
            return self._shipped_pos
        with self._ship_mu:
            extents, synced = store._log.durable_extents()
            for first, end in extents:
                with self._mu:
                    done = self._shipped.get(first, 0)
                if end > done:
                    self._ship_range(os.path.join(store._log_dir, segment_name(first)), first, done, end)
            with self._mu:
                self._shipped_pos = max(self._shipped_pos, synced)
                for gone in [s for s in self._shipped if s < extents[0][0]]:
                    del self._shipped[gone]  # (dropped locally)
            return self._shipped_pos

    # --- durable mode ---------------------------------------------------------------------

    def is_durable(self, tid: bytes) -> bool:
        return self.durable_all or tid in self._durable

    def set_durable(self, timeline_ids: set[bytes] | frozenset[bytes]) -> None:
        """The timelines whose syncs wait for the object store (besides all, with `durable`)."""
        self._durable = frozenset(timeline_ids)

    def wait_shipped(self, pos: int) -> None:
        """Return once the log up to position `pos` (fsynced) is in the object
        store. Group commit: one waiter ships for every other (`_ship_mu`),
        and those behind it find their bytes shipped. FencedError if fenced."""
        while True:
            with self._mu:
                if self._shipped_pos >= pos:
                    return
            if self._store is None:
                raise FencedError(f"{self!r} is closed: the log was not shipped up to {pos}")
            try:
                self.ship()
            except ObjectStoreError as e:
                log.warning("shipping for a durable commit failed, retrying: %s", e)
                time.sleep(0.05)

    def _ship_loop(self) -> None:
        while not self._stop.wait(self.ship_interval):
            try:
                self.ship()
            except FencedError:
                return
            except BaseException as e:  # noqa: BLE001 - kept, and retried
                self.error = e
                log.exception("shipping the log failed")

    # --- checkpoints --------------------------------------------------------------------

    def before_drop(self, first_lsn: int, timeout: float = 30.0) -> None:
        """A checkpoint is about to delete local segments below `first_lsn`:
        ship them first (they are sealed, so durable)."""
        deadline = time.monotonic() + timeout
        while self._fenced is None and self._store is not None:
            try:
                self.ship()
                return
            except ObjectStoreError as e:
                if time.monotonic() > deadline:
                    log.error("segments below %d not shipped before their deletion: %s", first_lsn, e)
                    return
                time.sleep(0.2)

    def snapshot_written(self, manifest: bytes, replay_from: int, applied: int, pos: int,
                         layers: list[Layer]) -> None:
        """A checkpoint wrote a manifest (the log synced up to `pos`):
        upload it, with the layers it lists (`layers` holds their files)."""
        with self._mu:
            self._pending = (manifest, replay_from, applied, pos, layers)
        self._wake_upload.set()

    def wait_uploaded(self, timeout: float = 120.0) -> None:
        """Wait until the newest checkpoint so far is in the object store."""
        deadline = time.monotonic() + timeout
        with self._mu:
            while self._pending is not None:
                if self._fenced is not None:
                    raise FencedError(str(self._fenced))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ObjectStoreError(f"the checkpoint was not uploaded within {timeout}s: {self.error}")
                self._upload_done.wait(min(left, 0.5))

    def _upload_loop(self) -> None:
        while True:
            self._wake_upload.wait(1.0)
            self._wake_upload.clear()
            with self._mu:
                job = self._pending
            if job is None:
                if self._stop.is_set():
                    return
                continue
            try:
                self._upload(*job)
            except FencedError:
                with self._mu:
                    self._upload_done.notify_all()
                return
            except _Superseded as e:  # a newer checkpoint replaces this one
                log.info("checkpoint upload superseded: %s", e)
                try:
                    self._store.checkpoint() if self._store is not None else None
                except StrataError as e2:
                    self.error = e2
                    if self._stop.wait(0.5):
                        return
                continue
            except BaseException as e:  # noqa: BLE001 - kept, and retried
                self.error = e
                self.stats.retries += 1
                log.warning("uploading a checkpoint failed, retrying: %s", e)
                if self._stop.wait(0.5) or self._fenced is not None:
                    return
                self._wake_upload.set()
                continue
            with self._mu:
                if self._pending is job:
                    self._pending = None
                self._uploads += 1
                self._upload_done.notify_all()

    def _upload(self, manifest: bytes, replay_from: int, applied: int, pos: int, layers: list[Layer]) -> None:
        store = self._store
        assert store is not None
        while self.ship() < pos:  # the index never runs ahead of the log
            if self._fenced is not None:
                raise FencedError(str(self._fenced))
            time.sleep(0.05)
        snap = decode_snapshot("manifest", manifest)
        files = {(ly.timeline, ly.desc.name): ly for ly in layers}
        refs: dict[tuple[bytes, str], LayerRef] = {}
        for tid in snap.table:
            if tid in snap.damaged:
                continue
            meta = snap.load(tid)
            for name in meta.layers:
                have = self._uploaded.get((tid, name))
                if have is None:
                    have = self._upload_layer(store, tid, name, files.get((tid, name)))
                refs[(tid, name)] = have
        ix = Index(self.generation, applied, replay_from, manifest, refs)
        data = encode_index(ix)
        self.objects.put(index_key(self.generation, applied), data)
        self.stats.indexes += 1
        self.stats.index_bytes += len(data)
        self.stats.last_index_lsn = applied
        with self._mu:
            self._uploaded.update(refs)
        if not self._renew():  # (deletes only once the lease is proven ours, the index up)
            if self._fenced is not None:
                raise FencedError(str(self._fenced))
            raise ObjectStoreError("the lease could not be renewed before deleting: retried later")
        self._delete_unneeded(ix, self._confirmed)
        with self._mu:
            self._confirmed = refs
            self._uploaded = dict(refs)

    def _upload_layer(self, store: Store, tid: bytes, name: str, ly: Layer | None) -> LayerRef:
        path = ly.path if ly is not None else os.path.join(store._timelines_dir, tid.hex(), name)
        try:
            with open(path, "rb") as f:  # (`ly` keeps the file, if the layer has left the map since)
                data = f.read()
        except FileNotFoundError:
            if tid not in store._timelines:
                raise _Superseded(f"timeline {tid.hex()} was deleted after this checkpoint") from None
            raise
        ref = LayerRef(tid, name, self.generation, len(data), xxh3(data))
        self.objects.put(ref.key, data)
        self.stats.layers += 1
        self.stats.layer_bytes += len(data)
        return ref

    def _delete_unneeded(self, ix: Index, previous: dict[tuple[bytes, str], LayerRef]) -> None:
        doomed = [r.key for k, r in previous.items() if k not in ix.layers or ix.layers[k].key != r.key]
        doomed += self._old_chunks(ix.replay_from)
        doomed += [x.key for x in self.objects.list("index")
                   if x.key < index_key(self.generation, ix.applied_lsn)]
        if doomed:
            self.objects.delete(doomed)
            self.stats.deleted += len(doomed)
            with self._mu:
                for k in doomed:
                    if k.startswith("log/"):
                        self._chunk_heads.pop(int(k[4:], 16), None)

    def _old_chunks(self, replay_from: int) -> list[str]:
        """Chunks of segments older than `replay_from` (fences stay: a stale
        writer's next chunk must keep finding its number taken)."""
        out = []
        for listed in self.objects.list("log"):
            seq = int(listed.key[4:], 16)
            with self._mu:
                head = self._chunk_heads.get(seq)
            if head is None:
                head = chunk_head(listed.key, self.objects.get_range(listed.key, 0, OBJECT.size + CHUNK.size))
                with self._mu:
                    self._chunk_heads[seq] = head
            gen, seg, fence = head
            if not fence and seg < replay_from and gen <= self.generation:
                out.append(listed.key)
        return out


# --- restore ------------------------------------------------------------------------------


@dataclass
class RestoreReport:
    generation: int
    index: str
    timelines: int
    layers: int
    layer_bytes: int
    chunks: int
    log_bytes: int
    seconds: float


def restore(
    objects: ObjectStore, path: str, *, lease_s: float = 10.0, force: bool = False,
    progress: Callable[[int, int], None] | None = None, lazy: bool = True,
) -> RestoreReport:
    """Bring a store back from its object store into an empty directory:
    take the next generation, fence the log, then write the latest index's
    manifest and the log shipped after it. `Store.open(path,
    remote=Remote(objects))` then recovers it as after a crash, and fetches
    each layer file on its first read (`lazy`; else they are all fetched
    here, each checked by size and xxh3, written temp, fsync, rename)."""

    t0 = time.monotonic()
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise InvalidArgumentError(f"restore needs an empty directory, and {path} has files")
    if not _has_marker(objects):
        raise InvalidArgumentError(f"{objects!r} holds no Strata store (no {MARKER_KEY})")
    node = secrets.token_hex(8)
    lease, _ = take_lease(objects, node, lease_s=lease_s, force=force)
    fence_seq, chunks = fence_log(objects, lease.generation)
    found = latest_index(objects, lease.generation)
    if found is None:
        raise CorruptionError(str(objects), 0, "the remote has no index: nothing to restore")
    key, ix = found
    fs = OsFileSystem()
    ensure_dir(fs, path)
    os.chmod(path, 0o700)
    tdir = os.path.join(path, "timelines")
    ensure_dir(fs, tdir)
    layer_bytes = total = sum(r.size for r in ix.layers.values()) if not lazy else 0
    done = 0
    for r in ix.layers.values() if not lazy else ():
        data = objects.get(r.key).data
        if len(data) != r.size or xxh3(data) != r.checksum:
            raise CorruptionError(r.key, 0, "layer in the object store does not match its index",
                                  r.checksum, xxh3(data))
        d = os.path.join(tdir, r.timeline.hex())
        ensure_dir(fs, d)
        write_atomically(fs, os.path.join(d, r.name), data)
        done += r.size
        if progress is not None:
            progress(done, total)
    # the log after the index: chunks fetched in parallel, used in sequence order, each segment rebuilt
    log_dir = os.path.join(path, "log")
    ensure_dir(fs, log_dir)
    segs: dict[int, bytearray] = {}
    n_chunks = 0
    last_gen = 0
    total += sum(x.size for x in chunks)
    with ThreadPoolExecutor(max_workers=RESTORE_FETCHES) as pool:
        for x, data in zip(chunks, pool.map(lambda x: objects.get(x.key).data, chunks), strict=True):
            done += x.size
            if progress is not None:
                progress(done, total)
            c = decode_chunk(x.key, data)
            if c.generation < last_gen:
                raise CorruptionError(x.key, 0, "log chunk of an older generation after a newer one",
                                      last_gen, c.generation)
            last_gen = c.generation
            if c.fence or c.segment < ix.replay_from:
                continue
            buf = segs.setdefault(c.segment, bytearray())
            if c.offset > len(buf):
                log.warning("log segment %d has a gap at %d (chunk %s): later chunks of it are not used",
                            c.segment, len(buf), x.key)
                continue
            buf[c.offset : c.offset + len(c.data)] = c.data
            n_chunks += 1
    log_bytes = 0
    for first, buf in sorted(segs.items()):
        if len(buf) < SEGMENT_HEADER.size:
            continue
        write_atomically(fs, os.path.join(log_dir, segment_name(first)), bytes(buf))
        log_bytes += len(buf)
    write_atomically(fs, os.path.join(path, "manifest"), ix.manifest)
    through = 0
    for _, spath in list_segments(fs, log_dir):
        last = scan_segment(fs, spath, True).last_record
        through = max(through, last or 0)
    write_local_state(path, {"node": node, "generation": lease.generation, "restored_through": through})
    # an index of this generation at once: a stale writer's later one never wins
    objects.put(index_key(lease.generation, ix.applied_lsn), encode_index(
        Index(lease.generation, ix.applied_lsn, ix.replay_from, ix.manifest, ix.layers)))
    snap = decode_snapshot(key, ix.manifest)
    report = RestoreReport(lease.generation, key, len(snap.table), len(ix.layers), layer_bytes, n_chunks, log_bytes,
                           time.monotonic() - t0)
    log.info("restored %s from %s: %s (fence at %d)", path, objects, report, fence_seq)
    return report


def _has_marker(objects: ObjectStore) -> bool:
    try:
        objects.get(MARKER_KEY)
        return True
    except ObjectNotFoundError:
        return False
