"""The control plane under concurrent use, over the Python API and over
HTTP (the real service): creates, deletes, branches, wakes through the
proxy, suspends, resets, status and listings from several threads, with
housekeeping running and short idle timeouts and TTLs, under a small
compute cap and with the warm pool on.

Invariants: no unexpected exception escapes (a refusal the race makes
legitimate, such as "no such branch" or "all compute slots are in use",
is counted, not a failure); the cap is never exceeded, checked at every
start from the control plane's own accounting and continuously from
/proc; afterwards no orphan record is left, and every object is wholly
there or wholly gone (a record's timeline exists and holds a data
directory; no timeline is left that no record points at)."""

from __future__ import annotations

import os
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from engine import Store
from pageserver.clients.sdk import ApiError, Strata
from pageserver.compute.node import TEMPLATE_ID, pg_version_of
from pageserver.compute.paths import run_dir_for
from pageserver.control.catalog import CATALOG_ID, Catalog, Snapshot
from pageserver.errors import (
    BadRequestError,
    ComputeLimitError,
    ObjectExistsError,
    ProtectedError,
    RateLimitedError,
    UnknownObjectError,
)
from pageserver.service import daemon as service

from .pg import Running, requires_pg, strata
from .test_control_races import CapWatch, postmasters

pytestmark = requires_pg

SECONDS = float(os.environ.get("STRESS_SECONDS") or (120 if os.environ.get("TORTURE") else 15))
WORKERS = 6
CAP = 3
DBS = [f"s{i}" for i in range(5)]
BRANCHES = [f"b{i}" for i in range(3)]
# (A long run, STRESS_SECONDS or TORTURE, meets the operator's creation rate: a refusal too.)
REFUSALS = (UnknownObjectError, ObjectExistsError, ComputeLimitError, BadRequestError, ProtectedError,
            RateLimitedError)
# What a client of the proxy may legitimately hear while branches come and go around it: the
# proxy's own refusals, and its reasons when a user's act stops a compute under connections.
# PostgreSQL's own words for a stop ("terminating connection due to administrator command",
# "the database system is shutting down", a closed connection) mean a compute stopped under a
# connection nobody told: idle suspension or the cap taking a branch in use. Those escape. (A
# password refused is a URI of a database deleted and made again under its name.)
PROXY_REFUSALS = ("no branch with endpoint", "compute slots", "was deleted", "was suspended", "was reset",
                  "was restored", "expired", "password authentication failed")


class Ops:
    """One way in (Python API or HTTP); the same operations on both."""

    def uri(self, db: str, br: str) -> str:
        raise NotImplementedError

    def call(self, op: str, db: str, br: str) -> Any:
        raise NotImplementedError


class PythonOps(Ops):
    def __init__(self, r: Running) -> None:
        self.cp = r.cp

    def uri(self, db: str, br: str) -> str:
        return self.cp.uri(f"{db}/{br}")

    def call(self, op: str, db: str, br: str) -> Any:
        cp = self.cp
        return {
            "create_database": lambda: cp.create_database(db, idle_timeout=1),
            "delete_database": lambda: cp.delete_database(db),
            "create_branch": lambda: cp.create_branch(db, br, ttl=random.choice([None, 2, 30])),
            "delete_branch": lambda: cp.delete_branch(db, br),
            "reset_branch": lambda: cp.reset_branch(db, br),
            "restore_branch": lambda: cp.restore_branch(db, br, lsn=cp.lsn(db, br)),
            "detach_branch": lambda: cp.detach_branch(db, br),
            "wake": lambda: cp.wake(f"{db}/{br}"),
            "suspend": lambda: cp.suspend(db, br),
            "read": lambda: (cp.status(), cp.databases(), cp.branches(db, sizes=False), cp.metrics.text()),
        }[op]()


class HttpOps(Ops):
    def __init__(self, client: Strata) -> None:
        self.client = client

    def uri(self, db: str, br: str) -> str:
        return str(self.client.call("POST", f"/databases/{db}/branches/{br}/credentials", {})["uri"])

    def call(self, op: str, db: str, br: str) -> Any:
        c = self.client.call
        return {
            "create_database": lambda: c("POST", "/databases", {"name": db, "idle_timeout": 1}),
            "delete_database": lambda: c("DELETE", f"/databases/{db}"),
            "create_branch": lambda: c("POST", f"/databases/{db}/branches",
                                       {"name": br, "ttl": random.choice([None, 2, 30])}),
            "delete_branch": lambda: c("DELETE", f"/databases/{db}/branches/{br}"),
            "reset_branch": lambda: c("POST", f"/databases/{db}/branches/{br}/reset"),
            "restore_branch": lambda: c("POST", f"/databases/{db}/branches/{br}/restore",
                                        {"lsn": c("GET", f"/databases/{db}/branches/{br}/lsn")["lsn"]}),
            "detach_branch": lambda: c("POST", f"/databases/{db}/branches/{br}/detach"),
            "wake": lambda: c("POST", f"/databases/{db}/branches/{br}/start"),
            "suspend": lambda: c("POST", f"/databases/{db}/branches/{br}/suspend"),
            "read": lambda: (c("GET", "/status"), c("GET", "/databases"), c("GET", f"/databases/{db}/branches")),
        }[op]()


