"""kill -9 a process in the middle of writing: every acknowledged durable
commit survives, and what survives of the rest is a prefix of the log."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from engine import Store, StoreConfig

from .conftest import page, page_owner

WRITER = r"""
import sys
from engine import Store, StoreConfig
from engine.testing import page
path, tid, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = StoreConfig(inmemory_layer_bytes=256 * 1024, log_segment_bytes=512 * 1024,
                  log_checkpoint_bytes=2 * 1024 * 1024, background_interval=0.05)
store = Store.open(path, config=cfg)
tl = store.timeline(tid) if tid in store else store.create_timeline(tid)
seq = start
while True:
    seq += 1
    durable = seq % 3 == 0
    lsn = tl.commit({seq % 50: page(tid, seq % 50, seq), 1000 + seq % 7: page(tid, 1000, seq)}, durable=durable)
    if durable:
        sys.stdout.write(f"{seq} {lsn}\n")
        sys.stdout.flush()
"""


def test_kill_9_loses_no_durable_commit(store_path, tmp_path):
    tid = "ab" * 16
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    rng = random.Random(4)
    start = 0
    for _ in range(6):
        p = subprocess.Popen(
            [sys.executable, str(script), store_path, tid, str(start)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        try:
            time.sleep(rng.uniform(0.4, 1.2))
            p.send_signal(signal.SIGKILL)
            out, _ = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        # complete lines only: the kill may land in the middle of a write
        acked = [tuple(map(int, line.split())) for line in out.split("\n")[:-1]]
        assert acked, "the writer acknowledged nothing"
        last_seq, last_lsn = acked[-1]
        with Store.open(store_path, config=StoreConfig(), background=False) as store:
            tl = store.timeline(tid)
            assert tl.head_lsn >= last_lsn
            # the newest surviving commit tells how far the log survived
            newest = max(page_owner(v)[2] for k in range(50) if (v := tl.get(k)) is not None)
            assert newest >= last_seq
            # every commit up to there is whole (the last 50 commits wrote
            # keys 0-49 once each), and nothing after it half-appeared
            for seq in range(max(start + 1, newest - 49), newest + 1):
                assert tl.get(seq % 50) == page(tid, seq % 50, seq)
            assert tl.get(1000 + newest % 7) == page(tid, 1000, newest)
            start = newest
