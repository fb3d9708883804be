"""`make demo`: the storage engine's main job on the embedded default store.

Loads a 64 MiB database of pages once (kept across runs), then does what a
test suite or an agent does by the hour: branch it a hundred times (O(1)),
change each branch a little, read everything back isolated, go back in time,
and show what all of it costs on disk.

The default store is `$STRATA_HOME/store`, or `.strata/store` in the current
directory.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

from tqdm import tqdm

from engine import Retention, Store
from engine.testing import page, page_owner

BASE_ID = "5374726174614261736544656d6f0001"  # a fixed id: the base survives runs


def default_store_path() -> str:
    home = os.environ.get("STRATA_HOME") or os.path.join(os.getcwd(), ".strata")
    return os.path.join(home, "store")


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=default_store_path(), help="store directory (default: %(default)s)")
    ap.add_argument("--pages", type=int, default=8192, help="pages in the base database (8 KiB each)")
    ap.add_argument("--branches", type=int, default=100)
    args = ap.parse_args(argv)
    tty = sys.stderr.isatty()

    t0 = time.perf_counter()
    store = Store.open(args.store)
    print(f"store {args.store}: opened in {(time.perf_counter() - t0) * 1e3:.1f} ms, "
          f"{len(store.timeline_ids())} timelines")
    try:
        if BASE_ID in store:
            base = store.timeline(BASE_ID)
            print(f"base database: loaded by an earlier run, head LSN {base.head_lsn}")
        else:
            base = store.create_timeline(BASE_ID)
            t0 = time.perf_counter()
            with tqdm(total=args.pages * 8192, unit="B", unit_scale=True, desc="loading base",
                      disable=not tty) as bar:
                for start in range(0, args.pages, 256):
                    keys = range(start, min(args.pages, start + 256))
                    base.commit({k: page(BASE_ID, k, 0) for k in keys}, durable=True)
                    bar.update(len(keys) * 8192)
            store.compact(base, force_images=True)
            dt = time.perf_counter() - t0
            print(f"base database: {args.pages} pages ({_mib(args.pages * 8192)}) loaded and "
                  f"compacted in {dt:.1f} s ({args.pages * 8192 / dt / (1 << 20):.0f} MiB/s)")
        before_lsn = base.head_lsn
        before_time = time.time()

        # Branch per "test": O(1) each, whatever the base's size.
        times, branches = [], []
        for _ in tqdm(range(args.branches), desc="branching", disable=not tty):
            t = time.perf_counter()
            branches.append(store.branch(base))
            times.append(time.perf_counter() - t)
        print(f"{args.branches} branches: p50 {statistics.median(times) * 1e3:.2f} ms, "
              f"max {max(times) * 1e3:.2f} ms each")

        # Each branch rewrites its own 1% of the pages and deletes one.
        rng = random.Random(1)
        share = max(1, args.pages // 100)
        for i, b in enumerate(tqdm(branches, desc="writing to branches", disable=not tty)):
            keys = range((i * share) % args.pages, (i * share) % args.pages + share)
            batch: dict[int, bytes | None] = {k: page(b.id, k, 1) for k in keys if k < args.pages}
            batch[args.pages + i] = None
            b.commit(batch)
        store.flush()

        # Every branch sees the base plus its own changes, and nothing else.
        checked = 0
        for i, b in enumerate(tqdm(branches, desc="checking isolation", disable=not tty)):
            for k in rng.sample(range(args.pages), 50):
                owner, key, _ = page_owner(b.get(k) or b"")
                mine = (i * share) % args.pages <= k < (i * share) % args.pages + share
                assert key == k and owner == (b.id if mine else BASE_ID), (b.id, k, owner)
                checked += 1
        print(f"isolation: {checked} reads across {len(branches)} branches each saw only their own writes")

        # Time travel: change the base, then branch it as of before the change.
        base.commit({0: b"changed after the branches were made"}, durable=True)
        past = store.branch(base, at_lsn=base.lsn_at(before_time))
        assert past.get(0) == page(BASE_ID, 0, 0) and past.ancestor_lsn == before_lsn
        print(f"time travel: branch as of {time.strftime('%H:%M:%S', time.localtime(before_time))} "
              f"is at LSN {past.ancestor_lsn} and sees the base as it was")
        base.commit({0: page(BASE_ID, 0, 0)}, durable=True)

        # What it all costs.
        bu = base.usage()
        branch_bytes = sum(b.usage().physical_size for b in branches)
        print(f"space: base {_mib(bu.logical_size)} logical, {_mib(bu.physical_size)} on disk; "
              f"{len(branches)} branches of it hold {_mib(branch_bytes)} between them "
              f"(full copies would take {_mib(len(branches) * bu.logical_size)})")

        # Throw the branches away, keep only the base's head: GC gives the space back.
        for b in tqdm(branches + [past], desc="deleting branches", disable=not tty):
            store.delete_timeline(b)
        base.set_retention(Retention(period=None, lsn_distance=0))
        store.compact(base, force_images=True)
        gc = store.gc()
        store.checkpoint()  # the log's records are all in layer files now: drop them
        print(f"cleanup: deleted {len(branches) + 1} branches, kept only the base's head: GC removed "
              f"{gc.layers_removed} layer files ({_mib(gc.bytes_removed)}); "
              f"the store is {_mib(store.disk_usage())} on disk")
    finally:
        t0 = time.perf_counter()
        store.close()
        print(f"closed in {(time.perf_counter() - t0) * 1e3:.0f} ms (every commit durable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
