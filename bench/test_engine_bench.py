"""Engine benchmarks (issue: storage engine). Figures go to the README.

1. branch creation on a 10 MB vs a 1 GB timeline
2. random 8 KiB reads vs a dict of lz4 pages, depth 1/8/32, head and old LSN,
   before and after compaction
3. ingest with a durable commit every 100 pages vs raw write+fdatasync
4. bytes on disk of 100 branches each rewriting 1% of a 100 MB base
5. opening a store with 10,000 timelines vs a store with one
"""

from __future__ import annotations

import os
import random
import time

import lz4.block
import pytest

from engine import KEEP_ALL, Store, StoreConfig
from engine.testing import page

from .conftest import median_seconds, report

MB = 1 << 20
PAGE = 8192
TL = "ab" * 16


def _load(tl, pages: int, batch: int = 100, durable: bool = False, seq: int = 1) -> None:
    for start in range(0, pages, batch):
        tl.commit({k: page(TL, k, seq) for k in range(start, min(pages, start + batch))}, durable=durable)


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


# --- 1. branch creation ------------------------------------------------------------

BRANCH_SIZES = {"10 MB": 10 * MB // PAGE, "1 GB": 1024 * MB // PAGE}


def test_branch_creation_10mb_vs_1gb(benchmark, workdir):
    """Branch the two timelines alternately, so both see the same noise."""
    stores, roots = [], {}
    for name, pages in BRANCH_SIZES.items():
        store = Store.open(str(workdir / f"branch-{pages}"), background=False,
                           config=StoreConfig(retention=KEEP_ALL))
        root = store.create_timeline(TL)
        _load(root, pages, batch=500)
        store.compact(root, force_images=True)
        stores.append(store)
        roots[name] = (store, root)
    os.sync()  # let writeback of the load settle before timing fsyncs
    times: dict[str, list[float]] = {name: [] for name in roots}

    def run():
        for name, (store, root) in roots.items():
            t0 = time.perf_counter()
            store.branch(root)
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=300, warmup_rounds=10)
    for store in stores:
        store.close()
    p50 = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    for name, t in p50.items():
        report("branch creation", f"p50 on a {name} timeline", t * 1e3, "ms", "< 1 ms", t < 1e-3)
    ratio = p50["1 GB"] / p50["10 MB"]
    report("branch creation", "1 GB / 10 MB p50", ratio, "x", "< 1.5", ratio < 1.5)


# --- 2. random reads -------------------------------------------------------------------

READ_PAGES = 16384  # 128 MiB
READS = 20000
_keys = [random.Random(9).randrange(READ_PAGES) for _ in range(READS)]
_read_setup: dict[str, object] = {}


def _floor_run():
    if "floor_pages" not in _read_setup:
        _read_setup["floor_pages"] = {
            k: lz4.block.compress(page(TL, k, 2), store_size=False) for k in range(READ_PAGES)
        }
    pages = _read_setup["floor_pages"]
    keys = _keys
    decompress = lz4.block.decompress

    def run():
        for k in keys:
            decompress(pages[k], uncompressed_size=PAGE)

    return run


def _floor_rate() -> float:
    """The floor, measured again right before each engine figure."""
    run = _floor_run()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        runs.append(time.perf_counter() - t0)
    return READS / sorted(runs)[2]


def test_read_floor_dict_of_lz4_pages(benchmark):
    benchmark.pedantic(_floor_run(), rounds=5, warmup_rounds=1)
    report("random reads", "floor: dict of lz4 pages", READS / median_seconds(benchmark), "reads/s")


def _read_store(workdir):
    if "store" not in _read_setup:
        path = str(workdir / "reads")
        cfg = StoreConfig(inmemory_layer_bytes=4 * MB, retention=KEEP_ALL, image_partition_keys=16384)
        store = Store.open(path, background=False, config=cfg)
        root = store.create_timeline(TL)
        _load(root, READ_PAGES, seq=1)
        old = root.head_lsn
        _load(root, READ_PAGES, seq=2)
        chains = {1: (root, old)}
        tl = root
        rng = random.Random(3)
        for depth in range(2, 33):
            tl = store.branch(tl)
            start = tl.head_lsn
            for _ in range(4):  # each level rewrites ~1% of the pages, in 4 commits
                tl.commit({k: page(TL, k, 2) for k in rng.sample(range(READ_PAGES), 40)})
            if depth in (8, 32):
                chains[depth] = (tl, start)
        store.flush()
        _read_setup.update(store=store, chains=chains)
    return _read_setup["store"], _read_setup["chains"]


