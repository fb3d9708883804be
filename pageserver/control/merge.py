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

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.diff import Point, common_point
from pageserver.control.diff import (
    DEFAULT_MAX_PAGES,
    _prepared,
    _resolve,
    _rows,
    _schema,
    _Side,
    in_flight_record,
)
from pageserver.errors import BadRequestError, DiffFailedError, MergeConflictError, MergeFailedError
from pageserver.pgdata.diff import diff_pages, xact_statuses

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
    src, tgt = _resolve(plane, source), _resolve(plane, target)
    with _prepared(plane, [src, tgt], computes=False):
        assert src.point is not None and tgt.point is not None
        base = common_point(src.point, tgt.point)
        if base is None:
            raise BadRequestError(f"{source} and {target} share no history")
        target_since = diff_pages(base, tgt.point)
        source_point, target_point = src.point, tgt.point
    why = _no_fast_forward(plane, base, source_point, target_point, len(target_since.relations))
    if why is None:
        return _fast_forward(plane, sdb, tname, source_point, base, dry_run, caller)
    log.info("merge %s into %s: no fast-forward (%s): a row patch", source, target, why)
    out = _patch(plane, source, target, base, dry_run, max_pages)
    out["fast_forward_refused"] = why
    return out


def _no_fast_forward(plane: ControlPlane, base: Point, source: Point, target: Point, changed: int) -> str | None:
    """Why the target cannot simply become the source (None: it can). A
    transaction in flight at the common point that committed on the target
    only would be lost: its rows were written before the point, so no page
    of the target needs to have changed since."""
    if changed:
        return f"the target changed {changed} relations since the common point"
    rec = in_flight_record(plane, base)
    if rec is None or rec.get("xids") is None:
        return "the transactions in flight at the common point were not recorded"
    xids = rec["xids"]
    if xids and xact_statuses(source, xids) != xact_statuses(target, xids):
        return "a transaction in flight at the common point ended differently on the two sides"
    return None


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
    src = _resolve(plane, source)
    with _prepared(plane, [base_side, src], computes=True):
        assert base_side.point is not None and src.point is not None
        pd = diff_pages(base_side.point, src.point)
        schema = _schema(base_side, src, pd, always=True)  # (by the dumps: whatever a catalog's relfilenode)
        if schema["changed"]:
            raise BadRequestError(f"{source} changed the schema since the common point; a merge applies row "
                                  f"changes only:\n{schema['diff'][:4000]}")
        tables = _rows(base_side, src, pd, max_pages, shown=None)
        for t in tables:
            if "skipped" in t:
                raise BadRequestError(f"{t['table']}: {t['skipped']}; merge with a larger max_pages")
            if t["status"] != "modified" or "columns" in t:
                raise BadRequestError(f"{source} {t['status']} table {t['table']}: a merge applies row changes only")
            if not t.get("key"):
                t["copies"] = _copies(base_side, t)
    tbr = plane.resolve(target)
    compute = plane.wake(tbr)
    plane.connection_opened(tbr)  # (not suspended while the patch runs)
    conns: dict[str, Any] = {}
    try:
        by_db: dict[str, list[dict[str, Any]]] = {}
        for t in tables:
            by_db.setdefault(t["database"], []).append(t)
        for dbname in by_db:
            conns[dbname] = psycopg.connect(compute.local_conninfo(dbname), autocommit=False, connect_timeout=30)
        rendered, already, conflicts = _apply(conns, by_db, source, target)
        # every database's statements ran and their deferred checks too; commit only if all are clean
        # (a commit that fails after another database's went through is the one gap left)
        for conn in conns.values():
            if conflicts or dry_run:
                conn.rollback()
            else:
                conn.commit()
    except psycopg.Error as e:
        for conn in conns.values():
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
        if any(c.broken for c in conns.values()):
            raise DiffFailedError(f"the compute of {target} stopped or failed during the merge ({e}); nothing "
                                  "was merged") from e
        raise MergeFailedError(f"{target} refused the patch from {source}, and nothing was merged: {e}") from e
    finally:
        for conn in conns.values():
            conn.close()
        plane.connection_closed(tbr)
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


