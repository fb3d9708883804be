"""An example suite: every test gets its own branch of the seeded base, so
tests that commit, drop tables or break the schema cannot affect the others
(run in any order, or in parallel with -n)."""

import os

import pytest


def counts(db):
    return db.sql("select (select count(*) from customers), (select count(*) from orders)")[0]


def test_commits_stay_in_the_branch(strata_db):
    with strata_db.connect() as conn:
        conn.execute("insert into customers values (101, 'new')")
        conn.commit()
    assert counts(strata_db) == (101, 1000)


def test_dropping_a_table(strata_db):
    strata_db.sql("drop table orders")
    assert strata_db.sql("select to_regclass('orders')") == [(None,)]


def test_breaking_the_schema(strata_db):
    strata_db.sql("alter table customers drop column name")
    strata_db.sql("truncate customers cascade")
    assert counts(strata_db) == (0, 0)


@pytest.mark.parametrize("attempt", range(3))
def test_every_test_sees_the_seed_untouched(strata_db, attempt):
    assert counts(strata_db) == (100, 1000)
    assert strata_db.sql("select count(*) from information_schema.columns "
                         "where table_name = 'customers'") == [(2,)]


@pytest.mark.skipif(not os.environ.get("STRATA_EXAMPLE_FAIL"), reason="fails only when asked to")
def test_fails_on_purpose(strata_db):
    strata_db.sql("insert into customers values (999, 'left by a failed test')")
    assert False, "failing on purpose"
