"""Garbage collection: delete layer files no retained read can need.

A timeline must stay readable at every LSN from its *horizon* to its head,
and at the branch point of each child (children read their ancestor there).
GC first moves the horizon forward as the retention policy allows (never
back, never past the head), then deletes every layer that no such read can
consult.

A read at LSN p consults a layer X (LSN range [s, e)) only if X holds
versions at or below p (s <= p) and no image between X and p covers X's key
range: an image at LSN I with e - 1 <= I <= p materializes every key of its
range as of I, so reads at p stop there. So X is garbage when

  - images in [e - 1, horizon] together cover X's key range (reads at and
    above the horizon never reach X), and
  - for each branch point b below the horizon with s <= b, images in
    [e - 1, b] together cover X's key range.

Only *complete* images cover a base layer (a detached timeline's copy of its
ancestor); local images cover only the timeline's own layers. An image never
covers itself, nor an image at the same LSN that sorts after it, so of two
identical images one survives. `needed_layers` is pure and property-tested.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import failpoints
from .layer_file import LayerDesc

if TYPE_CHECKING:
    from .store import Store
    from .timeline import Timeline

log = logging.getLogger("strata.engine")


def _covered(x: LayerDesc, images: Sequence[LayerDesc], lo: int, hi: int, start_lsn: int) -> bool:
    if lo > hi:
        return False
    x_is_base = x.lsn_start <= start_lsn
    spans = sorted(
        (j.key_first, j.key_last)
        for j in images
        if lo <= j.lsn_start <= hi
        and j is not x
        and (j.complete or not x_is_base)
        and (not x.is_image or (j.lsn_start, j.name) > (x.lsn_start, x.name))
    )
    reach = x.key_first  # every key below `reach` is covered
    for first, last in spans:
        if first > reach:
            break
        if last >= reach:
            if last >= x.key_last:
                return True
            reach = last + 1
    return False


def needed_layers(
    layers: Sequence[LayerDesc],
    *,
    start_lsn: int,
    horizon: int | None,
    points: Iterable[int] = (),
) -> set[str]:
    """Names of the layers some retained read can consult: reads at every LSN
    from `horizon` up (None: no such range), and at each of `points`."""
    images = [d for d in layers if d.is_image]
    pts = sorted({p for p in points if horizon is None or p < horizon})
    needed = set()
    for x in layers:
        lo = x.lsn_end - 1
        if horizon is not None and not _covered(x, images, lo, horizon, start_lsn):
            needed.add(x.name)
            continue
        for b in pts:
            if x.lsn_start <= b and not _covered(x, images, lo, b, start_lsn):
                needed.add(x.name)
                break
    return needed


def plan_gc(
    layers: Sequence[LayerDesc], *, start_lsn: int, horizon: int, branch_points: Iterable[int]
) -> list[LayerDesc]:
    keep = needed_layers(layers, start_lsn=start_lsn, horizon=horizon, points=branch_points)
    return [d for d in layers if d.name not in keep]


def retention_horizon(tl: Timeline, now_us: int) -> int:
    """Where the timeline's retention policy puts its horizon now."""
    r = tl.retention
    meta = tl._meta
    head = tl.head_lsn
    cuts = []
    if r.lsn_distance is not None:
        cuts.append(head - r.lsn_distance)
    if r.period is not None:
        at = tl._lsn_at_us(now_us - int(r.period * 1_000_000))
        cuts.append(at if at is not None else meta.start_lsn)
    if not cuts:
        return tl.horizon
    return max(tl.horizon, min(min(cuts), head))


@dataclass
class GcResult:
    timelines: int = 0
    layers_removed: int = 0
    bytes_removed: int = 0
    horizons_moved: int = 0
    removed: list[tuple[str, LayerDesc]] = field(default_factory=list)

    def add(self, other: GcResult) -> None:
        self.timelines += other.timelines
        self.layers_removed += other.layers_removed
        self.bytes_removed += other.bytes_removed
        self.horizons_moved += other.horizons_moved
        self.removed += other.removed


def gc_timeline(store: Store, tl: Timeline, now_us: int) -> GcResult:
    result = GcResult(timelines=1)
    with tl._layers_mu:
        tl._check_live()
        target = retention_horizon(tl, now_us)
        # Moving the horizon and reading the children happen under the store
        # lock, so a concurrent branch either sees the new horizon or is seen.
        moved, points = store._advance_horizon(tl, target)
        result.horizons_moved = int(moved)
        if points is None:
            log.warning("gc timeline %s: a child's metadata is unreadable; keeping every layer", tl.id)
            return result
        descs = [ly.desc for ly in tl._map.layers]
        garbage = plan_gc(descs, start_lsn=tl._meta.start_lsn, horizon=tl.horizon, branch_points=points)
        if garbage:
            failpoints.hit("gc-before-commit")
            store._replace_layers(tl, [], garbage)
            failpoints.hit("gc-after-commit")
            result.layers_removed = len(garbage)
            result.bytes_removed = sum(d.file_size for d in garbage)
            result.removed = [(tl.id, d) for d in garbage]
            log.info(
                "gc timeline %s: horizon %d, removed %d layers, %d bytes",
                tl.id, tl.horizon, len(garbage), result.bytes_removed,
            )
    return result
