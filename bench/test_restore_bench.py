"""Restore anywhere, timed: a pgbench database of about 1 GB (scale
STRATA_BENCH_RESTORE_SCALE, default 68) on `strata up --remote` on a real
SeaweedFS; at rest, once the object store's index holds the head (the
idle checkpoint's), the machine lost (every process killed
with SIGKILL, the mount gone, the home deleted); then, from an empty home,
`strata restore`, `strata up` and the first query through the proxy
(psql, as a user would), each step timed. The target is under 3 s from the empty home to the answer.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from pageserver.compute.postgres import pg_bindir
from pageserver.service import daemon as service
from tests.pg import env_for, pg_available, query, strata
from tests.s3servers import SeaweedFS
from tests.test_remote_service import lose_the_machine, target_of

from .conftest import report

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")

SCALE = int(os.environ.get("STRATA_BENCH_RESTORE_SCALE", 68))


def test_restore_to_first_query_of_a_1gb_database(benchmark, tmp_path, monkeypatch):
    with SeaweedFS() as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        url = s3.url()
        home, new = str(tmp_path / "home"), str(tmp_path / "new")
        steps: dict[str, float] = {}
        try:
            strata(home, "up", "--remote", url)
            db = strata(home, "db", "create", "big")
            t = target_of(home, db)
            t0 = time.monotonic()
            subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-i", "-s", str(SCALE), "-q"],
                           env=env_for(t), check=True, capture_output=True)
            query(t, "checkpoint")
            (size,) = query(t, "select pg_database_size(current_database())")[0]
            steps["load"] = time.monotonic() - t0
            t1 = time.monotonic()
            deadline = t1 + 600
            while time.monotonic() < deadline:  # (at rest: the idle checkpoint's index holds the head)
                rem = strata(home, "status")["remote"]
                if rem["ship_lag_bytes"] == 0 and rem["index_lag_lsns"] == 0:
                    break
                time.sleep(0.5)
            steps["upload"] = time.monotonic() - t1
            lose_the_machine(home)

            def run() -> None:
                t0 = time.monotonic()
                r = strata(new, "restore", "--remote", url, "--force")
                t1 = time.monotonic()
                strata(new, "up")
                t2 = time.monotonic()
                r2 = subprocess.run([os.path.join(pg_bindir(), "psql"), "-Atc", "select count(*) from pgbench_branches"],
                                    env=env_for(target_of(new, db)), check=True, capture_output=True, text=True)
                t3 = time.monotonic()
                assert r2.stdout.strip() == str(SCALE)
                rem = strata(new, "status")["remote"]
                steps.update(restore=t1 - t0, up=t2 - t1, first_query=t3 - t2, total=t3 - t0,
                             log_bytes=r["log_bytes"], layers=r["layers"], fetched=rem["fetched"],
                             fetched_bytes=rem["fetched_bytes"])

            benchmark.pedantic(run, rounds=1, iterations=1)
        finally:
            for h in (home, new):
                if os.path.isdir(h):
                    service.stop(h)
    b = f"restore anywhere, pgbench scale {SCALE}"
    report(b, "database size", size / 1e9, "GB")
    report(b, "load (pgbench -i -q, then a checkpoint)", steps["load"], "s")
    report(b, "then until the index holds the head (idle checkpoint, upload)", steps["upload"], "s")
    report(b, "log replayed after the index", steps["log_bytes"] / 1e6, "MB")
    for name in ("restore", "up", "first_query"):
        report(b, f"{name.replace('_', ' ')}", steps[name], "s")
    report(b, "layers fetched by then", steps["fetched"], "")
    report(b, "bytes fetched by then", steps["fetched_bytes"] / 1e6, "MB")
    report(b, "empty home to the first query answered", steps["total"], "s", "< 3 s", steps["total"] < 3)
    print(steps)
