"""The control plane: databases, branches, computes on demand, scale to zero.

A *database* is a tenant: a branch of the template timeline (never an
initdb) with its own generated password and a root branch `main`. A
*branch* is a timeline branched from another branch of the same database,
at its head, at an LSN or at a wall-clock time. Branches are addressed as
`DB/BRANCH`; the proxy routes a connection by its *endpoint*, `DB.BRANCH`.

Every branch is `running` (a compute serves it) or `suspended` (no process
at all). `wake` starts a compute once however many callers ask at the same
time; `maintain` (the service calls it every second) suspends branches
idle for their idle timeout, deletes what has expired, and persists last
use. At most `max_computes` run: at the cap the least recently active
compute without connections is suspended to make room.

This class is the embeddable API; the HTTP API, the CLI, the SDK and the
proxy are thin layers over it. It is thread-safe: one lock guards the
catalog and the table of branches, and one lock per branch serialises
its compute's start and stop (slow work happens outside the main lock).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from time import monotonic
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

from .catalog import CATALOG_ID, BranchRecord, Catalog, DatabaseRecord
from .compute import Compute, new_password
from .errors import (
    BadRequestError,
    ComputeLimitError,
    ControlPlaneError,
    ObjectExistsError,
    ProtectedError,
    UnknownObjectError,
)
from .metrics import Metrics
from .objects import (
    BranchInfo,
    DatabaseInfo,
    check_name,
    iso,
    parse_duration,
    parse_time,
    sha256,
)
from .server import TEMPLATE_ID, PageServer

log = logging.getLogger("strata.control")

MAIN = "main"
DEFAULT_IDLE_TIMEOUT = 300.0
COMPUTE_MEMORY = 256 << 20  # what one compute is budgeted (shared_buffers 128 MB and the rest)


def default_max_computes() -> int:
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8
    return max(1, total // COMPUTE_MEMORY)


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
    ) -> None:
        self.home = os.path.abspath(home)
        self.advertise_host = advertise_host
        self.proxy_port = proxy_port
        self.max_computes = max_computes or default_max_computes()
        self.default_idle_timeout = default_idle_timeout
        self._clock = clock
        self.ps = PageServer(self.home, config=config)
        self._mu = threading.RLock()
        self._branch_mu: dict[int, threading.Lock] = {}
        self._connections: dict[int, int] = {}
        self._last_active: dict[int, float] = {}
        self._dirty_use: set[int] = set()
        self._sizes: dict[tuple[str, int], tuple[int, int]] = {}
        self._reserved: set[tuple[str, ...]] = set()
        self._starting: set[int] = set()  # branches whose compute is starting (they hold a slot)
        self.warm_pool = warm_pool
        self._warm: list[Compute] = []  # running on fresh template branches, not yet a database's
        self._warm_mu = threading.Lock()
        self._pool_wake = threading.Event()
        self._pool_thread: threading.Thread | None = None
        self._closing = False
        self.catalog: Catalog = None  # type: ignore[assignment]
        self.metrics = Metrics(
            databases=lambda: len(self.catalog.databases) if self.catalog else 0,
            branches=lambda: len(self.catalog.branches) if self.catalog else 0,
            running=lambda: sum(1 for b in list(self.catalog.branches.values())
                                if self.ps.compute_of(b.timeline)) if self.catalog else 0,
        )

    # --- lifecycle ---------------------------------------------------------------

    def open(self) -> ControlPlane:
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        self.ps.open()
        try:
            self.ps.ensure_template()
            self.catalog = Catalog(self.ps.store)
            self._sweep_orphans()
        except BaseException:
            self.ps.close()
            raise
        log.info("control plane open: %d databases, %d branches, up to %d computes",
                 len(self.catalog.databases), len(self.catalog.branches), self.max_computes)
        if self.warm_pool > 0:
            self._pool_thread = threading.Thread(target=self._pool_loop, name="strata-warm-pool", daemon=True)
            self._pool_thread.start()
        return self

    def close(self) -> None:
        self._closing = True
        if self._pool_thread is not None:
            self._pool_wake.set()
            self._pool_thread.join()
        with self._warm_mu:
            warm, self._warm = self._warm, []
        for c in warm:
            self._discard_warm(c)
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

    def _sweep_orphans(self) -> None:
        """Delete timelines no record points at (a crash between creating a
        timeline and its record, or between a record's deletion and its
        timeline's), children first."""
        store = self.ps.store
        keep = {TEMPLATE_ID, CATALOG_ID} | {b.timeline for b in self.catalog.branches.values()}
        orphans = [t for t in store.timeline_ids() if t not in keep]
        progress = True
        while orphans and progress:
            progress = False
            for tid in list(orphans):
                try:
                    store.delete_timeline(tid)
                except HasChildrenError:
                    continue
                except NotFoundError:
                    pass
                orphans.remove(tid)
                progress = True
                log.info("deleted unreferenced timeline %s", tid)

    # --- lookups -------------------------------------------------------------------

    def _db(self, name: str) -> DatabaseRecord:
        db = self.catalog.database_named.get(name)
        if db is None:
            raise UnknownObjectError("database", name)
        return db

    def _branch(self, db: str | DatabaseRecord, name: str) -> BranchRecord:
        rec = db if isinstance(db, DatabaseRecord) else self._db(db)
        br = self.catalog.branch_named.get((rec.id, name))
        if br is None:
            raise UnknownObjectError("branch", f"{rec.name}/{name}")
        return br

    def _branches_of(self, db: DatabaseRecord) -> list[BranchRecord]:
        return sorted(self.catalog.branches_in.get(db.id, {}).values(), key=lambda b: b.id)

    def _children(self, br: BranchRecord) -> list[BranchRecord]:
        return [b for b in self.catalog.branches.values() if b.parent == br.id]

    def _timeline(self, br: BranchRecord) -> Timeline:
        return self.ps.store.timeline(br.timeline)

    def resolve(self, address: str) -> BranchRecord:
        """`DB/BRANCH`, `DB.BRANCH` (an endpoint) or `DB` (its main branch)."""
        if not isinstance(address, str) or not address:
            raise BadRequestError(f"invalid branch address {address!r}: use DB/BRANCH")
        for sep in ("/", "."):
            if sep in address:
                db, name = address.split(sep, 1)
                with self._mu:
                    return self._branch(db, name)
        with self._mu:
            return self._branch(address, MAIN)

    def endpoint(self, br: BranchRecord) -> str:
        db = self.catalog.databases.get(br.database)  # gone while a deleted database's branches stop
        return f"{db.name if db else '(deleted)'}.{br.name}"

    def uri(self, address: str | BranchRecord) -> str:
        br = address if isinstance(address, BranchRecord) else self.resolve(address)
        db = self.catalog.databases[br.database]
        return (f"postgresql://postgres:{quote(db.password, safe='')}@{self.advertise_host}:{self.proxy_port}"
                f"/postgres?options=endpoint%3D{quote(self.endpoint(br), safe='')}")

    # --- databases ---------------------------------------------------------------------

    def create_database(
        self, name: str | None = None, *, ttl: float | str | None = None,
        idle_timeout: float | str | None = None, expire_after_idle: float | str | None = None,
    ) -> DatabaseInfo:
        """A new database (a branch of the template: O(1), no initdb) with a
        root branch `main`, suspended until its first connection (or served
        at once by a compute of the warm pool). Its `token` (returned here
        only) manages this database's branches and nothing else."""
        t0 = monotonic()
        if name is None:
            name = f"db-{secrets.token_hex(4)}"
        check_name("database", name)
        ttl_s = parse_duration(ttl, "ttl")
        idle_s = parse_duration(idle_timeout, "idle timeout")
        expire_s = parse_duration(expire_after_idle, "expire-after-idle")
        now = self._clock()
        with self._reserve(("database", name)):
            with self._mu:
                if name in self.catalog.database_named:
                    raise ObjectExistsError("database", name)
            token = secrets.token_urlsafe(24)
            warm = self._claim_warm()
            db = DatabaseRecord(  # a warm compute's generated password is already set: it becomes this one's
                id=self.catalog.new_id(), name=name, password=warm.password if warm else new_password(),
                created_at=now, expires_at=now + ttl_s if ttl_s else None, idle_timeout=idle_s,
                expire_after_idle=expire_s, last_used=now, token_sha256=sha256(token),
            )
            tl_id = warm.timeline_id if warm else self.ps.store.branch(TEMPLATE_ID, durable=False).id
            main = BranchRecord(
                id=self.catalog.new_id(), database=db.id, name=MAIN, timeline=tl_id, created_at=now,
                expires_at=db.expires_at, idle_timeout=idle_s, expire_after_idle=expire_s, last_used=now,
            )
            self.catalog.write(put=[db, main])  # durable: the branch record too (one log)
            if warm is not None:
                with self._mu:
                    self._last_active[main.id] = now
        self.metrics.create.observe(monotonic() - t0)
        log.info("database %s created (timeline %s%s)", name, tl_id, ", warm compute" if warm else "")
        info = self.database(name)
        info.token = token
        return info

    @contextlib.contextmanager
    def _reserve(self, key: tuple[str, ...]) -> Iterator[None]:
        """Hold a name while it is being created, without holding the lock
        (creations of different names proceed at once and share fsyncs)."""
        with self._mu:
            if key in self._reserved:
                raise ObjectExistsError(key[0], "/".join(key[1:]))
            self._reserved.add(key)
        try:
            yield
        finally:
            with self._mu:
                self._reserved.discard(key)

    def database(self, name: str) -> DatabaseInfo:
        with self._mu:
            db = self._db(name)
            main = self._branch(db, MAIN)
            return DatabaseInfo(
                name=db.name, branch=MAIN, uri=self.uri(main), created_at=iso(db.created_at),
                expires_at=iso(db.expires_at), idle_timeout=db.idle_timeout or self.default_idle_timeout,
                expire_after_idle=db.expire_after_idle,
                last_used=iso(max([db.last_used] + [b.last_used for b in self._branches_of(db)])),
                branches=[b.name for b in self._branches_of(db)],
            )

    def databases(self) -> list[DatabaseInfo]:
        with self._mu:
            names = sorted(d.name for d in self.catalog.databases.values())
        return [self.database(n) for n in names]

    def delete_database(self, name: str) -> None:
        """Stop its computes and delete it with every branch (space comes
        back with GC). Refused while any of its branches is protected."""
        with self._mu:
            db = self._db(name)
            branches = self._branches_of(db)
            for b in branches:
                if b.protected:
                    raise ProtectedError(f"{name}/{b.name}", "deleted with its database")
            self.catalog.write(delete=[db, *branches])  # first: no wake can start one after this
        for b in branches:
            self._stop(b)
            self._forget(b)
        self._delete_timelines([b.timeline for b in branches])
        log.info("database %s deleted (%d branches)", name, len(branches))

    def _delete_timelines(self, tids: list[str]) -> None:
        """Delete timelines, children before parents (their records are gone)."""
        pending = list(tids)
        while pending:
            progress = False
            for tid in list(pending):
                try:
                    self.ps.store.delete_timeline(tid)
                except HasChildrenError:
                    continue
                except NotFoundError:
                    pass
                pending.remove(tid)
                progress = True
            if not progress:  # a child outside this set: the sweep at next open gets them
                log.warning("timelines %s still have children; left for later", pending)
                return

    # --- branches ----------------------------------------------------------------------

    def create_branch(
        self, database: str, name: str, *, parent: str = MAIN, lsn: int | None = None,
        time: str | float | dt.datetime | None = None, ttl: float | str | None = None,
        idle_timeout: float | str | None = None, expire_after_idle: float | str | None = None,
        protected: bool = False,
    ) -> BranchInfo:
        """A branch of `parent` (same database) at its head, at `lsn`, or as
        of `time`: one metadata write, whatever the size of the data."""
        check_name("branch", name)
        if lsn is not None and time is not None:
            raise BadRequestError("give an LSN or a time to branch at, not both")
        ttl_s = parse_duration(ttl, "ttl")
        idle_s = parse_duration(idle_timeout, "idle timeout")
        expire_s = parse_duration(expire_after_idle, "expire-after-idle")
        now = self._clock()
        t0 = monotonic()
        with self._reserve(("branch", database, name)):
            with self._mu:
                db = self._db(database)
                if (db.id, name) in self.catalog.branch_named:
                    raise ObjectExistsError("branch", f"{database}/{name}")
                src = self._branch(db, parent)
            src_tl = self._timeline(src)
            try:
                at = src_tl.lsn_at(parse_time(time, self._clock())) if time is not None else lsn
                tl = self.ps.store.branch(src_tl, at_lsn=at, durable=False)
            except (LsnOutOfRangeError, InvalidArgumentError) as e:
                raise BadRequestError(f"cannot branch {database}/{parent} there: {e}") from e
            br = BranchRecord(
                id=self.catalog.new_id(), database=db.id, name=name, timeline=tl.id, created_at=now,
                parent=src.id, expires_at=now + ttl_s if ttl_s else None,
                idle_timeout=idle_s if idle_s is not None else db.idle_timeout,
                expire_after_idle=expire_s if expire_s is not None else db.expire_after_idle,
                protected=bool(protected), last_used=now,
            )
            self.catalog.write(put=[br])  # durable: the branch record too (one log)
        self.metrics.branch.observe(monotonic() - t0)
        log.info("branch %s/%s created from %s at LSN %d (timeline %s)",
                 database, name, parent, tl.branch_lsn, tl.id)
        return self.branch(database, name, sizes=False)  # sizes take a scan: ask for them later

    def branch(self, database: str, name: str, *, sizes: bool = True) -> BranchInfo:
        with self._mu:
            br = self._branch(database, name)
        return self._info(br, sizes=sizes)

    def branches(self, database: str, *, sizes: bool = True) -> list[BranchInfo]:
        with self._mu:
            brs = self._branches_of(self._db(database))
        return [self._info(b, sizes=sizes) for b in brs]

    def _info(self, br: BranchRecord, *, sizes: bool) -> BranchInfo:
        tl = self._timeline(br)
        db = self.catalog.databases[br.database]
        parent = self.catalog.branches.get(br.parent) if br.parent else None
        logical = exclusive = None
        if sizes:
            logical, exclusive = self._size(tl)
        return BranchInfo(
            database=db.name, name=br.name, endpoint=self.endpoint(br), uri=self.uri(br),
            state="running" if self.ps.compute_of(br.timeline) else "suspended", lsn=tl.head_lsn,
            timeline=br.timeline, parent=parent.name if parent else None, created_at=iso(br.created_at),
            expires_at=iso(br.expires_at), idle_timeout=self._idle_timeout(br),
            expire_after_idle=br.expire_after_idle, protected=br.protected, last_used=iso(br.last_used),
            connections=self._connections.get(br.id, 0), logical_size=logical, exclusive_size=exclusive,
        )

    def _size(self, tl: Timeline) -> tuple[int, int]:
        """(logical size, bytes it alone holds), cached per head LSN."""
        key = (tl.id, tl.head_lsn)
        hit = self._sizes.get(key)
        if hit is None:
            u = tl.usage()
            hit = self._sizes[key] = (u.logical_size, u.exclusive_size + u.inmemory_size)
            if len(self._sizes) > 4096:
                self._sizes.pop(next(iter(self._sizes)))
        return hit

    def _idle_timeout(self, br: BranchRecord) -> float:
        return br.idle_timeout or self.default_idle_timeout

    def update_branch(
        self, database: str, name: str, *, protected: bool | None = None, ttl: float | str | None = None,
        idle_timeout: float | str | None = None, expire_after_idle: float | str | None = None,
    ) -> BranchInfo:
        ttl_s = parse_duration(ttl, "ttl")
        idle_s = parse_duration(idle_timeout, "idle timeout")
        expire_s = parse_duration(expire_after_idle, "expire-after-idle")
        with self._mu:
            br = self._branch(database, name)
            new = BranchRecord(**asdict(br))
            if protected is not None:
                new.protected = bool(protected)
            if ttl_s is not None:
                new.expires_at = self._clock() + ttl_s
            if idle_s is not None:
                new.idle_timeout = idle_s
            if expire_s is not None:
                new.expire_after_idle = expire_s
            self.catalog.write(put=[new])
        return self.branch(database, name)

    def delete_branch(self, database: str, name: str) -> None:
        with self._mu:
            br = self._branch(database, name)
            self._check_removable(br, "deleted")
            self.catalog.write(delete=[br])  # first: no wake can start it after this
        self._stop(br)
        self._forget(br)
        self._delete_timelines([br.timeline])
        log.info("branch %s/%s deleted", database, name)

    def _check_removable(self, br: BranchRecord, action: str) -> None:
        where = f"{self.catalog.databases[br.database].name}/{br.name}"
        if br.protected:
            raise ProtectedError(where, action)
        if br.name == MAIN and action == "deleted":
            raise BadRequestError(f"{where} is the database's root branch: delete the database instead")
        kids = {b.name for b in self._children(br)}
        for tid in self.ps.store.children(br.timeline):  # e.g. a branch restored from this one
            kid = self.catalog.branch_on.get(tid)
            if kid is not None:
                kids.add(kid.name)
        if kids:
            raise BadRequestError(f"branch {where} cannot be {action}: branches {sorted(kids)} were "
                                  "made from it (delete or detach them first)")

    def _forget(self, br: BranchRecord) -> None:
        with self._mu:
            self._connections.pop(br.id, None)
            self._last_active.pop(br.id, None)
            self._branch_mu.pop(br.id, None)
            self._dirty_use.discard(br.id)

    def reset_branch(self, database: str, name: str) -> BranchInfo:
        """Make the branch its parent's head again (what it wrote is gone)."""
        with self._mu:
            br = self._branch(database, name)
            if br.parent is None:
                raise BadRequestError(f"{database}/{name} has no parent to reset to")
            self._check_removable(br, "reset")
        with self._lock_of(br):
            self._stop_locked(br)
            with self._mu:
                parent = self.catalog.branches[br.parent]  # type: ignore[index]
                tl = self.ps.store.branch(parent.timeline)
                new = BranchRecord(**{**asdict(br), "timeline": tl.id})
                self.catalog.write(put=[new])
        self._delete_timelines([br.timeline])
        log.info("branch %s/%s reset to the head of %s (timeline %s)", database, name, parent.name, tl.id)
        return self.branch(database, name)

    def restore_branch(
        self, database: str, name: str, *, lsn: int | None = None, time: str | float | dt.datetime | None = None,
    ) -> tuple[BranchInfo, BranchInfo]:
        """Take the branch back to its own state at `lsn` or `time`; what it
        was before is kept as a new branch `NAME-backup-<UTC time>`.
        Returns (the branch, the backup)."""
        if (lsn is None) == (time is None):
            raise BadRequestError("restore needs an LSN or a time (one of them)")
        with self._mu:
            br = self._branch(database, name)
        with self._lock_of(br):
            self._stop_locked(br)
            with self._mu:
                br = self._branch(database, name)
                old = self._timeline(br)
                try:
                    at = old.lsn_at(parse_time(time, self._clock())) if time is not None else lsn
                    tl = self.ps.store.branch(old, at_lsn=at)
                except (LsnOutOfRangeError, InvalidArgumentError) as e:
                    raise BadRequestError(f"cannot restore {database}/{name} there: {e}") from e
                stamp = dt.datetime.fromtimestamp(self._clock(), dt.UTC).strftime("%Y%m%dt%H%M%S")
                backup_name = f"{name}-backup-{stamp}"[:63]
                db = self._db(database)
                if (db.id, backup_name) in self.catalog.branch_named:
                    backup_name = f"{backup_name[:55]}-{secrets.token_hex(3)}"
                backup = BranchRecord(**{**asdict(br), "id": self.catalog.new_id(), "name": backup_name,
                                         "protected": False, "created_at": self._clock()})
                moved = [BranchRecord(**{**asdict(c), "parent": backup.id}) for c in self._children(br)]
                restored = BranchRecord(**{**asdict(br), "timeline": tl.id})
                self.catalog.write(put=[backup, restored, *moved])
        log.info("branch %s/%s restored to LSN %d; its previous state is branch %s",
                 database, name, tl.branch_lsn, backup_name)
        return self.branch(database, name), self.branch(database, backup_name)

    def detach_branch(self, database: str, name: str) -> BranchInfo:
        """Give the branch its own copy of what it shares with its parent, so
        that the parent can be deleted. Takes time in proportion to the data."""
        with self._mu:
            br = self._branch(database, name)
        tl = self._timeline(br)
        if tl.ancestor_id is not None:
            self.ps.store.detach(tl)
        with self._mu:
            br = self._branch(database, name)
            self.catalog.write(put=[BranchRecord(**{**asdict(br), "parent": None})])
        log.info("branch %s/%s detached", database, name)
        return self.branch(database, name)

    def lsn(self, database: str, name: str) -> int:
        with self._mu:
            return self._timeline(self._branch(database, name)).head_lsn

    def database_for_token(self, token: str) -> str | None:
        """The database a scoped token belongs to, if any."""
        with self._mu:
            db = self.catalog.database_with_token.get(sha256(token))
            return db.name if db else None

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
        `warm_pool` (and the compute cap allows). Returns how many run."""
        while not self._closing:
            with self._warm_mu:
                if len(self._warm) >= self.warm_pool:
                    break
            if self._running_count() + len(self._warm) >= self.max_computes:
                break
            tl = self.ps.store.branch(TEMPLATE_ID, durable=False)
            c = self.ps.start_compute(tl)
            with self._warm_mu:
                self._warm.append(c)
        return len(self._warm)

    def _claim_warm(self) -> Compute | None:
        """A running spare compute, taken out of the pool (which refills)."""
        while True:
            with self._warm_mu:
                if not self._warm:
                    return None
                c = self._warm.pop(0)
            self._pool_wake.set()
            if self.ps.compute_of(c.timeline_id) is c:
                return c
            # it died in the pool: try the next

    def _discard_warm(self, c: Compute) -> None:
        try:
            if self.ps.compute_of(c.timeline_id) is c:
                self.ps.stop_compute(c.id)
            self.ps.store.delete_timeline(c.timeline_id)
        except Exception:  # noqa: BLE001 - the sweep at next open removes what is left
            log.exception("discarding warm compute %s", c.id)

    def _running_count(self) -> int:
        with self._mu:
            return sum(1 for b in self.catalog.branches.values() if self.ps.compute_of(b.timeline))

    # --- computes --------------------------------------------------------------------

    def _lock_of(self, br: BranchRecord) -> threading.Lock:
        with self._mu:
            return self._branch_mu.setdefault(br.id, threading.Lock())

    def wake(self, address: str | BranchRecord) -> Compute:
        """The branch's running compute, started if it is suspended (once,
        however many callers ask at the same time)."""
        br = address if isinstance(address, BranchRecord) else self.resolve(address)
        with self._lock_of(br):
            with self._mu:
                current = self.catalog.branches.get(br.id)
                if current is None:
                    raise UnknownObjectError("branch", br.name)
                br = current  # reset and restore replace the record
            c = self.ps.compute_of(br.timeline)
            if c is not None:
                return c
            self._make_room(br)
            try:
                db = self.catalog.databases[br.database]
                t0 = monotonic()
                c = self.ps.start_compute(br.timeline, password=db.password)
            finally:
                with self._mu:
                    self._starting.discard(br.id)
            self.metrics.wake.observe(monotonic() - t0)
            now = self._clock()
            with self._mu:
                self._last_active[br.id] = now
                br.last_used = now
                self._dirty_use.add(br.id)
            log.info("branch %s woke in %.0f ms (compute %s, port %d)",
                     self.endpoint(br), (monotonic() - t0) * 1e3, c.id, c.port)
            return c

    def _make_room(self, br: BranchRecord) -> None:
        while True:
            with self._warm_mu:
                spare = self._warm.pop() if self._warm and (
                    self._running_count() + len(self._warm) >= self.max_computes) else None
            if spare is not None:  # a spare compute yields before anyone's
                self._discard_warm(spare)
                continue
            with self._mu:
                running = [b for b in self.catalog.branches.values()
                           if b.id != br.id and self.ps.compute_of(b.timeline)]
                if len({b.id for b in running} | self._starting) < self.max_computes:
                    self._starting.add(br.id)  # its slot, before anyone else counts
                    return
                idle = [b for b in running if not self._connections.get(b.id)]
                if not idle:
                    raise ComputeLimitError(self.max_computes)
                victim = min(idle, key=lambda b: self._last_active.get(b.id, 0.0))
            log.info("compute limit %d reached: suspending %s, the least recently active",
                     self.max_computes, self.endpoint(victim))
            self._stop(victim)

    def suspend(self, database: str, name: str) -> BranchInfo:
        with self._mu:
            br = self._branch(database, name)
        self._stop(br)
        return self.branch(database, name, sizes=False)

    def _stop(self, br: BranchRecord) -> None:
        with self._lock_of(br):
            self._stop_locked(br)

    def _stop_locked(self, br: BranchRecord) -> None:
        c = self.ps.compute_of(br.timeline)
        if c is None:
            return
        t0 = monotonic()
        self.ps.stop_compute(c.id)
        self.metrics.suspend.observe(monotonic() - t0)
        log.info("branch %s suspended in %.0f ms (compute %s)", self.endpoint(br),
                 (monotonic() - t0) * 1e3, c.id)

    # --- connections (the proxy) -----------------------------------------------------------

    def connection_opened(self, br: BranchRecord) -> None:
        now = self._clock()
        with self._mu:
            self._connections[br.id] = self._connections.get(br.id, 0) + 1
            self._last_active[br.id] = now
            br.last_used = now
            self._dirty_use.add(br.id)

    def connection_closed(self, br: BranchRecord) -> None:
        now = self._clock()
        with self._mu:
            n = self._connections.get(br.id, 0) - 1
            if n > 0:
                self._connections[br.id] = n
            else:
                self._connections.pop(br.id, None)
            self._last_active[br.id] = now
            br.last_used = now
            self._dirty_use.add(br.id)

    # --- housekeeping ------------------------------------------------------------------------

    def maintain(self) -> dict[str, list[str]]:
        """Suspend idle branches, delete expired ones, persist last use.
        Returns what it did (names), for logs and tests."""
        now = self._clock()
        done: dict[str, list[str]] = {"suspended": [], "expired": []}
        with self._mu:
            dbs = list(self.catalog.databases.values())
            last_use = {db.id: db.last_used for db in dbs}
            for b in self.catalog.branches.values():
                last_use[b.database] = max(last_use.get(b.database, 0.0), b.last_used)
        for db in dbs:
            last = last_use[db.id]
            if (db.expires_at and db.expires_at <= now) or (
                    db.expire_after_idle and now - last >= db.expire_after_idle):
                try:
                    self.delete_database(db.name)
                    done["expired"].append(db.name)
                except ControlPlaneError as e:
                    log.warning("database %s expired but was kept: %s", db.name, e)
        with self._mu:
            brs = list(self.catalog.branches.values())
        for br in brs:
            if br.id not in self.catalog.branches or br.name == MAIN:
                continue
            if (br.expires_at and br.expires_at <= now) or (
                    br.expire_after_idle and now - br.last_used >= br.expire_after_idle):
                db = self.catalog.databases[br.database]
                try:
                    self.delete_branch(db.name, br.name)
                    done["expired"].append(f"{db.name}/{br.name}")
                except ControlPlaneError as e:
                    log.debug("branch %s/%s expired but was kept: %s", db.name, br.name, e)
        for br in list(self.catalog.branches.values()):
            if self._connections.get(br.id) or not self.ps.compute_of(br.timeline):
                continue
            if now - self._last_active.get(br.id, 0.0) >= self._idle_timeout(br):
                self._stop(br)
                done["suspended"].append(self.endpoint(br))
        self._persist_use()
        return done

    def _persist_use(self) -> None:
        with self._mu:
            dirty = [self.catalog.branches[i] for i in self._dirty_use if i in self.catalog.branches]
            self._dirty_use.clear()
            if dirty:
                self.catalog.write(put=dirty)

    def status(self) -> dict[str, Any]:
        with self._mu:
            running = [self.endpoint(b) for b in self.catalog.branches.values() if self.ps.compute_of(b.timeline)]
            return {
                "databases": len(self.catalog.databases), "branches": len(self.catalog.branches),
                "running": sorted(running), "max_computes": self.max_computes,
                "home": self.home, "store_bytes": self.ps.store.disk_usage(),
            }
