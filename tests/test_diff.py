"""Branch diff through the control plane, on real PostgreSQL: relations and
pages, rows paired by key against a full EXCEPT comparison, hint-bit and
VACUUM-only changes that show no rows, schema, and bad input."""

from __future__ import annotations

import os
from collections import Counter

import psycopg
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from engine.config import Retention
from pageserver.errors import BadRequestError, MergeConflictError, UnknownObjectError

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


def test_a_transaction_in_flight_at_the_branch_point_is_named(env):
    """Its rows were written before the branch point; it commits on the
    parent after it, and the branch's recovery aborts it: the pages may
    not change, so the diff must say the row diff is not exact there."""
    cp = env.cp
    db = cp.create_database("inf", ttl="1h")
    sql(db.uri, "create table t(id int primary key)")
    with psycopg.connect(db.uri) as conn:
        conn.execute("insert into t values (1)")
        (xid,), = conn.execute("select txid_current()").fetchall()
        sql(db.uri, "checkpoint")  # (its page reaches storage before the branch point)
        cp.create_branch("inf", "b")
        conn.commit()
    out = cp.diff("inf/main", "inf/b")
    assert out["in_flight"]["checked"] and out["in_flight"]["differ"] == [
        {"xid": str(xid), "a": "committed", "b": "aborted"}]
    assert not out["exact"] and any("ended differently" in n for n in out["notes"])
    # nothing in flight: exact, and said so
    cp.suspend("inf", "main")
    sql(db.uri, "select 1")
    cp.create_branch("inf", "c")
    quiet = cp.diff("inf/main", "inf/c")
    assert quiet["in_flight"] == {"checked": True, "xids": 0} or not quiet["in_flight"]["differ"]
    # branched at an LSN: nothing recorded, and said so
    cp.create_branch("inf", "d", lsn=cp.lsn("inf", "main"))
    assert not cp.diff("inf/main", "inf/d")["in_flight"]["checked"]
    cp.delete_database("inf")


def test_the_same_insert_committed_on_one_branch_and_rolled_back_on_the_other(env):
    """Two branches of a stopped parent hand out the same transaction ids:
    the same insert writes the same bytes on both, and only the commit log
    says which side kept the row. The diff still finds it."""
    cp = env.cp
    db = cp.create_database("tw", ttl="1h")
    sql(db.uri, "create table t(id int primary key, v text)")
    cp.suspend("tw", "main")
    kept, undone = cp.create_branch("tw", "kept"), cp.create_branch("tw", "undone")
    for br, end in ((kept, "commit"), (undone, "rollback")):
        with psycopg.connect(br.uri) as conn:
            conn.execute("insert into t values (1, 'the same row')")
            getattr(conn, end)()
    out = cp.diff("tw/undone", "tw/kept")
    (t,) = [x for x in out["rows"] if x["table"] == "public.t"]
    assert t["counts"] == {"added": 1, "removed": 0, "modified": 0}
    cp.delete_database("tw")


def test_catalogs_rewritten_by_vacuum_full_are_still_catalogs(env):
    """VACUUM FULL gives the catalogs relfilenodes above 16384: their rows are
    never shown as a user table's, and a later DDL still shows in the schema."""
    cp = env.cp
    db = cp.create_database("vf", ttl="1h")
    sql(db.uri, "create table t(id int primary key)")
    sql(db.uri, "vacuum full")
    ddl = cp.create_branch("vf", "ddl")
    sql(ddl.uri, "alter table t add column note text; create index on t(note)")
    out = cp.diff("vf/main", "vf/ddl", schema=True)
    assert {x["table"] for x in out["rows"]} <= {"public.t"}
    stat = cp.diff("vf/main", "vf/ddl", rows=False)  # (storage only: pg_class known from pg_filenode.map)
    assert stat["pages"]["catalog_changed"] and any(
        r["mapped_oid"] == 1259 and r["relfilenode"] >= 16384 and r["catalog"] for r in stat["pages"]["relations"])
    assert "note text" in out["schema"]["diff"]
    with pytest.raises(BadRequestError, match="changed the schema"):
        cp.merge("vf/ddl", "vf/main")
    cp.delete_database("vf")


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
    migration = out["schema"]["migration"]
    assert 'add column "price" numeric default 0' in migration.lower().replace("\n", " ")
    # the migration, run on main, gives main migration's schema
    sql(shop.uri, migration)
    after = cp.diff("shop/main", "shop/migration", rows=False, schema=True)["schema"]
    assert after["changed"] is False, (migration, after["diff"])
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
    # a point below the retention horizon: its history is gone
    db = cp.create_database("hz", ttl="1h")
    sql(db.uri, "create table t(x int)")
    old = cp.lsn("hz", "main")
    sql(db.uri, "insert into t select generate_series(1, 1000)")
    tl = cp._timeline(cp.resolve("hz/main"))
    tl.set_retention(Retention(period=None, lsn_distance=1))
    cp.ps.store.gc(tl)
    assert tl.horizon > old
    with pytest.raises(BadRequestError, match="below the retention horizon"):
        cp.diff(f"hz/main@{old}", "hz/main")
    cp.delete_database("hz")


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


