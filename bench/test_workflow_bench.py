"""Per-test overhead of a fresh, seeded database ready for a query (issue:
branch-per-test and load-once workflows), for seeded bases of 10 MB, 100 MB
and 1 GB, measured side by side in one run:

- the plugin's way: a branch of the seeded base, first query through the
  proxy (which starts its compute); and with a branch started ahead of
  need (the plugin's prewarm pool), so that only the first query remains
- CREATE DATABASE ... TEMPLATE seeded, STRATEGY FILE_COPY and WAL_LOG
- drop, create and reseed the database
- a fresh initdb cluster, started and seeded
- a transaction rolled back (fast, but cannot test commits)

The table goes to bench/results/latest.md and a plot to
bench/results/workflow.png. Sizes: STRATA_BENCH_SEED_MB (default 10,100,1000).
"""

from __future__ import annotations

import os
import statistics
import time

import psycopg
import pytest

from pageserver.control.plane import ControlPlane
from tests.pg import Running, pg_available

from .conftest import RESULTS, report
from .localpg import LocalPg, first_query

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")
SIZES_MB = [int(x) for x in os.environ.get("STRATA_BENCH_SEED_MB", "10,100,1000").split(",")]
ROWS_PER_MB = 950  # rows of ~1 KiB (heap pages hold 7 of them)


def seed_sql(mb: int) -> str:
    n = mb * ROWS_PER_MB
    return (f"create table items as select g as id, repeat(md5(g::text), 30) as pad "
            f"from generate_series(1, {n}) g; alter table items add primary key (id);")


def _time(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _rounds(mb: int, fast: int, slow: int) -> int:
    return fast if mb <= 100 else slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with Running(str(tmp_path_factory.mktemp("wf-bench"))) as s:
        yield s.cp


@pytest.fixture(scope="module")
def local():
    pg = LocalPg().start()
    try:
        yield pg
    finally:
        pg.stop()


results: dict[str, dict[int, float]] = {}


def _record(strategy: str, mb: int, times: list[float]) -> float:
    p50 = statistics.median(times)
    results.setdefault(strategy, {})[mb] = p50
    report(f"per-test overhead, {mb} MB base", f"{strategy}, p50 of {len(times)}", p50 * 1e3, "ms")
    return p50


@pytest.mark.parametrize("mb", SIZES_MB)
def test_per_test_overhead(benchmark, served: ControlPlane, local: LocalPg, mb: int):
    cp = served
    base = cp.create_database(f"seed{mb}")
    with psycopg.connect(base.uri, autocommit=True) as conn:
        conn.execute(seed_sql(mb))
    cp.suspend(base.name, "main")

    times: dict[bool, list[float]] = {False: [], True: []}

    def branch_and_query(start_ahead: bool) -> None:
        name = f"t{len(times[start_ahead])}-{'warm' if start_ahead else 'cold'}"
        if start_ahead:  # as the plugin's pool does while earlier tests run
            cp.create_branch(base.name, name)
            cp.wake(f"{base.name}/{name}")
        t0 = time.perf_counter()
        if not start_ahead:
            cp.create_branch(base.name, name)
        first_query(cp.uri(f"{base.name}/{name}"))
        times[start_ahead].append(time.perf_counter() - t0)
        cp.delete_branch(base.name, name)

    benchmark.pedantic(branch_and_query, args=(False,), rounds=20)
    ours = _record("strata branch (fixture)", mb, times[False])
    for _ in range(20):
        branch_and_query(True)
    ours_warm = _record("strata branch, started ahead", mb, times[True])

    seeded = f"seeded{mb}"
    with psycopg.connect(local.conninfo(), autocommit=True) as conn:
        conn.execute(f"create database {seeded}")
    with psycopg.connect(local.conninfo(seeded), autocommit=True) as conn:
        conn.execute(seed_sql(mb))
        conn.execute("checkpoint")

    def copy(strategy: str) -> None:
        with psycopg.connect(local.conninfo(), autocommit=True) as conn:
            conn.execute(f"create database t template {seeded} strategy {strategy}")
            local.first_query("t")
            conn.execute("drop database t")

    copies = {}
    for strategy in ("file_copy", "wal_log"):
        copies[strategy] = _record(f"CREATE DATABASE TEMPLATE, {strategy.upper()}", mb,
                                   _time(lambda s=strategy: copy(s), _rounds(mb, 10, 3)))

    def reseed() -> None:
        with psycopg.connect(local.conninfo(), autocommit=True) as conn:
            conn.execute("drop database if exists t")
            conn.execute("create database t")
        with psycopg.connect(local.conninfo("t"), autocommit=True) as conn:
            conn.execute(seed_sql(mb))
        local.first_query("t")

    _record("drop, create, reseed", mb, _time(reseed, _rounds(mb, 5, 2)))
    with psycopg.connect(local.conninfo(), autocommit=True) as conn:
        conn.execute("drop database t")

    def fresh() -> None:
        pg = LocalPg(fsync=False)
        try:
            pg.start()
            with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
                conn.execute(seed_sql(mb))
            pg.first_query()
        finally:
            pg.stop("immediate")

    _record("fresh initdb cluster, seeded", mb, _time(fresh, _rounds(mb, 3, 1)))

    with psycopg.connect(local.conninfo(seeded)) as conn:
        def rollback() -> None:
            conn.execute("select count(*) from items where id = 1").fetchone()
            conn.rollback()

        _record("transaction rolled back (no commits)", mb, _time(rollback, 20))

    report(f"per-test overhead, {mb} MB base", "strata branch vs fastest copy", ours / min(copies.values()), "x",
           "< 1 from 100 MB" if mb >= 100 else "", (ours < min(copies.values())) if mb >= 100 else None)
    report(f"per-test overhead, {mb} MB base", "strata branch p50 target", ours * 1e3, "ms", "< 300 ms",
           ours < 0.3)
    report(f"per-test overhead, {mb} MB base", "started ahead p50 target", ours_warm * 1e3, "ms", "< 50 ms",
           ours_warm < 0.05)
    cp.delete_database(base.name)
    with psycopg.connect(local.conninfo(), autocommit=True) as conn:
        conn.execute(f"drop database {seeded}")


def teardown_module(module: object) -> None:
    if not results:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for strategy, by_size in results.items():
        sizes = sorted(by_size)
        ax.plot(sizes, [by_size[s] * 1e3 for s in sizes], marker="o", label=strategy)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seeded base (MB)")
    ax.set_ylabel("fresh database ready for a query, p50 (ms)")
    ax.set_title("Per-test overhead by strategy (2 cores, one run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(RESULTS, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "workflow.png"), dpi=110)
