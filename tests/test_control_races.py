"""The control plane's races, each lined up deterministically: one thread
is paused between its check and its act (or between its read and its
write) while another does what races it. Real PostgreSQL through the
real proxy where a compute is involved."""

from __future__ import annotations

import logging
import os
import threading
import time

import psycopg
import pytest

from pageserver.control.plane import ControlPlane
from pageserver.errors import UnknownObjectError

from .interleave import Pause, finished, run
from .pg import Running, requires_pg, sql
from .test_control import no_connections

pytestmark = requires_pg


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with Running(str(tmp_path_factory.mktemp("races"))) as r:
        yield r


def _id_is(bid: int):
    return lambda br, *a, **kw: (br if isinstance(br, int) else br.id) == bid


def postmasters(mountpoint: str) -> int:
    """Postmaster processes serving data directories on this mount (from /proc)."""
    mnt = mountpoint.rstrip("/") + "/"
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"-D" in args and args.index(b"-D") + 1 < len(args) and \
                args[args.index(b"-D") + 1].decode(errors="replace").startswith(mnt):
            pids[int(entry)] = ppid
    return sum(1 for ppid in pids.values() if ppid not in pids)


class CapWatch:
    """Counts computes at every start, from the control plane's own
    accounting (the page server's table) and from /proc."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp, self.seen, self.seen_proc = cp, 0, 0
        self._real = cp.ps.start_compute
        self._mu = threading.Lock()

    def __enter__(self) -> CapWatch:
        def start(*a, **kw):
            c = self._real(*a, **kw)
            with self._mu:
                self.seen = max(self.seen, len(self.cp.ps.computes()))
                self.seen_proc = max(self.seen_proc, postmasters(self.cp.ps.mountpoint))
            return c

        self.cp.ps.start_compute = start  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.cp.ps.start_compute


# --- catalog readers and writers --------------------------------------------------------


def test_a_reader_iterating_the_catalog_while_a_branch_is_created(env):
    """Regression: create_branch wrote the catalog outside the control
    plane's lock while status() iterated it: "dictionary changed size
    during iteration"."""
    cp = env.cp
    for name in ("it-a", "it-b"):
        sql(cp.create_database(name).uri, "select 1")  # running: status names them one by one
    with Pause(cp.catalog._tl, "commit", thread="creator", before=True) as commit:
        creator, created = run(lambda: cp.create_branch("it-a", "new"), "creator")
        commit.reached()  # checked, about to commit
        with Pause(cp, "endpoint", thread="status") as mid:
            status, got = run(cp.status, "status")
            mid.reached()  # in the middle of its iteration
            commit.release()
            finished(creator, 0.5)  # its change is in (today's code: it then waits for status's lock)
        status.join(10)
    creator.join(10)
    assert "error" not in got, got
    assert {"it-a.main", "it-b.main"} <= set(got["result"]["running"])
    assert "error" not in created, created
    assert cp.branch("it-a", "new").name == "new"


@pytest.mark.parametrize("writer", ["update", "delete"])
def test_the_proxy_never_waits_behind_a_catalog_fsync(env, writer):
    """Regression: the proxy (on the event loop) called resolve and
    connection_opened/closed, which waited for a lock held across the
    catalog's fsync."""
    cp = env.cp
    br = cp.resolve(cp.create_database(f"fs-{writer}").name)
    cp.create_database(f"fs-{writer}-other")
    act = {"update": lambda: cp.update_branch(f"fs-{writer}", "main", idle_timeout=77),
           "delete": lambda: cp.delete_database(f"fs-{writer}-other")}[writer]
    with Pause(cp.catalog._tl, "sync", thread="writer", before=True) as fsync:
        w, _ = run(act, "writer")
        fsync.reached()  # its change committed, its fsync not yet done
        for name, call in (("resolve", lambda: cp.resolve(f"fs-{writer}.main")),
                           ("connection_opened", lambda: cp.connection_opened(br)),
                           ("connection_closed", lambda: cp.connection_closed(br)),
                           ("status", cp.status),
                           ("metrics", cp.metrics.text)):
            t, out = run(call, "loop")
            assert finished(t, 1.0), f"{name} waited for the catalog's fsync"
            assert "error" not in out, (name, out)
    w.join(10)