def _apply(conns: dict[str, Any], by_db: dict[str, list[dict[str, Any]]], source: str, target: str
           ) -> tuple[list[str], int, list[dict[str, Any]]]:
    """Run every statement, each database in its own open transaction; the
    caller commits or rolls back. Returns (the SQL, effects the target held
    already, conflicts)."""
    import psycopg

    rendered: list[str] = []
    already = 0
    conflicts: list[dict[str, Any]] = []
    for dbname, tables in sorted(by_db.items()):
        conn = conns[dbname]
        statements = _statements(conn, tables)  # (its errors, a table the target dropped: MergeFailedError)
        for st in statements:
            rendered.append(st.query.as_string(conn) + ";")
            try:
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
            except psycopg.Error as e:
                if conn.broken:
                    raise
                raise MergeFailedError(f"{target} refused the patch from {source}, and nothing was merged: "
                                       f"{st.table} {st.what} {st.row}: {e}") from e
            conflicts.append({"database": dbname, "table": st.table, "statement": st.what, "row": st.row})
        if not conflicts:
            conn.execute("SET CONSTRAINTS ALL IMMEDIATE")  # (deferred checks now, before any database commits)
    return rendered, already, conflicts


@dataclass
class _Column:
    type: str  # format_type on the target
    generated: bool  # a stored generated column: never written
    identity_always: bool  # GENERATED ALWAYS AS IDENTITY: an insert overrides it


def _columns(conn: Any, nsp: str, rel: str) -> dict[str, _Column]:
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attgenerated <> '', attidentity = 'a' "
        "FROM pg_attribute WHERE attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass "
        "AND attnum > 0 AND NOT attisdropped", (nsp, rel)).fetchall()
    return {name: _Column(typ, gen, ident) for name, typ, gen, ident in rows}


def _fk_order(conn: Any, tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tables, each referenced one before those that reference it
    (inserts go in this order, deletes in reverse)."""
    # (by name, as the target knows them: its oids may differ from the source's)
    names = [f"{t['schema']}.{t['name']}" for t in tables]
    found = conn.execute(
        "SELECT n.nspname || '.' || c.relname, c.oid::bigint FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname || '.' || c.relname = ANY(%s)",
        (names,)).fetchall()
    by_name = {t: int(o) for t, o in found}
    oids = {by_name.get(n, -i - 1): t for i, (n, t) in enumerate(zip(names, tables, strict=True))}
    edges = conn.execute("SELECT conrelid::bigint, confrelid::bigint FROM pg_constraint "
                         "WHERE contype = 'f' AND conrelid = ANY(%s) AND confrelid = ANY(%s) "
                         "AND conrelid <> confrelid", (list(oids), list(oids))).fetchall()
    after: dict[int, set[int]] = {o: set() for o in oids}
    for child, parent in edges:
        after[int(child)].add(int(parent))
    out: list[dict[str, Any]] = []
    done: set[int] = set()
    while len(done) < len(oids):
        ready = sorted(o for o in oids if o not in done and after[o] <= done) or sorted(set(oids) - done)[:1]
        for o in ready:  # (a cycle: broken at the lowest oid; deferrable constraints then decide)
            done.add(o)
            out.append(oids[o])
    return out


def _statements(conn: Any, tables: list[dict[str, Any]]) -> list[_Statement]:
    """Inserts (referenced tables first), updates, then deletes (referencing
    tables first), each guarded (see the top): a row moved to a new parent
    finds it, and a parent goes after its children. (A unique value passed
    from a deleted row to an inserted one is refused: MergeFailedError.)"""
    from psycopg import sql

    conn.execute("SET CONSTRAINTS ALL DEFERRED")  # (what may wait for the commit does)
    ordered = _fk_order(conn, tables)
    deletes: list[_Statement] = []
    updates: list[_Statement] = []
    inserts: list[_Statement] = []
    for t in ordered:
        name = t["table"]
        ident = sql.Identifier(t["schema"], t["name"])
        target_cols = _columns(conn, t["schema"], t["name"])
        cols: list[str] = t["columns_compared"]
        missing = [c for c in cols if c not in target_cols]
        if missing:
            raise MergeFailedError(f"{name} on the target has no column {', '.join(missing)}: nothing was merged")
        key: list[str] | None = t["key"]
        written = [c for c in cols if not target_cols[c].generated]
        overriding = sql.SQL(" OVERRIDING SYSTEM VALUE") if any(
            target_cols[c].identity_always for c in written) else sql.SQL("")

        def value(c: str, v: str | None, types: dict[str, _Column] = target_cols) -> psql.Composed:
            return sql.SQL("CAST({} AS {})").format(sql.Literal(v), sql.SQL(types[c].type))

        if not key:
            for st in _counted(t, ident, written, value):
                (deletes if st.what == "delete" else inserts).append(st)
            continue

        def by_key(row: dict[str, str | None], keyed: list[str] = key) -> psql.Composed:
            """The row's key by value: an index finds it."""
            return sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(k), value(k, row[k]))
                                         for k in keyed)

        def where(row: dict[str, str | None], cols: list[str] = cols) -> psql.Composed:
            """The row by its key, then every column as text (the guard)."""
            return sql.SQL("{} AND {}").format(by_key(row), _same(row, cols))

        for m in t["modified"]:
            changes = {c: ch for c, ch in m["changes"].items() if not target_cols[c].generated}
            if not changes:
                continue
            sets = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), value(c, ch["to_"]))
                                      for c, ch in changes.items())
            q = sql.SQL("UPDATE ONLY {} SET {} WHERE {}").format(ident, sets, where(m["from_"]))
            after_row = {**m["from_"], **{c: ch["to_"] for c, ch in m["changes"].items()}}
            done = sql.SQL("SELECT 1 FROM ONLY {} WHERE {}").format(ident, where(after_row))
            updates.append(_Statement(name, "update", m["key"], q, done))
        for row in t["removed"]:
            q = sql.SQL("DELETE FROM ONLY {} WHERE ctid = (SELECT ctid FROM ONLY {} WHERE {} LIMIT 1)").format(
                ident, ident, where(row))
            gone = sql.SQL("SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM ONLY {} WHERE {})").format(ident, by_key(row))
            deletes.append(_Statement(name, "delete", {c: row[c] for c in key}, q, gone))
        for row in t["added"]:
            values = sql.SQL(", ").join(value(c, row[c]) for c in written)
            names = sql.SQL(", ").join(sql.Identifier(c) for c in written)
            q = sql.SQL("INSERT INTO {} ({}){} SELECT {} WHERE NOT EXISTS (SELECT 1 FROM ONLY {} WHERE {})").format(
                ident, names, overriding, values, ident, by_key(row))
            found = sql.SQL("SELECT 1 FROM ONLY {} WHERE {}").format(ident, where(row))
            inserts.append(_Statement(name, "insert", {c: row[c] for c in key}, q, found))
    return inserts + updates + list(reversed(deletes))


