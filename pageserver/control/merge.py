"""Merge one branch into another of the same database, honestly scoped.

    plane.merge("shop/feature", "shop/main", dry_run=True)

- *Fast-forward*: the target changed no relation since the common point
  (its own writes since are WAL and control files only). Then the target
  becomes a branch of the source's head: O(1), whatever the size. What
  the target was is kept as a backup branch `NAME-backup-<UTC time>`, as
  `restore` keeps one.
- *Otherwise, a row patch*: the rows the source added, removed and
  modified since the common point (`pageserver.control.diff`, from the
  common point to the source's head) become SQL applied on the target in
  one transaction. Each statement is guarded by the common point's row,
  compared column by column as text (compare-and-swap): an update or
  delete touches exactly the row the source saw, an insert of a keyed row
  only where the key is free. A statement that matches no row is a
  conflict (the row changed on both sides), unless the target already
  holds its effect (merged before: a patch does not move the common
  point, so merging again re-applies nothing and is not refused). Any conflict rolls the whole
  patch back (`MergeConflictError` names the rows); nothing is half
  merged. `dry_run` returns the patch and its conflicts and changes
  nothing.

Pages are never merged. Refused, with the reason: a source that changed
the schema (its `pg_dump --schema-only` differs from the common point's),
created, dropped or rewrote a table, or whose diff would read more than
`max_pages` blocks of a table; branches of two databases. Sequences keep
the target's values.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.diff import Point, common_point
from pageserver.control.diff import DEFAULT_MAX_PAGES, _prepared, _rows, _schema, _Side
from pageserver.errors import BadRequestError, MergeConflictError
from pageserver.pgdata.diff import diff_pages

if TYPE_CHECKING:
    from psycopg import sql as psql

    from pageserver.control.plane import ControlPlane

log = logging.getLogger("strata.merge")

_HEAD = re.compile(r"^(?P<db>[^/@\s]+)/(?P<branch>[^/@\s]+)$")
CONFLICTS_NAMED = 20  # in the error's message; the dry run lists them all


@dataclass
class _Statement:
    table: str
    what: str  # "update", "delete", "insert"
    row: dict[str, str | None]  # the key (or the whole row) it is about
    query: psql.Composed
    applied: psql.Composed | None  # finds a row if the target holds the statement's effect already
    # A row of a table without a key: (count query, copies at the common point, copies on the source);
    # `query` then changes the count, run only if the target has as many copies as the common point.
    counted: tuple[psql.Composed, int, int] | None = None


def _head(plane: ControlPlane, address: str) -> tuple[str, str]:
    m = _HEAD.match(address or "")
    if m is None:
        raise BadRequestError(f"a merge is between branch heads, DB/BRANCH; got {address!r}")
    db, name = m.group("db"), m.group("branch")
    plane._branch(plane.catalog.snapshot, db, name)  # UnknownObjectError names it
    return db, name


def merge(plane: ControlPlane, source: str, target: str, *, dry_run: bool = False,
          max_pages: int = DEFAULT_MAX_PAGES, caller: str | None = None) -> dict[str, Any]:
    """See the top. Returns what was done (or would be, with `dry_run`)."""
    sdb, sname = _head(plane, source)
    tdb, tname = _head(plane, target)
    if sdb != tdb:
        raise BadRequestError(f"{source} and {target} are branches of two databases: a merge is within one")
    if sname == tname:
        raise BadRequestError(f"{source} merged into itself changes nothing")
    snap = plane.catalog.snapshot
    s_tl = plane._timeline(plane._branch(snap, sdb, sname))
    t_tl = plane._timeline(plane._branch(snap, tdb, tname))
    src, tgt = _Side(source, s_tl, None), _Side(target, t_tl, None)
    with _prepared(plane, [src, tgt], computes=False):
        assert src.point is not None and tgt.point is not None
        base = common_point(src.point, tgt.point)
        if base is None:
            raise BadRequestError(f"{source} and {target} share no history")
        target_since = diff_pages(base, tgt.point)
        source_point = src.point
    if not target_since.relations:
        return _fast_forward(plane, sdb, tname, source_point, base, dry_run, caller)
    log.info("merge %s into %s: the target changed %d relations since the common point: a row patch",
             source, target, len(target_since.relations))
    return _patch(plane, source, target, base, dry_run, max_pages)


def _fast_forward(plane: ControlPlane, db: str, tname: str, at: Point, base: Point, dry_run: bool,
                  caller: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": "fast-forward", "dry_run": dry_run, "source_lsn": at.lsn,
                           "common_lsn": base.lsn}
    if dry_run:
        return out
    def make(old: Any) -> Any:
        # (its compute stopped, under its branch lock: no write can slip in between this check and the switch)
        from engine.diff import point

        if diff_pages(base, point(old)).relations:
            raise BadRequestError(f"{db}/{tname} changed while it was merged into; merge again")
        return plane._new_timeline(at.timeline, at_lsn=at.lsn)

    branch, backup = plane._replace_timeline(db, tname, make, "fast-forwarded", caller)
    log.info("%s/%s fast-forwarded to timeline %s at LSN %d; its previous state is %s",
             db, tname, at.timeline.id, at.lsn, backup.name)
    out.update(lsn=branch.lsn, backup=backup.name)
    return out


def _patch(plane: ControlPlane, source: str, target: str, base: Point, dry_run: bool,
           max_pages: int) -> dict[str, Any]:
    import psycopg

    base_side = _Side(f"{source} (common point)", base.timeline, base.lsn)
    src = _Side(source, plane._timeline(plane.resolve(source)), None)
    with _prepared(plane, [base_side, src], computes=True):
        assert base_side.point is not None and src.point is not None
        pd = diff_pages(base_side.point, src.point)
        schema = _schema(base_side, src, pd)
        if schema["changed"]:
            raise BadRequestError(f"{source} changed the schema since the common point; a merge applies row "
                                  f"changes only:\n{schema['diff'][:4000]}")
        tables = _rows(base_side, src, pd, max_pages, shown=None)
        for t in tables:
            if not t.get("key") and "counts" in t:
                t["copies"] = _copies(base_side, t)
    for t in tables:
        if "skipped" in t:
            raise BadRequestError(f"{t['table']}: {t['skipped']}; merge with a larger max_pages")
        if t["status"] != "modified" or "columns" in t:
            raise BadRequestError(f"{source} {t['status']} table {t['table']}: a merge applies row changes only")
    compute = plane.wake(plane.resolve(target))
    statements = list(_statements(compute, tables))
    conflicts: list[dict[str, Any]] = []
    by_db: dict[str, list[_Statement]] = {}
    for st, dbname in statements:
        by_db.setdefault(dbname, []).append(st)
    rendered: list[str] = []
    already = 0
    for dbname, sts in sorted(by_db.items()):  # (one transaction per database: PostgreSQL has no other)
        with psycopg.connect(compute.local_conninfo(dbname), autocommit=False, connect_timeout=30) as conn:
            try:
                for st in sts:
                    rendered.append(st.query.as_string(conn) + ";")
                    if st.counted is not None:
                        count, was, now = st.counted
                        (n,), = conn.execute(count).fetchall()
                        if n == was and conn.execute(st.query).rowcount == abs(now - was):
                            continue
                        if n == now:
                            already += 1
                            continue
                    elif conn.execute(st.query).rowcount == 1:
                        continue
                    if st.applied is not None and conn.execute(st.applied).fetchone() is not None:
                        already += 1  # (merged before: the common point does not move with a patch)
                        continue
                    conflicts.append({"database": dbname, "table": st.table, "statement": st.what, "row": st.row})
            except psycopg.Error as e:
                conn.rollback()
                raise MergeConflictError(f"the patch from {source} failed on {target}, and nothing was merged: "
                                         f"{st.table} {st.what} {st.row}: {e}") from e
            if conflicts or dry_run:
                conn.rollback()
            else:
                conn.commit()
    out: dict[str, Any] = {"mode": "patch", "dry_run": dry_run, "statements": len(rendered),
                           "already_applied": already, "common_lsn": base.lsn, "conflicts": conflicts}
    if dry_run:
        out["patch"] = "\n".join(rendered)
        return out
    if conflicts:
        named = "; ".join(f"{c['table']} {c['statement']} {c['row']}" for c in conflicts[:CONFLICTS_NAMED])
        more = f" (and {len(conflicts) - CONFLICTS_NAMED} more)" if len(conflicts) > CONFLICTS_NAMED else ""
        raise MergeConflictError(f"{len(conflicts)} rows changed on both {source} and {target}; nothing was "
                                 f"merged: {named}{more}")
    log.info("merged %s into %s: %d statements", source, target, len(rendered))
    return out


def _types(compute: Any, dbname: str, nsp: str, rel: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(compute.local_conninfo(dbname), autocommit=True, connect_timeout=30) as conn:
        rows = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
            "(quote_ident(%s) || '.' || quote_ident(%s))::regclass AND attnum > 0 AND NOT attisdropped",
            (nsp, rel)).fetchall()
    return dict(rows)


def _statements(compute: Any, tables: list[dict[str, Any]]) -> Iterator[tuple[_Statement, str]]:
    from psycopg import sql

    for t in tables:
        dbname, name = t["database"], t["table"]
        nsp, rel = name.split(".", 1)
        ident = sql.Identifier(nsp, rel)
        types = _types(compute, dbname, nsp, rel)
        cols: list[str] = t["columns_compared"]
        key: list[str] | None = t["key"]

        def same(row: dict[str, str | None], only: list[str]) -> psql.Composed:
            return sql.SQL(" AND ").join(sql.SQL("{}::text IS NOT DISTINCT FROM {}").format(
                sql.Identifier(c), sql.Literal(row[c])) for c in only)

        def value(c: str, v: str | None, types: dict[str, str] = types) -> psql.Composed:
            return sql.SQL("CAST({} AS {})").format(sql.Literal(v), sql.SQL(types[c]))

        for m in t["modified"]:
            sets = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), value(c, ch["to_"]))
                                      for c, ch in m["changes"].items())
            q = sql.SQL("UPDATE ONLY {} SET {} WHERE {}").format(ident, sets, same(m["from_"], cols))
            after = {**m["from_"], **{c: ch["to_"] for c, ch in m["changes"].items()}}
            done = sql.SQL("SELECT 1 FROM ONLY {} WHERE {}").format(ident, same(after, cols))
            yield _Statement(name, "update", m["key"], q, done), dbname
        if not key:
            yield from ((st, dbname) for st in _counted(t, ident, cols, value, same))
            continue
        for row in t["removed"]:
            q = sql.SQL("DELETE FROM ONLY {} WHERE ctid = (SELECT ctid FROM ONLY {} WHERE {} LIMIT 1)").format(
                ident, ident, same(row, cols))
            gone = sql.SQL("SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM ONLY {} WHERE {})").format(
                ident, same(row, key))
            yield _Statement(name, "delete", {c: row[c] for c in key}, q, gone), dbname
        for row in t["added"]:
            values = sql.SQL(", ").join(value(c, row[c]) for c in cols)
            names = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
            q = sql.SQL("INSERT INTO {} ({}) SELECT {} WHERE NOT EXISTS (SELECT 1 FROM ONLY {} WHERE {})").format(
                ident, names, values, ident, same(row, key))
            found = sql.SQL("SELECT 1 FROM ONLY {} WHERE {}").format(ident, same(row, cols))
            yield _Statement(name, "insert", {c: row[c] for c in key}, q, found), dbname


def _counted(t: dict[str, Any], ident: psql.Composable, cols: list[str], value: Any, same: Any
             ) -> Iterator[_Statement]:
    """A table without a key: per distinct row, its number of copies moves
    from the common point's to the source's, guarded by the target's."""
    from psycopg import sql

    for r, was, now in t["copies"]:
        row = dict(zip(cols, r, strict=True))
        count = sql.SQL("SELECT count(*) FROM ONLY {} WHERE {}").format(ident, same(row, cols))
        if now < was:
            q = sql.SQL("DELETE FROM ONLY {} WHERE ctid IN (SELECT ctid FROM ONLY {} WHERE {} LIMIT {})").format(
                ident, ident, same(row, cols), sql.Literal(was - now))
            what = "delete"
        else:
            values = sql.SQL(", ").join(value(c, row[c]) for c in cols)
            names = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
            q = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM generate_series(1, {})").format(
                ident, names, values, sql.Literal(now - was))
            what = "insert"
        yield _Statement(t["table"], what, {**row, "#copies": f"{was} -> {now}"}, q, None, (count, was, now))


def _copies(base: _Side, t: dict[str, Any]) -> list[tuple[tuple[str | None, ...], int, int]]:
    """For a table without a key: each distinct row the source added or
    removed, with its copies at the common point and on the source."""
    from psycopg import sql

    cols: list[str] = t["columns_compared"]
    delta: Counter[tuple[str | None, ...]] = Counter()
    for row in t["added"]:
        delta[tuple(row[c] for c in cols)] += 1
    for row in t["removed"]:
        delta[tuple(row[c] for c in cols)] -= 1
    nsp, rel = t["table"].split(".", 1)
    out = []
    assert base.compute is not None
    for r, d in sorted(delta.items(), key=repr):
        if not d:
            continue
        q = sql.SQL("SELECT count(*) FROM ONLY {} WHERE {}").format(sql.Identifier(nsp, rel), sql.SQL(" AND ").join(
            sql.SQL("{}::text IS NOT DISTINCT FROM {}").format(sql.Identifier(c), sql.Literal(v))
            for c, v in zip(cols, r, strict=True)))
        (n,), = base.sql(q, (), t["database"])
        out.append((r, int(n), int(n) + d))
    return out
