"""The control plane, embedded: databases, branches, the proxy's wake on
connect, scale to zero, expiry, the compute cap, and bad input (real
PostgreSQL through the real proxy)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from engine import NotFoundError
from pageserver.control.plane import MAX_CREDENTIALS, ControlPlane
from pageserver.errors import (
    BadRequestError,
    ObjectExistsError,
    ProtectedError,
    UnknownObjectError,
)
from pageserver.pgdata.datadir import DataDir
from pageserver.pgdata.layout import page_key
from pageserver.proxy.server import ProxyLimits

from .pg import Running, requires_pg, sql

pytestmark = requires_pg


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with Running(str(tmp_path_factory.mktemp("control"))) as r:
        yield r
    assert not os.path.ismount(r.cp.ps.mountpoint)


def no_connections(cp: ControlPlane, address: str) -> None:
    """Wait until the proxy has seen the client go (it learns asynchronously)."""
    db, name = address.split("/")
    deadline = time.monotonic() + 10
    while cp.branch(db, name, sizes=False).connections:
        assert time.monotonic() < deadline, "the proxy still counts a connection"
        time.sleep(0.01)


def postgres_running(cp: ControlPlane, address: str) -> bool:
    br = cp.resolve(address)
    c = cp.ps.compute_of(br.timeline)
    return c is not None


def test_a_database_is_one_call_and_wakes_on_first_connection(env):
    cp = env.cp
    t0 = time.perf_counter()
    db = cp.create_database("shop")
    created = time.perf_counter() - t0
    assert db.name == "shop" and db.branch == "main" and "endpoint%3Dshop.main" in db.uri
    assert created < 1.0  # a branch of the template, never initdb
    assert cp.branch("shop", "main").state == "suspended"
    sql(db.uri, "create table items(id int primary key, name text)")
    sql(db.uri, "insert into items values (1, 'a'), (2, 'b')")
    assert cp.branch("shop", "main").state == "running"
    assert sql(db.uri, "select count(*) from items") == [(2,)]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        sql(db.uri.replace(db.uri.split(":")[2].split("@")[0], "wrong"), "select 1")


def test_a_password_with_a_ttl_expires_and_a_wrong_one_never_wakes(env):
    cp = env.cp
    db = cp.create_database("creds")
    short = cp.uri("creds/main", ttl=1.5)
    assert sql(short, "select 1") == [(1,)] and sql(db.uri, "select 1") == [(1,)]
    cp.suspend("creds", "main")
    time.sleep(1.6)  # (the proxy reads the wall clock)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        sql(short, "select 1")
    assert cp.branch("creds", "main").state == "suspended"  # a failed login wakes nothing
    assert sql(db.uri, "select 1") == [(1,)]
    with pytest.raises(BadRequestError, match="ttl"):
        cp.uri("creds/main", ttl="-5m")
    first = [cp.uri("creds/main") for _ in range(MAX_CREDENTIALS)]  # the oldest retire
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        sql(db.uri, "select 1")
    assert sql(first[0], "select 1") == sql(first[-1], "select 1") == [(1,)]
    assert len(cp.resolve("creds/main").credentials) == MAX_CREDENTIALS
    cp.delete_database("creds")


def test_a_read_only_password_reads_and_postgresql_itself_refuses_its_writes(env):
    cp = env.cp
    db = cp.create_database("ro")
    sql(db.uri, "create table t(id int primary key)")
    sql(db.uri, "insert into t values (1)")
    # a tenant that gave the role a write right, or a superuser, has it taken back at the next read-only password
    sql(db.uri, "alter role strata_readonly superuser")
    sql(db.uri, "grant pg_write_all_data to strata_readonly")
    ro = cp.uri("ro/main", readonly=True)
    assert ro.startswith("postgresql://strata_readonly:")
    assert sql(ro, "select id from t") == [(1,)]
    for smuggled in ("insert into t values (2)",
                     "set default_transaction_read_only = off; insert into t values (2)",
                     "begin read write; insert into t values (2); commit",
                     "create table mine(x int)",
                     "set default_transaction_read_only = off; select lo_from_bytea(0, 'x')",
                     "alter role strata_readonly superuser"):
        with psycopg.connect(ro, autocommit=True) as conn, pytest.raises(psycopg.Error):
            for statement in smuggled.split("; "):
                conn.execute(statement)
    assert sql(db.uri, "select id from t") == [(1,)]
    assert sql(db.uri, "select rolsuper from pg_roles where rolname = 'strata_readonly'") == [(False,)]
    # the password opens the branch as that role only
    as_owner = ro.replace("strata_readonly:", "postgres:", 1)
    with pytest.raises(psycopg.OperationalError, match='only as role "strata_readonly"'):
        sql(as_owner, "select 1")
    with pytest.raises(BadRequestError, match="readonly"):
        cp.uri("ro/main", readonly="yes")
    cp.delete_database("ro")


def test_branches_diverge_and_fall_through_to_their_parent(env):
    cp = env.cp
    main = cp.create_database("fork").uri
    sql(main, "create table items(id int primary key, name text)")
    sql(main, "insert into items values (1, 'a'), (2, 'b')")
    dev = cp.create_branch("fork", "dev")
    assert dev.parent == "main" and dev.uri != cp.database("fork").uri
    assert sql(dev.uri, "select count(*) from items") == [(2,)]
    sql(dev.uri, "insert into items values (3, 'dev only')")
    sql(main, "insert into items values (4, 'main only')")
    assert sql(dev.uri, "select id from items order by id") == [(1,), (2,), (3,)]
    assert sql(main, "select id from items order by id") == [(1,), (2,), (4,)]
    # the dbname fallback (for clients without `options`)
    plain = dev.uri.split("?")[0].rsplit("/", 1)[0] + "/fork.dev"
    assert sql(plain, "select count(*) from items") == [(3,)]
    cp.suspend("fork", "dev")
    cp.delete_branch("fork", "dev")
    with pytest.raises(UnknownObjectError):
        cp.branch("fork", "dev")


def test_branch_at_an_lsn_and_at_a_time(env):
    cp = env.cp
    uri = cp.create_database("ledger").uri
    sql(uri, "create table t(x int)")
    sql(uri, "insert into t values (1)")
    lsn = cp.lsn("ledger", "main")
    time.sleep(0.05)
    when = time.time()
    time.sleep(0.05)
    sql(uri, "insert into t values (2)")
    at_lsn = cp.create_branch("ledger", "at-lsn", lsn=lsn)
    assert at_lsn.lsn == lsn
    assert sql(at_lsn.uri, "select x from t order by x") == [(1,)]
    at_time = cp.create_branch("ledger", "at-time", time=when)
    assert sql(at_time.uri, "select x from t order by x") == [(1,)]
    assert sql(uri, "select x from t order by x") == [(1,), (2,)]


def test_reset_and_restore(env):
    cp = env.cp
    uri = cp.create_database("rr").uri
    sql(uri, "create table t(x int)")
    sql(uri, "insert into t values (1)")
    feat = cp.create_branch("rr", "feature")
    sql(feat.uri, "insert into t values (10)")
    sql(uri, "insert into t values (2)")
    cp.reset_branch("rr", "feature")  # now the parent's head: its own row is gone
    assert sql(feat.uri, "select x from t order by x") == [(1,), (2,)]
    good = cp.lsn("rr", "feature")
    sql(feat.uri, "insert into t values (99)")
    restored, backup = cp.restore_branch("rr", "feature", lsn=good)
    assert backup.name.startswith("feature-backup-")
    assert sql(feat.uri, "select x from t order by x") == [(1,), (2,)]
    assert backup.password is None and "postgres@" in backup.uri  # (no password but at its making)
    assert sql(cp.uri(f"rr/{backup.name}"), "select x from t order by x") == [(1,), (2,), (99,)]
    with pytest.raises(BadRequestError, match="made from it"):
        cp.delete_branch("rr", backup.name)  # the restored branch hangs from it
    cp.detach_branch("rr", "feature")
    cp.delete_branch("rr", backup.name)
    assert sql(feat.uri, "select x from t order by x") == [(1,), (2,)]


def test_protected_branches_and_bad_input_change_nothing(env):
    cp = env.cp
    cp.create_database("guarded")
    cp.create_branch("guarded", "prod", protected=True)
    before = (sorted(d.name for d in cp.databases()), [b.name for b in cp.branches("guarded")])
    with pytest.raises(ProtectedError):
        cp.delete_branch("guarded", "prod")
    with pytest.raises(ProtectedError):
        cp.reset_branch("guarded", "prod")
    with pytest.raises(ProtectedError):
        cp.delete_database("guarded")
    with pytest.raises(ObjectExistsError):
        cp.create_database("guarded")
    with pytest.raises(ObjectExistsError):
        cp.create_branch("guarded", "prod")
    for bad in ("", "UPPER", "has space", "a" * 64, "../x", "-lead"):
        with pytest.raises(BadRequestError, match="invalid"):
            cp.create_database(bad)
    with pytest.raises(BadRequestError, match="not both"):
        cp.create_branch("guarded", "x", lsn=1, time=time.time())
    with pytest.raises(BadRequestError, match="cannot branch"):
        cp.create_branch("guarded", "x", lsn=10**12)
    with pytest.raises(BadRequestError, match="invalid ttl"):
        cp.create_branch("guarded", "x", ttl="soon")
    with pytest.raises(UnknownObjectError):
        cp.create_branch("nope", "x")
    with pytest.raises(UnknownObjectError):
        cp.create_branch("guarded", "x", parent="nope")
    cp.update_branch("guarded", "prod", protected=False)
    with pytest.raises(BadRequestError, match="root branch"):
        cp.delete_branch("guarded", "main")
    after = (sorted(d.name for d in cp.databases()), [b.name for b in cp.branches("guarded")])
    assert after == before
    cp.delete_database("guarded")  # unprotected now


def test_unknown_endpoints_get_an_error_not_a_hang(env):
    uri = env.cp.create_database("known").uri
    with pytest.raises(psycopg.OperationalError, match='no branch with endpoint "known.nope"'):
        sql(uri.replace("known.main", "known.nope"), "select 1")
    with pytest.raises(psycopg.OperationalError, match="say which branch"):
        sql(uri.split("?")[0], "select 1")


def test_many_connections_to_a_suspended_branch_start_it_once(env):
    cp = env.cp
    uri = cp.create_database("crowd").uri
    starts = []
    real = cp.ps.start_compute

    def counting(*a, **kw):
        starts.append(1)
        return real(*a, **kw)

    cp.ps.start_compute = counting
    try:
        with ThreadPoolExecutor(20) as ex:
            assert list(ex.map(lambda _: sql(uri, "select 42"), range(20))) == [[(42,)]] * 20
    finally:
        cp.ps.start_compute = real
    assert len(starts) == 1


def test_cancel_requests_reach_the_right_compute(env):
    uri = env.cp.create_database("cancel").uri
    with psycopg.connect(uri) as conn:
        threading.Timer(0.5, conn.cancel_safe).start()
        t0 = time.perf_counter()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        assert time.perf_counter() - t0 < 10


def test_idle_branches_scale_to_zero_and_expired_ones_go(env):
    cp, clock = env.cp, env.clock
    uri = cp.create_database("idle", idle_timeout=60).uri
    ttl = cp.create_branch("idle", "short", ttl="10m")
    stale = cp.create_branch("idle", "stale", expire_after_idle="1h")
    with psycopg.connect(uri) as conn:
        conn.execute("select 1")
        clock.now += 120
        cp.maintain()
        assert postgres_running(cp, "idle/main")  # a connection is open: stays up
        pid = cp.ps.compute_of(cp.resolve("idle").timeline).pid
    no_connections(cp, "idle/main")
    clock.now += 30
    cp.maintain()
    assert postgres_running(cp, "idle/main")  # idle, but not for 60 s yet
    clock.now += 31
    done = cp.maintain()
    assert "idle.main" in done["suspended"] and not postgres_running(cp, "idle/main")
    assert not os.path.exists(f"/proc/{pid}")  # zero processes
    clock.now += 600
    assert "idle/short" in cp.maintain()["expired"]
    sql(uri, "select 1")  # a use of main, not of `stale`
    no_connections(cp, "idle/main")
    clock.now += 3601
    done = cp.maintain()
    assert "idle/stale" in done["expired"], done
    assert [b.name for b in cp.branches("idle")] == ["main"]
    assert stale.timeline not in cp.ps.store and ttl.timeline not in cp.ps.store
    gone = cp.create_database("brief", ttl=5)
    clock.now += 6
    assert "brief" in cp.maintain()["expired"]
    with pytest.raises(UnknownObjectError):
        cp.database(gone.name)


def test_at_the_compute_cap_the_least_recently_used_idle_one_yields(tmp_path):
    with Running(str(tmp_path), max_computes=3) as r:
        cp = r.cp
        uris = [cp.create_database(f"cap{i}").uri for i in range(4)]
        for i in range(3):
            sql(uris[i], "select 1")
            no_connections(cp, f"cap{i}/main")
            r.clock.now += 1
        with psycopg.connect(uris[0]), psycopg.connect(uris[2]):  # busy: cap1 is the idle one
            assert sql(uris[3], "select 4") == [(4,)]
            assert [postgres_running(cp, f"cap{i}") for i in range(4)] == [True, False, True, True]
        assert sql(uris[1], "select 2") == [(2,)]  # served too: someone idle yields again


def test_a_warm_pool_serves_a_new_database_at_once(tmp_path):
    with Running(str(tmp_path), warm_pool=1) as r:
        cp = r.cp
        deadline = time.monotonic() + 60
        while len(cp._warm) < 1:
            assert time.monotonic() < deadline, "the pool did not fill"
            time.sleep(0.05)
        spare = cp._warm[0]
        db = cp.create_database("pooled")
        assert cp.branch("pooled", "main").state == "running"  # no start needed
        assert cp.ps.compute_of(cp.resolve("pooled").timeline) is spare
        assert sql(db.uri, "select current_user") == [("postgres",)]  # with the database's password
        deadline = time.monotonic() + 60
        while len(cp._warm) < 1:  # refilled
            assert time.monotonic() < deadline, "the pool did not refill"
            time.sleep(0.05)
        assert cp._warm[0] is not spare
        other = cp.create_database("pooled2")
        with pytest.raises(psycopg.OperationalError, match="password"):
            sql(other.uri.replace(other.uri.split(":")[2].split("@")[0], db.uri.split(":")[2].split("@")[0]),
                "select 1")  # each database's password is its own
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert r.cp.ps.mountpoint not in out  # pool computes stopped too


def test_the_catalog_survives_a_restart_and_orphans_are_swept(tmp_path):
    home = str(tmp_path)
    with Running(home) as r:
        db = r.cp.create_database("keep")
        r.cp.create_branch("keep", "b1", protected=True)
        sql(db.uri, "create table t as select 7 as x")
        orphan = r.cp.ps.store.branch(r.cp.ps.template()).id  # as if a crash came before its record
    with Running(home) as r:
        info = r.cp.branch("keep", "b1")
        assert info.protected and info.state == "suspended"
        shown = r.cp.database("keep").uri
        assert shown.split("@")[0] == "postgresql://postgres"  # a password is shown once
        again = shown.replace("postgres@", f"postgres:{db.password}@", 1)
        assert sql(again, "select x from t") == [(7,)]  # and still works (the proxy's port is new)
        assert sql(r.cp.uri("keep/main"), "select x from t") == [(7,)]
        with pytest.raises(NotFoundError):
            r.cp.ps.store.timeline(orphan)
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert r.cp.ps.mountpoint not in out


def test_a_damaged_layer_under_a_running_branch(tmp_path, caplog):
    """Reads of the damaged pages fail with an I/O error, the page server's
    log names the layer file, other databases keep serving, and the check
    reports the file."""
    with Running(str(tmp_path)) as r:
        cp = r.cp
        victim, bystander = cp.create_database("victim"), cp.create_database("bystander")
        for db in (victim, bystander):
            sql(db.uri, "create table t as select g, repeat(md5(g::text), 20) as pad "
                        "from generate_series(1, 20000) g")
        (relpath,), = sql(victim.uri, "select pg_relation_filepath('t')")
        for name in ("victim", "bystander"):
            cp.suspend(name, "main")  # a compute's writes are durable when it stops
        cp.ps.store.flush()
        # scribble over the stored values of t's pages (and nothing else, so
        # that PostgreSQL still starts: damage elsewhere can stop it first)
        tl = cp.ps.store.timeline(cp.resolve("victim").timeline)
        ino = DataDir(tl, lsn=tl.head_lsn).resolve(relpath)  # read-only: changes nothing
        damaged = 0
        for block in range(64):
            found = tl._find(page_key(ino, block), tl.head_lsn)
            if found is None or found[0] is None:
                continue  # a hole, or still in memory
            layer, (_, offset, stored_len, *_rest) = found
            with open(layer.path, "r+b") as f:
                f.seek(offset)
                f.write(os.urandom(stored_len))
            path, damaged = layer.path, damaged + 1
        assert damaged, "no page of t is in a layer file"
        with caplog.at_level("ERROR", logger="strata.fuse"):
            with pytest.raises(psycopg.Error, match="could not read block|Input/output error"):
                sql(victim.uri, "select count(*), sum(length(pad)) from t")  # a fresh compute: cold caches
        assert any(path in rec.getMessage() for rec in caplog.records), [r.getMessage() for r in caplog.records]
        assert sql(bystander.uri, "select count(*) from t") == [(20000,)]  # others keep serving
        report = cp.ps.store.check()
        assert not report.ok and any(path in p for p in report.problems), report.problems


def test_simultaneous_wakes_never_overshoot_the_cap(tmp_path):
    with Running(str(tmp_path), max_computes=2) as r:
        cp = r.cp
        uris = [cp.create_database(f"rush{i}").uri for i in range(5)]
        seen, stop = [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen[0] = max(seen[0], sum(1 for c in cp.ps.computes()))
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()

        def connect(uri: str) -> str:
            try:
                sql(uri, "select 1")
                return "served"
            except psycopg.OperationalError as e:
                assert "compute slots" in str(e), e
                return "refused"

        try:
            with ThreadPoolExecutor(5) as ex:
                outcomes = list(ex.map(connect, uris))
        finally:
            stop.set()
            watcher.join()
        assert seen[0] <= 2, f"{seen[0]} computes ran at once with a cap of 2"
        assert "served" in outcomes, outcomes  # and every other client heard why it was refused


def test_a_connection_flood_on_one_branch_leaves_the_others_reachable(tmp_path):
    with Running(str(tmp_path), proxy_limits=ProxyLimits(branch_connections=8)) as r:
        flooded = r.cp.create_database("flooded").uri
        other = r.cp.create_database("other").uri
        held, refused = [], []

        def attempt(_: int) -> None:
            try:
                held.append(psycopg.connect(flooded, autocommit=True, connect_timeout=60))
            except psycopg.OperationalError as e:
                refused.append(str(e))

        try:
            with ThreadPoolExecutor(30) as ex:
                list(ex.map(attempt, range(30)))
            assert len(held) == 8 and len(refused) == 22, (len(held), refused[:3])
            assert all("too many connections to branch flooded.main (it takes 8 at once)" in e for e in refused)
            assert sql(other, "select 7") == [(7,)]  # the other database is still served
            assert [c.execute("select 1").fetchone() for c in held] == [(1,)] * 8
        finally:
            for c in held:
                c.close()
        no_connections(r.cp, "flooded/main")
        assert sql(flooded, "select 8") == [(8,)]  # and the flooded one again, once they went