def _same(row: dict[str, str | None], cols: list[str]) -> psql.Composed:
    """Every column of `cols` equal to the row's, compared as text (NULL to NULL)."""
    from psycopg import sql

    return sql.SQL(" AND ").join(sql.SQL("{}::text IS NOT DISTINCT FROM {}").format(
        sql.Identifier(c), sql.Literal(row[c])) for c in cols)


def _copies_of(ident: psql.Composable, row: dict[str, str | None], cols: list[str]) -> psql.Composed:
    from psycopg import sql

    return sql.SQL("SELECT count(*) FROM ONLY {} WHERE {}").format(ident, _same(row, cols))


def _counted(t: dict[str, Any], ident: psql.Composable, cols: list[str], value: Any) -> Iterator[_Statement]:
    """A table without a key: per distinct row, its number of copies moves
    from the common point's to the source's, guarded by the target's."""
    from psycopg import sql

    all_cols: list[str] = t["columns_compared"]
    for r, was, now in t["copies"]:
        row = dict(zip(all_cols, r, strict=True))
        count = _copies_of(ident, row, all_cols)
        if now < was:
            q = sql.SQL("DELETE FROM ONLY {} WHERE ctid IN (SELECT ctid FROM ONLY {} WHERE {} LIMIT {})").format(
                ident, ident, _same(row, all_cols), sql.Literal(was - now))
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
    ident = sql.Identifier(t["schema"], t["name"])
    out = []
    assert base.compute is not None
    for r, d in sorted(delta.items(), key=repr):
        if not d:
            continue
        (n,), = base.sql(_copies_of(ident, dict(zip(cols, r, strict=True)), cols), (), t["database"])
        out.append((r, int(n), int(n) + d))
    return out
