"""Computes: stock `postgres` processes running on attached branches.

A compute owns nothing but a process: its data directory is an attachment
of the page server's FUSE mount, its compute-local files and its Unix socket
live in a run directory that is removed when it stops. Starting picks a free
loopback port, starts `postgres` (as the `postgres` OS user when the server
runs as root) in a session of its own, and waits until postmaster.pid says
it is ready. Stopping is a fast shutdown; then the process group is gone.

A compute's state file (run/computes/<id>/state.json) records its
postmaster's pid, start time (in clock ticks since boot) and the boot, so
that a page server killed with its computes running finds and ends them
when it starts again. A process is taken for a compute only by that
identity (a reused pid has another start time) or by its working
directory inside the compute's data directory (each backend's), never by
its name; it is signalled through a pidfd opened before the check, so that
the pid cannot pass to another process between check and signal.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from pageserver.compute.cgroup import Cgroup
from pageserver.errors import ComputeError, PostgresVersionError
from pageserver.proc import boot_id, process_start

log = logging.getLogger("strata.compute")

READY = "ready"


PG_ROOT = "/usr/lib/postgresql"  # Debian's: <root>/<major>/bin (override: $STRATA_PG_ROOT)
_found: dict[str, str] = {}  # major version -> the bin directory found for it (kept while it is there)
_warned: set[str] = set()


def _major_of(bindir: str) -> str | None:
    """The major version of the `postgres` in `bindir` (None: not one);
    asked once per binary (a symlink switched to another is asked again)."""
    exe = os.path.join(bindir, "postgres")
    try:
        st = os.stat(exe)
    except OSError:
        return None
    if not os.access(exe, os.X_OK):
        return None
    return _ask_version(os.path.realpath(exe), st.st_ino, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _ask_version(exe: str, ino: int, mtime_ns: int) -> str | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\) (\d+)", out)
    return m.group(1) if m else None


def _candidates() -> list[str]:
    """Server binary directories, in order of preference for a new store:
    $STRATA_PG_BINDIR, `pg_config --bindir`, then each installed major
    version, newest first."""
    out = []
    env = os.environ.get("STRATA_PG_BINDIR")
    if env:
        out.append(env)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            r = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and r.stdout.strip():
                out.append(r.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    root = os.environ.get("STRATA_PG_ROOT", PG_ROOT)
    try:
        versions = sorted((v for v in os.listdir(root) if v.isdigit()), key=int, reverse=True)
    except OSError:
        versions = []
    out += [os.path.join(root, v, "bin") for v in versions]
    return list(dict.fromkeys(out))


def pg_bindir(major: str | None = None) -> str:
    """The directory of PostgreSQL's server binaries: of major version
    `major` (a data directory's PG_VERSION: a store's branches need the
    version that made their template), or, without it, the one a new
    store would use. Refuses, naming the version, when it is missing."""
    if major is not None:
        hit = _found.get(major)
        if hit is not None and _major_of(hit) == major:  # (a stat: it may have been switched)
            return hit
    found = {d: _major_of(d) for d in _candidates()}
    env = os.environ.get("STRATA_PG_BINDIR")
    if env and major is not None and found.get(env) not in (None, major) and major not in _warned:
        _warned.add(major)  # not silently: say once that it is not used for this store
        log.warning("STRATA_PG_BINDIR is PostgreSQL %s, but this store's data directories need %s: "
                    "looking for that elsewhere", found.get(env), major)
    for d, v in found.items():
        if v is not None and (major is None or v == major):
            if major is not None:
                _found[major] = d
            return d
    have = ", ".join(f"{v} ({d})" for d, v in found.items() if v) or "none"
    if major is None:
        raise PostgresVersionError(None, "cannot find the PostgreSQL server binaries (install postgresql-15, "
                                   "or set STRATA_PG_BINDIR)")
    raise PostgresVersionError(major, f"this store's data directories were made by PostgreSQL {major}, "
                               f"whose server binaries are not installed (found: {have}): install "
                               f"postgresql-{major}, or set STRATA_PG_BINDIR to its bin directory")


def run_as() -> tuple[str | None, int, int]:
    """(user name to switch to or None, uid, gid) for postgres processes."""
    if os.geteuid() != 0:
        return None, os.getuid(), os.getgid()
    pw = pwd.getpwnam(os.environ.get("STRATA_PG_USER", "postgres"))
    return pw.pw_name, pw.pw_uid, pw.pw_gid


READONLY_ROLE = "strata_readonly"
# The role a read-only credential opens a branch as, made (or put back) as it must be: it may log in,
# read every table (pg_read_all_data) and nothing more, and its transactions are read-only unless it
# says otherwise (it still has no right to write). One statement a line: single-user mode reads lines.
READONLY_ROLE_SQL = (
    f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN "
    f"CREATE ROLE {READONLY_ROLE} LOGIN; END IF; END$$;\n"
    f"ALTER ROLE {READONLY_ROLE} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS LOGIN "
    f"INHERIT CONNECTION LIMIT -1 PASSWORD NULL;\n"
    f"DO $$DECLARE r record; BEGIN FOR r IN SELECT roleid::regrole AS g FROM pg_auth_members "
    f"WHERE member = '{READONLY_ROLE}'::regrole AND roleid <> 'pg_read_all_data'::regrole LOOP "
    f"EXECUTE format('REVOKE %s FROM {READONLY_ROLE}', r.g); END LOOP; END$$;\n"
    f"GRANT pg_read_all_data TO {READONLY_ROLE};\n"
    f"ALTER ROLE {READONLY_ROLE} RESET ALL;\n"
    f"ALTER ROLE {READONLY_ROLE} SET default_transaction_read_only = on;\n"
)
# In each database (functions are a database's): large objects are what any role may create, whatever it
# may read; not here (the owner, a superuser, still may). Template1 has it too: CREATE DATABASE copies it.
READONLY_DB_SQL = ("REVOKE EXECUTE ON FUNCTION lo_creat(integer), lo_create(oid), lo_from_bytea(oid, bytea), "
                   "lo_import(text), lo_import(text, oid) FROM PUBLIC;\n")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Compute:
    id: str
    timeline_id: str
    pgdata: str  # the attachment, on the FUSE mount
    rundir: str  # run/computes/<id>: local files, socket, log, state
    port: int  # names its socket (.s.PGSQL.<port>): it listens on no TCP port
    read_only: bool
    lsn: int | None = None  # for a read-only compute: the LSN it shows
    bindir: str = ""  # PostgreSQL's server binaries of its data directory's version
    process: subprocess.Popen | None = None
    process_start: int | None = None  # the postmaster's start time (ticks since boot): its identity
    started_at: float = 0.0
    start_seconds: float = 0.0
    stopping: bool = False
    on_exit: Callable[[Compute, int], None] | None = None
    _watch: threading.Thread | None = field(default=None, repr=False)

    @property
    def local_root(self) -> str:
        return os.path.join(self.rundir, "local")

    @property
    def socket_dir(self) -> str:
        return os.path.join(self.rundir, "sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.rundir, "postgres.log")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def uri(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """The compute's own door, its Unix socket (trusted: only the page
        server and the front ends can reach it; clients go through the proxy)."""
        return f"postgresql://{user}@/{dbname}?host={quote(self.socket_dir, safe='')}&port={self.port}"

    def local_conninfo(self, dbname: str = "postgres") -> str:
        """The same, as a conninfo string."""
        return f"host={self.socket_dir} port={self.port} dbname={dbname} user=postgres"

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # --- lifecycle ---------------------------------------------------------------

    def start(self, extra: list[str], timeout: float = 120.0, *, socket_group: int | None = None,
              cgroup: Cgroup | None = None) -> None:
        """Start postgres, listening on its Unix socket only. Its socket's
        directory is postgres's, entered also by `socket_group` (the front
        ends') when given: the socket itself is open to whoever gets that
        far (PostgreSQL cannot give it a group postgres is not in). Its
        processes go in `cgroup`: the postmaster as soon as it runs (its
        children are born in it), then any it forked before (found by their
        working directory, the data directory)."""
        user, uid, gid = run_as()
        os.makedirs(self.socket_dir, mode=0o700, exist_ok=True)
        os.chown(self.socket_dir, uid, socket_group if socket_group is not None else gid)
        os.chmod(self.socket_dir, 0o750 if socket_group is not None else 0o700)
        args = [
            os.path.join(self.bindir or pg_bindir(), "postgres"), "-D", self.pgdata, "-p", str(self.port),
            "-c", "listen_addresses=", "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", f"unix_socket_permissions={'0777' if socket_group is not None else '0700'}",
            "-c", "logging_collector=off",
        ] + extra
        if self.read_only:
            args += ["-c", "default_transaction_read_only=on"]
        t0 = time.monotonic()
        logf = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), "ab")
        try:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, user=user, group=gid if user else None,
                extra_groups=[] if user else None, cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            )
        finally:
            logf.close()
        self.process_start = process_start(self.process.pid)
        if cgroup is not None:
            cgroup.add(self.process.pid)
        self.write_state()
        self.started_at = time.time()
        pidfile = os.path.join(self.local_root, "postmaster.pid")
        deadline = t0 + timeout
        while True:
            if self.process.poll() is not None:
                raise ComputeError(self.id, f"postgres exited with {self.process.returncode} while starting",
                                   self.log_tail())
            if pidfile_ready(pidfile):
                break
            if time.monotonic() > deadline:
                self.kill()
                raise ComputeError(self.id, f"postgres not ready after {timeout:.0f} s", self.log_tail())
            time.sleep(0.002)
        if cgroup is not None:
            for pid in processes_in(self.pgdata):
                cgroup.add(pid)
        self.start_seconds = time.monotonic() - t0
        self._watch = threading.Thread(target=self._watcher, name=f"compute-{self.id}", daemon=True)
        self._watch.start()

    def _watcher(self) -> None:
        assert self.process is not None
        code = self.process.wait()
        if not self.stopping:
            log.error("compute %s (timeline %s) exited unexpectedly with %s", self.id, self.timeline_id, code)
        if self.on_exit is not None:
            self.on_exit(self, code)

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown; then nothing of the compute's processes is left."""
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("compute %s did not stop in %.0f s: killing it", self.id, timeout)
        self.kill()
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join(timeout=10)

    def kill(self) -> None:
        """SIGKILL to the postmaster and every backend."""
        if self.process is None:
            return
        kill_compute(self.process.pid, self.process_start, self.pgdata)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while kill_compute(None, None, self.pgdata) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the last backend is gone

    def write_state(self) -> None:
        state = {"id": self.id, "timeline": self.timeline_id, "pid": self.pid, "start": self.process_start,
                 "boot": BOOT_ID, "port": self.port, "pgdata": self.pgdata}
        tmp = os.path.join(self.rundir, "state.json.tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
            json.dump(state, f)
        os.rename(tmp, os.path.join(self.rundir, "state.json"))

    def cleanup(self) -> None:
        shutil.rmtree(self.rundir, ignore_errors=True)


def pidfile_ready(path: str) -> bool:
    """Does the postmaster say it is ready (not starting, recovering or stopping)?"""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except OSError:
        return False
    return len(lines) > 7 and lines[7].strip() == READY


BOOT_ID = boot_id()


_warned_pidfd: list[bool] = []


def signal_process(pid: int, sig: int, check: Callable[[], bool]) -> bool:
    """Send `sig` to `pid` if `check()` holds once the pid is pinned (a
    pidfd: it cannot pass to another process between check and signal)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError as e:  # no pidfds here (an old kernel, a seccomp profile): check, then kill
        if not _warned_pidfd:
            _warned_pidfd.append(True)
            log.warning("pidfd_open is unavailable (%s): signalling by pid after each check", e)
        try:
            if check():
                os.kill(pid, sig)
                return True
        except ProcessLookupError:
            pass
        return False
    try:
        if not check():
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("cannot signal process %d", pid)
        return False
    finally:
        os.close(fd)


def _works_in(pid: int, prefix: str) -> bool:
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd in (prefix, prefix + " (deleted)") or cwd.startswith(prefix + "/")


def kill_compute(pid: int | None, start: int | None, pgdata: str) -> int:
    """SIGKILL every process of a compute: its postmaster (`pid`, if it is
    still the process that started at `start`) and every process working in
    its data directory. (PostgreSQL puts each backend in a process group of
    its own, so the postmaster's group is not enough; and a backend waiting
    on a lock its dead peers held never notices that the postmaster died.)
    Returns how many were signalled."""
    n = 0
    if pid and start is not None and signal_process(pid, signal.SIGKILL, lambda: process_start(pid) == start):
        n += 1
    prefix = pgdata.rstrip("/")
    spared = pid if n else None  # the postmaster, signalled above
    for other in processes_in(pgdata):
        if other != spared:
            n += signal_process(other, signal.SIGKILL, functools.partial(_works_in, other, prefix))
    return n


def processes_in(pgdata: str) -> list[int]:
    """The processes working in a data directory (a compute's postmaster and
    backends: postgres runs in its data directory)."""
    prefix = pgdata.rstrip("/")  # (canonical: the node resolves its run directory, as /proc/<pid>/cwd shows it)
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _works_in(int(e), prefix)]


def reap_stale(computes_dir: str) -> int:
    """End the computes a killed page server left running. Returns how many."""
    n = 0
    if not os.path.isdir(computes_dir):
        return 0
    for cid in os.listdir(computes_dir):
        state = os.path.join(computes_dir, cid, "state.json")
        try:
            with open(state) as f:
                st = json.load(f)
        except (OSError, ValueError):
            st = {}
        if st.get("pid"):
            same_boot = st.get("boot") == BOOT_ID  # (after a reboot, its pid is anybody's)
            killed = kill_compute(int(st["pid"]) if same_boot else None, st.get("start"),
                                  st.get("pgdata", "/nonexistent"))
            n += 1
            log.warning("ended compute %s (%d processes) left by an earlier page server", cid, killed)
        shutil.rmtree(os.path.join(computes_dir, cid), ignore_errors=True)
    return n
