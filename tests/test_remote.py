"""The remote tier (engine.remote): a store that lives in an object store
survives the loss of its machine, fences a stale writer, and converges
through failed requests. Both backends: a local directory and S3 on a
real SeaweedFS (and moto's server, behind a fault-injecting proxy).
`TORTURE=1` (make torture) fails every N in the sweeps, and triples the
cache test."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Store
from engine.errors import CorruptionError, InvalidArgumentError, StoreFailedError
from engine.objectstore import LocalObjectStore, ObjectStore, ObjectStoreError, open_object_store
from engine.remote import (
    LEASE_KEY,
    FencedError,
    Index,
    Remote,
    SupersededError,
    decode_lease,
    encode_index,
    index_key,
    latest_index,
    restore,
)

from .conftest import SMALL
from .interleave import Pause

TORTURE = bool(os.environ.get("TORTURE"))  # (make torture: every N of each fault sweep, a bigger cache test)


class Faulty:
    """An object store that counts requests and, on demand, fails the Nth
    (before it reaches the store, or after it succeeded: a lost answer),
    or every request while `cut` is set."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.n = 0
        self.fail_at: int | None = None
        self.lose_answer = False
        self.cut = False
        self.mu = threading.Lock()

    def __repr__(self) -> str:
        return f"Faulty({self.inner!r})"

    def _call(self, name: str, *args):
        with self.mu:
            self.n += 1
            hit = self.cut or self.n == self.fail_at
        if hit and not self.lose_answer:
            raise ObjectStoreError(f"injected failure of request {self.n} ({name})")
        out = getattr(self.inner, name)(*args)
        if hit:
            raise ObjectStoreError(f"injected lost answer of request {self.n} ({name})")
        return out

    def get(self, key):
        return self._call("get", key)

    def get_range(self, key, start, end):
        return self._call("get_range", key, start, end)

    def put(self, key, data):
        return self._call("put", key, data)

    def put_if_absent(self, key, data):
        return self._call("put_if_absent", key, data)

    def put_if_match(self, key, data, etag):
        return self._call("put_if_match", key, data, etag)

    def delete(self, keys):
        return self._call("delete", keys)

    def list(self, prefix=""):
        return self._call("list", prefix)


@pytest.fixture(params=["local", "s3", pytest.param("ceph", marks=pytest.mark.needs("ceph"))])
def objects(request, tmp_path):
    """A local directory, S3 on SeaweedFS, and S3 on Ceph RGW."""
    if request.param == "local":
        return LocalObjectStore(str(tmp_path / "remote"))
    server = request.getfixturevalue("seaweedfs" if request.param == "s3" else request.param)
    return open_object_store(server.url(), env=server.env())


def remote(objects, **kw) -> Remote:
    kw.setdefault("lease_s", 3.0)
    kw.setdefault("fetch_whole_bytes", 0)  # (these layers are tiny: read in ranges, as big ones are)
    kw.setdefault("ship_interval", 0.05)
    return Remote(objects, **kw)


def write(tl, model: dict, n: int, start: int = 0, durable: bool = True) -> list[int]:
    lsns = []
    for i in range(start, start + n):
        key, value = i % 37, b"%d:" % i + os.urandom(24)
        lsns.append(tl.commit({key: value}, durable=durable))
        model[key] = value
    return lsns


def test_machine_loss_loses_nothing_shipped_and_branches_at_old_lsns_after_restore(objects, tmp_path):
    home = str(tmp_path / "home")
    s = Store.open(home, config=SMALL, remote=remote(objects))
    tl = s.create_timeline()
    model: dict[int, bytes] = {}
    lsns = write(tl, model, 300)
    s.compact(tl)
    old = {k: tl.get(k, lsns[120]) for k in range(37)}
    s.checkpoint()
    write(tl, model, 150, start=300)
    s._remote.ship()  # (what the shipper does every 50 ms)
    shipped = dict(model)
    write(tl, model, 20, start=450, durable=False)  # after the last shipment: may be lost
    s.abandon()  # the machine is gone, and its disk with it
    shutil.rmtree(home)

    new_home = str(tmp_path / "new")
    report = restore(objects, new_home, force=True, lease_s=3.0)
    assert report.generation == 2 and report.timelines == 1
    s2 = Store.open(new_home, config=SMALL, remote=remote(objects))
    try:
        t2 = s2.timeline(tl.id)
        got = {k: t2.get(k) for k in range(37)}
        for k, v in shipped.items():
            assert got[k] == v or got[k] == model[k], k  # shipped, or newer still
        assert s2._remote.stats.ranged_reads > 0 and report.layer_bytes == 0  # (read on first read, not before)
        assert s2.check().ok
        b = s2.branch(t2, lsns[120])  # a branch at an old LSN, after the restore
        assert {k: b.get(k) for k in range(37)} == old
        write(b, {}, 10)
    finally:
        s2.close()
    lease = decode_lease(objects.get(LEASE_KEY).data)
    assert lease.released and lease.generation == 3


