"""The commit log: group commit, torn tails, damage in the middle."""

from __future__ import annotations

import os
import threading
import time

import pytest

from engine import CorruptionError, Store
from engine.fs import OsFileSystem
from engine.wal import REC_COMMIT, RECORD_HEADER, list_segments, scan_segment


class SlowSyncFS(OsFileSystem):
    """Real files; each fsync takes a while and is counted."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.syncs = 0

    def open_append(self, path):
        return _SlowFile(super().open_append(path), self)


class _SlowFile:
    def __init__(self, f, fs: SlowSyncFS) -> None:
        self._f, self._fs, self.path = f, fs, f.path

    def sync(self) -> None:
        self._fs.syncs += 1
        time.sleep(self._fs.delay)
        self._f.sync()

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_concurrent_durable_commits_share_fsyncs(store_path):
    fs = SlowSyncFS(delay=0.005)
    store = Store.open(store_path, fs=fs, background=False)
    tls = [store.create_timeline() for _ in range(8)]
    before = fs.syncs
    per_thread = 25

    def work(tl):
        for i in range(per_thread):
            tl.commit({i: b"x" * 100}, durable=True)

    threads = [threading.Thread(target=work, args=(tl,)) for tl in tls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    syncs = fs.syncs - before
    commits = per_thread * len(tls)
    assert syncs < commits / 2, f"{syncs} fsyncs for {commits} durable commits"
    for tl in tls:
        assert all(tl.get(i) == b"x" * 100 for i in range(per_thread))
    store.close()


def _abandoned_store(path: str) -> tuple[list[str], list[int]]:
    store = Store.open(path, background=False)
    a, b = store.create_timeline(), store.create_timeline()
    lsns = []
    for i in range(10):
        lsns.append(a.commit({i: b"a%d" % i * 50}, durable=True))
        b.commit({i: b"b%d" % i * 50}, durable=True)
    ids = [a.id, b.id]
    store.abandon()
    return ids, lsns


def _log_files(path: str) -> list[str]:
    return [p for _, p in list_segments(OsFileSystem(), os.path.join(path, "log"))]


def test_a_torn_tail_is_cut_off_and_never_applied(store_path):
    (a, b), lsns = _abandoned_store(store_path)
    seg = _log_files(store_path)[-1]
    end = _records_end(seg)
    with open(seg, "r+b") as f:  # tear the last record: its end never made it
        f.seek(end - 40)
        f.write(bytes(40))
    with Store.open(store_path, background=False) as store:
        ta, tb = store.timeline(a), store.timeline(b)
        assert [ta.get(i) for i in range(10)] == [b"a%d" % i * 50 for i in range(10)]
        assert [tb.get(i) for i in range(9)] == [b"b%d" % i * 50 for i in range(9)]
        assert tb.get(9) is None  # the torn batch is gone, whole
        assert os.path.getsize(seg) < end - 40  # the tail was cut


def test_garbage_after_the_last_record_is_a_torn_tail(store_path):
    (a, b), _ = _abandoned_store(store_path)
    seg = _log_files(store_path)[-1]
    with open(seg, "r+b") as f:
        f.seek(_records_end(seg) + 100)
        f.write(os.urandom(300))
    with Store.open(store_path, background=False) as store:
        assert store.timeline(b).get(9) == b"b9" * 50


def _record_offsets(seg: str) -> list[int]:
    return [r.offset for r in scan_segment(OsFileSystem(), seg, True).records]


def _records_end(seg: str) -> int:
    """Where the records end (a zero-filled tail follows)."""
    return scan_segment(OsFileSystem(), seg, True).end


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def test_damaged_payload_mid_log_breaks_only_its_timeline(store_path):
    (a, b), _ = _abandoned_store(store_path)
    seg = _log_files(store_path)[-1]
    offsets = _record_offsets(seg)
    # records: create a, create b, then commits a0, b0, a1, b1, ...: damage b's 5th
    target = offsets[2 + 2 * 4 + 1]
    _flip(seg, target + RECORD_HEADER.size + 10)
    with Store.open(store_path, background=False) as store:
        damaged = store.damaged()
        assert list(damaged) == [b]
        err = damaged[b]
        assert err.path == seg and err.offset == target
        with pytest.raises(CorruptionError, match=os.path.basename(seg)):
            store.timeline(b)
        ta = store.timeline(a)
        assert [ta.get(i) for i in range(10)] == [b"a%d" % i * 50 for i in range(10)]
        ta.commit({99: b"still writable"}, durable=True)


def test_damaged_record_header_mid_log_refuses_to_open(store_path):
    (a, b), _ = _abandoned_store(store_path)
    seg = _log_files(store_path)[-1]
    target = _record_offsets(seg)[5]
    _flip(seg, target + 20)
    with pytest.raises(CorruptionError) as e:
        Store.open(store_path, background=False)
    assert e.value.path == seg and e.value.offset == target


def test_damaged_segment_header_refuses_to_open(store_path):
    _abandoned_store(store_path)
    seg = _log_files(store_path)[-1]
    _flip(seg, 3)
    with pytest.raises(CorruptionError, match="magic") as e:
        Store.open(store_path, background=False)
    assert e.value.path == seg


def test_log_is_replayed_after_a_kill_and_truncated_by_checkpoint(store_path):
    (a, b), _ = _abandoned_store(store_path)
    assert sum(os.path.getsize(p) for p in _log_files(store_path)) > 1000
    with Store.open(store_path, background=False) as store:
        assert store.timeline(a).get(9) == b"a9" * 50
    # after a clean close every commit is in a layer file: the log holds none
    fs = OsFileSystem()
    records = [r for p in _log_files(store_path) for r in scan_segment(fs, p, True).records]
    assert [r for r in records if r.type == REC_COMMIT] == []


def test_a_new_last_segment_whose_header_never_reached_the_disk_is_dropped(store_path):
    (a, b), lsns = _abandoned_store(store_path)
    # the file system kept the new segment's size but not its contents
    nxt = os.path.join(store_path, "log", f"{lsns[-1] + 2:016x}.log")
    with open(nxt, "wb") as f:
        f.write(bytes(4096))
    with Store.open(store_path, background=False) as store:
        assert store.timeline(a).get(9) == b"a9" * 50
        assert store.damaged() == {}
        # the torn segment was dropped; a fresh one took its name
        assert open(nxt, "rb").read(8) == b"STRATLOG"
