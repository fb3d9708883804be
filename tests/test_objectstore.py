"""The object-store seam's local backend: against a model, its
conditional writes under a race, its crash leftovers, its bad keys."""

from __future__ import annotations

import os
import threading
import time

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.errors import InvalidArgumentError
from engine.objectstore import (
    LocalObjectStore,
    ObjectNotFoundError,
    ObjectStoreError,
    PreconditionFailedError,
    check_key,
    etag_of,
    normalise_etag,
)

from .interleave import Pause, finished, run

KEYS = st.sampled_from(["a", "b", "tl/1/index", "tl/1/layer-0001", "tl/2/layer-0001", "lease"])
DATA = st.binary(max_size=300)


class ObjectStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="objstore-model-")
        self.os = LocalObjectStore(os.path.join(self.dir, "store"))
        self.model: dict[str, bytes] = {}

    def teardown(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(key=KEYS, data=DATA)
    def put(self, key, data):
        assert self.os.put(key, data) == etag_of(data)
        self.model[key] = data

    @rule(key=KEYS, data=DATA)
    def put_if_absent(self, key, data):
        if key in self.model:
            with pytest.raises(PreconditionFailedError):
                self.os.put_if_absent(key, data)
        else:
            self.os.put_if_absent(key, data)
            self.model[key] = data

    @rule(key=KEYS, data=DATA, stale=st.booleans())
    def put_if_match(self, key, data, stale):
        etag = etag_of(self.model[key]) if key in self.model else etag_of(b"never")
        if stale:
            etag = etag_of(self.model.get(key, b"") + b"x")
        ok = key in self.model and not stale
        if ok:
            self.os.put_if_match(key, data, f'"{etag}"')  # (quoted, as S3 sends it)
            self.model[key] = data
        else:
            with pytest.raises(PreconditionFailedError):
                self.os.put_if_match(key, data, etag)

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
        self.os = LocalObjectStore(self.os.root, create=False)

    @invariant()
    def same(self):
        assert [(x.key, x.size) for x in self.os.list()] == sorted((k, len(v)) for k, v in self.model.items())
        assert [x.key for x in self.os.list("tl/1/")] == sorted(k for k in self.model if k.startswith("tl/1/"))
        for k, v in self.model.items():
            got = self.os.get(k)
            assert (got.data, got.etag) == (v, etag_of(v))


ObjectStoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_local_object_store_against_a_model = ObjectStoreMachine.TestCase


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