def test_a_stale_writer_is_fenced_and_nothing_it_does_later_counts(objects, tmp_path):
    """Node A is cut off (not dead). B restores with force: A's next chunk
    finds its number taken, A refuses writes, and A's uploads and deletes
    after that are never read; a third restore sees all of B's work."""
    a = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects))
    tl = a.create_timeline()
    model: dict[int, bytes] = {}
    write(tl, model, 100)
    a.checkpoint()
    a._remote.wait_uploaded()
    a._remote.ship()
    restore(objects, str(tmp_path / "b"), force=True)
    b = Store.open(str(tmp_path / "b"), config=SMALL, remote=remote(objects))
    tb = b.timeline(tl.id)
    assert {k: tb.get(k) for k in model} == model
    write(tb, model, 60, start=1000)
    b.checkpoint()
    b._remote.wait_uploaded()

    # A goes on as if nothing happened: its writes are refused once it ships
    # (or already, if its lease keeper found the lease taken first)
    with contextlib.suppress(StoreFailedError):
        tl.commit({1: b"from the stale node"}, durable=True)
    with pytest.raises(FencedError):
        a._remote.ship()
    with pytest.raises(StoreFailedError, match="fenced"):
        tl.commit({2: b"refused"})
    assert a._remote.fenced is not None
    # an index A uploads now, of generation 1 and however new, is not the latest
    _, ours = latest_index(objects)
    late = Index(1, 2**60, ours.replay_from, ours.manifest, ours.layers)
    objects.put(index_key(1, 2**60), encode_index(late))
    key, ix = latest_index(objects)
    assert ix.generation == b._remote.generation == 3
    a.close()
    b.close()
    restore(objects, str(tmp_path / "c"), force=True)
    c = Store.open(str(tmp_path / "c"), config=SMALL, remote=remote(objects))
    try:
        tc = c.timeline(tl.id)
        assert {k: tc.get(k) for k in model} == model
        assert tc.get(1) == model.get(1)
    finally:
        c.close()


def whole_in_b_and_after(objects, tmp_path, tid: str, model: dict) -> None:
    """The store restored into tmp_path/b is whole, and so is a restore of
    what B then left in the object store (into tmp_path/c)."""
    for home in ("b", "c"):
        if home == "c":
            restore(objects, str(tmp_path / "c"))  # (B let the lease go: no wait)
        s = Store.open(str(tmp_path / home), config=SMALL, remote=remote(objects))
        try:
            assert {k: s.timeline(tid).get(k) for k in model} == model, home
            assert s.check().ok
        finally:
            s.close()


def node_a_uploaded(tmp_path):
    """Node A (no background thread: checkpoints only when asked) with 120
    commits in an index that is up."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    a = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects, lease_s=30), background=False)
    tl = a.create_timeline()
    model: dict[int, bytes] = {}
    write(tl, model, 120)
    a.checkpoint()
    a._remote.wait_uploaded()
    return objects, a, tl, model


def test_a_stale_writer_that_uploaded_before_the_takeover_deletes_nothing_needed(tmp_path):
    """A is paused after uploading an index and before the renewal that
    allows its deletes; B takes over meanwhile. A's renewal fails, so it
    deletes nothing, and B's store is whole."""
    objects, a, tl, model = node_a_uploaded(tmp_path)
    with Pause(Remote, "_renew", thread=f"strata-remote-upload:{a.path}", before=True) as p:
        a.compact(tl)
        a.checkpoint()  # (uploads, in the upload thread, up to the renewal)
        p.reached()
        before = {x.key for x in objects.list()}
        restore(objects, str(tmp_path / "b"), force=True)
    with pytest.raises(FencedError):
        a._remote.wait_uploaded(timeout=20)
    assert a._remote.fenced is not None
    after = {x.key for x in objects.list()}
    assert not {k for k in before - after if k.startswith(("layers/", "log/"))}  # A deleted nothing
    a.close()
    whole_in_b_and_after(objects, tmp_path, tl.id, model)


def test_a_stale_writer_whose_index_went_up_after_the_takeover_deletes_nothing(tmp_path):
    """A is paused just before it uploads an index; B restores the older
    one meanwhile. A's index then goes up, but its renewal fails, so it
    deletes nothing the older index (B's) needs."""
    objects, a, tl, model = node_a_uploaded(tmp_path)
    with Pause(objects, "put", thread=f"strata-remote-upload:{a.path}", before=True,
               when=lambda key, data: key.startswith("index/")) as p:
        a.compact(tl)
        a.checkpoint()
        p.reached()
        restore(objects, str(tmp_path / "b"), force=True)
    with pytest.raises(FencedError):
        a._remote.wait_uploaded(timeout=20)
    a.close()
    whole_in_b_and_after(objects, tmp_path, tl.id, model)


def test_the_lease_of_a_live_holder_is_waited_for_and_a_released_one_taken_at_once(tmp_path):
    objects = LocalObjectStore(str(tmp_path / "remote"))
    a = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects, lease_s=0.6))
    a.create_timeline()
    waits: list[float] = []

    def wait(s: float) -> None:
        waits.append(s)
        time.sleep(s)
        if len(waits) >= 3:
            raise TimeoutError("still held")

    from engine.remote import take_lease

    with pytest.raises(TimeoutError):
        take_lease(objects, "node-b", lease_s=0.6, force=False, wait=wait)
    assert len(waits) == 3  # renewed each time: its holder lives
    a.close()  # (gives the lease up)
    waits.clear()
    lease, _ = take_lease(objects, "node-b", lease_s=0.6, force=False, wait=wait)
    assert waits == [] and lease.generation == 2


def test_a_holder_cut_off_from_the_store_fences_itself_before_the_lease_lapses(tmp_path):
    faulty = Faulty(LocalObjectStore(str(tmp_path / "remote")))
    s = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(faulty, lease_s=0.9))
    tl = s.create_timeline()
    tl.commit({1: b"x"}, durable=True)
    faulty.cut = True
    t0 = time.monotonic()
    while s._remote.fenced is None and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert s._remote.fenced is not None and time.monotonic() - t0 < 0.9 + 0.5
    with pytest.raises(StoreFailedError, match="could not be renewed"):
        tl.commit({1: b"y"})
    assert tl.get(1) == b"x"  # reads go on
    s.abandon()