OPS = ["create_database"] * 3 + ["delete_database"] + ["create_branch"] * 3 + ["delete_branch"] * 2 + \
      ["reset_branch", "restore_branch", "detach_branch", "wake", "suspend"] + ["read"] * 2 + ["connect"] * 4


class Workload:
    def __init__(self, ops: Ops, seconds: float) -> None:
        self.ops, self.seconds = ops, seconds
        self.counts: Counter[str] = Counter()
        self.escaped: list[str] = []
        self.proc_max = 0
        self._mu = threading.Lock()

    def _refused(self, e: BaseException) -> bool:
        if isinstance(e, ApiError):
            return e.status in (400, 404, 409, 429, 503) and isinstance(e, REFUSALS)
        return isinstance(e, REFUSALS)

    def _one(self, rng: random.Random) -> str:
        op, db = rng.choice(OPS), rng.choice(DBS)
        br = "main" if op in ("wake", "suspend", "connect") and rng.random() < 0.5 else rng.choice(BRANCHES)
        if op == "connect":
            uri = self.ops.uri(db, br)
            try:
                with psycopg.connect(uri, autocommit=True, connect_timeout=60) as conn:
                    conn.execute("select 1").fetchone()
                    if rng.random() < 0.3:
                        time.sleep(rng.uniform(0, 1.5))  # hold it a while: idle suspension must spare it
                        conn.execute("select 2").fetchone()
            except psycopg.OperationalError as e:
                why = next((p for p in PROXY_REFUSALS if p in str(e)), None)
                if why is None:
                    raise AssertionError(f"{db}.{br} at {time.strftime('%H:%M:%S')}: "
                                         f"{' '.join(str(e).split())}") from e
                return f"connect: refused ({why})"
            return "connect: ok"
        self.ops.call(op, db, br)
        return f"{op}: ok"

    def worker(self, seed: float, deadline: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            try:
                what = self._one(rng)
            except Exception as e:  # noqa: BLE001 - sorted into refusals and escapes
                if self._refused(e):
                    what = f"refused: {type(e).__name__}"
                else:
                    with self._mu:
                        self.escaped.append("".join(traceback.format_exception(e)))
                    what = "escaped"
            with self._mu:
                self.counts[what] += 1

    def run(self, count_postmasters: Callable[[], int], extra: Sequence[threading.Thread] = ()) -> None:
        deadline = time.monotonic() + self.seconds
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                self.proc_max = max(self.proc_max, count_postmasters())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=self.worker, args=(random.random(), deadline), daemon=True)
                   for _ in range(WORKERS)]
        for t in [*threads, *extra]:
            t.start()
        for t in threads:
            t.join(self.seconds + 300)
        stop.set()
        sampler.join()

    def escapes(self) -> str:
        """Each kind of escaped exception once (its last line), with a count, then the first in full."""
        kinds = Counter(e.strip().splitlines()[-1][:300] for e in self.escaped)
        return "\n".join(f"{n} x {k}" for k, n in kinds.most_common()) + "\n\n" + self.escaped[0]

    def report(self, way: str, mismatches: int) -> str:
        ops = sum(n for k, n in self.counts.items() if k != "escaped")
        refused = sum(n for k, n in self.counts.items() if "refused" in k)
        return (f"control-plane stress over {way}: {SECONDS:.0f} s, {WORKERS} threads, {ops} operations "
                f"({refused} refused as the race made them), {len(self.escaped)} escaped, cap {CAP}: at most "
                f"{self.proc_max} postmasters seen, {mismatches} mismatches; {dict(sorted(self.counts.items()))}")


