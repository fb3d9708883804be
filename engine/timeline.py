"""Timelines: a history of versions with an optional ancestor.

A timeline is a lineage of commits. A root timeline starts empty at its start
LSN; a child timeline starts at its *branch point* (its ancestor and an LSN of
it) and sees the ancestor as of that LSN for every key it has not written
since. Creating one writes only metadata. LSNs are store-wide and increase,
so a child's first commit is above its branch point, and the two sides of a
branch never see each other's later writes.

A timeline serves reads at any LSN from its *horizon* (its start, or the
point below which GC has removed history) to its head. One thread at a time
may commit to a timeline (commits are serialized by its write lock); any
number may read, without locks, from the layer map they picked up.

A read takes its ancestor chain *before* its layer map (`_view`), and a
detach swaps in the map that holds its base images before it drops the
ancestor (`Store._replace_layers`). So a read that finds no ancestor has
a map with the images, and a read with an older map still has the
ancestor to fall through to: none sees a key vanish while a detach runs.
"""

from __future__ import annotations

import bisect
import datetime as dt
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyroaring import BitMap64, FrozenBitMap64

from .config import Retention
from .errors import CorruptionError, InvalidArgumentError, LsnOutOfRangeError, NotFoundError
from .inmemory_layer import InMemoryLayer, MemVersion
from .keyspace import clip
from .layer_file import Entry, Layer
from .layer_map import ABSENT, MISS, LayerMap
from .manifest import TimelineMeta
from .values import FLAG_TOMBSTONE, KEY_LIMIT, MAX_KEY, check_key, decode, encode_batch
from .wal import REC_COMMIT, encode_commit

if TYPE_CHECKING:
    from .store import Store

# A version found for materialization: (lsn, flags, raw_len, stored, checksum)
RawVersion = tuple[int, int, int, bytes, int]
# The ancestors a read falls through to (each with its LSN cap), and the filter of `_chain_info`.
ChainInfo = tuple[tuple[tuple["Timeline", int], ...], FrozenBitMap64 | None]
# What one read works on: a layer map and the chain taken with it (`Timeline._view`).
View = tuple[LayerMap, ChainInfo]


@dataclass(frozen=True)
class TimelineUsage:
    """Space accounting of one timeline (bytes)."""

    lsn: int  # the LSN logical_size is measured at
    logical_size: int  # values visible at `lsn`, uncompressed, ancestors included
    physical_size: int  # this timeline's layer files
    exclusive_size: int  # layer files no child needs: what it alone holds
    pinned_by_children: int  # layer files kept only for children's branch points
    inmemory_size: int  # recent commits not yet in a layer file (in the log)


def found_flags(found: tuple[Layer | None, MemVersion | Entry]) -> int:
    src, v = found
    return v[1] if src is None else v[5]  # type: ignore[return-value,misc]


def found_raw_len(found: tuple[Layer | None, MemVersion | Entry]) -> int:
    src, v = found
    return v[2] if src is None else v[3]  # type: ignore[return-value]


def to_epoch_us(when: float | int | dt.datetime) -> int:
    if isinstance(when, dt.datetime):
        return int(when.timestamp() * 1_000_000)
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return int(when * 1_000_000)
    raise InvalidArgumentError(f"a time is a datetime or epoch seconds, got {type(when).__name__}")


