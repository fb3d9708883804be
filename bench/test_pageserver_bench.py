"""Page server benchmarks (issue: PostgreSQL on a branch), each against the
same cluster on local disk, measured side by side in one run.

1. compute start on a fresh branch (to the first accepted connection) vs
   `pg_ctl start` of a local copy
2. pgbench TPC-B (-c 4 -j 2, scale 10, 60 s) on a branch vs local disk
3. select-only pgbench on a branch vs local disk
4. branch a 150 MB database and start a compute on it, vs CREATE DATABASE
   ... TEMPLATE (FILE_COPY and WAL_LOG) and cp -a of the data directory

pgbench reaches both clusters through their Unix sockets. 2 and 3 also run
on the local copy through Strata's FUSE layer with the engine taken out
(`bench/passthrough.py`): what FUSE and a Python server cost before any
storage work, the ceiling for the branch's ratio; and on a branch with a
storage cap it never reaches (`max_size`: its relation files bypass the
kernel's cache, so that a write past the cap is refused as it is made).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time

import psycopg
import pytest

from pageserver.compute.node import Node
from pageserver.compute.postgres import Compute, free_port, pg_bindir, run_as
from tests.pg import pg_available, run_pg

from .conftest import report
from .passthrough import passthrough

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")

TPCB_SECONDS = int(os.environ.get("STRATA_BENCH_TPCB_SECONDS", 60))
SELECT_SECONDS = int(os.environ.get("STRATA_BENCH_SELECT_SECONDS", 30))
STARTS = 15


class LocalCluster:
    """The same cluster on local disk, run with pg_ctl."""

    def __init__(self, pgdata: str, sockdir: str, logfile: str | None = None) -> None:
        self.pgdata = pgdata
        self.sockdir = sockdir
        self.logfile = logfile or pgdata + ".log"
        self.port = free_port()
        self.user, self.uid, self.gid = run_as()

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [os.path.join(pg_bindir(), "pg_ctl"), "-D", self.pgdata, "-l", self.logfile, *args],
            check=True, capture_output=True, user=self.user, cwd="/",
        )

    def start(self) -> float:
        t0 = time.perf_counter()
        self._pg_ctl("start", "-w", "-o",
                     f"-p {self.port} -c listen_addresses= -c unix_socket_directories={self.sockdir}")
        psycopg.connect(self.conninfo()).close()
        return time.perf_counter() - t0

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast", "-w")

    def conninfo(self, db: str = "postgres") -> str:
        return f"host={self.sockdir} port={self.port} user=postgres dbname={db}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("ps-bench"))
    ps = Node(home).open()
    local_root = tempfile.mkdtemp(prefix="strata-bench-local-")
    try:
        base = ps.store.branch(ps.ensure_template(progress=False))
        c = ps.start_compute(base)
        run_pg("pgbench", c, "-i", "-s", "10", "-q")
        run_pg("psql", c, "-c", "checkpoint")
        ps.stop_compute(c.id)
        _, uid, gid = run_as()
        os.chmod(local_root, 0o755)
        os.chown(local_root, uid, gid)
        pgdata = os.path.join(local_root, "pgdata")
        ps.export_datadir(base, pgdata, progress=False)
        local = LocalCluster(pgdata, local_root)
        yield ps, base, local
    finally:
        try:
            LocalCluster(os.path.join(local_root, "pgdata"), local_root).stop()
        except Exception:  # noqa: BLE001 - it may not be running
            pass
        ps.close()
        shutil.rmtree(local_root, ignore_errors=True)


def _env_local(local: LocalCluster) -> dict[str, str]:
    return dict(os.environ, PGHOST=local.sockdir, PGPORT=str(local.port), PGUSER="postgres",
                PGDATABASE="postgres")


def _pgbench_tps(env: dict[str, str], *args: str) -> float:
    r = subprocess.run([os.path.join(pg_bindir(), "pgbench"), *args], env=env, capture_output=True,
                       text=True, check=True)
    for line in r.stdout.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise AssertionError(r.stdout + r.stderr)


def _env_compute(c: Compute) -> dict[str, str]:
    """pgbench on the compute through its Unix socket, as on the local
    cluster: the transport is the same on both sides, so the ratio is the
    storage's (over TCP loopback pgbench loses 10-20% of select-only TPS on
    this machine to the network stack alone, storage aside)."""
    return dict(os.environ, PGHOST=c.socket_dir, PGPORT=str(c.port), PGUSER="postgres",
                PGDATABASE="postgres")


def test_compute_start_vs_pg_ctl_start(benchmark, setup):
    ps, base, local = setup
    ours, theirs = [], []

    def one_round():
        t0 = time.perf_counter()
        tl = ps.store.branch(base)
        c = ps.start_compute(tl)
        psycopg.connect(c.uri(), connect_timeout=30).close()
        ours.append(time.perf_counter() - t0)
        ps.stop_compute(c.id)
        ps.store.delete_timeline(tl)
        theirs.append(local.start())
        local.stop()

    benchmark.pedantic(one_round, rounds=STARTS, warmup_rounds=1)
    p50, lp50 = statistics.median(ours), statistics.median(theirs)
    report("compute start", "branch + start + first connection, p50", p50 * 1e3, "ms", "< 300 ms", p50 < 0.3)
    report("compute start", "pg_ctl start of a local copy + first connection, p50", lp50 * 1e3, "ms")
    report("compute start", "ours / pg_ctl", p50 / lp50, "x", "< 1.5", p50 / lp50 < 1.5)


def _tps_pair(benchmark, setup, args: list[str], name: str, target: float) -> None:
    """TPS on a branch and on local disk, and (the ceiling for the ratio)
    through Strata's FUSE layer with the engine taken out."""
    ps, base, local = setup
    results: dict[str, float] = {}

    def run():
        tl = ps.store.branch(base)
        c = ps.start_compute(tl)
        try:
            results["branch"] = _pgbench_tps(_env_compute(c), *args)
        finally:
            ps.stop_compute(c.id)
            ps.store.delete_timeline(tl)
        tl = ps.store.branch(base)
        c = ps.start_compute(tl, max_size=1 << 40)
        try:
            results["capped"] = _pgbench_tps(_env_compute(c), *args)
        finally:
            ps.stop_compute(c.id)
            ps.store.delete_timeline(tl)
        local.start()
        try:
            results["local"] = _pgbench_tps(_env_local(local), *args)
        finally:
            local.stop()
        with passthrough(local.pgdata, local.uid, local.gid) as pgdata:
            through = LocalCluster(pgdata, local.sockdir, local.logfile)
            through.start()
            try:
                results["passthrough"] = _pgbench_tps(_env_local(through), *args)
            finally:
                through.stop()

    benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = results["branch"] / results["local"]
    report(name, "TPS on a branch", results["branch"], "tps")
    report(name, "TPS on local disk", results["local"], "tps")
    report(name, "TPS through the FUSE layer without the engine (bench/passthrough.py)",
           results["passthrough"], "tps")
    report(name, "branch / local", ratio, "x", f">= {target}", ratio >= target)
    report(name, "FUSE layer without the engine / local (the ceiling)", results["passthrough"] / results["local"], "x")
    report(name, "TPS on a branch with a storage cap (max_size)", results["capped"], "tps")
    report(name, "capped branch / uncapped branch", results["capped"] / results["branch"], "x")


