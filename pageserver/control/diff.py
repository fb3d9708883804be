"""What changed between two branches (or two points of one): relations and
pages from the engine, then rows and schema from PostgreSQL itself.

    plane.diff("shop/main", "shop/feature@12345", rows=True, schema=True)

A point is `DB/BRANCH` (its head), `DB/BRANCH@LSN` or `DB/BRANCH@TIME`
(ISO 8601 or epoch seconds). The two may be of different databases: each
database is a branch of the template, which is then their common point.

How (each step reads only what changed):

1. *Points that PostgreSQL agrees with.* A running compute keeps recent
   changes in its buffers and WAL: it is checkpointed first, and its
   head is the point. A point a compute is needed at (rows, schema) and
   that has none running (a suspended head, an LSN, a time) gets a
   throwaway read-only compute (an O(1) branch at the point; recovery
   replays what its WAL holds), checkpointed too; its branch's head is
   the point then. With pages only (`rows=False, schema=False`) no
   compute is started: a past point is diffed as its files stand.
2. *Pages and relations* (`pageserver.pgdata.diff`): from the engine alone.
3. *Rows*, per table whose heap changed: on each side, the visible rows
   of only the changed blocks (a TID range scan per run of blocks), as
   multisets of the columns' text forms; those that differ are paired by
   primary key (or a unique index over NOT NULL columns) into added,
   removed and modified rows. A table rewritten (a new relfilenode on one
   side: TRUNCATE, VACUUM FULL, a type change) or new on one side is read
   whole, and said so; past `max_pages` blocks a table is not read at all,
   and said so.
4. *Schema*: only if a catalog relation changed, `pg_dump --schema-only`
   of each database on each side and a unified diff.

Not exact, and said in the result: rows whose pages did not change but
whose visibility did (a transaction in flight at the branch point that
committed on one side only); a diff of a live head races its writers.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine import LsnOutOfRangeError, NotFoundError, Timeline
from engine.diff import Point, point
from pageserver.compute.postgres import Compute
from pageserver.control.catalog import BranchRecord
from pageserver.control.objects import parse_time
from pageserver.errors import BadRequestError, DiffFailedError
from pageserver.pgdata.diff import PageDiff, RelationDiff, diff_pages

if TYPE_CHECKING:
    from pageserver.control.plane import ControlPlane

log = logging.getLogger("strata.diff")

DEFAULT_MAX_PAGES = 100_000  # blocks of one table a row diff reads at most (800 MiB)
MAX_ROWS_SHOWN = 1000  # rows listed per table and kind; the counts are always whole
_ADDRESS = re.compile(r"^(?P<db>[^/@\s]+)/(?P<branch>[^/@\s]+)(?:@(?P<at>.+))?$")


@dataclass
class _Side:
    address: str
    timeline: Timeline
    lsn: int | None  # None: the head
    branch: BranchRecord | None = None
    compute: Compute | None = None  # a live or a throwaway compute
    throwaway: bool = False
    counted: bool = False  # as a connection of the branch's (so that it is not suspended meanwhile)
    point: Point | None = None
    dbs: dict[int, str] = field(default_factory=dict)  # database oid -> name
    conns: dict[str, Any] = field(default_factory=dict)  # database name -> open connection (autocommit)

    def conn(self, dbname: str = "postgres") -> Any:
        """A connection to the side's compute, opened once per database."""
        c = self.conns.get(dbname)
        if c is None:
            import psycopg

            assert self.compute is not None
            c = self.conns[dbname] = psycopg.connect(self.compute.local_conninfo(dbname), autocommit=True,
                                                      connect_timeout=30)
        return c

    def sql(self, query: Any, params: tuple[Any, ...] | dict[str, Any] = (), dbname: str = "postgres"
            ) -> list[tuple[Any, ...]]:
        cur = self.conn(dbname).execute(query, params)
        return cur.fetchall() if cur.description else []

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        self.conns.clear()

    def describe(self) -> dict[str, Any]:
        assert self.point is not None
        return {"address": self.address, "timeline": self.timeline.id, "lsn": self.point.lsn,
                "via": "throwaway compute" if self.throwaway else "live compute" if self.compute else "pages"}


