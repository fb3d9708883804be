"""`python -m pageserver.compute serve`: run a node in the foreground.

    python -m pageserver.compute serve --home DIR [--compute TIMELINE ...] [--template]

Opens the node at DIR (cleaning up after a killed one), optionally
makes sure the template exists and starts computes, prints one JSON line per
compute (`{"timeline", "compute", "uri", "port", "pid"}`; the URI is the compute's
Unix socket, which only this user, or root, can reach) and a final
`{"ready": true}`, then serves until SIGTERM or SIGINT, when it stops every
compute, unmounts and closes the store. (The full service, with an HTTP
API and a CLI, builds on this.)
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time

from pageserver.compute.node import Node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pageserver.compute")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a node in the foreground")
    s.add_argument("--home", required=True)
    s.add_argument("--template", action="store_true", help="make sure the template timeline exists")
    s.add_argument("--compute", action="append", default=[], metavar="TIMELINE",
                   help="start a read-write compute on this timeline (repeatable)")
    s.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asked: list[int] = []  # (a handler that set an Event could deadlock the thread it interrupts)
    signal.signal(signal.SIGTERM, lambda *_: asked.append(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: asked.append(signal.SIGINT))
    with Node(args.home) as ps:
        if args.template:
            ps.ensure_template(progress=False)
        for tid in args.compute:
            c = ps.start_compute(tid)
            print(json.dumps({"timeline": tid, "compute": c.id, "uri": c.uri(), "port": c.port,
                              "pid": c.pid}), flush=True)
        print(json.dumps({"ready": True}), flush=True)
        while not asked:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
