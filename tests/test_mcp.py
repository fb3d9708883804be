"""`strata mcp`, end to end through the MCP SDK's own client: in process
against a real service (real PostgreSQL through the proxy), and over
stdio against `strata mcp` itself. Grants, the catalog and its token
budget, bounded results, migrations, elicitation, TTLs, idempotency."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import ElicitResult

from pageserver.clients import mcp as mcp_module
from pageserver.clients.mcp import TOOLS, Grant, GrantError, build_server, token_budget
from pageserver.clients.sdk import Strata

from .pg import requires_pg, sql, strata

pytestmark = requires_pg

WRITE_TOOLS = {t for t, (least, _, _) in TOOLS.items() if least != "read-only"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = str(tmp_path_factory.mktemp("mcp") / "home")
    strata(h, "up", "--idle-timeout", "30")
    try:
        yield h
    finally:
        strata(h, "down")


@pytest.fixture(scope="module")
def client(home):
    c = Strata(home, start=False)
    yield c
    c.close()


def call(client: Strata, grant: Grant, steps: Callable[[Any], Any], *,
         elicit: Callable[[Any, Any], Any] | None = None, setup: Callable[[Any], None] | None = None) -> Any:
    """Run `steps(session)` on an in-process MCP client of a server with `grant`."""
    server, tools = build_server(client, grant)
    if setup is not None:
        setup(tools)

    async def main() -> Any:
        async with Client(server, elicitation_callback=elicit) as c:
            return await steps(c)

    try:
        return anyio.run(main)
    finally:
        tools.close()


async def tool(c: Any, name: str, /, **args: Any) -> Any:
    r = await c.call_tool(name, args)
    if r.is_error:
        raise AssertionError(f"{name}: {r.content[0].text}")
    return r.structured_content


async def refused(c: Any, name: str, /, **args: Any) -> str:
    r = await c.call_tool(name, args)
    assert r.is_error, f"{name} was not refused: {r.structured_content}"
    return str(r.content[0].text)


def test_the_catalog_lists_what_the_grant_allows_with_annotations_within_its_token_budget(client):
    async def listed(c: Any) -> list[Any]:
        return list((await c.list_tools()).tools)

    admin = call(client, Grant(access="admin"), listed)
    assert {t.name for t in admin} == set(TOOLS)
    for t in admin:
        least, ann, _ = TOOLS[t.name]
        assert t.output_schema and t.output_schema.get("type") == "object", t.name
        assert (t.annotations.read_only_hint, t.annotations.destructive_hint) == (
            ann.read_only_hint, ann.destructive_hint), t.name
    assert {t.name for t in admin if t.annotations.read_only_hint} == {
        t for t, (least, _, _) in TOOLS.items() if least == "read-only"}
    budget = token_budget(admin)
    print(f"\ncatalog: {budget}")
    assert budget["tokens_bytes_3_5"] < 2500, budget
    ro = call(client, Grant(access="read-only"), listed)
    assert {t.name for t in ro} == set(TOOLS) - WRITE_TOOLS
    rw = call(client, Grant(access="read-write"), listed)
    assert {t.name for t in rw} == set(TOOLS) - {"db_delete"}


def test_grants_refuse_unknown_and_wider_settings():
    with pytest.raises(GrantError, match="unknown grant setting.*readonly"):
        Grant.parse({"readonly": "true"})  # (a typo is an error, never a silent read-write)
    with pytest.raises(GrantError, match="access must be"):
        Grant.parse({"access": "read_only"})
    narrow = Grant.parse({"database": "shop*", "access": "read-only", "max_ttl": "1h"})
    assert (narrow.database, narrow.access, narrow.max_ttl) == ("shop*", "read-only", 3600.0)
    assert Grant.parse({"database": "shop1"}, narrow).database == "shop1"
    for wider in ({"access": "read-write"}, {"database": "other"}, {"database": "*"}, {"max_ttl": "2h"}):
        with pytest.raises(GrantError, match="wider|longer"):
            Grant.parse(wider, narrow)


def test_a_read_only_grant_hides_writes_and_postgresql_refuses_a_smuggled_one(client):
    owner = client.create_database("ro-shop", ttl="1h")
    sql(owner.uri, "create table t(id int primary key)")
    sql(owner.uri, "insert into t values (1)")
    sql(owner.uri, "create function w() returns int language sql as 'insert into t values (99) returning 1'")

    async def steps(c: Any) -> dict[str, Any]:
        out = {"read": await tool(c, "sql_query", database="ro-shop", sql="select id from t")}
        out["exec"] = await refused(c, "sql_exec", database="ro-shop", statements=["delete from t"])
        for smuggled in ("select w()", "select 1; delete from t",
                         "with d as (delete from t returning id) select * from d"):
            out[smuggled] = await refused(c, "sql_query", database="ro-shop", sql=smuggled)
        out["uri"] = await tool(c, "connection_string", database="ro-shop")
        out["other"] = await refused(c, "sql_query", database="elsewhere", sql="select 1")
        return out

    out = call(client, Grant(database="ro-*", access="read-only"), steps)
    assert out["read"]["rows"] == [[1]] and out["read"]["truncated"] is False
    assert "Unknown tool" in out["exec"] or "sql_exec" in out["exec"]
    assert "read-only transaction" in out["select w()"]
    assert out["uri"]["readonly"] and out["uri"]["uri"].startswith("postgresql://strata_readonly:")
    with psycopg.connect(out["uri"]["uri"], autocommit=True) as conn, pytest.raises(psycopg.Error):
        conn.execute("set default_transaction_read_only = off")
        conn.execute("insert into t values (2)")
    assert "outside this server's grant" in out["other"]
    assert sql(owner.uri, "select id from t order by id") == [(1,)]
    owner.delete()


@pytest.mark.parametrize("n", [5, 6])
def test_truncation_is_exact_at_n_and_n_plus_one_rows_and_the_cursor_continues(client, n):
    db = client.create_database(f"trunc{n}", ttl="1h")
    sql(db.uri, f"create table t as select g as id, repeat('x', 10) as pad from generate_series(1, {n}) g")

    async def steps(c: Any) -> list[dict[str, Any]]:
        pages = [await tool(c, "sql_query", database=f"trunc{n}", sql="select id from t order by id", max_rows=5)]
        while pages[-1]["cursor"]:
            pages.append(await tool(c, "sql_query", database=f"trunc{n}", cursor=pages[-1]["cursor"], max_rows=5))
        small = await tool(c, "sql_query", database=f"trunc{n}", sql="select id, pad from t order by id",
                           max_rows=100)
        return [*pages, small]

    *pages, small = call(client, Grant(), steps, setup=lambda tools: setattr(tools, "max_bytes", 256))
    assert [r[0] for p in pages for r in p["rows"]] == list(range(1, n + 1))
    assert pages[0]["truncated"] == (n > 5) and len(pages) == (2 if n > 5 else 1)
    assert pages[-1]["truncated"] is False and pages[-1]["cursor"] is None
    assert len(json.dumps(small["rows"])) <= 256 + 40 and small["truncated"] is (len(small["rows"]) < n)
    db.delete()


def test_migrations_are_tested_on_a_branch_and_applied_only_as_tested_on_an_unmoved_base(client, monkeypatch):
    db = client.create_database("mig", ttl="1h")
    sql(db.uri, "create table items(id int primary key, name text)")
    sql(db.uri, "insert into items select g, 'n' || g from generate_series(1, 1000) g")
    migration = "alter table items add column price int not null default 0; delete from items where id > 990"

    async def steps(c: Any) -> dict[str, Any]:
        out = {"test": await tool(c, "migration_test", database="mig", sql=migration,
                                  checks=["select count(*) = 990 from items", "select count(*) = 0 from items"])}
        out["failed"] = await refused(c, "migration_apply", migration_id=out["test"]["migration_id"])
        good = await tool(c, "migration_test", database="mig", sql=migration,
                          checks=["select count(*) = 990 from items"])
        out["tampered"] = await refused(c, "migration_apply", migration_id=good["migration_id"],
                                        sql=migration + "; drop table items")
        sql(db.uri, "insert into items values (5000, 'late')")  # the base moves
        out["moved"] = await refused(c, "migration_apply", migration_id=good["migration_id"])
        monkeypatch.setattr(mcp_module, "LOCK_WARN_BYTES", 8192)  # (items, ~100 KB, is now "large")
        out["locked"] = await tool(c, "migration_test", database="mig", sql=migration)
        monkeypatch.undo()
        again = await tool(c, "migration_test", database="mig", sql=migration,
                           checks=["select count(*) = 990 from items"])
        out["applied"] = await tool(c, "migration_apply", migration_id=again["migration_id"])
        return out

    out = call(client, Grant(), steps)
    t = out["test"]
    assert [c["passed"] for c in t["checks"]] == [True, False] and t["ok"] is False
    assert "price" in t["schema_diff"] and t["row_counts"]["public.items"] == [1000, 990]
    assert t["lock_warnings"] == []  # (a 1,000-row table is below the warning size)
    assert [w.split(" (")[0] for w in out["locked"]["lock_warnings"]] == ["ACCESS EXCLUSIVE on items"]
    assert "failed its test" in out["failed"]
    assert "not the SQL" in out["tampered"] and "changed since" in out["moved"]
    assert [(s["status"], s["rows_affected"]) for s in out["applied"]["statements"]] == [
        ("ALTER TABLE", 0), ("DELETE 11", 11)]
    assert sql(db.uri, "select count(*), min(price), max(id) from items") == [(990, 0, 990)]
    db.delete()


def test_a_protected_branch_is_deleted_only_when_the_human_says_yes(client):
    db = client.create_database("guarded", ttl="1h")
    db.branch("keep", protected=True, ttl="1h")
    asked: list[str] = []

    def human(answer: str) -> Callable[[Any, Any], Any]:
        async def elicit(context: Any, params: Any) -> ElicitResult:
            asked.append(params.message)
            return ElicitResult(action=answer, content={"confirm": True} if answer == "accept" else None)
        return elicit

    async def delete(c: Any) -> dict[str, Any]:
        return await tool(c, "branch_delete", database="guarded", branch="keep")

    declined = call(client, Grant(), delete, elicit=human("decline"))
    assert "nothing changed" in declined["done"] and "protected" in asked[0]
    assert client.branch("guarded/keep").refresh()["protected"] is True
    done = call(client, Grant(), delete, elicit=human("accept"))
    assert "delete done" in done["done"] and len(asked) == 2
    assert "keep" not in [b.name for b in db.branches()]
    # a database with a protected branch: the same question, for the whole database
    db.branch("again", protected=True, ttl="1h")

    async def drop(c: Any) -> dict[str, Any]:
        return await tool(c, "db_delete", database="guarded")

    assert "nothing changed" in call(client, Grant(access="admin"), drop, elicit=human("cancel"))["done"]
    assert "again" in [b.name for b in db.branches()] and "again" in asked[2]
    assert "deleted" in call(client, Grant(access="admin"), drop, elicit=human("accept"))["done"]
    assert "guarded" not in [d.database for d in client.databases()]


def test_ttls_follow_the_grant_and_creates_are_idempotent(client):
    db = client.create_database("ttl", ttl="1h")

    async def steps(c: Any) -> dict[str, Any]:
        out = {"none": await refused(c, "branch_create", database="ttl", name="a")}
        out["long"] = await refused(c, "branch_create", database="ttl", name="a", ttl="2h")
        out["forever"] = await refused(c, "branch_create", database="ttl", name="a", persistent=True)
        out["a"] = await tool(c, "branch_create", database="ttl", name="a", ttl="30m", idempotency_key="k1")
        out["again"] = await tool(c, "branch_create", database="ttl", name="a", ttl="30m", idempotency_key="k1")
        out["reused"] = await refused(c, "branch_create", database="ttl", name="b", ttl="30m", idempotency_key="k1")
        out["db1"] = await tool(c, "db_create", ttl="10m", idempotency_key="d")
        out["db2"] = await tool(c, "db_create", ttl="10m", idempotency_key="d")
        return out

    out = call(client, Grant(max_ttl=3600), steps)
    assert "needs a ttl" in out["none"] and "longer" in out["long"] and "caps TTLs" in out["forever"]
    assert out["a"]["expires_at"] and out["again"]["branch"] == "a" and "another call" in out["reused"]
    assert out["db1"]["database"] == out["db2"]["database"]
    assert sql(out["db2"]["uri"], "select 1") == [(1,)]
    assert len([b for b in db.branches() if b.name == "a"]) == 1
    client.database(out["db1"]["database"]).delete()
    db.delete()


def test_stdio_strata_mcp_serves_a_read_only_grant(home, client):
    db = client.create_database("stdio-db", ttl="1h")
    sql(db.uri, "create table t as select 1 as x")
    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "pageserver.clients.cli", "--home", home, "mcp", "--access", "read-only", "--database", "stdio-*"],
        env={**os.environ})

    async def main() -> tuple[set[str], Any]:
        async with Client(params) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            return names, await tool(c, "sql_query", database="stdio-db", sql="select x from t")

    names, rows = anyio.run(main)
    assert names == set(TOOLS) - WRITE_TOOLS and rows["rows"] == [[1]]
    db.delete()


def test_streamable_http_needs_its_token_and_query_parameters_only_narrow_the_grant(home, client):
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "t0k3n-" + os.urandom(8).hex()
    proc = subprocess.Popen([sys.executable, "-m", "pageserver.clients.cli", "--home", home, "mcp", "--http",
                             str(port), "--access", "read-write"], env={**os.environ, "STRATA_MCP_TOKEN": token},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(base, method="POST", data=b"{}"), timeout=5)
            except urllib.error.HTTPError as e:
                assert e.code == 401, e.code  # up, and no token: refused
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        db = client.create_database("http-db", ttl="1h")
        db.branch("keep", protected=True, ttl="1h")

        def wrong(query: str) -> tuple[int, str]:
            req = urllib.request.Request(base + query, method="POST", data=b"{}",
                                         headers={"Authorization": f"Bearer {token}"})
            try:
                urllib.request.urlopen(req, timeout=10)
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            raise AssertionError(f"{query} was served")

        assert wrong("?access=admin")[0] == 400 and "wider" in wrong("?access=admin")[1]
        assert "unknown grant setting" in wrong("?read_only=true")[1]

        async def decline(context: Any, params: Any) -> ElicitResult:
            return ElicitResult(action="decline")

        async def main(query: str) -> tuple[set[str], Any]:
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
            async with http, Client(streamable_http_client(base + query, http_client=http),
                                    elicitation_callback=decline) as c:
                names = {t.name for t in (await c.list_tools()).tools}
                if "branch_delete" in names:
                    return names, await tool(c, "branch_delete", database="http-db", branch="keep")
                return names, await tool(c, "sql_query", database="http-db", sql="select 1")

        ro_names, rows = anyio.run(main, "?access=read-only&database=http-*")
        assert ro_names == set(TOOLS) - WRITE_TOOLS and rows["rows"] == [[1]]
        rw_names, declined = anyio.run(main, "")
        assert rw_names == set(TOOLS) - {"db_delete"} and "nothing changed" in declined["done"]
        assert client.branch("http-db/keep").refresh()["protected"] is True
        client.branch("http-db/keep").update(protected=False)
        db.delete()
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_database_token_narrows_the_grant_to_its_database(home, client):
    from pageserver.clients.mcp import grant_for

    db = client.create_database("scoped", ttl="1h")
    scoped = Strata(home, start=False, token=db.token)
    try:
        g = grant_for(scoped, {})
        assert (g.database, g.access) == ("scoped", "read-write")
        with pytest.raises(GrantError, match="wider"):
            grant_for(scoped, {"access": "admin"})
        with pytest.raises(GrantError, match="wider"):
            grant_for(scoped, {"database": "other"})
        assert grant_for(client, {}).access == "admin"

        async def steps(c: Any) -> dict[str, Any]:
            return {"diff": await tool(c, "diff", a="scoped/main", b="scoped/main", mode="stat"),
                    "other": await refused(c, "branch_list", database="trunc5")}

        out = call(scoped, g, steps)
        assert out["diff"]["report"]["pages"] is not None and "outside" in out["other"]
    finally:
        scoped.close()
        db.delete()


def test_names_that_are_not_names_are_refused_before_any_request(client):
    async def steps(c: Any) -> list[str]:
        smuggled = "agent-x HTTP/1.1\r\nHost: a\r\n\r\nDELETE /v1/databases/prod"
        return [await refused(c, "branch_info", database="shop1", branch=smuggled),
                await refused(c, "connection_string", database="shop1", branch="prod?x=-tmp")]

    for text in call(client, Grant(branch="agent-*"), steps):
        assert "is not a name" in text
    from pageserver.errors import BadRequestError
    with pytest.raises(BadRequestError, match="not a path"):
        client.call("GET", "/databases/x y")


def test_review_fixes_explain_migrations_quotas_confirmation_cursors_and_keys(client):
    """Each a race or a hole a review found: analyze under read-only, a base
    reset since its test, quotas of narrowed grants, a branch protected
    between the question and the act, an expired cursor, one key at once."""
    import threading

    from mcp.server.mcpserver import AcceptedElicitation
    from mcp.server.mcpserver.exceptions import ToolError

    from pageserver.clients.mcp import Quota, StrataTools, _Unasked

    from .interleave import Pause

    db = client.create_database("fixes", ttl="1h")
    sql(db.uri, "create table t as select g as id from generate_series(1, 20) g")
    db.branch("dev", ttl="1h")

    async def ro(c: Any) -> str:
        return await refused(c, "explain", database="fixes", sql="select 1", analyze=True)

    assert "read-write grant" in call(client, Grant(access="read-only"), ro)

    async def reset_since(c: Any) -> str:
        m = await tool(c, "migration_test", database="fixes", branch="dev", sql="create index on t(id)")
        await tool(c, "branch_reset", database="fixes", branch="dev")
        return await refused(c, "migration_apply", migration_id=m["migration_id"])

    assert "reset or restored" in call(client, Grant(), reset_since)

    shared = Quota()
    a, b = (StrataTools(client, Grant(max_databases=1), shared) for _ in range(2))
    a._quota("databases")
    with pytest.raises(ToolError, match="allows 1 databases"):
        b._quota("databases")

    t = StrataTools(client, Grant())
    try:
        client.branch("fixes/dev").update(protected=True)  # protected after the resolver found it was not
        with pytest.raises(ToolError, match="protected meanwhile"):
            t.branch_delete("fixes", "dev", AcceptedElicitation[Any].model_construct(data=_Unasked()))
        assert "dev" in [x.name for x in db.branches()]
        client.branch("fixes/dev").update(protected=False)

        page = t.sql_query("fixes", "select id from t order by id", max_rows=5)
        assert page.cursor is not None
        t._cursors[page.cursor].deadline = 0.0  # (past its time: as if nobody fetched for CURSOR_TTL)
        with pytest.raises(ToolError, match="expired"):
            t.sql_query("fixes", cursor=page.cursor)
        assert t._cursors == {}

        out: dict[str, Any] = {}
        with Pause(t, "_created", thread="first") as p:
            first = threading.Thread(target=lambda: out.setdefault("first", t.db_create(ttl="10m",
                                                                                        idempotency_key="k")),
                                     name="first")
            first.start()
            p.reached()  # made, not yet recorded: the same key again waits for it
            second = threading.Thread(target=lambda: out.setdefault("second", t.db_create(ttl="10m",
                                                                                          idempotency_key="k")))
            second.start()
            time.sleep(0.3)
            assert second.is_alive()
        first.join(30)
        second.join(30)
        assert out["first"].database == out["second"].database
        client.database(out["first"].database).delete()
    finally:
        t.close()
        a.close()
        b.close()
        db.delete()
