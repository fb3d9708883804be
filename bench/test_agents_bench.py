"""The agents' interface, timed (issue: agents' own interface).

- 1,000 create / query / delete cycles through MCP (the SDK's own client,
  in process, on a real service through the proxy): `db_create`, a first
  `sql_query` (which wakes the database), `db_delete`; p50 and p99 of each
  and of the whole cycle. STRATA_BENCH_MCP_CYCLES sets how many.
- The CLI from a shell against a running service, next to the same calls
  through the SDK in process (the floor: no interpreter start): `strata db
  list`, and `strata db create` followed by a first query with psql.

Figures go to bench/results/latest.md (`report`).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import pytest
from mcp import Client

from pageserver.clients.mcp import Grant, build_server
from pageserver.clients.sdk import Strata
from tests.pg import pg_available, strata

from .conftest import report

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")
CYCLES = int(os.environ.get("STRATA_BENCH_MCP_CYCLES", "1000"))
CLI_ROUNDS = int(os.environ.get("STRATA_BENCH_CLI_ROUNDS", "30"))
STRATA_BIN = os.path.join(os.path.dirname(sys.executable), "strata")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = str(tmp_path_factory.mktemp("agents") / "home")
    # (1,000 cycles in two minutes are more creations than the default rate allows the operator's token)
    strata(h, "up", "--idle-timeout", "5", "--warm-pool", "1", "--creations-per-minute", "100000")
    try:
        yield h
    finally:
        strata(h, "down")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def test_mcp_create_query_delete_cycles(benchmark, home):
    client = Strata(home, start=False)
    server, tools = build_server(client, Grant(access="admin", max_ttl=3600))
    times: dict[str, list[float]] = {"db_create": [], "sql_query": [], "db_delete": [], "cycle": []}

    async def run() -> None:
        async with Client(server) as c:
            async def timed(name: str, **args: Any) -> Any:
                t0 = time.perf_counter()
                r = await c.call_tool(name, args)
                times[name].append(time.perf_counter() - t0)
                assert not r.is_error, r.content[0].text
                return r.structured_content

            for i in range(CYCLES):
                t0 = time.perf_counter()
                db = await timed("db_create", ttl="10m")
                rows = await timed("sql_query", database=db["database"], sql="select 1")
                assert rows["rows"] == [[1]]
                await timed("db_delete", database=db["database"])
                times["cycle"].append(time.perf_counter() - t0)
                if (i + 1) % 100 == 0:
                    print(f"{i + 1} cycles, p50 {statistics.median(times['cycle']) * 1e3:.0f} ms", flush=True)

    benchmark.pedantic(lambda: anyio.run(run), rounds=1, iterations=1)
    tools.close()
    client.close()
    for name, xs in times.items():
        report("agents", f"MCP {name} p50 ({CYCLES} cycles)", pct(xs, 0.5) * 1e3, "ms")
        report("agents", f"MCP {name} p99 ({CYCLES} cycles)", pct(xs, 0.99) * 1e3, "ms")
    print({k: (round(pct(v, 0.5) * 1e3, 1), round(pct(v, 0.99) * 1e3, 1)) for k, v in times.items()})


def _from_a_shell(line: str, rounds: int, env: dict[str, str], between: str = ":") -> list[float]:
    """`line` run `rounds` times by one bash, each timed by bash itself (as
    a user's shell starts it: not from this pytest process, whose size makes
    each fork dearer); `between` runs untimed after each."""
    script = (f'for i in $(seq {rounds}); do s=$(date +%s%N); {line}; e=$(date +%s%N); '
              f'echo $(( (e - s) / 1000 )) >&3; {between}; done 3>&1 >/dev/null')
    out = subprocess.run(["bash", "-c", script], check=True, env=env, capture_output=True, text=True,
                         timeout=60 * rounds).stdout
    return [int(x) / 1e6 for x in out.split()]


def test_the_cli_from_a_shell_next_to_the_sdk(benchmark, home):
    """One CLI call at a time on a quiet service, timed by the shell that
    runs it; then create and a first query as one shell line, the database
    deleted after each (untimed) and a second for the spare compute to be
    made again, as between an agent's steps."""
    env = {**os.environ, "STRATA_HOME": home}
    psql = shutil.which("psql") or "/usr/bin/psql"
    client = Strata(home, start=False)
    time.sleep(3)  # (the module's MCP cycles' computes wind down)
    sdk_list, sdk_first = [], []
    for _ in range(CLI_ROUNDS):
        t0 = time.perf_counter()
        client.call("GET", "/databases")
        sdk_list.append(time.perf_counter() - t0)
    cli_list = _from_a_shell(f"{STRATA_BIN} db list", CLI_ROUNDS, env)
    help_times = _from_a_shell(f"{STRATA_BIN} --help", CLI_ROUNDS, env)
    for _ in range(CLI_ROUNDS):
        t0 = time.perf_counter()
        db = client.create_database(ttl="10m")
        db.sql("select 1")
        sdk_first.append(time.perf_counter() - t0)
        db.delete()
        time.sleep(1)
    name = 'db-$(echo "$u" | sed "s/.*endpoint%3Ddb-//; s/[.].*//")'
    cli_first = _from_a_shell(
        f'u=$({STRATA_BIN} db create --ttl 10m 2>/dev/null) && {psql} -Atqc "select 1" "$u"',
        CLI_ROUNDS, env, between=f'{STRATA_BIN} db delete "{name}"; sleep 1')
    benchmark.pedantic(lambda: client.call("GET", "/databases"), rounds=CLI_ROUNDS)  # (the SDK's floor)
    client.close()
    for what, xs, target in (("strata db list", cli_list, "< 100 ms"), ("SDK GET /databases", sdk_list, ""),
                             ("strata db create + psql select 1", cli_first, "< 250 ms"),
                             ("SDK create_database + sql", sdk_first, ""), ("strata --help", help_times, "")):
        ok = None if not target else pct(xs, 0.5) * 1e3 < float(target.split()[1])
        report("agents", f"{what} p50", pct(xs, 0.5) * 1e3, "ms", target, ok)
        report("agents", f"{what} p99", pct(xs, 0.99) * 1e3, "ms")
    print({"cli_list": pct(cli_list, 0.5), "sdk_list": pct(sdk_list, 0.5), "cli_first": pct(cli_first, 0.5),
           "sdk_first": pct(sdk_first, 0.5), "help": pct(help_times, 0.5)})
