"""A workload that passes every registered failpoint (tests/test_failpoints.py
runs it in a subprocess with one armed). It prints one line per
acknowledgement, flushed at once, so that what the parent reads was
acknowledged before any crash:

    create TID | delete-attempt TID | delete TID
    commit TID KEY SEQ           (a durable commit returned)
    file TID INO OFFSET SEQ      (a durable write through a DataDir returned)
    fired NAME                   (at the end: an armed failpoint raised, the workload went on)
    done
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from engine import Retention, Store, StoreConfig, StrataError, failpoints
from engine.fs import FileSystem
from engine.testing import page, page_owner
from pageserver.pgdata.datadir import DataDir

CFG = StoreConfig(
    inmemory_layer_bytes=16 * 1024, log_segment_bytes=24 * 1024, log_checkpoint_bytes=1 << 30,
    merge_threshold=2, delta_target_bytes=64 * 1024, image_threshold=2, image_partition_keys=4,
)
TIGHT = Retention(period=0, lsn_distance=0)  # the horizon follows the head: GC has garbage


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def attempt(step, *args):
    try:
        return step(*args)
    except (StrataError, OSError):  # the fault, or a refusal after it (fail closed): not acknowledged
        return None


def main(path: str, fs: FileSystem | None = None, say: Callable[[str], None] = _print) -> None:
    """Run the workload on the store at `path` (on `fs`, default the OS's),
    telling `say` what it acknowledged."""
    try:
        store = Store.open(path, background=False, config=CFG, fs=fs)
    except (StrataError, OSError):
        return  # a fault while opening: nothing acknowledged
    seq = 0

    def create(parent=None, retention=None):
        tl = store.branch(parent) if parent is not None else store.create_timeline(retention=retention)
        say(f"create {tl.id}")
        return tl

    def commit(tl, keys):
        nonlocal seq
        seq += 1
        tl.commit({k: page(tl.id, k, seq) for k in keys}, durable=True)
        for k in keys:
            say(f"commit {tl.id} {k} {seq}")

    def delete(tl):
        say(f"delete-attempt {tl.id}")
        store.delete_timeline(tl)
        say(f"delete {tl.id}")

    def write_files(tl) -> None:
        DataDir.format(tl, uid=0, gid=0)
        dd = DataDir(tl)
        ino = dd.create(1, b"data", 0o600, 0, 0)
        for i in range(3):
            dd.write(ino, i * 8192, page(tl.id, i, 1000 + i), durable=True)
            say(f"file {tl.id} {ino} {i * 8192} {1000 + i}")

    root = attempt(create, None, TIGHT)
    if root is not None:
        for i in range(8):
            attempt(commit, root, [i % 4, 10 + i % 3])
        attempt(store.flush, root)
        for i in range(8):
            attempt(commit, root, [i % 4])
        attempt(store.flush, root)
        attempt(store.compact, root)
        attempt(store.gc, root)
        child = attempt(create, root)
        if child is not None:
            attempt(commit, child, [1, 2])
            attempt(store.checkpoint)
            attempt(delete, child)
        files = attempt(create, None, None)
        if files is not None:
            attempt(write_files, files)
    attempt(store.checkpoint)
    try:
        store.close()
    except (StrataError, OSError):
        store.abandon()
    for name in failpoints.hits:
        say(f"fired {name}")
    say("done")


def verify(path: str, lines: list[str], fs: FileSystem | None = None) -> None:
    """Reopen the store: it opens, passes `check`, holds everything the
    workload acknowledged, and takes writes again."""
    created, attempted_delete, deleted = set(), set(), set()
    commits: dict[tuple[str, int], int] = {}
    files: list[tuple[str, int, int, int]] = []
    for line in lines:
        kind, *rest = line.split()
        if kind == "create":
            created.add(rest[0])
        elif kind == "delete-attempt":
            attempted_delete.add(rest[0])
        elif kind == "delete":
            deleted.add(rest[0])
        elif kind == "commit":
            tid, key, seq = rest[0], int(rest[1]), int(rest[2])
            commits[(tid, key)] = max(seq, commits.get((tid, key), 0))
        elif kind == "file":
            files.append((rest[0], int(rest[1]), int(rest[2]), int(rest[3])))
    with Store.open(path, background=False, config=CFG, fs=fs) as store:
        report = store.check()
        assert report.ok, report.problems
        ids = set(store.timeline_ids())
        for tid in created - attempted_delete:
            assert tid in ids, f"acknowledged timeline {tid} is gone"
        for tid in deleted:
            assert tid not in ids, f"acknowledged deletion of {tid} undone"
        for (tid, key), seq in commits.items():
            if tid in attempted_delete and tid not in ids:
                continue
            value = store.timeline(tid).get(key)
            assert value is not None, f"acknowledged key {key} of {tid} lost"
            owner, okey, oseq = page_owner(value)
            assert (owner, okey) == (tid, key) and oseq >= seq, (tid, key, seq, oseq)
        for tid, ino, offset, seq in files:
            got = DataDir(store.timeline(tid)).read(ino, offset, 8192)
            assert got == page(tid, offset // 8192, seq), f"acknowledged write at {offset} lost"
        tl = store.create_timeline()  # the store takes writes again
        tl.commit({1: page(tl.id, 1, 1)}, durable=True)


if __name__ == "__main__":
    main(sys.argv[1])
