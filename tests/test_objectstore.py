"""The object-store seam: both backends (a local directory, and S3 on a real
SeaweedFS and on moto's server) against one model, their conditional writes under races, the
local one's crash leftovers, bad keys and URLs, and the probe of a server's
conditional-write support."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.errors import InvalidArgumentError
from engine.objectstore import (
    ConditionalWritesUnsupportedError,
    LocalObjectStore,
    Object,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    PreconditionFailedError,
    S3ObjectStore,
    check_key,
    etag_of,
    normalise_etag,
    open_object_store,
    probe_conditional_writes,
)

from .interleave import Pause, finished, run

KEYS = st.sampled_from(["a", "b", "tl/1/index", "tl/1/layer-0001", "tl/2/layer-0001", "lease"])
DATA = st.binary(max_size=300)


class ObjectStoreMachine(RuleBasedStateMachine):
    """Any backend against a dict. `opener(where)` opens the store at
    `where` (a fresh one per run), again on `reopen`."""

    opener: Callable[[str], ObjectStore]
    make_where: Callable[[], str]

    def __init__(self) -> None:
        super().__init__()
        self.where = type(self).make_where()
        self.os = type(self).opener(self.where)
        self.model: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}

    def teardown(self) -> None:
        self.os.delete([x.key for x in self.os.list()])
        if os.path.isabs(self.where):
            import shutil

            shutil.rmtree(os.path.dirname(self.where), ignore_errors=True)

    def _wrote(self, key: str, data: bytes, etag: str) -> None:
        assert etag and etag == normalise_etag(etag)
        self.model[key], self.etags[key] = data, etag

    @rule(key=KEYS, data=DATA)
    def put(self, key, data):
        self._wrote(key, data, self.os.put(key, data))

    @rule(key=KEYS, data=DATA)
    def put_if_absent(self, key, data):
        if key in self.model:
            with pytest.raises(PreconditionFailedError):
                self.os.put_if_absent(key, data + b"!")  # (not its bytes: those would count as its own win)
        else:
            self._wrote(key, data, self.os.put_if_absent(key, data))

    @rule(key=KEYS, data=DATA, stale=st.booleans())
    def put_if_match(self, key, data, stale):
        etag = self.etags.get(key, etag_of(b"never"))
        if stale:
            etag = etag_of(self.model.get(key, b"") + b"x")
        if key in self.model and not stale:
            self._wrote(key, data, self.os.put_if_match(key, data, f'"{etag}"'))  # (quoted, as S3 sends it)
        else:
            with pytest.raises(PreconditionFailedError):
                self.os.put_if_match(key, self.model.get(key, b"") + b"?", etag)

    @rule(keys=st.lists(KEYS, max_size=4))
    def delete(self, keys):
        self.os.delete(keys)
        for k in keys:
            self.model.pop(k, None)

    @rule(key=KEYS, start=st.integers(0, 400), n=st.integers(0, 400))
    def get_range(self, key, start, n):
        if key in self.model:
            assert self.os.get_range(key, start, start + n) == self.model[key][start:start + n]
        else:
            with pytest.raises(ObjectNotFoundError):
                self.os.get_range(key, start, start + n)

    @rule()
    def reopen(self):
        self.os = type(self).opener(self.where)

    @invariant()
    def same(self):
        assert [(x.key, x.size) for x in self.os.list()] == sorted((k, len(v)) for k, v in self.model.items())
        assert [x.key for x in self.os.list("tl/1")] == sorted(k for k in self.model if k.startswith("tl/1/"))
        for k, v in self.model.items():
            got = self.os.get(k)
            assert (got.data, got.etag) == (v, self.etags[k])


class LocalMachine(ObjectStoreMachine):
    opener = staticmethod(lambda where: LocalObjectStore(where, create=True))
    make_where = staticmethod(lambda: os.path.join(tempfile.mkdtemp(prefix="objstore-model-"), "store"))


LocalMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_local_object_store_against_a_model = LocalMachine.TestCase


def test_s3_object_store_against_the_same_model(s3server):
    class S3Machine(ObjectStoreMachine):
        opener = staticmethod(lambda url: open_object_store(url, env=s3server.env()))
        make_where = staticmethod(s3server.url)

    S3Machine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
    S3Machine.TestCase().runTest()


def test_two_conditional_writes_of_one_etag_one_wins(tmp_path):
    """A lease taken with If-Match: the second writer, arriving between the
    first's check and its write, must wait for it, and then lose."""
    store = LocalObjectStore(str(tmp_path / "s"))
    etag = store.put("lease", b"generation 1")
    outcome: dict[str, object] = {}

    def take(name: str, body: bytes) -> None:
        try:
            outcome[name] = LocalObjectStore(store.root).put_if_match("lease", body, etag)
        except PreconditionFailedError as e:
            outcome[name] = e

    with Pause(LocalObjectStore, "_etag_at", thread="first") as p:
        first, _ = run(lambda: take("first", b"generation 2 (first)"), "first")
        p.reached()  # the first has checked the ETag, and not yet written
        second, _ = run(lambda: take("second", b"generation 2 (second)"), "second")
        blind, _ = run(lambda: store.put("lease", b"overwritten"), "blind")
        time.sleep(0.3)
        assert "second" not in outcome and blind.is_alive()  # both wait for the first
    assert finished(first, 10) and finished(second, 10) and finished(blind, 10)
    assert outcome["first"] == etag_of(b"generation 2 (first)")
    assert isinstance(outcome["second"], PreconditionFailedError)
    assert store.get("lease").data == b"overwritten"  # (the unconditional put came after)


