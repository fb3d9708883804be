"""Machine loss, end to end: `strata up --remote s3://...` on a real
SeaweedFS, pgbench and a writer through the proxy; the machine is lost
(every process of the service and its computes killed with SIGKILL, the
FUSE mount gone, the home deleted); `strata restore` into a new home and
`strata up`. Every commit acknowledged more than the RPO before the loss
is there; pgbench's invariants and pg_amcheck hold; the restored
database branches and takes writes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from pageserver.compute.node import reap_stale, run_dir_for
from pageserver.fuse.filesystem import unmount
from pageserver.service import daemon as service

from .pg import ProxyTarget, amcheck, assert_invariants, env_for, pg_bindir, query, requires_pg, strata

pytestmark = requires_pg
RPO_S = 1.0  # acknowledged this long before the loss: must survive it


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
        t = target_of(home, db)
        subprocess.run([os.path.join(pg_bindir(), "pgbench"), "-i", "-s", "1", "-q"], env=env_for(t),
                       check=True, capture_output=True)
        query(t, "create table acked (id int primary key, at timestamptz default now())")
        stop = threading.Event()

        def writer() -> None:
            with psycopg.connect(t.uri(), autocommit=True) as conn:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        conn.execute("insert into acked (id) values (%s)", (i,))
                    except psycopg.Error:
                        return  # (the machine went)
                    acked.append((i, time.monotonic()))

        w = threading.Thread(target=writer, daemon=True)
        w.start()
        bench = subprocess.Popen([os.path.join(pg_bindir(), "pgbench"), "-c", "4", "-j", "2", "-T", "30", "-n"],
                                 env=env_for(t), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(5)
        rem = strata(home, "status")["remote"]
        assert (rem["url"], rem["generation"], rem["fenced"]) == (url, 1, None) and rem["chunks"] > 10
        lost_at = time.monotonic()
        lose_the_machine(home)
        stop.set()
        bench.wait(60)
        w.join(30)
        assert len(acked) > 50

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
        assert strata(new_home, "status")["remote"]["generation"] == 3  # (restore took 2, up 3)
        # the restored database serves writes, and branches
        query(t2, "insert into acked (id) values (-1)")
        br = strata(new_home, "branch", "create", "shop/after")
        tb = ProxyTarget(t2.port, br["uri"].split(":")[2].split("@")[0], "shop.after")
        assert query(tb, "select count(*) from acked where id = -1") == [(1,)]
        print(f"machine loss: {len(acked)} writer commits acknowledged, {len(lost)} lost (all within "
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