def _resolve(plane: ControlPlane, address: str) -> _Side:
    m = _ADDRESS.match(address or "")
    if m is None:
        raise BadRequestError(f"a diff point is DB/BRANCH, DB/BRANCH@LSN or DB/BRANCH@TIME, got {address!r}")
    db, name, at = m.group("db"), m.group("branch"), m.group("at")
    br = plane._branch(plane.catalog.snapshot, db, name)  # UnknownObjectError names it
    tl = plane._timeline(br)
    lsn = None
    if at is not None:
        try:
            lsn = int(at) if at.isdigit() else tl.lsn_at(parse_time(at, plane._clock()))
            point(tl, lsn)
        except LsnOutOfRangeError as e:
            raise BadRequestError(f"{address}: {e}") from e
        except (ValueError, BadRequestError) as e:
            raise BadRequestError(f"{address}: not an LSN or a time ({e})") from e
    return _Side(address, tl, lsn, br)


def psycopg_errors() -> type[Exception]:
    import psycopg

    return psycopg.Error


@contextlib.contextmanager
def _prepared(plane: ControlPlane, sides: list[_Side], computes: bool) -> Iterator[None]:
    """Fix each side's point (step 1 at the top); throwaway computes stop on the way out."""
    try:
        for s in sides:
            if s.lsn is None and s.branch is not None:  # (counted first: a suspension re-checks under its lock)
                plane.connection_opened(s.branch)
                s.counted = True
            live = plane.ps.compute_of(s.timeline) if s.lsn is None else None
            if live is not None and live.running:
                s.compute = live
            elif computes:
                at = s.lsn if s.lsn is not None else s.timeline.head_lsn
                s.compute = plane.ps.start_compute(s.timeline, lsn=at)
                s.throwaway = True
            if s.compute is not None:
                s.sql("CHECKPOINT")
                tl = plane.ps.store.timeline(s.compute.timeline_id)
                s.point = point(tl)
                s.dbs = {int(oid): name for oid, name in s.sql(
                    "SELECT oid, datname FROM pg_database WHERE datallowconn")}
            else:
                s.point = point(s.timeline, s.lsn)
        yield
    except psycopg_errors() as e:
        raise DiffFailedError(f"a compute stopped or failed while it was read ({e}); try again") from e
    finally:
        for s in sides:
            s.close()
            if s.counted and s.branch is not None:
                plane.connection_closed(s.branch)
            if s.throwaway and s.compute is not None:
                with contextlib.suppress(Exception):
                    plane.ps.stop_compute(s.compute.id)


def diff(plane: ControlPlane, a: str, b: str, *, rows: bool = True, schema: bool = False,
         max_pages: int = DEFAULT_MAX_PAGES) -> dict[str, Any]:
    """See the top. Returns a JSON-able report."""
    if not isinstance(max_pages, int) or isinstance(max_pages, bool) or max_pages < 0:
        raise BadRequestError(f"max_pages is a count of blocks, got {max_pages!r}")
    t0 = time.perf_counter()
    sa, sb = _resolve(plane, a), _resolve(plane, b)
    try:
        with _prepared(plane, [sa, sb], rows or schema):
            assert sa.point is not None and sb.point is not None
            pd = diff_pages(sa.point, sb.point)
            out: dict[str, Any] = {"a": sa.describe(), "b": sb.describe(), "pages": pd.as_dict()}
            if rows:
                out["rows"] = _rows(sa, sb, pd, max_pages)
                out["in_flight"] = _in_flight_check(plane, sa, sb, pd.base)
            if schema:
                out["schema"] = _schema(sa, sb, pd)
    except NotFoundError as e:
        raise BadRequestError(f"a branch changed while it was diffed ({e}); try again") from e
    notes = []
    if not all(s.compute is None or s.throwaway for s in (sa, sb)):
        notes.append("a live head was diffed: writes made meanwhile may show in part")
    flight = out.get("in_flight")
    if flight is not None and flight.get("differ"):
        notes.append(f"{len(flight['differ'])} transactions in flight at the common point ended differently on "
                     "the two sides: rows they wrote are missing from this row diff where their pages did not "
                     "change after it")
    elif flight is not None and not flight.get("checked"):
        notes.append(f"transactions in flight at the common point were not checked: {flight.get('why', '')}")
    if out["pages"]["base"] is None:
        notes.append("no common history: every key was compared, but a page equal on both sides was not "
                     "checked for transactions that ended differently")
    out["exact"] = not notes
    out["notes"] = notes
    out["seconds"] = round(time.perf_counter() - t0, 4)
    log.info("diff %s %s: %d relations in %.0f ms", a, b, len(pd.relations), out["seconds"] * 1e3)
    return out


# --- transactions in flight at a branch point -----------------------------------------------------