def _bench_reads(benchmark, workdir, phase, depth, at):
    store, chains = _read_store(workdir)
    if phase == "after" and not _read_setup.get("compacted"):
        store.compact(force_images=True)
        _read_setup["compacted"] = True
    tl, old = chains[depth]
    lsn = None if at == "head" else old
    get = tl.get
    keys = _keys
    sample = [get(k, lsn) for k in keys[:50]]
    assert all(v is not None and len(v) == PAGE for v in sample)

    def run():
        for k in keys:
            get(k, lsn)

    floor = _floor_rate()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    rate = READS / median_seconds(benchmark)
    ratio = rate / ((floor + _floor_rate()) / 2)
    target = {1: 0.3, 32: 0.2}.get(depth) if phase == "after" else None
    report(
        "random reads", f"depth {depth}, {at}, {phase} compaction", ratio, "x floor",
        f">= {target}" if target else "", (ratio >= target) if target else None,
    )
    report("random reads", f"depth {depth}, {at}, {phase} compaction (absolute)", rate, "reads/s")


@pytest.mark.parametrize("depth", [1, 8, 32])
@pytest.mark.parametrize("at", ["head", "old"])
def test_random_reads_before_compaction(benchmark, workdir, depth, at):
    _bench_reads(benchmark, workdir, "before", depth, at)


@pytest.mark.parametrize("depth", [1, 8, 32])
@pytest.mark.parametrize("at", ["head", "old"])
def test_random_reads_after_compaction(benchmark, workdir, depth, at):
    _bench_reads(benchmark, workdir, "after", depth, at)


# --- 3. ingest ----------------------------------------------------------------------------

INGEST_PAGES = 12800  # 100 MiB
_ingest: dict[str, float] = {}


def test_ingest_baseline_raw_append_fdatasync(benchmark, workdir):
    data = [page(TL, k, 1) for k in range(INGEST_PAGES)]

    def run():
        path = str(workdir / "raw.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            for start in range(0, INGEST_PAGES, 100):
                os.write(fd, b"".join(data[start : start + 100]))
                os.fdatasync(fd)
        finally:
            os.close(fd)
            os.unlink(path)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _ingest["raw"] = INGEST_PAGES * PAGE / median_seconds(benchmark) / MB
    report("ingest", "baseline: raw append + fdatasync per 800 KiB", _ingest["raw"], "MB/s")


def test_ingest_durable_every_100_pages(benchmark, workdir):
    data = {k: page(TL, k, 1) for k in range(INGEST_PAGES)}
    n = [0]

    def run():
        n[0] += 1
        path = str(workdir / f"ingest-{n[0]}")
        with Store.open(path, background=False) as store:
            tl = store.create_timeline()
            for start in range(0, INGEST_PAGES, 100):
                tl.commit({k: data[k] for k in range(start, start + 100)}, durable=True)
            store.abandon()  # measure ingest, not the closing flush

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    mbs = INGEST_PAGES * PAGE / median_seconds(benchmark) / MB
    report("ingest", "durable commit every 100 pages", mbs, "MB/s", ">= 100 MB/s", mbs >= 100)
    report("ingest", "pages per second", mbs * MB / PAGE, "pages/s")
    if "raw" in _ingest:
        report("ingest", "vs raw append + fdatasync", mbs / _ingest["raw"], "x")


# --- 4. storage of 100 branches ------------------------------------------------------------


def test_storage_of_100_branches_of_a_100mb_base(benchmark, workdir):
    base_pages = 12800
    path = str(workdir / "storage")
    changed = base_pages // 100

    def run():
        with Store.open(path, background=False, config=StoreConfig(retention=KEEP_ALL)) as store:
            root = store.create_timeline(TL)
            _load(root, base_pages, batch=500)
            store.compact(root, force_images=True)
            for b in range(100):
                child = store.branch(root)
                keys = range(b * changed, (b + 1) * changed)
                child.commit({k: page(TL, k, 100 + b) for k in keys})

    benchmark.pedantic(run, rounds=1, iterations=1)
    on_disk = _du(path)
    logical = (base_pages + 100 * changed) * PAGE
    ratio = on_disk / logical
    report("storage", "100 branches x 1% of 100 MB: bytes on disk / (base + changed)", ratio, "x",
           "< 1.2", ratio < 1.2)
    report("storage", "same with full copies", (101 * base_pages * PAGE) / logical, "x")
    report("storage", "bytes on disk", on_disk / MB, "MiB")


# --- 5. open with 10,000 timelines ------------------------------------------------------------


@pytest.mark.parametrize("timelines", [1, 10_000])
def test_open_store(benchmark, workdir, timelines):
    path = str(workdir / f"open-{timelines}")
    with Store.open(path, background=False) as store:
        root = store.create_timeline()
        root.commit({k: page(TL, k, 1) for k in range(100)})
        for _ in range(timelines - 1):
            store.branch(root, durable=False)

    def run():
        t0 = time.perf_counter()
        s = Store.open(path, background=False)
        dt = time.perf_counter() - t0
        s.abandon()
        return dt

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    p50 = median_seconds(benchmark)
    _read_setup[f"open-{timelines}"] = p50
    ok = p50 < 1.0 if timelines > 1 else None
    report("open", f"store with {timelines:,} timelines", p50 * 1e3, "ms", "< 1000 ms" if timelines > 1 else "", ok)
    if "open-1" in _read_setup and "open-10000" in _read_setup:
        report("open", "10,000 / 1 timelines", _read_setup["open-10000"] / _read_setup["open-1"], "x")
