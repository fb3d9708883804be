"""kill -9 under load: pgbench (-c 8, per-transaction log) on two branches
through the proxy while, at random moments, one process is killed with
SIGKILL, in turn: the whole service (its supervisor: the page server and
the front end then stop), the page server process alone, the front-end
process alone (the supervisor restarts either), and a compute's postmaster.
No transaction pgbench saw committed may be lost; pgbench's invariants and
pg_amcheck --heapallindexed must hold. `make test` runs 3 rounds;
`TORTURE=1` (make torture) 20, and prints the figures. Losses are
counted per round, against what that round's pgbench acknowledged."""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import time

import psycopg

from pageserver.service import daemon as service

from .pg import (
    ProxyTarget,
    amcheck,
    assert_invariants,
    committed_in_log,
    env_for,
    pg_bindir,
    query,
    requires_pg,
    strata,
)

pytestmark = requires_pg
ROUNDS = 20 if os.environ.get("TORTURE") else 4
VICTIMS = ("service", "pageserver", "frontend", "compute")
def first_answer(target: ProxyTarget, deadline: float = 120.0) -> float:
    t0 = time.monotonic()
    while True:
        try:
            with psycopg.connect(target.uri(), connect_timeout=30) as conn:
                conn.execute("select 1").fetchone()
            return time.monotonic() - t0
        except psycopg.OperationalError:
            if time.monotonic() - t0 > deadline:
                raise
            time.sleep(0.05)


def count_history(target: ProxyTarget) -> int:
    first_answer(target)  # woken, after a restart
    (n,) = query(target, "select count(*) from pgbench_history")[0]
    return int(n)


def postmaster_of(target: ProxyTarget) -> int:
    """The pid of the branch's postmaster (woken if need be)."""
    first_answer(target)
    (pid,) = query(target, "select pid from pg_stat_activity where backend_type = 'checkpointer'")[0]
    return int(open(f"/proc/{pid}/stat").read().split(")")[1].split()[1])  # its parent


def test_kill_9_under_load_loses_no_committed_transaction(tmp_path):
    home = str(tmp_path / "home")
    rng = random.Random(11)
    try:
        state = strata(home, "up")
        port = int(state["proxy"].rsplit(":", 1)[1])
        db = strata(home, "db", "create", "load")
        password = db["uri"].split(":")[2].split("@")[0]
        a = ProxyTarget(port, password, "load.main")
        subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-i", "-s", "2", "-q"], env=env_for(a),
                       check=True, capture_output=True)
        other = strata(home, "branch", "create", "load/other")  # (a branch has passwords of its own)
        b = ProxyTarget(port, other["uri"].split(":")[2].split("@")[0], "load.other")
        committed = {a.endpoint: 0, b.endpoint: 0}
        restarts, kills, losses = [], dict.fromkeys(VICTIMS, 0), []
        for rnd in range(ROUNDS):
            # what each branch holds before the round: a round's losses are counted against
            # its own commits (rows committed but never acknowledged in an earlier round
            # would otherwise hide a later round's losses)
            before = {t.endpoint: count_history(t) for t in (a, b)}
            runs = []
            for t in (a, b):
                logdir = tmp_path / f"r{rnd}-{t.endpoint}"
                logdir.mkdir()
                runs.append((t, logdir, subprocess.Popen(
                    [os.path.join(pg_bindir(), "pgbench"), "-c", "8", "-j", "2", "-T", "10", "-l", "-n"],
                    env=env_for(t), cwd=logdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            time.sleep(rng.uniform(1.0, 3.0))
            victim = VICTIMS[rnd % len(VICTIMS)]
            if victim == "compute":
                os.kill(postmaster_of(b), signal.SIGKILL)
            elif victim == "service":
                os.kill(service.read_state(home)["pid"], signal.SIGKILL)
            else:
                os.kill(service.read_state(home)["processes"][victim]["pid"], signal.SIGKILL)
            kills[victim] += 1
            for _, _, p in runs:
                p.wait(timeout=120)
            t0 = time.monotonic()
            strata(home, "up")
            first_answer(a)
            restarts.append(time.monotonic() - t0)
            lost = 0
            for t, logdir, _ in runs:
                acked = committed_in_log(str(logdir))
                committed[t.endpoint] += acked
                lost += max(0, acked - (count_history(t) - before[t.endpoint]))
                assert_invariants(t)
            losses.append(lost)
            assert lost == 0, f"round {rnd}: {lost} acknowledged transactions lost (losses by round: {losses})"
        for t in (a, b):
            amcheck(t)
        print(f"kill -9 under load: {ROUNDS} rounds (killed: {kills}), {sum(committed.values())} transactions pgbench saw committed, lost by round "
              f"{losses}; "
              f"restart to first answer p50 {statistics.median(restarts) * 1e3:.0f} ms, "
              f"max {max(restarts) * 1e3:.0f} ms")
        assert sum(committed.values()) > 0
    finally:
        # a killed service leaves its computes and mount behind: a start ends them, a stop ends it
        if service.read_state(home) is None and os.path.isdir(home):
            try:
                service.start(home)
            except Exception:  # noqa: BLE001 - stopping what is there matters more
                pass
        service.stop(home)
