"""`python -m pageserver.frontend`: the front-end process.

    python -m pageserver.frontend --control-socket S --api-port A --proxy-port P [--host H]

Serves the HTTP API and the PostgreSQL proxy on one event loop (uvloop),
over the page server's control plane on the Unix socket S. It holds no
state: a restart loses only the connections it was relaying. The
operator's token comes on stdin (one line), so that the front end, which
runs as an unprivileged user when the service is started as root, never
needs to read the service's home. It makes its proxy and API (imports,
schema) before it reads that line, while the page server opens its store,
and connects to the page server after. Started as root with STRATA_FRONTEND_UID and
STRATA_FRONTEND_GID set, it binds its ports, imports what it needs, and
drops to that user before it says it is ready. Prints
`{"ready": true, "pid": PID, "uid": UID}` on stdout once it serves; exits with status 75 (SHUTDOWN_REQUESTED) after
`POST /v1/shutdown`, so that the supervisor stops the whole service.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import json
import logging
import os
import resource
import signal
import socket
import sys
import time

from pageserver.control.rpc import RemoteControl
from pageserver.control.supervised import exit_with_parent
from pageserver.errors import BadRequestError
from pageserver.frontend.serve import HOST, Frontend
from pageserver.proxy.limits import ProxyLimits

SHUTDOWN_REQUESTED = 75
log = logging.getLogger("strata.frontend")


async def _warm_up(host: str, port: int) -> None:
    """Ask the API what a client would, so that whatever it imports on
    first use is imported while the code can still be read."""
    for path in ("/v1/openapi.json", "/v1/status", "/metrics"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        await reader.read()
        writer.close()


_PR_SET_PDEATHSIG = 1
PORT_WAIT = 60.0  # seconds to wait for a port a stopping front end still holds


def wait_for_ports(host: str, ports: list[int]) -> None:
    """Wait until every port can be bound: after its supervisor was killed,
    the old front end stops on its own, and lets go of its ports once its
    sessions have ended."""
    deadline, said = time.monotonic() + PORT_WAIT, False
    for port in ports:
        while True:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        raise
            if not said:
                log.info("port %d is still in use (a front end still stopping?): waiting", port)
                said = True
            time.sleep(0.1)


def drop_privileges(uid: int, gid: int) -> None:
    """Become `uid`:`gid` for good (every thread: glibc applies set*id to all)."""
    parent = os.getppid()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise RuntimeError("the front end is still root after dropping its privileges")
    # the kernel clears the parent-death signal when credentials change: arm it again, and
    # stop at once if the supervisor died in between
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    log.info("front end runs as uid %d, gid %d", uid, gid)


def _enough_descriptors(want: int) -> None:
    """Raise the soft limit on open files toward `want` (each proxied
    connection holds two), as far as the hard limit lets it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        log.warning("open files are limited to %d: the proxy can hold about %d connections, not the %d "
                    "asked for (raise the hard limit: ulimit -Hn)", new, (new - 256) // 2, (want - 256) // 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pageserver.frontend", description=__doc__.splitlines()[0])
    p.add_argument("--control-socket", required=True)
    p.add_argument("--api-port", type=int, required=True)
    p.add_argument("--proxy-port", type=int, required=True)
    p.add_argument("--host", default=HOST)
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the process that started it goes")
    p.add_argument("--max-connections", type=int, default=ProxyLimits.max_connections,
                   help="client connections the proxy takes at once (default %(default)s)")
    p.add_argument("--branch-connections", type=int, default=ProxyLimits.branch_connections,
                   help="client connections per branch (default %(default)s)")
    args = p.parse_args(argv)
    os.umask(0o077)  # what this process makes is private from its first byte
    try:
        limits = ProxyLimits(max_connections=args.max_connections, branch_connections=args.branch_connections)
    except BadRequestError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s frontend %(name)s %(levelname)s %(message)s")
    _enough_descriptors(2 * limits.max_connections + 256)
    import uvloop

    # made while the page server opens its store (the supervisor starts both at once): the token
    # comes once it is ready
    control = RemoteControl(args.control_socket)  # (connects on first use)
    token_box: list[str] = []
    frontend = Frontend(control, lambda: token_box[0] if token_box else "", args.api_port, args.proxy_port,
                        host=args.host, limits=limits)
    token = sys.stdin.readline().strip()
    if not token:
        print("python -m pageserver.frontend: the operator token must come on stdin", file=sys.stderr)
        return 2
    token_box.append(token)
    if args.exit_with_parent:
        exit_with_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    wait_for_ports(args.host, [args.api_port, args.proxy_port])
    control.subscribe()
    asked: list[bool] = []
    tasks: list[asyncio.Task[None]] = []

    def started(loop: asyncio.AbstractEventLoop) -> None:
        async def ready() -> None:
            if os.geteuid() == 0 and os.environ.get("STRATA_FRONTEND_UID"):
                await _warm_up(args.host, args.api_port)
                drop_privileges(int(os.environ["STRATA_FRONTEND_UID"]), int(os.environ["STRATA_FRONTEND_GID"]))
            print(json.dumps({"ready": True, "pid": os.getpid(), "uid": os.getuid()}), flush=True)

        tasks.append(loop.create_task(ready()))  # held: the loop keeps only a weak reference

    try:
        uvloop.run(frontend.serve(started=started, on_shutdown=lambda: asked.append(True)))
    finally:
        control.close()
    return SHUTDOWN_REQUESTED if asked else 0


if __name__ == "__main__":
    sys.exit(main())