def test_a_home_taken_over_refuses_to_open_and_its_own_restart_does_not_wait(tmp_path):
    objects = LocalObjectStore(str(tmp_path / "remote"))
    home = str(tmp_path / "a")
    a = Store.open(home, config=SMALL, remote=remote(objects, lease_s=30))
    tl = a.create_timeline()
    write(tl, {}, 20)
    a.abandon()  # crashed, lease still held, 30 s to run
    t0 = time.monotonic()
    a = Store.open(home, config=SMALL, remote=remote(objects, lease_s=30))  # its own: no wait
    assert time.monotonic() - t0 < 10 and a._remote.generation == 2
    a.abandon()
    restore(objects, str(tmp_path / "b"), force=True)
    with pytest.raises(SupersededError, match="restore into a new home"):
        Store.open(home, config=SMALL, remote=remote(objects))
    with pytest.raises(InvalidArgumentError, match="restore"):
        Store.open(str(tmp_path / "fresh"), config=SMALL, remote=remote(objects))
    with pytest.raises(InvalidArgumentError, match="empty directory"):
        restore(objects, home, force=True)


@pytest.mark.parametrize("lose_answer", [False, True], ids=["failed", "answer-lost"])
def test_fault_sweep_every_request_failed_once_loses_nothing_and_converges(tmp_path, lose_answer):
    """For every N, the Nth object-store request of a workload fails (or
    succeeds and its answer is lost): every durable commit is there after a
    restore, and the store converges once the faults stop."""

    def workload(objects, home, fail_at):
        objects.fail_at = fail_at
        try:
            s = Store.open(home, config=SMALL, remote=remote(objects))
        except ObjectStoreError:
            objects.fail_at = None
            s = Store.open(home, config=SMALL, remote=remote(objects))  # (a retry by its operator)
        tl = s.create_timeline("0" * 32) if "0" * 32 not in s else s.timeline("0" * 32)
        model: dict[int, bytes] = {}
        write(tl, model, 60)
        s.checkpoint()
        s._remote.ship()
        s.close()
        return model

    base = Faulty(LocalObjectStore(str(tmp_path / "count")))
    workload(base, str(tmp_path / "count-home"), None)
    total = base.n
    assert total > 20
    for n in range(1, total + 1, 1 if TORTURE or not lose_answer else 2):
        where = tmp_path / f"n{n}"
        objects = Faulty(LocalObjectStore(str(where / "remote")))
        model = workload(objects, str(where / "home"), n)
        objects.fail_at = None
        restore(objects, str(where / "restored"), force=True)
        s = Store.open(str(where / "restored"), config=SMALL, remote=remote(objects))
        try:
            tl = s.timeline("0" * 32)
            assert {k: tl.get(k) for k in model} == model, f"request {n} of {total} failed"
        finally:
            s.close()
        shutil.rmtree(where)