def test_delete_database_racing_create_branch_leaves_no_orphan_either_way(env, caplog):
    """Regression: a branch created while its database was deleted was
    written as an orphan record; once it expired, housekeeping raised
    KeyError every second and idle suspension stopped for everyone."""
    cp = env.cp
    # the create checks, then the delete commits, then the create commits
    cp.create_database("orph-a")
    with Pause(cp.ps.store, "branch", thread="creator") as made:
        creator, created = run(lambda: cp.create_branch("orph-a", "x", ttl="1m"), "creator")
        made.reached()  # its timeline made, its record not yet
        cp.delete_database("orph-a")
    creator.join(30)
    assert isinstance(created.get("error"), UnknownObjectError), created
    # the create commits first, the delete after it, while the create still waits
    cp.create_database("orph-b")
    with Pause(cp.catalog._tl, "commit", thread="creator2", before=True) as commit:
        creator2, created2 = run(lambda: cp.create_branch("orph-b", "y", ttl="1m"), "creator2")
        commit.reached()
        deleter, deleted = run(lambda: cp.delete_database("orph-b"), "deleter")
        finished(deleter, 0.3)
    creator2.join(30)
    deleter.join(30)
    assert "error" not in deleted, deleted
    env.clock.now += 120  # past the TTLs: housekeeping meets no record it cannot place ...
    with caplog.at_level(logging.ERROR, logger="strata.control"):
        cp.maintain()  # ... and sweeps what the delete could not remove while the create held it
    assert not [r for r in caplog.records if r.name == "strata.control"], caplog.text
    snap = cp.catalog.snapshot
    assert all(b.database in snap.databases for b in snap.branches.values()), "an orphan branch record"
    referenced = {b.timeline for b in snap.branches.values()}
    assert all(t in cp.ps.store for t in referenced)
    assert not [t for t in cp.ps.store.timeline_ids()
                if t not in referenced and t not in (cp.ps.template().id, cp.catalog.timeline_id)
                and t not in cp.ps.compute_timelines()], "an unreferenced timeline"


def test_reset_writes_back_the_record_as_it_is_at_commit(env):
    """Regression: reset_branch wrote back its own stale copy of the
    record, undoing a change made meanwhile."""
    cp = env.cp
    cp.create_database("stale")
    before = cp.create_branch("stale", "dev").timeline
    br = cp.resolve("stale/dev")
    with Pause(cp, "_lock_of", thread="resetter", before=True, when=_id_is(br.id)) as locking:
        resetter, reset = run(lambda: cp.reset_branch("stale", "dev"), "resetter")
        locking.reached()  # it has read the record
        cp.update_branch("stale", "dev", idle_timeout=123)
    resetter.join(30)
    assert "error" not in reset, reset
    after = cp.branch("stale", "dev")
    assert after.timeline != before  # reset
    assert after.idle_timeout == 123  # and the change made meanwhile kept


# --- lifecycle: suspension, expiry, the cap -------------------------------------------------


def test_idle_suspension_rechecks_for_a_connection_that_arrived(env):
    """Regression: idle suspension chose its branch without a lock, then
    stopped it: a connection that arrived in between was killed."""
    cp, clock = env.cp, env.clock
    uri = cp.create_database("nap", idle_timeout=60).uri
    sql(uri, "select 1")
    no_connections(cp, "nap/main")
    clock.now += 120  # idle for longer than its timeout
    br = cp.resolve("nap")
    with Pause(cp, "_lock_of", thread="housekeeping", before=True, when=_id_is(br.id)) as locking:
        housekeeping, _ = run(cp.maintain, "housekeeping")
        locking.reached()  # it found the branch idle, and goes for its lock
        conn = psycopg.connect(uri, autocommit=True, connect_timeout=30)
        assert conn.execute("select 1").fetchone() == (1,)
    housekeeping.join(30)
    try:
        assert conn.execute("select 2").fetchone() == (2,)  # not killed
    finally:
        conn.close()


