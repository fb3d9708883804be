"""Compaction bounds the layers a read consults; GC reclaims what is no longer
needed; accounting says where the bytes are."""

from __future__ import annotations

import random

import pytest

from engine import KEEP_ALL, Retention, Store, StoreConfig

from .conftest import page

CFG = StoreConfig(
    inmemory_layer_bytes=1 << 30,  # flushes only when the test says
    merge_threshold=4,
    delta_target_bytes=256 * 1024,
    image_threshold=3,
    image_partition_keys=64,
    retention=KEEP_ALL,
)
KEYS = 200


def _history(store: Store, rounds: int, compact_every: int | None, seed: int = 1):
    rng = random.Random(seed)
    tl = store.create_timeline()
    lsns = []
    for r in range(rounds):
        lsns.append(tl.commit({k: page(tl.id, k, r) for k in rng.sample(range(KEYS), 30)}))
        store.flush(tl)
        if compact_every and r % compact_every == compact_every - 1:
            store.compact(tl)
    return tl, lsns


def _max_consulted(tl, lsns, rng) -> int:
    worst = 0
    for lsn in [tl.head_lsn] + rng.sample(lsns, 10):
        for key in rng.sample(range(KEYS), 40):
            worst = max(worst, len(tl.trace(key, lsn)))
    return worst


def test_without_compaction_reads_grow_with_history(store_path):
    with Store.open(store_path, background=False, config=CFG) as store:
        tl, lsns = _history(store, 40, None)
        assert _max_consulted(tl, lsns, random.Random(2)) >= 20


@pytest.mark.parametrize("rounds", [24, 96])
def test_after_compaction_reads_consult_a_bounded_number_of_layers(store_path, rounds):
    with Store.open(store_path, background=False, config=CFG) as store:
        tl, lsns = _history(store, rounds, compact_every=4)
        store.compact(tl)
        # deltas above an image (< image_threshold + merge_threshold) plus
        # the images of the 4 key partitions: independent of history length
        worst = _max_consulted(tl, lsns, random.Random(3))
        assert worst <= CFG.image_threshold + CFG.merge_threshold + 4, worst
        _check_history(tl, lsns, random.Random(5))


def _check_history(tl, lsns, rng) -> None:
    """Replay the history's random choices and compare reads at every LSN."""
    gen = random.Random(1)
    state: dict[int, int] = {}
    for r, lsn in enumerate(lsns):
        for k in gen.sample(range(KEYS), 30):
            state[k] = r
        for k in rng.sample(range(KEYS), 10):
            want = page(tl.id, k, state[k]) if k in state else None
            assert tl.get(k, lsn=lsn) == want


def test_gc_keeps_branch_points_and_reclaims_the_rest(store_path):
    with Store.open(store_path, background=False, config=CFG) as store:
        root = store.create_timeline(retention=Retention(period=None, lsn_distance=0))
        first = root.commit({k: page(root.id, k, 0) for k in range(KEYS)})
        store.compact(root, force_images=True)
        child = store.branch(root, at_lsn=first)
        for r in range(1, 6):
            root.commit({k: page(root.id, k, r) for k in range(KEYS)})
            store.compact(root, force_images=True)
        store.gc()
        assert root.horizon == root.head_lsn
        usage = root.usage()
        assert usage.pinned_by_children > 0
        # the child still reads the parent as of its branch point
        assert all(child.get(k) == page(root.id, k, 0) for k in range(KEYS))
        assert all(root.get(k) == page(root.id, k, 5) for k in range(KEYS))
        store.delete_timeline(child)
        result = store.gc()
        assert result.bytes_removed >= usage.pinned_by_children
        assert root.usage().physical_size <= usage.physical_size - usage.pinned_by_children
        assert root.usage().pinned_by_children == 0
        assert all(root.get(k) == page(root.id, k, 5) for k in range(KEYS))


def test_usage_accounts_for_logical_and_physical_bytes(store_path):
    with Store.open(store_path, background=False, config=CFG) as store:
        root = store.create_timeline()
        full = root.commit({k: page(root.id, k, 0) for k in range(100)})
        root.commit({k: None for k in range(10)})
        assert root.usage().logical_size == 90 * 8192
        assert root.logical_size(full) == 100 * 8192
        assert root.usage().inmemory_size > 0
        store.flush()
        u = root.usage()
        assert u.inmemory_size == 0 and 100 * 4096 < u.physical_size < 100 * 8192
        assert u.exclusive_size == u.physical_size  # no children
        child = store.branch(root)
        child.commit({k: page(child.id, k, 1) for k in range(5)})
        store.flush()
        cu = child.usage()
        assert cu.logical_size == 95 * 8192  # keys 0-4 were deleted in the root
        assert cu.physical_size < 5 * 8192 + 4096  # only what differs
