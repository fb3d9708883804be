"""The Strata service over one home directory: a supervisor running the
page server process (store, FUSE, computes, control plane) and the
front-end process (HTTP API, PostgreSQL proxy; unprivileged), see
`pageserver.service.supervisor`.

    <home>/store/          the engine's store (catalog and every branch)
    <home>/token           the API's bearer token (0600), made at first start
    <home>/ports.json      the API and proxy ports, chosen at first start and
                           kept, so that URIs handed out stay valid
    <home>/service.json    where the running service listens and its processes
                           (written once it serves, removed when it stops)
    <home>/service.log     its log

`strata up` runs `python -m pageserver.service --home H` in a session of
its own and waits for service.json; `strata down` sends SIGTERM and waits.
Files are written with write-temp, fsync, rename, fsync-directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pageserver.errors import AnotherServiceError, ServiceNotRunningError
from pageserver.proc import is_process

# (the engine's file seam, the supervisor and what only starting a service needs are imported where
# used: a CLI call that only reads the state file to find the API pays for none of them)

if TYPE_CHECKING:
    pass

log = logging.getLogger("strata.service")

STATE, TOKEN, PORTS, LOG, LOCK = "service.json", "token", "ports.json", "service.log", "service.lock"
HOST = "127.0.0.1"


def default_home() -> str:
    return os.path.abspath(os.environ.get("STRATA_HOME") or os.path.join(os.getcwd(), ".strata"))


def tighten(home: str) -> int:
    """Make a home private again (an older Strata, or a hand, may have left
    it wider): the home and every directory in it 0700, every file 0600.
    Symbolic links are not followed, other users' files are left alone.
    Returns how many modes it changed."""
    from pageserver.compute.paths import private_dir

    changed = 0
    uid = os.geteuid()
    # each entry opened relative to its directory's descriptor, never through a link (a link swapped in
    # meanwhile is not followed); entries that go meanwhile (an old page server still flushing) are skipped
    for _, dirs, files, dir_fd in os.fwalk(private_dir(home)):
        for name, mode in [(d, 0o700) for d in dirs] + [(f, 0o600) for f in files]:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:  # gone, a link (ELOOP), or not ours to open
                continue
            try:
                st = os.fstat(fd)
                if st.st_uid == uid and stat.S_IMODE(st.st_mode) & ~mode:
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) & mode)
                    changed += 1
            finally:
                os.close(fd)
    if changed:
        log.warning("tightened the modes of %d files and directories in %s (private: 0700 and 0600)",
                    changed, home)
    return changed


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _write(path: str, data: bytes, mode: int = 0o600) -> None:
    from engine.fs import OsFileSystem, write_atomically

    write_atomically(OsFileSystem(), path, data)
    os.chmod(path, mode)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (made if missing): across processes."""
    fd = _open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (which releases it)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def ensure_token(home: str) -> str:
    path = os.path.join(home, TOKEN)
    if not os.path.exists(path):
        import secrets

        _write(path, secrets.token_urlsafe(32).encode())
    with open(path) as f:
        return f.read().strip()


def _ports(home: str, api_port: int | None, proxy_port: int | None) -> tuple[int, int]:
    path = os.path.join(home, PORTS)
    saved: dict[str, int] = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    api = api_port or saved.get("api") or _free_port(HOST)
    proxy = proxy_port or saved.get("proxy") or _free_port(HOST)
    if saved != {"api": api, "proxy": proxy}:
        _write(path, json.dumps({"api": api, "proxy": proxy}).encode())
    return api, proxy


def read_state(home: str) -> dict[str, Any] | None:
    """The running service's state, or None if none serves this home."""
    try:
        with open(os.path.join(home, STATE)) as f:
            state: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    same_home = isinstance(state.get("home"), str) and os.path.realpath(state["home"]) == os.path.realpath(home)
    if same_home and is_process(state.get("pid"), state.get("start"), state.get("boot")):
        # The process that wrote it is alive (pid, start time and boot: the kernel's word, no pid reuse
        # passes), and it wrote it holding the lock it holds until it ends: the service. (Reading
        # /proc/locks costs 10 ms at a process's first read: a CLI call's budget is 100.)
        return state
    pid = service_pid(home)
    return state if pid is not None and state.get("pid") == pid else None