def check_catalog(snap: Snapshot, store: Store, keep: set[str]) -> list[str]:
    """What is wrong: orphan records, half objects, unreferenced timelines."""
    wrong = []
    for b in snap.branches.values():
        if b.database not in snap.databases:
            wrong.append(f"branch {b.name} (#{b.id}) of a database that is gone")
        if b.parent is not None and b.parent not in snap.branches:
            wrong.append(f"branch {b.name} (#{b.id}) of a parent that is gone")
        if b.timeline not in store:
            wrong.append(f"branch {b.name} (#{b.id}) without its timeline")
        else:
            try:
                pg_version_of(store.timeline(b.timeline))
            except Exception as e:  # noqa: BLE001
                wrong.append(f"branch {b.name}: its timeline holds no data directory ({e})")
    for db in snap.databases.values():
        if (db.id, "main") not in snap.branch_named:
            wrong.append(f"database {db.name} without its main branch")
    referenced = {b.timeline for b in snap.branches.values()} | {TEMPLATE_ID, CATALOG_ID} | keep
    wrong += [f"timeline {t} that no record points at" for t in store.timeline_ids() if t not in referenced]
    return wrong


def test_the_python_api_under_concurrent_use(tmp_path):
    with Running(str(tmp_path), max_computes=CAP, warm_pool=1, default_idle_timeout=1) as r, CapWatch(r.cp) as watch:
        cp = r.cp
        stop = threading.Event()
        housekeeping_errors: list[str] = []

        def housekeeping() -> None:
            while not stop.is_set():
                try:
                    cp.maintain()
                except Exception:  # noqa: BLE001
                    housekeeping_errors.append(traceback.format_exc())
                time.sleep(0.1)

        hk = threading.Thread(target=housekeeping, daemon=True)
        w = Workload(PythonOps(r), SECONDS)
        w.run(lambda: postmasters(cp.ps.mountpoint), [hk])
        stop.set()
        hk.join(60)
        cp.maintain()  # sweeps what deletes left to it
        deadline = time.monotonic() + 60  # a wake for a client already told why may still be finishing
        while cp._starting and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not cp._starting, f"compute slots still held: {cp._starting}"
        after = cp.create_database("after-stress").uri  # and a slot is there for the next one
        with psycopg.connect(after, connect_timeout=60) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        cp.delete_database("after-stress")
        cp.warm_pool = 0  # no new spare while the census is taken ...
        deadline = time.monotonic() + 60
        while cp._warm_starting and time.monotonic() < deadline:  # ... and none half started
            time.sleep(0.05)
        with cp._warm_mu:
            warm = {c.timeline_id for c in cp._warm}
        wrong = check_catalog(cp.catalog.snapshot, cp.ps.store, warm)
        listed = {d.name for d in cp.databases()}
        if listed != set(cp.catalog.snapshot.database_named):
            wrong.append(f"listing {sorted(listed)} is not the catalog")
        print(w.report("the Python API", len(wrong)))
        assert not w.escaped, w.escapes()
        assert not housekeeping_errors, housekeeping_errors[0]
        assert watch.seen <= CAP and watch.seen_proc <= CAP and w.proc_max <= CAP, \
            (watch.seen, watch.seen_proc, w.proc_max)
        assert not wrong, wrong
        assert w.counts["connect: ok"] and w.counts["create_branch: ok"] and w.counts["delete_database: ok"]


def test_the_http_api_under_concurrent_use(tmp_path):
    home = str(tmp_path / "home")
    try:
        strata(home, "up", "--max-computes", str(CAP), "--idle-timeout", "1", "--warm-pool", "1")
        client = Strata(home, start=False)
        mnt = os.path.join(run_dir_for(home), "mnt")
        w = Workload(HttpOps(client), SECONDS)
        w.run(lambda: postmasters(mnt))
        time.sleep(2.5)  # the service's housekeeping runs every second
        status = client.call("GET", "/status")
        assert len(status["running"]) <= CAP
        after = client.create_database("after-stress")  # a slot is there for the next one
        assert after.sql("select 1") == [(1,)]
        after.delete()
        listed = {d["name"] for d in client.call("GET", "/databases")}
        log = open(os.path.join(home, service.LOG)).read()
    finally:
        strata(home, "down")
    with Store.open(os.path.join(home, "store"), background=False) as store:
        snap = Catalog(store).snapshot
        wrong = check_catalog(snap, store, set())
    if listed != set(snap.database_named):
        wrong.append(f"listing {sorted(listed)} is not the catalog")
    print(w.report("HTTP", len(wrong)))
    assert not w.escaped, w.escapes()
    assert " ERROR " not in log, [line for line in log.splitlines() if " ERROR " in line][:5]
    assert w.proc_max <= CAP, w.proc_max
    assert not wrong, wrong
    assert w.counts["connect: ok"] and w.counts["create_branch: ok"]