@pytest.mark.parametrize("ranged", [False, True], ids=["fetched", "ranged"])
def test_a_layer_fetched_on_first_read_is_checked_and_a_damaged_one_refused(tmp_path, ranged):
    """Fetched whole on its first read, a layer is checked against the
    index's xxh3; read in ranges meanwhile, each value by its own checksum
    (and the download behind it by the index's)."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects), background=False)
    tl = s.create_timeline()
    model: dict[int, bytes] = {}
    write(tl, model, 200)
    s.compact(tl)
    s.close()
    layers = [x.key for x in objects.list("layers")]
    assert layers
    report = restore(objects, str(tmp_path / "b"))
    assert not os.path.exists(os.path.join(str(tmp_path / "b"), "timelines", tl.id))  # nothing fetched yet
    data = bytearray(objects.get(layers[0]).data)
    data[len(data) // 2] ^= 0x40
    objects.put(layers[0], bytes(data))  # (damaged in the object store)
    s2 = Store.open(str(tmp_path / "b"), config=SMALL, remote=remote(objects, ranged_reads=ranged),
                    background=False)
    try:
        t2 = s2.timeline(tl.id)
        with pytest.raises(CorruptionError, match="checksum mismatch" if ranged else "does not match its index"):
            for k in model:
                t2.get(k)
        assert report.layers == len(layers)
        objects.put(layers[0], bytes(data[: len(data) // 2]) + bytes([data[len(data) // 2] ^ 0x40])
                    + bytes(data[len(data) // 2 + 1 :]))  # (repaired)
        assert {k: t2.get(k) for k in model} == model  # (fetched again, now whole; or read in ranges)
        if not ranged:
            assert s2._remote.stats.fetched == len(os.listdir(os.path.join(str(tmp_path / "b"), "timelines", tl.id)))
    finally:
        s2.close()


def test_a_store_three_times_the_cache_reads_back_exactly_within_its_budget(tmp_path):
    """Layers are a cache: with a budget of a third of the store, every page
    at the head and at old LSNs reads back exactly, and what is left on
    disk after each eviction pass fits the budget. Layers not uploaded yet
    are never evicted."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    home = str(tmp_path / "a")
    s = Store.open(home, config=SMALL, remote=remote(objects), background=False)
    tl = s.create_timeline()
    history: list[tuple[int, dict[int, bytes]]] = []
    model: dict[int, bytes] = {}
    for i in range(48 if TORTURE else 12):
        for k in range(40):
            model[k] = b"%d/%d:" % (i, k) + os.urandom(3000)
        history.append((tl.commit(dict(model), durable=True), dict(model)))
        s.flush(tl)
    s.checkpoint()
    s._remote.wait_uploaded()
    s.close()
    restore(objects, str(tmp_path / "b"), force=True)
    total = sum(x.size for x in objects.list("layers"))
    budget = total // 3
    s = Store.open(str(tmp_path / "b"), config=SMALL, background=False,  # (each read fetches what it needs)
                   remote=remote(objects, cache_bytes=budget, in_use_s=0.0, ranged_reads=False))
    try:
        r = s._remote
        t = s.timeline(tl.id)
        largest = max(d.file_size for d in t._meta.layers.values())
        assert budget > largest  # (else the budget cannot hold the layer a read needs)
        write(t, {}, 5)  # new data, in a layer not uploaded yet once flushed
        s.flush(t)
        unuploaded = {ly.path for ly in t._map.layers if (t._tid, ly.desc.name) not in r._uploaded}
        assert unuploaded
        for lsn, want in history:
            for k, v in want.items():
                assert t.get(k, lsn) == v
                r.evict()
                assert sum(x[1] for x in r.local_layers()) <= budget + sum(
                    os.path.getsize(p) for p in unuploaded)
                assert all(os.path.exists(p) for p in unuploaded)  # never evicted
        assert r.stats.evicted > 0 and r.stats.fetched > len(t._meta.layers)  # (fetched again after eviction)
        hits = 1 - r.stats.fetched / (len(history) * 40)
        print(f"cache of a third of the store: {r.stats.fetched} fetches, {r.stats.evicted} evictions for "
              f"{len(history) * 40} reads (hit rate {hits:.2f})")
    finally:
        s.close()


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "async"])
def test_durable_mode_loses_no_acknowledged_commit_with_the_machine(objects, tmp_path, durable):
    """In durable mode a durable commit returns once the object store has
    it: the machine lost right after, every one is there. The shipper is
    slowed to a minute, so that in the default mode the same run loses them."""
    s = Store.open(str(tmp_path / "a"), config=SMALL, background=False,
                   remote=remote(objects, ship_interval=60.0, durable=durable))
    tl = s.create_timeline()
    models: list[dict[int, bytes]] = [{} for _ in range(4)]

    def commits(i: int) -> None:  # (keys of their own: each thread's model is in commit order)
        for j in range(25):
            models[i][i * 100 + j] = v = b"%d/%d:" % (i, j) + os.urandom(24)
            tl.commit({i * 100 + j: v}, durable=True)

    threads = [threading.Thread(target=commits, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    model = {k: v for m in models for k, v in m.items()}
    assert len(model) == 100
    s.abandon()
    restore(objects, str(tmp_path / "b"), force=True)
    s2 = Store.open(str(tmp_path / "b"), config=SMALL, remote=remote(objects), background=False)
    try:
        got = {k: s2.timeline(tl.id).get(k) if tl.id in s2 else None for k in model}
    finally:
        s2.close()
    if durable:
        assert got == model
    else:
        assert got != model


def test_durable_commits_waiting_behind_a_shipment_share_the_next_one(tmp_path):
    """Group commit: while one durable commit's log chunk is on its way
    (paused), three more commit and wait; once it lands, one shipment
    carries all three: two chunks for four commits, each commit there."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=SMALL, background=False,
                   remote=remote(objects, ship_interval=60.0, durable=True))
    tl = s.create_timeline()
    r = s._remote
    waiting, real_wait = [], r.wait_shipped

    def counted(pos: int) -> None:
        waiting.append(pos)
        real_wait(pos)

    r.wait_shipped = counted  # type: ignore[method-assign]
    before = r.stats.chunks
    lsns: dict[int, int] = {}

    def commit(i: int) -> None:
        lsns[i] = tl.commit({i: b"v%d" % i}, durable=True)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
    with Pause(objects, "put_if_absent", before=True, when=lambda key, data: key.startswith("log/")) as p:
        threads[0].start()
        p.reached()  # (the first commit's chunk is on its way)
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 30
        while len(waiting) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(waiting) == 4  # (all three fsynced locally and wait for the object store)
    for t in threads:
        t.join(30)
    assert len(lsns) == 4 and r.stats.chunks - before == 2
    s.abandon()
    restore(objects, str(tmp_path / "b"), force=True)
    s2 = Store.open(str(tmp_path / "b"), config=SMALL, remote=remote(objects), background=False)
    try:
        assert {i: s2.timeline(tl.id).get(i) for i in range(4)} == {i: b"v%d" % i for i in range(4)}
    finally:
        s2.close()


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_s3_fault_sweep_503s_and_lost_answers_lose_nothing(s3server, tmp_path, mode):
    """On the wire, through a proxy in front of SeaweedFS or moto: for every N
    (make torture; a sixth of them per server and mode in make test), the
    Nth HTTP request of a workload is answered 503 SlowDown, or takes effect
    and loses its answer. obstore retries; a conditional write refused by
    its own earlier success has won; every durable commit survives a restore."""
    from .s3servers import FaultProxy, SeaweedFS

    proxy = FaultProxy(s3server.endpoint)
    env = dict(s3server.env(), AWS_ENDPOINT_URL=proxy.endpoint)
    try:
        def workload(url: str, home: str) -> dict[int, bytes]:
            s = Store.open(home, config=SMALL, remote=remote(open_object_store(url, env=env)), background=False)
            tl = s.create_timeline("0" * 32)
            model: dict[int, bytes] = {}
            write(tl, model, 30)
            s.checkpoint()
            s._remote.ship()
            s.close()
            return model

        proxy.n = 0
        workload(s3server.url(), str(tmp_path / "count"))
        total = proxy.n
        assert total > 20
        # make test: every sixth N, each server and mode from its own start (between them, a third of
        # every N for each mode); make torture: every N
        first = (1 if isinstance(s3server, SeaweedFS) else 4) + (2 if mode == "drop" else 0)
        ns = range(1, total + 1) if TORTURE else range(first, total + 1, 6)
        for n in ns:
            url, where = s3server.url(), tmp_path / f"n{n}"
            proxy.n, proxy.fail_at, proxy.mode = 0, n, mode
            model = workload(url, str(where / "home"))
            proxy.fail_at = None
            objects = open_object_store(url, env=env)
            restore(objects, str(where / "restored"), force=True)
            s = Store.open(str(where / "restored"), config=SMALL, remote=remote(objects), background=False)
            try:
                tl = s.timeline("0" * 32)
                assert {k: tl.get(k) for k in model} == model, f"request {n} of {total} ({mode})"
            finally:
                s.close()
        assert proxy.faults >= len(ns) - 1  # (each N was reached)
    finally:
        proxy.close()


# --- found by a review (each failed before its fix) ---

BIG = dataclasses.replace(SMALL, log_checkpoint_bytes=1 << 30)


def test_a_detach_then_the_parents_drop_after_the_index_survive_a_restore(tmp_path):
    """A detach is a layer edit, which a restored log skips: so it returns
    only once an index holds it, and the parent's later drop cannot leave
    the child without what it read from it. (From a review.)"""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    home = str(tmp_path / "home")
    s = Store.open(home, config=BIG, remote=remote(objects), background=False)
    parent = s.create_timeline()
    model: dict[int, bytes] = {}
    write(parent, model, 50)
    child = s.branch(parent, parent.head if hasattr(parent, "head") else s._log.last_lsn)
    s.checkpoint()
    s._remote.wait_uploaded()
    # after the index: detach the child, drop the parent (all in the log)
    s.detach(child)
    s.delete_timeline(parent)
    child.commit({1000: b"after"}, durable=True)
    assert s._remote.ship() >= s._log._synced
    cid = child.id
    s.abandon()
    shutil.rmtree(home)

    restore(objects, str(tmp_path / "new"), force=True)
    s2 = Store.open(str(tmp_path / "new"), config=BIG, remote=remote(objects))
    try:
        c2 = s2.timeline(cid)
        got = {k: c2.get(k) for k in model}
        assert got == model, "child's inherited data lost after restore"
        assert c2.get(1000) == b"after"
    finally:
        s2.close()


class LoseLeaseAnswer(Faulty):
    """Loses the answer of the Nth lease renewal (the write landed)."""

    def __init__(self, inner, nth=1):
        super().__init__(inner)
        self.nth, self.seen, self.armed = nth, 0, False

    def put_if_match(self, key, data, etag):
        out = self.inner.put_if_match(key, data, etag)
        if self.armed and key == "lease":
            self.seen += 1
            if self.seen == self.nth:
                from engine.objectstore import ObjectStoreError
                raise ObjectStoreError("injected lost answer of a lease renewal")
        return out


def test_a_lost_renewal_answer_does_not_fence_a_healthy_node(tmp_path):
    objects = LoseLeaseAnswer(LocalObjectStore(str(tmp_path / "remote")))
    s = Store.open(str(tmp_path / "a"), config=BIG, remote=remote(objects, lease_s=0.9))
    tl = s.create_timeline()
    objects.armed = True
    time.sleep(2.0)  # a few renewals; one answer was lost, the object store is fine
    try:
        assert s._remote.fenced is None, f"fenced by its own renewal: {s._remote.fenced}"
        tl.commit({1: b"x"}, durable=True)
    finally:
        s.abandon()


class SlowCut(Faulty):
    """While cut, each request takes `delay` s before it fails (a slow network)."""

    def __init__(self, inner, delay):
        super().__init__(inner)
        self.delay = delay

    def _call(self, name, *args):
        if self.cut:
            time.sleep(self.delay)
        return super()._call(name, *args)


def test_a_slow_cut_off_holder_takes_no_write_once_a_taker_has_the_lease(tmp_path):
    from engine.remote import take_lease

    inner = LocalObjectStore(str(tmp_path / "remote"))
    lease_s = 1.5
    s = Store.open(str(tmp_path / "a"), config=BIG, remote=remote(SlowCut(inner, 0.03), lease_s=lease_s))
    tl = s.create_timeline()
    f = s._remote.objects
    orig = f.put_if_match

    def cut_after(key, data, etag):
        out = orig(key, data, etag)
        f.cut = True  # (the holder's network goes bad just after a renewal; the store is fine)
        return out
    f.put_if_match = cut_after
    while not f.cut:
        time.sleep(0.01)
    lease, _ = take_lease(inner, "node-b", lease_s=lease_s, force=False)  # waits for a lapse
    taken = time.monotonic()
    try:
        assert lease.generation == 2
        # the old holder, whose lease has just been taken over, still acknowledges durable commits
        tl.commit({1: b"acked by a node that no longer holds the lease"}, durable=True)
        pytest.fail(f"holder not fenced {time.monotonic() - taken:.2f}s after the takeover "
                    f"(fenced: {s._remote.fenced})")
    except Exception as e:  # StoreFailedError: the holder fenced itself in time
        assert "fenced" in str(e), e
    finally:
        s.abandon()


def test_abandon_does_not_hang_on_an_upload_that_keeps_failing(tmp_path):
    class NoIndex(Faulty):
        def put(self, key, data):
            if self.no_index and key.startswith("index/"):
                from engine.objectstore import ObjectStoreError
                raise ObjectStoreError("index put refused")
            return self.inner.put(key, data)

    objects = NoIndex(LocalObjectStore(str(tmp_path / "remote")))
    objects.no_index = False
    s = Store.open(str(tmp_path / "a"), config=BIG, remote=remote(objects, lease_s=30), background=False)
    tl = s.create_timeline()
    write(tl, {}, 20)
    objects.no_index = True
    s.checkpoint()  # (its upload now fails, and is retried)
    time.sleep(0.3)
    r = s._remote
    t = threading.Thread(target=s.abandon, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(5)
    alive = [x.name for x in r._threads if x.is_alive()]
    assert not t.is_alive(), f"abandon still running after {time.monotonic() - t0:.1f}s; alive: {alive}"


def test_a_timeline_deleted_before_its_checkpoint_goes_up_does_not_stall_uploads(tmp_path):
    from engine.objectstore import ObjectStoreError
    objects = LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=BIG, remote=remote(objects), background=False)
    s.create_timeline()  # (another, which stays)
    tl = s.create_timeline()
    write(tl, {}, 200)
    with Pause(Remote, "_upload", thread=f"strata-remote-upload:{s.path}", before=True) as p:
        s.checkpoint()  # lists tl's new layers
        p.reached()
        s.delete_timeline(tl)  # (its files go at once: `held` does not keep them)
    try:
        s._remote.wait_uploaded(timeout=5)
    except ObjectStoreError as e:
        pytest.fail(f"the checkpoint never goes up: {e}")
    finally:
        s.abandon()


def test_layers_no_index_lists_are_collected_by_the_next_generation(tmp_path):
    """A stale writer's (or a crashed upload's) layers, of an older
    generation and in no index that counts, go at the next start; those the
    index lists stay, and the store restores whole."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects), background=False)
    tl = s.create_timeline()
    model: dict[int, bytes] = {}
    write(tl, model, 120)
    s.checkpoint()
    s._remote.wait_uploaded()
    s.abandon()
    listed = {x.key for x in objects.list("layers")}
    assert listed
    orphan = f"layers/{tl.id}/delta-0000000000000000-0000000000000001-0000000000000001-0000000000000002-00000000.layer.00000001"
    objects.put(orphan, b"an upload no index lists")
    s = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects), background=False)
    try:
        have = {x.key for x in objects.list("layers")}
        assert orphan not in have and s._remote.stats.deleted >= 1
        assert {k: s.timeline(tl.id).get(k) for k in model} == model
    finally:
        s.close()
    restore(objects, str(tmp_path / "b"))
    b = Store.open(str(tmp_path / "b"), config=SMALL, remote=remote(objects))
    try:
        assert {k: b.timeline(tl.id).get(k) for k in model} == model and b.check().ok
    finally:
        b.close()