def test_many_threads_racing_put_if_absent_one_wins(tmp_path):
    store = LocalObjectStore(str(tmp_path / "s"))
    wins: list[int] = []
    errors: list[BaseException] = []
    go = threading.Barrier(8)

    def race(i: int) -> None:
        go.wait()
        try:
            store.put_if_absent("tl/1/index", b"%d" % i)  # (its directories made by all at once)
            wins.append(i)
        except PreconditionFailedError:
            pass
        except BaseException as e:  # noqa: BLE001 - the test's to see
            errors.append(e)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and len(wins) == 1
    assert store.get("tl/1/index").data == b"%d" % wins[0]


def test_leftovers_of_a_crash_are_removed_and_a_foreign_directory_refused(tmp_path):
    root = str(tmp_path / "s")
    store = LocalObjectStore(root)
    store.put("a", b"1")
    with open(os.path.join(root, "tmp", "deadbeef"), "wb") as f:
        f.write(b"half a write")
    LocalObjectStore(root, create=False)
    assert os.listdir(os.path.join(root, "tmp")) == []
    assert store.get("a").data == b"1"
    other = tmp_path / "other"
    other.mkdir()
    (other / "file").write_text("x")
    with pytest.raises(ObjectStoreError, match="not an object store"):
        LocalObjectStore(str(other))
    with pytest.raises(ObjectStoreError, match="not an object store"):
        LocalObjectStore(str(tmp_path / "missing"), create=False)
    with open(os.path.join(root, "STRATA-OBJECTSTORE"), "w") as f:
        f.write("strata-objectstore 99\n")
    with pytest.raises(ObjectStoreError, match="unknown object store version"):
        LocalObjectStore(root)
    assert oct(os.stat(os.path.join(root, "objects")).st_mode & 0o777) == "0o700"


def test_bad_keys_and_ranges_are_refused_naming_them(tmp_path):
    store = LocalObjectStore(str(tmp_path / "s"))
    for key in ["", "/a", "a/", "a//b", "../x", "a/./b", "a b", "x" * 1025, "é"]:
        with pytest.raises(InvalidArgumentError, match="invalid object key"):
            check_key(key)
        with pytest.raises(InvalidArgumentError):
            store.put(key, b"")
    with pytest.raises(InvalidArgumentError, match="invalid range"):
        store.get_range("a", 5, 1)
    store.put("a/b", b"x")
    with pytest.raises(InvalidArgumentError, match="cannot hold an object and keys below it"):
        store.put("a", b"y")
    with pytest.raises(ObjectNotFoundError):
        store.get("a")
    assert normalise_etag('W/"abc"') == "abc" and normalise_etag(' "abc" ') == "abc"


def test_s3_conditional_writes_race_and_a_lost_answer_still_wins(any_s3server):
    """Eight writers of one key with If-None-Match: exactly one wins. A
    writer whose answer was lost, retried and refused by its own success,
    finds its bytes there and has won; a writer with other bytes has not."""
    s3server = any_s3server
    url = s3server.url()
    stores = [open_object_store(url, env=s3server.env()) for _ in range(8)]
    wins: list[int] = []
    go = threading.Barrier(8)

    def race(i: int) -> None:
        go.wait()
        with contextlib.suppress(PreconditionFailedError):
            stores[i].put_if_absent("lease", b"holder %d" % i)
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1 and stores[0].get("lease").data == b"holder %d" % wins[0]
    # the answer to the winner's PUT lost, its retry refused: still a win
    assert stores[wins[0]].put_if_absent("lease", b"holder %d" % wins[0]) == stores[0].get("lease").etag
    with pytest.raises(PreconditionFailedError, match="it exists"):
        stores[0].put_if_absent("lease", b"someone else")
    etag = stores[0].get("lease").etag
    new = stores[1].put_if_match("lease", b"generation 2", etag)
    assert stores[1].put_if_match("lease", b"generation 2", etag) == new  # (its own success again)
    with pytest.raises(PreconditionFailedError, match="ETag"):
        stores[2].put_if_match("lease", b"generation 2 by another", etag)
    stores[0].delete(["lease", "never-there"])
    with pytest.raises(PreconditionFailedError, match="does not exist"):
        stores[0].put_if_match("lease", b"x", etag)


