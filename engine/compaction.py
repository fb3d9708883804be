"""Compaction: keep the number of layers a read consults bounded.

Two steps, planned from layer descriptors alone by `plan_compaction` (pure,
property-tested without a disk) and carried out by `compact_timeline`:

1. *Merge*: runs of at least `merge_threshold` consecutive small deltas (under
   half of `delta_target_bytes`) are merged into deltas of about
   `delta_target_bytes`. A run never spans an image's LSN, so the deltas
   below an image can later be garbage collected whole.
2. *Images*: the key space is cut into partitions of `image_partition_keys`
   keys. A partition with `image_threshold` or more deltas holding its keys
   above its newest image gets a new image at the timeline's disk-consistent
   LSN (or its head, if lower). A read at any LSN then meets at most about
   `image_threshold` deltas before an image ends its search (images at older
   LSNs stay until GC, so reads at old LSNs are bounded too).

Images of a timeline with an ancestor are *local* (its own keys and
tombstones only: the ancestor's data is not copied into every branch); those
of a root or detached timeline are *complete*.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import failpoints
from .config import StoreConfig
from .keyspace import KeyRange, count_in, partitions
from .layer_file import KIND_DELTA, KIND_IMAGE, Entry, Layer, LayerDesc, LayerWriter
from .timeline import found_flags
from .values import FLAG_TOMBSTONE, MAX_KEY

if TYPE_CHECKING:
    from .store import Store
    from .timeline import Timeline

log = logging.getLogger("strata.engine")

Progress = Callable[[int, int], None]  # (done, total)



@dataclass(frozen=True)
class CompactionPlan:
    merges: tuple[tuple[LayerDesc, ...], ...] = ()
    image_ranges: tuple[KeyRange, ...] = ()
    image_lsn: int = 0

    @property
    def empty(self) -> bool:
        return not self.merges and not self.image_ranges


@dataclass
class CompactionResult:
    timeline: str
    merged: int = 0  # delta layers merged away
    deltas_written: int = 0
    images_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    removed: list[LayerDesc] = field(default_factory=list)


def plan_compaction(
    layers: Sequence[LayerDesc],
    *,
    start_lsn: int,
    disk_consistent_lsn: int,
    parts: Sequence[KeyRange],
    holds: Callable[[LayerDesc, KeyRange], bool],
    config: StoreConfig,
    force_images: bool = False,
) -> CompactionPlan:
    """Decide what to merge and where to write images.

    `holds(desc, range)` tells whether a delta holds a key in the range (the
    executor answers from key bitmaps). With `force_images`, every partition
    with anything above its newest image gets an image now."""
    local = [d for d in layers if d.lsn_start > start_lsn]
    deltas = sorted((d for d in local if not d.is_image), key=lambda d: d.lsn_start)
    image_lsns = {d.lsn_start for d in layers if d.is_image}
    small = config.delta_target_bytes // 2

    # 1. merges
    runs: list[list[LayerDesc]] = []
    run: list[LayerDesc] = []
    for d in deltas:
        breaks = (
            d.file_size >= small
            or (run and (run[-1].lsn_end != d.lsn_start or run[-1].lsn_end - 1 in image_lsns))
        )
        if breaks and run:
            runs.append(run)
            run = []
        if d.file_size < small:
            run.append(d)
    if run:
        runs.append(run)
    merges: list[tuple[LayerDesc, ...]] = []
    for run in runs:
        if len(run) < config.merge_threshold:
            continue
        group: list[LayerDesc] = []
        size = 0
        for d in run:
            if group and size + d.file_size > config.delta_target_bytes:
                if len(group) > 1:
                    merges.append(tuple(group))
                group, size = [], 0
            group.append(d)
            size += d.file_size
        if len(group) > 1:
            merges.append(tuple(group))

    # 2. images, counted over the deltas as they will be after merging
    merged_away = {d.name for g in merges for d in g}
    after: list[Sequence[LayerDesc]] = [g for g in merges]
    after += [(d,) for d in deltas if d.name not in merged_away]
    images = [d for d in layers if d.is_image]
    ranges: list[KeyRange] = []
    for part in parts:
        newest = max(
            (d.lsn_start for d in images if d.key_first <= part[0] and d.key_last >= part[1]),
            default=-1,
        )
        if disk_consistent_lsn <= newest or disk_consistent_lsn <= start_lsn:
            continue
        above = sum(
            1 for g in after
            if g[-1].lsn_end - 1 > newest and any(holds(d, part) for d in g)
        )
        if above >= config.image_threshold or (force_images and above > 0):
            ranges.append(part)
    return CompactionPlan(tuple(merges), tuple(ranges), disk_consistent_lsn if ranges else 0)


# --- execution -----------------------------------------------------------------


def _bitmap_holds(by_name: dict[str, Layer]) -> Callable[[LayerDesc, KeyRange], bool]:
    def holds(d: LayerDesc, part: KeyRange) -> bool:
        return count_in(by_name[d.name].keys, part[0], part[1]) > 0

    return holds


def compact_timeline(
    store: Store, tl: Timeline, force_images: bool = False, progress: Progress | None = None
) -> CompactionResult:
    """Plan and carry out compaction of one timeline."""
    t0 = time.monotonic()
    result = CompactionResult(tl.id)
    with tl._layers_mu:
        tl._check_live()
        meta = tl._meta
        by_name = {ly.desc.name: ly for ly in tl._map.layers}
        complete = meta.ancestor is None
        # Images go at the newest LSN whose data is all in layer files, and
        # no higher than the head (so a horizon at the head can use them).
        image_lsn = min(meta.disk_consistent_lsn, tl.head_lsn)
        plan = plan_compaction(
            [ly.desc for ly in by_name.values()],
            start_lsn=meta.start_lsn,
            disk_consistent_lsn=image_lsn,
            parts=partitions(
                tl._candidate_keys(image_lsn, 0, MAX_KEY, False),
                store.config.image_partition_keys,
            ),
            holds=_bitmap_holds(by_name),
            config=store.config,
            force_images=force_images,
        )
        if plan.empty:
            return result
        written: list[LayerDesc] = []
        try:
            total = len(plan.merges) + len(plan.image_ranges)
            for group in plan.merges:
                written.append(_merge(store, tl, [by_name[d.name] for d in group]))
                result.merged += len(group)
                result.deltas_written += 1
                if progress is not None:
                    progress(len(written), total)
            for part in plan.image_ranges:
                written.append(write_image(store, tl, plan.image_lsn, part, complete))
                result.images_written += 1
                if progress is not None:
                    progress(len(written), total)
            failpoints.hit("compaction-before-commit")
        except BaseException:
            store._discard_files(tl, written)
            raise
        removed = [d for g in plan.merges for d in g]
        store._replace_layers(tl, written, removed)
        failpoints.hit("compaction-after-commit")
        result.removed = removed
        result.bytes_written = sum(d.file_size for d in written)
    result.seconds = time.monotonic() - t0
    log.info(
        "compacted timeline %s: merged %d deltas into %d, wrote %d images, %d bytes in %.2fs",
        tl.id, result.merged, result.deltas_written, result.images_written,
        result.bytes_written, result.seconds,
    )
    return result


def _merge(store: Store, tl: Timeline, group: list[Layer]) -> LayerDesc:
    w = LayerWriter(
        store.fs, tl._dir, kind=KIND_DELTA, timeline=tl._tid,
        lsn_start=group[0].desc.lsn_start, lsn_end=group[-1].desc.lsn_end,
    )
    try:
        streams = [_tagged(i, ly) for i, ly in enumerate(group)]
        for key, lsn, i, e in heapq.merge(*streams):
            w.add(key, lsn, e[5], e[3], group[i].read_stored(e), e[4])
        for ly in group:
            w.add_times(ly.times())
        return w.finish()
    except BaseException:
        w.abort()
        raise


def _tagged(i: int, layer: Layer) -> Iterator[tuple[int, int, int, Entry]]:
    for key, e in layer.entries():
        yield key, e[0], i, e


def write_image(
    store: Store, tl: Timeline, lsn: int, part: KeyRange, complete: bool,
    source: Timeline | None = None,
) -> LayerDesc:
    """Write an image of `part` at `lsn`: from `source` through its ancestors
    (detach), or from `tl`'s own layers (local or complete, see above)."""
    w = LayerWriter(
        store.fs, tl._dir, kind=KIND_IMAGE, timeline=tl._tid, lsn_start=lsn,
        lsn_end=lsn + 1, complete=complete, key_range=part,
    )
    try:
        if source is not None:
            versions = source._versions(lsn, part[0], part[1])
        else:
            versions = tl._versions(lsn, part[0], part[1], local=True)
        for key, found in versions:
            if complete and found_flags(found) & FLAG_TOMBSTONE:
                continue
            v = tl._read_raw(found) if source is None else source._read_raw(found)
            w.add(key, v[0], v[1], v[2], v[3], v[4])
        # Remember the commit time of the image's LSN for lsn_at().
        t = (source or tl)._commit_time_at(lsn)
        if t is not None:
            w.add_times([t])
        return w.finish()
    except BaseException:
        w.abort()
        raise
