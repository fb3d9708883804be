"""Branch diff through the control plane, on real PostgreSQL: relations and
pages, rows paired by key against a full EXCEPT comparison, hint-bit and
VACUUM-only changes that show no rows, schema, and bad input."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from pageserver.errors import BadRequestError, UnknownObjectError

from .conftest import in_ci
from .pg import Running, requires_pg, sql

pytestmark = requires_pg


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with Running(str(tmp_path_factory.mktemp("diff"))) as r:
        yield r
    assert not os.path.ismount(r.cp.ps.mountpoint)


def tables(uri: str) -> list[str]:
    return [t for (t,) in sql(uri, "select quote_ident(tablename) from pg_tables where schemaname = 'public' "
                                   "order by 1")]


def except_diff(uri_a: str, uri_b: str, table: str, on_a: bool = True, on_b: bool = True) -> tuple[list, list]:
    """The oracle: every row of the table on each side, as text, compared
    whole (a multiset EXCEPT ALL, each way)."""
    def rows(uri: str, there: bool) -> list:
        return sql(uri, f"select t::text from {table} t") if there else []
    ca, cb = Counter(rows(uri_a, on_a)), Counter(rows(uri_b, on_b))
    return list((ca - cb).elements()), list((cb - ca).elements())


@pytest.fixture(scope="module")
def shop(env):
    cp = env.cp
    db = cp.create_database("shop")
    sql(db.uri, "create table items(id int primary key, name text, qty int)")
    sql(db.uri, "create table log(msg text)")  # (no key)
    sql(db.uri, "insert into items select i, 'item ' || i, i % 7 from generate_series(1, 3000) i")
    sql(db.uri, "insert into log select 'line ' || i from generate_series(1, 500) i")
    sql(db.uri, "vacuum freeze")
    return db


def test_rows_of_two_branches_paired_by_key_agree_with_except(env, shop):
    cp = env.cp
    feature = cp.create_branch("shop", "feature")
    sql(feature.uri, "insert into items values (5001, 'new', 1), (5002, 'newer', 2)")
    sql(feature.uri, "update items set qty = 99 where id = 10")
    sql(feature.uri, "delete from items where id = 2000")
    sql(feature.uri, "insert into log values ('feature line')")
    sql(shop.uri, "update items set name = 'renamed on main' where id = 2500")

    out = cp.diff("shop/main", "shop/feature")
    by_table = {t["table"]: t for t in out["rows"]}
    items = by_table["public.items"]
    assert items["key"] == ["id"] and items["status"] == "modified"
    assert items["counts"] == {"added": 2, "removed": 1, "modified": 2}
    assert sorted(r["id"] for r in items["added"]) == ["5001", "5002"]
    assert [r["id"] for r in items["removed"]] == ["2000"]
    changes = {m["key"]["id"]: m["changes"] for m in items["modified"]}
    assert changes["10"] == {"qty": {"from_": "3", "to_": "99"}}
    assert changes["2500"] == {"name": {"from_": "renamed on main", "to_": "item 2500"}}
    assert by_table["public.log"]["counts"] == {"added": 1, "removed": 0, "modified": 0}
    assert by_table["public.log"]["key"] is None
    # pages: only a few of the table's blocks were read
    assert items["pages_read"] < 10
    # the oracle: a whole-table comparison finds the same rows
    for t in tables(feature.uri):
        removed, added = except_diff(shop.uri, feature.uri, t)
        got = by_table.get(f"public.{t}")
        assert (len(removed), len(added)) == (
            (got["counts"]["removed"] + got["counts"]["modified"], got["counts"]["added"] + got["counts"]["modified"])
            if got else (0, 0))

    stat = cp.diff("shop/main", "shop/feature", rows=False)
    assert "rows" not in stat and stat["pages"]["relations"]
    user = [r for r in stat["pages"]["relations"] if not r["catalog"]]
    assert user and all(r["status"] == "modified" and r["b_wrote"] for r in user)
    assert "pg_wal" in str(stat["pages"]["files"])  # (files outside relations are listed too)


def test_hint_bits_and_vacuum_alone_show_no_rows(env, shop):
    cp = env.cp
    cp.create_branch("shop", "quiet")
    quiet = cp.uri("shop/quiet")
    sql(quiet, "select count(*) from items")
    sql(quiet, "vacuum items")
    sql(quiet, "vacuum full log")  # (rewritten: a new relfilenode, the same rows)
    out = cp.diff("shop/main", "shop/quiet")
    for t in out["rows"]:
        if t["table"] in ("public.items", "public.log"):
            assert t["counts"]["added"] == t["counts"]["removed"] == 0, t
    log_row = next(t for t in out["rows"] if t["table"] == "public.log")
    assert log_row["status"] == "rewritten"


def test_a_schema_change_shows_in_the_dump_diff(env, shop):
    cp = env.cp
    mig = cp.create_branch("shop", "migration")
    sql(mig.uri, "alter table items add column price numeric default 0")
    out = cp.diff("shop/main", "shop/migration", rows=False, schema=True)
    assert out["pages"]["catalog_changed"]
    assert "+    price numeric DEFAULT 0" in out["schema"]["diff"]
    assert cp.diff("shop/main", "shop/main", rows=False, schema=True)["schema"]["changed"] is False


def test_a_past_point_and_two_databases_share_the_template(env, shop):
    cp = env.cp
    before = cp.lsn("shop", "main")
    sql(shop.uri, "insert into items values (9001, 'later', 0)")
    out = cp.diff(f"shop/main@{before}", "shop/main")
    items = next(t for t in out["rows"] if t["table"] == "public.items")
    assert [r["id"] for r in items["added"]] == ["9001"] and out["a"]["via"] == "throwaway compute"
    other = cp.create_database("other")
    sql(other.uri, "create table items(id int primary key)")
    two = cp.diff("shop/main", "other/main", rows=False)
    assert two["pages"]["base"] is not None  # (the template)


def test_bad_input_is_refused_by_name(env, shop):
    cp = env.cp
    with pytest.raises(UnknownObjectError, match="shop/nope"):
        cp.diff("shop/main", "shop/nope")
    with pytest.raises(BadRequestError, match="DB/BRANCH"):
        cp.diff("shop", "shop/main")
    with pytest.raises(BadRequestError, match="beyond the head|out of range"):
        cp.diff("shop/main@999999999999", "shop/main")
    with pytest.raises(BadRequestError, match="not an LSN or a time"):
        cp.diff("shop/main@yesterday-ish", "shop/main")
    with pytest.raises(BadRequestError, match="max_pages"):
        cp.diff("shop/main", "shop/main", max_pages=-1)


class RowDiffMachine(RuleBasedStateMachine):
    """Random inserts, updates, deletes, VACUUM, TRUNCATE and DDL on two
    branches of one base; after each step Strata's row diff agrees with a
    whole-table EXCEPT comparison of every table."""

    cp = None  # set by the test (the module's control plane)
    made = 0

    @initialize()
    def start(self) -> None:
        cp = type(self).cp
        type(self).made += 1
        self.db = f"m{type(self).made}"
        base = cp.create_database(self.db, ttl="1h")
        sql(base.uri, "create table k(id int primary key, v text)")
        sql(base.uri, "create table n(v int)")
        sql(base.uri, "insert into k select i, 'v' || i from generate_series(1, 400) i")
        sql(base.uri, "insert into n select i % 50 from generate_series(1, 400) i")
        self.uris = {"a": cp.create_branch(self.db, "a").uri, "b": cp.create_branch(self.db, "b").uri}
        self.extra = {"a": False, "b": False}

    @rule(side=st.sampled_from("ab"), lo=st.integers(1, 450), n=st.integers(1, 30))
    def insert(self, side, lo, n) -> None:
        sql(self.uris[side], f"insert into k select i, 'new' || i from generate_series({lo}, {lo + n}) i "
                             "on conflict (id) do update set v = excluded.v || '!'")
        sql(self.uris[side], f"insert into n select i from generate_series({lo}, {lo + n}) i")

    @rule(side=st.sampled_from("ab"), lo=st.integers(1, 450), n=st.integers(1, 60))
    def update(self, side, lo, n) -> None:
        sql(self.uris[side], f"update k set v = v || '.' where id between {lo} and {lo + n}")
        sql(self.uris[side], f"update n set v = v + 1 where v between {lo % 50} and {lo % 50 + n % 5}")

    @rule(side=st.sampled_from("ab"), lo=st.integers(1, 450), n=st.integers(1, 60))
    def delete(self, side, lo, n) -> None:
        sql(self.uris[side], f"delete from k where id between {lo} and {lo + n}")
        sql(self.uris[side], f"delete from n where v = {lo % 50}")

    @rule(side=st.sampled_from("ab"), full=st.booleans())
    def vacuum(self, side, full) -> None:
        sql(self.uris[side], "vacuum full n" if full else "vacuum k")

    @rule(side=st.sampled_from("ab"))
    def truncate(self, side) -> None:
        sql(self.uris[side], "truncate n")

    @rule(side=st.sampled_from("ab"))
    def ddl(self, side) -> None:
        if self.extra[side]:
            sql(self.uris[side], "drop table extra")
        else:
            sql(self.uris[side], "create table extra as select i as x from generate_series(1, 20) i")
        self.extra[side] = not self.extra[side]

    @invariant()
    def agrees_with_except(self) -> None:
        if not hasattr(self, "db"):
            return
        out = type(self).cp.diff(f"{self.db}/a", f"{self.db}/b")
        got = {t["table"]: t for t in out["rows"]}
        names = set(tables(self.uris["a"])) | set(tables(self.uris["b"]))
        for name in names:
            on_a, on_b = name in tables(self.uris["a"]), name in tables(self.uris["b"])
            removed, added = except_diff(self.uris["a"], self.uris["b"], name, on_a, on_b)
            t = got.get(f"public.{name}")
            c = t["counts"] if t else {"added": 0, "removed": 0, "modified": 0}
            assert (len(removed), len(added)) == (c["removed"] + c["modified"], c["added"] + c["modified"]), (
                name, t)

    def teardown(self) -> None:
        if hasattr(self, "db"):
            type(self).cp.delete_database(self.db)


def test_row_diff_state_machine(env):
    RowDiffMachine.cp = env.cp
    run_state_machine_as_test(RowDiffMachine, settings=settings(
        max_examples=4 if in_ci() else 8, stateful_step_count=6, deadline=None))