def test_the_caps_victim_is_rechecked_under_its_lock(tmp_path):
    """Regression: at the cap, the victim was chosen without a lock, then
    stopped: a client that connected to it in between was cut off."""
    with Running(str(tmp_path), max_computes=2) as r, CapWatch(r.cp) as watch:
        cp = r.cp
        a, b, c = (cp.create_database(n).uri for n in ("cap-a", "cap-b", "cap-c"))
        for uri, name in ((a, "cap-a"), (b, "cap-b")):
            sql(uri, "select 1")
            no_connections(cp, f"{name}/main")
            r.clock.now += 1  # a is the least recently active
        victim = cp.resolve("cap-a")
        with Pause(cp, "_lock_of", thread="waker", before=True, when=_id_is(victim.id)) as locking:
            waker, woke = run(lambda: cp.wake("cap-c"), "waker")
            locking.reached()  # a was chosen, its lock not yet taken
            conn = psycopg.connect(a, autocommit=True, connect_timeout=30)
            assert conn.execute("select 1").fetchone() == (1,)
        waker.join(60)
        try:
            assert "error" not in woke, woke
            assert conn.execute("select 2").fetchone() == (2,)  # a kept its client: b yielded
            assert cp.branch("cap-b", "main").state == "suspended"
        finally:
            conn.close()
        assert watch.seen <= 2 and watch.seen_proc <= 2, (watch.seen, watch.seen_proc)


def test_the_cap_holds_with_the_warm_pool_and_starting_computes(tmp_path):
    """Regression: the pool counted neither starting computes nor did
    the cap count warm ones, so wakes and the pool together went over."""
    with Running(str(tmp_path), max_computes=2) as r, CapWatch(r.cp) as watch:
        cp = r.cp
        a, b = cp.resolve(cp.create_database("pool-a").name), cp.resolve(cp.create_database("pool-b").name)
        cp.warm_pool = 1  # filled by hand (no pool thread)
        assert cp.fill_pool() == 1
        with Pause(cp.ps, "start_compute", thread="wake-a", before=True) as pa, \
                Pause(cp.ps, "start_compute", thread="wake-b", before=True) as pb:
            ta, wa = run(lambda: cp.wake(a), "wake-a")
            tb, wb = run(lambda: cp.wake(b), "wake-b")
            pa.reached()
            pb.reached()  # both hold a slot, neither compute is up yet
            cp.fill_pool()  # the pool must not start a third
        ta.join(60)
        tb.join(60)
        assert "error" not in wa and "error" not in wb, (wa, wb)
        assert len(cp.ps.computes()) <= 2
        assert watch.seen <= 2 and watch.seen_proc <= 2, (watch.seen, watch.seen_proc)


def test_expiry_after_going_unused_spares_a_branch_with_an_open_connection(env):
    """Regression: expire_after_idle deleted branches that still had open
    connections (in use, though no new one had come for an hour)."""
    cp, clock = env.cp, env.clock
    cp.create_database("longconn")
    br = cp.create_branch("longconn", "report", expire_after_idle="1h")
    with psycopg.connect(br.uri, autocommit=True, connect_timeout=30) as conn:
        conn.execute("select 1")
        clock.now += 3700
        cp.maintain()
        assert [b.name for b in cp.branches("longconn")] == ["main", "report"]
        assert conn.execute("select 2").fetchone() == (2,)
    no_connections(cp, "longconn/report")
    clock.now += 3700
    assert "longconn/report" in cp.maintain()["expired"]


