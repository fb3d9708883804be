"""Writers, readers, branching and background compaction/GC at once."""

from __future__ import annotations

import random
import threading
import time

import pytest

from engine import Retention, Store, StoreConfig

from .conftest import page, page_owner
from .interleave import Pause

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


# --- reads racing a detach ------------------------------------------------------------------------
# A detach swaps in a map with the base images and drops the ancestor. A read
# that stops anywhere in between must still see every key of the ancestor: a
# key that is briefly absent is a file PostgreSQL finds missing (it was seen
# as FATAL "base/5/PG_VERSION is missing" under the control-plane stress).

ROOT_KEYS = 40


def _detach_fixture(store: Store):
    root = store.create_timeline()
    root.commit({k: page(root.id, k, 1) for k in range(ROOT_KEYS)})
    store.flush()
    child = store.branch(root)
    child.commit({0: page(child.id, 0, 2)})
    want = {k: page(root.id, k, 1) for k in range(1, ROOT_KEYS)} | {0: page(child.id, 0, 2)}
    return root, child, want


def _read_all(child) -> tuple[dict[int, bytes | None], dict[int, bytes]]:
    return {k: child.get(k) for k in range(ROOT_KEYS)}, dict(child.scan())


@pytest.mark.parametrize("stop_in", ["get", "scan"])
def test_a_read_that_took_its_view_before_a_detach_still_finds_the_ancestors_keys(store, stop_in):
    """The reader stops after it took its view and before it falls through to
    the ancestor; the detach runs to its end meanwhile."""
    _, child, want = _detach_fixture(store)
    out: list = []
    if stop_in == "get":
        pause = Pause(child, "_locate_in_ancestors", thread="reader", before=True)
        def read() -> None:
            out.append({k: child.get(k) for k in range(ROOT_KEYS)})
    else:
        pause = Pause(child, "_candidate_keys", thread="reader", before=True)
        def read() -> None:
            out.append(dict(child.scan()))
    with pause:
        reader = threading.Thread(target=read, name="reader")
        reader.start()
        pause.reached()
        store.detach(child)
    reader.join(30)
    assert child.ancestor_id is None
    got = out[0]
    if stop_in == "scan":
        assert got == want
    else:
        assert got == want, [k for k in want if got[k] != want[k]]
    assert _read_all(child) == ({**want}, want)


@pytest.mark.parametrize("point", ["Layer", "apply_edit", "_link"])
def test_reads_while_a_detach_is_stopped_in_its_layer_swap_find_every_key(store, point, monkeypatch):
    """The detach stops at each step of its swap (making the new layers,
    dropping the ancestor, relinking); meanwhile reads rebuild the chain (as
    a fresh load of the timeline does) and must find every key."""
    import engine.store as store_module

    _, child, want = _detach_fixture(store)
    target = store if point == "_link" else store_module
    pause = Pause(target, point, thread="detacher", before=point != "apply_edit")
    with pause:
        detacher = threading.Thread(target=store.detach, args=(child,), name="detacher")
        detacher.start()
        pause.reached()
        child._chain_cache = (-1, (), None)  # built afresh from the timeline's metadata
        during = _read_all(child)
    detacher.join(30)
    assert during == ({**want}, want), [k for k in want if during[0][k] != want[k]]
    assert child.ancestor_id is None and _read_all(child) == ({**want}, want)
