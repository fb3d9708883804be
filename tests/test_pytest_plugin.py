"""The pytest plugin, run as users run it: the example suite in
examples/pytest in a pytest of its own, alone and under pytest-xdist, with
--strata-keep-failed, and with bad configuration."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import psycopg
import pytest

from pageserver.clients.sdk import Strata
from pageserver.service import daemon as service

from .pg import requires_pg

pytestmark = requires_pg
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "pytest")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = str(tmp_path_factory.mktemp("plugin-home"))
    yield h
    service.stop(h)  # if a run left it up (kept branches), or failed


def run_suite(home: str, tmp_path, *args: str, env: dict[str, str] | None = None, ini: str | None = None):
    suite = tmp_path / "suite"
    shutil.copytree(EXAMPLE, suite)
    if ini is not None:
        (suite / "pytest.ini").write_text(ini)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite), *args],
        capture_output=True, text=True, timeout=600, cwd=str(suite),
        env={**os.environ, "STRATA_HOME": home, **(env or {})},
    )
    return r, r.stdout + r.stderr


def test_tests_that_commit_drop_and_break_do_not_affect_one_another(home, tmp_path):
    r, out = run_suite(home, tmp_path)
    assert r.returncode == 0, out
    assert re.search(r"\b6 passed, 1 skipped\b", out), out
    assert service.read_state(home) is None  # it started the service, and stopped it


def test_under_xdist_one_seed_and_a_branch_per_test(home, tmp_path):
    log = tmp_path / "seeds.log"
    ini = ("[pytest]\nstrata_seed_cmd = psql -q -v ON_ERROR_STOP=1 \"$DATABASE_URL\" -f seed.sql "
           f"&& echo seeded >> {log}\n")
    r, out = run_suite(home, tmp_path, "-n", "2", ini=ini)
    assert r.returncode == 0, out
    assert re.search(r"\b6 passed, 1 skipped\b", out), out
    assert log.read_text().splitlines() == ["seeded"]  # once, for both workers
    assert service.read_state(home) is None


def test_keep_failed_keeps_exactly_the_failed_tests_branches(home, tmp_path):
    r, out = run_suite(home, tmp_path, "--strata-keep-failed", env={"STRATA_EXAMPLE_FAIL": "1"})
    assert r.returncode == 1, out
    assert re.search(r"\b1 failed, 6 passed\b", out), out
    kept = re.findall(r"strata psql (\S+)", out)
    assert len(kept) == 1 and "test_fails_on_purpose" in out.split("branches kept for failed tests")[1], out
    uri = re.search(r"psql '(postgresql://\S+)'", out).group(1)
    with psycopg.connect(uri) as conn:  # the state the failed test left
        assert conn.execute("select name from customers where id = 999").fetchone() == ("left by a failed test",)
    db, _ = kept[0].split("/")
    with Strata(home, start=False) as client:
        names = [b["name"] for b in client.call("GET", f"/databases/{db}/branches")]
        assert names == ["main", kept[0].split("/")[1]]  # every passing test's branch is gone
        client.database(db).delete()
    service.stop(home)


def test_a_failing_seed_ends_the_session_early(home, tmp_path):
    r, out = run_suite(home, tmp_path, ini="[pytest]\nstrata_seed_cmd = echo 'migration 7 failed' >&2; exit 4\n")
    assert r.returncode == 3, out
    assert "seeding the base database failed" in out and "migration 7 failed" in out, out
    assert "passed" not in out and out.count("seeding the base database failed") == 1, out


def test_an_unreachable_service_ends_the_session_early(home, tmp_path):
    r, out = run_suite(home, tmp_path, env={"STRATA_URL": "http://127.0.0.1:9", "STRATA_TOKEN": "x"})
    assert r.returncode == 3, out
    assert "cannot reach or start the service" in out and "127.0.0.1:9" in out, out


def test_the_plugin_is_registered():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("strata") == "pageserver.clients.pytest_plugin"