class Timeline:
    def __init__(self, store: Store, meta: TimelineMeta, layers: list[Layer]) -> None:
        self._store = store
        self._meta = meta
        self._tid = meta.id
        self.id = meta.id.hex()
        self._dir = os.path.join(store._timelines_dir, self.id)
        self._write_mu = threading.Lock()  # commits; swaps of the layer map
        self._layers_mu = threading.RLock()  # flush, compaction, GC, detach
        self._map = LayerMap(InMemoryLayer(), (), layers, meta.start_lsn)
        self._head = meta.head_lsn
        self._low = max(meta.start_lsn, meta.horizon)  # the horizon
        self._deleted = False
        self._layers_gen = 0  # bumped at every change of the layer set
        self._compacted_gen = -1  # the generation background compaction last saw
        self._chain_cache: tuple[int, tuple[tuple[Timeline, int], ...], FrozenBitMap64 | None] = (
            -1, (), None,
        )

    # --- identity and range ------------------------------------------------

    @property
    def ancestor_id(self) -> str | None:
        a = self._meta.ancestor
        return a.hex() if a is not None else None

    @property
    def ancestor_lsn(self) -> int | None:
        return self._meta.ancestor_lsn if self._meta.ancestor is not None else None

    @property
    def branch_lsn(self) -> int:
        """Where this timeline's own history starts (its branch point, or its
        creation LSN for a root). Stays the same after detach."""
        return self._meta.start_lsn

    @property
    def head_lsn(self) -> int:
        return self._head

    @property
    def horizon(self) -> int:
        """The lowest LSN this timeline can still read or branch at."""
        return self._low

    def _set_horizon(self, lsn: int) -> None:
        self._meta.horizon = max(self._meta.horizon, lsn)
        self._low = max(self._meta.start_lsn, self._meta.horizon)

    @property
    def created_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._meta.created_us / 1e6, tz=dt.UTC)

    @property
    def retention(self) -> Retention:
        return self._meta.retention or self._store.config.retention

    def set_retention(self, retention: Retention | None) -> None:
        """Set this timeline's retention policy (None: the store's default)."""
        self._store._set_retention(self, retention)

    def __repr__(self) -> str:
        anc = f" ancestor={self.ancestor_id}@{self.ancestor_lsn}" if self._meta.ancestor else ""
        return f"<Timeline {self.id} head={self._head}{anc}>"

    def _check_live(self) -> None:
        if self._deleted:
            raise NotFoundError("timeline", self.id)
        self._store._check_open()

    def _check_lsn(self, lsn: object, head: int | None = None) -> int:
        if self._deleted:
            raise NotFoundError("timeline", self.id)
        if type(lsn) is not int:
            raise InvalidArgumentError(f"an LSN is an int, got {type(lsn).__name__}")
        low, high = self.horizon, self._head if head is None else head
        if not low <= lsn <= high:
            why = "beyond the head" if lsn > high else "below the retention horizon"
            raise LsnOutOfRangeError(self.id, lsn, low, high, why)
        return lsn

    # --- writes --------------------------------------------------------------

    def commit(self, batch: dict[int, bytes | None], durable: bool = False) -> int:
        """Apply a batch of puts (bytes) and deletes (None) atomically.

        Returns the batch's LSN. With `durable`, returns only once the batch is
        fsynced to the commit log; otherwise it survives a crash of this
        process but not of the machine until the next sync or checkpoint."""
        versions = encode_batch(batch)
        payload = encode_commit(versions)
        store = self._store
        log = store._log
        with self._write_mu:
            self._check_live()
            lsn, time_us, pos = log.append(REC_COMMIT, self._tid, payload, store._now_us())
            m = self._map
            m.open.put(lsn, time_us, versions)
            self._head = lsn
            full = m.open.size >= store.config.inmemory_layer_bytes
            if full:
                self._freeze_locked()
        if durable:
            log.sync(pos)
            if store._remote is not None and store._remote.is_durable(self._tid):
                store._remote.wait_shipped(pos)
        if full:
            store._frozen(self)
        return lsn

    def sync(self, *, shipped: bool = False) -> None:
        """Make every commit so far durable (of this and every other timeline);
        in the object store too, for a timeline in durable mode (engine.remote),
        or with `shipped` (when the store has a remote)."""
        store = self._store
        store._check_open()
        pos = store._log._written
        store._log.sync()
        if store._remote is not None and (shipped or store._remote.is_durable(self._tid)):
            store._remote.wait_shipped(pos)

    def _freeze_locked(self) -> None:
        m = self._map
        if not m.open.versions:
            return
        m.open.frozen_at = self._store._log.last_lsn
        self._map = m.replace(open_layer=InMemoryLayer(), frozen=(m.open,) + m.frozen)

    def freeze(self) -> None:
        with self._write_mu:
            self._freeze_locked()

    # --- reads ----------------------------------------------------------------

    def get(self, key: int, lsn: int | None = None) -> bytes | None:
        """The value of `key` at `lsn` (default: head), or None if absent."""
        if type(key) is not int or not 0 <= key < KEY_LIMIT:
            check_key(key)
        # Order matters: the chain before the map (see the module's notes on
        # detach), the head before the map (the map then holds every commit
        # up to it), the map before the horizon (GC moves the horizon before
        # it swaps in a map without the layers older reads need).
        ci = self._chain_info()
        head = self._head
        m = self._map
        if lsn is None:
            if self._deleted:
                raise NotFoundError("timeline", self.id)
            lsn = head
        elif type(lsn) is not int or not self._low <= lsn <= head or self._deleted:
            self._check_lsn(lsn, head)
        r: Any = m.locate(key, lsn)
        if r is MISS:
            r = self._locate_in_ancestors(key, lsn, ci)
        if r.__class__ is tuple:
            src, v = r
            if src is None:
                return decode(v[1], v[2], v[3])
            return src.read(v)
        return None  # MISS or ABSENT

    def _view(self) -> View:
        """A layer map and the ancestor chain to read with it (the chain
        first: see the module's notes on detach)."""
        ci = self._chain_info()
        return self._map, ci

    def _find(
        self, key: int, lsn: int, view: View | None = None
    ) -> tuple[Layer | None, MemVersion | Entry] | None:
        m, ci = view or self._view()
        r: Any = m.locate(key, lsn)
        if r is MISS:
            r = self._locate_in_ancestors(key, lsn, ci)
        return r if r.__class__ is tuple else None  # type: ignore[return-value]

    def _locate_in_ancestors(self, key: int, lsn: int, ci: ChainInfo) -> object:
        chain, skip = ci
        if not chain:
            return MISS
        if skip is not None and key not in skip:
            tl, cap = chain[-1]
            return tl._map.locate(key, lsn if lsn < cap else cap)
        for tl, cap in chain:
            if lsn > cap:
                lsn = cap
            r = tl._map.locate(key, lsn)
            if r is not MISS:
                return r
        return MISS

    def trace(self, key: int, lsn: int | None = None) -> list[tuple[str, str]]:
        """The layer files a read of (key, lsn) examines, as (timeline id,
        layer file name), in order: a tool to check that reads stay short."""
        m, (chain, _) = self._view()
        lsn = self._head if lsn is None else self._check_lsn(lsn)
        path: list[Layer] = []
        r = m.locate(key, lsn, path)
        if r is MISS:
            for tl, cap in chain:
                lsn = min(lsn, cap)
                if tl._map.locate(key, lsn, path) is not MISS:
                    break
        return [(ly.timeline.hex(), ly.desc.name) for ly in path]

    def _chain(self) -> tuple[tuple[Timeline, int], ...]:
        """The ancestors a read falls through to, with the LSN cap of each."""
        return self._chain_info()[0]

    def _chain_info(self) -> ChainInfo:
        """The chain of ancestors, and a filter for reads that fall through:
        the keys any ancestor but the last has a version of at or below its
        cap (None: no filter). A key outside it is read from the last
        ancestor directly, so a read's cost does not grow with branch depth.
        The ancestors' versions below their caps never change, so neither
        does the filter; it is rebuilt only when an ancestry changes."""
        version, chain, skip = self._chain_cache
        store = self._store
        topology = store._topology  # before building: a change meanwhile forces a rebuild
        if version == topology:
            return chain, skip
        out = []
        meta = self._meta
        cap = 1 << 64
        while meta.ancestor is not None:
            cap = min(cap, meta.ancestor_lsn)
            anc = store._load(meta.ancestor)
            out.append((anc, cap))
            meta = anc._meta
        chain = tuple(out)
        skip = None
        if len(chain) > 1:
            try:
                keys = BitMap64()
                for tl, c in chain[:-1]:
                    m = tl._map
                    for mem in (m.open,) + m.frozen:
                        keys.update(list(mem.versions))
                    for layer in m.layers:
                        if layer.lsn_start <= c:
                            keys |= layer.keys
                skip = FrozenBitMap64(keys)
            except (CorruptionError, OSError):
                skip = None  # a damaged layer: search every level, let it raise
        self._chain_cache = (topology, chain, skip)
        return chain, skip

    def _read_raw(self, found: tuple[Layer | None, MemVersion | Entry]) -> RawVersion:
        src, v = found
        if src is None:
            return v  # type: ignore[return-value]
        e: Entry = v  # type: ignore[assignment]
        return (e[0], e[5], e[3], src.read_stored(e), e[4])

    def _candidate_keys(
        self, lsn: int, first: int, last: int, through_ancestors: bool, view: View | None = None
    ) -> BitMap64:
        keys = BitMap64()
        m, (chain, _) = view or self._view()
        maps = [m]
        if through_ancestors:
            maps += [tl._map for tl, _ in chain]
        for lm in maps:
            for mem in (lm.open,) + lm.frozen:
                keys.update(list(mem.versions))
            for layer in lm.layers:
                keys |= layer.keys
        return clip(keys, first, last)

    def _versions(
        self, lsn: int, first: int = 0, last: int = MAX_KEY, *, local: bool = False,
        view: View | None = None,
    ) -> Iterator[tuple[int, tuple[Layer | None, MemVersion | Entry]]]:
        """(key, where its version is) for every key with a version visible at
        `lsn`, in key order, read from one view (layer map and ancestor
        chain) of this timeline (default: the current one) however long the
        iteration takes. `local`: only this timeline's own versions
        (tombstones included)."""
        view = view or self._view()
        m = view[0]
        for key in self._candidate_keys(lsn, first, last, not local, view):
            if local:
                r = m.locate(key, lsn)
                if r is MISS or r is ABSENT:
                    continue
                yield key, r  # type: ignore[misc]
            else:
                f = self._find(key, lsn, view)
                if f is not None and not found_flags(f) & FLAG_TOMBSTONE:
                    yield key, f

    def _snapshot_at(self, lsn: int | None) -> tuple[View, int]:
        """A view and a checked LSN for a read that takes a while."""
        ci = self._chain_info()
        head = self._head
        m = self._map  # see get() for why this order
        self._check_live()
        return (m, ci), (head if lsn is None else self._check_lsn(lsn, head))

    def scan(
        self, lsn: int | None = None, first: int = 0, last: int = MAX_KEY
    ) -> Iterator[tuple[int, bytes]]:
        """Every (key, value) present at `lsn` with first <= key <= last, by key."""
        view, lsn = self._snapshot_at(lsn)
        for key, found in self._versions(lsn, check_key(first), check_key(last), view=view):
            src, v = found
            value = decode(v[1], v[2], v[3]) if src is None else src.read(v)  # type: ignore[index,arg-type]
            if value is not None:
                yield key, value

    def keys(self, lsn: int | None = None, first: int = 0, last: int = MAX_KEY) -> Iterator[int]:
        for key, _ in self.scan(lsn, first, last):
            yield key

    # --- time -------------------------------------------------------------------

    def lsn_at(self, when: float | int | dt.datetime) -> int:
        """The LSN of this timeline as of a wall-clock time: its newest commit
        at or before `when` (its ancestor's, if it had not committed yet)."""
        self._check_live()
        t_us = to_epoch_us(when)
        lsn = self._lsn_at_us(t_us)
        if lsn is None or lsn < self.horizon:
            low = self.horizon
            raise LsnOutOfRangeError(
                self.id, lsn if lsn is not None else -1, low, self._head,
                f"no retained state as of {dt.datetime.fromtimestamp(t_us / 1e6, dt.UTC).isoformat()}",
            )
        return min(lsn, self._head)

    def _lsn_at_us(self, t_us: int) -> int | None:
        best = self._local_commit_at(t_us)
        if best is not None:
            return best
        meta = self._meta
        if meta.ancestor is not None:
            anc = self._store._load(meta.ancestor)
            a = anc._lsn_at_us(t_us)
            return None if a is None else min(a, meta.ancestor_lsn)
        if t_us >= meta.created_us:
            return meta.start_lsn
        return None

    def _local_commit_at(self, t_us: int) -> int | None:
        """The newest commit of this timeline itself with time <= t_us."""
        m = self._map
        for mem in (m.open,) + m.frozen:
            times = mem.times
            if times and times[0][1] <= t_us:
                i = bisect.bisect_right(times, t_us, key=lambda t: t[1])
                return times[i - 1][0]
        best: int | None = None
        for layer in m.layers:
            d = layer.desc
            if d.time_min_us == 0 or d.time_min_us > t_us or (best is not None and d.lsn_end <= best):
                continue
            times = layer.times()
            i = bisect.bisect_right(times, t_us, key=lambda t: t[1])
            if i:
                best = max(best or 0, times[i - 1][0])
        return best

    def _commit_time_at(self, lsn: int) -> tuple[int, int] | None:
        """(LSN, time µs) of this timeline's newest own commit at or below `lsn`."""
        best: tuple[int, int] | None = None
        m = self._map
        sources: list[list[tuple[int, int]]] = [mem.times for mem in (m.open,) + m.frozen]
        sources += [ly.times() for ly in m.layers if ly.desc.time_min_us and ly.lsn_start <= lsn]
        for times in sources:
            i = bisect.bisect_right(times, (lsn, 1 << 64))
            if i and (best is None or times[i - 1][0] > best[0]):
                best = times[i - 1]
        return best

    # --- accounting -------------------------------------------------------------

    def logical_size(self, lsn: int | None = None) -> int:
        """Bytes of all values visible at `lsn` (uncompressed). Reads indexes,
        not values: about a second per million keys."""
        view, lsn = self._snapshot_at(lsn)
        return sum(found_raw_len(f) for _, f in self._versions(lsn, view=view))

    def usage(self, lsn: int | None = None) -> TimelineUsage:
        return self._store._usage(self, lsn)
