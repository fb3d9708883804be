"""No secret is kept or shown where it should not be: the catalog keeps
SCRAM verifiers, never a password; no file under the home or the run
directory, no log and no command line holds a generated password or a
database token; and a catalog written by an older version (with plaintext
passwords) is rewritten without them, its URIs still working."""

from __future__ import annotations

import os
import subprocess
import urllib.parse

import psycopg
import pytest

from engine import Store
from pageserver.clients.sdk import Strata
from pageserver.compute.paths import run_dir_for
from pageserver.control.catalog import (
    CATALOG_ID,
    KIND_DATABASE,
    decode_record,
    encode_record,
)
from pageserver.service import daemon as service

from .pg import STRATA, Running, requires_pg, sql, strata

pytestmark = requires_pg


def password_of(uri: str) -> str:
    pw = urllib.parse.urlsplit(uri).password
    assert pw, f"no password in {uri}"
    return urllib.parse.unquote(pw)


def files_holding(top: str, secrets: dict[str, str]) -> list[str]:
    """'<file>: <secret's name>' for every file under `top` holding a secret."""
    found = []
    for root, _, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue  # (a socket)
            found += [f"{path}: {what}" for what, s in secrets.items() if s.encode() in data]
    return found


def command_lines_holding(secrets: dict[str, str]) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        found += [f"pid {pid}: {what}" for what, s in secrets.items() if s.encode() in argv]
    return found


def catalog_bodies(home: str) -> list[dict]:
    """Every catalog record, decoded (layers are compressed: a byte search
    alone could miss one)."""
    with Store.open(os.path.join(home, "store"), background=False) as store:
        return [decode_record(k, v) for k, v in store.timeline(CATALOG_ID).scan()]


def test_no_generated_password_or_token_is_kept_logged_or_shown(tmp_path):
    home = str(tmp_path / "home")
    secrets: dict[str, str] = {}
    try:
        strata(home, "up")
        db = strata(home, "db", "create", "app")  # the CLI
        secrets["db password"] = password_of(db["uri"])
        with Strata(home) as client:  # the SDK, over HTTP
            made = client.create_database("other")
            assert made.token is not None
            secrets["db token"] = made.token
            secrets["sdk password"] = password_of(made.uri)
            with Strata(home, token=made.token) as scoped:
                child = scoped.branch("other").create_branch("child")  # with the database's own token
                secrets["branch password"] = password_of(child.uri)
                secrets["minted password"] = password_of(scoped.branch("other/child").new_uri(ttl="1h"))
        secrets["cli minted password"] = password_of(strata(home, "uri", "app", "--ttl", "10m")["uri"])
        for what in ("db password", "cli minted password"):
            uri = db["uri"].replace(password_of(db["uri"]), secrets[what])
            assert sql(uri, "select 1") == [(1,)]
        assert sql(made.uri, "create table t as select 1 as x") == []
        for what in ("branch password", "minted password"):
            uri = child.uri.replace(password_of(child.uri), secrets[what])
            assert sql(uri, "select 1") == [(1,)]
        r = subprocess.run([*STRATA, "--home", home, "psql", "app",
                            "--", "-c", "select 42"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "42" in r.stdout, r.stderr  # (its password went by the environment)
        run_dir = run_dir_for(home)
        assert not files_holding(run_dir, secrets)  # compute logs and state, while they run
        assert not command_lines_holding(secrets)
        assert not command_lines_holding({"operator token": service.ensure_token(home)})
        strata(home, "down")
        strata(home, "up")  # a restart: recovery, the catalog read back, the migrations
        assert sql(made.uri, "select x from t") == [(1,)]
        strata(home, "down")
    finally:
        st = service.read_state(home)
        if st is not None:
            subprocess.run([*STRATA, "--home", home, "down"], capture_output=True)
    assert len(set(secrets.values())) == len(secrets)
    assert not files_holding(home, secrets)
    token = service.ensure_token(home)
    assert files_holding(home, {"operator token": token}) == [f"{home}/token: operator token"]
    bodies = catalog_bodies(home)
    text = repr(bodies)
    assert not [w for w, s in secrets.items() if s in text]
    verifiers = [c["verifier"] for b in bodies for c in b.get("credentials", ())]
    assert len(verifiers) >= 5 and all(v.startswith("SCRAM-SHA-256$4096:") for v in verifiers)
    assert not any("password" in b for b in bodies)


def test_a_catalog_with_plaintext_passwords_is_rewritten_and_its_uris_still_work(tmp_path):
    home = str(tmp_path)
    with Running(home) as r:
        db = r.cp.create_database("old")
        sql(db.uri, "create table t as select 5 as x")
        r.cp.create_branch("old", "b1")
    # as an older version wrote it: the database record holds its password,
    # the branches hold no credential
    legacy = "legacy-plaintext-pw"
    with Store.open(os.path.join(home, "store")) as store:
        tl = store.timeline(CATALOG_ID)
        batch = {}
        for key, value in tl.scan():
            body = decode_record(key, value)
            if key >> 56 == KIND_DATABASE:
                batch[key] = encode_record({**body, "password": legacy})
            elif "credentials" in body:
                batch[key] = encode_record({k: v for k, v in body.items() if k not in ("credentials", "salt")})
        tl.commit(batch)
        tl.sync()
    with Running(home) as r:
        for branch in ("main", "b1"):
            uri = (f"postgresql://postgres:{legacy}@127.0.0.1:{r.cp.proxy_port}/postgres"
                   f"?options=endpoint%3Dold.{branch}")
            assert sql(uri, "select x from t") == [(5,)], branch
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            sql(f"postgresql://postgres:wrong@127.0.0.1:{r.cp.proxy_port}/postgres?options=endpoint%3Dold.main",
                "select 1")
    bodies = catalog_bodies(home)
    assert not any("password" in b for b in bodies)
    assert legacy not in repr(bodies)
    assert sum(len(b.get("credentials", ())) for b in bodies) >= 2  # one per branch, from the password


def test_the_api_made_before_its_token_refuses_every_bearer_until_it_has_one():
    """The service's front end makes its API while the page server starts,
    and gets the operator token after: until then no bearer (the empty
    one included) is the operator's; once it has it, only that one is."""
    from fastapi.testclient import TestClient

    from pageserver.frontend.api import make_app

    class Control:
        def database_for_token(self, token):
            return None

        def status(self):
            return {"ok": True}

    box: list[str] = []
    client = TestClient(make_app(Control(), lambda: box[0] if box else ""))
    for bearer in ("", "anything", "s3cret"):
        assert client.get("/v1/status", headers={"Authorization": f"Bearer {bearer}"}).status_code == 401
    box.append("s3cret")
    assert client.get("/v1/status", headers={"Authorization": "Bearer anything"}).status_code == 401
    r = client.get("/v1/status", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json() == {"ok": True}
