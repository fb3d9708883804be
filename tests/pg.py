"""Helpers for tests that run real PostgreSQL on the page server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from pageserver.compute.postgres import Compute, pg_bindir
from pageserver.control.plane import ControlPlane
from pageserver.proxy.server import ProxyLimits, ProxyThread


def fuse_available() -> str | None:
    """Why tests that mount FUSE cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (FUSE mounts with allow_other, postgres runs as the postgres user)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "needs /dev/fuse and fusermount3 (apt: fuse3); `make test` installs them"
    return None


def pg_available() -> str | None:
    """Why PostgreSQL-on-FUSE tests cannot run here (None: they can)."""
    why = fuse_available()
    if why is not None:
        return why
    try:
        pg_bindir()
    except Exception as e:  # noqa: BLE001
        return f"needs PostgreSQL server binaries: {e}"
    return None


# A test marked so is skipped where its prerequisite is missing, except
# under CI (CI=true), where it fails with the reason: CI runs everything
# (tests/conftest.py, pytest_runtest_setup).
def root_available() -> str | None:
    return None if os.geteuid() == 0 else "needs root (to hand a file to another user)"


def memory_cgroup_available() -> str | None:
    from pageserver.compute.cgroup import MemoryCgroups

    if os.geteuid() != 0:
        return "needs root (to make memory cgroups)"
    cg = MemoryCgroups("strata-probe")
    try:
        return None if cg.version else f"needs a memory cgroup: {cg.why_not}"
    finally:
        cg.close()


def ceph_available() -> str | None:
    from .s3servers import ceph_missing

    return ceph_missing()


PREREQUISITES = {"pg": pg_available, "fuse": fuse_available, "root": root_available,
                 "memory-cgroup": memory_cgroup_available, "ceph": ceph_available}
requires_pg = pytest.mark.needs("pg")
requires_root = pytest.mark.needs("root")
requires_fuse = pytest.mark.needs("fuse")


@dataclass
class ProxyTarget:
    """A branch reached through the service's proxy, usable wherever these
    helpers take a Compute (libpq tools route by $PGOPTIONS)."""

    port: int
    password: str
    endpoint: str

    def uri(self, dbname: str = "postgres") -> str:
        return (f"postgresql://postgres:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{dbname}"
                f"?options=endpoint%3D{self.endpoint}")


def env_for(c: Compute | ProxyTarget) -> dict[str, str]:
    """libpq's environment for a compute (its Unix socket: no password, only
    root and postgres reach it) or a branch behind the proxy (TCP, with the
    branch's password)."""
    env = dict(os.environ, PGPORT=str(c.port), PGUSER="postgres", PGDATABASE="postgres")
    env.pop("PGPASSWORD", None)
    if isinstance(c, ProxyTarget):
        env.update(PGHOST="127.0.0.1", PGPASSWORD=c.password, PGOPTIONS=f"endpoint={c.endpoint}")
    else:
        env["PGHOST"] = c.socket_dir
    return env


def run_pg(tool: str, c: Compute | ProxyTarget, *args: str, check: bool = True, cwd: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([os.path.join(pg_bindir(), tool), *args], env=env_for(c), capture_output=True,
                       text=True, cwd=cwd, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def query(c: Compute | ProxyTarget, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(c.uri(), autocommit=True, connect_timeout=30) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


def pgbench_invariants(c: Compute | ProxyTarget) -> tuple[int, int, int, int]:
    """(sum of account, teller, branch balances, sum of history deltas)."""
    (row,) = query(c, """
        select (select sum(abalance) from pgbench_accounts),
               (select sum(tbalance) from pgbench_tellers),
               (select sum(bbalance) from pgbench_branches),
               (select coalesce(sum(delta), 0) from pgbench_history)""")
    return tuple(int(x) for x in row)  # type: ignore[return-value]


def assert_invariants(c: Compute | ProxyTarget) -> None:
    a, t, b, h = pgbench_invariants(c)
    assert a == t == b == h, f"pgbench invariant broken: accounts {a}, tellers {t}, branches {b}, history {h}"


def amcheck(c: Compute | ProxyTarget) -> None:
    r = run_pg("pg_amcheck", c, "--heapallindexed", "--install-missing", "--database=postgres", check=False)
    assert r.returncode == 0, f"pg_amcheck found problems:\n{r.stdout}\n{r.stderr}"


def committed_in_log(logdir: str) -> int:
    """Transactions pgbench logged as done (-l), failed ones left out."""
    n = 0
    for name in os.listdir(logdir):
        if name.startswith("pgbench_log"):
            with open(os.path.join(logdir, name)) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[2] not in ("failed", "skipped"):
                        n += 1
    return n


STRATA = [sys.executable, "-m", "pageserver.clients.cli"]


def sql(uri: str, query: str) -> list[tuple[Any, ...]]:
    """One statement on `uri` (autocommit): its rows, or [] if it returns none."""
    with psycopg.connect(uri, autocommit=True, connect_timeout=60) as conn:
        cur = conn.execute(query)  # type: ignore[call-overload]
        return cur.fetchall() if cur.description else []


def strata(home: str, *args: str, check: bool = True) -> dict[str, Any]:
    """Run `strata ... --json` on a home: its one JSON object (the error
    object, on stderr, when it fails and `check` is off)."""
    r = subprocess.run([*STRATA, "--home", home, *args, "--json"], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"strata {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    out = r.stdout if r.returncode == 0 else r.stderr
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # one JSON object
    result: dict[str, Any] = json.loads(lines[0])
    return result



class Clock:
    """Wall-clock time, which a test can move forward (`clock.now += 60`);
    `clock.monotonic` moves with it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    @property
    def now(self) -> float:
        return self()

    @now.setter
    def now(self, value: float) -> None:
        self.offset += value - self()


class Running:
    """A control plane on a movable clock, with its proxy in a thread; a
    context manager that closes both."""

    def __init__(self, home: str, *, proxy_limits: ProxyLimits | None = None, **kw: object) -> None:
        self.clock = Clock()
        self.cp = ControlPlane(home, clock=self.clock, monotonic=self.clock.monotonic, **kw).open()  # type: ignore[arg-type]
        self.proxy = ProxyThread(self.cp, limits=proxy_limits)

    def close(self) -> None:
        self.proxy.close()
        self.cp.close()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
