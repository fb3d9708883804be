"""`make demo`: databases and branches on the embedded default store.

Starts the Strata service (`strata up`) on `$STRATA_HOME` or `.strata`
here, loads a pgbench database once (kept across runs), then does what a
test suite or an agent does by the hour, through the SDK: takes branches of
it (O(1)), connects to each through the proxy (which starts a stock
PostgreSQL on it), changes each, shows that no branch sees another's
changes, suspends them (nothing left running), wakes one on connect, and
shows what the branches cost on disk. Stops the service if it started it.

Needs root and FUSE (as `make demo` sets up); elsewhere it runs the storage
engine's demo instead.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from pageserver.clients.sdk import Strata
from pageserver.compute.postgres import pg_bindir
from pageserver.errors import UnknownObjectError
from pageserver.service import daemon as service

BASE = "demo"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def main() -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("PostgreSQL on branches needs root and /dev/fuse; running the storage engine's demo")
        from engine.demo import main as engine_demo

        return engine_demo([])
    home = service.default_home()
    was_running = service.read_state(home) is not None
    t0 = time.perf_counter()
    state = service.start(home)
    print(f"strata up: {home} (API {state['api']}, proxy {state['proxy']}) in "
          f"{time.perf_counter() - t0:.1f} s{' (already running)' if was_running else ''}")
    try:
        with Strata(home) as strata:
            run(strata)
    finally:
        if not was_running:
            service.stop(home)
            print("strata down: every compute stopped, every commit durable, mount gone")
    return 0


def run(strata: Strata) -> None:
    try:
        base = strata.database(BASE)
        print(f"base database {BASE!r}: pgbench scale 5, loaded by an earlier run")
    except UnknownObjectError:
        t0 = time.perf_counter()
        base = strata.create_database(BASE)
        subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-i", "-s", "5", "-q"], check=True,
                       capture_output=True, env={**os.environ, "PGDATABASE": base.uri})  # (not on argv: ps shows it)
        base.suspend()
        print(f"base database {BASE!r}: created and loaded with pgbench scale 5 in "
              f"{time.perf_counter() - t0:.1f} s")
    for b in base.branches():
        if b.name.startswith("run-"):
            b.delete()  # left by an interrupted run

    create_ms, ready_ms, branches = [], [], []
    for i in range(5):
        t0 = time.perf_counter()
        br = base.branch(f"run-{i}", ttl="1h")
        create_ms.append((time.perf_counter() - t0) * 1e3)
        br.sql("update pgbench_branches set filler = %s where bid = 1", (f"branch {i}",))
        ready_ms.append((time.perf_counter() - t0) * 1e3)
        branches.append(br)
    print(f"5 branches: p50 {statistics.median(create_ms):.1f} ms to create (URI returned), "
          f"{statistics.median(ready_ms):.0f} ms to the first write through the proxy")
    print("  each URI with a password of its own branch's (the service keeps only its SCRAM verifier)")
    for i, br in enumerate(branches):
        seen = br.sql("select trim(filler) from pgbench_branches where bid = 1")[0][0]
        assert seen == f"branch {i}", seen
    print("isolation: each branch sees its own change and no other's")
    for br in branches:
        br.suspend()
    print(f"scale to zero: {sum(br.state == 'suspended' for br in branches)} of 5 suspended, "
          f"{len(strata.status()['running'])} computes running")
    t0 = time.perf_counter()
    total = branches[0].sql("select sum(abalance) from pgbench_accounts")[0][0]
    print(f"wake on connect: a query on a suspended branch answered in "
          f"{(time.perf_counter() - t0) * 1e3:.0f} ms (sum of balances {total})")
    infos = [br.refresh() for br in branches]
    logical = infos[0]["logical_size"]
    alone = sum(i["exclusive_size"] for i in infos)
    print(f"space: each branch shows {_mib(logical)} of data; the 5 hold {_mib(alone)} of their own")
    for br in branches:
        br.delete()


if __name__ == "__main__":
    sys.exit(main())
