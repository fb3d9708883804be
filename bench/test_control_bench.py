"""Control plane benchmarks (issue: control plane), with baselines from the
same run.

1. provisioning: `create database` to first query answered through the
   proxy, without and with the warm pool, vs a fresh local cluster (initdb +
   start + first query) and CREATE DATABASE + first query on an already
   running local PostgreSQL (p50 and p95 over 20 runs)
2. wake: connect to a suspended branch to first query answered
3. suspend: an idle branch's compute stopped to zero processes
4. opening the service's store with 10,000 suspended branches vs with one
"""

from __future__ import annotations

import os
import statistics
import time

import psycopg
import pytest

from pageserver.control.plane import ControlPlane
from tests.pg import Running, pg_available

from .conftest import report
from .localpg import LocalPg, first_query

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")
ROUNDS = 20
BRANCHES = int(os.environ.get("STRATA_BENCH_BRANCHES", 10_000))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with Running(str(tmp_path_factory.mktemp("cp-bench"))) as s:
        yield s.cp


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]


@pytest.fixture(scope="module")
def local_pg():
    pg = LocalPg().start()
    try:
        yield pg
    finally:
        pg.stop()


def _fresh_cluster() -> float:
    """initdb + start + first query of a new local cluster; then removed."""
    t0 = time.perf_counter()
    pg = LocalPg(fsync=False)
    try:
        pg.start()
        pg.first_query()
        return time.perf_counter() - t0
    finally:
        pg.stop("immediate")


def test_provision_a_database(benchmark, served, local_pg, tmp_path):
    cp = served
    cold, create_only, create_db, fresh = [], [], [], []

    def one_round():
        t0 = time.perf_counter()
        db = cp.create_database()
        create_only.append(time.perf_counter() - t0)
        first_query(db.uri)
        cold.append(time.perf_counter() - t0)
        cp.delete_database(db.name)
        with psycopg.connect(local_pg.conninfo("postgres"), autocommit=True) as conn:
            t0 = time.perf_counter()
            conn.execute("create database bench_copy")
            local_pg.first_query("bench_copy")
            create_db.append(time.perf_counter() - t0)
            conn.execute("drop database bench_copy")
        fresh.append(_fresh_cluster())

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    warm = _with_warm_pool(str(tmp_path / "warm"))
    b = "provisioning: create database to first query"
    report(b, "create call alone (URI returned), p50", statistics.median(create_only) * 1e3, "ms")
    report(b, "ours, p50", statistics.median(cold) * 1e3, "ms", "< 300 ms", statistics.median(cold) < 0.3)
    report(b, "ours, p95", p95(cold) * 1e3, "ms", "< 1000 ms", p95(cold) < 1.0)
    report(b, "ours with a warm pool, p50", statistics.median(warm) * 1e3, "ms", "< 50 ms",
           statistics.median(warm) < 0.05)
    report(b, "ours with a warm pool, p95", p95(warm) * 1e3, "ms")
    report(b, "fresh local cluster (initdb + start), p50", statistics.median(fresh) * 1e3, "ms")
    report(b, "CREATE DATABASE on a running local cluster, p50", statistics.median(create_db) * 1e3, "ms")
    report(b, "ours / fresh cluster, p50", statistics.median(cold) / statistics.median(fresh), "x")
    report(b, "ours / CREATE DATABASE, p50", statistics.median(cold) / statistics.median(create_db), "x")


def _with_warm_pool(home: str) -> list[float]:
    times: list[float] = []
    with Running(home, warm_pool=2) as s:
        for _ in range(ROUNDS):
            deadline = time.monotonic() + 60
            while len(s.cp._warm) < 2 and time.monotonic() < deadline:  # as between requests
                time.sleep(0.01)
            t0 = time.perf_counter()
            db = s.cp.create_database()
            first_query(db.uri)
            times.append(time.perf_counter() - t0)
            s.cp.delete_database(db.name)
    return times


def test_wake_and_suspend(benchmark, served):
    cp = served
    db = cp.create_database("wake")
    first_query(db.uri)
    wake, suspend = [], []

    def one_round():
        br = cp.resolve("wake")
        c = cp.ps.compute_of(br.timeline)
        t0 = time.perf_counter()
        cp.suspend("wake", "main")  # what the idle timeout does when it fires
        while os.path.exists(f"/proc/{c.pid}"):
            time.sleep(0.001)
        suspend.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        first_query(db.uri)
        wake.append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    report("wake", "connect to a suspended branch to first query, p50", statistics.median(wake) * 1e3, "ms",
           "< 250 ms", statistics.median(wake) < 0.25)
    report("wake", "p95", p95(wake) * 1e3, "ms")
    report("suspend", "idle branch to zero processes, p50", statistics.median(suspend) * 1e3, "ms",
           "< 300 ms", statistics.median(suspend) < 0.3)
    report("suspend", "p95", p95(suspend) * 1e3, "ms")
    cp.delete_database("wake")


def test_open_with_10000_suspended_branches(benchmark, tmp_path):
    home = str(tmp_path / "many")
    with ControlPlane(home) as cp:
        cp.create_database("one")
    t0 = time.perf_counter()
    ControlPlane(home).open().close()
    one = time.perf_counter() - t0
    with ControlPlane(home) as cp:
        for i in range(BRANCHES - 1):
            cp.create_branch("one", f"b{i}")
    times: list[float] = []

    def open_close():
        t0 = time.perf_counter()
        cp = ControlPlane(home).open()
        times.append(time.perf_counter() - t0)
        assert len(cp.catalog.branches) == BRANCHES
        cp.close()

    benchmark.pedantic(open_close, rounds=3, warmup_rounds=0)
    many = statistics.median(times)
    report(f"open with {BRANCHES:,} suspended branches", "open (page server, catalog, sweep), p50",
           many * 1e3, "ms", "< 1000 ms", many < 1.0)
    report(f"open with {BRANCHES:,} suspended branches", "open with one branch", one * 1e3, "ms")
