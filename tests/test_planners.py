"""Compaction and GC planners, property-tested without a disk.

A random history of commits is cut into delta layers and overlaid with
images; layers are small in-memory fakes that the real search algorithm
(`LayerMap.locate`) reads through. GC must never change the answer of a
retained read; compaction plans must respect their rules.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given
from pyroaring import BitMap64, FrozenBitMap64

from engine import StoreConfig
from engine.compaction import plan_compaction
from engine.gc import needed_layers, plan_gc
from engine.inmemory_layer import InMemoryLayer
from engine.keyspace import count_in, partitions
from engine.layer_file import KIND_DELTA, KIND_IMAGE, LayerDesc
from engine.layer_map import ABSENT, MISS, LayerMap
from engine.values import MAX_KEY

NKEYS = 8
TOMB = None


class FakeLayer:
    """Duck-types engine.layer_file.Layer for LayerMap.locate."""

    def __init__(self, desc: LayerDesc, versions: dict[int, list[tuple[int, object]]]) -> None:
        self.desc = desc
        self.versions = versions
        self.keys = self._keys = FrozenBitMap64(versions)
        self.is_image = desc.is_image
        self.complete = desc.complete
        self.lsn_start = desc.lsn_start
        self.key_first = desc.key_first
        self.key_last = desc.key_last

    def find(self, key: int, lsn: int):
        vs = [v for v in self.versions.get(key, []) if v[0] <= lsn]
        return vs[-1] if vs else None


def _desc(kind, l0, l1, kf, kl, gen, complete=False, size=100) -> LayerDesc:
    return LayerDesc(kind, complete, kf, kl, l0, l1, size, 1, 0, 0, gen)


@st.composite
def histories(draw, complete: bool):
    n = draw(st.integers(3, 40))
    commits = {
        lsn: draw(st.dictionaries(st.integers(0, NKEYS - 1), st.booleans(), min_size=1, max_size=3))
        for lsn in range(1, n + 1)
    }

    def state(lsn: int, key: int):
        """(lsn of newest version <= lsn, is_put) or None."""
        for c in range(lsn, 0, -1):
            if key in commits[c]:
                return c, commits[c][key]
        return None

    cuts = sorted(set(draw(st.lists(st.integers(2, n), max_size=8))))
    bounds = [1] + cuts + [n + 1]
    layers: list[FakeLayer] = []
    gen = 0
    for a, b in zip(bounds, bounds[1:]):
        vers: dict[int, list] = {}
        for lsn in range(a, b):
            for k, put in commits[lsn].items():
                vers.setdefault(k, []).append((lsn, "v" if put else TOMB))
        if vers:
            gen += 1
            layers.append(FakeLayer(_desc(KIND_DELTA, a, b, min(vers), max(vers), gen), vers))
    for L in sorted(set(draw(st.lists(st.integers(1, n), max_size=4)))):
        kcuts = sorted(set(draw(st.lists(st.integers(1, NKEYS - 1), max_size=3))))
        starts = [0] + kcuts
        ends = [s - 1 for s in kcuts] + [MAX_KEY]
        for kf, kl in zip(starts, ends):
            if not draw(st.booleans()):
                continue
            vers = {}
            for k in range(kf, min(kl, NKEYS - 1) + 1):
                s = state(L, k)
                if s is None or (complete and not s[1]):
                    continue
                vers[k] = [(s[0], "v" if s[1] else TOMB)]
            gen += 1
            layers.append(FakeLayer(_desc(KIND_IMAGE, L, L + 1, kf, kl, gen, complete), vers))
    horizon = draw(st.integers(0, n))
    points = draw(st.lists(st.integers(0, n), max_size=3))
    return n, layers, horizon, points, state


def _read(layers, key, lsn, complete):
    m = LayerMap(InMemoryLayer(), (), layers, 0)
    r = m.locate(key, lsn)
    if r is ABSENT:
        return "absent"
    if r is MISS:
        return "absent" if complete else "ancestor"
    _, v = r
    if v[1] is TOMB:
        return "absent" if complete else ("tomb", v[0])
    return ("put", v[0])


@given(st.data(), st.booleans())
def test_gc_never_changes_a_retained_read(data, complete):
    n, layers, horizon, points, state = data.draw(histories(complete))
    descs = [ly.desc for ly in layers]
    garbage = {d.name for d in plan_gc(descs, start_lsn=0, horizon=horizon, branch_points=points)}
    kept = [ly for ly in layers if ly.desc.name not in garbage]
    for q in sorted(set(range(max(horizon, 1), n + 1)) | {p for p in points if p >= 1}):
        for key in range(NKEYS):
            before = _read(layers, key, q, complete)
            s = state(q, key)
            # the full layer set answers like the history itself
            if s is None:
                assert before in ("absent", "ancestor")
            elif complete:
                assert before == (("put", s[0]) if s[1] else "absent")
            else:
                assert before == ("put" if s[1] else "tomb", s[0])
            assert _read(kept, key, q, complete) == before, (key, q, sorted(garbage))


@given(st.data())
def test_gc_removes_what_images_below_the_horizon_shadow(data):
    n, layers, _, _, _ = data.draw(histories(True))
    descs = [ly.desc for ly in layers]
    # with an image of the whole key space at the horizon and no branches,
    # every delta wholly below it is garbage
    full = [d for d in descs if d.is_image and d.key_first == 0 and d.key_last == MAX_KEY]
    if not full:
        return
    img = max(full, key=lambda d: d.lsn_start)
    keep = needed_layers(descs, start_lsn=0, horizon=img.lsn_start)
    for d in descs:
        if not d.is_image and d.lsn_end - 1 <= img.lsn_start:
            assert d.name not in keep


def test_identical_images_keep_exactly_one():
    a = _desc(KIND_IMAGE, 5, 6, 0, MAX_KEY, 1, True)
    b = _desc(KIND_IMAGE, 5, 6, 0, MAX_KEY, 2, True)
    keep = needed_layers([a, b], start_lsn=0, horizon=5)
    assert len(keep) == 1


# --- compaction --------------------------------------------------------------


@st.composite
def delta_stacks(draw):
    n = draw(st.integers(1, 30))
    sizes = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    layers, lsn, keys = [], 1, {}
    for i, size in enumerate(sizes):
        span = draw(st.integers(1, 5))
        d = _desc(KIND_DELTA, lsn, lsn + span, 0, 99, i, size=size * 1000)
        keys[d.name] = BitMap64(draw(st.lists(st.integers(0, 99), min_size=1, max_size=10)))
        layers.append(d)
        lsn += span
    images = []
    for L in sorted(set(draw(st.lists(st.sampled_from([d.lsn_end - 1 for d in layers]), max_size=2)))):
        images.append(_desc(KIND_IMAGE, L, L + 1, 0, MAX_KEY, 1000 + L, True))
    return layers + images, keys, lsn - 1


@given(delta_stacks(), st.integers(2, 6), st.integers(1, 5), st.booleans())
def test_compaction_plans_follow_their_rules(stack, merge_threshold, image_threshold, force):
    layers, keys, dcl = stack
    cfg = StoreConfig(merge_threshold=merge_threshold, image_threshold=image_threshold,
                      delta_target_bytes=60_000, image_partition_keys=30)
    all_keys = BitMap64.union(BitMap64(), *keys.values())
    parts = partitions(all_keys, 30)
    plan = plan_compaction(
        layers, start_lsn=0, disk_consistent_lsn=dcl, parts=parts,
        holds=lambda d, p: count_in(keys[d.name], p[0], p[1]) > 0,
        config=cfg, force_images=force,
    )
    image_lsns = {d.lsn_start for d in layers if d.is_image}
    for group in plan.merges:
        assert len(group) >= 2
        assert sum(d.file_size for d in group) <= cfg.delta_target_bytes
        assert all(d.file_size < cfg.delta_target_bytes // 2 for d in group)
        for a, b in zip(group, group[1:]):
            assert a.lsn_end == b.lsn_start  # consecutive
            assert a.lsn_end - 1 not in image_lsns  # never across an image
    merged = [d.name for g in plan.merges for d in g]
    assert len(merged) == len(set(merged))
    # every partition that needs an image gets one; none that doesn't
    after = [g for g in plan.merges] + [(d,) for d in layers if not d.is_image and d.name not in merged]
    for p in parts:
        newest = max((d.lsn_start for d in layers if d.is_image and d.key_first <= p[0]
                      and d.key_last >= p[1]), default=-1)
        above = sum(1 for g in after if g[-1].lsn_end - 1 > newest
                    and any(count_in(keys[d.name], p[0], p[1]) for d in g))
        wanted = dcl > newest and (above >= image_threshold or (force and above > 0))
        assert (p in plan.image_ranges) == wanted
    if plan.image_ranges:
        assert plan.image_lsn == dcl


def test_partitions_tile_the_key_space():
    keys = BitMap64(range(0, 1000, 7))
    parts = partitions(keys, 10)
    assert parts[0][0] == 0 and parts[-1][1] == MAX_KEY
    for (_, b), (c, _) in zip(parts, parts[1:]):
        assert b + 1 == c
    assert all(count_in(keys, a, b) <= 10 for a, b in parts)
    assert sum(count_in(keys, a, b) for a, b in parts) == len(keys)
    assert partitions(BitMap64(), 10) == []
