"""Regression tests, each named after the bug it reproduces (found in review)."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

import engine.timeline as timeline_module
from engine import KEEP_ALL, CorruptionError, Retention, Store, StoreConfig
from engine.checksums import xxh3
from engine.fs import OsFileSystem
from engine.manifest import OP_DROP, decode_snapshot
from engine.testing import page, page_owner
from engine.testing.faultfs import FaultFileSystem
from engine.values import encode
from engine.wal import REC_COMMIT, REC_EDIT, RECORD_HEADER, _pack_header, list_segments, scan_segment

OS = OsFileSystem()


def _records(path: str):
    for _, seg in list_segments(OS, os.path.join(path, "log")):
        for r in scan_segment(OS, seg, False).records:
            yield seg, r


def _flip(path: str, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def _damage_commit(path: str, tid: str, nth: int) -> None:
    recs = [(s, r) for s, r in _records(path) if r.timeline.hex() == tid and r.type == REC_COMMIT]
    seg, r = recs[nth]
    _flip(seg, r.offset + RECORD_HEADER.size + 2)


def test_damage_found_in_the_log_outlives_checkpoints(store_path):
    with Store.open(store_path, background=False):
        pass
    s = Store.open(store_path, background=False)
    t = s.create_timeline()
    t.commit({1: b"a"}, durable=True)
    s.flush(t)
    t.commit({2: b"b"})
    t.commit({3: b"c"}, durable=True)
    child = s.branch(t)
    u = s.create_timeline()
    u.commit({9: b"after"}, durable=True)  # valid records after the damage
    s.abandon()
    _damage_commit(store_path, t.id, 1)
    for _ in range(3):  # open, checkpoint on close, open again...
        with Store.open(store_path, background=False) as s:
            assert list(s.damaged()) == [t.id]
            with pytest.raises(CorruptionError):
                s.timeline(t.id).get(1)
            with pytest.raises(CorruptionError):
                s.timeline(child.id).get(1)  # reads through the damaged ancestor
            assert s.timeline(u.id).get(9) == b"after"
    # its files stay for whoever investigates, until it is deleted
    assert os.listdir(os.path.join(store_path, "timelines", t.id))
    with Store.open(store_path, background=False) as s:
        s.delete_timeline(child.id)
        s.delete_timeline(t.id)
        assert s.damaged() == {}
    with Store.open(store_path, background=False) as s:
        assert s.timeline_ids() == [u.id]


def test_damaged_create_record_keeps_the_timeline_listed_as_damaged(store_path):
    with Store.open(store_path, background=False):
        pass
    s = Store.open(store_path, background=False)
    t = s.create_timeline()
    t.commit({1: b"durable"}, durable=True)
    c = s.branch(t)
    s.abandon()
    seg, r = next((s_, r) for s_, r in _records(store_path) if r.type == REC_EDIT and r.timeline.hex() == t.id)
    _flip(seg, r.offset + RECORD_HEADER.size + 5, 1)
    for _ in range(2):
        with Store.open(store_path, background=False) as s:
            assert t.id in s and list(s.damaged()) == [t.id]
            with pytest.raises(CorruptionError):
                s.timeline(c.id).get(1)


def test_damaged_drop_record_keeps_the_timeline_out_of_service(store_path):
    with Store.open(store_path, background=False) as s:
        t = s.create_timeline()
        t.commit({1: b"x"})
    s = Store.open(store_path, background=False)
    s.delete_timeline(t.id)
    s.create_timeline().commit({2: b"y"}, durable=True)
    s.abandon()
    seg, r = next((s_, r) for s_, r in _records(store_path)
                  if r.type == REC_EDIT and r.timeline.hex() == t.id and r.payload[0] == OP_DROP)
    _flip(seg, r.offset + RECORD_HEADER.size)  # the op byte, all there is
    for _ in range(2):
        with Store.open(store_path, background=False) as s:
            assert t.id in s.damaged()
            with pytest.raises(CorruptionError, match="checksum"):
                s.timeline(t.id).get(1)


def test_reused_id_does_not_inherit_the_deleted_timelines_commits_after_a_crash():
    fs = FaultFileSystem(seed=1)
    s = Store.open("/s", fs=fs, background=False)
    a = s.create_timeline()
    point = a.commit({1: b"parent"}, durable=True)
    x = s.branch(a, point, timeline_id="ab" * 16)
    x.commit({1: b"old incarnation", 2: b"old"}, durable=True)
    s.delete_timeline(x)
    s.branch(a, point, timeline_id="ab" * 16)
    s.sync()
    s.abandon()
    fs.crash()
    with Store.open("/s", fs=fs, background=False) as s:
        x2 = s.timeline("ab" * 16)
        assert (x2.get(1), x2.get(2), x2.head_lsn) == (b"parent", None, point)


def _one_segment(path: str) -> str:
    (seg,) = [p for _, p in list_segments(OS, os.path.join(path, "log"))]
    return seg


@pytest.mark.parametrize("lsn, synced", [(0x1234567890ABCDEF, 0x1122334455667788), (5, 1)])
def test_torn_record_embedding_a_valid_record_is_a_torn_tail(store_path, lsn, synced):
    # an embedded record with an LSN that cannot follow, or with a watermark
    # that does not reach the torn record, proves nothing
    rng = random.Random(0)
    inner = rng.randbytes(40)
    embedded = _pack_header(REC_COMMIT, len(inner), lsn, synced, 0x55AA, rng.randbytes(16), xxh3(inner))
    embedded += inner
    value = rng.randbytes(300) + embedded + rng.randbytes(3000)
    assert encode(2, value).stored == value  # stored raw: the embedded record is in the log as is
    with Store.open(store_path, background=False) as s:
        tid = s.create_timeline().id
    s = Store.open(store_path, background=False)
    t = s.timeline(tid)
    t.commit({1: b"durable"}, durable=True)
    t.commit({2: value})  # not durable: a power loss may tear it
    s.abandon()
    seg = _one_segment(store_path)
    data = open(seg, "rb").read()
    os.truncate(seg, data.rfind(embedded) + len(embedded) + 10)
    for _ in range(2):
        with Store.open(store_path, background=False) as s:
            assert s.damaged() == {}
            tl = s.timeline(tid)
            assert (tl.get(1), tl.get(2)) == (b"durable", None)
            tl.commit({3: b"more"}, durable=True)


def test_out_of_order_page_writeback_in_the_unsynced_tail_is_a_torn_tail(store_path):
    with Store.open(store_path, background=False) as s:
        tid = s.create_timeline().id
    s = Store.open(store_path, background=False)
    t = s.timeline(tid)
    t.commit({0: b"durable" * 100}, durable=True)
    synced = scan_segment(OS, _one_segment(store_path), True).end
    for k in range(1, 30):
        t.commit({k: os.urandom(1000)})  # written, never synced
    s.abandon()
    seg = _one_segment(store_path)
    end = scan_segment(OS, seg, True).end
    page = (synced // 4096 + 1) * 4096  # a page of the unsynced tail never made it
    assert synced < page and page + 4096 < end  # later pages did
    with open(seg, "r+b") as f:
        f.seek(page)
        f.write(bytes(4096))
    with Store.open(store_path, background=False) as s:
        assert s.damaged() == {}
        tl = s.timeline(tid)
        assert tl.get(0) == b"durable" * 100
        survivors = [k for k in range(1, 30) if tl.get(k) is not None]
        assert survivors == list(range(1, len(survivors) + 1))  # a prefix survived


def test_damaged_last_record_of_a_sealed_segment_marks_its_timeline(store_path):
    cfg = StoreConfig(log_segment_bytes=4096)
    with Store.open(store_path, background=False, config=cfg):
        pass
    s = Store.open(store_path, background=False, config=cfg)
    a, b = s.create_timeline(), s.create_timeline()
    for i in range(20):
        a.commit({i: bytes(300)}, durable=True)
        b.commit({i: b"b%d" % i}, durable=True)
    s.abandon()
    segs = list_segments(OS, os.path.join(store_path, "log"))
    assert len(segs) > 1
    r = scan_segment(OS, segs[0][1], False).records[-1]
    _flip(segs[0][1], r.offset + RECORD_HEADER.size, 1)
    with Store.open(store_path, background=False, config=cfg) as s:
        assert list(s.damaged()) == [r.timeline.hex()]
        other = b if r.timeline.hex() == a.id else a
        assert s.timeline(other.id).get(19) is not None


def test_scan_started_before_gc_reads_the_state_it_was_admitted_at():
    s = Store.open("/s", fs=FaultFileSystem(), background=False, config=StoreConfig(retention=KEEP_ALL))
    t = s.create_timeline()
    for k in range(10):
        t.commit({k: b"v1-%d" % k})
    old = t.head_lsn
    s.flush(t)
    for k in range(10):
        t.commit({k: b"v2-%d" % k})
    s.compact(t, force_images=True)
    it = t.scan(lsn=old)
    assert next(it) == (0, b"v1-0")
    t.set_retention(Retention(period=None, lsn_distance=0))
    assert s.gc(t).layers_removed > 0 and t.horizon > old
    assert list(it) == [(k, b"v1-%d" % k) for k in range(1, 10)]
    s.close()


def test_detach_while_a_descendant_builds_its_chain_is_noticed(monkeypatch):
    s = Store.open("/s", fs=FaultFileSystem(), background=False, config=StoreConfig(retention=KEEP_ALL))
    a = s.create_timeline()
    a.commit({1: b"A-v1", 2: b"A2"})
    b = s.branch(a)
    b.commit({2: b"B2"})
    c = s.branch(b)
    s.flush()
    real = timeline_module.FrozenBitMap64

    def racing(keys):  # another thread detaches B while C builds its chain
        monkeypatch.setattr(timeline_module, "FrozenBitMap64", real)
        s.detach(b)
        return real(keys)

    monkeypatch.setattr(timeline_module, "FrozenBitMap64", racing)
    assert c.get(1) == b"A-v1"
    a.commit({1: b"A-v2"})
    a.commit({1: None})
    s.compact(a, force_images=True)
    a.set_retention(Retention(period=None, lsn_distance=0))
    s.gc(a)  # A keeps nothing for B any more
    assert (b.get(1), c.get(1), c.get(2)) == (b"A-v1", b"A-v1", b"B2")
    s.close()


def test_timeline_recreated_while_its_id_is_being_deleted_keeps_its_files():
    s = Store.open("/s", fs=FaultFileSystem(), background=False)
    x = "cd" * 16
    t = s.create_timeline(x)
    t.commit({1: b"old"})
    s.flush(t)
    real_sync = s._log.sync
    made: dict[str, object] = {}

    def recreate():
        n = s.create_timeline(x)  # waits for the delete to finish
        n.commit({7: b"new"}, durable=True)
        s.flush(n)
        made["t"] = n

    racer = threading.Thread(target=recreate)

    def racing_sync(pos=None):
        real_sync(pos)
        if not racer.is_alive() and "t" not in made:
            racer.start()
            time.sleep(0.05)  # give it every chance to get in

    s._log.sync = racing_sync  # type: ignore[method-assign]
    s.delete_timeline(x)
    s._log.sync = real_sync  # type: ignore[method-assign]
    racer.join()
    n = made["t"]
    assert n.get(7) == b"new" and n.get(1) is None  # type: ignore[attr-defined]
    s.close()


def test_gc_of_a_parent_with_an_unreadable_child_keeps_everything(store_path):
    cfg = StoreConfig(retention=Retention(period=None, lsn_distance=0))
    with Store.open(store_path, background=False, config=cfg) as s:
        a = s.create_timeline()
        a.commit({1: b"x"})
        c = s.branch(a)
        a.commit({1: b"y"})
        s.compact(a, force_images=True)
        other = s.create_timeline()
        for i in range(3):
            other.commit({1: b"%d" % i})
            s.flush(other)
        s.compact(other, force_images=True)
    snap = decode_snapshot("m", open(os.path.join(store_path, "manifest"), "rb").read())
    _, off, _, _ = snap.table[bytes.fromhex(c.id)]
    _flip(os.path.join(store_path, "manifest"), off + 40)
    with Store.open(store_path, background=False, config=cfg) as s:
        r = s.gc()  # no error; the parent keeps what the child may need
        assert s.timeline(a.id).usage().physical_size > 0
        assert any(tid == other.id for tid, _ in r.removed)
        assert s.timeline(a.id).get(1) == b"y"


def test_a_timeline_directory_whose_parent_sync_failed_is_synced_on_the_next_flush():
    """Found by the fault sweep (tests/test_fault_sweep.py, EIO at the 309th
    operation): a flush created a timeline's directory, syncing its parent
    failed, the next flush found the directory there and wrote a layer into
    it; a power loss then took the directory, and the layer the log listed."""
    fs = FaultFileSystem(seed=5)
    with Store.open("/s", background=False, fs=fs) as store:
        tl = store.create_timeline()
        tl.commit({1: page(tl.id, 1, 1)}, durable=True)
        fs.fail(after=2, err=errno.EIO, ops={"sync_dir"})  # 1: the store's, for timelines/; 2: timelines/
        with pytest.raises(OSError):
            store.flush(tl)
        fs.clear_faults()
        store.flush(tl)  # the directory exists now: its entry must still be made durable
        tid = tl.id
    fs.crash()
    with Store.open("/s", background=False, fs=fs) as store:
        assert store.check().ok, store.check().problems
        assert page_owner(store.timeline(tid).get(1)) == (tid, 1, 1)
