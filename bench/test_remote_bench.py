"""What the object-store tier costs: pgbench TPC-B through the proxy (the
URI users get) on one service without a remote, with `--remote` on a real
SeaweedFS, and with `--remote --durable` (every commit waits for the object
store), in one run; and, for the remote runs, the write amplification:
bytes written to local disk (the page server process's write_bytes, from
/proc) and to the object store (chunks, layers, indexes) per byte
PostgreSQL wrote (its WAL, pg_stat_wal, and the data pages written out,
pg_stat_bgwriter), over pgbench and a checkpoint, then over a
DDL-heavy loop (create, fill, index, drop tables); and the upload lag
during pgbench, as p50 and p99 of samples every 0.1 s: bytes of the log
not yet shipped, and LSNs of the head no uploaded index holds.

    pgbench -c 4 -j 2, scale 5, SECONDS per run; each mode its own home.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time

import pytest

from pageserver.clients.sdk import Strata
from pageserver.compute.postgres import pg_bindir
from pageserver.service import daemon as service
from tests.pg import ProxyTarget, env_for, pg_available, query, strata
from tests.s3servers import SeaweedFS

from .conftest import report

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")

SECONDS = int(os.environ.get("STRATA_BENCH_REMOTE_SECONDS", 15))
DDL = """
do $$ begin for i in 1..20 loop
  execute format('create table ddl_%s (id int primary key, v text)', i);
  execute format('insert into ddl_%s select g, repeat(''x'', 200) from generate_series(1, 2000) g', i);
  execute format('create index on ddl_%s (v)', i);
end loop; for i in 1..20 loop execute format('drop table ddl_%s', i); end loop; end $$;
"""


def write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("write_bytes:")).split()[1])


def pg_bytes(t: ProxyTarget) -> int:
    """What PostgreSQL has written: its WAL, and the data pages its
    checkpointer, background writer and backends wrote out."""
    (row,) = query(t, """select (select wal_bytes from pg_stat_wal)
                                + 8192 * (select buffers_checkpoint + buffers_clean + buffers_backend
                                          from pg_stat_bgwriter)""")
    return int(row[0])


def remote_up(home: str) -> dict:
    return strata(home, "status")["remote"] or {}


def up_bytes(rem: dict) -> int:
    return int(rem.get("chunk_bytes", 0) + rem.get("layer_bytes", 0) + rem.get("index_bytes", 0))


class LagSampler:
    """Samples the remote's lag every 0.1 s while it runs: bytes of the
    fsynced log not yet in the object store, and LSNs of the head that no
    uploaded index holds in layers (the log holds them)."""

    def __init__(self, home: str) -> None:
        self.client = Strata(home, start=False)
        self.ship: list[int] = []
        self.index: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            rem = self.client.call("GET", "/status").get("remote") or {}
            if rem:
                self.ship.append(int(rem["ship_lag_bytes"]))
                self.index.append(int(rem["index_lag_lsns"]))

    def __enter__(self) -> LagSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()

    def percentiles(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, xs in (("ship_lag_bytes", self.ship), ("index_lag_lsns", self.index)):
            if len(xs) >= 2:
                q = statistics.quantiles(xs, n=100, method="inclusive")
                out[f"{name} p50"], out[f"{name} p99"] = q[49], q[98]
        return out


def run_mode(home: str, extra: list[str], label: str) -> dict:
    strata(home, "up", *extra)
    try:
        st = service.read_state(home)
        db = strata(home, "db", "create", "bench")
        t = ProxyTarget(int(st["proxy"].rsplit(":", 1)[1]), db["uri"].split(":")[2].split("@")[0], "bench.main")
        bench = os.path.join(pg_bindir(), "pgbench")
        subprocess.run([bench, "-i", "-s", "5", "-q"], env=env_for(t), check=True, capture_output=True)
        ps = st["processes"]["pageserver"]["pid"]
        out: dict = {}
        for phase, cmd in (("pgbench", [bench, "-c", "4", "-j", "2", "-T", str(SECONDS), "-n"]),
                           ("DDL", None)):
            w0, d0, r0 = pg_bytes(t), write_bytes(ps), up_bytes(remote_up(home))
            t0 = time.monotonic()
            if cmd is not None:
                with LagSampler(home) as lag:
                    r = subprocess.run(cmd, env=env_for(t), check=True, capture_output=True, text=True)
                tps = float(next(line for line in r.stdout.splitlines() if line.startswith("tps")).split()[2])
                out["tps"] = tps
                out["lag"] = lag.percentiles()
            else:
                for _ in range(3):
                    query(t, DDL)
            query(t, "checkpoint")
            deadline = time.monotonic() + 120
            while remote_up(home).get("ship_lag_bytes", 0) and time.monotonic() < deadline:
                time.sleep(0.2)  # (until the shipper has caught up)
            wal = max(1, pg_bytes(t) - w0)
            out[phase] = {"wal": wal, "local": (write_bytes(ps) - d0) / wal,
                          "remote": (up_bytes(remote_up(home)) - r0) / wal, "seconds": time.monotonic() - t0}
        out["status"] = remote_up(home)
        return out
    finally:
        service.stop(home)


def test_tpcb_with_a_remote_and_in_durable_mode_and_write_amplification(benchmark, tmp_path, monkeypatch):
    with SeaweedFS() as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        results: dict[str, dict] = {}

        def run() -> None:
            results["local"] = run_mode(str(tmp_path / "local"), [], "no remote")
            results["remote"] = run_mode(str(tmp_path / "remote"), ["--remote", s3.url()], "remote")
            results["durable"] = run_mode(str(tmp_path / "durable"), ["--remote", s3.url(), "--durable"], "durable")

        benchmark.pedantic(run, rounds=1, iterations=1)
    base = results["local"]["tps"]
    b = "remote tier, TPC-B scale 5, -c 4"
    report(b, "TPC-B, no remote", base, "tps")
    report(b, "TPC-B, --remote (async, ~0.2 s RPO) / no remote", results["remote"]["tps"] / base, "x")
    report(b, "TPC-B, --remote --durable / no remote", results["durable"]["tps"] / base, "x")
    for mode in ("remote", "durable"):
        for name, v in results[mode]["lag"].items():
            report(b, f"upload lag during TPC-B, {mode}: {name}", v, "")
    for mode in ("local", "remote", "durable"):
        for phase in ("pgbench", "DDL"):
            r = results[mode][phase]
            report(b, f"write amplification, {mode}, {phase}: local disk / PostgreSQL's", r["local"], "x")
            if mode != "local":
                report(b, f"write amplification, {mode}, {phase}: object store / PostgreSQL's", r["remote"], "x")
    print({m: {k: v for k, v in r.items() if k != "status"} for m, r in results.items()})
    print("status after the remote run:", results["remote"]["status"])
