"""The Strata service: HTTP API, PostgreSQL proxy, compute supervisor and
the store's background work, in one process over one home directory.

    <home>/store/          the engine's store (catalog and every branch)
    <home>/token           the API's bearer token (0600), made at first start
    <home>/ports.json      the API and proxy ports, chosen at first start and
                           kept, so that URIs handed out stay valid
    <home>/service.json    where the running service listens (written once
                           it serves, removed when it stops)
    <home>/service.log     its log

`strata up` runs `python -m pageserver.service --home H` in a session of
its own and waits for service.json; `strata down` sends SIGTERM and waits.
Files are written with write-temp, fsync, rename, fsync-directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from engine.fs import OsFileSystem, write_atomically
from pageserver.errors import ServiceNotRunningError

if TYPE_CHECKING:
    from pageserver.control.plane import ControlPlane

log = logging.getLogger("strata.service")

STATE, TOKEN, PORTS, LOG = "service.json", "token", "ports.json", "service.log"
HOST = "127.0.0.1"


def default_home() -> str:
    return os.path.abspath(os.environ.get("STRATA_HOME") or os.path.join(os.getcwd(), ".strata"))


def _write(path: str, data: bytes, mode: int = 0o600) -> None:
    write_atomically(OsFileSystem(), path, data)
    os.chmod(path, mode)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (made if missing): across processes."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases it


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def ensure_token(home: str) -> str:
    path = os.path.join(home, TOKEN)
    if not os.path.exists(path):
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
        _write(path, json.dumps({"api": api, "proxy": proxy}).encode(), 0o644)
    return api, proxy


def read_state(home: str) -> dict[str, Any] | None:
    """The running service's state, or None if none serves this home."""
    try:
        with open(os.path.join(home, STATE)) as f:
            state: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    try:
        pid = int(state["pid"])
    except (KeyError, ValueError, TypeError):
        return None
    return state if _is_service(pid) else None


