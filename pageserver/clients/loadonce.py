"""Load once, branch per run: identical starting data for every run of a
benchmark without reloading it.

    from pageserver.clients.loadonce import load_once
    report = load_once(Strata(), base="tpcb", load="pgbench -i -s 50 $DATABASE_URL",
                       workload="pgbench -T 60 -c 4 $DATABASE_URL", runs=5)

The base database is loaded by `load` (a shell command that gets its URI in
$DATABASE_URL) only if it does not exist yet. Only once the load has
succeeded does the base get its branch `loaded` (O(1)), and runs branch
from that: a base without it was interrupted while loading (Ctrl-C, a
crash), so it is deleted and loaded again, never run on half loaded. Every
run gets a fresh branch (O(1)), runs `workload` on it, and the branch is
deleted. Each run records its wall time, the figures pgbench prints (tps,
latency) and, unless turned off, a checksum of every table at the start of
the run, so that identical starting data is checked, not assumed. The load
time is kept with the base (`<home>/loadonce/<base>.json`), so that runs
on a base loaded earlier still say how much loading they saved.
`strata bench` is the command line over this.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from tqdm import tqdm

from pageserver.clients.sdk import Database, Strata
from pageserver.errors import BadRequestError, UnknownObjectError

LOADED = "loaded"  # the base's branch that says its load succeeded (and that runs branch from)

_FIGURES = {
    "tps": re.compile(r"^tps = ([0-9.]+)", re.M),
    "latency_ms": re.compile(r"^latency average = ([0-9.]+) ms", re.M),
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
}


@dataclass
class Run:
    index: int
    branch: str
    seconds: float
    returncode: int
    figures: dict[str, float]
    checksum: str | None
    output: str = field(repr=False)


@dataclass
class Report:
    base: str
    loaded_now: bool
    load_seconds: float
    runs: list[Run]

    @property
    def load_seconds_saved(self) -> float:
        """Loading the base for every run instead, minus what loading it cost now."""
        return self.load_seconds * (len(self.runs) - (1 if self.loaded_now else 0))

    @property
    def identical_start(self) -> bool | None:
        sums = {r.checksum for r in self.runs}
        return None if None in sums else len(sums) == 1

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "loaded_now": self.loaded_now, "load_seconds": self.load_seconds,
                "load_seconds_saved": self.load_seconds_saved, "identical_start": self.identical_start,
                "runs": [{k: v for k, v in asdict(r).items() if k != "output"} for r in self.runs]}


def table_checksum(uri: str) -> str:
    """md5 over every user table's rows (order-independent within a table)."""
    with psycopg.connect(uri, autocommit=True) as conn:
        tables = conn.execute(
            "select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema') "
            "and n.nspname not like 'pg_toast%' order by 1, 2").fetchall()
        parts = []
        for schema, table in tables:
            q = sql.SQL("select count(*), coalesce(md5(string_agg(md5(t::text), '' order by md5(t::text))), '') "
                        "from {} t").format(sql.Identifier(schema, table))
            n, digest = conn.execute(q).fetchone()  # type: ignore[misc]
            parts.append(f"{schema}.{table}:{n}:{digest}")
        row = conn.execute("select md5(%s)", ("\n".join(parts),)).fetchone()
        return str(row[0]) if row else ""


def run_with_url(cmd: str, uri: str, cwd: str | None = None) -> tuple[int, str, float]:
    """Run a shell command with the database's URI in $DATABASE_URL (as
    migration tools and pgbench take it): (exit status, output, seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, shell=True, env={**os.environ, "DATABASE_URL": uri}, capture_output=True, text=True,
                       cwd=cwd)
    return r.returncode, r.stdout + r.stderr, time.perf_counter() - t0


def _record_path(client_home: str | None, base: str) -> str | None:
    if client_home is None:
        return None
    return os.path.join(client_home, "loadonce", f"{base}.json")


def load_once(
    client: Strata, *, base: str, load: str | None, workload: str, runs: int, checksum: bool = True,
    keep: bool = False, ttl: str = "1h", home: str | None = None, progress: bool | None = None,
) -> Report:
    if runs < 1:
        raise BadRequestError(f"runs must be at least 1, got {runs}")
    record = _record_path(home, base)
    loaded_now = False
    load_seconds = 0.0
    db: Database | None
    try:
        db = client.database(base)
    except UnknownObjectError:
        db = None
    if db is not None:
        has_record = bool(record and os.path.exists(record))
        if has_record:
            assert record is not None
            with open(record) as f:
                load_seconds = float(json.load(f)["load_seconds"])
        if LOADED not in [b.name for b in db.branches()]:
            if has_record:  # loaded by an earlier Strata, before the mark: mark it now
                db.create_branch(LOADED)
            else:
                print(f"strata: base {base!r} was not loaded to the end (interrupted?): loading it again",
                      file=sys.stderr)
                db.delete()
                db = None
    if db is None:
        if not load:
            raise BadRequestError(f"database {base!r} does not exist and no load command was given") from None
        db = client.create_database(base)
        code, out, load_seconds = run_with_url(load, db.uri)
        if code != 0:
            db.delete()
            raise BadRequestError(f"loading {base!r} failed: `{load}` exited with {code}:\n{out[-2000:]}")
        db.create_branch(LOADED)  # the mark: loaded to the end
        db.suspend()
        loaded_now = True
        if record:
            os.makedirs(os.path.dirname(record), exist_ok=True)
            with open(record, "w") as f:
                json.dump({"load": load, "load_seconds": load_seconds}, f)
    done: list[Run] = []
    bar = tqdm(range(runs), desc=f"runs on branches of {base}", unit="run",
               disable=not (progress if progress is not None else os.isatty(2)))
    for i in bar:
        br = client.branch(f"{base}/{LOADED}").create_branch(f"run-{i}-{secrets.token_hex(3)}", ttl=ttl)
        try:
            digest = table_checksum(br.uri) if checksum else None
            code, out, seconds = run_with_url(workload, br.uri)
            figures = {k: float(m.group(1)) for k, rx in _FIGURES.items() if (m := rx.search(out))}
            done.append(Run(i, f"{base}/{br.name}", seconds, code, figures, digest, out))
            bar.set_postfix({k: v for k, v in figures.items() if k == "tps"})
        finally:
            if not keep:
                br.delete()
    return Report(base, loaded_now, load_seconds, done)
