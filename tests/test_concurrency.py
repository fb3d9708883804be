"""Writers, readers, branching and background compaction/GC at once."""

from __future__ import annotations

import random
import threading
import time

from engine import Retention, Store, StoreConfig

from .conftest import page, page_owner

CFG = StoreConfig(
    inmemory_layer_bytes=64 * 1024,
    log_segment_bytes=256 * 1024,
    log_checkpoint_bytes=1024 * 1024,
    merge_threshold=3,
    delta_target_bytes=512 * 1024,
    image_threshold=2,
    image_partition_keys=32,
    retention=Retention(period=None, lsn_distance=200),
    background_interval=0.02,
)
KEYS = 64


def test_concurrent_writers_readers_branches_and_background_work(store_path):
    store = Store.open(store_path, config=CFG, background=True)
    roots = [store.create_timeline() for _ in range(3)]
    latest: dict[str, dict[int, int]] = {t.id: {} for t in roots}
    branches: list[tuple[object, int, dict[int, int]]] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def writer(tl, seed):
        rng = random.Random(seed)
        try:
            for seq in range(1, 150):
                keys = rng.sample(range(KEYS), 6)
                tl.commit({k: page(tl.id, k, seq) for k in keys}, durable=seq % 10 == 0)
                for k in keys:
                    latest[tl.id][k] = seq
                if seq % 30 == 0:
                    snapshot = dict(latest[tl.id])
                    branches.append((store.branch(tl), tl.head_lsn, snapshot))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def reader(seed):
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                tl = rng.choice(roots)
                k = rng.randrange(KEYS)
                v = tl.get(k)
                if v is not None:
                    owner, key, seq = page_owner(v)
                    assert (owner, key) == (tl.id, k) and v == page(owner, key, seq)
                    assert seq <= 150
                reads[0] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t, i)) for i, t in enumerate(roots)]
    threads += [threading.Thread(target=reader, args=(100 + i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads[:3]:
        t.join()
    time.sleep(0.1)  # let background passes run against the final state
    stop.set()
    for t in threads[3:]:
        t.join()
    assert not errors, errors
    assert reads[0] > 100
    assert store.background_error is None

    def verify(s: Store) -> None:
        for root in roots:
            tl = s.timeline(root.id)
            for k in range(KEYS):
                seq = latest[root.id].get(k)
                assert tl.get(k) == (page(root.id, k, seq) if seq else None)
        for child, _, snap in branches:
            tl = s.timeline(child.id)
            parent = tl.ancestor_id
            for k in range(KEYS):
                seq = snap.get(k)
                assert tl.get(k) == (page(parent, k, seq) if seq else None)

    verify(store)
    store.close()
    with Store.open(store_path, config=CFG, background=False) as s:
        verify(s)
        assert s.damaged() == {}
