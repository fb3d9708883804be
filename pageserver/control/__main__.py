"""`python -m pageserver.control`: the page server process.

    python -m pageserver.control --home H --socket S --proxy-port P
        [--trust-uid UID] [--socket-group GID] [--max-computes N]
        [--idle-timeout SECONDS] [--warm-pool N]

Holds the store, the FUSE mount, the computes and the control plane (the
catalog is a timeline of the same store, and its locks span compute starts
and stops, so they live together), runs housekeeping every second, and
serves the control plane to the front ends on the Unix socket S
(`pageserver.control.rpc`). Prints `{"ready": true, "pid": PID}` on stdout
once it serves. SIGTERM or SIGINT stops it: every compute stops, the mount
goes, the store closes. The service's supervisor runs it (as root where
FUSE needs it) and restarts it if it dies; a restart is the recovery after
a crash that the engine and the node already do at every open.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time

from engine import StoreLockedError
from pageserver.control.plane import DEFAULT_IDLE_TIMEOUT, ControlPlane
from pageserver.control.rpc import RpcServer
from pageserver.control.supervised import exit_with_parent

log = logging.getLogger("strata.pageserver")

HOUSEKEEPING_INTERVAL = 1.0


def housekeeping(control: ControlPlane, stop: threading.Event) -> None:
    while not stop.wait(HOUSEKEEPING_INTERVAL):
        try:
            for what, names in control.maintain().items():
                if names:
                    log.info("%s: %s", what, ", ".join(names))
        except Exception:  # noqa: BLE001 - keep serving; say what went wrong
            log.exception("housekeeping")


LOCK_WAIT = 120.0  # seconds a start waits for a stopping page server to let go of the store


def open_waiting(control: ControlPlane) -> None:
    """Open, waiting while the store is locked: the page server of a
    supervisor that was killed stops on its own (SIGTERM from the kernel)
    and holds the store until its computes are down."""
    deadline, said = time.monotonic() + LOCK_WAIT, False
    while True:
        try:
            control.open()
            return
        except StoreLockedError:
            if time.monotonic() > deadline:
                raise
            if not said:
                log.info("the store is locked (a page server still stopping?): waiting")
                said = True
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    from pageserver.compute.paths import remote_url

    p = argparse.ArgumentParser(prog="python -m pageserver.control", description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True)
    p.add_argument("--socket", required=True, help="the control plane's Unix socket, for the front ends")
    p.add_argument("--proxy-port", type=int, required=True, help="the proxy's port, for the URIs handed out")
    p.add_argument("--trust-uid", type=int, action="append", default=[], help="a front end's uid (repeatable)")
    p.add_argument("--socket-group", type=int, help="the group the socket is given (the front end's)")
    p.add_argument("--max-computes", type=int)
    p.add_argument("--idle-timeout", type=float)
    p.add_argument("--warm-pool", type=int, default=0)
    p.add_argument("--limits", type=json.loads, default=None,
                   help='default limits of databases, as JSON: {"max_size": "1GB", ...}')
    p.add_argument("--remote", help="the object store the store lives in (file:///path or s3://bucket/prefix)")
    p.add_argument("--cache-size", type=int, help="bytes of layer files kept on local disk (with --remote)")
    p.add_argument("--durable", action="store_true", help="every fsync waits for the object store")
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the process that started it goes")
    args = p.parse_args(argv)
    os.umask(0o077)  # what this process makes is private from its first byte
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s pageserver %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    # a signal handler only appends: an Event's set() takes a lock, which the main thread it
    # interrupts may hold (inside its own stop.wait()), and the process then hangs for good
    asked: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: asked.append(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: asked.append(signal.SIGINT))
    if args.exit_with_parent:
        exit_with_parent(lambda: asked.append(0))
    control = ControlPlane(os.path.abspath(args.home), proxy_port=args.proxy_port, max_computes=args.max_computes,
                           socket_group=args.socket_group,
                           default_idle_timeout=args.idle_timeout or DEFAULT_IDLE_TIMEOUT,
                           warm_pool=args.warm_pool, limits=args.limits,
                           remote=remote_url(os.path.abspath(args.home), args.remote), cache_size=args.cache_size,
                           durable=args.durable)
    open_waiting(control)
    try:
        rpc = RpcServer(control, args.socket, trusted_uids=set(args.trust_uid), group=args.socket_group)
        rpc.start()
        keeper = threading.Thread(target=housekeeping, args=(control, stop), name="strata-housekeeping",
                                  daemon=True)
        keeper.start()
        gc.freeze()  # what start-up made lives as long as the process (see README, reliability)
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        log.info("serving the control plane on %s", args.socket)
        while not asked:
            time.sleep(0.2)
        stop.set()
        log.info("stopping")
        rpc.close()
        keeper.join(30)
    finally:
        control.close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
