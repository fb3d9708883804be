"""The service as users run it: `strata up`/`down`, the HTTP API with its
token, the CLI's --json output, and the SDK's three lines."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from pageserver.clients.sdk import ApiError, Strata
from pageserver.compute.paths import RUN_MODE, run_dir_for
from pageserver.errors import ProtectedError, ServiceNotRunningError, UnknownObjectError
from pageserver.service import daemon as service
from pageserver.service.supervisor import frontend_identity

from .pg import STRATA, requires_pg, sql, strata
from .test_private_files import _snapshot, modes

pytestmark = requires_pg
BRANCH_CONNECTIONS = 5  # (given to `strata up`)

@pytest.fixture(scope="module")
def up(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("svc"))
    try:
        state = strata(home, "up", "--branch-connections", str(BRANCH_CONNECTIONS), "--memory", "900MB")
        yield home, state
    finally:
        try:
            strata(home, "down")
        finally:
            st = service.read_state(home)
            if st is not None:  # never leave it running, even when a test failed
                os.kill(st["pid"], 9)


def test_up_is_idempotent_and_says_where_it_listens(up):
    home, state = up
    assert set(state) >= {"api", "proxy", "token_file", "pid"}
    assert state["api"].startswith("http://127.0.0.1:") and state["proxy"].startswith("127.0.0.1:")
    assert os.stat(state["token_file"]).st_mode & 0o777 == 0o600
    assert strata(home, "up")["pid"] == state["pid"]


def test_the_api_needs_the_token(up):
    _, state = up
    assert httpx.get(state["api"] + "/v1/databases").status_code == 401
    bad = httpx.get(state["api"] + "/v1/databases", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    token = open(state["token_file"]).read().strip()
    ok = httpx.get(state["api"] + "/v1/databases", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and isinstance(ok.json(), list)
    doc = httpx.get(state["api"] + "/v1/openapi.json").json()
    assert "/v1/databases/{db}/branches" in doc["paths"]


def test_the_cli_end_to_end(up):
    home, _ = up
    db = strata(home, "db", "create", "app", "--ttl", "1h")
    assert db["name"] == "app" and db["branch"] == "main" and db["uri"].startswith("postgresql://")
    with psycopg.connect(db["uri"], autocommit=True) as conn:
        conn.execute("create table t as select 1 as x")
    st = strata(home, "status", "app/main")
    assert st["state"] == "running" and st["lsn"] > 0
    lsn = strata(home, "lsn", "app/main")["lsn"]
    with psycopg.connect(db["uri"], autocommit=True) as conn:
        conn.execute("insert into t values (2)")
    br = strata(home, "branch", "create", "app/old", "--lsn", str(lsn))
    assert br["name"] == "app/old" and br["lsn"] == lsn
    with psycopg.connect(br["uri"]) as conn:
        assert conn.execute("select x from t order by x").fetchall() == [(1,)]
    assert strata(home, "suspend", "app/main")["state"] == "suspended"
    again = strata(home, "uri", "app/old", "--ttl", "1h")["uri"]  # a second password: both open it
    assert again != br["uri"] and again.split("@")[1] == br["uri"].split("@")[1]
    for uri in (again, br["uri"]):
        with psycopg.connect(uri) as conn:
            assert conn.execute("select count(*) from t").fetchone() == (1,)
    names = [b["name"] for b in strata(home, "branch", "list", "app")["branches"]]
    assert names == ["main", "old"]
    assert "app" in [d["name"] for d in strata(home, "db", "list")["databases"]]
    err = strata(home, "branch", "delete", "app/missing", check=False)
    assert err["error"] == "UnknownObjectError" and "app/missing" in err["message"]
    strata(home, "branch", "delete", "app/old")
    strata(home, "db", "delete", "app")
    assert "app" not in [d["name"] for d in strata(home, "db", "list")["databases"]]


def test_strata_diff_from_the_cli_and_the_api(up):
    home, state = up
    db = strata(home, "db", "create", "dif", "--ttl", "1h")
    with psycopg.connect(db["uri"], autocommit=True) as conn:
        conn.execute("create table t(id int primary key, v text)")
        conn.execute("insert into t select i, 'v' || i from generate_series(1, 500) i")
    br = strata(home, "branch", "create", "dif/feature")
    with psycopg.connect(br["uri"], autocommit=True) as conn:
        conn.execute("update t set v = 'changed' where id = 7")
        conn.execute("insert into t values (501, 'new')")
    out = strata(home, "diff", "dif/main", "dif/feature")
    (t,) = [x for x in out["rows"] if x["table"] == "public.t"]
    assert t["counts"] == {"added": 1, "removed": 0, "modified": 1}
    assert t["modified"][0]["changes"] == {"v": {"from_": "v7", "to_": "changed"}}
    text = subprocess.run([*STRATA, "--home", home, "diff", "dif/main", "dif/feature"], capture_output=True,
                          text=True, timeout=300, check=True).stdout
    assert "public.t" in text and "+1 -0 ~1" in text and "v 'v7' -> 'changed'" in text
    stat = strata(home, "diff", "dif/main", "dif/feature", "--stat")
    assert "rows" not in stat and stat["pages"]["relations"]
    err = strata(home, "diff", "dif/main", "dif/nope", check=False)
    assert err["error"] == "UnknownObjectError" and "dif/nope" in err["message"]
    token = open(state["token_file"]).read().strip()
    r = httpx.post(state["api"] + "/v1/diff", json={"a": "dif/main", "b": "dif/feature", "rows": False},
                   headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200 and r.json()["pages"]["relations"]
    bad = httpx.post(state["api"] + "/v1/diff", json={"a": "dif", "b": "dif/main"},
                     headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert bad.status_code == 400 and "DB/BRANCH" in bad.text
    assert httpx.post(state["api"] + "/v1/diff", json={"a": "dif/main", "b": "dif/main"}).status_code == 401
    # merge: a dry run shows the patch, a conflict is refused by name with 409, then a clean merge
    dry = strata(home, "merge", "dif/feature", "dif/main", "--dry-run")
    assert dry["mode"] == "patch" or dry["mode"] == "fast-forward"
    with psycopg.connect(db["uri"], autocommit=True) as conn:
        conn.execute("update t set v = 'main' where id = 7")
    err = strata(home, "merge", "dif/feature", "dif/main", check=False)
    assert err["error"] == "MergeConflictError" and "'id': '7'" in err["message"]
    r = httpx.post(state["api"] + "/v1/merge", json={"source": "dif/feature", "target": "dif/main"},
                   headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert r.status_code == 409
    with psycopg.connect(db["uri"], autocommit=True) as conn:
        conn.execute("update t set v = 'changed' where id = 7")  # (resolved by hand)
    assert strata(home, "merge", "dif/feature", "dif/main")["conflicts"] == []
    with psycopg.connect(db["uri"]) as conn:
        assert conn.execute("select v from t where id in (7, 501) order by id").fetchall() == [("changed",), ("new",)]
    strata(home, "db", "delete", "dif")


def test_db_create_from_nothing_starts_the_service_and_says_when_it_expires(tmp_path):
    """An agent with nothing set up: one command to a URI (and its expiry)."""
    home = str(tmp_path / "fresh")
    try:
        out = strata(home, "db", "create", "--ttl", "1h")
        assert out["uri"].startswith("postgresql://") and out["expires_at"]
        assert service.read_state(home) is not None
        with psycopg.connect(out["uri"]) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        text = subprocess.run([*STRATA, "--home", home, "db", "create", "--ttl", "1h"], capture_output=True,
                              text=True, timeout=120, check=True)
        assert text.stdout.strip().startswith("postgresql://") and "\n" not in text.stdout.strip()
        assert text.stderr.startswith("expires ")
        # claimed: no TTL any more, and the old password and token open nothing (an open session is ended)
        name = out["name"]
        strata(home, "branch", "create", f"{name}/dev")
        held = psycopg.connect(out["uri"], autocommit=True)
        claimed = strata(home, "db", "claim", name)
        assert claimed["uri"] != out["uri"] and claimed["expires_at"] is None and claimed["token"] != out["token"]
        with pytest.raises(psycopg.OperationalError, match="claimed"):
            held.execute("select 1")
        held.close()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(out["uri"]).close()
        assert sql(claimed["uri"], "select 1") == [(1,)]
        client = Strata(home, start=False)
        info = client.database(name).info
        assert info["expires_at"] is None
        assert all(b.info["expires_at"] is None for b in client.database(name).branches())
        with pytest.raises(ApiError) as e:
            Strata(home, start=False, token=out["token"]).database(name)
        assert e.value.status == 401
        assert Strata(home, start=False, token=claimed["token"]).database(name).info["name"] == name
    finally:
        strata(home, "down")


def test_the_sdk_in_three_lines(up):
    home, _ = up
    os.environ["STRATA_HOME"] = home
    try:
        db = Strata().create_database(ttl="1h")
        assert db.sql("select 1") == [(1,)]
        db.delete()
    finally:
        del os.environ["STRATA_HOME"]
    client = Strata(home)
    with pytest.raises(UnknownObjectError):
        client.database(db.database)
    base = client.create_database("sdk")
    base.sql("create table t(x int)")
    kid = base.branch("kid", protected=True)
    kid.sql("insert into t values (1)")
    assert base.sql("select count(*) from t") == [(0,)] and kid.sql("select count(*) from t") == [(1,)]
    with pytest.raises(ProtectedError):
        kid.delete()
    kid.update(protected=False)
    kid.suspend()
    assert kid.state == "suspended"
    kid.delete()
    base.delete()


def connect_as(user: str, path: str) -> str:
    """Connect to the Unix socket at `path` as OS user `user`: "ok" or the
    error's type."""
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1]); print('ok')\n"
            "except OSError as e:\n    print(type(e).__name__)")
    pw = pwd.getpwnam(user)
    return subprocess.run(["python3", "-c", code, path], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip()


def listening_on(port: int) -> bool:
    """Whether any process listens on TCP `port` (IPv4 or IPv6), from /proc."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def test_down_stops_everything(tmp_path):
    home = str(tmp_path)
    os.chmod(home, 0o755)  # an older home, left wide: up tightens it
    with open(os.path.join(home, "notes"), "w") as f:
        f.write("x")
    os.chmod(os.path.join(home, "notes"), 0o644)
    strata(home, "up")
    try:
        db = strata(home, "db", "create", "x")
        with psycopg.connect(db["uri"]) as conn:
            conn.execute("create table t as select generate_series(1, 1000) x")
            conn.execute("checkpoint")
        run_dir = run_dir_for(home)
        assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
        loose = {p: oct(m) for p, m in modes(home).items()
                 if m & ~(0o700 if os.path.isdir(os.path.join(home, p)) else 0o600)}
        assert not loose, loose  # every file of the home 0600, every directory 0700
        rpc = run_dir + ".rpc"
        assert stat.S_IMODE(os.stat(rpc).st_mode) == 0o750  # for the front end's group
        assert stat.S_IMODE(os.stat(os.path.join(rpc, "control.sock")).st_mode) == 0o660
        for d in (os.path.dirname(run_dir), run_dir, os.path.join(run_dir, "computes")):
            assert stat.S_IMODE(os.stat(d).st_mode) == RUN_MODE, d  # postgres passes through to its own
        for c in os.listdir(os.path.join(run_dir, "computes")):
            cdir = os.path.join(run_dir, "computes", c)
            assert stat.S_IMODE(os.stat(cdir).st_mode) == RUN_MODE
            for name in ("state.json", "postgres.log"):
                assert stat.S_IMODE(os.stat(os.path.join(cdir, name)).st_mode) == 0o600, name
            assert stat.S_IMODE(os.stat(os.path.join(cdir, "local")).st_mode) == 0o700
            sock = os.path.join(cdir, "sock")  # the compute's only door: its Unix socket,
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o750  # for postgres and the front end's group
            assert os.stat(sock).st_gid == frontend_identity()[2]
            (name,) = [n for n in os.listdir(sock) if n.startswith(".s.PGSQL.") and not n.endswith(".lock")]
            path, port = os.path.join(sock, name), int(name.rsplit(".", 1)[1])
            assert connect_as("strata", path) == "ok"
            assert connect_as("nobody", path) == "PermissionError"  # another tenant's OS user cannot
            assert not listening_on(port), f"a compute listens on TCP port {port}"
        pid = service.read_state(home)["pid"]
        assert strata(home, "down") == {"stopped": True, "pid": pid}
        assert not os.path.ismount(os.path.join(run_dir, "mnt"))
        out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert run_dir not in out  # no postgres left on its mount
        assert strata(home, "down") == {"stopped": False, "pid": None}
        with pytest.raises(ServiceNotRunningError):
            Strata(home, start=False)

    finally:  # never leave it running, even when an assertion above failed
        st = service.read_state(home)
        if st is not None:
            strata(home, "down", check=False)
        pid = service.service_pid(home)
        if pid is not None:
            os.kill(pid, 9)


def _api(state: dict, token: str | None = None) -> httpx.Client:
    token = token or open(state["token_file"]).read().strip()
    return httpx.Client(base_url=state["api"] + "/v1", headers={"Authorization": f"Bearer {token}"}, timeout=120)


def test_an_idle_branch_suspends_after_its_timeout_and_wakes_intact(up):
    home, state = up
    client = Strata(home)
    db = client.create_database("sleepy", idle_timeout=1)
    db.sql("create table t as select 42 as x")
    t0 = time.monotonic()
    while db.state != "suspended":
        assert time.monotonic() - t0 < 15, "not suspended 15 s after its 1 s idle timeout"
        time.sleep(0.1)
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"/mnt/{db.info['timeline']}" not in out
    assert not any(db.info["endpoint"] in line for line in out.splitlines())
    assert db.sql("select x from t") == [(42,)]  # woken by the connection, data intact
    db.delete()


def test_forty_concurrent_creations_all_succeed(up):
    home, _ = up
    client = Strata(home)
    with ThreadPoolExecutor(40) as ex:
        dbs = list(ex.map(lambda i: client.create_database(f"many-{i}"), range(40)))
    assert sorted(d.database for d in dbs) == sorted(f"many-{i}" for i in range(40))
    assert len({d.uri for d in dbs}) == 40
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda d: d.delete(), dbs))


def test_a_database_token_reaches_only_its_database(up):
    home, state = up
    client = Strata(home)
    mine, theirs = client.create_database("mine"), client.create_database("theirs")
    assert mine.token and mine.token != theirs.token
    scoped = _api(state, mine.token)
    assert scoped.get("/databases/mine").status_code == 200
    r = scoped.post("/databases/mine/branches", json={"name": "work"})
    assert r.status_code == 201, r.text
    assert scoped.get("/databases/mine/branches/work").json()["name"] == "work"
    for method, path in (("GET", "/databases/theirs"), ("GET", "/databases/theirs/branches"),
                         ("POST", "/databases/theirs/branches"), ("DELETE", "/databases/theirs"),
                         ("DELETE", "/databases/theirs/branches/main"), ("GET", "/databases"),
                         ("POST", "/databases"), ("GET", "/status"), ("POST", "/shutdown"),
                         ("DELETE", "/databases/mine")):
        r = scoped.request(method, path, json={"name": "x"})
        assert r.status_code == 403, (method, path, r.status_code, r.text)
    assert httpx.get(state["api"] + "/metrics", headers={"Authorization": f"Bearer {mine.token}"}).status_code == 403
    client.database("theirs")  # untouched
    theirs.delete()
    mine.delete()
    assert _api(state, mine.token).get("/databases/mine").status_code == 401  # gone with it


def test_bad_requests_get_a_clear_4xx_and_change_nothing(up):
    home, state = up
    api = _api(state)
    client = Strata(home)
    base = client.create_database("strict")
    base.sql("create table t(x int)")
    kid = base.branch("kid")
    kid.create_branch("grandkid")
    before = (api.get("/databases").json(), api.get("/databases/strict/branches").json())
    head = kid.lsn()
    cases = [
        ("POST", "/databases", b"{not json", 400, "invalid request"),
        ("POST", "/databases", {"name": "a/b"}, 400, "invalid database name"),
        ("POST", "/databases", {"name": "x" * 64}, 400, "invalid database name"),
        ("POST", "/databases", {"name": "strict"}, 409, "already exists"),
        ("POST", "/databases", {"ttl": "forever"}, 400, "invalid ttl"),
        ("GET", "/databases/nope", None, 404, "no database named 'nope'"),
        ("GET", "/databases/strict/branches/nope", None, 404, "strict/nope"),
        ("POST", "/databases/strict/branches", {"name": "../up"}, 400, "invalid branch name"),
        ("POST", "/databases/strict/branches", {"name": "far", "parent": "kid", "lsn": head + 10**9}, 400,
         "beyond the head"),
        ("POST", "/databases/strict/branches", {"name": "early", "parent": "kid", "lsn": 1}, 400,
         "cannot branch"),
        ("POST", "/databases/strict/branches", {"name": "later", "time": "2999-01-01T00:00:00Z"}, 400,
         "in the future"),
        ("POST", "/databases/strict/branches", {"name": "when", "time": "yesterday"}, 400, "invalid time"),
        ("DELETE", "/databases/strict/branches/kid", None, 400, "grandkid"),
        ("DELETE", "/databases/strict/branches/main", None, 400, "root branch"),
        ("POST", "/databases/strict/branches/kid/restore", {}, 400, "an LSN or a time"),
        ("POST", "/databases", {"name": "big", "max_size": "lots"}, 400, "invalid max_size 'lots'"),
        ("POST", "/databases", {"name": "big", "branch_connections": 1000}, 400, "invalid branch_connections"),
        ("POST", "/databases", {"name": "big", "memory": "100MB", "shared_buffers": "90MB"}, 400, "memory"),
        ("PATCH", "/databases/strict", {"work_mem": "1"}, 400, "invalid work_mem"),
        ("PATCH", "/databases/strict", {"swap": "1GB"}, 400, "invalid request"),
        ("PATCH", "/databases/nope", {"memory": "1GB"}, 404, "nope"),
    ]
    for method, path, body, status, words in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = api.request(method, path, **kw)
        assert r.status_code == status, (method, path, body, r.status_code, r.text)
        assert words in r.json()["message"], (method, path, r.json())
    assert httpx.get(state["api"] + "/v1/databases").status_code == 401
    assert (api.get("/databases").json(), api.get("/databases/strict/branches").json()) == before
    for name in ("grandkid", "kid"):
        client.branch(f"strict/{name}").delete()
    base.delete()


def test_metrics_in_prometheus_format(up):
    home, state = up
    db = Strata(home).create_database("metered")
    db.sql("select 1")
    db.suspend()
    text = _api(state).get(state["api"] + "/metrics").text
    for name in ("strata_databases", "strata_branches", "strata_running_computes",
                 "strata_create_database_seconds_count", "strata_wake_seconds_count",
                 "strata_suspend_seconds_count"):
        assert f"\n{name}" in text or text.startswith(name), name
    wakes = [line for line in text.splitlines() if line.startswith("strata_wake_seconds_count")]
    assert float(wakes[0].split()[1]) >= 1
    db.delete()


def test_limits_through_the_cli_the_api_and_the_sdk(up):
    home, state = up
    made = strata(home, "db", "create", "lim", "--max-size", "40MB", "--branch-connections", "3")
    assert made["limits"]["max_size"] == 40 << 20 and made["limits"]["branch_connections"] == 3
    assert made["limits"]["memory"] == 900 << 20  # `strata up --memory`: the default
    assert strata(home, "db", "limit", "lim", "--max-size", "64MB")["limits"]["max_size"] == 64 << 20
    assert strata(home, "db", "limit", "lim")["limits"]["max_size"] == 64 << 20
    branch = strata(home, "status", "lim/main")
    assert branch["limits"]["max_size"] == 64 << 20
    client = Strata(home)
    db = client.create_database("lim2", shared_buffers="32MB", work_mem="2MB")
    assert db.sql("show shared_buffers") == [("32MB",)] and db.sql("show work_mem") == [("2MB",)]
    assert db.set_limits(max_size="1GB")["max_size"] == 1 << 30
    assert db.limits["shared_buffers"] == 32 << 20
    status = strata(home, "status")
    assert status["limits"]["defaults"]["memory"] == "900 MB", status
    assert status["limits"]["defaults"]["max_size"] == "none"
    assert status["limits"]["memory_limits"].startswith("cgroup v"), status  # (CI runs where it can)
    assert set(status["limits"]["hits"]) == {"storage", "rate", "memory"}
    text = _api(state).get(state["api"] + "/metrics").text
    assert 'strata_limit_hits_total{limit="storage"}' in text
    strata(home, "db", "delete", "lim")
    db.delete()


def test_the_proxy_caps_a_branch_as_strata_up_was_told_and_counts_it(up):
    home, state = up
    db = Strata(home).create_database("capped")
    conns = [psycopg.connect(db.uri, autocommit=True, connect_timeout=60) for _ in range(BRANCH_CONNECTIONS)]
    try:
        with pytest.raises(psycopg.OperationalError, match=f"too many connections to branch capped.main "
                                                            f"\\(it takes {BRANCH_CONNECTIONS} at once\\)"):
            psycopg.connect(db.uri, connect_timeout=60)
    finally:
        for c in conns:
            c.close()
    status = strata(home, "status")
    assert status["limits"]["branch_connections"] == BRANCH_CONNECTIONS, status  # shown as in force
    assert status["limits"]["proxy_connections"] == 4096
    text = _api(state).get(state["api"] + "/metrics").text
    refused = [line for line in text.splitlines() if line.startswith('strata_proxy_refused_total{reason="branch_full"}')]
    assert float(refused[0].split()[1]) >= 1, refused
    db.delete()


def test_strata_check_reports_a_damaged_layer_file(tmp_path):
    home = str(tmp_path)
    strata(home, "up")
    try:
        db = strata(home, "db", "create", "chk")
        with psycopg.connect(db["uri"], autocommit=True) as conn:
            conn.execute("create table t as select g from generate_series(1, 10000) g")
        report = strata(home, "check")  # through the running service
        assert report["ok"] and report["timelines"] >= 3 and report["reads"] > 0, report
    finally:
        strata(home, "down")
    layers = sorted((os.path.getsize(os.path.join(d, f)), os.path.join(d, f))
                    for d, _, fs in os.walk(os.path.join(home, "store", "timelines"))
                    for f in fs if f.endswith(".layer"))
    size, victim = layers[-1]
    with open(victim, "r+b") as f:  # flip bytes in the middle of its values
        f.seek(size // 3)
        chunk = f.read(16)
        f.seek(size // 3)
        f.write(bytes(b ^ 0xFF for b in chunk))
    before = _snapshot(os.path.join(home, "store"))
    r = subprocess.run([*STRATA, "--home", home, "check", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert _snapshot(os.path.join(home, "store")) == before  # read-only: the store as it was
    report = json.loads(r.stdout)
    assert not report["ok"] and any(victim in p for p in report["problems"]), report
