"""The supervisor: runs and watches the service's two processes.

    supervisor (python -m pageserver.service, as its caller: root where FUSE needs it)
      +-- page server  (python -m pageserver.control, same user): store, FUSE, computes,
      |                control plane, housekeeping; serves RPC on <run>.rpc/control.sock
      +-- front end    (python -m pageserver.frontend, unprivileged: user `strata` when
                       started as root): HTTP API + proxy, over that RPC

Both children get SIGTERM if the supervisor dies (PR_SET_PDEATHSIG). A
child that dies is restarted, with backoff; more than MAX_RESTARTS in
RESTART_WINDOW seconds brings the whole service down cleanly instead. The
front end's exit status 75 (after POST /v1/shutdown) stops the service.
SIGTERM stops the front end first (its sessions end with a reason), then
the page server (computes stop, the mount goes, the store closes).
`<home>/service.json` says which process is which and how each fared
(`strata status` prints it).

The front end as root: it starts as root only to be able to read the
code (which may sit in a root-only directory), imports everything it
will need, binds its ports, and drops to the unprivileged user before it
serves (`pageserver.frontend.__main__`).

Concurrency: one thread per child waits for it to exit (`_watch`) and
queues the exit; `run`, on the thread that started the children, takes
the queue one event at a time and is the only one to start or stop a
child. `_mu` guards the children's exit records; `_stop_asked` (a plain
flag: a signal handler sets it) says a stop is under way (no restarts
then).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pwd
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

log = logging.getLogger("strata.supervisor")

FRONTEND_USER = "strata"
SHUTDOWN_REQUESTED = 75
MAX_RESTARTS, RESTART_WINDOW = 5, 60.0
START_TIMEOUT = 300.0  # the first start makes the template (initdb)
STOP_TIMEOUT = 90.0  # per child; both within `strata down`'s wait (service.STOP_WAIT)
_PR_SET_PDEATHSIG = 1


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child must not dlopen


def _dying_with(parent: int) -> Any:
    """A preexec_fn: the child gets SIGTERM when `parent` (this thread) goes,
    and exits at once if it went between the fork and the prctl."""

    def arm() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def frontend_identity(name: str | None = None) -> tuple[str, int, int]:
    """(user, uid, gid) the front end runs as: when root, an unprivileged
    system user (made if missing); otherwise this process's own."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name, os.geteuid(), os.getegid()
    name = name or os.environ.get("STRATA_FRONTEND_USER") or FRONTEND_USER
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        r = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cannot make the front end's user {name!r}: {r.stderr.strip()}") from None
        log.info("made system user %s for the front end", name)
        pw = pwd.getpwnam(name)
    if pw.pw_uid == 0:
        raise RuntimeError(f"the front end's user {name!r} is root: name an unprivileged one")
    return name, pw.pw_uid, pw.pw_gid


