"""Load once, branch per run (pageserver/loadonce.py and `strata bench`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pageserver.clients.loadonce import load_once, table_checksum
from pageserver.clients.sdk import Strata
from pageserver.errors import BadRequestError
from pageserver.service import daemon as service

from .pg import requires_pg

pytestmark = requires_pg
LOAD = 'pgbench -i -s 1 -q "$DATABASE_URL"'
WORK = 'pgbench -t 100 -c 2 "$DATABASE_URL"'


def test_every_run_starts_from_identical_data(tmp_path):
    home = str(tmp_path / "home")
    try:
        client = Strata(home)
        rep = load_once(client, base="tpcb", load=LOAD, workload=WORK, runs=3, home=home, progress=False)
        assert rep.loaded_now and rep.load_seconds > 0
        assert [r.returncode for r in rep.runs] == [0, 0, 0], rep.runs[0].output
        assert all(r.figures["tps"] > 0 and r.figures["transactions"] == 200 for r in rep.runs)
        assert rep.identical_start is True
        assert table_checksum(client.database("tpcb").uri) == rep.runs[0].checksum  # the base is untouched
        assert rep.load_seconds_saved == pytest.approx(2 * rep.load_seconds)

        kept = load_once(client, base="tpcb", load="false", workload=WORK, runs=1, keep=True, home=home,
                         progress=False)  # reuses the base: the failing load command never runs
        assert not kept.loaded_now and kept.load_seconds == rep.load_seconds
        assert kept.runs[0].checksum == rep.runs[0].checksum
        after = table_checksum(client.branch(kept.runs[0].branch).uri)
        assert after != kept.runs[0].checksum  # the workload changed its branch: the checksum sees it
        client.branch(kept.runs[0].branch).delete()
        assert sorted(b.name for b in client.database("tpcb").branches()) == ["loaded", "main"]

        out = subprocess.run([sys.executable, "-m", "pageserver.clients.cli", "--home", home, "bench", "tpcb",
                              "--run", WORK, "--runs", "2", "--json"], capture_output=True, text=True, check=True)
        report = json.loads(out.stdout)
        assert report["identical_start"] is True and len(report["runs"]) == 2
        assert report["runs"][0]["checksum"] == rep.runs[0].checksum

        with pytest.raises(BadRequestError, match="no load command"):
            load_once(client, base="missing", load=None, workload=WORK, runs=1, home=home)
        with pytest.raises(BadRequestError, match="exited with 1"):
            load_once(client, base="broken", load="exit 1", workload=WORK, runs=1, home=home)
        assert "broken" not in [d.database for d in client.databases()]  # nothing left half-made
    finally:
        service.stop(home)


def test_a_base_whose_load_was_interrupted_is_loaded_again(tmp_path):
    home = str(tmp_path / "home")
    try:
        client = Strata(home)
        half = client.create_database("tpcb")  # as a load killed half way leaves it
        half.sql("create table pgbench_accounts (aid int)")
        half.sql("insert into pgbench_accounts select generate_series(1, 10)")
        rep = load_once(client, base="tpcb", load=LOAD, workload=WORK, runs=1, home=home, progress=False)
        assert rep.loaded_now  # not reused half loaded: deleted and loaded to the end
        assert rep.runs[0].returncode == 0 and rep.runs[0].figures["transactions"] == 100 * 2
        assert client.branch("tpcb/loaded").sql("select count(*) from pgbench_accounts") == [(100_000,)]
        again = load_once(client, base="tpcb", load="false", workload=WORK, runs=1, home=home, progress=False)
        assert not again.loaded_now and again.runs[0].checksum == rep.runs[0].checksum
    finally:
        service.stop(home)