def test_a_ttl_is_a_hard_deadline_and_says_so(env):
    """Its connections are ended with an error saying the branch expired
    (not PostgreSQL's "terminating connection due to administrator
    command")."""
    cp, clock = env.cp, env.clock
    cp.create_database("deadline")
    br = cp.create_branch("deadline", "brief", ttl=60)
    with psycopg.connect(br.uri, autocommit=True, connect_timeout=30) as conn:
        conn.execute("select 1")
        clock.now += 61
        assert "deadline/brief" in cp.maintain()["expired"]
        with pytest.raises(psycopg.OperationalError, match="deadline/brief expired"):
            conn.execute("select 2")
    with pytest.raises(UnknownObjectError):
        cp.branch("deadline", "brief")


def test_one_failing_record_never_stops_housekeeping_for_the_others(env, caplog, monkeypatch):
    """Regression: one record housekeeping could not handle (an orphan
    branch's KeyError) raised out of maintain every second, and idle
    suspension and expiry stopped for the whole service."""
    cp, clock = env.cp, env.clock
    cp.create_database("hk")
    bad = cp.create_branch("hk", "bad", ttl=30).timeline
    cp.create_branch("hk", "good", ttl=30)
    uri = cp.create_database("hk-idle", idle_timeout=60).uri
    sql(uri, "select 1")
    no_connections(cp, "hk-idle/main")
    real_delete = cp.ps.store.delete_timeline
    tries = []

    def failing(tid, *a, **kw):  # one timeline cannot be deleted, however often it is tried
        tid = tid if isinstance(tid, str) else tid.id
        if tid == bad:
            tries.append(tid)
            raise RuntimeError("a bug in one record's housekeeping")
        return real_delete(tid, *a, **kw)

    monkeypatch.setattr(cp.ps.store, "delete_timeline", failing)
    clock.now += 120  # both branches past their TTL, hk-idle past its idle timeout
    with caplog.at_level(logging.ERROR, logger="strata.control"):
        done = cp.maintain()
    assert "hk/good" in done["expired"] and "hk-idle.main" in done["suspended"], done
    assert tries and any(bad in r.getMessage() for r in caplog.records), "the failure was not logged"
    n = len(tries)
    cp.maintain()  # within its back-off: not tried again at once
    assert len(tries) == n
    monkeypatch.setattr(cp.ps.store, "delete_timeline", real_delete)
    clock.now += 120  # after its back-off, and fixed: the sweep deletes it
    cp.maintain()
    assert bad not in cp.ps.store


def test_idle_timers_ignore_a_jump_of_the_wall_clock(env, monkeypatch):
    """Regression: idle suspension measured idleness on the wall clock, so
    a clock step (NTP, a VM resumed) suspended branches that were in use a
    moment ago."""
    cp = env.cp
    uri = cp.create_database("ntp", idle_timeout=60).uri
    sql(uri, "select 1")
    no_connections(cp, "ntp/main")
    wall = cp._clock
    monkeypatch.setattr(cp, "_clock", lambda: wall() + 3600)  # the wall clock steps an hour ahead
    assert "ntp.main" not in cp.maintain()["suspended"]
    assert cp.branch("ntp", "main", sizes=False).state == "running"


def test_a_reset_waiting_for_the_lock_stops_the_timeline_the_branch_has_then(env):
    """Regression (review): reset read the record, waited for the branch
    lock while another reset and a wake ran, then stopped the timeline it
    had read (no compute on it) and deleted the one a compute was running
    on: the compute served I/O errors and held its slot for good."""
    cp = env.cp
    cp.create_database("rr")
    cp.create_branch("rr", "dev")
    br = cp.resolve("rr/dev")
    with Pause(cp, "_lock_of", thread="second", before=True, when=_id_is(br.id)) as locking:
        second, out = run(lambda: cp.reset_branch("rr", "dev"), "second")
        locking.reached()  # it has read the record
        cp.reset_branch("rr", "dev")  # the first reset
        running = cp.wake("rr/dev").timeline_id  # and a client: a compute on the new timeline
    second.join(60)
    assert "error" not in out, out
    assert cp.ps.compute_of(running) is None, "a compute runs on a timeline that was deleted"
    assert running not in cp.ps.store
    assert cp.branch("rr", "dev", sizes=False).state == "suspended"
    assert sql(cp.uri("rr/dev"), "select 1") == [(1,)]  # and it wakes again, on its own timeline


