"""Stock PostgreSQL 15 on branches served by the page server (real FUSE).

pgbench's invariants and pg_amcheck --heapallindexed after runs, branches
taken while pgbench writes, branches at past LSNs, kill -9 of the postmaster
and of the page server, stop/start cycles, and bad input.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psycopg
import pytest

from engine import NotFoundError
from pageserver.compute import postgres as compute_module
from pageserver.compute.node import Node
from pageserver.compute.paths import run_dir_for
from pageserver.compute.postgres import pg_bindir, reap_stale
from pageserver.errors import (
    BranchBusyError,
    ComputeError,
    DestinationNotEmptyError,
    NotADataDirectoryError,
    PostgresVersionError,
)
from pageserver.fuse.filesystem import unmount
from pageserver.pgdata.layout import Inode, inode_key, page_key

from .pg import amcheck, assert_invariants, committed_in_log, env_for, query, requires_pg, run_pg

pytestmark = requires_pg


@pytest.fixture(scope="module")
def ps(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("pageserver"))
    server = Node(home).open()
    try:
        server.ensure_template(progress=False)
        yield server
    finally:
        server.close()
    assert not os.path.ismount(server.mountpoint)


@pytest.fixture
def branch(ps):
    tl = ps.store.branch(ps.template())
    yield tl
    c = ps.compute_of(tl)
    if c is not None:
        ps.stop_compute(c.id)


def _no_processes_of(compute_id: str) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return compute_id not in out


def test_pgbench_keeps_its_invariants_and_amcheck_is_clean(ps, branch, tmp_path):
    c = ps.start_compute(branch)
    run_pg("pgbench", c, "-i", "-s", "10", "-q")
    r = run_pg("pgbench", c, "-c", "4", "-j", "2", "-T", "10")
    assert "number of failed transactions: 0" in r.stdout
    assert_invariants(c)
    amcheck(c)
    (n,) = query(c, "select count(*) from pgbench_history")[0]
    assert n > 1000


def test_a_branch_taken_while_pgbench_runs_recovers_and_diverges(ps, branch):
    parent = ps.start_compute(branch)
    run_pg("pgbench", parent, "-i", "-s", "5", "-q")
    bench = subprocess.Popen([os.path.join(pg_bindir(), "pgbench"), "-c", "4", "-j", "2", "-T", "8"],
                             env=env_for(parent), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        child_tl = ps.store.branch(branch)  # at the head, mid-run
        child = ps.start_compute(child_tl)
        assert_invariants(child)  # crash recovery gave a consistent state
        amcheck(child)
    finally:
        bench.wait(60)
    query(parent, "create table side(x text)")
    query(parent, "insert into side values ('parent')")
    query(child, "create table side(x text)")
    query(child, "insert into side values ('child')")
    assert query(parent, "select x from side") == [("parent",)]
    assert query(child, "select x from side") == [("child",)]
    assert_invariants(parent)
    ps.stop_compute(child.id)
    ps.store.delete_timeline(child_tl)


def test_a_branch_at_a_past_lsn_holds_exactly_what_was_committed_then(ps, branch):
    c = ps.start_compute(branch)
    query(c, "create table t(id int primary key, v text)")
    for i in range(10):
        query(c, "insert into t values (%s, %s)", i, f"v{i}")
    lsn = branch.head_lsn  # every commit above is durable, so in the timeline
    query(c, "insert into t values (100, 'later')")
    query(c, "update t set v = 'changed' where id < 5")
    query(c, "delete from t where id = 9")
    past = ps.store.branch(branch, at_lsn=lsn)
    pc = ps.start_compute(past)
    assert query(pc, "select id, v from t order by id") == [(i, f"v{i}") for i in range(10)]
    ps.stop_compute(pc.id)
    # a read-only compute shows the same, and refuses writes
    ro = ps.start_compute(branch, lsn=lsn)
    assert query(ro, "select count(*) from t") == [(10,)]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        query(ro, "insert into t values (200, 'x')")
    ro_tl = ro.timeline_id
    ps.stop_compute(ro.id)
    assert ro_tl not in ps.store  # the throwaway branch went with it
    # the live branch still has everything
    assert query(c, "select count(*) from t") == [(10,)]
    assert query(c, "select v from t where id = 100") == [("later",)]


def test_read_only_mount_of_a_past_lsn(ps, branch):
    c = ps.start_compute(branch)
    query(c, "create table marker(x int)")
    query(c, "checkpoint")
    lsn = branch.head_lsn
    query(c, "drop table marker")
    query(c, "checkpoint")
    path = ps.mount_readonly(branch, lsn)
    try:
        assert os.path.isfile(os.path.join(path, "PG_VERSION"))
        with pytest.raises(OSError):
            open(os.path.join(path, "newfile"), "w")
        live = set(os.listdir(c.pgdata)) - {"postmaster.pid", "postmaster.opts"}  # compute-local
        assert set(os.listdir(path)) == live
    finally:
        ps.unmount_readonly(path)


def test_writes_through_the_mount_are_durable_when_answered(ps, branch):
    """Write-through: once the kernel has sent a write, it is in the
    timeline at an LSN the commit log has synced, so fsync needs nothing
    from the page server (which does not implement FSYNC)."""
    c = ps.start_compute(branch)
    log = ps.store._log
    dd = ps.mount.ops._t.attachments[c.id].datadir
    rel = "base/strata-durability-probe"
    data = os.urandom(2 * 8192)
    fd = os.open(os.path.join(c.pgdata, rel), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, data, 8192)
        os.fsync(fd)  # the kernel sends the dirty pages (WRITE) and answers itself
        ino = dd.resolve(rel)
        synced = log._synced_lsn
        assert branch.get(page_key(ino, 1), synced) == data[:8192]
        assert branch.get(page_key(ino, 2), synced) == data[8192:]
        os.ftruncate(fd, 8192)
        assert Inode.decode(branch.get(inode_key(ino), log._synced_lsn)).size == 8192
    finally:
        os.close(fd)


def test_kill_9_of_the_postmaster_loses_no_committed_transaction(ps, branch, tmp_path):
    c = ps.start_compute(branch)
    run_pg("pgbench", c, "-i", "-s", "5", "-q")
    bench = subprocess.Popen(
        [os.path.join(pg_bindir(), "pgbench"), "-c", "4", "-j", "2", "-T", "30", "-l", "--log-prefix=pgbench_log"],
        env=env_for(c), cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(4)
    os.kill(c.pid, signal.SIGKILL)  # type: ignore[arg-type]
    bench.wait(60)
    deadline = time.time() + 30
    while ps.compute_of(branch) is not None and time.time() < deadline:
        time.sleep(0.05)  # the page server notices and cleans up
    assert ps.compute_of(branch) is None and _no_processes_of(c.id)
    acked = committed_in_log(str(tmp_path))
    assert acked > 100
    c2 = ps.start_compute(branch)
    (history,) = query(c2, "select count(*) from pgbench_history")[0]
    assert history >= acked, f"{acked - history} committed transactions lost"
    assert_invariants(c2)
    amcheck(c2)


def test_kill_9_of_the_page_server_loses_no_committed_transaction(tmp_path):
    home = str(tmp_path / "home")
    os.makedirs(home)
    logs = tmp_path / "bench"
    logs.mkdir()
    with Node(home) as ps:
        tl = ps.store.branch(ps.ensure_template(progress=False))
        c = ps.start_compute(tl)
        run_pg("pgbench", c, "-i", "-s", "5", "-q")
    server = _serve(home, tl.id)
    try:
        uri = server["uri"]
        env = dict(os.environ, PGDATABASE=uri)  # (libpq takes a URI for the database name)
        bench = subprocess.Popen(
            [os.path.join(pg_bindir(), "pgbench"), "-c", "4", "-j", "2", "-T", "30", "-l",
             "--log-prefix=pgbench_log"], env=env, cwd=str(logs),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(4)
        server["process"].kill()  # SIGKILL: the mount dies under postgres
        server["process"].wait()
        bench.wait(60)
    finally:
        if server["process"].poll() is None:
            server["process"].kill()
    acked = committed_in_log(str(logs))
    assert acked > 100
    with Node(home) as ps:  # cleans up the orphans and the dead mount
        c = ps.start_compute(tl.id)
        (history,) = query(c, "select count(*) from pgbench_history")[0]
        assert history >= acked, f"{acked - history} committed transactions lost"
        assert_invariants(c)
        amcheck(c)
    assert uri


def _serve(home: str, tid: str) -> dict:
    p = subprocess.Popen(
        [sys.executable, "-m", "pageserver.compute", "serve", "--home", home, "--compute", tid,
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    info: dict = {"process": p}
    assert p.stdout is not None
    for line in p.stdout:
        msg = json.loads(line)
        if msg.get("ready"):
            break
        info.update(msg)
    return info


def test_stop_and_start_ten_times(ps, branch):
    c = ps.start_compute(branch)
    query(c, "create table t(i int)")
    for i in range(10):
        query(c, "insert into t values (%s)", i)
        ps.stop_compute(c.id)
        assert _no_processes_of(c.id) and not os.path.exists(c.rundir)
        assert c.id not in os.listdir(ps.mountpoint)
        c = ps.start_compute(branch)
        assert query(c, "select count(*), sum(i) from t") == [(i + 1, sum(range(i + 1)))]


def test_bad_input_is_refused_and_changes_nothing(ps, branch, tmp_path):
    before = ps.store.timeline_ids()
    with pytest.raises(NotFoundError):
        ps.start_compute("0" * 32)
    c = ps.start_compute(branch)
    with pytest.raises(BranchBusyError, match=c.id):
        ps.start_compute(branch)
    assert len(ps.computes()) == 1
    not_pg = tmp_path / "not-pg"
    not_pg.mkdir()
    (not_pg / "file").write_text("x")
    with pytest.raises(NotADataDirectoryError, match="PG_VERSION"):
        ps.import_datadir(str(not_pg))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("mine")
    with pytest.raises(DestinationNotEmptyError):
        ps.export_datadir(branch, str(full))
    assert os.listdir(full) == ["keep"]
    assert ps.store.timeline_ids() == before
    # a compute that cannot start (bad setting) leaves nothing behind
    other = ps.store.branch(ps.template())
    with pytest.raises(ComputeError, match="shared_buffers"):
        ps.start_compute(other, settings={"shared_buffers": "nonsense"})
    assert ps.compute_of(other) is None and len(ps.computes()) == 1
    ps.store.delete_timeline(other)


def test_export_and_import_round_trip(ps, branch, tmp_path):
    c = ps.start_compute(branch)
    query(c, "create table t as select g as i from generate_series(1, 5000) g")
    query(c, "checkpoint")
    dest = str(tmp_path / "exported")
    ps.export_datadir(branch, dest)
    ps.stop_compute(c.id)
    tl = ps.import_datadir(dest)
    c2 = ps.start_compute(tl)
    assert query(c2, "select count(*), sum(i) from t") == [(5000, sum(range(1, 5001)))]
    ps.stop_compute(c2.id)
    ps.store.delete_timeline(tl)


def test_a_stale_mount_and_orphaned_computes_are_cleaned_up(tmp_path):
    """What a killed page server leaves (a dead mount, postgres processes)
    is cleaned up by the next one, and the branch serves again."""
    home = str(tmp_path / "home2")
    os.makedirs(home)
    with Node(home) as ps:
        tl = ps.store.branch(ps.ensure_template(progress=False))
    server = _serve(home, tl.id)
    pid = server["pid"]
    server["process"].kill()
    server["process"].wait()
    run = run_dir_for(home)
    assert os.path.exists(f"/proc/{pid}")  # the postmaster outlived its server
    with Node(home) as ps:
        deadline = time.time() + 10
        while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}") or "postgres" not in open(f"/proc/{pid}/cmdline").read()
        c = ps.start_compute(tl.id)
        assert query(c, "select 1") == [(1,)]
    assert not os.path.ismount(os.path.join(run, "mnt"))
    reap_stale(os.path.join(run, "computes"))
    unmount(os.path.join(run, "mnt"))


def test_concurrent_computes_on_many_branches(ps):
    tls = [ps.store.branch(ps.template()) for _ in range(3)]
    computes = []
    errors: list[BaseException] = []

    def go(tl):
        try:
            c = ps.start_compute(tl)
            computes.append(c)
            query(c, "create table t as select generate_series(1, 1000) i")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(tl,)) for tl in tls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for c in computes:
        assert query(c, "select count(*) from t") == [(1000,)]
        ps.stop_compute(c.id)
    for tl in tls:
        ps.store.delete_timeline(tl)


def test_computes_run_the_postgresql_version_that_made_the_template(ps, branch, tmp_path, monkeypatch, request):
    """Regression: installing a newer PostgreSQL (which pg_config then
    names) broke every branch of an existing store."""
    assert ps.pg_version == "15"
    real15 = pg_bindir("15")
    pgroot = pathlib.Path(tempfile.mkdtemp(prefix="strata-pgroot-"))  # the postgres user must reach it
    pgroot.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(pgroot, ignore_errors=True))
    newer = pgroot / "17" / "bin"
    newer.mkdir(parents=True)
    for tool in ("postgres", "initdb"):
        exe = newer / tool  # answers --version like PostgreSQL 17, and fails at anything else
        exe.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "postgres (PostgreSQL) 17.2" && exit 0\nexit 1\n')
        exe.chmod(0o755)
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "pg_config").write_text(f"#!/bin/sh\necho {newer}\n")
    (shims / "pg_config").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    monkeypatch.setenv("STRATA_PG_ROOT", str(pgroot))
    monkeypatch.setattr(compute_module, "_found", {})
    assert pg_bindir() == str(newer)  # what a new store would use now
    with pytest.raises(PostgresVersionError, match="made by PostgreSQL 15.*install postgresql-15") as e:
        ps.start_compute(branch)  # 15 is not under this root, and pg_config names 17
    assert e.value.major == "15" and ps.compute_of(branch) is None
    (pgroot / "15").mkdir()  # now PostgreSQL 15 is installed too
    os.symlink(real15, pgroot / "15" / "bin")
    c = ps.start_compute(branch)
    assert c.bindir == str(pgroot / "15" / "bin")
    assert query(c, "select current_setting('server_version_num')::int / 10000") == [(15,)]


def test_relcache_init_files_are_written_compute_locally(ps, branch):
    """Regression: PostgreSQL writes pg_internal.init.<pid> and renames it to
    pg_internal.init; only the second name was compute-local, so the rename
    failed (EXDEV) and every backend rebuilt its relation cache."""
    c = ps.start_compute(branch)
    query(c, "select count(*) from pg_class")
    query(c, "select 1")  # a second backend: it finds the file its predecessor wrote
    assert os.path.exists(os.path.join(c.local_root, "global", "pg_internal.init"))
    assert "Invalid cross-device link" not in c.log_tail(200)
