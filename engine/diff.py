"""What changed between two points of a store's history, in time that
follows the change, not the size of the data.

A *point* is a timeline at an LSN. Two points that share history have a
*common point*: walking each one's lineage (the timeline, then its
ancestor at the branch point, and so on), the first timeline both reach,
at the lower of the two LSNs they reach it at. Everything at or below the
common point is shared, so a key can differ between the two points only
if one side wrote it after: on the way from the common point to the
point, in a timeline of that side's lineage.

Those writes are found without reading a value: the in-memory layers'
versions, and per layer file its LSN range (a delta inside the window
gives its key bitmap whole; one that straddles an end, its index entries
in the window). Images are skipped: GC deletes a delta only once images
at or below the horizon cover it, so above the horizon every write is
still in a delta. Only a window that starts below its timeline's horizon
(a common point at a branch point that GC has since passed) takes the
keys of the images in it too, a superset, and for a complete image (which
leaves out keys deleted before it) every key its timeline had at the
window's start in the image's range.

Keys both sides wrote to the same version after the common point
(*twins*: the same bytes, say the same insert run on two branches) are
kept apart: their values are equal, but a row on such a page can still
be visible on one side only, if its transaction ended differently there
(PostgreSQL's commit log is another file). The row diff reads them. Candidate keys are then
compared by their stored versions (flags, length, xxh3 of the stored
bytes): equal means equal, without reading the value; a change written
and undone again drops out here. Values are read only where a caller
wants them (`Diff.values`).

Without a common point (two unrelated roots, or a detached branch) the
candidates are every key either side has: correct, and as slow as a full
comparison.

Reads run on the layer maps the timelines hold when asked; a map is
immutable, so nothing is locked. A point must be at or above its
timeline's retention horizon (LsnOutOfRangeError otherwise): below it the
history needed to tell what changed is gone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pyroaring import BitMap64

from .errors import InvalidArgumentError
from .keyspace import clip
from .layer_file import Layer
from .timeline import Timeline, found_flags
from .values import FLAG_TOMBSTONE, MAX_KEY, decode

# A version's identity without its bytes: (flags, raw length, xxh3 of the stored bytes); None: absent.
VersionId = tuple[int, int, int] | None


@dataclass(frozen=True)
class Point:
    timeline: Timeline
    lsn: int

    def __repr__(self) -> str:
        return f"{self.timeline.id}@{self.lsn}"


def point(timeline: Timeline, lsn: int | None = None) -> Point:
    """A checked point: `lsn` (default: the head) within the timeline's readable range."""
    return Point(timeline, timeline.head_lsn if lsn is None else timeline._check_lsn(lsn))


def lineage(p: Point) -> list[tuple[Timeline, int]]:
    """The timelines a read at `p` goes through, each with the highest LSN
    it is read at (the point's, then each branch point's cap)."""
    return [(p.timeline, p.lsn)] + [(tl, min(cap, p.lsn)) for tl, cap in p.timeline._chain()]


def common_point(a: Point, b: Point) -> Point | None:
    """Where the histories of `a` and `b` part (None: they share none)."""
    reach_b = {tl.id: lsn for tl, lsn in lineage(b)}
    for tl, lsn in lineage(a):
        if tl.id in reach_b:
            return Point(tl, min(lsn, reach_b[tl.id]))
    return None


def written(tl: Timeline, after: int, upto: int) -> BitMap64:
    """The keys `tl` itself holds a version of with an LSN in (after, upto]
    (a superset where an image layer stands for writes folded into it)."""
    keys = BitMap64()
    if upto <= after:
        return keys
    m = tl._map
    for mem in (m.open,) + m.frozen:
        if not mem.versions or mem.lsn_max <= after or mem.lsn_min > upto:
            continue
        if mem.lsn_min > after and mem.lsn_max <= upto:
            keys.update(list(mem.versions))
        else:
            keys.update([k for k, vs in list(mem.versions.items()) if any(after < v[0] <= upto for v in vs)])
    gone = after < tl.horizon  # (GC may have dropped deltas above `after` that images cover)
    present: BitMap64 | None = None
    for layer in m.layers:
        first, last = layer.desc.lsn_start, layer.desc.lsn_end - 1  # (an image at L: [L, L])
        if last <= after or first > upto:
            continue
        if layer.is_image:
            if gone:
                keys |= layer.keys
                if layer.complete:  # (a key deleted before the image is not in it: every key there at `after`)
                    if present is None:
                        present = tl._candidate_keys(after, 0, MAX_KEY, True)
                    keys |= clip(BitMap64(present), layer.key_first, layer.key_last)
        elif first > after and last <= upto:
            keys |= layer.keys
        else:
            keys.update(_entries_in(layer, after, upto))
    return keys


