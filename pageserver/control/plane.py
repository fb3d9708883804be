"""The control plane: databases, branches, computes on demand, scale to zero.

A *database* is a tenant: a branch of the template timeline (never an
initdb) with its own generated password and a root branch `main`. A
*branch* is a timeline branched from another branch of the same database,
at its head, at an LSN or at a wall-clock time. Branches are addressed as
`DB/BRANCH`; the proxy routes a connection by its *endpoint*, `DB.BRANCH`.

Every branch is `running` (a compute serves it) or `suspended` (no process
at all). `wake` starts a compute once however many callers ask at the same
time; `maintain` (the service calls it every second) suspends branches
idle for their idle timeout, deletes what has expired, persists last use
and deletes timelines no record points at. At most `max_computes` run:
at the cap a spare of the warm pool yields first, then the least recently
active compute without connections.

This class is the embeddable API; the HTTP API, the CLI, the SDK and the
proxy are thin layers over it.

Concurrency model
-----------------

    state                       guarded by        who waits for it
    -------------------------   ---------------   ------------------------------
    catalog.snapshot            (immutable)       nobody: readers take it whole
    catalog changes             catalog._mu       API threads, housekeeping
    _use (connections, last     _use_mu           the proxy's calls: held for
      activity, last use)                         dict updates only
    _starting (compute slots)   _slots_mu         wakes, the pool: dict updates
    _busy (timelines being      _busy_mu          creators, housekeeping's sweep
      made or torn down: held
      from before they exist)
    _warm (the pool)            _warm_mu          wakes, creates, the pool
    _buckets (API rate limits)  _rate_mu          creations: a few arithmetic steps
    a branch's compute          its branch lock   wake, suspend, reset, restore,
      (start, stop, timeline)                     detach, delete, expiry

- Readers (proxy routing, status, lists, metrics, housekeeping's choices)
  work on one immutable snapshot of the catalog (`catalog.Snapshot`): they
  never iterate a changing dict and never wait behind an fsync.
- A change is checked, committed and published at one point
  (`Catalog.change`): its checks run against the catalog as it is at
  commit time (the database still exists, the name is still free, the
  branch is still removable), so that concurrent creates and deletes
  leave no orphan record and no stale copy is written back. The fsync
  follows, outside every lock.
- No fsync, no process start or stop and no walk of the store happens
  under a lock that the proxy waits for: its calls take only `_use_mu`
  (connection counts), for a few dict operations, and read snapshots.
- A branch lock is held across its compute's start or stop. Suspension
  (idle or at the cap) and expiry after going unused re-check under it
  that no connection is open or arriving (the proxy counts a connection
  before it asks for a wake, and a wake takes the branch lock): a
  connection that arrives after the check waits for the lock and wakes
  the branch again, and none is killed. A victim's lock is only tried,
  never waited for, so no two wakes can wait on each other.
- Starting, running and warm computes are counted in one place
  (`_in_use`: the page server's computes and the slots reserved by
  starts), and a slot is taken, checked against the cap, before any
  start: the cap holds with the pool on.
- A TTL is a hard deadline: the record goes, the proxy ends the branch's
  connections with an error saying it expired, then its compute stops.
- Housekeeping does each record on its own: one that fails is logged
  and retried later (with backoff); the others go on.
- Idle timers run on a monotonic clock; expiry deadlines (TTLs, last use)
  are wall-clock times, since they are kept in the catalog across
  restarts.

Lock order (outer first): a branch lock, catalog._mu, then the leaf locks
(_busy_mu, _use_mu, _slots_mu, _warm_mu, _rate_mu, the page server's).

Limits (`pageserver.control.limits`): a database keeps those it chose; a
branch record carries a copy of its database's (the proxy reads a
branch's connection limit there), rewritten with them by
`update_database`; the rest are the service's `default_limits`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import quote

from engine import (
    HasChildrenError,
    InvalidArgumentError,
    LsnOutOfRangeError,
    NotFoundError,
    StoreConfig,
    Timeline,
)
from pageserver.compute.node import TEMPLATE_ID, Node
from pageserver.compute.paths import private_dir
from pageserver.compute.postgres import READONLY_DB_SQL, READONLY_ROLE, READONLY_ROLE_SQL, Compute
from pageserver.control.catalog import (
    CATALOG_ID,
    BranchRecord,
    Catalog,
    Change,
    Credential,
    DatabaseRecord,
    Record,
    Snapshot,
)
from pageserver.control.diff import in_flight, in_flight_between
from pageserver.control.limits import DEFAULTS, Limits, limits_of, shown
from pageserver.control.metrics import Metrics
from pageserver.control.objects import (
    MAIN,
    OPERATOR,
    BranchInfo,
    DatabaseInfo,
    check_name,
    check_report,
    iso,
    parse_duration,
    parse_time,
    sha256,
)
from pageserver.errors import (
    BadRequestError,
    ComputeLimitError,
    ComputeNotFoundError,
    ControlPlaneError,
    ObjectExistsError,
    ProtectedError,
    RateLimitedError,
    UnknownObjectError,
)
from pageserver.scram import make_verifier, new_password, new_salt

log = logging.getLogger("strata.control")

DEFAULT_IDLE_TIMEOUT = 300.0
COMPUTE_MEMORY = 256 << 20  # what one compute is budgeted (shared_buffers 128 MB and the rest)
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # housekeeping's backoff for a record that fails
_CHANGE_RETRIES = 5  # a change that raced another (its source moved) is redone this often
MAX_CREDENTIALS = 16  # a branch's live passwords (each `uri` call makes one)
SPARE_WAIT = 60.0  # at the cap, a wake waits this long at most for a starting spare, to take its slot


def default_max_computes() -> int:
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8
    return max(1, total // COMPUTE_MEMORY)


@dataclass
class _Use:
    """What the control plane knows of a branch's use (under _use_mu)."""

    connections: int = 0  # open or arriving through the proxy
    active: float = 0.0  # monotonic time of the last connect, disconnect or wake
    used: float = 0.0  # wall-clock time of the last use (persisted as last_used)
    dirty: bool = False  # `used` not yet in the catalog


class _Moved(Exception):
    """A change found its source changed since it was read: redo it."""


SessionEnder = Callable[[list[int], str], int]


