"""Each database's limits, against real PostgreSQL: its storage cap
(ENOSPC from the FUSE layer), connections per branch, compute memory (a
cgroup, settings), API creations per token; and the noisy neighbour: one
database running into its cap while another runs pgbench."""

from __future__ import annotations

import os
import re
import threading
import time

import hypothesis.strategies as st
import psycopg
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from psycopg import sql as psql

from pageserver.compute.postgres import processes_in
from pageserver.control.limits import DEFAULTS, GiB, KiB, Limits, MiB, limits_of, parse_size
from pageserver.errors import BadRequestError, RateLimitedError
from pageserver.frontend.api import make_app

from .pg import ProxyTarget, Running, amcheck, assert_invariants, query, requires_pg, run_pg

ENOSPC = re.compile(r'could not extend file "base/\d+/\d+(?:_\w+)?(?:\.\d+)?": No space left on device')
requires_memory_cgroup = pytest.mark.needs("memory-cgroup")


def target(r: Running, info) -> ProxyTarget:
    return ProxyTarget(r.cp.proxy_port, info.password, f"{info.name}.main")


def fill(t: ProxyTarget, *, batches: int = 1000, start: int = 0) -> tuple[int, str | None]:
    """Insert 1 MB batches (one transaction each) until one fails: (rows
    committed, the error that stopped it, or None)."""
    rows = start
    with psycopg.connect(t.uri(), autocommit=True, connect_timeout=30) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (id bigint PRIMARY KEY, pad text)")
        for _ in range(batches):
            try:
                conn.execute("INSERT INTO filler SELECT o, (SELECT string_agg(md5(random()::text || i || o), '') "
                             "FROM generate_series(1, 30) i) FROM generate_series(%s::bigint, %s::bigint) o",
                             (rows + 1, rows + 1000))
            except psycopg.Error as e:
                return rows, str(e)
            rows += 1000
    return rows, None


# --- the limits themselves -------------------------------------------------------------------------


def test_limits_are_checked_and_named_when_wrong():
    assert limits_of({"max_size": "1GB", "memory": "512MB", "branch_connections": 5}) == Limits(
        max_size=GiB, memory=512 * MiB, branch_connections=5)
    assert limits_of({"max_size": "none"}).max_size == 0
    for bad, named in [({"max_size": "1 parsec"}, "max_size"), ({"max_size": "1MB"}, "max_size"),
                       ({"branch_connections": 500}, "branch_connections"), ({"shared_buffers": -1}, "shared_buffers"),
                       ({"work_mem": "3GB"}, "work_mem"), ({"creations_per_minute": "many"}, "creations_per_minute"),
                       ({"memory": "100MB", "shared_buffers": "90MB"}, "memory"), ({"cpu": 2}, "cpu"),
                       ({"branch_connections": True}, "branch_connections")]:
        with pytest.raises(BadRequestError, match=named):
            limits_of(bad)
    assert Limits(max_size=GiB).over(DEFAULTS).memory == DEFAULTS.memory
    assert Limits(shared_buffers=16 * MiB, work_mem=64 * KiB).settings() == {"shared_buffers": "16384kB",
                                                                             "work_mem": "64kB"}


@given(n=st.integers(0, 1 << 40), unit=st.sampled_from([("", 1), ("kB", KiB), ("MB", MiB), ("GB", GiB)]),
       space=st.sampled_from(["", " "]))
def test_sizes_parse_as_postgresql_writes_them(n, unit, space):
    assert parse_size(f"{n}{space}{unit[0]}") == n * unit[1]
    assert parse_size(n) == n


@requires_pg
def test_a_database_keeps_its_limits_and_its_branches_share_them(tmp_path):
    home = str(tmp_path / "home")
    with Running(home, limits={"memory": "768MB"}) as r:
        d = r.cp.create_database("a", limits={"max_size": "64MB", "branch_connections": 7})
        assert d.limits["max_size"] == 64 * MiB and d.limits["memory"] == 768 * MiB  # its own, the default
        r.cp.create_branch("a", "dev")
        assert r.cp.branch("a", "dev").limits["branch_connections"] == 7
        r.cp.update_database("a", limits={"max_size": "128MB"})
        assert r.cp.branch("a", "dev").limits["max_size"] == 128 * MiB
        with pytest.raises(BadRequestError, match="max_size"):
            r.cp.update_database("a", limits={"max_size": "1kB"})
        assert r.cp.status()["limits"]["defaults"]["memory"] == "768 MB"
    with Running(home) as r:  # kept in the catalog; the defaults are the service's again
        assert r.cp.branch("a", "main").limits["max_size"] == 128 * MiB
        assert r.cp.branch("a", "dev").limits["branch_connections"] == 7
        assert r.cp.database("a").limits["memory"] == DEFAULTS.memory


