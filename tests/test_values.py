import hypothesis.strategies as st
import pytest
from hypothesis import given

from engine import MAX_VALUE_SIZE, InvalidArgumentError
from engine.values import FLAG_LZ4, FLAG_TOMBSTONE, decode, encode, encode_batch


@given(st.binary(max_size=MAX_VALUE_SIZE) | st.none(), st.integers(0, 2**64 - 1))
def test_encode_decode_roundtrip(value, key):
    v = encode(key, value)
    assert v.key == key
    assert decode(v.flags, v.raw_len, v.stored) == value
    assert bool(v.flags & FLAG_TOMBSTONE) == (value is None)


def test_compressible_pages_are_stored_compressed():
    v = encode(1, b"abcdefgh" * 1024)
    assert v.flags & FLAG_LZ4 and len(v.stored) < 1024
    rnd = encode(2, bytes(range(256)) * 0 + __import__("os").urandom(8192))
    assert not rnd.flags & FLAG_LZ4 and len(rnd.stored) == 8192


@pytest.mark.parametrize(
    "batch, message",
    [
        ({}, "at least one key"),
        ([(1, b"x")], "mapping"),
        ({-1: b"x"}, "outside"),
        ({2**64: b"x"}, "outside"),
        ({"k": b"x"}, "must be an int"),
        ({True: b"x"}, "must be an int"),
        ({1.0: b"x"}, "must be an int"),
        ({1: "text"}, "must be bytes"),
        ({1: 5}, "must be bytes"),
        ({1: b"x" * (MAX_VALUE_SIZE + 1)}, "limit"),
    ],
)
def test_bad_batches_are_refused_with_a_reason(batch, message):
    with pytest.raises(InvalidArgumentError, match=message):
        encode_batch(batch)


def test_a_bad_entry_anywhere_refuses_the_whole_batch():
    with pytest.raises(InvalidArgumentError, match="key 7"):
        encode_batch({1: b"ok", 7: b"x" * (MAX_VALUE_SIZE + 1), 3: b"ok"})


def test_batches_are_sorted_by_key_and_accept_buffers():
    out = encode_batch({5: bytearray(b"b"), 1: memoryview(b"a"), 3: None})
    assert [v.key for v in out] == [1, 3, 5]
    assert decode(out[0].flags, out[0].raw_len, out[0].stored) == b"a"


_any_key = st.integers(-2, 2**64 + 1) | st.booleans() | st.text(max_size=2)
_any_value = (st.binary(max_size=200) | st.none() | st.integers(0, 3)
              | st.binary(max_size=20).map(bytearray) | st.just(b"x" * (MAX_VALUE_SIZE + 1)))


def _reference_encode_batch(batch):
    """encode_batch as plainly as it can be written: every check, every key."""
    from collections.abc import Mapping

    from engine.values import MAX_BATCH, _sort_key, check_key

    if not isinstance(batch, Mapping):
        raise InvalidArgumentError(f"a commit takes a mapping {{key: bytes | None}}, got {type(batch).__name__}")
    if not batch:
        raise InvalidArgumentError("a commit needs at least one key")
    if len(batch) > MAX_BATCH:
        raise InvalidArgumentError(f"a commit holds at most {MAX_BATCH} keys, got {len(batch)}")
    out = []
    for key in sorted(batch, key=_sort_key):
        check_key(key)
        value = batch[key]
        if value is not None:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise InvalidArgumentError(f"value for key {key} must be bytes or None, got {type(value).__name__}")
            value = bytes(value)
            if len(value) > MAX_VALUE_SIZE:
                raise InvalidArgumentError(f"value for key {key} is {len(value)} bytes; the limit is {MAX_VALUE_SIZE}")
        out.append(encode(key, value))
    return out


@given(st.dictionaries(_any_key, _any_value, max_size=6))
def test_encode_batch_encodes_or_refuses_exactly_as_the_plain_reference(batch):
    """encode_batch checks cheaply for the common case (int keys, bytes
    values); whatever it is given, it must agree with the plain reference."""
    try:
        expected = _reference_encode_batch(batch)
    except InvalidArgumentError as e:
        with pytest.raises(InvalidArgumentError) as got:
            encode_batch(batch)
        assert str(got.value) == str(e)
    else:
        assert encode_batch(batch) == expected
