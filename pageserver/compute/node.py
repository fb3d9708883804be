"""The page server: a store, its FUSE mount, and the computes running on it.

Layout: the store lives in the page server's home directory; what the
`postgres` processes must reach lives in a run directory outside it (the
home may sit where the `postgres` OS user cannot go, such as /root), one per
home, found again after a crash::

    <home>/store/                 the engine store (engine.store)
    <run>/mnt/                    the FUSE mount; <mnt>/<compute id> is a data directory
    <run>/computes/<id>/          a compute's local files, log, state
    <run>/computes/<id>/sock/     its Unix socket, its only door: postgres's, 0750 with the
                                  front ends' group (0700 when not root); no TCP port
    <run>/readonly/<id>/          local files of read-only mounts

    <run> = /run/strata/<hash of the home path> (or $STRATA_RUN_DIR)

Opening a page server first cleans up after one that was killed: it ends
the computes it left (their process groups are in their state files) and
unmounts a dead mount; their branches then serve again.

`initdb` runs once per store: its result is imported as the *template*
timeline that new databases branch from. The template's `PG_VERSION` file
(in the store, like every file of it) records which PostgreSQL major
version made it; every branch inherits it, and a compute runs the server
binaries of its data directory's version (`pg_bindir(major)`), whatever
else is installed or preferred, or is refused with that version named.

Concurrency: `_mu` (an RLock) guards the tables of computes (`_computes`,
`_by_timeline`, `_readonly`, `_cgroups`), held for their updates and for
a compute's registration, never across a walk or a process start;
`_hits_mu` guards the limits' counters (`storage_refusals`,
`_ooms_before`). Order: `_hits_mu` before `_mu`; a data directory's lock
may be held when `_hits_mu` is taken (a refused write counts itself), and
neither node lock is held while one is taken.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time

from engine import NotFoundError, Store, StoreConfig, Timeline
from pageserver.compute.cgroup import Cgroup, MemoryCgroups
from pageserver.compute.paths import RUN_MODE, private_dir, run_dir_for
from pageserver.compute.postgres import (
    READONLY_DB_SQL,
    READONLY_ROLE_SQL,
    Compute,
    free_port,
    pg_bindir,
    pidfile_ready,
    reap_stale,
    run_as,
)
from pageserver.errors import BranchBusyError, ComputeError, ComputeNotFoundError
from pageserver.fuse.filesystem import Mount, unmount
from pageserver.pgdata.datadir import DataDir
from pageserver.pgdata.importer import export_datadir, import_datadir
from pageserver.pgdata.policy import PG_CONF, PG_HBA

log = logging.getLogger("strata.server")

TEMPLATE_ID = "7374726174612d74656d706c61746500"  # "strata-template" in hex


def pg_version_of(tl: Timeline) -> str:
    """The PostgreSQL major version of a timeline's data directory (its
    PG_VERSION), read through a read-only view: a writable DataDir would
    free the orphans of a compute that may be running on it."""
    try:
        dd = DataDir(tl, lsn=tl.head_lsn)
        ino = dd.resolve("PG_VERSION")
        return dd.read(ino, 0, 64).decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ComputeError("-", f"timeline {tl.id} has no readable PG_VERSION: {e}") from e


def _physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Node:
    def __init__(self, home: str, *, config: StoreConfig | None = None, background: bool = True,
                 socket_group: int | None = None, remote: str | None = None,
                 cache_size: int | None = None, durable: bool = False) -> None:
        self.home = os.path.abspath(home)
        self.remote_url = remote  # the object store the store lives in (engine.remote), if any
        self.cache_size = cache_size  # bytes of layer files kept here, with a remote (None: all)
        self.durable = durable  # every sync waits for the object store (engine.remote durable mode)
        # the front ends' group, which may enter the computes' socket directories (root only)
        self.socket_group = socket_group if os.geteuid() == 0 else None
        self.store_path = os.path.join(self.home, "store")
        # resolved, as the kernel shows a process's working directory (compute cleanup matches it)
        self.run_dir = os.path.realpath(os.environ.get("STRATA_RUN_DIR") or run_dir_for(self.home))
        self.mountpoint = os.path.join(self.run_dir, "mnt")
        self.computes_dir = os.path.join(self.run_dir, "computes")
        self._config = config
        self._background = background
        self._mu = threading.RLock()
        self._computes: dict[str, Compute] = {}
        self._by_timeline: dict[str, str] = {}  # timeline id -> its read-write compute
        self._readonly: dict[str, str] = {}  # read-only mount path -> attachment
        self._hits_mu = threading.Lock()
        self.storage_refusals = 0  # writes a branch's cap refused (under _hits_mu)
        self._ooms_before = 0  # OOM kills in the groups of computes since stopped (under _hits_mu)
        self.cgroups = MemoryCgroups("strata-" + os.path.basename(self.run_dir))  # one group per compute
        self._cgroups: dict[str, Cgroup] = {}  # compute id -> its group (under _mu)
        self.store: Store = None  # type: ignore[assignment]
        self.mount: Mount = None  # type: ignore[assignment]

    # --- lifecycle --------------------------------------------------------------

    def open(self) -> Node:
        # the store's lock first: only its holder may end what an earlier page server left (a
        # page server still stopping holds it, and its computes and mount are still its own)
        remote = None
        if self.remote_url is not None:
            from engine.objectstore import open_object_store
            from engine.remote import Remote

            remote = Remote(open_object_store(self.remote_url), cache_bytes=self.cache_size, durable=self.durable)
        self.store = Store.open(self.store_path, config=self._config, background=self._background, remote=remote)
        try:
            private_dir(self.run_dir, RUN_MODE)
            reaped = reap_stale(self.computes_dir)
            if os.geteuid() == 0:
                self.cgroups.reap()  # the empty groups the killed computes left
            if unmount(self.mountpoint):
                log.warning("unmounted a stale mount at %s", self.mountpoint)
            shutil.rmtree(os.path.join(self.run_dir, "readonly"), ignore_errors=True)
            self.mount = Mount(self.mountpoint, statfs_path=self.store_path)
            self.mount.start()
        except BaseException:
            self.store.close()
            raise
        private_dir(self.computes_dir, RUN_MODE)
        log.info("page server %s open (%d stale computes ended)", self.home, reaped)
        return self

    def remote_status(self) -> dict[str, object] | None:
        """Where the store also lives, and how far behind the head it is there."""
        remote = self.store._remote if self.store is not None else None
        if remote is None:
            return None
        return {"url": self.remote_url, **remote.status(self.store.last_lsn)}

    def close(self) -> None:
        for c in list(self._computes.values()):
            try:
                self.stop_compute(c.id)
            except Exception:  # noqa: BLE001 - keep closing the rest
                log.exception("stopping compute %s", c.id)
        if os.geteuid() == 0:
            self.cgroups.reap()  # (a group a killed compute left, once its processes are gone)
            self.cgroups.close()
        if self.mount is not None:
            self.mount.stop()
            if not os.path.ismount(self.mountpoint):
                shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing of ours is left running
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Node:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- template ---------------------------------------------------------------

    def template(self) -> Timeline | None:
        return self.store.timeline(TEMPLATE_ID) if TEMPLATE_ID in self.store else None

    @property
    def pg_version(self) -> str | None:
        """The PostgreSQL major version that made this store's template."""
        tl = self.template()
        return pg_version_of(tl) if tl is not None else None

    def ensure_template(self, progress: bool | None = None) -> Timeline:
        """The template timeline, running `initdb` the first time only."""
        tl = self.template()
        if tl is not None:
            return tl
        user, uid, gid = run_as()
        tmp = tempfile.mkdtemp(prefix="strata-initdb-")
        try:
            os.chown(tmp, uid, gid)
            pgdata = os.path.join(tmp, "pgdata")
            t0 = time.monotonic()
            r = subprocess.run(
                [os.path.join(pg_bindir(), "initdb"), "-D", pgdata, "-U", "postgres", "-E", "UTF8",
                 "--locale=C", "--data-checksums", "--no-sync", "--auth-local=trust",
                 "--auth-host=scram-sha-256"],
                capture_output=True, text=True, user=user, cwd="/",
            )
            if r.returncode != 0:
                raise ComputeError("initdb", f"initdb failed ({r.returncode})", r.stdout + r.stderr)
            with open(os.path.join(pgdata, "postgresql.conf"), "a") as f:
                f.write(PG_CONF)
            with open(os.path.join(pgdata, "pg_hba.conf"), "w") as f:
                f.write(PG_HBA)
            for dbname, sql in (("postgres", READONLY_ROLE_SQL + READONLY_DB_SQL), ("template1", READONLY_DB_SQL)):
                r = subprocess.run(  # every database is born with the read-only role (pageserver.compute.postgres)
                    [os.path.join(pg_bindir(), "postgres"), "--single", "-D", pgdata, "-c", "fsync=off", dbname],
                    input=sql, capture_output=True, text=True, user=user, cwd="/",
                )
                if r.returncode != 0 or "ERROR" in r.stdout + r.stderr:
                    raise ComputeError("initdb", f"making the read-only role failed ({r.returncode})",
                                       r.stdout + r.stderr)
            log.info("initdb took %.2f s", time.monotonic() - t0)
            return import_datadir(self.store, pgdata, timeline_id=TEMPLATE_ID, progress=progress)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- data directories ----------------------------------------------------------

    def import_datadir(self, src: str, *, progress: bool | None = None) -> Timeline:
        return import_datadir(self.store, src, progress=progress)

    def export_datadir(self, timeline: Timeline | str, dest: str, *, lsn: int | None = None,
                       progress: bool | None = None) -> int:
        tl = self.store.timeline(timeline) if isinstance(timeline, str) else timeline
        return export_datadir(tl, dest, lsn=lsn, progress=progress)

    def mount_readonly(self, timeline: Timeline | str, lsn: int) -> str:
        """A read-only view of a timeline as of `lsn`; returns its path."""
        tl = self.store.timeline(timeline) if isinstance(timeline, str) else timeline
        dd = DataDir(tl, lsn=tl._check_lsn(lsn))
        name = f"ro-{os.urandom(6).hex()}"
        _, uid, gid = run_as()
        self.mount.ops.attach(name, dd, os.path.join(self.run_dir, "readonly", name), uid, gid)
        path = os.path.join(self.mountpoint, name)
        self._readonly[path] = name
        return path

    def unmount_readonly(self, path: str) -> None:
        name = self._readonly.pop(path, None)
        if name is None:
            raise ComputeNotFoundError(path)
        self.mount.ops.detach(name)
        shutil.rmtree(os.path.join(self.run_dir, "readonly", name), ignore_errors=True)

    # --- computes ----------------------------------------------------------------

    def compute(self, compute_id: str) -> Compute:
        c = self._computes.get(compute_id)
        if c is None:
            raise ComputeNotFoundError(compute_id)
        return c

    def compute_of(self, timeline: Timeline | str) -> Compute | None:
        """The read-write compute running on a timeline, if any."""
        tid = timeline if isinstance(timeline, str) else timeline.id
        cid = self._by_timeline.get(tid)
        return self._computes.get(cid) if cid else None

    def computes(self) -> list[Compute]:
        with self._mu:
            return list(self._computes.values())

    def compute_timelines(self) -> set[str]:
        """The timelines computes run on now (read-only ones' throwaway
        branches included): one per process."""
        with self._mu:
            return {c.timeline_id for c in self._computes.values()}

    def start_compute(
        self, timeline: Timeline | str, *, lsn: int | None = None,
        settings: dict[str, str] | None = None, timeout: float = 120.0,
        max_size: int | None = None, memory: int | None = None,
    ) -> Compute:
        """Start postgres on a timeline (read-write at its head), or, with
        `lsn`, a read-only compute showing the timeline as of that LSN (on a
        throwaway branch, since recovery must write). `max_size` caps its
        relation files' bytes (`DataDir.set_max_data`); `memory`, all its
        processes' memory (a cgroup, where the system allows one)."""
        tid = timeline if isinstance(timeline, str) else timeline.id
        tl = self.store.timeline(tid)  # NotFoundError for an unknown timeline
        read_only = lsn is not None
        version = pg_version_of(tl)
        bindir = pg_bindir(version)  # refused here, naming the version, if it is missing
        with self._mu:
            if not read_only and tid in self._by_timeline:
                raise BranchBusyError(tid, self._by_timeline[tid])
            if read_only:
                tl = self.store.branch(tl, at_lsn=lsn, durable=False)
            dd = DataDir(tl)
            dd.on_full = self._refused
            cid = os.urandom(6).hex()
            rundir = os.path.join(self.computes_dir, cid)
            private_dir(rundir, RUN_MODE)  # the page server's; postgres owns only its socket and local files
            c = Compute(
                id=cid, timeline_id=tl.id, pgdata=os.path.join(self.mountpoint, cid), rundir=rundir,
                port=free_port(), read_only=read_only, lsn=lsn,
                on_exit=self._exited, bindir=bindir,
            )
            _, uid, gid = run_as()
            cg = self.cgroups.create(cid, memory) if memory and not read_only else None
            if cg is not None:
                self._cgroups[cid] = cg
            self.mount.ops.attach(cid, dd, c.local_root, uid, gid)
            self._computes[cid] = c
            if not read_only:
                self._by_timeline[tid] = cid
        extra = [x for k, v in (settings or {}).items() for x in ("-c", f"{k}={v}")]
        if int(version.split(".")[0]) >= 14:
            # Crash recovery begins by making the data directory durable. Its default walk opens and
            # fsyncs every file through FUSE (1.9 s for a restored 1 GB database); syncfs writes back
            # the mount's dirty pages in one call, and every WRITE is durable once the engine answers it.
            extra = ["-c", "recovery_init_sync_method=syncfs", *extra]
        try:
            # never refused while postgres starts or recovers: replay must redo what was allowed before
            dd.may_refuse = functools.partial(pidfile_ready, os.path.join(c.local_root, "postmaster.pid"))
            if max_size and not read_only:
                dd.set_max_data(max_size)  # (out of the node's lock: it walks the tree)
            c.start(extra, timeout=timeout, socket_group=self.socket_group, cgroup=self._cgroups.get(cid))
        except BaseException:
            c.stopping = True
            c.kill()
            self._release(c)
            raise
        log.info("compute %s started on timeline %s%s on port %d in %.0f ms",
                 cid, tl.id, f" (read-only at LSN {lsn})" if read_only else "", c.port, c.start_seconds * 1e3)
        return c

    def _refused(self) -> None:
        with self._hits_mu:
            self.storage_refusals += 1

    def set_max_size(self, compute_id: str, max_size: int | None) -> None:
        """Change a running compute's cap. Its relation files opened from
        now on are checked as they are written; those already open keep
        going through the kernel's cache until the compute restarts (counted,
        not refused), when they had no cap."""
        att = self.mount.ops.attachment(compute_id)
        if att is None:
            raise ComputeNotFoundError(compute_id)
        att.datadir.set_max_data(max_size or None)

    def set_memory(self, compute_id: str, memory: int | None) -> None:
        """Change a running compute's memory limit (if it has a group: one
        started with no limit, or where the system has none, stays so)."""
        with self._mu:
            cg = self._cgroups.get(compute_id)
        if cg is not None:
            cg.set_limit(memory or _physical_memory())  # (none: as much as the machine has)

    def memory_limits(self) -> str:
        """How computes' memory is limited here, for people."""
        if self.cgroups.version is None:
            return f"not enforced: {self.cgroups.why_not}"
        return f"cgroup {self.cgroups.version}"

    def oom_kills(self) -> int:
        """OOM kills in computes' groups since this page server opened."""
        with self._hits_mu:  # (with _release's move of a group's count: each is counted once)
            with self._mu:
                live = list(self._cgroups.values())
            return self._ooms_before + sum(cg.oom_kills() for cg in live)

    def data_size(self, timeline_id: str) -> int | None:
        """The bytes of relation files of the timeline's running compute, if
        it is capped (and so counts them); else None."""
        with self._mu:
            cid = self._by_timeline.get(timeline_id)
        att = self.mount.ops.attachment(cid) if cid else None
        return att.datadir.counted_bytes if att is not None else None

    def stop_compute(self, compute_id: str) -> None:
        """Fast shutdown, unmount its data directory, and make every write durable."""
        c = self.compute(compute_id)
        c.stop()
        self._release(c)
        log.info("compute %s stopped (timeline %s)", c.id, c.timeline_id)

    def _exited(self, c: Compute, code: int) -> None:
        if not c.stopping:  # died: clean up after it, so its branch can serve again
            c.kill()
            self._release(c)

    def _release(self, c: Compute) -> None:
        with self._mu:
            if self._computes.pop(c.id, None) is None:
                return
            if self._by_timeline.get(c.timeline_id) == c.id:
                del self._by_timeline[c.timeline_id]
        att = self.mount.ops.detach(c.id)
        with self._hits_mu:
            with self._mu:
                cg = self._cgroups.pop(c.id, None)
            if cg is not None:
                self._ooms_before += cg.oom_kills()
        if cg is not None:
            cg.remove()
        if c.read_only:
            try:
                self.store.delete_timeline(c.timeline_id)  # its throwaway branch
            except NotFoundError:
                pass
        elif att is not None:
            att.datadir.fsync()
        c.cleanup()
