"""The service as users run it: `strata up`/`down`, the HTTP API with its
token, the CLI's --json output, and the SDK's three lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import psycopg
import pytest

from pageserver import service
from pageserver.errors import ProtectedError, ServiceNotRunningError, UnknownObjectError
from pageserver.sdk import Strata
from pageserver.server import run_dir_for

from .pg import requires_pg

pytestmark = requires_pg
STRATA = [sys.executable, "-m", "pageserver.cli"]


def strata(home: str, *args: str, check: bool = True) -> dict:
    r = subprocess.run([*STRATA, "--home", home, *args, "--json"], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"strata {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    out = r.stdout if r.returncode == 0 else r.stderr
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # one JSON object
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("svc"))
    try:
        state = strata(home, "up")
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
    assert strata(home, "uri", "app/old")["uri"] == br["uri"]
    names = [b["name"] for b in strata(home, "branch", "list", "app")["branches"]]
    assert names == ["main", "old"]
    assert "app" in [d["name"] for d in strata(home, "db", "list")["databases"]]
    err = strata(home, "branch", "delete", "app/missing", check=False)
    assert err["error"] == "UnknownObjectError" and "app/missing" in err["message"]
    strata(home, "branch", "delete", "app/old")
    strata(home, "db", "delete", "app")
    assert "app" not in [d["name"] for d in strata(home, "db", "list")["databases"]]


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


def test_down_stops_everything(tmp_path):
    home = str(tmp_path)
    strata(home, "up")
    db = strata(home, "db", "create", "x")
    with psycopg.connect(db["uri"]) as conn:
        conn.execute("select 1")
    run_dir = run_dir_for(home)
    pid = service.read_state(home)["pid"]
    assert strata(home, "down") == {"stopped": True, "pid": pid}
    assert not os.path.ismount(os.path.join(run_dir, "mnt"))
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert run_dir not in out  # no postgres left on its mount
    assert strata(home, "down") == {"stopped": False, "pid": None}
    with pytest.raises(ServiceNotRunningError):
        Strata(home, start=False)