# --- storage ----------------------------------------------------------------------------------


@requires_pg
def test_a_write_past_the_cap_gets_enospc_keeps_what_committed_and_works_again(tmp_path):
    with Running(str(tmp_path / "home")) as r:
        capped = target(r, r.cp.create_database("capped", limits={"max_size": "40MB"}))
        other = target(r, r.cp.create_database("other"))
        rows, err = fill(capped)
        assert err is not None and ENOSPC.search(err), err
        assert query(capped, "SELECT count(*) FROM filler") == [(rows,)]  # everything committed is there
        info = r.cp.branch("capped", "main")
        assert info.data_size is not None and 30 * MiB < info.data_size <= 40 * MiB
        assert r.cp.limit_hits()["storage"] >= 1
        assert 'strata_limit_hits_total{limit="storage"}' in r.cp.metrics_text()
        assert fill(other, batches=25) == (25_000, None)  # the neighbour is not capped
        # room again once rows are deleted and vacuumed (their space is reused, the files grow no more)
        query(capped, "DELETE FROM filler WHERE id > 4000")
        query(capped, "VACUUM filler")
        assert fill(capped, batches=2, start=4000) == (6000, None)
        # ... or once the cap is raised (reaching the running compute at once)
        _, err = fill(capped, start=6000)
        assert err is not None and ENOSPC.search(err)
        r.cp.update_database("capped", limits={"max_size": "64MB"})
        more, err = fill(capped, batches=10, start=10_000_000)
        assert (more, err) == (10_010_000, None)
        amcheck(capped)
        amcheck(other)


@requires_pg
def test_a_cap_survives_a_restart_of_the_compute_and_counts_what_is_there(tmp_path):
    with Running(str(tmp_path / "home")) as r:
        t = target(r, r.cp.create_database("c", limits={"max_size": "40MB"}))
        rows, err = fill(t)
        assert err is not None
        r.cp.suspend("c", "main")
        _, err = fill(t, batches=5, start=rows)  # woken: counted again from the tree, still full
        assert err is not None and ENOSPC.search(err)
        assert query(t, "SELECT count(*) FROM filler") == [(rows,)]


@requires_pg
def test_there_is_no_way_around_the_cap_and_freeing_space_works_at_it(tmp_path):
    """Temporary tables, the shared catalogs (global/) and in-place
    tablespaces are capped too; TRUNCATE and small catalog changes still
    work on a full branch (the headroom)."""
    with Running(str(tmp_path / "home")) as r:
        t = target(r, r.cp.create_database("c", limits={"max_size": "40MB"}))
        rows, err = fill(t)
        assert err is not None and ENOSPC.search(err)
        with psycopg.connect(t.uri(), autocommit=True, connect_timeout=30) as conn:
            conn.execute("CREATE TEMP TABLE scratch (pad text)")  # (a new file's first page: the headroom)
            with pytest.raises(psycopg.errors.DiskFull, match=r'could not extend file "base/\d+/t\d+_\d+'):
                conn.execute("INSERT INTO scratch SELECT repeat(md5(g::text), 64) FROM generate_series(1, 100000) g")
            conn.execute("SET allow_in_place_tablespaces = on")
            conn.execute("CREATE TABLESPACE spare LOCATION ''")
            conn.execute("CREATE TABLE elsewhere (pad text) TABLESPACE spare")
            with pytest.raises(psycopg.errors.DiskFull, match=r'could not extend file "pg_tblspc/'):
                conn.execute("INSERT INTO elsewhere SELECT repeat(md5(g::text), 64) FROM generate_series(1, 100000) g")
            conn.execute("TRUNCATE filler")  # new, empty files for it and its index
        assert fill(t, batches=5) == (5000, None)
        with pytest.raises(psycopg.errors.DiskFull, match=r'could not extend file "global/\d+'):
            query(t, psql.SQL("COMMENT ON ROLE postgres IS {}").format(psql.Literal(os.urandom(24 << 20).hex())))
        amcheck(t)