def test_an_idle_store_checkpoints_so_a_restore_replays_no_log(tmp_path):
    """Once the log has taken no write for `idle_checkpoint_s`, the store
    checkpoints and its index goes up: the object store then holds the head
    in layers, and a restore downloads no log. A store that stays idle does
    not checkpoint again."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    config = dataclasses.replace(SMALL, idle_checkpoint_s=0.4, log_checkpoint_bytes=1 << 30)
    s = Store.open(str(tmp_path / "a"), config=config, remote=remote(objects))
    try:
        tl = s.create_timeline()
        model: dict[int, bytes] = {}
        write(tl, model, 50)
        head = s.last_lsn
        deadline = time.monotonic() + 20
        while s._remote.stats.last_index_lsn < head:
            assert time.monotonic() < deadline, f"no index holds LSN {head}: {s._remote.status(head)}"
            time.sleep(0.05)
        indexes = s._remote.stats.indexes
        time.sleep(1.5)  # (idle, with nothing new: no checkpoint, no index)
        assert s._remote.stats.indexes == indexes
    finally:
        s.abandon()
    report = restore(objects, str(tmp_path / "b"), force=True)
    assert report.log_bytes <= 4096, report  # (a segment header, at most: nothing to replay)
    s = Store.open(str(tmp_path / "b"), config=config, remote=remote(objects))
    try:
        assert {k: s.timeline(tl.id).get(k) for k in model} == model
    finally:
        s.close()


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 40.0), min_size=1, max_size=60))
def test_idle_checkpoints_are_a_gap_apart_and_the_last_write_is_covered(gaps):
    """The background thread's idle rule, on a clock of its own: writes come
    `gaps` seconds apart, and it looks every 0.5 s. An idle checkpoint
    comes only after `idle_s` without a write, never within `gap_s` of the
    last one (a trickle of writes with 2.5 s pauses used to make one at
    every pause), and the last write is covered within idle_s + gap_s."""
    from engine.background import _Idle

    idle_s, gap_s, tick = 2.0, 30.0, 0.5
    idle, now, pos = _Idle(0, now=0.0), 0.0, 0
    writes = list(itertools.accumulate(gaps))
    done: list[float] = []
    last_write = writes[-1]
    while now <= last_write + idle_s + gap_s + tick:
        while writes and writes[0] <= now:
            writes.pop(0)
            pos += 1
            wrote_at = now
        if idle.due(pos, now, idle_s, gap_s):
            assert now - wrote_at >= idle_s
            idle.checkpointed(pos, now)
            done.append(now)
        now += tick
    assert all(b - a >= gap_s for a, b in itertools.pairwise(done)), done
    assert idle.done == pos, "the last write was never checkpointed"


def test_a_missing_layer_is_read_in_ranges_at_once_and_downloaded_behind(tmp_path):
    """After a restore, the first read of a layer does not wait for its
    download: it reads what it needs from the object store in ranges (the
    download held back here), and once the fetch thread has the file here,
    reads use it."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects), background=False)
    tl = s.create_timeline()
    model: dict[int, bytes] = {}
    write(tl, model, 200)
    s.compact(tl)
    s.close()
    restore(objects, str(tmp_path / "b"))
    home = os.path.abspath(str(tmp_path / "b"))
    r = remote(objects)
    with Pause(Remote, "fetch_layer", thread=f"strata-remote-fetch:{home}", before=True) as p:
        s2 = Store.open(home, config=SMALL, remote=r, background=False)
        t2 = s2.timeline(tl.id)
        assert {k: t2.get(k) for k in model} == model
        p.reached()  # (the download waits)
        assert r.stats.ranged_reads > 0 and r.stats.fetched == 0
        assert not os.listdir(os.path.join(home, "timelines", tl.id))  # (nothing downloaded)
    try:
        layers = [ly.path for ly in t2._map.layers]
        deadline = time.monotonic() + 20
        while not all(os.path.exists(x) for x in layers):
            assert time.monotonic() < deadline, "the fetch thread did not download the layers"
            time.sleep(0.02)
        time.sleep(0.1)  # (the last one reopened)
        n = r.stats.ranged_reads
        assert {k: t2.get(k) for k in model} == model and r.stats.ranged_reads == n  # (read here now)
    finally:
        s2.close()


