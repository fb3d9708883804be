"""`make demo`: databases on branches, on the embedded default store.

Loads a pgbench database once (kept across runs), then does what a test
suite or an agent does by the hour: takes branches of it (O(1)), starts a
stock PostgreSQL on each in a fraction of a second, changes each branch,
shows that no branch sees another's changes, stops them (nothing left
running), and shows what the branches cost on disk.

Needs root and FUSE (as `make demo` sets up); elsewhere it runs the storage
engine's demo instead. The store is `$STRATA_HOME` or `.strata` here.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import psycopg

from .compute import pg_bindir
from .server import PageServer

BASE_ID = "5374726174614465766f4261736500aa"  # the demo's base database, kept across runs


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def main() -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("PostgreSQL on branches needs root and /dev/fuse; running the storage engine's demo")
        from engine.demo import main as engine_demo

        return engine_demo([])
    home = os.environ.get("STRATA_HOME") or os.path.join(os.getcwd(), ".strata")
    t0 = time.perf_counter()
    with PageServer(home) as ps:
        print(f"page server {home}: open in {(time.perf_counter() - t0) * 1e3:.0f} ms")
        t0 = time.perf_counter()
        fresh = ps.template() is None
        template = ps.ensure_template()
        print(f"template: {'initdb + import' if fresh else 'kept from an earlier run'} "
              f"({(time.perf_counter() - t0) * 1e3:.0f} ms)")
        if BASE_ID in ps.store:
            base = ps.store.timeline(BASE_ID)
            print("base database: pgbench scale 5, loaded by an earlier run")
        else:
            t0 = time.perf_counter()
            base = ps.store.branch(template, timeline_id=BASE_ID)
            c = ps.start_compute(base)
            subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-i", "-s", "5", "-q", c.uri()],
                           check=True, capture_output=True)
            ps.stop_compute(c.id)
            print(f"base database: pgbench scale 5 loaded in {time.perf_counter() - t0:.1f} s")

        branch_ms, start_ms, branches = [], [], []
        for i in range(5):
            t0 = time.perf_counter()
            tl = ps.store.branch(base)
            branch_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            c = ps.start_compute(tl)
            with psycopg.connect(c.uri(), autocommit=True) as conn:
                conn.execute("update pgbench_branches set filler = %s where bid = 1", (f"branch {i}",))
            start_ms.append((time.perf_counter() - t0) * 1e3)
            branches.append((tl, c))
        print(f"5 branches: p50 {statistics.median(branch_ms):.2f} ms to branch, "
              f"{statistics.median(start_ms):.0f} ms to start postgres and write")
        print(f"  e.g. {branches[0][1].uri()}")
        for i, (_, c) in enumerate(branches):
            with psycopg.connect(c.uri()) as conn:
                row = conn.execute("select trim(filler) from pgbench_branches where bid = 1").fetchone()
            seen = row[0] if row else None
            assert seen == f"branch {i}", seen
        print("isolation: each branch sees its own change and no other's")
        for _, c in branches:
            ps.stop_compute(c.id)
        left = [p for p in os.listdir("/proc") if p.isdigit() and _is_ours(p, ps.mountpoint)]
        print(f"scale to zero: computes stopped, {len(left)} postgres processes left")
        ps.store.flush()
        held = sum(tl.usage().physical_size for tl, _ in branches)
        logical = base.logical_size()
        print(f"space: the base is {_mib(logical)} of files; 5 branches hold {_mib(held)} between them")
        for tl, _ in branches:
            ps.store.delete_timeline(tl)
    print("closed: every commit durable, mount gone")
    return 0


def _is_ours(pid: str, mountpoint: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd").startswith(mountpoint)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
