"""The proxy follows message boundaries in the stream it relays (so that it
can end a session with an ErrorResponse of its own between two messages,
never inside one): against streams of real backend messages cut at
arbitrary points."""

from __future__ import annotations

import struct

import hypothesis.strategies as st
from hypothesis import given

from pageserver.proxy.protocol import Framer

# message types a backend sends; bodies chosen to look like headers too
# (a DataRow holding 'Z' 00 00 00 05 fooled a check of the last bytes)
TYPES = st.sampled_from(b"DCTZEKSNAZ")
BODIES = st.one_of(st.binary(max_size=40), st.just(b"Z\0\0\0\x05I"), st.binary(min_size=70000, max_size=70010))


def message(typ: int, body: bytes) -> bytes:
    return bytes([typ]) + struct.pack("!i", len(body) + 4) + body


@given(st.lists(st.tuples(TYPES, BODIES), min_size=1, max_size=12), st.data())
def test_the_framer_knows_every_boundary_wherever_the_stream_is_cut(messages, data):
    stream = b"".join(message(t, b) for t, b in messages)
    ends, pos = {}, 0  # offset where a message ends -> its type
    for t, b in messages:
        pos += 5 + len(b)
        ends[pos] = t
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream)), max_size=8)) + [len(stream)]))
    f, start = Framer(), 0
    for cut in cuts:
        f.feed(stream[start:cut])
        start = cut
        assert f.between == (cut in ends), (cut, sorted(ends))
        assert f.ready == (cut in ends and ends[cut] == ord("Z"))


def test_a_length_no_backend_sends_is_never_between():
    f = Framer()
    f.feed(b"D\0\0\0\x02")
    assert not f.between and not f.ready