def test_a_reader_that_got_a_ranged_file_as_the_download_landed_does_not_keep_it(tmp_path):
    """The race between a read of an evicted layer and the download behind
    it: the reader is handed a file that reads from the object store, and
    stops before it keeps it; the download lands and reopens the layer;
    the reader goes on. It answers from the ranged file once, and the
    next read uses the file here (kept, it would read from the object
    store for good)."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects), background=False)
    tl = s.create_timeline()
    model: dict[int, bytes] = {}
    write(tl, model, 60)
    s.compact(tl)
    s.close()
    restore(objects, str(tmp_path / "b"))
    r = remote(objects)
    s2 = Store.open(str(tmp_path / "b"), config=SMALL, remote=r, background=False)
    try:
        t2 = s2.timeline(tl.id)
        assert {k: t2.get(k) for k in model} == model

        def reopened(ly) -> None:  # (downloaded, and the layer reopened: its next read opens it here)
            deadline = time.monotonic() + 20
            while not os.path.exists(ly.path) or ly._file is not None and not os.path.exists(ly._file.path):
                assert time.monotonic() < deadline, "the fetch thread did not download the layer"
                time.sleep(0.01)
            while ly._epoch == epochs.get(ly.path, 0):
                assert time.monotonic() < deadline, "the layer was not reopened"
                time.sleep(0.01)

        epochs: dict[str, int] = {}
        for ly in t2._map.layers:
            reopened(ly)
        ly = t2._map.layers[0]
        ly.evict()  # (as the cache does: its keys and index stay loaded)
        os.remove(ly.path)
        epochs[ly.path] = ly._epoch
        got: dict[int, bytes | None] = {}
        reader = threading.Thread(target=lambda: got.update({k: t2.get(k) for k in model}), name="reader")
        with Pause(r, "open_layer", thread="reader") as p:  # (after it: the ranged file in hand, not kept)
            reader.start()
            p.reached()
            assert p.result is not None and p.result.path == ly.path
            reopened(ly)
        reader.join(20)
        assert got == model
        n = r.stats.ranged_reads
        assert {k: t2.get(k) for k in model} == model
        assert r.stats.ranged_reads == n, "a stale ranged file was kept after the download"
    finally:
        s2.close()


def test_a_small_layer_is_fetched_whole_on_its_first_read_and_a_big_one_read_in_ranges(tmp_path):
    """A layer no bigger than `fetch_whole_bytes` costs one download on its
    first read, which then reads the file here; a bigger one is read in
    ranges at once."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects), background=False)
    tl = s.create_timeline()
    model: dict[int, bytes] = {}
    write(tl, model, 60)
    s.compact(tl)
    s.close()
    sizes = sorted(x.size for x in objects.list("layers"))
    for limit, ranged in ((sizes[-1], False), (sizes[0] - 1, True)):
        home = str(tmp_path / f"b{limit}")
        restore(objects, home, force=True)
        r = remote(objects, fetch_whole_bytes=limit)
        s2 = Store.open(home, config=SMALL, remote=r, background=False)
        try:
            assert {k: s2.timeline(tl.id).get(k) for k in model} == model
            assert (r.stats.ranged_reads > 0) is ranged
            if not ranged:
                assert r.stats.fetched == len(sizes)
        finally:
            s2.close()