@dataclass
class Child:
    role: str  # "pageserver" | "frontend"
    cmd: list[str]
    user: str
    stdin: bytes | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: list[float] = field(default_factory=list)
    last_exit: str | None = None

    def state(self) -> dict[str, Any]:
        return {"role": self.role, "pid": self.proc.pid if self.proc else None, "user": self.user,
                "running": self.proc is not None and self.proc.poll() is None,
                "started_at": self.started_at, "restarts": len(self.restarts), "last_exit": self.last_exit}


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    def __init__(self, *, pageserver_cmd: list[str], frontend_cmd: list[str], frontend_user: tuple[str, int, int],
                 token: str, log_file: IO[Any], on_state: Any) -> None:
        self.log_file = log_file
        self.on_state = on_state  # called with the children's states whenever one changes
        self.fe_user = frontend_user
        me = pwd.getpwuid(os.geteuid()).pw_name
        self.children = {
            "pageserver": Child("pageserver", pageserver_cmd, me),
            "frontend": Child("frontend", frontend_cmd, frontend_user[0], stdin=(token + "\n").encode()),
        }
        self._mu = threading.Lock()
        self._stopping = threading.Event()
        self._stop_asked = False  # set by stop(), which may run in a signal handler
        # SimpleQueue: its put is safe in a signal handler (Queue's takes a lock the woken getter may hold)
        self._events: queue.SimpleQueue[tuple[Child, subprocess.Popen[bytes], int] | None] = queue.SimpleQueue()
        self.done = threading.Event()  # the service is down (stopped, or gave up)
        self.why_down: str | None = None

    # --- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the page server and the front end together: the front end
        imports what it needs while the page server opens its store, then
        waits for its token on stdin, written once the page server is ready.
        Each must say it is ready."""
        fe = self.children["frontend"]
        proc = self._spawn(fe)
        try:
            ps = self.children["pageserver"]
            self._handshake(ps, self._spawn(ps), partner=(fe, proc))  # (a front end dying meanwhile: said at once)
            self._handshake(fe, proc)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        self.publish()

    def _start(self, c: Child) -> None:
        self._handshake(c, self._spawn(c))

    def _spawn(self, c: Child) -> subprocess.Popen[bytes]:
        kwargs: dict[str, Any] = {}
        if c.role == "frontend":  # (the object store's credentials are the page server's alone)
            kwargs["env"] = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            if os.geteuid() == 0:
                kwargs["env"].update(STRATA_FRONTEND_UID=str(self.fe_user[1]), STRATA_FRONTEND_GID=str(self.fe_user[2]))
        return subprocess.Popen(c.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file,
                                cwd="/", preexec_fn=_dying_with(os.getpid()), **kwargs)

    def _handshake(self, c: Child, proc: subprocess.Popen[bytes],
                   partner: tuple[Child, subprocess.Popen[bytes]] | None = None) -> None:
        """Give a spawned child its stdin and wait until it says it is ready
        (or until `partner`, started beside it, dies)."""
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            if c.stdin:
                proc.stdin.write(c.stdin)
            proc.stdin.close()
        partner_died = (lambda: partner[1].poll() is not None) if partner is not None else (lambda: False)
        ready = _read_ready(proc, START_TIMEOUT, lambda: self._stop_asked or partner_died())
        if ready is None:
            code = proc.poll()
            if code is None:
                proc.kill()
                proc.wait()
                if partner is not None and partner_died():
                    raise RuntimeError(f"the {partner[0].role} {describe_exit(partner[1].poll() or 0)} while "
                                       f"the {c.role} started")
                if self._stop_asked:
                    raise RuntimeError(f"the service was stopped while the {c.role} started")
                raise RuntimeError(f"the {c.role} did not say it was ready within {START_TIMEOUT:.0f} s")
            raise RuntimeError(f"the {c.role} {describe_exit(code)} while starting")
        c.proc, c.started_at = proc, time.time()
        log.info("%s ready (pid %d, user %s)", c.role, proc.pid, c.user)
        threading.Thread(target=self._watch, args=(c, proc), name=f"watch-{c.role}", daemon=True).start()

    # --- watching ---------------------------------------------------------------------------

    def _watch(self, c: Child, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        with self._mu:
            c.last_exit = f"{describe_exit(code)} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        self._events.put((c, proc, code))

    def run(self) -> None:
        """Handle exits and stop requests until the service is down. Runs
        on the thread that started the children, and starts their
        replacements itself: the kernel's parent-death signal follows the
        thread that forked a child, not the process."""
        while True:
            event = self._events.get()
            if event is None or self._stop_asked:
                self._stop(self.why_down or "asked to stop")
                return
            c, proc, code = event
            if c.role == "frontend" and code == SHUTDOWN_REQUESTED:
                log.info("shutdown asked through the API")
                self._stop("shutdown asked through the API")
                return
            log.error("%s (pid %d) %s", c.role, proc.pid, describe_exit(code))
            now = time.monotonic()
            c.restarts = [t for t in c.restarts if now - t < RESTART_WINDOW] + [now]
            if len(c.restarts) > MAX_RESTARTS:
                why = f"the {c.role} died {len(c.restarts)} times within {RESTART_WINDOW:.0f} s: gave up"
                log.error("%s", why)
                self._stop(why)
                return
            self.publish()
            backoff_until = time.monotonic() + min(0.2 * 2 ** (len(c.restarts) - 1), 5.0)
            while not self._stop_asked and time.monotonic() < backoff_until:
                time.sleep(0.05)
            if self._stop_asked:
                continue
            try:
                self._start(c)
                log.info("%s restarted (restart %d)", c.role, len(c.restarts))
            except Exception as e:  # noqa: BLE001 - a restart that fails brings the service down
                why = f"the {c.role} could not be restarted: {e}"
                log.error("%s", why)
                self._stop(why)
                return
            self.publish()

    def stop(self, why: str = "asked to stop") -> None:
        """Ask `run` to stop the service (from any thread, a signal handler's
        included: it takes no lock, since the thread a signal interrupts may
        hold the one it would wait for)."""
        if self.why_down is None:
            self.why_down = why
        self._stop_asked = True
        self._events.put(None)

    def publish(self) -> None:
        with self._mu:
            states = {role: c.state() for role, c in self.children.items()}
        self.on_state(states)

    # --- stopping ---------------------------------------------------------------------------

    def _stop(self, why: str) -> None:
        self._stopping.set()
        self.why_down = why
        for role in ("frontend", "pageserver"):
            proc = self.children[role].proc
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not stop within %.0f s: killed", role, proc.pid, STOP_TIMEOUT)
                proc.kill()
                proc.wait()
        log.info("service down: %s", why)
        self.done.set()


def _read_ready(proc: subprocess.Popen[bytes], timeout: float, stopping: Callable[[], bool]) -> dict[str, Any] | None:
    """The child's `{"ready": true, ...}` line from its stdout, or None.
    What it prints after that is read (and dropped) so that it never
    blocks on a full pipe."""
    assert proc.stdout is not None
    box: list[dict[str, Any]] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not ready.is_set():
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and msg.get("ready"):
                        box.append(msg)
                        ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1) and not stopping() and time.monotonic() < deadline:
        pass
    return box[0] if box else None


def python() -> str:
    return sys.executable