def service_pid(home: str) -> int | None:
    """The pid of the service serving `home`: the holder of its lock, as
    the kernel tells it (/proc/locks). A lock dies with its process, so a
    pid that a dead service left in a file, now another process's, is never
    taken for the service."""
    return lock_holder(os.path.join(home, LOCK))


_PROBE_AT = 1 << 62  # where the probe's POSIX lock goes (nobody else's range)


def lock_holder(path: str) -> int | None:
    """The pid holding a flock on `path` (None: nobody).

    /proc/locks names a file by its superblock's device, which stat's
    st_dev is not on btrfs subvolumes or overlayfs: so a POSIX read lock of
    our own on one far byte (flock and POSIX locks never conflict) shows how
    the kernel names this file, and the flock's line is the one that
    names it so."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, _PROBE_AT)
        with open("/proc/locks") as f:
            lines = [line.split() for line in f.read().splitlines()]
    except OSError:
        return None
    finally:
        os.close(fd)  # (which drops the probe)
    # "1: POSIX  ADVISORY  READ 4242 00:2a:1234 4611686018427387904 4611686018427387904";
    # "2: FLOCK  ADVISORY  WRITE 4243 00:2a:1234 0 EOF"; a waiter's line: "2: -> FLOCK ..."
    mine = str(os.getpid())
    ident = next((p[5] for p in lines if len(p) >= 7 and p[1] == "POSIX" and p[4] == mine
                  and p[6] == str(_PROBE_AT)), None)
    for p in lines:
        if ident is not None and len(p) >= 6 and p[1] == "FLOCK" and p[5] == ident and p[4].isdigit():
            return int(p[4])
    return None


def hold_service_lock(home: str) -> int:
    """Take the home's service lock, held until this process ends (nothing
    closes the descriptor returned; children do not inherit it).
    AnotherServiceError if another service holds it."""
    fd = _open_private(os.path.join(home, LOCK), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AnotherServiceError(home, service_pid(home)) from None
    return fd


def main(argv: list[str] | None = None) -> None:
    import argparse
    import threading

    from pageserver.service.supervisor import FRONTEND_USER, Supervisor, frontend_identity

    p = argparse.ArgumentParser(prog="python -m pageserver.service", description=__doc__.splitlines()[0])
    p.add_argument("--home", default=default_home())
    p.add_argument("--api-port", type=int)
    p.add_argument("--proxy-port", type=int)
    p.add_argument("--max-computes", type=int)
    p.add_argument("--idle-timeout", type=float)
    p.add_argument("--warm-pool", type=int, default=0, help="spare computes kept running (default 0)")
    p.add_argument("--max-connections", type=int, help="client connections the proxy takes at once")
    p.add_argument("--branch-connections", type=int, help="client connections per branch, at the proxy")
    p.add_argument("--limits", help="databases' default limits, as JSON (see pageserver.control.limits)")
    p.add_argument("--remote", help="the object store the store lives in: s3://bucket/prefix (with "
                                    "AWS_* variables) or file:///path; kept in the home")
    p.add_argument("--cache-size", type=int, help="bytes of layer files kept on local disk (with --remote)")
    p.add_argument("--durable", action="store_true", help="with --remote: every fsync waits for the object store")
    p.add_argument("--frontend-user", help=f"who the front end runs as when started as root "
                                           f"(default ${{STRATA_FRONTEND_USER}} or {FRONTEND_USER!r})")
    args = p.parse_args(argv)
    home = os.path.realpath(args.home)
    os.umask(0o077)  # whatever this process and its children make is private from the start
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s supervisor %(name)s %(levelname)s %(message)s")
    from pageserver.compute.paths import private_dir

    try:
        hold_service_lock(private_dir(home))  # held until this process ends: its liveness
    except AnotherServiceError as e:
        log.error("%s", e)
        sys.exit(1)
    tighten(home)  # (the home is ours now: no other service writes in it)
    api_port, proxy_port = _ports(home, args.api_port, args.proxy_port)
    token = ensure_token(home)
    fe_user = frontend_identity(args.frontend_user)
    sock = _control_socket(home, fe_user[2])
    defaults = json.loads(args.limits) if args.limits else {}
    if args.branch_connections:
        defaults["branch_connections"] = args.branch_connections
    options = _flags({"--max-computes": args.max_computes, "--idle-timeout": args.idle_timeout,
                      "--warm-pool": args.warm_pool, "--limits": json.dumps(defaults) if defaults else None,
                      "--remote": args.remote, "--cache-size": args.cache_size})
    if args.durable:
        options.append("--durable")
    ps_cmd = [sys.executable, "-m", "pageserver.control", "--home", home, "--socket", sock,
              "--proxy-port", str(proxy_port), "--trust-uid", str(fe_user[1]), "--socket-group", str(fe_user[2]),
              "--exit-with-parent", *options]
    fe_cmd = [sys.executable, "-m", "pageserver.frontend", "--control-socket", sock,
              "--api-port", str(api_port), "--proxy-port", str(proxy_port), "--host", HOST, "--exit-with-parent",
              *_flags({"--max-connections": args.max_connections, "--branch-connections": args.branch_connections})]
    limits: dict[str, Any] = {}  # the proxy's, for service.json (filled once the children start)
    serving = threading.Event()

    def on_state(processes: dict[str, Any]) -> None:
        if serving.is_set():
            _write_state(home, api_port, proxy_port, processes, limits)

    sup = Supervisor(pageserver_cmd=ps_cmd, frontend_cmd=fe_cmd, frontend_user=fe_user, token=token,
                     log_file=sys.stderr, on_state=on_state)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stop("asked to stop"))
    try:
        try:
            sup.start()
        except Exception:
            log.exception("the service could not start")
            sup.stop("could not start")
            sup.run()
            sys.exit(0 if sup.why_down == "asked to stop" else 1)
        from pageserver.proxy.limits import ProxyLimits

        proxy = ProxyLimits()
        limits.update(proxy_connections=args.max_connections or proxy.max_connections,
                      branch_connections=args.branch_connections or proxy.branch_connections,
                      startup_timeout_s=proxy.startup_timeout, auth_timeout_s=proxy.auth_timeout)
        serving.set()
        sup.publish()
        log.info("serving: API http://%s:%d, proxy %s:%d (front end as %s)", HOST, api_port, HOST, proxy_port,
                 fe_user[0])
        sup.run()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(home, STATE))
    if sup.why_down not in ("asked to stop", "shutdown asked through the API"):
        sys.exit(1)


def _flags(values: dict[str, Any]) -> list[str]:
    """Command-line flags for the options that were given."""
    return [x for flag, v in values.items() if v is not None for x in (flag, str(v))]


def _control_socket(home: str, group: int) -> str:
    """The page server's RPC socket, in a directory of the run directory
    that only the service's user and the front end's group can enter."""
    from pageserver.compute.paths import private_dir, run_dir_for

    d = private_dir(run_dir_for(home) + ".rpc", 0o750)
    if os.geteuid() == 0:
        os.chown(d, 0, group)
    return os.path.join(d, "control.sock")


def _write_state(home: str, api_port: int, proxy_port: int, processes: dict[str, Any],
                 limits: dict[str, Any]) -> None:
    from pageserver.proc import boot_id, process_start

    state = {"api": f"http://{HOST}:{api_port}", "proxy": f"{HOST}:{proxy_port}",
             "token_file": os.path.join(home, TOKEN), "pid": os.getpid(), "home": home, "processes": processes,
             "limits": limits, "start": process_start(os.getpid()), "boot": boot_id()}
    _write(os.path.join(home, STATE), json.dumps(state).encode())


# --- starting and stopping it from elsewhere (CLI, SDK) ---------------------------------------


def start(home: str | None = None, *, api_port: int | None = None, proxy_port: int | None = None,
          max_computes: int | None = None, idle_timeout: float | None = None,
          warm_pool: int | None = None, max_connections: int | None = None,
          branch_connections: int | None = None, limits: dict[str, Any] | None = None,
          remote: str | None = None, cache_size: int | None = None, durable: bool = False,
          timeout: float = 180.0) -> dict[str, Any]:
    """Start the service for `home` in the background unless it runs;
    return its state (api, proxy, token_file, pid). Safe to call from many
    processes at once: one starts it, the others wait for it. `limits` are
    the databases' defaults (`pageserver.control.limits`), checked here."""
    from pageserver.control.limits import DEFAULTS, limits_of

    # a bad one is refused here, not by a page server that then cannot start
    given = {**(limits or {}), **({"branch_connections": branch_connections} if branch_connections else {})}
    limits_of(given).over(DEFAULTS).check()
    home = os.path.realpath(home or default_home())
    if remote is not None:
        from pageserver.compute.paths import remote_url

        remote_url(home, remote)  # (checked and kept here, before anything starts)
    state = read_state(home)
    if state is not None:
        return state
    from pageserver.compute.paths import private_dir

    private_dir(home)
    with file_lock(os.path.join(home, ".start.lock")):
        state = read_state(home)  # another process may have started it meanwhile
        if state is not None:
            return state
        if service_pid(home) is not None:  # one holds the home but does not serve yet (starting, stopping)
            return _await_service(home, timeout)
        return _spawn(home, (["--durable"] if durable else []) + _flags({
            "--api-port": api_port, "--proxy-port": proxy_port, "--max-computes": max_computes,
            "--idle-timeout": idle_timeout, "--warm-pool": warm_pool, "--max-connections": max_connections,
            "--branch-connections": branch_connections, "--limits": json.dumps(limits) if limits else None,
            "--remote": remote, "--cache-size": cache_size}),
            timeout)