@requires_pg
def test_recovery_on_a_full_branch_is_never_refused(tmp_path):
    """Replay after a crash redoes what was allowed before, on a branch that
    is full: a dropped table's file comes back while its successor holds
    the space. Refusing it would leave the branch unable to start."""
    with Running(str(tmp_path / "home")) as r:
        t = target(r, r.cp.create_database("c", limits={"max_size": "40MB"}))
        query(t, "CREATE TABLE filler (id bigint PRIMARY KEY, pad text)")
        query(t, "CHECKPOINT")
        rows, err = fill(t)
        assert err is not None and ENOSPC.search(err)
        query(t, "DROP TABLE filler")
        again, err = fill(t)
        assert err is not None and ENOSPC.search(err)
        with psycopg.connect(t.uri(), autocommit=True, connect_timeout=30) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            os.kill(backend, 9)  # postgres resets every backend and replays from the last checkpoint
        answers_again(t, 60)
        assert query(t, "SELECT count(*) FROM filler") == [(again,)]
        _, err = fill(t, batches=3, start=10**9)
        assert err is not None and ENOSPC.search(err)  # (and the cap holds again once it is up)
        amcheck(t)


@requires_pg
def test_noisy_neighbour_one_database_at_its_cap_while_another_runs_pgbench(tmp_path):
    """The figures of README's reliability section come from this test (-s prints them)."""
    with Running(str(tmp_path / "home")) as r:
        noisy = target(r, r.cp.create_database("noisy", limits={"max_size": "48MB"}))
        quiet = target(r, r.cp.create_database("quiet"))
        run_pg("pgbench", quiet, "-i", "-s", "2", "-q")
        seen: dict[str, object] = {"refused": 0}
        done = threading.Event()

        def hammer() -> None:
            rows, err = fill(noisy)
            seen.update(rows=rows, first_error=err, full_at=time.monotonic())
            while not done.is_set():  # keep pressing on the cap while pgbench runs
                _, again = fill(noisy, batches=1, start=10**9 + int(seen["refused"]) * 1000)  # type: ignore[call-overload]
                if again is None or not ENOSPC.search(again):
                    seen["unexpected"] = again
                    return
                seen["refused"] = int(seen["refused"]) + 1  # type: ignore[call-overload]

        t0 = time.monotonic()
        th = threading.Thread(target=hammer, name="noisy")
        th.start()
        try:
            bench = run_pg("pgbench", quiet, "-c", "2", "-j", "2", "-T", "15", "-n")
        finally:
            done.set()
            th.join(120)
        processed = int(re.search(r"number of transactions actually processed: (\d+)", bench.stdout).group(1))
        failed = re.search(r"number of failed transactions: (\d+)", bench.stdout)
        tps = float(re.search(r"tps = ([\d.]+)", bench.stdout).group(1))
        assert processed > 0 and (failed is None or int(failed.group(1)) == 0), bench.stdout
        assert seen.get("unexpected") is None, seen
        assert ENOSPC.search(str(seen["first_error"])), seen
        assert int(seen["refused"]) >= 1  # type: ignore[call-overload]
        assert query(quiet, "SELECT count(*) FROM pgbench_history") == [(processed,)]  # every one committed
        assert_invariants(quiet)
        amcheck(noisy)
        amcheck(quiet)
        print(f"\nnoisy-neighbour: quiet pgbench {processed} transactions, {tps:.0f} TPS, 0 failed; noisy "
              f"{seen['rows']} rows committed, full after {float(seen['full_at']) - t0:.1f} s, "  # type: ignore[arg-type]
              f"{int(seen['refused']) + 1} inserts refused with ENOSPC; amcheck clean on both")  # type: ignore[call-overload]


# --- connections, memory ------------------------------------------------------------------------


@requires_pg
def test_a_database_may_take_fewer_connections_per_branch(tmp_path):
    with Running(str(tmp_path / "home")) as r:
        few = target(r, r.cp.create_database("few", limits={"branch_connections": 2}))
        many = target(r, r.cp.create_database("many"))
        held = [psycopg.connect(few.uri(), connect_timeout=30) for _ in range(2)]
        try:
            with pytest.raises(psycopg.OperationalError) as e:
                psycopg.connect(few.uri(), connect_timeout=30)
            assert "too many connections to branch few.main (it takes 2 at once)" in str(e.value)
            assert query(many, "SELECT 1") == [(1,)]
        finally:
            for c in held:
                c.close()
        answers_again(few, 10)  # (the proxy counts a connection gone when it has closed it)