def rows_of(uri: str, table: str) -> Counter:
    return Counter(sql(uri, f"select t::text from {table} t"))


def test_a_fast_forward_merge_leaves_the_target_equal_to_the_source(env):
    cp = env.cp
    db = cp.create_database("ff", ttl="1h")
    sql(db.uri, "create table t(id int primary key, v text)")
    sql(db.uri, "insert into t select i, 'v' || i from generate_series(1, 300) i")
    cp.suspend("ff", "main")  # (the target stays as it was: no write on it after the branch point)
    feature = cp.create_branch("ff", "feature")
    sql(feature.uri, "update t set v = 'changed' where id <= 10")
    sql(feature.uri, "create table extra as select 1 as x")  # (a schema change: a fast-forward takes it too)
    before = rows_of(cp.uri("ff/main"), "t")
    cp.suspend("ff", "main")
    dry = cp.merge("ff/feature", "ff/main", dry_run=True)
    assert dry["mode"] == "fast-forward" and rows_of(cp.uri("ff/main"), "t") == before
    cp.suspend("ff", "main")
    out = cp.merge("ff/feature", "ff/main")
    assert out["mode"] == "fast-forward"
    main = cp.uri("ff/main")
    assert rows_of(main, "t") == rows_of(feature.uri, "t") and sql(main, "select x from extra") == [(1,)]
    assert rows_of(cp.uri(f"ff/{out['backup']}"), "t") == before  # (what main was is kept)
    cp.delete_database("ff")


def test_a_row_patch_merges_both_sides_and_a_conflict_is_refused_whole(env):
    cp = env.cp
    db = cp.create_database("pm", ttl="1h")
    sql(db.uri, "create table t(id int primary key, v text, n numeric)")
    sql(db.uri, "create table bag(v text)")
    sql(db.uri, "insert into t select i, 'v' || i, i / 3.0 from generate_series(1, 300) i")
    sql(db.uri, "insert into bag select 'b' || (i % 5) from generate_series(1, 50) i")
    feature = cp.create_branch("pm", "feature")
    sql(feature.uri, "update t set v = 'feature', n = 0.5 where id in (5, 6)")
    sql(feature.uri, "delete from t where id = 7")
    sql(feature.uri, "insert into t values (1000, 'from feature', null)")
    sql(feature.uri, "insert into bag values ('b1'); delete from bag where ctid = (select min(ctid) from bag "
                     "where v = 'b2')")
    sql(db.uri, "update t set v = 'main' where id = 200")  # (main moves on: no fast-forward)

    dry = cp.merge("pm/feature", "pm/main", dry_run=True)
    assert dry["mode"] == "patch" and not dry["conflicts"] and dry["statements"] == 6
    assert "UPDATE ONLY" in dry["patch"] and "'from feature'" in dry["patch"]
    assert sql(db.uri, "select v from t where id = 5") == [("v5",)]  # (a dry run changes nothing)

    out = cp.merge("pm/feature", "pm/main")
    assert out["mode"] == "patch" and not out["conflicts"]
    assert sql(db.uri, "select id, v, n::text from t where id in (5, 6, 7, 200, 1000) order by id") == [
        (5, "feature", "0.5"), (6, "feature", "0.5"), (200, "main", "66.6666666666666667"),
        (1000, "from feature", None)]
    assert rows_of(db.uri, "bag") == rows_of(feature.uri, "bag")

    # now both change row 1: refused whole, naming the row; nothing of the patch is applied
    sql(feature.uri, "update t set v = 'feature again' where id in (1, 2)")
    sql(db.uri, "update t set v = 'main again' where id = 1")
    before = rows_of(db.uri, "t")
    with pytest.raises(MergeConflictError, match=r"public\.t update \{'id': '1'\}"):
        cp.merge("pm/feature", "pm/main")
    assert rows_of(db.uri, "t") == before
    again = cp.merge("pm/feature", "pm/main", dry_run=True)
    assert [c["row"] for c in again["conflicts"]] == [{"id": "1"}]
    assert again["already_applied"] == 6  # (the first merge's: merging again re-applies nothing)
    sql(db.uri, "update t set v = 'feature again' where id = 1")  # (resolved by hand: now it merges)
    assert not cp.merge("pm/feature", "pm/main")["conflicts"]
    assert sql(db.uri, "select v from t where id = 2") == [("feature again",)]