class ControlPlane:
    def __init__(
        self,
        home: str,
        *,
        advertise_host: str = "127.0.0.1",
        proxy_port: int = 5432,
        max_computes: int | None = None,
        default_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        warm_pool: int = 0,
        config: StoreConfig | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        socket_group: int | None = None,
        limits: Limits | dict[str, Any] | None = None,
        remote: str | None = None,
        cache_size: int | None = None,
        durable: bool = False,
    ) -> None:
        self.home = os.path.abspath(home)
        self.default_limits = limits_of(limits).over(DEFAULTS).check()  # what a database gets unless it chooses
        self._rate_mu = threading.Lock()
        self._buckets: dict[str, tuple[float, float, int]] = {}  # caller -> (tokens, when, a minute's) (_rate_mu)
        self.advertise_host = advertise_host
        self.proxy_port = proxy_port
        self.max_computes = max_computes or default_max_computes()
        self.default_idle_timeout = default_idle_timeout
        self._clock = clock  # wall clock: deadlines kept in the catalog
        self._mono = monotonic  # idle timers
        self.ps = Node(self.home, config=config, socket_group=socket_group, remote=remote, cache_size=cache_size,
                       durable=durable)  # (the front ends' group)
        self._locks_mu = threading.Lock()
        self._branch_mu: dict[int, threading.Lock] = {}  # under _locks_mu
        self._use_mu = threading.Lock()
        self._use: dict[int, _Use] = {}  # branch id -> its use (under _use_mu)
        self._slots_mu = threading.Lock()
        self._starting: set[str] = set()  # timelines whose compute is starting (under _slots_mu)
        self._wanting = 0  # wakes waiting for room at the cap (under _slots_mu)
        self._busy_mu = threading.Lock()
        self._busy: dict[str, int] = {}  # timelines being made or torn down -> holders (under _busy_mu)
        self._reserved: set[tuple[str, ...]] = set()  # names being created (under _busy_mu)
        self._sizes_mu = threading.Lock()
        self._sizes: dict[tuple[str, int], tuple[int, int]] = {}
        self._failing: dict[tuple[str, int | str], tuple[float, float]] = {}  # housekeeping: retry at, delay
        self.warm_pool = warm_pool
        self._warm_mu = threading.Lock()
        self._warm: list[Compute] = []  # running on fresh template branches (under _warm_mu)
        self._warm_starting = 0  # (under _warm_mu)
        self._pool_wake = threading.Event()
        self._pool_thread: threading.Thread | None = None
        self._closing = False
        self.session_enders: list[SessionEnder] = []  # the proxies: end a branch's connections
        self.catalog: Catalog = None  # type: ignore[assignment]
        self.metrics = Metrics(
            databases=lambda: len(self.catalog.snapshot.databases) if self.catalog else 0,
            branches=lambda: len(self.catalog.snapshot.branches) if self.catalog else 0,
            running=lambda: len(self._running()) if self.catalog else 0,
            hits=self.limit_hits,
        )
        self._rate_hits = 0  # (under _rate_mu)

    # --- lifecycle ---------------------------------------------------------------

    def open(self) -> ControlPlane:
        private_dir(os.path.realpath(self.home))  # (a home may be a link to another disk)
        self.ps.open()
        try:
            self.ps.ensure_template()
            self.catalog = Catalog(self.ps.store)
            self._forget_passwords()
            self.sweep()
        except BaseException:
            self.ps.close()
            raise
        snap = self.catalog.snapshot
        log.info("control plane open: %d databases, %d branches, up to %d computes, PostgreSQL %s",
                 len(snap.databases), len(snap.branches), self.max_computes, self.ps.pg_version)
        if self.warm_pool > 0:
            self._pool_thread = threading.Thread(target=self._pool_loop, name="strata-warm-pool", daemon=True)
            self._pool_thread.start()
        return self

    def _forget_passwords(self) -> None:
        """Turn the plaintext passwords an older version kept (in database
        records) into credentials of their branches, and rewrite the
        records without them: the URIs handed out before still work."""
        legacy = self.catalog.legacy_passwords
        if not legacy:
            return
        now = self._clock()

        def change(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            put: list[Record] = []
            for db_id, password in legacy.items():
                db = snap.databases.get(db_id)
                if db is None:
                    continue
                put.append(db)  # (rewritten without the password)
                for br in snap.branches_in.get(db_id, {}).values():
                    br = br if br.salt else replace(br, salt=new_salt())
                    put.append(self._with_credential(br, Credential(make_verifier(password, br.salt), now), now))
            return put, []

        self.catalog.change(change)
        log.info("the passwords of %d databases are kept as SCRAM verifiers now", len(legacy))
        legacy.clear()

    def close(self) -> None:
        self._closing = True
        if self._pool_thread is not None:
            self._pool_wake.set()
            self._pool_thread.join()
        while (spare := self._take_spare()) is not None:
            try:
                self._discard_warm(spare)
            finally:
                self._release(spare.timeline_id)
        if self.catalog is not None:
            try:
                self._persist_use()
            except Exception:  # noqa: BLE001 - closing anyway
                log.exception("persisting last use")
        self.ps.close()

    def __enter__(self) -> ControlPlane:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- timelines no record points at ----------------------------------------------

    @contextlib.contextmanager
    def _holding(self, tids: Sequence[str]) -> Iterator[None]:
        """Keep the sweep off timelines while they are made or torn down."""
        with self._busy_mu:
            for t in tids:
                self._busy[t] = self._busy.get(t, 0) + 1
        try:
            yield
        finally:
            with self._busy_mu:
                for t in tids:
                    n = self._busy.get(t, 0) - 1
                    if n > 0:
                        self._busy[t] = n
                    else:
                        self._busy.pop(t, None)

    def _new_timeline(self, parent: Timeline | str, *, at_lsn: int | None = None, durable: bool = True) -> Timeline:
        """Branch a timeline, held (in _busy) from before it exists, so that
        the sweep can never take it for one left behind; the caller
        releases it with `_release` once a record points at it or it is
        gone."""
        tid = os.urandom(16).hex()
        with self._busy_mu:
            self._busy[tid] = self._busy.get(tid, 0) + 1
        try:
            return self.ps.store.branch(parent, at_lsn=at_lsn, timeline_id=tid, durable=durable)
        except BaseException:
            self._release(tid)
            raise

    def _commit_pointing_at(self, tl: Timeline, check: Change) -> bool:
        """Commit a change whose records point at `tl`, a timeline made for
        it (held since `_new_timeline`). True once committed; False if the
        check found that its source moved meanwhile (the timeline is
        deleted: the caller starts again); any other failure deletes the
        timeline and is raised. The hold is released either way."""
        try:
            self.catalog.change(check)
            return True
        except _Moved:
            self._delete_timelines([tl.id])
            return False
        except BaseException:
            self._delete_timelines([tl.id])
            raise
        finally:
            self._release(tl.id)

    def _release(self, tid: str) -> None:
        with self._busy_mu:
            n = self._busy.get(tid, 0) - 1
            if n > 0:
                self._busy[tid] = n
            else:
                self._busy.pop(tid, None)

    def sweep(self) -> list[str]:
        """Delete the timelines no record points at (a crash, or a failure,
        between making a timeline and its record, or between a record's
        deletion and its timeline's), children first. Returns their ids."""
        store = self.ps.store
        with self._busy_mu:
            ids = store.timeline_ids()
            computes = self.ps.computes()
            referenced = {TEMPLATE_ID, CATALOG_ID, *self._busy, *self.catalog.snapshot.branch_on}
            with self._warm_mu:
                referenced |= {c.timeline_id for c in self._warm}
            # a compute whose record is gone and whose stop failed: stopped here
            strays = [c for c in computes if not c.read_only and c.timeline_id not in referenced]
            keep = referenced | {c.timeline_id for c in computes}
            orphans = [t for t in ids if t not in keep]
            held = orphans + [c.timeline_id for c in strays]
            for t in held:
                self._busy[t] = self._busy.get(t, 0) + 1
        try:
            for c in strays:
                log.warning("stopping compute %s: no branch record points at its timeline %s", c.id, c.timeline_id)
                try:
                    self.ps.stop_compute(c.id)
                    orphans.append(c.timeline_id)
                except ComputeNotFoundError:
                    orphans.append(c.timeline_id)
            return self._delete_timelines(orphans, quiet=True)
        finally:
            for t in held:
                self._release(t)

    def _delete_timelines(self, tids: list[str], quiet: bool = False) -> list[str]:
        """Delete timelines, children before parents (their records are
        gone). One with a child outside the set, or whose deletion fails
        (logged, then retried by the sweep with back-off), is left; the
        others go on."""
        pending, done = list(tids), []
        while pending:
            progress = False
            for tid in list(pending):
                key = ("timeline", tid)
                failing = self._failing.get(key)
                if failing is not None and self._mono() < failing[0]:
                    pending.remove(tid)  # in back-off: a later sweep
                    continue
                try:
                    self.ps.store.delete_timeline(tid)
                except HasChildrenError:
                    continue
                except NotFoundError:
                    pass
                except Exception:  # noqa: BLE001 - the others go on; the sweep retries this one
                    delay = min(RETRY_MAX, failing[1] * 2) if failing else RETRY_FIRST
                    self._failing[key] = (self._mono() + delay, delay)
                    log.exception("deleting timeline %s failed; the sweep retries it in %.0f s", tid, delay)
                else:
                    done.append(tid)
                    self._failing.pop(key, None)
                pending.remove(tid)
                progress = True
            if not progress:
                if not quiet:
                    log.info("timelines %s still have children; the sweep deletes them later", pending)
                break
        for tid in done:
            if quiet:
                log.info("deleted unreferenced timeline %s", tid)
        return done

    # --- lookups (on a snapshot: no lock) ---------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.catalog.snapshot

    @staticmethod
    def _db(snap: Snapshot, name: str) -> DatabaseRecord:
        db = snap.database_named.get(name)
        if db is None:
            raise UnknownObjectError("database", name)
        return db

    @staticmethod
    def _branch(snap: Snapshot, db: str | DatabaseRecord, name: str) -> BranchRecord:
        rec = db if isinstance(db, DatabaseRecord) else ControlPlane._db(snap, db)
        br = snap.branch_named.get((rec.id, name))
        if br is None:
            raise UnknownObjectError("branch", f"{rec.name}/{name}")
        return br

    @staticmethod
    def _branches_of(snap: Snapshot, db: DatabaseRecord) -> list[BranchRecord]:
        return sorted(snap.branches_in.get(db.id, {}).values(), key=lambda b: b.id)

    def _timeline(self, br: BranchRecord) -> Timeline:
        return self.ps.store.timeline(br.timeline)

    def resolve(self, address: str) -> BranchRecord:
        """`DB/BRANCH`, `DB.BRANCH` (an endpoint) or `DB` (its main branch).
        Lock-free: it reads one snapshot (the proxy calls it for every connection)."""
        if not isinstance(address, str) or not address:
            raise BadRequestError(f"invalid branch address {address!r}: use DB/BRANCH")
        snap = self.catalog.snapshot
        for sep in ("/", "."):
            if sep in address:
                db, name = address.split(sep, 1)
                return self._branch(snap, db, name)
        return self._branch(snap, address, MAIN)

    def endpoint(self, br: BranchRecord) -> str:
        db = self.catalog.snapshot.databases.get(br.database)  # gone while a deleted database's branches stop
        return f"{db.name if db else '(deleted)'}.{br.name}"

    def _uri(self, br: BranchRecord, password: str | None = None, user: str = "postgres") -> str:
        """The branch's URI at the proxy: with `password` if given (it is
        shown only when it is made), without one otherwise."""
        who = f"{user}:{quote(password, safe='')}" if password is not None else user
        return (f"postgresql://{who}@{self.advertise_host}:{self.proxy_port}"
                f"/postgres?options=endpoint%3D{quote(self.endpoint(br), safe='')}")

    def _credential(self, br: BranchRecord, now: float, ttl: float | None = None,
                    role: str | None = None) -> tuple[str, Credential]:
        """A new password of `br`'s and its credential (the verifier, with
        the branch's salt; `role`: the only role it opens the branch as)."""
        if not br.salt:
            raise ValueError(f"branch #{br.id} has no salt for its credentials")
        password = new_password()
        return password, Credential(make_verifier(password, br.salt), now, now + ttl if ttl else None, role)

    def _with_first_credential(self, br: BranchRecord, now: float) -> tuple[str, BranchRecord]:
        """A new branch's record with its salt and first credential, and
        that credential's password."""
        br = replace(br, salt=new_salt())
        password, cred = self._credential(br, now)
        return password, replace(br, credentials=(cred,))

    @staticmethod
    def _with_credential(br: BranchRecord, cred: Credential, now: float) -> BranchRecord:
        """`br` with `cred` added (its expired ones dropped, and the oldest
        of its role's beyond MAX_CREDENTIALS: a read-only agent's passwords
        never push out the owner's)."""
        live = br.live_credentials(now)
        same = [c for c in live if c.role == cred.role]
        drop = {id(c) for c in same[:max(0, len(same) + 1 - MAX_CREDENTIALS)]}
        return replace(br, credentials=(*(c for c in live if id(c) not in drop), cred))

    def uri(self, address: str | BranchRecord, *, ttl: float | str | None = None, caller: str | None = None,
            readonly: bool = False) -> str:
        """A URI of the branch with a new password of its own (valid for
        `ttl`, or as long as the branch; shown here only: the catalog keeps
        its verifier). A branch holds MAX_CREDENTIALS at most: a new one
        past that retires the oldest. `readonly`: the password opens the
        branch only as READONLY_ROLE, which PostgreSQL itself keeps from
        writing (the branch wakes, to make the role as it must be)."""
        if not isinstance(readonly, bool):
            raise BadRequestError(f"readonly must be true or false, not {readonly!r}")
        ttl_s = parse_duration(ttl, "ttl")
        br = address if isinstance(address, BranchRecord) else self.resolve(address)
        self._spend(caller)
        if readonly:
            self._ensure_readonly_role(br)
        now = self._clock()
        password, cred = self._credential(br, now, ttl_s, READONLY_ROLE if readonly else None)

        def check(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            current = snap.branches.get(br.id)
            if current is None or snap.databases.get(br.database) is None:
                raise UnknownObjectError("branch", self.endpoint(br))
            return [self._with_credential(current, cred, now)], []

        self.catalog.change(check)
        log.info("branch %s has a new %scredential%s", self.endpoint(br), "read-only " if readonly else "",
                 f" for {ttl_s:g} s" if ttl_s else "")
        return self._uri(br, password, cred.role or "postgres")

    def _ensure_readonly_role(self, br: BranchRecord) -> None:
        """Make READONLY_ROLE in the branch's PostgreSQL as it must be (a
        database made before it existed, or a tenant that changed it)."""
        import psycopg

        c = self.wake(br)
        with psycopg.connect(c.local_conninfo(), connect_timeout=30) as conn:
            with conn.transaction():
                conn.execute(b"SELECT pg_advisory_xact_lock(4242, 1)")  # (two at once: one after the other)
                for statement in READONLY_ROLE_SQL.splitlines():
                    conn.execute(statement.encode())
            names = [r[0] for r in conn.execute(b"SELECT datname FROM pg_database WHERE datallowconn")]
        for dbname in names:
            # (the name as a keyword: a database called "x host=..." is only a name)
            with psycopg.connect(c.local_conninfo(), dbname=dbname, autocommit=True, connect_timeout=30) as conn:
                conn.execute(READONLY_DB_SQL.strip().encode())

    # --- databases ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _reserve(self, key: tuple[str, ...]) -> Iterator[None]:
        """Hold a name while it is being created, so that two creations of
        one name do not both do the work (the commit decides, though)."""
        with self._busy_mu:
            if key in self._reserved:
                raise ObjectExistsError(key[0], "/".join(key[1:]))
            self._reserved.add(key)
        try:
            yield
        finally:
            with self._busy_mu:
                self._reserved.discard(key)

    def create_database(
        self, name: str | None = None, *, ttl: float | str | None = None,
        idle_timeout: float | str | None = None, expire_after_idle: float | str | None = None,
        limits: Limits | dict[str, Any] | None = None, caller: str | None = None, durable: bool = False,
    ) -> DatabaseInfo:
        """A new database (a branch of the template: O(1), no initdb) with a
        root branch `main`, suspended until its first connection (or served
        at once by a compute of the warm pool). Its `token` (returned here
        only) manages this database's branches and nothing else. `limits`
        are those it chooses (the rest are the service's defaults);
        `caller` (the API's: whose token) is rate-limited. `durable` (with
        a remote): its commits return once the object store has them."""
        t0 = time.monotonic()
        if name is None:
            name = f"db-{secrets.token_hex(4)}"
        check_name("database", name)
        ttl_s = parse_duration(ttl, "ttl")
        idle_s = parse_duration(idle_timeout, "idle timeout")
        expire_s = parse_duration(expire_after_idle, "expire-after-idle")
        chosen = limits_of(limits)
        chosen.over(self.default_limits).check()  # (together with the defaults)
        self._check_durable(durable)
        now = self._clock()
        self._spend(caller)
        with self._reserve(("database", name)):
            if name in self.catalog.snapshot.database_named:
                raise ObjectExistsError("database", name)
            token = secrets.token_urlsafe(24)
            # a warm compute runs with the defaults: a database that chose other settings starts its own
            warm = self._claim_warm() if self._runs_as_defaults(chosen) else None  # held for us
            tl_id = warm.timeline_id if warm else self._new_timeline(TEMPLATE_ID, durable=False).id
            try:
                db = DatabaseRecord(
                    id=self.catalog.new_id(), name=name, created_at=now, expires_at=now + ttl_s if ttl_s else None,
                    idle_timeout=idle_s, expire_after_idle=expire_s, last_used=now, token_sha256=sha256(token),
                    limits=chosen, durable=bool(durable),
                )
                main = BranchRecord(
                    id=self.catalog.new_id(), database=db.id, name=MAIN, timeline=tl_id, created_at=now,
                    expires_at=db.expires_at, idle_timeout=idle_s, expire_after_idle=expire_s, last_used=now,
                    limits=chosen,
                )
                password, main = self._with_first_credential(main, now)

                def check(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
                    if name in snap.database_named:
                        raise ObjectExistsError("database", name)
                    return [db, main], []

                self.catalog.change(check)
            except BaseException:
                if warm is not None:
                    self._discard_warm(warm)
                else:
                    self._delete_timelines([tl_id])
                raise
            finally:
                self._release(tl_id)
            if warm is not None:
                self._limit_running(warm, self._limits(main))
                self._touch(main.id, now)
        self.metrics.create.observe(time.monotonic() - t0)
        log.info("database %s created (timeline %s%s)", name, tl_id, ", warm compute" if warm else "")
        info = self.database(name)
        info.token = token
        info.password = password
        info.uri = self._uri(main, password)
        return info

    def claim_database(self, name: str, *, caller: str | None = None) -> DatabaseInfo:
        """Keep a temporary database: its TTL and expiry when unused go (and
        those each branch has from it), every password and its token are replaced
        (their connections are ended, saying why). Returns it with its new
        URI and token (shown only here)."""
        self._spend(caller)
        now = self._clock()
        token = secrets.token_urlsafe(24)
        made: list[tuple[str, BranchRecord]] = []
        gone: list[BranchRecord] = []

        def change(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            db = self._db(snap, name)
            branches = self._branches_of(snap, db)
            out: list[Record] = [replace(db, expires_at=None, expire_after_idle=None, token_sha256=sha256(token))]
            made.clear()
            for b in branches:
                same = b.expire_after_idle == db.expire_after_idle
                kept = replace(b, expires_at=None if b.expires_at == db.expires_at else b.expires_at,
                               expire_after_idle=None if same else b.expire_after_idle, credentials=())
                if b.name == MAIN:
                    password, cred = self._credential(kept, now)
                    kept = replace(kept, credentials=(cred,))
                    made.append((password, kept))
                out.append(kept)
            gone[:] = branches
            return out, []

        self.catalog.change(change)
        self._end_sessions(gone, f"database {name} was claimed: its passwords changed")
        log.info("database %s claimed: no TTL, new passwords and token", name)
        info = self.database(name)
        info.token = token
        password, main = made[0]
        info.password = password
        info.uri = self._uri(main, password)
        return info

    def _check_durable(self, durable: object) -> None:
        if not isinstance(durable, bool):
            raise BadRequestError(f"durable must be true or false, not {durable!r}")
        if durable and self.ps.remote_url is None:
            raise BadRequestError("durable needs a remote: it makes commits wait for the object store "
                                  "(start the service with --remote)")

    def database(self, name: str) -> DatabaseInfo:
        snap = self.catalog.snapshot
        db = self._db(snap, name)
        main = self._branch(snap, db, MAIN)
        branches = self._branches_of(snap, db)
        return DatabaseInfo(
            name=db.name, branch=MAIN, uri=self._uri(main), created_at=iso(db.created_at),
            expires_at=iso(db.expires_at), idle_timeout=db.idle_timeout or self.default_idle_timeout,
            expire_after_idle=db.expire_after_idle,
            last_used=iso(max([db.last_used] + [self._last_used(b) for b in branches])),
            branches=[b.name for b in branches], limits=self._limits(db).given(), durable=db.durable,
        )

    def databases(self) -> list[DatabaseInfo]:
        snap = self.catalog.snapshot
        out = []
        for name in sorted(snap.database_named):
            with contextlib.suppress(UnknownObjectError):  # deleted meanwhile
                out.append(self.database(name))
        return out

    def delete_database(self, name: str) -> None:
        """Stop its computes and delete it with every branch (space comes
        back with GC). Refused while any of its branches is protected."""
        self._delete_database(name, why="was deleted")

    def _delete_database(self, name: str, *, why: str, unless_used_since: float | None = None,
                         expected_id: int | None = None, still: Callable[[Record], bool] | None = None) -> bool:
        """Delete a database (checked at commit time: the branches deleted
        are those it has then). With `unless_used_since`, only if none of
        its branches has a connection or was used since that wall time;
        with `still`, only if the record as it is then still expires (a
        claim meanwhile keeps it). Returns whether it was deleted."""
        gone: list[BranchRecord] = []

        def check(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            db = self._db(snap, name)
            if expected_id is not None and db.id != expected_id:
                raise UnknownObjectError("database", name)  # another database took the name meanwhile
            if still is not None and not still(db):
                raise _Moved()
            branches = self._branches_of(snap, db)
            for b in branches:
                if b.protected:
                    raise ProtectedError(f"{name}/{b.name}", "deleted with its database")
            if unless_used_since is not None and any(self._in_use_since(b, unless_used_since) for b in branches):
                raise _Moved()
            with self._busy_mu:
                for b in branches:
                    self._busy[b.timeline] = self._busy.get(b.timeline, 0) + 1
            gone[:] = branches
            return [], [db, *branches]  # first: no wake can start one after this

        if not self._commit_removal(check, gone):
            return False
        try:
            self._stop_all(gone, f"database {name} {why}")
            self._delete_timelines([b.timeline for b in gone])
        finally:
            for b in gone:
                self._release(b.timeline)
        log.info("database %s %s (%d branches)", name, why, len(gone))
        return True

    # --- branches ----------------------------------------------------------------------

    def create_branch(
        self, database: str, name: str, *, parent: str = MAIN, lsn: int | None = None,
        time: str | float | dt.datetime | None = None, ttl: float | str | None = None,
        idle_timeout: float | str | None = None, expire_after_idle: float | str | None = None,
        protected: bool = False, caller: str | None = None,
    ) -> BranchInfo:
        """A branch of `parent` (same database, and its limits) at its head,
        at `lsn`, or as of `time`: one metadata write, whatever the size of
        the data."""
        check_name("branch", name)
        if lsn is not None and time is not None:
            raise BadRequestError("give an LSN or a time to branch at, not both")
        ttl_s = parse_duration(ttl, "ttl")
        idle_s = parse_duration(idle_timeout, "idle timeout")
        expire_s = parse_duration(expire_after_idle, "expire-after-idle")
        when = parse_time(time, self._clock()) if time is not None else None
        now = self._clock()
        self._spend(caller)
        t0 = _monotonic()
        with self._reserve(("branch", database, name)):
            for _ in range(_CHANGE_RETRIES):
                snap = self.catalog.snapshot
                db = self._db(snap, database)
                if (db.id, name) in snap.branch_named:
                    raise ObjectExistsError("branch", f"{database}/{name}")
                src = self._branch(snap, db, parent)
                live = self.ps.compute_of(src.timeline) if when is None and lsn is None else None
                before = in_flight(live) if live is not None else None
                try:
                    src_tl = self._timeline(src)
                    at = src_tl.lsn_at(when) if when is not None else lsn
                    tl = self._new_timeline(src_tl, at_lsn=at, durable=False)
                except (LsnOutOfRangeError, InvalidArgumentError) as e:
                    raise BadRequestError(f"cannot branch {database}/{parent} there: {e}") from e
                except NotFoundError:
                    continue  # the parent was reset or restored meanwhile: its timeline is gone
                after = in_flight(live) if before is not None and live is not None else None
                if live is not None and before and after:
                    xids: list[int] | None = in_flight_between(before, after)
                elif live is None and when is None and lsn is None and not self.ps.compute_of(src.timeline):
                    xids = []  # (no compute, before or after: nothing was in flight at its head)
                else:
                    xids = None  # (unknown: at an LSN or a time, or the compute did not answer)
                extra = {"in_flight": {"timeline": src_tl.id, "lsn": tl.branch_lsn, "xids": xids}} if (
                    when is None and lsn is None) else {}
                br = BranchRecord(
                    id=self.catalog.new_id(), database=db.id, name=name, timeline=tl.id, created_at=now,
                    parent=src.id, expires_at=now + ttl_s if ttl_s else None, extra=extra,
                    idle_timeout=idle_s if idle_s is not None else db.idle_timeout,
                    expire_after_idle=expire_s if expire_s is not None else db.expire_after_idle,
                    protected=bool(protected), last_used=now, limits=db.limits,
                )
                password, br = self._with_first_credential(br, now)

                def check(snap: Snapshot, db: DatabaseRecord = db, src: BranchRecord = src,
                          br: BranchRecord = br) -> tuple[Sequence[Record], Sequence[Record]]:
                    if snap.databases.get(db.id) is None:
                        raise UnknownObjectError("database", database)  # deleted meanwhile
                    now_src = snap.branches.get(src.id)
                    if now_src is None:
                        raise UnknownObjectError("branch", f"{database}/{parent}")
                    if now_src.timeline != src.timeline:
                        raise _Moved()  # reset or restored meanwhile: branch from what it is now
                    if (db.id, name) in snap.branch_named:
                        raise ObjectExistsError("branch", f"{database}/{name}")
                    now_db = snap.databases[db.id]
                    return [replace(br, limits=now_db.limits)], []  # (changed meanwhile: the new ones)

                if self._commit_pointing_at(tl, check):
                    break
            else:
                raise BadRequestError(f"{database}/{parent} kept changing while {name} was branched from it; "
                                      "try again")
        self.metrics.branch.observe(_monotonic() - t0)
        log.info("branch %s/%s created from %s at LSN %d (timeline %s)",
                 database, name, parent, tl.branch_lsn, tl.id)
        info = self.branch(database, name, sizes=False)  # sizes take a scan: ask for them later
        info.password = password
        info.uri = self._uri(br, password)
        return info

    def branch(self, database: str, name: str, *, sizes: bool = True) -> BranchInfo:
        return self._reading(database, name, lambda snap, br: self._info(snap, br, sizes=sizes))

    def _reading(self, database: str, name: str, read: Callable[[Snapshot, BranchRecord], Any]) -> Any:
        """Read a branch through its timeline, on a snapshot: if a reset or
        restore replaced (and deleted) the timeline meanwhile, read again
        on a newer snapshot; if the branch went, UnknownObjectError."""
        for _ in range(_CHANGE_RETRIES):
            snap = self.catalog.snapshot
            br = self._branch(snap, database, name)
            try:
                return read(snap, br)
            except NotFoundError:
                continue
        raise UnknownObjectError("branch", f"{database}/{name}")

    def branches(self, database: str, *, sizes: bool = True) -> list[BranchInfo]:
        snap = self.catalog.snapshot
        out = []
        for b in self._branches_of(snap, self._db(snap, database)):
            with contextlib.suppress(NotFoundError):  # its timeline went with a reset meanwhile
                out.append(self._info(snap, b, sizes=sizes))
        return out

    def _info(self, snap: Snapshot, br: BranchRecord, *, sizes: bool) -> BranchInfo:
        tl = self._timeline(br)
        db = snap.databases[br.database]
        parent = snap.branches.get(br.parent) if br.parent else None
        logical = exclusive = None
        if sizes:
            logical, exclusive = self._size(tl)
        with self._use_mu:
            use = self._use.get(br.id)
            connections = use.connections if use else 0
        return BranchInfo(
            database=db.name, name=br.name, endpoint=f"{db.name}.{br.name}", uri=self._uri(br),
            state="running" if self.ps.compute_of(br.timeline) else "suspended", lsn=tl.head_lsn,
            timeline=br.timeline, parent=parent.name if parent else None, created_at=iso(br.created_at),
            expires_at=iso(br.expires_at), idle_timeout=self._idle_timeout(br),
            expire_after_idle=br.expire_after_idle, protected=br.protected, last_used=iso(self._last_used(br)),
            connections=connections, logical_size=logical, exclusive_size=exclusive,
            limits=self._limits(br).given(), data_size=self.ps.data_size(br.timeline),
        )

    def _size(self, tl: Timeline) -> tuple[int, int]:
        """(logical size, bytes it alone holds), cached per head LSN."""
        key = (tl.id, tl.head_lsn)
        with self._sizes_mu:
            hit = self._sizes.get(key)
        if hit is None:
            u = tl.usage()
            hit = (u.logical_size, u.exclusive_size + u.inmemory_size)
            with self._sizes_mu:
                self._sizes[key] = hit
                if len(self._sizes) > 4096:
                    self._sizes.pop(next(iter(self._sizes)))
        return hit

    def _idle_timeout(self, br: BranchRecord) -> float:
        return br.idle_timeout or self.default_idle_timeout

    # --- limits ------------------------------------------------------------------------

    def _limits(self, rec: DatabaseRecord | BranchRecord) -> Limits:
        return rec.limits.over(self.default_limits)

    @staticmethod
    def _compute_limits(limits: Limits) -> dict[str, Any]:
        return {"settings": limits.settings(), "max_size": limits.max_size or None, "memory": limits.memory or None}

    def _runs_as_defaults(self, chosen: Limits) -> bool:
        """Would a compute with these limits start as a warm one did? (The
        memory limit can be changed on a running compute; the rest cannot,
        and a cap must be there before the first file is opened.)"""
        mine, defaults = chosen.over(self.default_limits), self.default_limits
        return (mine.settings() == defaults.settings() and mine.max_size == defaults.max_size
                and bool(mine.memory) == bool(defaults.memory))  # (a warm one has a group only if they do)

    def _limit_running(self, c: Compute, limits: Limits) -> None:
        """Give a running compute new limits (the catalog has them already:
        one that cannot be set now is logged, and its next start has it)."""
        try:
            self.ps.set_max_size(c.id, limits.max_size or None)
            self.ps.set_memory(c.id, limits.memory or None)
        except ComputeNotFoundError:
            pass  # stopped meanwhile
        except OSError as e:
            log.warning("compute %s keeps its memory limit until it restarts: %s", c.id, e)

    def _spend(self, caller: str | None) -> None:
        """Take one creation from `caller`'s bucket (a token's: OPERATOR,
        or the database its scoped token belongs to); RateLimitedError when
        it is empty. In-process callers (None) are not limited."""
        if caller is None:
            return
        if caller == OPERATOR:
            per_minute, who = self.default_limits.creations_per_minute or 0, "the operator's token"
        else:
            db = self.catalog.snapshot.database_named.get(caller)
            per_minute = (self._limits(db).creations_per_minute if db else self.default_limits.creations_per_minute) or 0
            who = f"database {caller}'s token"
        if per_minute <= 0:
            return
        now = self._mono()
        with self._rate_mu:
            tokens, then, was = self._buckets.pop(caller, (float(per_minute), now, per_minute))  # (re-put: newest)
            tokens += max(0, per_minute - was)  # (a raised limit gives its room at once)
            tokens = min(float(per_minute), tokens + (now - then) * per_minute / 60.0)
            if tokens < 1.0:
                self._buckets[caller] = (tokens, now, per_minute)
                self._rate_hits += 1
                raise RateLimitedError(who, per_minute, (1.0 - tokens) * 60.0 / per_minute)
            self._buckets[caller] = (tokens - 1.0, now, per_minute)
            if len(self._buckets) > 65536:  # (forget the oldest: a full bucket is what a new one is)
                self._buckets.pop(next(iter(self._buckets)))

    def limit_hits(self) -> dict[str, int]:
        """How often each limit refused something since the service started
        (the proxy counts refused connections itself: strata_proxy_refused)."""
        with self._rate_mu:
            rate = self._rate_hits
        return {"storage": self.ps.storage_refusals, "rate": rate, "memory": self.ps.oom_kills()}

    def update_database(self, name: str, *, limits: Limits | dict[str, Any] | None = None,
                        durable: bool | None = None) -> DatabaseInfo:
        """Change the limits a database chose (those not given stay as they
        are). Its running computes take a new cap and memory limit at once;
        shared_buffers and work_mem at their next start. `durable` (with a
        remote) turns its durable mode on or off, for its running computes'
        next commits too."""
        chosen = limits_of(limits)
        if durable is not None:
            self._check_durable(durable)

        def change(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            db = self._db(snap, name)
            merged = Limits(**{**db.limits.given(), **chosen.given()})
            merged.over(self.default_limits).check()
            db = replace(db, limits=merged, durable=db.durable if durable is None else bool(durable))
            return [db, *(replace(b, limits=merged) for b in snap.branches_in.get(db.id, {}).values())], []

        self.catalog.change(change)
        snap = self.catalog.snapshot
        db = self._db(snap, name)
        for br in self._branches_of(snap, db):
            with self._lock_of(br):  # (a wake that read the old record has registered its compute by now)
                c = self.ps.compute_of(br.timeline)
                if c is not None:
                    self._limit_running(c, self._limits(br))
        log.info("database %s limits: %s%s", name, shown(self._limits(db)), ", durable" if db.durable else "")
        return self.database(name)

    def update_branch(
        self, database: str, name: str, *, protected: bool | None = None, ttl: float | str | None = None,
        idle_timeout: float | str | None = None, expire_after_idle: float | str | None = None,
    ) -> BranchInfo:
        ttl_s = parse_duration(ttl, "ttl")
        idle_s = parse_duration(idle_timeout, "idle timeout")
        expire_s = parse_duration(expire_after_idle, "expire-after-idle")
        now = self._clock()

        def change(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            br = self._branch(snap, database, name)
            new = br
            if protected is not None:
                new = replace(new, protected=bool(protected))
            if ttl_s is not None:
                new = replace(new, expires_at=now + ttl_s)
            if idle_s is not None:
                new = replace(new, idle_timeout=idle_s)
            if expire_s is not None:
                new = replace(new, expire_after_idle=expire_s)
            return [new], []

        self.catalog.change(change)
        return self.branch(database, name)

    def delete_branch(self, database: str, name: str) -> None:
        self._delete_branch(database, name, why="was deleted")

    def _delete_branch(self, database: str, name: str, *, why: str, unless_used_since: float | None = None,
                       expected_id: int | None = None, still: Callable[[Record], bool] | None = None) -> bool:
        gone: list[BranchRecord] = []

        def check(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            br = self._branch(snap, database, name)
            if expected_id is not None and br.id != expected_id:
                raise UnknownObjectError("branch", f"{database}/{name}")
            if still is not None and not still(br):
                raise _Moved()
            self._check_removable(snap, br, "deleted")
            if unless_used_since is not None and self._in_use_since(br, unless_used_since):
                raise _Moved()
            with self._busy_mu:
                self._busy[br.timeline] = self._busy.get(br.timeline, 0) + 1
            gone.append(br)
            return [], [br]  # first: no wake can start it after this

        if not self._commit_removal(check, gone):
            return False
        (br,) = gone
        try:
            self._stop_all(gone, f"branch {database}/{name} {why}")
            self._delete_timelines([br.timeline])
        finally:
            self._release(br.timeline)
        log.info("branch %s/%s %s", database, name, why)
        return True

    def _commit_removal(self, check: Change, gone: list[BranchRecord]) -> bool:
        """Commit a removal whose check holds the timelines of what it
        removes (in `gone`); if the commit fails they are released. False
        if the check found it should not happen after all."""
        try:
            self.catalog.change(check)
        except BaseException as e:
            for b in gone:
                self._release(b.timeline)
            if isinstance(e, _Moved):
                return False
            raise
        return True

    def _check_removable(self, snap: Snapshot, br: BranchRecord, action: str) -> None:
        db = snap.databases.get(br.database)
        where = f"{db.name if db else '?'}/{br.name}"
        if br.protected:
            raise ProtectedError(where, action)
        if br.name == MAIN and action == "deleted":
            raise BadRequestError(f"{where} is the database's root branch: delete the database instead")
        kids = {b.name for b in snap.children(br)}
        for tid in self.ps.store.children(br.timeline):  # e.g. a branch restored from this one
            kid = snap.branch_on.get(tid)
            if kid is not None:
                kids.add(kid.name)
        if kids:
            raise BadRequestError(f"branch {where} cannot be {action}: branches {sorted(kids)} were "
                                  "made from it (delete or detach them first)")

    def _stop_all(self, gone: Sequence[BranchRecord], why: str) -> None:
        """Stop the computes of branches whose records are gone, each on its
        own, their connections told `why`: one that fails is logged (the
        sweep stops it later) and the others still stop. (The connections
        are ended under the branch lock, right before the stop: a client
        that joined a wake begun before the removal has its session by
        then, and hears why, not the compute's shutdown.)"""
        for b in gone:
            try:
                self._stop(b, why)
            except Exception:  # noqa: BLE001 - the others must stop too
                log.exception("stopping the compute of deleted branch %s (timeline %s); the sweep retries",
                              b.name, b.timeline)
            self._forget(b)

    def _forget(self, br: BranchRecord) -> None:
        with self._use_mu:
            self._use.pop(br.id, None)
        with self._locks_mu:
            self._branch_mu.pop(br.id, None)

    def reset_branch(self, database: str, name: str) -> BranchInfo:
        """Make the branch its parent's head again (what it wrote is gone)."""
        snap = self.catalog.snapshot
        br = self._branch(snap, database, name)
        if br.parent is None:
            raise BadRequestError(f"{database}/{name} has no parent to reset to")
        self._check_removable(snap, br, "reset")
        old: list[str] = []
        with self._lock_of(br):
            br = self._current(br, database, name)  # another reset may have replaced its timeline
            self._stop_locked(br, why=f"branch {database}/{name} was reset")
            for _ in range(_CHANGE_RETRIES):
                parent = self.catalog.snapshot.branches.get(br.parent) if br.parent is not None else None
                if parent is None:
                    raise UnknownObjectError("branch", f"{database}/(parent of {name})")
                try:
                    tl = self._new_timeline(parent.timeline)
                except NotFoundError:
                    continue  # the parent's timeline changed meanwhile

                def check(snap: Snapshot, parent: BranchRecord = parent,
                          tl: Timeline = tl) -> tuple[Sequence[Record], Sequence[Record]]:
                    current = self._branch(snap, database, name)
                    if current.id != br.id:
                        raise UnknownObjectError("branch", f"{database}/{name}")
                    self._check_removable(snap, current, "reset")
                    now_parent = snap.branches.get(current.parent) if current.parent else None
                    if now_parent is None:
                        raise BadRequestError(f"{database}/{name} has no parent to reset to")
                    if now_parent.timeline != parent.timeline:
                        raise _Moved()
                    old[:] = [current.timeline]
                    return [replace(current, timeline=tl.id)], []  # the record as it is now, not a stale copy

                if self._commit_pointing_at(tl, check):
                    break
            else:
                raise BadRequestError(f"the parent of {database}/{name} kept changing; try again")
        self._delete_timelines(old)
        log.info("branch %s/%s reset to the head of %s (timeline %s)", database, name, parent.name, tl.id)
        return self.branch(database, name)

    def restore_branch(
        self, database: str, name: str, *, lsn: int | None = None, time: str | float | dt.datetime | None = None,
        caller: str | None = None,
    ) -> tuple[BranchInfo, BranchInfo]:
        """Take the branch back to its own state at `lsn` or `time`; what it
        was before is kept as a new branch `NAME-backup-<UTC time>` (a
        creation, for the caller's rate). Returns (the branch, the backup)."""
        if (lsn is None) == (time is None):
            raise BadRequestError("restore needs an LSN or a time (one of them)")
        when = parse_time(time, self._clock()) if time is not None else None

        def make(old: Timeline) -> Timeline:
            try:
                at = old.lsn_at(when) if when is not None else lsn
                return self._new_timeline(old, at_lsn=at)
            except (LsnOutOfRangeError, InvalidArgumentError) as e:
                raise BadRequestError(f"cannot restore {database}/{name} there: {e}") from e

        branch, backup = self._replace_timeline(database, name, make, "restored", caller)
        log.info("branch %s/%s restored to %s; its previous state is branch %s",
                 database, name, f"LSN {lsn}" if lsn is not None else when, backup.name)
        return branch, backup

    def _replace_timeline(self, database: str, name: str, make: Callable[[Timeline], Timeline], why: str,
                          caller: str | None) -> tuple[BranchInfo, BranchInfo]:
        """Stop the branch, point it at the timeline `make(its timeline)`
        returns (a new one, held since `_new_timeline`), and keep what it
        was as a new branch `NAME-backup-<UTC time>` (a creation, for the
        caller's rate). Returns (the branch, the backup)."""
        br = self.resolve(f"{database}/{name}")
        self._spend(caller)
        names: list[str] = []
        with self._lock_of(br):
            br = self._current(br, database, name)  # another reset may have replaced its timeline
            self._stop_locked(br, why=f"branch {database}/{name} was {why}")
            tl = make(self._timeline(br))  # (the branch lock keeps its timeline: reset and restore take it)
            stamp = dt.datetime.fromtimestamp(self._clock(), dt.UTC).strftime("%Y%m%dt%H%M%S")
            backup_id = self.catalog.new_id()

            def check(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
                current = self._branch(snap, database, name)
                if current.id != br.id or current.timeline != br.timeline:
                    raise UnknownObjectError("branch", f"{database}/{name}")
                backup_name = f"{name}-backup-{stamp}"[:63]
                if (current.database, backup_name) in snap.branch_named:
                    backup_name = f"{backup_name[:55]}-{secrets.token_hex(3)}"
                backup = replace(current, id=backup_id, name=backup_name, protected=False,
                                 created_at=self._clock())
                moved = [replace(c, parent=backup.id) for c in snap.children(current)]
                names[:] = [backup_name]
                return [backup, replace(current, timeline=tl.id), *moved], []

            self._commit_pointing_at(tl, check)
        return self.branch(database, name), self.branch(database, names[0])

    def detach_branch(self, database: str, name: str) -> BranchInfo:
        """Give the branch its own copy of what it shares with its parent, so
        that the parent can be deleted. Takes time in proportion to the data
        (its compute, if it runs, keeps serving meanwhile)."""
        br = self.resolve(f"{database}/{name}")
        # Not under the branch lock: the copy takes time in proportion to the data, and wakes
        # (new connections) wait for that lock. A reset or restore meanwhile replaces the
        # timeline: then the commit is refused, and the caller may try again.
        try:
            tl = self._timeline(br)
            if tl.ancestor_id is not None:
                self.ps.store.detach(tl)
        except NotFoundError as e:  # deleted, or reset or restored, meanwhile
            raise UnknownObjectError("branch", f"{database}/{name}") from e
        except InvalidArgumentError:
            pass  # a detach at the same time did it: done

        def change(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            current = self._branch(snap, database, name)
            if current.id != br.id:
                raise UnknownObjectError("branch", f"{database}/{name}")
            if current.timeline != br.timeline:
                raise BadRequestError(f"{database}/{name} was reset or restored while it was detached; "
                                      "detach it again")
            return [replace(current, parent=None)], []

        self.catalog.change(change)
        log.info("branch %s/%s detached", database, name)
        return self.branch(database, name)

    def diff(self, a: str, b: str, *, rows: bool = True, schema: bool = False,
             max_pages: int | None = None) -> dict[str, Any]:
        """What changed between two points (`DB/BRANCH[@LSN|@TIME]`): relations
        and pages, rows, schema. See `pageserver.control.diff`."""
        from pageserver.control import diff

        return diff.diff(self, a, b, rows=rows, schema=schema,
                         max_pages=diff.DEFAULT_MAX_PAGES if max_pages is None else max_pages)

    def merge(self, source: str, target: str, *, dry_run: bool = False, max_pages: int | None = None,
              caller: str | None = None) -> dict[str, Any]:
        """Merge branch `source` into `target` (`DB/BRANCH`, one database):
        fast-forward in O(1) if the target changed nothing since their common
        point, else a row patch guarded row by row. See `pageserver.control.merge`."""
        from pageserver.control import diff, merge

        return merge.merge(self, source, target, dry_run=dry_run, caller=caller,
                           max_pages=diff.DEFAULT_MAX_PAGES if max_pages is None else max_pages)

    def lsn(self, database: str, name: str) -> int:
        return int(self._reading(database, name, lambda _, br: self._timeline(br).head_lsn))

    def database_for_token(self, token: str) -> str | None:
        """The database a scoped token belongs to, if any."""
        db = self.catalog.snapshot.database_with_token.get(sha256(token))
        return db.name if db else None

    # --- compute slots ------------------------------------------------------------------

    def _in_use(self) -> set[str]:
        """Every compute that holds a slot: running ones (the warm pool's
        and read-only ones included) and starting ones (under _slots_mu)."""
        return self.ps.compute_timelines() | self._starting

    def _take_slot(self, tid: str, *, spare: bool = False) -> bool:
        """Reserve a compute slot for `tid` if one is free (checked and
        taken at once). The caller frees it with `_free_slot` once its
        compute is registered with the page server, or failed. A `spare`
        (the pool's) never takes one while a wake waits for room."""
        with self._slots_mu:
            if spare and self._wanting:
                return False
            in_use = self._in_use()
            if tid not in in_use and len(in_use) >= self.max_computes:
                return False
            self._starting.add(tid)
            return True

    def _free_slot(self, tid: str) -> None:
        with self._slots_mu:
            self._starting.discard(tid)

    def _running(self) -> list[BranchRecord]:
        """The catalog's branches that have a compute now."""
        on = self.catalog.snapshot.branch_on
        return [b for t in self.ps.compute_timelines() if (b := on.get(t)) is not None]

    # --- the warm pool ------------------------------------------------------------------

    def _pool_loop(self) -> None:
        while not self._closing:
            try:
                self.fill_pool()
            except Exception:  # noqa: BLE001 - retry later; say why
                log.exception("filling the warm pool")
            self._pool_wake.wait(5.0)
            self._pool_wake.clear()

    def fill_pool(self) -> int:
        """Start computes on fresh template branches until the pool holds
        `warm_pool` (and the compute cap allows). Returns how many are warm."""
        while not self._closing:
            with self._warm_mu:
                if len(self._warm) + self._warm_starting >= self.warm_pool:
                    break
                self._warm_starting += 1
            try:
                tl = self._new_timeline(TEMPLATE_ID, durable=False)
                try:
                    if not self._take_slot(tl.id, spare=True):
                        self._delete_timelines([tl.id])
                        break
                    try:
                        c = self.ps.start_compute(tl, **self._compute_limits(self.default_limits))
                    except BaseException:
                        self._delete_timelines([tl.id])
                        raise
                    finally:
                        self._free_slot(tl.id)
                    with self._warm_mu:
                        self._warm.append(c)
                finally:
                    self._release(tl.id)
            finally:
                with self._warm_mu:
                    self._warm_starting -= 1
        with self._warm_mu:
            return len(self._warm)

    def _claim_warm(self) -> Compute | None:
        """A running spare compute, taken out of the pool (which refills),
        with its timeline held for the caller (who releases it)."""
        while True:
            with self._busy_mu, self._warm_mu:  # out of the pool and held at once: the sweep sees one
                if not self._warm:
                    return None
                c = self._warm.pop(0)
                self._busy[c.timeline_id] = self._busy.get(c.timeline_id, 0) + 1
            self._pool_wake.set()
            if self.ps.compute_of(c.timeline_id) is c:
                return c
            self._discard_warm(c)  # it died in the pool: try the next
            self._release(c.timeline_id)

    def _take_spare(self) -> Compute | None:
        """A spare out of the pool, held (in _busy) for the caller to
        discard and release: the sweep must not take its timeline while it
        stops."""
        with self._busy_mu, self._warm_mu:
            if not self._warm:
                return None
            c = self._warm.pop()
            self._busy[c.timeline_id] = self._busy.get(c.timeline_id, 0) + 1
            return c

    def _discard_warm(self, c: Compute) -> None:
        try:
            if self.ps.compute_of(c.timeline_id) is c:
                self.ps.stop_compute(c.id)
            self.ps.store.delete_timeline(c.timeline_id)
        except NotFoundError:
            pass
        except Exception:  # noqa: BLE001 - the sweep removes what is left
            log.exception("discarding warm compute %s", c.id)

    # --- computes --------------------------------------------------------------------

    def _lock_of(self, br: BranchRecord | int) -> threading.Lock:
        bid = br if isinstance(br, int) else br.id
        with self._locks_mu:
            lock = self._branch_mu.get(bid)
            if lock is None:
                lock = self._branch_mu[bid] = threading.Lock()
            return lock

    def wake(self, address: str | BranchRecord) -> Compute:
        """The branch's running compute, started if it is suspended (once,
        however many callers ask at the same time)."""
        br = address if isinstance(address, BranchRecord) else self.resolve(address)
        with self._lock_of(br):
            snap = self.catalog.snapshot
            current = snap.branches.get(br.id)
            db = snap.databases.get(br.database)
            if current is None or db is None:
                raise UnknownObjectError("branch", self.endpoint(br))
            br = current  # reset and restore replace the record
            c = self.ps.compute_of(br.timeline)
            if c is not None:
                return c
            t0 = time.monotonic()
            self._make_room(br)  # takes its slot
            try:
                c = self.ps.start_compute(br.timeline, **self._compute_limits(self._limits(br)))
            finally:
                self._free_slot(br.timeline)
            self.metrics.wake.observe(time.monotonic() - t0)
            self._touch(br.id)
            log.info("branch %s woke in %.0f ms (compute %s, port %d)",
                     self.endpoint(br), (time.monotonic() - t0) * 1e3, c.id, c.port)
            return c

    def route(self, address: str | BranchRecord) -> tuple[str, int]:
        """Where the proxy connects for this branch (woken first): the
        compute's socket directory and port (as libpq takes them)."""
        c = self.wake(address)
        return c.socket_dir, c.port

    def start(self, database: str, name: str) -> BranchInfo:
        """Wake the branch; its snapshot once it runs."""
        self.wake(f"{database}/{name}")
        return self.branch(database, name, sizes=False)

    def _make_room(self, br: BranchRecord) -> None:
        """Take a compute slot for `br` (its branch lock held), making room
        at the cap: a spare pool compute yields first, then the least
        recently active compute without connections."""
        if self._take_slot(br.timeline):
            return
        with self._slots_mu:
            self._wanting += 1
        try:
            self._make_room_at_cap(br)
        finally:
            with self._slots_mu:
                self._wanting -= 1

    def _make_room_at_cap(self, br: BranchRecord) -> None:
        tried: set[int] = set()
        give_up = time.monotonic() + SPARE_WAIT
        while True:
            if self._take_slot(br.timeline):
                return
            spare = self._take_spare()
            if spare is not None:  # a spare compute yields before anyone's
                try:
                    self._discard_warm(spare)
                finally:
                    self._release(spare.timeline_id)
                continue
            running = [b for b in self._running() if b.id != br.id and b.id not in tried]
            with self._use_mu:
                idle = [(self._use[b.id].active if b.id in self._use else 0.0, b.id, b) for b in running
                        if not (b.id in self._use and self._use[b.id].connections)]
            if not idle:
                with self._warm_mu:
                    spare_coming = self._warm_starting > 0
                if spare_coming and time.monotonic() < give_up:  # it will yield once it is up
                    time.sleep(0.05)
                    continue
                raise ComputeLimitError(self.max_computes)
            _, _, victim = min(idle)
            tried.add(victim.id)
            if self._suspend_if_idle(victim, blocking=False):
                log.info("compute limit %d reached: suspended %s, the least recently active",
                         self.max_computes, self.endpoint(victim))

    def _suspend_if_idle(self, br: BranchRecord, *, idle_for: float | None = None, blocking: bool = True) -> bool:
        """Stop the branch's compute if, checked under its branch lock, no
        connection is open or arriving (and, with `idle_for`, it has been
        idle that long). Returns whether it stopped it."""
        lock = self._lock_of(br)
        if not lock.acquire(blocking):
            return False  # someone is starting or stopping it: not a victim now
        try:
            with self._use_mu:
                use = self._use.get(br.id)
                if use is not None and use.connections:
                    return False
                if idle_for is not None and self._mono() - (use.active if use else 0.0) < idle_for:
                    return False
            current = self.catalog.snapshot.branches.get(br.id, br)
            return self._stop_locked(current)
        finally:
            lock.release()

    def suspend(self, database: str, name: str) -> BranchInfo:
        """Stop the branch's compute now, connections or not (the proxy
        tells them so)."""
        br = self._branch(self.catalog.snapshot, database, name)
        with self._lock_of(br):
            self._stop_locked(self._current(br, database, name), why=f"branch {database}/{name} was suspended")
        return self.branch(database, name, sizes=False)

    def _current(self, br: BranchRecord, database: str, name: str) -> BranchRecord:
        """The branch's record as it is now (its branch lock held)."""
        current = self.catalog.snapshot.branches.get(br.id)
        if current is None:
            raise UnknownObjectError("branch", f"{database}/{name}")
        return current

    def _stop(self, br: BranchRecord, why: str | None = None) -> None:
        with self._lock_of(br):
            self._stop_locked(br, why=why)

    def _stop_locked(self, br: BranchRecord, why: str | None = None) -> bool:
        """Stop the compute on the branch's timeline. With `why`, the proxy
        first ends its connections saying so (suspension for idleness or at
        the cap gives none: it stops only computes without connections)."""
        c = self.ps.compute_of(br.timeline)
        if c is None:
            return False
        if why is not None:
            self._end_sessions([br], why)
        t0 = time.monotonic()
        try:
            self.ps.stop_compute(c.id)
        except ComputeNotFoundError:
            return False  # it exited meanwhile, and the page server cleaned up after it
        self.metrics.suspend.observe(time.monotonic() - t0)
        log.info("branch %s suspended in %.0f ms (compute %s)", self.endpoint(br),
                 (time.monotonic() - t0) * 1e3, c.id)
        return True

    def _end_sessions(self, branches: Sequence[BranchRecord], why: str) -> None:
        """Have the proxies end these branches' connections, saying why."""
        ids = [b.id for b in branches]
        for end in list(self.session_enders):
            try:
                end(ids, why)
            except Exception:  # noqa: BLE001 - stopping the compute ends them anyway
                log.exception("ending the connections of %s", ", ".join(self.endpoint(b) for b in branches))

    # --- use (the proxy's calls: a few dict operations, never a wait) ----------------------

    def _touch(self, bid: int, used: float | None = None) -> None:
        with self._use_mu:
            use = self._use.setdefault(bid, _Use())
            use.active, use.used, use.dirty = self._mono(), self._clock() if used is None else used, True

    def connection_opened(self, br: BranchRecord) -> None:
        mono, wall = self._mono(), self._clock()
        with self._use_mu:
            use = self._use.setdefault(br.id, _Use())
            use.connections += 1
            use.active, use.used, use.dirty = mono, wall, True

    def connection_closed(self, br: BranchRecord) -> None:
        mono, wall = self._mono(), self._clock()
        with self._use_mu:
            use = self._use.get(br.id)
            if use is None:  # the branch went meanwhile
                return
            use.connections = max(0, use.connections - 1)
            use.active, use.used, use.dirty = mono, wall, True

    def _last_used(self, br: BranchRecord) -> float:
        with self._use_mu:
            use = self._use.get(br.id)
            return max(br.last_used, use.used if use else 0.0)

    def _in_use_since(self, br: BranchRecord, since: float) -> bool:
        """Has the branch a connection, or a use after `since` (wall time)?"""
        with self._use_mu:
            use = self._use.get(br.id)
            if use is not None and use.connections:
                return True
        return self._last_used(br) > since

    # --- housekeeping ------------------------------------------------------------------------

    def maintain(self) -> dict[str, list[str]]:
        """Suspend idle branches, delete expired ones, persist last use,
        sweep unreferenced timelines. Each record is done on its own: one
        that fails is logged and retried later, and the rest go on.
        Returns what it did (names), for logs and tests."""
        now = self._clock()
        done: dict[str, list[str]] = {"suspended": [], "expired": []}
        snap = self.catalog.snapshot

        def ttl_ended(r: Record) -> bool:  # (at commit: a claim meanwhile keeps it)
            return r.expires_at is not None and r.expires_at <= now

        def idle_rule(r: Record) -> bool:
            return bool(r.expire_after_idle)

        for db in snap.databases.values():
            if db.expires_at and db.expires_at <= now:
                self._attempt(("database", db.id), partial(
                    self._delete_database, db.name, why=f"expired (its TTL ended at {iso(db.expires_at)})",
                    expected_id=db.id, still=ttl_ended), done["expired"], db.name)
            elif db.expire_after_idle:
                last = max([db.last_used] + [self._last_used(b) for b in self._branches_of(snap, db)])
                if now - last >= db.expire_after_idle:
                    self._attempt(("database", db.id), partial(
                        self._delete_database, db.name, why="expired (unused)", expected_id=db.id,
                        unless_used_since=now - db.expire_after_idle, still=idle_rule), done["expired"], db.name)
        snap = self.catalog.snapshot
        for br in snap.branches.values():
            owner = snap.databases.get(br.database)
            if br.name == MAIN or owner is None:
                continue
            name = f"{owner.name}/{br.name}"
            if br.expires_at and br.expires_at <= now:
                self._attempt(("branch", br.id), partial(
                    self._delete_branch, owner.name, br.name, why=f"expired (its TTL ended at {iso(br.expires_at)})",
                    expected_id=br.id, still=ttl_ended), done["expired"], name)
            elif br.expire_after_idle and now - self._last_used(br) >= br.expire_after_idle:
                self._attempt(("branch", br.id), partial(
                    self._delete_branch, owner.name, br.name, why="expired (unused)", expected_id=br.id,
                    unless_used_since=now - br.expire_after_idle, still=idle_rule), done["expired"], name)
        mono = self._mono()
        for br in self._running():
            timeout = self._idle_timeout(br)
            with self._use_mu:
                use = self._use.get(br.id)
                idle = not (use and use.connections) and mono - (use.active if use else 0.0) >= timeout
            if idle:
                self._attempt(("suspend", br.id), partial(self._suspend_if_idle, br, idle_for=timeout),
                              done["suspended"], self.endpoint(br))
        self._attempt(("persist", 0), self._persist_use, [], "")
        self._attempt(("sweep", 0), self.sweep, [], "")
        return done

    def _attempt(self, key: tuple[str, int | str], fn: Callable[[], Any], did: list[str], name: str) -> None:
        """Run one record's housekeeping; a failure is logged and retried
        after a delay that doubles up to RETRY_MAX."""
        mono = self._mono()
        failing = self._failing.get(key)
        if failing is not None and mono < failing[0]:
            return
        try:
            result = fn()
        except UnknownObjectError:  # gone meanwhile: nothing left to do
            self._failing.pop(key, None)
            return
        except ControlPlaneError as e:  # refused (protected, has children): say so, try again later
            delay = min(RETRY_MAX, failing[1] * 2) if failing else RETRY_FIRST
            self._failing[key] = (mono + delay, delay)
            (log.warning if failing is None else log.debug)("%s %s was kept: %s", key[0], name or key[1], e)
            return
        except Exception:  # noqa: BLE001 - one record never stops the others
            delay = min(RETRY_MAX, failing[1] * 2) if failing else RETRY_FIRST
            self._failing[key] = (mono + delay, delay)
            log.exception("housekeeping of %s %s failed; retrying in %.0f s", key[0], name or key[1], delay)
            return
        self._failing.pop(key, None)
        if result and name:
            did.append(name)

    def _persist_use(self) -> None:
        branches = self.catalog.snapshot.branches
        with self._use_mu:
            for bid in [b for b, u in self._use.items() if b not in branches and not u.connections]:
                del self._use[bid]  # a branch deleted meanwhile
        with self._locks_mu:  # locks made for branches deleted meanwhile (by a wake of a stale snapshot)
            for bid, lock in [(b, lk) for b, lk in self._branch_mu.items() if b not in branches]:
                if lock.acquire(blocking=False):
                    del self._branch_mu[bid]
                    lock.release()
            dirty = {bid: u.used for bid, u in self._use.items() if u.dirty}
            for bid in dirty:
                self._use[bid].dirty = False
        if not dirty:
            return

        def change(snap: Snapshot) -> tuple[Sequence[Record], Sequence[Record]]:
            return [replace(b, last_used=max(b.last_used, dirty[b.id])) for bid in dirty
                    if (b := snap.branches.get(bid)) is not None], []

        try:
            self.catalog.change(change)
        except BaseException:
            with self._use_mu:  # try again next time
                for bid in dirty:
                    if bid in self._use:
                        self._use[bid].dirty = True
            raise

    def metrics_text(self) -> str:
        return self.metrics.text().decode()

    def check(self) -> dict[str, Any]:
        """Verify the store end to end (slow): what `strata check` reports."""
        return check_report(self.ps.store.check())

    def status(self) -> dict[str, Any]:
        snap = self.catalog.snapshot
        return {
            "databases": len(snap.databases), "branches": len(snap.branches),
            "running": sorted(self.endpoint(b) for b in self._running()), "max_computes": self.max_computes,
            "home": self.home, "store_bytes": self.ps.store.disk_usage(),
            "limits": {"defaults": shown(self.default_limits), "memory_limits": self.ps.memory_limits(),
                       "hits": self.limit_hits()},
            "remote": self.ps.remote_status(),
        }


def _monotonic() -> float:
    return time.monotonic()