def _await_service(home: str, timeout: float) -> dict[str, Any]:
    """Wait for the service holding the home to serve (or to go, then start one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(home)
        if state is not None:
            return state
        if service_pid(home) is None:
            return start(home, timeout=max(1.0, deadline - time.monotonic()))
        time.sleep(0.05)
    raise ServiceNotRunningError(f"the service holding {home} (pid {service_pid(home)}) did not start "
                                 f"serving within {timeout:.0f} s")


def _spawn(home: str, options: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pageserver.service", "--home", home, *options]
    logf = os.fdopen(_open_private(os.path.join(home, LOG), os.O_WRONLY | os.O_APPEND), "ab")
    with logf:
        import subprocess

        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd="/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(home)
        if state is not None and state.get("pid") == proc.pid:
            return state
        if proc.poll() is not None:
            raise ServiceNotRunningError(f"the service exited with status {proc.returncode} while starting; "
                                         f"its log ends:\n{_tail(os.path.join(home, LOG))}")
        time.sleep(0.05)
    proc.terminate()
    raise ServiceNotRunningError(f"the service did not start within {timeout:.0f} s; see {home}/{LOG}")


STOP_WAIT = 300.0  # the supervisor stops the front end, then the page server (90 s each at most)


def stop(home: str | None = None, *, timeout: float = STOP_WAIT) -> dict[str, Any] | None:
    """Stop the service for `home` and every compute it runs; returns the
    state it had, or None if it was not running."""
    home = os.path.realpath(home or default_home())
    pid = service_pid(home)  # (a service still starting has no state file yet, and is stopped too)
    if pid is None:
        return None
    state = read_state(home) or {"pid": pid, "home": home}
    from pageserver.compute.postgres import signal_process

    signal_process(pid, signal.SIGTERM, lambda: service_pid(home) == pid)  # (still the service, once pinned)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if service_pid(home) != pid:
            return state
        time.sleep(0.05)
    raise ServiceNotRunningError(f"the service (pid {pid}) did not stop within {timeout:.0f} s")


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


if __name__ == "__main__":
    main()
