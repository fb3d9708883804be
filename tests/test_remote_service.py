"""Machine loss, end to end: `strata up --remote s3://...` on a real
SeaweedFS, pgbench and a writer through the proxy; the machine is lost
(every process of the service and its computes killed with SIGKILL, the
FUSE mount gone, the home deleted); `strata restore` into a new home and
`strata up`. Every commit acknowledged more than the RPO before the loss
is there (in a durable database, every acknowledged one); pgbench's
invariants and pg_amcheck hold; the restored database branches and takes
writes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from pageserver.compute.node import reap_stale
from pageserver.compute.paths import run_dir_for
from pageserver.fuse.filesystem import unmount
from pageserver.service import daemon as service

from .pg import ProxyTarget, amcheck, assert_invariants, env_for, pg_bindir, query, requires_pg, strata

pytestmark = requires_pg
RPO_S = 1.0  # acknowledged this long before the loss: must survive it
LOAD_S = 60 if os.environ.get("TORTURE") else 5  # seconds of pgbench and writers before the loss (make torture)


def lose_the_machine(home: str) -> None:
    """SIGKILL the service and every compute, drop the mount, delete the home."""
    state = service.read_state(home)
    assert state is not None
    pids = [state["pid"]] + [p["pid"] for p in state["processes"].values()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run = os.path.realpath(run_dir_for(home))
    reap_stale(os.path.join(run, "computes"))  # (their postmasters, found by their data directories)
    unmount(os.path.join(run, "mnt"))
    shutil.rmtree(home)
    shutil.rmtree(run, ignore_errors=True)


def target_of(home: str, db: dict) -> ProxyTarget:
    port = int(service.read_state(home)["proxy"].rsplit(":", 1)[1])
    return ProxyTarget(port, db["uri"].split(":")[2].split("@")[0], f"{db['name']}.main")


def test_machine_loss_then_restore_keeps_every_commit_older_than_the_rpo(tmp_path, seaweedfs, monkeypatch):
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    url = seaweedfs.url()
    home, new_home = str(tmp_path / "home"), str(tmp_path / "new-home")
    acked: list[tuple[int, float]] = []  # (id, when its commit returned)
    try:
        strata(home, "up", "--remote", url)
        db = strata(home, "db", "create", "shop")
        ledger = strata(home, "db", "create", "ledger", "--durable")
        assert (ledger["durable"], strata(home, "db", "durable", "shop")["durable"]) == (True, False)
        t, tl = target_of(home, db), target_of(home, ledger)
        subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-i", "-s", "1", "-q"], env=env_for(t),
                       check=True, capture_output=True)
        for target in (t, tl):
            query(target, "create table acked (id int primary key, at timestamptz default now())")
        stop = threading.Event()
        durably: list[tuple[int, float]] = []  # (the durable database's)

        def writer(target: ProxyTarget, acked: list[tuple[int, float]]) -> None:
            with psycopg.connect(target.uri(), autocommit=True) as conn:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        conn.execute("insert into acked (id) values (%s)", (i,))
                    except psycopg.Error:
                        return  # (the machine went)
                    acked.append((i, time.monotonic()))

        writers = [threading.Thread(target=writer, args=a, daemon=True) for a in ((t, acked), (tl, durably))]
        for w in writers:
            w.start()
        bench = subprocess.Popen([os.path.join(pg_bindir(), "pgbench"), "-c", "4", "-j", "2", "-T",
                                  str(LOAD_S + 25), "-n"],
                                 env=env_for(t), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(LOAD_S)
        rem = strata(home, "status")["remote"]
        assert (rem["url"], rem["generation"], rem["fenced"]) == (url, 1, None) and rem["chunks"] > 10
        lost_at = time.monotonic()
        lose_the_machine(home)
        stop.set()
        bench.wait(60)
        for w in writers:
            w.join(30)
        assert len(acked) > 50 and len(durably) > 50

        t0 = time.monotonic()
        report = strata(new_home, "restore", "--remote", url, "--force")
        t1 = time.monotonic()
        strata(new_home, "up", "--cache-size", "64MB")
        t2 = target_of(new_home, db)
        t3 = time.monotonic()
        (n,) = query(t2, "select count(*) from acked")[0]
        restore_to_query = time.monotonic() - t0
        steps = f"restore {t1 - t0:.2f} s, up {t3 - t1:.2f} s, first query {time.monotonic() - t3:.2f} s"
        present = {r[0] for r in query(t2, "select id from acked")}
        lost = [(i, lost_at - at) for i, at in acked if i not in present]
        old_lost = [x for x in lost if x[1] > RPO_S]
        assert not old_lost, f"lost commits acknowledged {old_lost[:5]} s before the loss"
        assert_invariants(t2)
        amcheck(t2)
        tl2 = target_of(new_home, ledger)
        kept = {r[0] for r in query(tl2, "select id from acked")}
        assert not [i for i, _ in durably if i not in kept], "the durable database lost an acknowledged commit"
        amcheck(tl2)
        assert strata(new_home, "status")["remote"]["generation"] == 3  # (restore took 2, up 3)
        # the restored database serves writes, and branches
        query(t2, "insert into acked (id) values (-1)")
        br = strata(new_home, "branch", "create", "shop/after")
        tb = ProxyTarget(t2.port, br["uri"].split(":")[2].split("@")[0], "shop.after")
        assert query(tb, "select count(*) from acked where id = -1") == [(1,)]
        print(f"machine loss: {len(durably)} durable writer commits acknowledged, none lost; "
              f"{len(acked)} writer commits acknowledged, {len(lost)} lost (all within "
              f"{max((x[1] for x in lost), default=0):.3f} s of the loss); restore + up + first query "
              f"{restore_to_query:.2f} s: {steps} ({report['layer_bytes']} layer bytes, {report['log_bytes']} log bytes, "
              f"{n} rows)")
    finally:
        for h in (home, new_home):
            if os.path.isdir(h):
                with pytest.MonkeyPatch.context():
                    try:
                        service.stop(h)
                    except Exception:  # noqa: BLE001 - clean up the rest
                        pass


def test_a_durable_database_keeps_every_commit_and_an_async_one_its_shipped_ones(tmp_path):
    """Per database: the commits of a durable database return once the
    object store has them; another database's wait for the shipper. The
    shipper is slowed to an hour, and the object store copied (what a lost
    machine leaves) right after both wrote: the durable one's rows are all
    in the copy, the other's written after them are not."""
    from engine.objectstore import LocalObjectStore
    from engine.remote import restore
    from pageserver.errors import BadRequestError

    from .pg import Running, sql

    url = f"file://{tmp_path}/remote"
    with Running(str(tmp_path / "home"), remote=url) as r:
        cp, rem = r.cp, r.cp.ps.store._remote
        ledger = cp.create_database("ledger", durable=True)
        shop = cp.create_database("shop")
        assert (ledger.durable, shop.durable) == (True, False)
        with pytest.raises(BadRequestError, match="durable must be true or false"):
            cp.update_database("shop", durable="yes")  # type: ignore[arg-type]
        for db in (ledger, shop):
            sql(db.uri, "create table t (id int primary key)")
        tl = {name: bytes.fromhex(cp.resolve(f"{name}/main").timeline) for name in ("ledger", "shop")}
        assert rem.is_durable(tl["ledger"]) and not rem.is_durable(tl["shop"])
        br = cp.create_branch("ledger", "dev")
        assert rem.is_durable(bytes.fromhex(cp.resolve("ledger/dev").timeline))
        cp.delete_branch("ledger", br.name)

        rem.ship_interval = 3600.0
        rem.ship()  # (both databases and their tables are in the object store)
        time.sleep(0.3)  # (the shipper's last short wait is over)
        for i in range(10):
            sql(ledger.uri, f"insert into t values ({i})")
        cp.create_branch("ledger", "kept")  # (its record is shipped before it returns)
        for i in range(10):
            sql(shop.uri, f"insert into t values ({i})")
        cp.create_branch("shop", "gone")
        shutil.copytree(tmp_path / "remote", tmp_path / "left")

        # turned on and off, for the running compute's next commits too
        cp.update_database("shop", durable=True)
        assert rem.is_durable(tl["shop"]) and cp.database("shop").durable
        cp.update_database("ledger", durable=False)
        assert not rem.is_durable(tl["ledger"])

    restore(LocalObjectStore(str(tmp_path / "left")), str(tmp_path / "new" / "store"), force=True)
    with Running(str(tmp_path / "new"), remote=f"file://{tmp_path}/left") as r:
        assert r.cp.database("ledger").durable
        assert sql(r.cp.uri("ledger/main"), "select count(*) from t") == [(10,)]
        assert sql(r.cp.uri("shop/main"), "select count(*) from t") == [(0,)]
        assert sorted(b.name for b in r.cp.branches("ledger")) == ["kept", "main"]
        assert [b.name for b in r.cp.branches("shop")] == ["main"]
    with Running(str(tmp_path / "local")) as r, pytest.raises(BadRequestError, match="durable needs a remote"):
        r.cp.create_database("x", durable=True)
