"""Damaged layer files and manifests are detected, named, and contained:
the damaged part fails with an error naming the file; the rest serves."""

from __future__ import annotations

import os

import pytest

from engine import CorruptionError, Store
from engine.layer_file import FOOTER, HEADER, INDEX_ENTRY

from .conftest import page

KEYS = range(40)


def _two_timelines(path: str) -> tuple[str, str]:
    with Store.open(path, background=False) as store:
        a, b = store.create_timeline(), store.create_timeline()
        for tl in (a, b):
            tl.commit({k: page(tl.id, k, 1) for k in KEYS})
        return a.id, b.id


def _layer_of(path: str, tid: str) -> str:
    d = os.path.join(path, "timelines", tid)
    (name,) = [n for n in os.listdir(d) if n.endswith(".layer")]
    return os.path.join(d, name)


def _reads(store: Store, tid: str) -> dict[int, object]:
    out: dict[int, object] = {}
    tl = store.timeline(tid)
    for k in KEYS:
        try:
            out[k] = tl.get(k)
        except CorruptionError as e:
            out[k] = e
    return out


def _write(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x04]))


def _check_b_unaffected(store: Store, b: str) -> None:
    tb = store.timeline(b)
    assert all(tb.get(k) == page(b, k, 1) for k in KEYS)
    tb.commit({1000: b"still serving"}, durable=True)


def test_flipped_bit_in_a_value_fails_only_that_page(store_path):
    a, b = _two_timelines(store_path)
    layer = _layer_of(store_path, a)
    _flip(layer, HEADER.size + 100)  # inside the first stored value
    with Store.open(store_path, background=False) as store:
        got = _reads(store, a)
        bad = {k: v for k, v in got.items() if isinstance(v, CorruptionError)}
        assert len(bad) == 1
        err = next(iter(bad.values()))
        assert err.path == layer and err.offset == HEADER.size and "checksum" in str(err)
        assert all(got[k] == page(a, k, 1) for k in KEYS if k not in bad)
        _check_b_unaffected(store, b)


def _section_offsets(layer: str) -> dict[str, int]:
    data = open(layer, "rb").read()
    fo = FOOTER.unpack_from(data, len(data) - FOOTER.size)
    index_off, n, _, blen = fo[0], fo[1], fo[2], fo[3]
    return {
        "header": 20,
        "index": index_off + INDEX_ENTRY.size * (n // 2),
        "bitmap": index_off + n * INDEX_ENTRY.size + blen // 2,
        "footer": len(data) - FOOTER.size + 8,
        "magic": len(data) - 4,
    }


@pytest.mark.parametrize("section", ["header", "index", "bitmap", "footer", "magic"])
@pytest.mark.parametrize("damage", ["flip", "zero"])
def test_damaged_layer_structures_are_named(store_path, section, damage):
    a, b = _two_timelines(store_path)
    layer = _layer_of(store_path, a)
    off = _section_offsets(layer)[section]
    if damage == "flip":
        _flip(layer, off)
    else:
        _write(layer, off, bytes(8))
    with Store.open(store_path, background=False) as store:
        got = _reads(store, a)
        errors = [v for v in got.values() if isinstance(v, CorruptionError)]
        assert errors, f"damage to the {section} went unnoticed"
        assert all(e.path == layer for e in errors)
        assert all(v == page(a, k, 1) for k, v in got.items() if not isinstance(v, CorruptionError))
        _check_b_unaffected(store, b)


@pytest.mark.parametrize("keep", [0, 10, HEADER.size + 500, -FOOTER.size, -1])
def test_truncated_layer_file_is_named(store_path, keep):
    a, b = _two_timelines(store_path)
    layer = _layer_of(store_path, a)
    size = os.path.getsize(layer)
    os.truncate(layer, keep if keep >= 0 else size + keep)
    with Store.open(store_path, background=False) as store:
        with pytest.raises(CorruptionError) as e:
            store.timeline(a).get(3)
        assert e.value.path == layer and "size" in str(e.value)
        _check_b_unaffected(store, b)


def test_missing_layer_file_is_named(store_path):
    a, b = _two_timelines(store_path)
    layer = _layer_of(store_path, a)
    os.remove(layer)
    with Store.open(store_path, background=False) as store:
        with pytest.raises(CorruptionError, match="missing") as e:
            store.timeline(a).get(3)
        assert e.value.path == layer
        _check_b_unaffected(store, b)


def test_damaged_manifest_entry_breaks_only_its_timeline(store_path):
    a, b = _two_timelines(store_path)
    mpath = os.path.join(store_path, "manifest")
    data = open(mpath, "rb").read()
    # the entry of `a` starts with its id; damage a byte after it
    at = data.rindex(bytes.fromhex(a)) + 40
    _flip(mpath, at)
    with Store.open(store_path, background=False) as store:
        with pytest.raises(CorruptionError) as e:
            store.timeline(a)
        assert e.value.path == mpath
        assert list(store.damaged()) == [a]
        _check_b_unaffected(store, b)


@pytest.mark.parametrize("offset", [0, 30, 70])
def test_damaged_manifest_header_or_table_refuses_to_open(store_path, offset):
    _two_timelines(store_path)
    mpath = os.path.join(store_path, "manifest")
    _flip(mpath, offset)
    with pytest.raises(CorruptionError) as e:
        Store.open(store_path, background=False)
    assert e.value.path == mpath


def test_truncated_manifest_refuses_to_open(store_path):
    _two_timelines(store_path)
    mpath = os.path.join(store_path, "manifest")
    os.truncate(mpath, os.path.getsize(mpath) - 10)
    with pytest.raises(CorruptionError) as e:
        Store.open(store_path, background=False)
    assert e.value.path == mpath


def test_missing_manifest_of_a_store_with_data_refuses_to_open(store_path):
    _two_timelines(store_path)
    os.remove(os.path.join(store_path, "manifest"))
    with pytest.raises(CorruptionError, match="manifest missing"):
        Store.open(store_path, background=False)


def test_damaged_timeline_can_be_deleted(store_path):
    a, b = _two_timelines(store_path)
    layer = _layer_of(store_path, a)
    _flip(layer, 20)
    with Store.open(store_path, background=False) as store:
        with pytest.raises(CorruptionError):
            store.timeline(a).get(1)
        store.delete_timeline(a)
        assert store.timeline_ids() == [b]
    assert not os.path.exists(os.path.dirname(layer))
