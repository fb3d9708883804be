"""What users get: pgbench through the URI Strata hands out (the proxy, in
the front-end process), next to the same branch's compute reached on its
own Unix socket, and the same workload on a cluster on local disk, in one
run, alternating, on the real service (supervisor, page server, front end).

    pgbench -c 4 -j 2, scale 10: TPC-B and select-only, ROUNDS runs of each
    path, alternating; the median of each path is reported.

Also: what connecting to a running branch costs through the proxy against
its socket (p50 of connect + SELECT 1), and how the 2 cores are shared:
CPU seconds per 1,000 transactions in each process (front end, page server,
the computes' postgres processes, pgbench), read from /proc.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import statistics
import subprocess
import time

import psycopg
import pytest

from pageserver.compute.paths import run_dir_for
from pageserver.compute.postgres import pg_bindir
from pageserver.service import daemon as service
from tests.pg import pg_available, strata

from .conftest import report
from .localpg import LocalPg

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")

SECONDS = int(os.environ.get("STRATA_BENCH_PROXY_SECONDS", 20))
ROUNDS = int(os.environ.get("STRATA_BENCH_PROXY_ROUNDS", 2))
CONNECTS = 200
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    except (OSError, IndexError):
        return 0.0


def postgres_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "postgres":
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def pgbench(env: dict[str, str], *args: str) -> tuple[float, int, float]:
    """(TPS, transactions, pgbench's own CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-n", *args], env=env, capture_output=True,
                       text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tps = tx = None
    for line in r.stdout.splitlines():
        if line.startswith("tps ="):
            tps = float(line.split()[2])
        if line.startswith("number of transactions actually processed"):
            tx = int(line.split(":")[1].split("/")[0])
    assert tps is not None and tx is not None, r.stdout + r.stderr
    return tps, tx, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def env_uri(uri: str) -> dict[str, str]:
    return {**os.environ, "PGCONNECT_TIMEOUT": "30", "PGDATABASE": uri}


def env_socket(sockdir: str, port: int) -> dict[str, str]:
    return {**os.environ, "PGHOST": sockdir, "PGPORT": str(port), "PGUSER": "postgres", "PGDATABASE": "postgres"}


@pytest.fixture(scope="module")
def service_and_local(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("proxy-bench") / "home")
    local = LocalPg().start()
    try:
        strata(home, "up")
        db = strata(home, "db", "create", "bench", "--idle-timeout", "1h")
        uri = db["uri"]
        subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-i", "-s", "10", "-q"], env=env_uri(uri),
                       check=True, capture_output=True)
        subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-i", "-s", "10", "-q"],
                       env=env_socket(local.root, local.port), check=True, capture_output=True)
        with psycopg.connect(uri) as conn:
            conn.execute("checkpoint")
        socks = [s for s in glob.glob(os.path.join(run_dir_for(home), "computes", "*", "sock", ".s.PGSQL.*"))
                 if not s.endswith(".lock")]
        assert len(socks) == 1, socks
        sockdir, port = os.path.dirname(socks[0]), int(socks[0].rsplit(".", 1)[1])
        yield home, uri, (sockdir, port), local
    finally:
        service.stop(home)
        local.stop()


def _compare(service_and_local, name: str, args: list[str], targets: dict[str, float]) -> None:
    home, uri, (sockdir, port), local = service_and_local
    procs = service.read_state(home)["processes"]
    fe, ps = procs["frontend"]["pid"], procs["pageserver"]["pid"]
    paths = {"proxy": env_uri(uri), "socket": env_socket(sockdir, port),
             "local": env_socket(local.root, local.port)}
    tps: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, dict[str, float]] = {}
    for rnd in range(ROUNDS):
        order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
        for path in order:
            pg = postgres_pids()
            before = {"front end": cpu_seconds(fe), "page server": cpu_seconds(ps),
                      "postgres": sum(cpu_seconds(p) for p in pg)}
            t, tx, bench_cpu = pgbench(paths[path], "-c", "4", "-j", "2", "-T", str(SECONDS), *args)
            after = {"front end": cpu_seconds(fe), "page server": cpu_seconds(ps),
                     "postgres": sum(cpu_seconds(p) for p in set(pg) | set(postgres_pids()))}
            tps[path].append(t)
            if rnd == 0:
                cpu[path] = {k: (after[k] - before[k]) / tx * 1000 for k in before}
                cpu[path]["pgbench"] = bench_cpu / tx * 1000
    med = {k: statistics.median(v) for k, v in tps.items()}
    for path in paths:
        report(name, f"TPS: {path} (runs {', '.join(f'{t:.0f}' for t in tps[path])})", med[path], "tps")
    for base, target in targets.items():
        ratio = med["proxy"] / med[base]
        report(name, f"proxy / {base}", ratio, "x", f">= {target}", ratio >= target)
    report(name, "socket / local", med["socket"] / med["local"], "x")
    for path in ("proxy", "socket"):
        shares = ", ".join(f"{k} {v:.3f}" for k, v in cpu[path].items())
        report(name, f"CPU s per 1,000 tx via {path}: {shares}", sum(cpu[path].values()), "s")
    print(json.dumps({"bench": name, "tps": tps, "cpu_per_1000_tx": cpu}))


def test_tpcb_through_the_proxy(benchmark, service_and_local):
    benchmark.pedantic(lambda: _compare(service_and_local, f"TPC-B through the proxy, scale 10, {SECONDS} s",
                                        [], {"socket": 0.9, "local": 0.7}), rounds=1, iterations=1)


def test_select_only_through_the_proxy(benchmark, service_and_local):
    benchmark.pedantic(lambda: _compare(service_and_local, f"select-only through the proxy, scale 10, {SECONDS} s",
                                        ["-S"], {"socket": 0.8, "local": 0.8}), rounds=1, iterations=1)


def test_connect_through_the_proxy(benchmark, service_and_local):
    home, uri, (sockdir, port), local = service_and_local
    # the compute's Unix socket, its only door (trust: only postgres, root and the front end's
    # group reach it), so the proxy's figure includes the SCRAM exchange, libpq's PBKDF2 and all
    direct = f"host={sockdir} port={port} user=postgres dbname=postgres"
    times: dict[str, list[float]] = {"proxy": [], "compute": []}

    def run() -> None:
        for _ in range(CONNECTS):
            for path, conninfo in (("proxy", uri), ("compute", direct)):
                t0 = time.perf_counter()
                with psycopg.connect(conninfo) as conn:
                    conn.execute("select 1").fetchone()
                times[path].append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=1, iterations=1)
    p = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    report("connect + SELECT 1 to a running branch", "through the proxy, p50", p["proxy"], "ms")
    report("connect + SELECT 1 to a running branch", "the compute's Unix socket (trust), p50", p["compute"], "ms")
    added = p["proxy"] - p["compute"]
    report("connect + SELECT 1 to a running branch", "added by the proxy (with SCRAM), p50", added, "ms", "< 5 ms",
           added < 5)