def test_urls_open_the_backend_they_name_and_bad_ones_are_refused(tmp_path, seaweedfs):
    local = open_object_store(f"file://{tmp_path}/remote")
    assert isinstance(local, LocalObjectStore) and local.root == f"{tmp_path}/remote"
    s3 = open_object_store("s3://strata/some/prefix", env=seaweedfs.env())
    assert isinstance(s3, S3ObjectStore) and (s3.bucket, s3.prefix) == ("strata", "some/prefix")
    s3.put("k", b"v")
    assert [x.key for x in s3.list()] == ["k"]
    assert [x.key for x in open_object_store("s3://strata/some", env=seaweedfs.env()).list()] == ["prefix/k"]
    for bad, why in [
        ("/plain/path", "is a URL"), ("file://host/x", "file:///absolute"), ("file://rel", "file:///absolute"),
        ("gs://b/x", "scheme is file or s3"), ("s3://", "s3://bucket"),
        ("s3://AKIA:secret@bucket/x", "never in the URL"), ("s3://b/x?region=eu", "no query"),
        ("s3://b/bad prefix", "invalid object key"),
    ]:
        with pytest.raises(InvalidArgumentError, match=why):
            open_object_store(bad, env=seaweedfs.env())


def test_wrong_credentials_get_a_clear_error_and_no_secret_in_it(seaweedfs):
    env = dict(seaweedfs.env(), AWS_SECRET_ACCESS_KEY="not-the-secret-0123456789")
    store = open_object_store(seaweedfs.url(), env=env)
    with pytest.raises(ObjectStoreError) as e:
        store.put("k", b"v")
    assert "403" in str(e.value) and "not-the-secret" not in str(e.value)
    assert seaweedfs.secret_key not in str(e.value)


def test_the_probe_passes_real_servers_and_fails_one_that_ignores_conditions(tmp_path, any_s3server):
    from .s3servers import CephRGW

    probe_conditional_writes(LocalObjectStore(str(tmp_path / "s")))
    s3 = open_object_store(any_s3server.url(), env=any_s3server.env())
    probe_conditional_writes(s3)
    assert s3.list() == []  # (it cleans up after itself)
    # If-Match as RFC 9110 writes it (quoted), but for Ceph RGW, which matches only the bare ETag
    assert s3.quote_if_match is not isinstance(any_s3server, CephRGW)

    class IgnoresIfNoneMatch(LocalObjectStore):
        def put_if_absent(self, key, data):
            return self.put(key, data)

    class IgnoresIfMatch(LocalObjectStore):
        def put_if_match(self, key, data, etag):
            return self.put(key, data)

    class IgnoresIfMatchOnceAccepted(LocalObjectStore):
        """Honours If-Match until one has matched (as a client switched to a
        form its server ignores would): the stale ETag must be tried after."""

        matched = False

        def put_if_match(self, key, data, etag):
            if self.matched:
                return self.put(key, data)
            out = super().put_if_match(key, data, etag)
            self.matched = True
            return out

    with pytest.raises(ConditionalWritesUnsupportedError, match="ignored If-None-Match"):
        probe_conditional_writes(IgnoresIfNoneMatch(str(tmp_path / "a")))
    with pytest.raises(ConditionalWritesUnsupportedError, match="ignored If-Match"):
        probe_conditional_writes(IgnoresIfMatch(str(tmp_path / "b")))
    with pytest.raises(ConditionalWritesUnsupportedError, match="ignored If-Match"):
        probe_conditional_writes(IgnoresIfMatchOnceAccepted(str(tmp_path / "c")))


def test_if_match_goes_unquoted_to_a_server_that_refuses_it_quoted_and_never_unconditionally(seaweedfs):
    """A server that refuses its own current ETag in quotes (as Ceph RGW
    does) gets it bare from then on, still conditional: a stale ETag is
    refused either way. One that refuses If-Match whatever its form fails
    the probe, naming why."""
    from .s3servers import FaultProxy

    proxy = FaultProxy(seaweedfs.endpoint)
    try:
        env = dict(seaweedfs.env(), AWS_ENDPOINT_URL=proxy.endpoint)
        proxy.refuse_if_match = "quoted"
        s3 = open_object_store(seaweedfs.url(), env=env)
        probe_conditional_writes(s3)
        assert s3.quote_if_match is False
        first = s3.put_if_absent("lease", b"holder 1")
        second = s3.put_if_match("lease", b"holder 2", first)
        with pytest.raises(PreconditionFailedError, match="ETag"):
            s3.put_if_match("lease", b"holder 3", first)  # (stale: refused, bare as it is)
        assert s3.get("lease") == Object(b"holder 2", second)
        proxy.refuse_if_match = "all"
        s3 = open_object_store(seaweedfs.url(), env=env)
        with pytest.raises(ConditionalWritesUnsupportedError, match="refuses If-Match with the object's own ETag"):
            probe_conditional_writes(s3)
    finally:
        proxy.close()
