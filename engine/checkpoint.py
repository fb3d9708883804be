"""Flushes and checkpoints: how the log's contents reach layer files.

A *flush* writes a frozen in-memory layer of a timeline to a delta layer
file (write-temp, fsync, rename, fsync-directory), then logs an edit that
adds it and raises the timeline's disk-consistent LSN.

A *checkpoint* seals the current log segment, flushes every timeline with
commits in the sealed segments, writes a manifest snapshot that covers every
edit so far, and only then deletes the sealed segments. A crash at any point
leaves either the old snapshot with the old segments, or the new snapshot
(whose `replay_from` skips the old segments, deleted on the next open).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from . import failpoints
from .fs import ensure_dir, write_atomically
from .layer_file import KIND_DELTA, LayerWriter
from .manifest import SnapshotEntry, TimelineMeta, decode_snapshot, encode_snapshot, encode_timeline

if TYPE_CHECKING:
    from .store import Store
    from .timeline import Timeline

log = logging.getLogger("strata.engine")



def flush_timeline(store: Store, tl: Timeline) -> int:
    """Write every frozen in-memory layer of `tl` to a delta layer file."""
    flushed = 0
    with tl._layers_mu:
        while not tl._deleted:
            m = tl._map
            if not m.frozen:
                break
            mem = m.frozen[-1]
            start = tl._meta.disk_consistent_lsn + 1
            ensure_dir(store.fs, tl._dir)
            w = LayerWriter(
                store.fs, tl._dir, kind=KIND_DELTA, timeline=tl._tid,
                lsn_start=start, lsn_end=mem.frozen_at + 1,
            )
            try:
                for key, v in mem.sorted_versions():
                    w.add(key, v[0], v[1], v[2], v[3], v[4])
                w.add_times(mem.times)
                desc = w.finish()
            except BaseException:
                w.abort()
                raise
            store._replace_layers(tl, [desc], [], dcl=mem.frozen_at, drop_frozen=mem)
            flushed += 1
            log.debug("flushed timeline %s: %s (%d bytes)", tl.id, desc.name, desc.file_size)
    return flushed


def checkpoint(store: Store) -> None:
    with store._checkpoint_mu:
        t0 = time.monotonic()
        new_first = store._log.rotate()
        pinned: set[bytes] = set()
        for first, tls in list(store._log.pins.items()):
            if first < new_first:
                pinned.update(tls)
        for tid in pinned:
            tl = store._timelines.get(tid)
            if tl is not None and not tl._deleted:
                tl.freeze()
                flush_timeline(store, tl)
        write_snapshot(store, new_first)
        if store._remote is not None:
            store._remote.before_drop(new_first)  # (what the object store lacks is shipped first)
        removed = store._log.drop_segments_before(new_first)
        log.info(
            "checkpoint at LSN %d: flushed %d timelines, removed %d log segments, in %.3fs",
            store._log.last_lsn, len(pinned), removed, time.monotonic() - t0,
        )


def write_snapshot(store: Store, replay_from: int) -> None:
    """Write a manifest snapshot of every timeline as of now (write-temp,
    fsync, rename, fsync-directory)."""
    snap = store._snapshot
    assert snap is not None
    with store._mu:
        entries: list[SnapshotEntry] = []
        for tid in sorted(store._timelines):
            tl = store._timelines[tid]
            anc = store._ancestors.get(tid)
            err = store._damaged.get(tid)
            meta: TimelineMeta | None
            if tl is not None:
                meta = tl._meta.copy()
                meta.head_lsn = tl._head
            elif err is not None:
                meta = store._meta_of(tid)
            else:
                meta = store._metas.get(tid)
            if meta is None and tid in snap.table:
                # not decoded, or its block is damaged: carry it over as it is
                _, off, length, csum = snap.table[tid]
                entries.append(SnapshotEntry(tid, anc, snap.buf[off : off + length],
                                             err is not None, csum))
                continue
            assert meta is not None
            if err is not None:
                meta = meta.copy()
                meta.damage = meta.damage or str(err)
            entries.append(SnapshotEntry(tid, anc, encode_timeline(meta), err is not None))
        applied = store._log.last_lsn
        last_time = store._log.last_time_us
        pos = store._log._written
        held = [ly for tl in store._loaded() for ly in tl._map.layers] if store._remote is not None else []
    store._log.sync()  # the heads above are durable before the snapshot says so
    chunks = encode_snapshot(applied, last_time, replay_from, entries)
    mpath = store._manifest_path
    failpoints.hit("manifest-before-swap")
    write_atomically(store.fs, mpath, chunks)
    failpoints.hit("manifest-after-swap")
    if store._remote is not None:  # (it holds `held`, so their files stay until uploaded)
        store._remote.snapshot_written(b"".join(chunks), replay_from, applied, pos, held)
    with store._mu:
        store._snapshot = decode_snapshot(mpath, b"".join(chunks))
        # decoded metadata now in the snapshot can be decoded again on demand
        for tid in [t for t in store._metas if t in store._snapshot.table and t not in store._damaged]:
            del store._metas[tid]

