"""Opening a store: from the last manifest snapshot and the log to a store
that serves.

1. Read the snapshot (`engine.manifest`): the timelines as of its
   `applied_lsn`, each decoded only when first needed.
2. Pass 1 over the log segments from `replay_from`: check each segment,
   cut a torn tail (`engine.wal`), apply the edits above `applied_lsn`, and
   take out of service the timelines whose records are damaged.
3. Pass 2: put back in memory the commits that are not in a layer file yet
   (above their timeline's final disk-consistent LSN, and made by the
   timeline that has the id now, not an earlier one that was deleted).
4. Make the last segment durable, start a new one, and remove what the
   manifest does not list.

A store just restored from its object store (`engine.remote.restore`)
replays a log whose layer edits, up to `restored_through`, are skipped:
they name layer files that never reached the object store.

Recovery is idempotent: a crash during it is recovered the same way.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from .errors import CorruptionError
from .fs import TMP_SUFFIX, ensure_dir, remove_tree, write_atomically
from .layer_file import parse_layer_name
from .manifest import OP_CREATE, OP_DROP, OP_LAYERS, apply_edit, decode_edit, decode_snapshot, encode_snapshot
from .wal import REC_COMMIT, REC_EDIT, CommitLog, Record, decode_commit, list_segments, scan_segment

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("strata.engine")



def recover(store: Store) -> None:
    t0 = time.monotonic()
    fs = store.fs
    mpath = store._manifest_path
    log_dir = store._log_dir
    if fs.exists(mpath + TMP_SUFFIX):
        fs.remove(mpath + TMP_SUFFIX)
    if not fs.exists(mpath):
        if (fs.isdir(log_dir) and fs.listdir(log_dir)) or (
            fs.isdir(store._timelines_dir) and fs.listdir(store._timelines_dir)
        ):
            raise CorruptionError(mpath, 0, "manifest missing from a store that has data")
        write_atomically(fs, mpath, encode_snapshot(0, 0, 1, []))
    snap = decode_snapshot(mpath, fs.read_file(mpath))
    store._snapshot = snap
    for tid, (anc, off, _, _) in snap.table.items():
        store._timelines[tid] = None
        store._link(tid, anc)
        if tid in snap.damaged:
            meta = store._meta_of(tid)  # a damaged block marks itself
            if meta is not None:
                store._mark_damaged(tid, CorruptionError(
                    mpath, off, f"timeline out of service since an earlier open: {meta.damage}"))

    ensure_dir(fs, log_dir)
    segments = list_segments(fs, log_dir)
    last_lsn, last_time = snap.applied_lsn, snap.last_time_us
    pins: dict[int, dict[bytes, int]] = {}
    replayed = 0
    prev: int | None = None
    live: list[tuple[int, str]] = []
    # Pass 1: check every segment, cut a torn tail, apply the edits. The
    # commits wait for pass 2, when each timeline's disk-consistent LSN
    # (which a later flush edit may raise) is final.
    for i, (first, spath) in enumerate(segments):
        if first < snap.replay_from:
            fs.remove(spath)  # a checkpoint died before deleting it
            continue
        is_last = i == len(segments) - 1
        scan = scan_segment(fs, spath, is_last)
        if scan.first_record is not None:
            if scan.first_record != first or (prev is not None and first != prev + 1):
                raise CorruptionError(spath, 32, "log segment does not continue the log",
                                      first if prev is None else prev + 1, scan.first_record)
            prev = scan.last_record
        for rec in scan.records:
            if rec.type == REC_EDIT:
                replay_edit(store, rec, snap.applied_lsn)
            last_lsn = max(last_lsn, rec.lsn)
            last_time = max(last_time, rec.time_us)
        for tl_bytes, offset, why in scan.damaged:
            store._mark_damaged(tl_bytes, CorruptionError(spath, offset, why))
        if scan.last_record is not None:
            last_lsn = max(last_lsn, scan.last_record)  # damaged records took LSNs too
        if scan.torn:
            log.warning("cut torn tail of %s at offset %d (%d bytes)", spath, scan.end, scan.size - scan.end)
            fs.truncate(spath, scan.end)
        elif is_last and scan.records:
            # what a killed process left in the page cache is made durable
            # before new records (and new segments) build on it
            f = fs.open_append(spath)
            f.sync()
            f.close()
        if not scan.records and not scan.damaged:
            fs.remove(spath)  # nothing in it (a new segment, or all torn)
            fs.sync_dir(log_dir)
        else:
            live.append((first, spath))
    # Pass 2: commits not yet in a layer file go back to memory.
    for first, spath in live:
        pins[first] = {}
        for rec in scan_segment(fs, spath, False).records:
            if rec.type == REC_COMMIT:
                replayed += replay_commit(store, rec, pins[first])
    store._log = CommitLog(
        fs, log_dir, last_lsn=last_lsn, last_time_us=last_time,
        segment_bytes=store.config.log_segment_bytes, store_path=store.path,
    )
    store._log.pins.update(pins)
    remove_unlisted_files(store)
    log.info(
        "opened store %s: %d timelines, replayed %d log records, last LSN %d, in %.3fs",
        store.path, len(store._timelines), replayed, last_lsn, time.monotonic() - t0,
    )

def remove_unlisted_files(store: Store) -> None:
    """Remove what the manifest does not list: directories of timelines
    that no longer exist (dropped, or created and lost in a crash), and
    files in live timelines' directories that no layer names (temporary
    files, layers of a flush or compaction that a crash interrupted).
    Timelines that never wrote a layer have no directory: no cost."""
    fs = store.fs
    if not fs.isdir(store._timelines_dir):
        return
    for name in fs.listdir(store._timelines_dir):
        tdir = os.path.join(store._timelines_dir, name)
        try:
            tid = bytes.fromhex(name) if len(name) == 32 else None
        except ValueError:
            tid = None
        if tid is None or tid not in store._timelines:
            remove_tree(fs, tdir)
            continue
        meta = store._meta_of(tid)
        if meta is None or tid in store._damaged:
            continue  # out of service: leave its files for whoever investigates
        for fname in fs.listdir(tdir):
            if fname not in meta.layers:
                fs.remove(os.path.join(tdir, fname))
                if parse_layer_name(fname):
                    log.info("removed layer file %s/%s that the manifest does not list", name, fname)

def replay_edit(store: Store, rec: Record, applied_lsn: int) -> None:
    tid = rec.timeline
    edit = decode_edit(rec.payload, rec.path, rec.offset)
    if edit.op in (OP_CREATE, OP_DROP):
        # commits of an earlier timeline with the same id are not its
        store._incarnation[tid] = max(store._incarnation.get(tid, 0), rec.lsn)
    if rec.lsn <= applied_lsn:
        return
    if edit.op == OP_LAYERS and rec.lsn <= store._restored_through:
        # A restored log's layer edits name files its writer never
        # uploaded: the layers of the index stay, and the commits they would
        # have covered, all in the log after it, go back to memory instead.
        return
    if edit.op == OP_CREATE:
        assert edit.meta is not None
        if tid not in store._timelines:
            store._metas[tid] = edit.meta
            store._timelines[tid] = None
            store._link(tid, edit.meta.ancestor)
    elif edit.op == OP_DROP:
        store._forget(tid)
    elif tid in store._timelines:
        meta = store._meta_of(tid)
        if meta is not None:
            old_anc = meta.ancestor
            apply_edit(meta, edit)
            if meta.ancestor != old_anc:
                store._link(tid, meta.ancestor, old_anc)

def replay_commit(store: Store, rec: Record, pins: dict[bytes, int]) -> int:
    tid = rec.timeline
    if tid not in store._timelines or tid in store._damaged:
        return 0  # dropped later in the log, or beyond repair
    if rec.lsn < store._incarnation.get(tid, 0):
        return 0  # written by an earlier timeline that had this id
    meta = store._meta_of(tid)
    if meta is None or rec.lsn <= meta.disk_consistent_lsn:
        return 0
    try:
        versions = decode_commit(rec.payload, rec.path, rec.offset)
    except CorruptionError as e:
        store._mark_damaged(tid, e)
        return 0
    tl = store._load(tid)
    tl._map.open.put(rec.lsn, rec.time_us, versions)
    tl._head = max(tl._head, rec.lsn)
    pins[tid] = rec.lsn
    return 1