def test_a_restore_waiting_for_the_lock_stops_the_branchs_compute_not_the_backups(env):
    """Regression (review): restore stopped the timeline it had read, so a
    compute woken meanwhile went on serving the branch's clients from the
    timeline that became the backup branch's."""
    cp = env.cp
    cp.create_database("rs")
    cp.create_branch("rs", "dev")
    br = cp.resolve("rs/dev")
    with Pause(cp, "_lock_of", thread="restorer", before=True, when=_id_is(br.id)) as locking:
        restorer, out = run(lambda: cp.restore_branch("rs", "dev", lsn=cp.lsn("rs", "dev")), "restorer")
        locking.reached()
        cp.reset_branch("rs", "dev")
        running = cp.wake("rs/dev").timeline_id
    restorer.join(60)
    assert "error" not in out, out
    owner = cp.catalog.snapshot.branch_on.get(running)
    assert cp.ps.compute_of(running) is None, f"a compute of dev's clients serves branch {owner and owner.name}"


def test_a_detach_does_not_hold_up_connections(env):
    """Regression (review): detach held the branch lock across the copy,
    so new connections to the branch waited for all of it, and enough of
    them took every thread the proxy wakes branches in: connections to
    every other branch waited too."""
    cp = env.cp
    cp.create_database("dt")
    other = cp.create_database("dt-other").uri
    sql(other, "select 1")
    kid = cp.create_branch("dt", "kid")
    sql(kid.uri, "select 1")
    no_connections(cp, "dt/kid")
    with Pause(cp.ps.store, "detach", thread="detacher", before=True) as copying:
        detacher, _ = run(lambda: cp.detach_branch("dt", "kid"), "detacher")
        copying.reached()  # the copy under way
        waiting = [run(lambda: sql(kid.uri, "select 1"), f"kid-{i}") for i in range(8)]
        for t, out in waiting:
            assert finished(t, 10) and out.get("result") == [(1,)], out
        t, out = run(lambda: sql(other, "select 7"), "other")
        assert finished(t, 10) and out.get("result") == [(7,)], out
    detacher.join(60)
    assert cp.branch("dt", "kid", sizes=False).parent is None


def test_a_client_that_joins_a_wake_begun_before_a_delete_hears_why(env):
    """Regression: a delete ended the branch's connections when it
    committed, then stopped the compute once the wake in progress let go
    of the branch lock. A client that had resolved the branch before the
    commit, and joined that wake after it, got the compute's own
    "terminating connection due to administrator command" instead of
    being told the branch was deleted."""
    cp = env.cp
    cp.create_database("doomed")
    uri = cp.create_branch("doomed", "b").uri
    br = cp.resolve("doomed/b")

    def connect() -> str:
        try:
            sql(uri, "select 1")
        except psycopg.OperationalError as e:
            return str(e)
        return "served"

    with Pause(cp.ps, "start_compute", before=True) as waking:
        first, first_out = run(connect, "client-first")
        waking.reached()  # a wake in progress holds the branch lock
        with Pause(cp, "resolve", when=lambda address, *a, **kw: address == "doomed.b") as resolved:
            late, late_out = run(connect, "client-late")
            resolved.reached()  # it has the record, from before the delete
            with Pause(cp, "_stop", thread="deleter", before=True) as stopping:
                deleter, _ = run(lambda: cp.delete_branch("doomed", "b"), "deleter")
                stopping.reached()  # committed; it goes for the branch lock next
            with Pause(cp, "connection_opened", when=_id_is(br.id)) as opened:
                resolved.release()
                opened.reached()  # the late client is counted, and joins the wake
            time.sleep(0.2)
    assert finished(deleter, 60) and finished(first, 60) and finished(late, 60)
    for out in (first_out, late_out):
        assert "was deleted" in out["result"], out
