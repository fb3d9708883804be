"""GC under pressure: writers, branching at old LSNs, compaction and GC with
the smallest retention, all at once; afterwards every branch reads back
exactly what its parent held at its branch point, and space came back.
`make test` runs 4 s; `TORTURE=1` (make torture) 60 s, and prints the figures."""

from __future__ import annotations

import os
import random
import threading
import time

from engine import LsnOutOfRangeError, Retention, Store, StoreConfig
from engine.testing import page, page_owner

SECONDS = 60.0 if os.environ.get("TORTURE") else 4.0
KEYS = 48
CFG = StoreConfig(
    inmemory_layer_bytes=64 * 1024, log_segment_bytes=256 * 1024, log_checkpoint_bytes=1 << 20,
    merge_threshold=2, delta_target_bytes=256 * 1024, image_threshold=2, image_partition_keys=16,
    background_interval=0.02, full_gc_interval=0.2,
)
TIGHT = Retention(period=0, lsn_distance=40)  # the smallest useful: a few dozen commits of history


def test_every_branch_reads_back_its_branch_point_under_gc_pressure(tmp_path):
    store = Store.open(str(tmp_path / "s"), config=CFG)
    root = store.create_timeline(retention=TIGHT)
    root_id = root.id
    history: list[tuple[int, dict[int, int]]] = []  # (LSN, key -> seq) after each commit
    mu = threading.Lock()
    stop = threading.Event()
    branches: list[tuple[str, int, dict[int, int]]] = []
    refused = [0]
    reclaimed = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(1)
        state: dict[int, int] = {}
        seq = 0
        while not stop.is_set():
            seq += 1
            keys = rng.sample(range(KEYS), 4)
            lsn = root.commit({k: page(root.id, k, seq) for k in keys})
            state.update({k: seq for k in keys})
            with mu:
                history.append((lsn, dict(state)))
                del history[:-200]

    def brancher() -> None:
        rng = random.Random(2)
        while not stop.is_set():
            with mu:
                if not history:
                    continue
                lsn, expect = history[rng.randrange(len(history))]  # often old: below the horizon
            try:
                child = store.branch(root, at_lsn=lsn, retention=TIGHT)
                branches.append((child.id, lsn, expect))
            except LsnOutOfRangeError:
                refused[0] += 1
            time.sleep(0.005)

    def maintainer() -> None:
        while not stop.is_set():
            store.compact(root)
            reclaimed[0] += store.gc().bytes_removed
            store.checkpoint()

    def guard(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                stop.set()
        return run

    threads = [threading.Thread(target=guard(f)) for f in (writer, brancher, maintainer)]
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert store.background_error is None, store.background_error
    checked = mismatches = 0
    for attempt in range(2):  # now, and after a restart
        for tid, lsn, expect in branches:
            child = store.timeline(tid)
            assert child.branch_lsn == lsn and child.ancestor_id == root_id
            for key in range(KEYS):
                value = child.get(key)
                checked += 1
                want = expect.get(key)
                got = page_owner(value)[2] if value is not None else None
                mismatches += got != want
        if attempt == 0:
            store.close()
            store = Store.open(str(tmp_path / "s"), config=CFG)
    report = store.check()
    store.close()
    print(f"gc under pressure, {SECONDS:.0f} s: {len(branches)} branches at old LSNs ({refused[0]} refused as "
          f"below the horizon), {checked} pages checked, {mismatches} mismatches, {reclaimed[0]:,} bytes reclaimed")
    assert report.ok, report.problems
    assert branches and refused[0] > 0 and reclaimed[0] > 0
    assert mismatches == 0