def answers_again(t: ProxyTarget, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            assert query(t, "SELECT 1") == [(1,)]
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@requires_pg
@requires_memory_cgroup
def test_a_compute_past_its_memory_limit_loses_a_backend_and_comes_back(tmp_path):
    with Running(str(tmp_path / "home")) as r:
        d = r.cp.create_database("hungry", limits={"memory": "160MB", "shared_buffers": "16MB", "work_mem": "1MB"})
        t = target(r, d)
        assert query(t, "SHOW shared_buffers") == [("16MB",)]
        assert query(t, "SHOW work_mem") == [("1MB",)]
        c = r.cp.ps.compute_of(r.cp.resolve("hungry").timeline)
        cg = r.cp.ps._cgroups[c.id]
        limit_file = "memory.max" if cg.version == "v2" else "memory.limit_in_bytes"
        with open(os.path.join(cg.path, limit_file)) as f:
            assert int(f.read()) == 160 * MiB
        workers = processes_in(c.pgdata)
        assert c.pid in workers and set(workers) <= set(cg.pids())  # every process of the compute
        with psycopg.connect(t.uri(), autocommit=True, connect_timeout=30) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert backend in cg.pids()  # born in its group
            conn.execute("SET work_mem = '2GB'")  # a tenant may raise it: the group is the ceiling
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT count(*) FROM (SELECT g, md5(g::text) AS h FROM generate_series(1, 6000000) g "
                             "ORDER BY h) s")
        assert r.cp.limit_hits()["memory"] >= 1
        answers_again(t, 60)  # postgres restarts its backends after one is killed, as after any crash
        assert r.cp.ps.compute_of(c.timeline_id) is c and c.running  # the same postmaster: only a backend died
        amcheck(t)


# --- API rate limits ---------------------------------------------------------------------------------


@requires_pg
def test_creations_past_a_tokens_rate_get_429_with_retry_after(tmp_path):
    with Running(str(tmp_path / "home"), limits={"creations_per_minute": 4}) as r:
        api = TestClient(make_app(r.cp, "operator-token"))
        op = {"Authorization": "Bearer operator-token"}
        made = api.post("/v1/databases", json={"name": "slow", "creations_per_minute": 2}, headers=op)
        assert made.status_code == 201, made.text
        scoped = {"Authorization": f"Bearer {made.json()['token']}"}
        # a database named like the operator has a bucket of its own (and its own rate)
        named = api.post("/v1/databases", json={"name": "operator", "creations_per_minute": 1}, headers=op)
        theirs = {"Authorization": f"Bearer {named.json()['token']}"}
        assert api.post("/v1/databases/operator/branches", json={"name": "x"}, headers=theirs).status_code == 201
        assert api.post("/v1/databases/operator/branches", json={"name": "y"}, headers=theirs).status_code == 429
        for name in ("b1", "b2"):
            assert api.post("/v1/databases/slow/branches", json={"name": name}, headers=scoped).status_code == 201
        refused = api.post("/v1/databases/slow/branches", json={"name": "b3"}, headers=scoped)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "RateLimitedError"
        assert 1 <= int(refused.headers["Retry-After"]) <= 30
        assert "b3" not in r.cp.database("slow").branches  # nothing half-made
        # another token's bucket is its own: the operator may still create
        assert api.post("/v1/databases/slow/branches", json={"name": "b4"}, headers=op).status_code == 201
        r.clock.now += 30  # half a minute: one more of the two a minute
        assert api.post("/v1/databases/slow/branches", json={"name": "b3"}, headers=scoped).status_code == 201
        r.clock.now += 30  # ... and a restore makes a branch (its backup): it counts
        assert api.post("/v1/databases/slow/branches/main/restore", json={"lsn": r.cp.lsn("slow", "main")},
                        headers=scoped).status_code == 200
        assert api.post("/v1/databases/slow/branches/main/restore", json={"lsn": r.cp.lsn("slow", "main")},
                        headers=scoped).status_code == 429
        with pytest.raises(RateLimitedError):
            r.cp.create_branch("slow", "b5", caller="slow")
        assert r.cp.limit_hits()["rate"] == 4
        assert 'strata_limit_hits_total{limit="rate"} 4.0' in r.cp.metrics_text()
        # a database's own token cannot lift its limits
        lift = api.patch("/v1/databases/slow", json={"creations_per_minute": 1000}, headers=scoped)
        assert lift.status_code == 403
        assert api.patch("/v1/databases/slow", json={"creations_per_minute": 1000}, headers=op).status_code == 200
        r.cp.create_branch("slow", "b6", caller="slow")
        r.cp.create_branch("slow", "b7")  # in-process callers are not rate-limited