def _entries_in(layer: Layer, after: int, upto: int) -> list[int]:
    return [key for key, e in layer.entries() if after < e[0] <= upto]


def _side(p: Point, base: Point | None) -> BitMap64:
    """Candidate keys of one side: what its lineage wrote above the common point."""
    keys = BitMap64()
    for tl, upto in lineage(p):
        if base is not None and tl.id == base.timeline.id:
            keys |= written(tl, base.lsn, upto)
            return keys
        keys |= written(tl, tl.branch_lsn if tl.ancestor_id is not None else -1, upto)
    if base is not None:  # (the common point was on it: a detach cut it off since)
        raise InvalidArgumentError(f"timeline {p.timeline.id} was detached while it was diffed: try again")
    return keys


def version_id(tl: Timeline, key: int, lsn: int) -> VersionId:
    f = tl._find(key, lsn)
    if f is None or found_flags(f) & FLAG_TOMBSTONE:
        return None
    src, v = f
    if src is None:  # an in-memory version: (lsn, flags, raw_len, stored, checksum)
        return v[1], v[2], v[4]  # type: ignore[return-value]
    return v[5], v[3], v[4]  # type: ignore[misc,return-value]  # a layer entry: (lsn, offset, stored_len, raw_len, checksum, flags)


def read(tl: Timeline, key: int, lsn: int) -> bytes | None:
    f = tl._find(key, lsn)
    if f is None:
        return None
    raw = tl._read_raw(f)
    return decode(raw[1], raw[2], raw[3])


@dataclass
class Diff:
    """The keys whose versions differ between `a` and `b`, with the common
    point and which side wrote each key after it."""

    a: Point
    b: Point
    base: Point | None
    keys: BitMap64  # differ between a and b
    a_wrote: BitMap64  # of `keys`: a's value is not the common point's
    b_wrote: BitMap64  # of `keys`: b's value is not the common point's
    candidates: int  # keys compared (what the diff cost)
    twins: BitMap64  # equal on both sides, and written by both after the common point

    def values(self, key: int) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(at the common point, at a, at b); None where absent."""
        base = read(self.base.timeline, key, self.base.lsn) if self.base is not None else None
        return base, read(self.a.timeline, key, self.a.lsn), read(self.b.timeline, key, self.b.lsn)

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys)


def diff(a: Point, b: Point, first: int = 0, last: int = MAX_KEY) -> Diff:
    """The keys in [first, last] whose versions differ between `a` and `b`."""
    if a.timeline._store is not b.timeline._store:
        raise InvalidArgumentError("the two points are in different stores")
    a = point(a.timeline, a.lsn)
    b = point(b.timeline, b.lsn)
    base = common_point(a, b)
    if base is None:
        side_a = a.timeline._candidate_keys(a.lsn, first, last, True)
        side_b = b.timeline._candidate_keys(b.lsn, first, last, True)
    else:
        side_a, side_b = _side(a, base), _side(b, base)
    cands = clip(side_a | side_b, first, last)
    keys, a_wrote, b_wrote, twins = BitMap64(), BitMap64(), BitMap64(), BitMap64()
    both = side_a & side_b
    for key in cands:
        va = version_id(a.timeline, key, a.lsn)
        vb = version_id(b.timeline, key, b.lsn)
        if va == vb:
            if va is not None and key in both and base is not None and va != version_id(
                    base.timeline, key, base.lsn):
                twins.add(key)
            continue
        keys.add(key)
        vbase = version_id(base.timeline, key, base.lsn) if base is not None else None
        if va != vbase:
            a_wrote.add(key)
        if vb != vbase:
            b_wrote.add(key)
    return Diff(a, b, base, keys, a_wrote, b_wrote, len(cands), twins)