def restored(tmp_path, objects: ObjectStore | None = None, n: int = 60) -> tuple[ObjectStore, str, str, dict]:
    """A store of `n` writes, compacted, closed and restored into a new home
    (whose layers are all in the object store only): (objects, home,
    timeline id, model)."""
    objects = objects or LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=SMALL, remote=remote(objects), background=False)
    tl = s.create_timeline()
    model: dict[int, bytes] = {}
    write(tl, model, n)
    s.compact(tl)
    s.close()
    home = os.path.abspath(str(tmp_path / "b"))
    restore(objects, home, force=True)
    return objects, home, tl.id, model


def wait_for(what: str, done, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.01)


def test_layers_written_here_are_evicted_once_up_and_fetched_back(tmp_path):
    """A layer a flush or compaction wrote here is, once uploaded, a cache
    entry like a fetched one: evicted under the budget, and fetched back on
    its next read (it used to be unreadable once evicted)."""
    objects = LocalObjectStore(str(tmp_path / "remote"))
    s = Store.open(str(tmp_path / "a"), config=SMALL, background=False,
                   remote=remote(objects, cache_bytes=1, in_use_s=0.0, ranged_reads=False))
    try:
        tl = s.create_timeline()
        model: dict[int, bytes] = {}
        write(tl, model, 80)
        s.compact(tl)
        s.checkpoint()
        r = s._remote
        r.wait_uploaded()
        assert r.evict() > 0
        assert not [x for x in r.local_layers()], "every uploaded layer is evicted under a budget of 1 byte"
        assert {k: tl.get(k) for k in model} == model
        assert r.stats.fetched > 0
    finally:
        s.close()


