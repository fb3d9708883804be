"""The store: one directory holding timelines, their layers and the log.

Layout::

    <store>/LOCK                       flock'd while a process has it open
    <store>/manifest                   last snapshot (engine.manifest)
    <store>/log/<first LSN>.log        commit log segments (engine.wal)
    <store>/timelines/<id>/*.layer     each timeline's layer files (engine.layer_file)

Durability protocol: every change is a record in the commit log first.
Commits stay in in-memory layers until a flush writes them to a delta layer
file; the flush is an edit record. A checkpoint seals the current log
segment, flushes every timeline with commits in the sealed segments, writes a
manifest snapshot, and deletes the sealed segments. Opening replays the log
from the snapshot's `replay_from` segment: edits above its `applied_lsn`,
commits above their timeline's disk-consistent LSN. Closing checkpoints.

Lock order (outer first): a timeline's layers lock, the store lock, a
timeline's write lock, the log's lock. Commits take only the last two.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Iterable

from . import checkpoint as _checkpoint
from . import failpoints
from .background import Background
from .check import CheckReport, check_store
from .checkpoint import flush_timeline
from .clock import Clock, system_clock
from .compaction import CompactionResult, Progress, compact_timeline, write_image
from .config import Retention, StoreConfig
from .errors import (
    AlreadyExistsError,
    CorruptionError,
    HasChildrenError,
    InvalidArgumentError,
    NotFoundError,
    StoreClosedError,
)
from .fs import FileLock, FileSystem, OsFileSystem, ReadFile, ensure_dir, remove_tree
from .gc import GcResult, gc_timeline, needed_layers
from .inmemory_layer import InMemoryLayer
from .keyspace import partitions
from .layer_file import Layer, LayerDesc
from .manifest import (
    Snapshot,
    TimelineMeta,
    apply_edit,
    decode_edit,
    edit_create,
    edit_drop,
    edit_horizon,
    edit_layers,
    edit_retention,
)
from .recovery import recover
from .remote import Remote, read_local_state
from .timeline import Timeline, TimelineUsage
from .values import MAX_KEY
from .wal import REC_EDIT, CommitLog

log = logging.getLogger("strata.engine")

MANIFEST = "manifest"
LOG_DIR = "log"
TIMELINES_DIR = "timelines"


def _remove_file(fs: FileSystem, path: str) -> None:
    try:
        fs.remove(path)
    except OSError:
        pass  # gone already, or it will be found unlisted on the next open


def _parse_id(ident: object) -> bytes:
    if isinstance(ident, Timeline):
        return ident._tid
    if isinstance(ident, str) and len(ident) == 32:
        try:
            return bytes.fromhex(ident)
        except ValueError:
            pass
    raise InvalidArgumentError(f"a timeline id is 32 hex digits or a Timeline, got {ident!r}")


class Store:
    """A directory of timelines. Open with `Store.open(path)`; thread-safe."""

    def __init__(self, path: str, fs: FileSystem, clock: Clock, config: StoreConfig) -> None:
        self.path = path
        self.fs = fs
        self.config = config
        self._clock = clock
        self._timelines_dir = os.path.join(path, TIMELINES_DIR)
        self._manifest_path = os.path.join(path, MANIFEST)
        self._log_dir = os.path.join(path, LOG_DIR)
        self._mu = threading.RLock()
        self._checkpoint_mu = threading.Lock()
        self._timelines: dict[bytes, Timeline | None] = {}  # None: not decoded yet
        self._ancestors: dict[bytes, bytes | None] = {}
        self._children: dict[bytes, set[bytes]] = {}
        self._metas: dict[bytes, TimelineMeta] = {}  # decoded, Timeline not built yet
        self._damaged: dict[bytes, CorruptionError] = {}
        self._incarnation: dict[bytes, int] = {}  # id -> LSN of its last create/drop (recovery)
        self._snapshot: Snapshot | None = None
        self._topology = 0  # bumped when an ancestor link changes
        self._closed = False
        self._log: CommitLog = None  # type: ignore[assignment]
        self._lock: FileLock | None = None
        self._bg: Background | None = None
        self._remote: Remote | None = None
        self._restored_through = 0  # (engine.recovery: layer edits up to it are not replayed)

    # --- opening ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        config: StoreConfig | None = None,
        fs: FileSystem | None = None,
        clock: Clock | None = None,
        background: bool = True,
        remote: Remote | None = None,
    ) -> Store:
        """Open the store at `path`, creating it if missing, and recover it.
        With `remote` (engine.remote), the store also lives in an object
        store: opening takes the next generation there and uploads.

        Raises StoreLockedError if another process (or Store) has it open,
        CorruptionError if the manifest or a synced log segment is damaged."""
        fs = fs or OsFileSystem()
        path = os.path.abspath(os.fspath(path))
        if fs.exists(path) and not fs.isdir(path):
            raise InvalidArgumentError(f"store path {path} exists and is not a directory")
        store = cls(path, fs, clock or system_clock, config or StoreConfig())
        ensure_dir(fs, path)
        lock = store._lock = fs.lock(os.path.join(path, "LOCK"))
        try:
            state = read_local_state(path)
            store._restored_through = (state or {}).get("restored_through", 0)
            store._remote = remote  # (before recovery builds layers: they fetch what is missing)
            recover(store)
            if remote is not None:
                remote.attach(store)
        except BaseException:
            if remote is not None:
                remote.abandon()
            if store._log is not None:
                with contextlib.suppress(Exception):
                    store._log.close()
            lock.release()
            raise
        if background:
            store._bg = Background(store)
        return store

    def _meta_of(self, tid: bytes) -> TimelineMeta | None:
        """Decoded metadata of a timeline (decoding it from the snapshot)."""
        tl = self._timelines.get(tid)
        if tl is not None:
            return tl._meta
        meta = self._metas.get(tid)
        if meta is None:
            assert self._snapshot is not None
            try:
                meta = self._snapshot.load(tid)
            except CorruptionError as e:
                self._mark_damaged(tid, e)
                return None
            self._metas[tid] = meta
        return meta

    def _mark_damaged(self, tid: bytes, err: CorruptionError) -> None:
        """Take a timeline out of service (kept so across checkpoints until it
        is deleted). A damaged create record leaves only its id: the timeline
        is kept as a placeholder so that it cannot silently vanish."""
        if tid in self._damaged:
            return
        log.error("timeline %s is out of service: %s", tid.hex(), err)
        self._damaged[tid] = err
        if tid not in self._timelines:
            self._timelines[tid] = None
            self._metas[tid] = TimelineMeta(tid, None, 0, 0, 0, 0, 0, 0, damage=str(err))

    def _link(self, tid: bytes, anc: bytes | None, old: bytes | None = None) -> None:
        if old is not None:
            self._children.get(old, set()).discard(tid)
        self._ancestors[tid] = anc
        if anc is not None:
            self._children.setdefault(anc, set()).add(tid)
        if old is not None:
            self._topology += 1  # a live timeline's ancestry changed

    def _forget(self, tid: bytes) -> None:
        self._timelines.pop(tid, None)
        self._metas.pop(tid, None)
        self._damaged.pop(tid, None)
        anc = self._ancestors.pop(tid, None)
        if anc is not None:
            self._children.get(anc, set()).discard(tid)

    def _load(self, tid: bytes) -> Timeline:
        """The Timeline object for an id, building it on first use."""
        tl = self._timelines.get(tid)
        if tl is not None:
            return tl
        with self._mu:
            if tid not in self._timelines:
                raise NotFoundError("timeline", tid.hex())
            if tid in self._damaged:
                raise self._damaged[tid]
            tl = self._timelines[tid]
            if tl is not None:
                return tl
            meta = self._meta_of(tid)
            if meta is None:
                raise self._damaged[tid]
            tl = self._build(meta)
            self._metas.pop(tid, None)
            self._timelines[tid] = tl
            return tl

    def _build(self, meta: TimelineMeta) -> Timeline:
        tdir = os.path.join(self._timelines_dir, meta.id.hex())
        fetch = self._fetch_layer if self._remote is not None else None
        return Timeline(self, meta, [Layer(self.fs, tdir, d, meta.id, fetch) for d in meta.layers.values()])

    def _fetch_layer(self, ly: Layer) -> ReadFile | None:
        assert self._remote is not None
        return self._remote.open_layer(ly)

    # --- lifecycle --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(self.path)

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    @property
    def last_lsn(self) -> int:
        return self._log.last_lsn

    def close(self) -> None:
        """Checkpoint (every commit becomes durable and lands in a layer file)
        and release the store."""
        if self._closed:
            return
        self._stop_background()
        try:
            if self._log._failed is None:
                self.checkpoint()
                if self._remote is not None:
                    self._remote.wait_uploaded()
        finally:
            if self._remote is not None:
                self._remote.close()
            self._closed = True
            try:
                self._log.close()
            finally:
                if self._lock is not None:
                    self._lock.release()
            log.info("closed store %s at LSN %d", self.path, self._log.last_lsn)

    def abandon(self) -> None:
        """Let go of the store without checkpointing, as if the process had
        been killed: commits not yet synced may be lost, and the next open
        recovers from the log. For crash tests and emergency shutdown."""
        if self._closed:
            return
        self._stop_background()
        if self._remote is not None:
            self._remote.abandon()
        self._closed = True
        self._log._failed = self._log._failed or StoreClosedError(self.path)
        if self._log._file is not None:
            self._log._file.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sync(self) -> None:
        """Make every commit so far durable."""
        self._check_open()
        self._log.sync()

    # --- timelines -----------------------------------------------------------------

    def create_timeline(
        self, timeline_id: str | None = None, *, retention: Retention | None = None
    ) -> Timeline:
        """A new, empty root timeline."""
        return self._create(timeline_id, None, 0, retention, durable=True)

    def branch(
        self,
        parent: Timeline | str,
        at_lsn: int | None = None,
        *,
        timeline_id: str | None = None,
        retention: Retention | None = None,
        durable: bool = True,
    ) -> Timeline:
        """A new timeline that starts as `parent` at `at_lsn` (default: its
        head). Writes one log record: its cost does not depend on the data."""
        return self._create(timeline_id, parent, at_lsn, retention, durable)

    def _create(
        self,
        timeline_id: str | None,
        parent: Timeline | str | None,
        at_lsn: int | None,
        retention: Retention | None,
        durable: bool,
    ) -> Timeline:
        self._check_open()
        if retention is not None and not isinstance(retention, Retention):
            raise InvalidArgumentError(f"retention must be a Retention, got {type(retention).__name__}")
        tid = _parse_id(timeline_id) if timeline_id is not None else os.urandom(16)
        with self._mu:
            self._check_open()
            if tid in self._timelines:
                raise AlreadyExistsError("timeline", tid.hex())
            now = self._now_us()
            if parent is None:
                anc, start = None, self._log.last_lsn
            else:
                ptl = self._load(_parse_id(parent))
                ptl._check_live()
                start = ptl.head_lsn if at_lsn is None else ptl._check_lsn(at_lsn)
                anc = ptl._tid
            failpoints.hit("timeline-before-create")
            meta = TimelineMeta(
                id=tid, ancestor=anc, ancestor_lsn=start if anc else 0, start_lsn=start,
                head_lsn=start, disk_consistent_lsn=start, horizon=0, created_us=now,
                retention=retention,
            )
            _, _, pos = self._log.append(REC_EDIT, tid, edit_create(meta), now)
            tl = Timeline(self, meta, [])
            self._timelines[tid] = tl
            self._link(tid, anc)
        if durable:
            self._log.sync(pos)
            failpoints.hit("timeline-after-create")
        log.info(
            "created timeline %s%s", tl.id,
            f" from {anc.hex()} at LSN {start}" if anc else f" at LSN {start}",
        )
        return tl

    def timeline(self, timeline_id: str) -> Timeline:
        self._check_open()
        return self._load(_parse_id(timeline_id))

    def __contains__(self, timeline_id: str) -> bool:
        try:
            return _parse_id(timeline_id) in self._timelines
        except InvalidArgumentError:
            return False

    def timeline_ids(self) -> list[str]:
        """Ids of every timeline, damaged ones included, without loading them."""
        return sorted(t.hex() for t in list(self._timelines))

    def timelines(self) -> list[Timeline]:
        """Every timeline that is not damaged (loads them all)."""
        self._check_open()
        out = []
        for tid in list(self._timelines):
            if tid not in self._damaged:
                try:
                    out.append(self._load(tid))
                except (CorruptionError, NotFoundError):
                    continue
        return sorted(out, key=lambda t: t.id)

    def check(self, max_lsns: int = 16) -> CheckReport:
        """Verify everything: checksums of every file and value, that the
        manifest and the files agree, that every timeline reads back at its
        retained LSNs. Returns the problems found (engine/check.py)."""
        self._check_open()
        return check_store(self, max_lsns)

    def damaged(self) -> dict[str, CorruptionError]:
        """Timelines that cannot be served, with the error that says why."""
        return {t.hex(): e for t, e in self._damaged.items()}

    def children(self, timeline: Timeline | str) -> list[str]:
        return sorted(c.hex() for c in self._children.get(_parse_id(timeline), ()))

    def delete_timeline(self, timeline: Timeline | str) -> None:
        """Delete a timeline and its files. Refused (HasChildrenError) while
        other timelines branch from it: delete or detach those first. A
        timeline that is out of service (damaged) can be deleted."""
        self._check_open()
        tid = _parse_id(timeline)
        try:
            tl: Timeline | None = self._load(tid)
        except CorruptionError:
            tl = None  # damaged: nothing runs on it
        with tl._layers_mu if tl is not None else contextlib.nullcontext(), self._mu:
            if tid not in self._timelines:
                raise NotFoundError("timeline", tid.hex())
            kids = self._children.get(tid)
            if kids:
                raise HasChildrenError(tid.hex(), [k.hex() for k in kids])
            failpoints.hit("timeline-before-delete")
            if tl is not None:
                with tl._write_mu:
                    tl._deleted = True
            _, _, pos = self._log.append(REC_EDIT, tid, edit_drop(), self._now_us())
            self._forget(tid)
            # The drop is durable before the files go, and the directory is
            # moved aside before the id can be used again.
            self._log.sync(pos)
            failpoints.hit("timeline-after-delete")
            tdir = os.path.join(self._timelines_dir, tid.hex())
            doomed = None
            if self.fs.isdir(tdir):
                doomed = os.path.join(self._timelines_dir, f"deleted-{tid.hex()}-{os.urandom(4).hex()}")
                self.fs.rename(tdir, doomed)
        if doomed is not None:
            remove_tree(self.fs, doomed)
        log.info("deleted timeline %s", tid.hex())

    def detach(self, timeline: Timeline | str, *, progress: Progress | None = None) -> Timeline:
        """Give a timeline its own copy of what it reads from its ancestors
        (complete images at its branch point), then cut it loose from them."""
        self._check_open()
        tl = self._load(_parse_id(timeline))
        t0 = time.monotonic()
        with tl._layers_mu:
            tl._check_live()
            meta = tl._meta
            if meta.ancestor is None:
                raise InvalidArgumentError(f"timeline {tl.id} has no ancestor to detach from")
            anc = self._load(meta.ancestor)
            at = meta.ancestor_lsn
            keys = anc._candidate_keys(at, 0, MAX_KEY, True)
            written: list[LayerDesc] = []
            ensure_dir(self.fs, tl._dir)
            try:
                parts = partitions(keys, self.config.image_partition_keys) or [(0, MAX_KEY)]
                for part in parts:
                    written.append(write_image(self, tl, at, part, True, source=anc))
                    if progress is not None:
                        progress(len(written), len(parts))
            except BaseException:
                self._discard_files(tl, written)
                raise
            self._replace_layers(tl, written, [], detach=True)
        if self._remote is not None:
            # A restored log's layer edits are skipped (engine.recovery): a
            # detach counts only once an index holds it, before its parent
            # may go.
            self.checkpoint()
            self._remote.wait_uploaded()
        log.info(
            "detached timeline %s from %s at LSN %d: %d images, %d bytes, in %.2fs",
            tl.id, anc.id, at, len(written), sum(d.file_size for d in written), time.monotonic() - t0,
        )
        return tl

    def _set_retention(self, tl: Timeline, retention: Retention | None) -> None:
        if retention is not None and not isinstance(retention, Retention):
            raise InvalidArgumentError(f"retention must be a Retention or None, got {type(retention).__name__}")
        with self._mu:
            tl._check_live()
            _, _, pos = self._log.append(REC_EDIT, tl._tid, edit_retention(retention), self._now_us())
            tl._meta.retention = retention
        self._log.sync(pos)

    # --- layer changes ----------------------------------------------------------------

    def _replace_layers(
        self, tl: Timeline, added: list[LayerDesc], removed: list[LayerDesc],
        dcl: int = 0, detach: bool = False, drop_frozen: InMemoryLayer | None = None,
    ) -> None:
        """Log and apply a change of a timeline's layer set (the caller holds
        the timeline's layers lock and has made the added files durable).

        The new layer map is in use at once; the files of removed layers are
        deleted once the edit is durable and no reader still holds them."""
        gone = {d.name for d in removed}
        with self._mu:
            head = drop_frozen.lsn_max if drop_frozen is not None else 0
            payload = edit_layers(added, removed, dcl, head, detach)
            try:
                tl._check_live()
                _, _, pos = self._log.append(REC_EDIT, tl._tid, payload, self._now_us())
            except BaseException:
                self._discard_files(tl, added)
                raise
            meta = tl._meta
            old_anc = meta.ancestor
            tl._layers_gen += 1
            fetch = self._fetch_layer if self._remote is not None else None  # (evicted later, fetched back)
            new = [Layer(self.fs, tl._dir, d, tl._tid, fetch) for d in added]
            with tl._write_mu:
                cur = tl._map
                keep = [ly for ly in cur.layers if ly.desc.name not in gone]
                frozen = cur.frozen
                if drop_frozen is not None:
                    frozen = tuple(f for f in frozen if f is not drop_frozen)
                tl._map = cur.replace(frozen=frozen, layers=keep + new)
            # A detach drops the ancestor only now, after the map has the base images the
            # reads need from now on (a read takes its chain before its map: engine.timeline).
            apply_edit(meta, decode_edit(payload, "", 0))
            if detach:
                self._link(tl._tid, None, old_anc)
            retiring = [ly for ly in cur.layers if ly.desc.name in gone]
            del cur
        self._log.sync(pos)
        for ly in retiring:
            ly.retire(functools.partial(_remove_file, self.fs, ly.path))

    def _discard_files(self, tl: Timeline, descs: Iterable[LayerDesc]) -> None:
        for d in descs:
            try:
                self.fs.remove(os.path.join(tl._dir, d.name))
            except OSError:
                pass

    def _advance_horizon(self, tl: Timeline, target: int) -> tuple[bool, list[int] | None]:
        """Move a timeline's horizon up to `target` (logged) and return the
        branch points of its children, atomically with respect to branching."""
        with self._mu:
            tl._check_live()
            moved = target > tl._meta.horizon and target > tl._meta.start_lsn
            if moved:
                _, _, pos = self._log.append(REC_EDIT, tl._tid, edit_horizon(target), self._now_us())
                self._log.sync(pos)
                tl._set_horizon(target)
            return moved, self._branch_points(tl)

    def _branch_points(self, tl: Timeline) -> list[int] | None:
        """The LSNs at which children branch from `tl` (None if a child's
        metadata is unreadable: then nothing of `tl` may be collected)."""
        points = []
        for c in self._children.get(tl._tid, ()):
            meta = self._meta_of(c)
            if meta is None or meta.ancestor != tl._tid:
                return None
            points.append(meta.ancestor_lsn)
        return points

    # --- flush and checkpoint -----------------------------------------------------------

    def _frozen(self, tl: Timeline) -> None:
        """A commit froze an in-memory layer: write it out (or have it written)."""
        if self._bg is not None and len(tl._map.frozen) < 2:
            self._bg.wake()
        else:
            flush_timeline(self, tl)

    def flush(self, timeline: Timeline | str | None = None) -> int:
        """Write in-memory layers to delta layer files (of one timeline, or all
        loaded ones). Returns the number of layer files written."""
        self._check_open()
        tls = [self._load(_parse_id(timeline))] if timeline is not None else self._loaded()
        n = 0
        for tl in tls:
            tl.freeze()
            n += flush_timeline(self, tl)
        return n

    def _loaded(self) -> list[Timeline]:
        return [t for t in list(self._timelines.values()) if t is not None and not t._deleted]

    # --- maintenance -------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Seal the log, flush what it holds to layer files, write a manifest
        snapshot and delete the sealed log segments."""
        self._check_open()
        _checkpoint.checkpoint(self)

    def compact(
        self, timeline: Timeline | str | None = None, *, force_images: bool = False,
        progress: Progress | None = None,
    ) -> list[CompactionResult]:
        """Compact one timeline, or every loaded one. Flushes first.
        `progress(done, total)` is called as layer files are written."""
        self._check_open()
        tls = [self._load(_parse_id(timeline))] if timeline is not None else self._loaded()
        out = []
        for tl in tls:
            tl.freeze()
            flush_timeline(self, tl)
            out.append(compact_timeline(self, tl, force_images, progress))
        return out

    def gc(self, timeline: Timeline | str | None = None) -> GcResult:
        """Move horizons as retention allows and delete layers no retained
        read needs (of one timeline, or of every timeline)."""
        self._check_open()
        tids = [_parse_id(timeline)] if timeline is not None else list(self._timelines)
        return self._gc_pass(tids, skip_small=False)

    def _gc_pass(self, tids: Iterable[bytes], skip_small: bool) -> GcResult:
        total = GcResult()
        now = self._now_us()
        for tid in tids:
            if tid in self._damaged:
                continue
            try:
                tl = self._load(tid)
            except (NotFoundError, CorruptionError):
                continue  # gone meanwhile, or out of service
            if skip_small and len(tl._map.layers) < 2:
                continue  # nothing to delete; its horizon moves when there is
            try:
                total.add(gc_timeline(self, tl, now))
            except NotFoundError:
                continue  # deleted while it ran
        return total

    def _usage(self, tl: Timeline, lsn: int | None) -> TimelineUsage:
        tl._check_live()
        with tl._layers_mu:
            descs = [ly.desc for ly in tl._map.layers]
            with self._mu:
                points = self._branch_points(tl)
            if points is None:  # a child is unreadable: count everything as pinned
                points = [tl._meta.start_lsn] + [d.lsn_start for d in descs]
            own = needed_layers(descs, start_lsn=tl._meta.start_lsn, horizon=tl.horizon)
            kids = needed_layers(descs, start_lsn=tl._meta.start_lsn, horizon=None, points=points)
            m = tl._map
            inmem = sum(x.size for x in (m.open,) + m.frozen)
        at = tl.head_lsn if lsn is None else lsn
        return TimelineUsage(
            lsn=at,
            logical_size=tl.logical_size(at),
            physical_size=sum(d.file_size for d in descs),
            exclusive_size=sum(d.file_size for d in descs if d.name not in kids),
            pinned_by_children=sum(d.file_size for d in descs if d.name in kids and d.name not in own),
            inmemory_size=inmem,
        )

    def disk_usage(self) -> int:
        """Bytes of every file in the store directory."""
        from .fs import walk_files

        return sum(size for _, size in walk_files(self.fs, self.path))

    # --- background work ---------------------------------------------------------------

    @property
    def background_error(self) -> BaseException | None:
        """The last error of the background thread (None: all went well)."""
        return self._bg.error if self._bg is not None else None

    def _stop_background(self) -> None:
        if self._bg is not None:
            self._bg.stop()
            self._bg = None