IN_FLIGHT_RANGE = 10_000  # transaction ids started while a branch was made, at most, before it is not recorded


_IN_FLIGHT_SQL = """
SELECT pg_current_snapshot()::text,
       array(SELECT backend_xid::text FROM pg_stat_activity WHERE backend_xid IS NOT NULL
             UNION SELECT transaction::text FROM pg_prepared_xacts)
"""


def _full_xid(x: int, near: int) -> int:
    """A 32-bit transaction id as the 64-bit one nearest `near` (its epoch)."""
    full = (near & ~0xFFFFFFFF) | x
    if full - near > 1 << 31:
        full -= 1 << 32
    elif near - full > 1 << 31:
        full += 1 << 32
    return full


def in_flight(c: Compute) -> tuple[int, int, list[int]] | None:
    """(xmin, xmax, ids in progress) of the compute, from its snapshot and
    its backends' and prepared transactions' ids (since PostgreSQL 14 a
    snapshot's xmax is the last completed id + 1, so ids in progress above
    it are not in its list). Reads only: assigns no id, writes nothing.
    None if it cannot answer at once (a branch is made without a record)."""
    try:
        import psycopg

        with psycopg.connect(c.local_conninfo(), autocommit=True, connect_timeout=2,
                             options="-c statement_timeout=2000") as conn:
            (snap, running), = conn.execute(_IN_FLIGHT_SQL).fetchall()
    except Exception as e:  # noqa: BLE001 - a busy or stopping compute: nothing recorded, said at diff time
        log.info("no snapshot of compute %s for a branch: %s", c.id, e)
        return None
    xmin, xmax, xip = (str(snap).split(":") + ["", "", ""])[:3]
    ids = {int(x) for x in xip.split(",") if x} | {_full_xid(int(x), int(xmax)) for x in running or ()}
    return int(xmin), int(xmax), sorted(ids)


def in_flight_between(before: tuple[int, int, list[int]] | None, after: tuple[int, int, list[int]] | None
                      ) -> list[int] | None:
    """Transactions that may have been in flight at a branch point taken
    between two looks: in progress at either, or completed between them
    (a few that began after the branch point may be among them: at worst
    a diff then says it is not exact where it is)."""
    if before is None or after is None or after[1] - before[1] > IN_FLIGHT_RANGE:
        return None
    return sorted(set(before[2]) | set(after[2]) | set(range(before[1], after[1])))


def in_flight_record(plane: ControlPlane, base: Point | None) -> dict[str, Any] | None:
    """What a branch made at the common point recorded of the transactions in flight there."""
    for br in plane.catalog.snapshot.branches.values():
        f = br.extra.get("in_flight") if br.extra else None
        if f and base is not None and f.get("timeline") == base.timeline.id and f.get("lsn") == base.lsn:
            return dict(f)
    return None


def _in_flight_check(plane: ControlPlane, sa: _Side, sb: _Side, base: Point | None) -> dict[str, Any]:
    """Whether a transaction in flight at the common point ended differently on the two sides."""
    rec = in_flight_record(plane, base)
    if base is None or rec is None:
        return {"checked": False, "why": "no snapshot was recorded at the common point "
                                         "(the parent was not running, or it was branched at an LSN or time)"}
    xids = rec.get("xids")
    if xids is None:
        return {"checked": False, "why": f"more than {IN_FLIGHT_RANGE} transactions began while the branch was "
                                         "made: the set was not recorded"}
    if not xids:
        return {"checked": True, "xids": 0, "differ": []}
    if sa.compute is None or sb.compute is None:
        return {"checked": False, "why": "no compute to ask"}
    # (an id a side has not handed out yet is not asked about: PostgreSQL refuses ids in its future)
    status = ("SELECT x::text, CASE WHEN x::text::xid8 < pg_snapshot_xmax(pg_current_snapshot()) "
              "THEN pg_xact_status(x::text::xid8) ELSE 'in progress or unused' END FROM unnest(%s::bigint[]) x")
    on_a = dict(sa.sql(status, (xids,)))
    on_b = dict(sb.sql(status, (xids,)))
    differ = [{"xid": x, "a": on_a.get(x), "b": on_b.get(x)} for x in sorted(on_a, key=int)
              if on_a.get(x) != on_b.get(x)]
    return {"checked": True, "xids": len(xids), "differ": differ}


# --- rows ---------------------------------------------------------------------------------------