def _is_service(pid: int) -> bool:
    """Is `pid` a live Strata service? (Not a zombie nobody reaped, not a
    process that got the pid of a dead one.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"pageserver.service" in f.read()
    except (OSError, IndexError):
        return False


LAG_INTERVAL = 0.01  # how often the loop-lag monitor wakes
API_THREADS = 8


async def _serve(home: str, api_port: int, proxy_port: int, max_computes: int | None,
                 idle_timeout: float | None, warm_pool: int = 0) -> None:
    from pageserver.control.plane import DEFAULT_IDLE_TIMEOUT, ControlPlane

    token = ensure_token(home)
    control = ControlPlane(home, proxy_port=proxy_port, max_computes=max_computes,
                           default_idle_timeout=idle_timeout or DEFAULT_IDLE_TIMEOUT, warm_pool=warm_pool)
    await asyncio.to_thread(control.open)
    try:
        await serve(control, token, api_port, proxy_port, home=home)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(home, STATE))
        await asyncio.to_thread(control.close)
        log.info("stopped")


async def serve(control: ControlPlane, token: str, api_port: int, proxy_port: int, *, home: str | None = None,
                signals: bool = True, started: Callable[[asyncio.AbstractEventLoop], None] | None = None) -> None:
    """Serve an open control plane on this event loop until shut down
    (SIGTERM, SIGINT or POST /v1/shutdown): the proxy, the HTTP API,
    housekeeping every second, and a monitor of the loop's own lag (the
    `strata_event_loop_lag_seconds` histogram). Nothing that blocks runs
    on the loop: the API's routes run in its thread pool, housekeeping
    in a thread, and the proxy only reads snapshots. With `home`, writes
    service.json once it serves; `started` is called then."""
    import anyio.to_thread
    import uvicorn

    from pageserver.frontend.api import make_app
    from pageserver.proxy.server import Proxy

    proxy = Proxy(control, HOST, proxy_port)
    server: uvicorn.Server | None = None
    try:
        await proxy.start()

        def stop() -> None:
            if server is not None:
                server.should_exit = True

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield  # ours are below: uvicorn's would re-raise SIGTERM before the cleanup

        loop = asyncio.get_running_loop()
        # the API's routes run in this many threads (anyio's default is 40): more only
        # contend for the GIL with the loop (measured 40, 16, 8: README, reliability)
        anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop)
        app = make_app(control, token, on_shutdown=stop)
        server = Server(uvicorn.Config(app, host=HOST, port=api_port, log_level="warning",
                                       lifespan="off", access_log=False))

        async def housekeeping() -> None:
            while True:
                await asyncio.sleep(1.0)
                try:
                    done = await asyncio.to_thread(control.maintain)
                    for what, names in done.items():
                        if names:
                            log.info("%s: %s", what, ", ".join(names))
                except Exception:  # noqa: BLE001 - keep serving; say what went wrong
                    log.exception("housekeeping")

        async def lag_monitor() -> None:
            while True:
                t0 = loop.time()
                await asyncio.sleep(LAG_INTERVAL)
                control.metrics.loop_lag.observe(max(0.0, loop.time() - t0 - LAG_INTERVAL))

        async def announce() -> None:
            while not server.started:
                await asyncio.sleep(0.02)
            if home is not None:
                state = {"api": f"http://{HOST}:{api_port}", "proxy": f"{HOST}:{proxy_port}",
                         "token_file": os.path.join(home, TOKEN), "pid": os.getpid(), "home": home}
                await asyncio.to_thread(_write, os.path.join(home, STATE), json.dumps(state).encode(), 0o644)
                log.info("serving: API %s, proxy %s", state["api"], state["proxy"])
            # What start-up made (modules, the API's schemas, the catalog) lives as long as the
            # process: out of the collector's way, so that a full collection, which stops every
            # thread, scans only what came after (measured: 77 ms -> see README, reliability)
            gc.freeze()
            if started is not None:
                started(loop)

        tasks = [asyncio.create_task(housekeeping()), asyncio.create_task(announce()),
                 asyncio.create_task(lag_monitor())]
        try:
            await server.serve()
        finally:
            for t in tasks:
                t.cancel()
    finally:
        await proxy.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pageserver.service", description=__doc__.splitlines()[0])
    p.add_argument("--home", default=default_home())
    p.add_argument("--api-port", type=int)
    p.add_argument("--proxy-port", type=int)
    p.add_argument("--max-computes", type=int)
    p.add_argument("--idle-timeout", type=float)
    p.add_argument("--warm-pool", type=int, default=0, help="spare computes kept running (default 0)")
    args = p.parse_args(argv)
    home = os.path.abspath(args.home)
    os.makedirs(home, mode=0o700, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api_port, proxy_port = _ports(home, args.api_port, args.proxy_port)
    asyncio.run(_serve(home, api_port, proxy_port, args.max_computes, args.idle_timeout, args.warm_pool))


# --- starting and stopping it from elsewhere (CLI, SDK) ---------------------------------------


def start(home: str | None = None, *, api_port: int | None = None, proxy_port: int | None = None,
          max_computes: int | None = None, idle_timeout: float | None = None,
          warm_pool: int | None = None, timeout: float = 180.0) -> dict[str, Any]:
    """Start the service for `home` in the background unless it runs;
    return its state (api, proxy, token_file, pid). Safe to call from many
    processes at once: one starts it, the others wait for it."""
    home = os.path.abspath(home or default_home())
    state = read_state(home)
    if state is not None:
        return state
    os.makedirs(home, mode=0o700, exist_ok=True)
    with file_lock(os.path.join(home, ".start.lock")):
        state = read_state(home)  # another process may have started it meanwhile
        if state is not None:
            return state
        return _spawn(home, api_port, proxy_port, max_computes, idle_timeout, warm_pool, timeout)


def _spawn(home: str, api_port: int | None, proxy_port: int | None, max_computes: int | None,
           idle_timeout: float | None, warm_pool: int | None, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pageserver.service", "--home", home]
    for flag, value in (("--api-port", api_port), ("--proxy-port", proxy_port),
                        ("--max-computes", max_computes), ("--idle-timeout", idle_timeout),
                        ("--warm-pool", warm_pool)):
        if value is not None:
            cmd += [flag, str(value)]
    logf = open(os.path.join(home, LOG), "ab")
    with logf:
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


def stop(home: str | None = None, *, timeout: float = 120.0) -> dict[str, Any] | None:
    """Stop the service for `home` and every compute it runs; returns the
    state it had, or None if it was not running."""
    home = os.path.abspath(home or default_home())
    state = read_state(home)
    if state is None:
        return None
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _is_service(pid):
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