def test_a_patch_merge_with_identity_keys_foreign_keys_and_two_databases(env):
    """Inserts into a GENERATED ALWAYS identity key, a parent and child
    inserted and deleted in an order their foreign key accepts, and a
    second database; a conflict in one database leaves the other unmerged."""
    cp = env.cp
    db = cp.create_database("fk", ttl="1h")
    sql(db.uri, "create table parent(id int generated always as identity primary key, v text)")
    sql(db.uri, "create table child(id int primary key, parent int not null references parent(id))")
    sql(db.uri, "insert into parent(v) select 'p' || i from generate_series(1, 20) i")
    sql(db.uri, "insert into child select i, i from generate_series(1, 20) i")
    sql(db.uri, "create database second")
    second = db.uri.replace("/postgres?", "/second?")
    sql(second, "create table s(id int primary key, v text)")
    sql(second, "insert into s select i, 's' from generate_series(1, 10) i")
    feature = cp.create_branch("fk", "feature")
    feature_second = feature.uri.replace("/postgres?", "/second?")
    sql(feature.uri, "insert into parent(v) values ('new parent')")
    sql(feature.uri, "insert into child values (100, (select max(id) from parent))")
    sql(feature.uri, "delete from child where id = 5; delete from parent where id = 5")
    sql(feature_second, "update s set v = 'feature' where id = 3")
    sql(db.uri, "update parent set v = 'main' where id = 1")  # (no fast-forward)
    sql(second, "update s set v = 'main' where id = 3")  # (a conflict in the second database)
    before = rows_of(db.uri, "parent"), rows_of(db.uri, "child")
    with pytest.raises(MergeConflictError, match=r"public\.s update \{'id': '3'\}"):
        cp.merge("fk/feature", "fk/main")
    assert (rows_of(db.uri, "parent"), rows_of(db.uri, "child")) == before  # (the first database too)
    sql(second, "update s set v = 'feature' where id = 3")  # (resolved)
    out = cp.merge("fk/feature", "fk/main")
    assert not out["conflicts"]
    assert sql(db.uri, "select count(*) from child where id = 100 or id = 5") == [(1,)]
    new_id = sql(feature.uri, "select id from parent where v = 'new parent'")
    assert sql(db.uri, "select id from parent where v = 'new parent'") == new_id  # (the identity's value kept)
    assert sql(db.uri, "select v from parent where id in (1, 5) order by id") == [("main",)]
    cp.delete_database("fk")


def test_no_fast_forward_over_a_transaction_in_flight_that_committed_on_the_target(env):
    """Its rows were written before the branch point and it committed on
    main after: no page of main needs to change, yet main becoming dev's
    head would lose them."""
    cp = env.cp
    db = cp.create_database("iff", ttl="1h")
    sql(db.uri, "create table t(id int primary key)")
    with psycopg.connect(db.uri) as conn:
        conn.execute("insert into t values (1)")
        sql(db.uri, "checkpoint")
        cp.create_branch("iff", "dev")
        conn.commit()
    out = cp.merge("iff/dev", "iff/main")
    assert out["mode"] == "patch" and "in flight" in out["fast_forward_refused"]
    assert sql(db.uri, "select id from t") == [(1,)]
    cp.delete_database("iff")


def test_a_row_moved_to_a_new_parent_and_the_old_parent_deleted_merge(env):
    cp = env.cp
    db = cp.create_database("mv", ttl="1h")
    sql(db.uri, "create table customer(id int primary key)")
    sql(db.uri, "create table orders(id int primary key, customer int not null references customer(id))")
    sql(db.uri, "insert into customer select generate_series(1, 10); insert into orders values (7, 5)")
    feature = cp.create_branch("mv", "feature")
    sql(feature.uri, "insert into customer values (42); update orders set customer = 42 where id = 7; "
                     "delete from customer where id = 5")
    sql(db.uri, "insert into customer values (11)")  # (main moved on: a row patch)
    assert not cp.merge("mv/feature", "mv/main")["conflicts"]
    assert sql(db.uri, "select customer from orders where id = 7") == [(42,)]
    assert sql(db.uri, "select count(*) from customer where id in (5, 11, 42)") == [(2,)]
    cp.delete_database("mv")


def test_two_new_tables_that_share_an_oid_are_not_a_rename(env):
    cp = env.cp
    cp.create_database("nt", ttl="1h")
    cp.suspend("nt", "main")
    a, b = cp.create_branch("nt", "a"), cp.create_branch("nt", "b")
    sql(a.uri, "create table foo(x int); insert into foo values (1)")
    sql(b.uri, "create table bar(y int); insert into bar values (2)")
    rows = {t["table"]: t for t in cp.diff("nt/a", "nt/b")["rows"]}
    assert rows["public.foo"]["status"] == "dropped" and rows["public.bar"]["status"] == "created"
    assert "renamed_from" not in rows["public.bar"]
    cp.delete_database("nt")


def test_merges_that_are_not_row_changes_are_refused(env):
    cp = env.cp
    db = cp.create_database("nm", ttl="1h")
    sql(db.uri, "create table t(id int primary key)")
    ddl = cp.create_branch("nm", "ddl")
    sql(ddl.uri, "alter table t add column v text")
    sql(db.uri, "insert into t values (1)")
    with pytest.raises(BadRequestError, match="changed the schema"):
        cp.merge("nm/ddl", "nm/main")
    other = cp.create_database("nm2", ttl="1h")
    with pytest.raises(BadRequestError, match="two databases"):
        cp.merge("nm2/main", "nm/main")
    with pytest.raises(BadRequestError, match="DB/BRANCH"):
        cp.merge("nm/ddl@5", "nm/main")
    with pytest.raises(UnknownObjectError):
        cp.merge("nm/nope", "nm/main")
    cp.delete_database(other.name)
    cp.delete_database("nm")