@dataclass
class _Table:
    oid: int
    schema: str
    name: str
    relfilenode: int
    columns: list[str]
    key: list[str]  # primary key (or NOT NULL unique) columns; [] if none
    blocks: int = 0  # its size on this side
    toast_only: bool = False  # only its TOAST relation differs


_TABLES = """
SELECT c.oid, n.nspname, c.relname, pg_relation_filenode(c.oid), pg_relation_size(c.oid) / 8192,
       coalesce(pg_relation_filenode(c.reltoastrelid) = ANY(%(nodes)s), false)
       AND NOT pg_relation_filenode(c.oid) = ANY(%(nodes)s)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND c.oid >= 16384
  AND (pg_relation_filenode(c.oid) = ANY(%(nodes)s) OR pg_relation_filenode(c.reltoastrelid) = ANY(%(nodes)s))
"""
_COLUMNS = """
SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum
"""
_KEY = """
SELECT i.indisprimary, array_agg(a.attname ORDER BY k.ord)
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid, i.indisprimary
HAVING bool_and(a.attnotnull)
ORDER BY i.indisprimary DESC, count(*), i.indexrelid
"""


def _tables(s: _Side, dbname: str, nodes: list[int]) -> dict[int, _Table]:
    """The tables of `nodes` (relfilenodes that differ), and the owners of
    TOAST relations among them (`toast_only`: their own heap did not)."""
    assert s.compute is not None
    out = {}
    for oid, nsp, rel, node, nblocks, toast_only in s.sql(_TABLES, {"nodes": nodes}, dbname):
        cols = [r[0] for r in s.sql(_COLUMNS, (oid,), dbname)]
        keys = s.sql(_KEY, (oid,), dbname)
        out[int(oid)] = _Table(int(oid), nsp, rel, int(node), cols, list(keys[0][1]) if keys else [],
                               int(nblocks), bool(toast_only))
    return out


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """[first, end) ranges of consecutive blocks."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


RUNS_PER_QUERY = 200  # TID range scans joined in one statement (PostgreSQL's parser nests UNION ALL)


def _read(s: _Side, dbname: str, t: _Table, columns: list[str], blocks: list[int] | None,
          nblocks: int = 0) -> Counter[tuple]:
    """The visible rows of `blocks` (None: all) as a multiset of text
    tuples, in one snapshot: a TID range scan per run of blocks, or, when
    they are over a quarter of the table's `nblocks`, one sequential scan
    filtered by block (cheaper than that many range scans)."""
    from psycopg import sql

    cols = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns) if columns \
        else sql.SQL("1")
    rel = sql.Identifier(t.schema, t.name)
    conn = s.conn(dbname)
    out: Counter[tuple] = Counter()
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        if blocks is None:
            out.update(tuple(r) for r in conn.execute(sql.SQL("SELECT {} FROM ONLY {}").format(cols, rel)))
        elif nblocks and len(blocks) * 4 > nblocks:
            wanted = set(blocks)
            q = sql.SQL("SELECT (ctid::text::point)[0]::bigint, {} FROM ONLY {}").format(cols, rel)
            out.update(tuple(r[1:]) for r in conn.execute(q) if r[0] in wanted)
        else:
            runs = _runs(blocks)
            for i in range(0, len(runs), RUNS_PER_QUERY):
                q = sql.SQL(" UNION ALL ").join(
                    sql.SQL("SELECT {} FROM ONLY {} WHERE ctid >= {}::tid AND ctid < {}::tid").format(
                        cols, rel, sql.Literal(f"({lo},0)"), sql.Literal(f"({hi},0)"))
                    for lo, hi in runs[i : i + RUNS_PER_QUERY])
                out.update(tuple(r) for r in conn.execute(q))
    return out


def _rows(sa: _Side, sb: _Side, pd: PageDiff, max_pages: int, shown: int | None = MAX_ROWS_SHOWN
          ) -> list[dict[str, Any]]:
    by_db: dict[int, list[RelationDiff]] = {}
    for r in pd.relations:  # (catalogs, by oid below 16384 whatever their relfilenode, are left out below)
        if r.db and (r.blocks or r.twins or r.status in ("created", "dropped", "replaced")):
            by_db.setdefault(r.db, []).append(r)
    out = []
    for db, rels in sorted(by_db.items()):
        name = sb.dbs.get(db) or sa.dbs.get(db)
        if name is None:
            continue  # (a template, or a database dropped on both sides)
        nodes = [r.relfilenode for r in rels]
        ta = _tables(sa, name, nodes) if db in sa.dbs else {}
        tb = _tables(sb, name, nodes) if db in sb.dbs else {}
        # Tables are paired by name: two branches hand out the same next oid to different tables, and a
        # table dropped and made again is the same table to its users. (One rewritten on one side has both
        # its files in `rels`, so it is found on each side.) Left over, one oid on both sides whose
        # file was there at the common point: renamed.
        by_name_a = {(t.schema, t.name): t for t in ta.values()}
        by_name_b = {(t.schema, t.name): t for t in tb.values()}
        pairs = [(by_name_a.get(n), by_name_b.get(n)) for n in sorted(by_name_a.keys() | by_name_b.keys())]

        def shared(t: _Table, db: int = db) -> bool:  # (its file was there at the common point: not made since)
            r = pd.relation(db, t.relfilenode)
            return r is None or r.status not in ("created", "replaced")

        lone_b = {b.oid: i for i, (a, b) in enumerate(pairs) if a is None and b is not None and shared(b)}
        for i, (a, b) in enumerate(pairs):
            j = lone_b.get(a.oid) if a is not None and b is None and shared(a) else None
            if j is not None:
                pairs[i], pairs[j] = (a, pairs[j][1]), (None, None)
        for a, b in pairs:
            if a is not None or b is not None:
                out.append(_table_rows(sa, sb, name, a, b, pd, db, max_pages, shown))
    return out


def _table_rows(sa: _Side, sb: _Side, dbname: str, ta: _Table | None, tb: _Table | None, pd: PageDiff,
                db: int, max_pages: int, shown: int | None) -> dict[str, Any]:
    t = tb or ta
    assert t is not None
    res: dict[str, Any] = {"database": dbname, "table": f"{t.schema}.{t.name}", "schema": t.schema,
                           "name": t.name, "oid": t.oid}
    if ta is None or tb is None:
        res["status"] = "created" if ta is None else "dropped"
    elif ta.relfilenode != tb.relfilenode or ta.oid != tb.oid:
        res["status"] = "rewritten"  # (or dropped and made again: read whole on each side)
    else:
        res["status"] = "modified"
    if ta is not None and tb is not None and (ta.schema, ta.name) != (tb.schema, tb.name):
        res["renamed_from"] = f"{ta.schema}.{ta.name}"
    rel = pd.relation(db, t.relfilenode)
    if res["status"] == "modified" and (rel is None or (not rel.blocks and not rel.twins)):
        # (only its TOAST relation differs: a value stored out of line changed under a heap tuple that
        # did not; which rows point at the changed chunks is not known here: read whole)
        res["status"] = "toast changed"
    if res["status"] == "modified":
        assert rel is not None
        # (twins too: pages written alike on both sides whose rows' transactions may have ended differently)
        read = sorted(set(rel.blocks) | set(rel.twins))
        blocks_a: list[int] | None = read
        blocks_b: list[int] | None = read
        cost = len(read)
    else:
        blocks_a = blocks_b = None  # whole
        cost = (ta.blocks if ta else 0) + (tb.blocks if tb else 0)
    res["pages_read"] = cost
    if cost > max_pages:
        res["skipped"] = f"{cost} pages to read, more than max_pages ({max_pages})"
        return res
    columns = [c for c in (tb or ta).columns if ta is None or tb is None or c in ta.columns]  # type: ignore[union-attr]
    if ta and tb and ta.columns != tb.columns:
        res["columns"] = {"added": [c for c in tb.columns if c not in ta.columns],
                          "dropped": [c for c in ta.columns if c not in tb.columns]}
    rows_a = _read(sa, dbname, ta, columns, blocks_a, rel.a_blocks if rel else 0) if ta else Counter()
    rows_b = _read(sb, dbname, tb, columns, blocks_b, rel.b_blocks if rel else 0) if tb else Counter()
    removed, added = rows_a - rows_b, rows_b - rows_a
    key = (tb or ta).key  # type: ignore[union-attr]
    key_at = [columns.index(k) for k in key] if key and all(k in columns for k in key) else None
    modified = []
    if key_at is not None:
        old = {tuple(r[i] for i in key_at): r for r in removed.elements()}
        new = {tuple(r[i] for i in key_at): r for r in added.elements()}
        for k in sorted(old.keys() & new.keys(), key=repr):
            was, now = old[k], new[k]
            modified.append({"key": dict(zip(key, k, strict=True)), "changes": {
                c: {"from_": was[i], "to_": now[i]} for i, c in enumerate(columns) if was[i] != now[i]},
                "from_": dict(zip(columns, was, strict=True))})
            removed[was] -= 1
            added[now] -= 1
        removed, added = +removed, +added
    res["key"] = key if key_at is not None else None
    res["counts"] = {"added": sum(added.values()), "removed": sum(removed.values()), "modified": len(modified)}
    res["added"] = [dict(zip(columns, r, strict=True)) for r in list(added.elements())[:shown]]
    res["removed"] = [dict(zip(columns, r, strict=True)) for r in list(removed.elements())[:shown]]
    res["modified"] = modified[:shown]
    res["columns_compared"] = columns
    return res


# --- schema -------------------------------------------------------------------------------------

def _dump(s: _Side, dbname: str) -> list[str]:
    assert s.compute is not None
    exe = os.path.join(s.compute.bindir, "pg_dump")
    from psycopg.conninfo import make_conninfo

    # (the name inside a quoted conninfo: a database named "-f/x" or "host=..." is only a name)
    target = make_conninfo(host=s.compute.socket_dir, port=s.compute.port, user="postgres", dbname=dbname)
    p = subprocess.run([exe, "--schema-only", "--no-owner", "--no-privileges", f"--dbname={target}"],
                       capture_output=True, text=True, timeout=300, check=False)
    if p.returncode != 0:
        raise BadRequestError(f"pg_dump of {dbname} at {s.address} failed: {p.stderr.strip()[-500:]}")
    # (the versions and pg_dump's \restrict key, random per dump, are not the schema)
    return [ln for ln in p.stdout.splitlines(keepends=True)
            if not ln.startswith(("-- Dumped", "\\restrict ", "\\unrestrict "))]


def _migration(sa: _Side, sb: _Side, dbname: str) -> str:
    """SQL that takes the schema of `dbname` from side a to side b (`results`,
    migra's successor); raises what it cannot express."""
    from results.dbdiff import Migration
    from results.schemainspect import PostgreSQL

    m = Migration(PostgreSQL(sa.conn(dbname).cursor()), PostgreSQL(sb.conn(dbname).cursor()))
    m.set_safety(False)  # (drops included: the caller reads them before running anything)
    m.add_all_changes_ordered()
    return str(m.statements.sql)


def _catalog_changed(sa: _Side, sb: _Side, pd: PageDiff) -> bool:
    """Whether a catalog changed: by relfilenode (pd), or, for a catalog
    that VACUUM FULL moved to a higher one, by its oid on either side."""
    if pd.catalog_changed:
        return True
    for side, dbs in ((sa, sa.dbs), (sb, sb.dbs)):
        for db, name in dbs.items():
            nodes = [r.relfilenode for r in pd.relations if r.db == db]
            if nodes and side.sql("SELECT 1 FROM pg_class WHERE oid < 16384 AND pg_relation_filenode(oid) = ANY(%s)"
                                  " LIMIT 1", (nodes,), name):
                return True
    return False


def _schema(sa: _Side, sb: _Side, pd: PageDiff, *, always: bool = False) -> dict[str, Any]:
    if not always and not _catalog_changed(sa, sb, pd):
        return {"changed": False, "diff": "", "migration": "", "skipped": "no catalog relation changed"}
    parts: list[str] = []
    migrations: list[str] = []
    unexpressed: list[str] = []
    for name in sorted((set(sa.dbs.values()) | set(sb.dbs.values())) - {"template0", "template1"}):
        da = _dump(sa, name) if name in sa.dbs.values() else []
        db_ = _dump(sb, name) if name in sb.dbs.values() else []
        part = list(difflib.unified_diff(da, db_, f"{sa.address}/{name}", f"{sb.address}/{name}"))
        parts += part
        if not part:
            continue
        if name not in sa.dbs.values() or name not in sb.dbs.values():
            unexpressed.append(f"database {name} exists on one side only: no migration within a database makes it")
            continue
        try:
            sql_text = _migration(sa, sb, name)
        except Exception as e:  # noqa: BLE001 - a library's limit: said, with the dump diff still there
            unexpressed.append(f"database {name}: the migration library could not express it ({e})")
            continue
        if sql_text.strip():
            migrations.append(f"-- database {name}\n{sql_text}")
        else:
            unexpressed.append(f"database {name}: the dumps differ where the migration library sees no change")
    text = "".join(parts)
    out: dict[str, Any] = {"changed": bool(text), "diff": text, "migration": "\n".join(migrations)}
    if unexpressed:
        out["migration_gaps"] = unexpressed
    return out
