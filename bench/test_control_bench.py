"""Control plane benchmarks (issue: control plane), with baselines from the
same run.

1. provisioning: create a database (URI in hand) and run its first query
   through the proxy (which wakes it), vs CREATE DATABASE + first query on
   an already running local PostgreSQL
2. opening the service's store with 10,000 suspended branches vs with one
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

import psycopg
import pytest

from pageserver.compute import free_port, pg_bindir, run_as
from pageserver.control import ControlPlane
from pageserver.proxy import Proxy
from tests.pg import pg_available

from .conftest import report

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")
ROUNDS = 15
BRANCHES = int(os.environ.get("STRATA_BENCH_BRANCHES", 10_000))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cp = ControlPlane(str(tmp_path_factory.mktemp("cp-bench"))).open()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxy = Proxy(cp)
    cp.proxy_port = asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)[1]
    try:
        yield cp
    finally:
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        cp.close()


@pytest.fixture(scope="module")
def local_pg():
    root = tempfile.mkdtemp(prefix="strata-bench-cp-")
    user, uid, gid = run_as()
    os.chmod(root, 0o755)
    os.chown(root, uid, gid)
    pgdata, port = os.path.join(root, "pgdata"), free_port()
    pg_ctl = os.path.join(pg_bindir(), "pg_ctl")
    subprocess.run([os.path.join(pg_bindir(), "initdb"), "-D", pgdata, "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, user=user, cwd="/")
    subprocess.run([pg_ctl, "-D", pgdata, "-l", pgdata + ".log", "start", "-w", "-o",
                    f"-p {port} -c listen_addresses='' -c unix_socket_directories={root}"],
                   check=True, capture_output=True, user=user, cwd="/")
    try:
        yield f"host={root} port={port} user=postgres"
    finally:
        subprocess.run([pg_ctl, "-D", pgdata, "stop", "-m", "fast"], capture_output=True, user=user, cwd="/")
        shutil.rmtree(root, ignore_errors=True)


def test_provision_a_database_vs_create_database(benchmark, served, local_pg):
    cp = served
    create, ready, baseline = [], [], []

    def one_round():
        t0 = time.perf_counter()
        db = cp.create_database()
        create.append(time.perf_counter() - t0)
        with psycopg.connect(db.uri, connect_timeout=60) as conn:
            conn.execute("select 1").fetchone()
        ready.append(time.perf_counter() - t0)
        cp.delete_database(db.name)
        with psycopg.connect(local_pg + " dbname=postgres", autocommit=True) as conn:
            t0 = time.perf_counter()
            conn.execute("create database bench_copy")
            with psycopg.connect(local_pg + " dbname=bench_copy") as c2:
                c2.execute("select 1").fetchone()
            baseline.append(time.perf_counter() - t0)
            conn.execute("drop database bench_copy")

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    c50, r50, b50 = (statistics.median(x) for x in (create, ready, baseline))
    report("provisioning", "create database (URI returned), p50", c50 * 1e3, "ms", "< 100 ms", c50 < 0.1)
    report("provisioning", "create + first query through the proxy (wakes it), p50", r50 * 1e3, "ms",
           "< 1000 ms", r50 < 1.0)
    report("provisioning", "CREATE DATABASE + first query on a running local cluster, p50", b50 * 1e3, "ms")
    report("provisioning", "ours / CREATE DATABASE", r50 / b50, "x")


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
