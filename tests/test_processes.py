"""The service's processes: a supervisor, the page server (root, where
FUSE needs it) and the front end (HTTP API and proxy, unprivileged when
started as root). A front end or page server that dies is restarted, a
database made before answers again, and `strata status` says what
happened. (Nothing acknowledged is lost across these kills:
test_kill_service.py.)"""

from __future__ import annotations

import os
import signal
import stat
import time

import psycopg

from pageserver.service import daemon as service

from .pg import requires_pg, strata

pytestmark = requires_pg


def uids(pid: int) -> list[int]:
    """Real, effective, saved and file-system uid of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def processes(home: str) -> dict:
    state = service.read_state(home)
    assert state is not None, "the service is not running"
    return state["processes"]


def restarted(home: str, role: str, old_pid: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = processes(home)[role]
        if p["pid"] != old_pid and p["running"]:
            return p
        time.sleep(0.05)
    raise AssertionError(f"the {role} was not restarted within {timeout:.0f} s: {processes(home)[role]}")


def answers(uri: str, *statements: str, timeout: float = 60.0) -> list:
    """The last statement's rows, run in one transaction (retried while the
    service comes back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(uri, connect_timeout=10) as conn:
                for sql in statements:
                    cur = conn.execute(sql)
                return cur.fetchall() if cur.description else []
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_front_end_unprivileged_and_dead_processes_restarted(tmp_path):
    home = str(tmp_path / "home")
    try:
        strata(home, "up")
        procs = processes(home)
        fe, ps = procs["frontend"], procs["pageserver"]
        if os.geteuid() == 0:
            assert all(u != 0 for u in uids(fe["pid"])), f"the front end runs as root: {uids(fe['pid'])}"
            assert fe["user"] != "root"
            assert uids(ps["pid"])[1] == 0  # the page server keeps root, for FUSE
        assert fe["pid"] != ps["pid"] != service.read_state(home)["pid"]
        sock_dir = os.path.dirname(next(a for a in open(f"/proc/{ps['pid']}/cmdline").read().split("\0")
                                        if a.endswith("control.sock")))
        mode = stat.S_IMODE(os.stat(sock_dir).st_mode)
        assert mode & 0o007 == 0, f"the control socket's directory is open to all: {oct(mode)}"

        uri = strata(home, "db", "create", "shop")["uri"]
        answers(uri, "create table t (x int)", "insert into t values (1)")

        os.kill(fe["pid"], signal.SIGKILL)
        fe2 = restarted(home, "frontend", fe["pid"])
        assert fe2["restarts"] == 1 and "SIGKILL" in fe2["last_exit"]
        assert answers(uri, "select count(*) from t") == [(1,)]

        os.kill(ps["pid"], signal.SIGKILL)
        ps2 = restarted(home, "pageserver", ps["pid"])
        assert ps2["restarts"] == 1 and "SIGKILL" in ps2["last_exit"]
        assert answers(uri, "insert into t values (2)", "select count(*) from t") == [(2,)]

        status = strata(home, "status")
        assert status["processes"]["pageserver"]["restarts"] == 1
        assert status["processes"]["frontend"]["restarts"] == 1
        assert status["databases"] == 1
    finally:
        service.stop(home)
    assert service.read_state(home) is None


def test_shutdown_through_the_api_stops_every_process(tmp_path):
    home = str(tmp_path / "home")
    try:
        strata(home, "up")
        pids = [p["pid"] for p in processes(home).values()] + [service.read_state(home)["pid"]]
        import httpx

        state = service.read_state(home)
        token = open(state["token_file"]).read().strip()
        r = httpx.post(state["api"] + "/v1/shutdown", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 202
        deadline = time.monotonic() + 60
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, "a process outlived the shutdown"
            time.sleep(0.05)
    finally:
        service.stop(home)


def test_children_do_not_outlive_a_killed_supervisor(tmp_path):
    """kill -9 of the supervisor: the page server and the front end stop on
    their own (the page server's computes with it), and the next start
    serves the same databases."""
    home = str(tmp_path / "home")
    try:
        strata(home, "up")
        uri = strata(home, "db", "create", "shop")["uri"]
        answers(uri, "create table t (x int)", "insert into t values (1)")
        procs = processes(home)
        # a restarted page server too: the supervisor started it later, from its loop
        os.kill(procs["pageserver"]["pid"], signal.SIGKILL)
        restarted(home, "pageserver", procs["pageserver"]["pid"])
        answers(uri, "select 1")
        children = [p["pid"] for p in processes(home).values()]
        os.kill(service.read_state(home)["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while [p for p in children if alive(p)]:
            assert time.monotonic() < deadline, f"outlived their supervisor: {children}"
            time.sleep(0.05)
        strata(home, "up")
        assert answers(uri, "select count(*) from t") == [(1,)]
    finally:
        service.stop(home)


def test_a_front_end_dying_while_the_page_server_starts_is_said_at_once(tmp_path, monkeypatch):
    """The supervisor starts the front end beside the page server: a front
    end that dies (here, at once) is reported as soon as it dies, naming
    it, and the page server (here, one that would open its store for
    minutes) is stopped; not found only once the page server is ready."""
    import pwd
    import sys

    from pageserver.service import supervisor as sup_mod

    monkeypatch.setattr(sup_mod, "START_TIMEOUT", 20.0)
    pid_file = tmp_path / "pageserver.pid"
    slow = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    me = pwd.getpwuid(os.geteuid())
    with open(tmp_path / "log", "w") as log_file:
        sup = sup_mod.Supervisor(pageserver_cmd=[sys.executable, "-c", slow],
                                 frontend_cmd=[sys.executable, "-c", "import sys; sys.exit(3)"],
                                 frontend_user=(me.pw_name, me.pw_uid, me.pw_gid), token="t",
                                 log_file=log_file, on_state=lambda states: None)
        try:
            sup.start()
        except RuntimeError as e:
            assert str(e) == "the frontend exited with status 3 while the pageserver started", e
        else:
            raise AssertionError("the supervisor started with its front end dead")
    left = [p for p in os.listdir("/proc") if p.isdigit() and alive(int(p)) and str(pid_file) in cmdline(p)]
    assert not left, "the page server was left running"


def cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""