def test_tpcb_on_a_branch_vs_local_disk(benchmark, setup):
    _tps_pair(benchmark, setup, ["-c", "4", "-j", "2", "-T", str(TPCB_SECONDS)],
              f"pgbench TPC-B, scale 10, {TPCB_SECONDS} s", 0.8)


def test_select_only_on_a_branch_vs_local_disk(benchmark, setup):
    _tps_pair(benchmark, setup, ["-c", "4", "-j", "2", "-S", "-T", str(SELECT_SECONDS)],
              f"pgbench select-only, scale 10, {SELECT_SECONDS} s", 0.9)


def test_copy_a_150mb_database(benchmark, setup):
    ps, base, local = setup
    times: dict[str, list[float]] = {"branch": [], "file_copy": [], "wal_log": [], "cp": []}

    def run():
        t0 = time.perf_counter()
        tl = ps.store.branch(base)
        c = ps.start_compute(tl)
        with psycopg.connect(c.uri(), connect_timeout=30) as conn:
            conn.execute("select count(*) from pgbench_branches").fetchone()
        times["branch"].append(time.perf_counter() - t0)
        ps.stop_compute(c.id)
        ps.store.delete_timeline(tl)
        local.start()
        try:
            with psycopg.connect(local.conninfo(), autocommit=True) as conn:
                conn.execute("drop database if exists copy")
                for strategy in ("file_copy", "wal_log"):
                    t0 = time.perf_counter()
                    conn.execute(f"create database copy template postgres strategy {strategy}")
                    with psycopg.connect(local.conninfo("copy")) as c2:
                        c2.execute("select count(*) from pgbench_branches").fetchone()
                    times[strategy].append(time.perf_counter() - t0)
                    conn.execute("drop database copy")
        finally:
            local.stop()
        dest = local.pgdata + "-copy"
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", local.pgdata, dest], check=True)
        times["cp"].append(time.perf_counter() - t0)
        shutil.rmtree(dest)

    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    report("copy a 150 MB database", "branch + start compute + first query", med["branch"] * 1e3, "ms")
    report("copy a 150 MB database", "CREATE DATABASE ... STRATEGY FILE_COPY + first query",
           med["file_copy"] * 1e3, "ms")
    report("copy a 150 MB database", "CREATE DATABASE ... STRATEGY WAL_LOG + first query",
           med["wal_log"] * 1e3, "ms")
    report("copy a 150 MB database", "cp -a of the data directory", med["cp"] * 1e3, "ms")