def test_a_failed_background_download_is_tried_again_after_a_backoff(tmp_path):
    """The fetch thread's download of a layer read in ranges fails once:
    the layer is not left read from the object store for good; the
    download is tried again after a backoff, lands, and reads use it."""
    objects, home, tid, model = restored(tmp_path)
    r = remote(objects)
    real, failed, go, calls = r.fetch_layer, [], threading.Event(), []

    def fails_once(tid, name, path, **kw):
        if threading.current_thread().name.startswith("strata-remote-fetch"):
            calls.append(path)
            if not failed:
                go.wait(20)  # (once the reads are done)
                failed.append(path)
                raise ObjectStoreError("injected: the download failed")
        return real(tid, name, path, **kw)

    r.fetch_layer = fails_once
    s = Store.open(home, config=SMALL, remote=r, background=False)
    try:
        t = s.timeline(tid)
        assert {k: t.get(k) for k in model} == model
        go.set()
        wait_for("every layer downloaded", lambda: all(os.path.exists(ly.path) for ly in t._map.layers))
        wait_for("every layer reopened", lambda: not r._queued)
        assert calls.count(failed[0]) == 2  # (failed, then tried again)
        n = r.stats.ranged_reads
        assert {k: t.get(k) for k in model} == model
        assert r.stats.ranged_reads == n  # (every read here now)
    finally:
        s.close()


def test_close_stops_a_download_between_parts_with_a_few_parts_in_flight(tmp_path, monkeypatch):
    """A download holds at most FETCH_WINDOW parts in flight (never the whole
    layer in memory), and closing the store stops it, without waiting for
    a GET that hangs: the rest is not fetched, and no file or temporary
    is left."""
    import engine.remote as remote_mod

    monkeypatch.setattr(remote_mod, "FETCH_PART", 512)
    objects, home, tid, model = restored(tmp_path, n=200)
    first_part, hung, started = threading.Event(), threading.Event(), []
    mu = threading.Lock()

    class Slow(Faulty):
        def get_range(self, key, start, end):
            if key.startswith("layers/") and threading.current_thread() is not threading.main_thread():
                with mu:
                    started.append((key, start))
                if start == 0:  # (the first part of a download waits: a GET that hangs)
                    first_part.set()
                    hung.wait(30)
            return self.inner.get_range(key, start, end)

    r = remote(Slow(objects))
    s = Store.open(home, config=SMALL, remote=r, background=False)
    t = s.timeline(tid)
    assert {k: t.get(k) for k in model} == model
    big = max(t._map.layers, key=lambda ly: ly.desc.file_size)
    assert big.desc.file_size > 512 * 4 * remote_mod.FETCH_WINDOW
    assert first_part.wait(20)
    time.sleep(0.2)  # (time for a download that fetched every part ahead to show it)
    with mu:
        assert len(started) <= remote_mod.FETCH_WINDOW, started
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(10)
    hung.set()
    assert not closer.is_alive(), "close waited for a GET in flight"
    parts = sum(-(-ly.desc.file_size // 512) for ly in t._map.layers)
    assert len(started) < parts, "the download went on after close"
    leftovers = [f for _, _, fs in os.walk(home) for f in fs if f.endswith(".layer") or f.endswith(".tmp")]
    assert not leftovers


def test_a_download_of_a_deleted_timelines_layer_makes_no_directory(tmp_path):
    """The fetch thread's download of a layer whose timeline is deleted
    while it waits leaves nothing behind: the timeline's directory is not
    made again (it used to be, with the layer file in it)."""
    objects, home, tid, model = restored(tmp_path)
    r = remote(objects)
    s = Store.open(home, config=SMALL, remote=r, background=False)
    try:
        with Pause(Remote, "fetch_layer", thread=f"strata-remote-fetch:{home}", before=True) as p:
            t = s.timeline(tid)
            assert {k: t.get(k) for k in model} == model
            p.reached()
            s.delete_timeline(tid)
        wait_for("the fetch queue drained", lambda: not r._queued)
        assert os.listdir(os.path.join(home, "timelines")) == []
    finally:
        s.close()


def test_eviction_skips_a_layer_whose_reader_waits_for_its_fetch(tmp_path):
    """A reader holds a layer's lock while it waits for the layer's fetch
    lock, which the cache holds while it evicts that layer: the cache must
    not wait for the layer's lock then (both would wait for good)."""
    objects, home, tid, model = restored(tmp_path)
    r = remote(objects, cache_bytes=1, in_use_s=0.0, ranged_reads=False)
    s = Store.open(home, config=SMALL, remote=r, background=False)
    try:
        t = s.timeline(tid)
        ly = t._map.layers[0]
        r.fetch_layer(ly.timeline, ly.desc.name, ly.path)  # (here, so the cache may evict it)
        ly.evict()
        with contextlib.suppress(FileNotFoundError):  # (the remote's own eviction pass may have been first)
            os.remove(ly.path)
        reader = threading.Thread(target=lambda: ly.keys, name="reader")
        evictor = threading.Thread(target=r.evict, name="evictor")
        with Pause(Remote, "fetch_layer", thread="reader", before=True) as reads:
            reader.start()
            reads.reached()  # (the reader holds the layer's lock, its file missing)
            r.fetch_layer(ly.timeline, ly.desc.name, ly.path)  # (another read brought it meanwhile)
            evictor.start()  # (it takes the layer's fetch lock, to evict it)
            evictor.join(2)
        # (the reader goes on: it waits for the fetch lock, holding the layer's lock)
        evictor.join(10)
        reader.join(10)
        assert not evictor.is_alive() and not reader.is_alive(), "the reader and the evictor wait for each other"
        assert {k: t.get(k) for k in model} == model
    finally:
        s.close()
