"""The proxy against hostile clients, without root or PostgreSQL: the real
proxy over a stand-in control plane and a stand-in compute that speaks
just enough of the backend protocol (AuthenticationOk, BackendKeyData,
ReadyForQuery; a Query gets CommandComplete).

Whatever a client sends, it gets an ErrorResponse or a close, never a
crash or a hang; a slowloris does not keep other clients waiting; the
caps refuse with 53300; a vanished peer is found by keepalive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from pageserver.control.catalog import BranchRecord, Credential
from pageserver.errors import BadRequestError, UnknownObjectError
from pageserver.proxy.protocol import (
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    MAX_STARTUP,
    PROTOCOL_3,
    SSL_REQUEST,
    ProtocolError,
    parse_params,
    startup_kind,
    startup_packet,
)
from pageserver.proxy.server import Proxy, ProxyLimits
from pageserver.scram import make_verifier, new_salt

from .test_scram import scram_client

STARTUP_TIMEOUT = 0.2
PASSWORD = "hostile-harness-pw"
SALT = new_salt()


class FakeCompute:
    """A backend on a loopback port: answers a startup packet (or, with
    `silent`, never does) and each Query; records the protocol codes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, silent: bool = False) -> None:
        self.silent = silent
        self.codes: list[int] = []
        self.keys = 0
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), loop).result(10)
        self.address = self.server.sockets[0].getsockname()[:2]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            n, code = struct.unpack("!ii", await r.readexactly(8))
            await r.readexactly(n - 8)
            self.codes.append(code)
            if self.silent:
                await r.read()
                return
            self.keys += 1  # each connection its own, as a postmaster gives them
            w.write(msg(b"R", struct.pack("!i", 0)) + msg(b"K", struct.pack("!ii", 4242, self.keys))
                    + msg(b"Z", b"I"))
            while True:
                t = await r.readexactly(1)
                (n,) = struct.unpack("!i", await r.readexactly(4))
                if n < 4:
                    break  # (what a client sent after its startup: PostgreSQL would close too)
                await r.readexactly(n - 4)
                if t == b"X":
                    break
                w.write(msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


class FakeControl:
    """The proxy's side of the control plane: endpoints `db.a`, `db.b`
    (the latter on a compute that never answers)."""

    def __init__(self, routes: dict[str, tuple[str, int]], slow: float = 0.0) -> None:
        self.session_enders: list = []
        self.slow = slow  # how long a wake of db.slow takes
        self.routed: list[str] = []
        self.routes = routes
        cred = Credential(make_verifier(PASSWORD, SALT), created_at=0.0)
        self.records = {ep: BranchRecord(id=i + 1, database=1, name=ep.split(".")[1], timeline=f"t{i}",
                                         created_at=0.0, salt=SALT, credentials=(cred,))
                        for i, ep in enumerate(routes)}
        self.by_id = {r.id: ep for ep, r in self.records.items()}
        self.open = 0
        self.mu = threading.Lock()

    def resolve(self, endpoint: str) -> BranchRecord:
        if endpoint not in self.records:
            raise UnknownObjectError("branch", endpoint)
        return self.records[endpoint]

    def connection_opened(self, br: BranchRecord) -> None:
        with self.mu:
            self.open += 1

    def connection_closed(self, br: BranchRecord) -> None:
        with self.mu:
            self.open -= 1

    def route(self, br: BranchRecord) -> tuple[str, int]:
        ep = self.by_id[br.id]
        self.routed.append(ep)
        if ep == "db.slow":
            time.sleep(self.slow)
        return self.routes[ep]


class Harness:
    """The proxy and its stand-ins on a loop of their own; `close` fails
    if anything logged a warning or worse (a crash in a handler)."""

    def __init__(self, limits: ProxyLimits, slow: float = 0.0) -> None:
        self.complaints = Complaints()
        for name in ("asyncio", "strata.proxy"):
            logging.getLogger(name).addHandler(self.complaints)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.compute = FakeCompute(self.loop)
        self.silent = FakeCompute(self.loop, silent=True)
        self.control = FakeControl({"db.a": self.compute.address, "db.b": self.silent.address,
                                    "db.c": self.compute.address, "db.slow": self.compute.address}, slow)
        self.proxy = Proxy(self.control, limits=limits)  # type: ignore[arg-type]
        _, self.port = asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)

    def refused(self, reason: str) -> float:
        return self.proxy.metrics.refused.labels(reason)._value.get()

    def open_connections(self) -> int:
        return asyncio.run_coroutine_threadsafe(_value(lambda: self.proxy._open), self.loop).result(10)

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(30)
            for c in (self.compute, self.silent):
                c.server.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
        finally:
            for name in ("asyncio", "strata.proxy"):
                logging.getLogger(name).removeHandler(self.complaints)
        assert not self.complaints.texts(), "the proxy complained (a crash in a handler?)"


async def _value(f):  # noqa: ANN001, ANN202 - read on the loop's thread
    return f()


def msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


class Complaints(logging.Handler):
    """Every warning or worse that the proxy or asyncio logs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> list[str]:
        fmt = logging.Formatter()
        return [fmt.format(r) for r in self.records]


@pytest.fixture(scope="module")
def proxy() -> Iterator[Harness]:
    h = Harness(ProxyLimits(max_connections=800, branch_connections=600, startup_timeout=STARTUP_TIMEOUT,
                            auth_timeout=1.0))
    try:
        yield h
        wait_for(lambda: not h.open_connections() and not h.control.open)
    finally:
        h.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, bool]:
    """Everything the proxy sends, and whether it closed within `limit` s."""
    out = b""
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out, False
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except TimeoutError:
            return out, False
        except ConnectionResetError:
            return out, True
        if not data:
            return out, True
        out += data


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """Backend messages, strictly: AssertionError on a malformed one."""
    out, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= 5, f"a truncated message: {data[pos:]!r}"
        (n,) = struct.unpack_from("!i", data, pos + 1)
        assert n >= 4 and pos + 1 + n <= len(data), f"a message of bad length: {data[pos:]!r}"
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + n]))
        pos += 1 + n
    return out


def error_fields(body: bytes) -> dict[str, str]:
    assert body.endswith(b"\0\0"), body
    return {f[:1].decode(): f[1:].decode() for f in body[:-2].split(b"\0")}


def last_word(s: socket.socket, limit: float = 5) -> dict[str, str]:
    """The one ErrorResponse the proxy says before it closes (its fields)."""
    got, closed = read_until_closed(s, limit)
    assert closed, f"the proxy kept the connection open after {got!r}"
    [(t, body)] = messages(got)
    assert t == b"E", (t, body)
    return error_fields(body)


AUTH_OK = msg(b"R", struct.pack("!i", 0))


def read_message(s: socket.socket) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 5:
        more = s.recv(5 - len(head))
        assert more, f"closed after {head!r}"
        head += more
    (n,) = struct.unpack("!i", head[1:])
    body = b""
    while len(body) < n - 4:
        more = s.recv(n - 4 - len(body))
        assert more, f"closed in a message {head!r}"
        body += more
    return head[:1], body


def login(s: socket.socket, endpoint: str, password: str = PASSWORD, code: int = PROTOCOL_3) -> bytes:
    """Startup for `endpoint` and the SCRAM-SHA-256 exchange, as libpq does
    it: the compute's first message after it (AuthenticationOk), or the
    proxy's ErrorResponse, whole."""
    s.sendall(startup_packet({"user": "postgres", "database": endpoint}, code))
    t, body = read_message(s)
    if t == b"E":
        return t + struct.pack("!i", len(body) + 4) + body
    assert t == b"R" and body[:4] == struct.pack("!i", 10) and b"SCRAM-SHA-256" in body, (t, body)
    client = scram_client(password)
    first = client.get_client_first().encode()
    s.sendall(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
    t, body = read_message(s)
    if t == b"E":
        return t + struct.pack("!i", len(body) + 4) + body
    assert t == b"R" and body[:4] == struct.pack("!i", 11), (t, body)
    client.set_server_first(body[4:].decode())
    s.sendall(msg(b"p", client.get_client_final().encode()))
    t, body = read_message(s)
    if t == b"R" and body[:4] == struct.pack("!i", 12):
        client.set_server_final(body[4:].decode())  # (checks the proxy's signature)
        t, body = read_message(s)
    return t + struct.pack("!i", len(body) + 4) + body


def last_word_after(s: socket.socket, said: bytes) -> bool:
    """Whether `said` was one ErrorResponse and the proxy then closed."""
    [(t, _)] = messages(said)
    rest, closed = read_until_closed(s, 5)
    return t == b"E" and closed and not rest


def query(s: socket.socket) -> bytes:
    """A whole session: startup for db.a, one Query, Terminate."""
    assert login(s, "db.a") == AUTH_OK
    got = b""
    while got.count(b"Z\0\0\0\x05I") < 1:
        got += s.recv(65536)
    s.sendall(msg(b"Q", b"select 1\0"))
    while got.count(b"Z\0\0\0\x05I") < 2:
        got += s.recv(65536)
    s.sendall(msg(b"X", b""))
    return got


def assert_answered_sanely(data: bytes, closed: bool, *, startup_ok: bool = False) -> None:
    """'N' answers, then at most an ErrorResponse (or the compute's
    greeting, for a startup packet that names a real branch), and a close."""
    rest = data.lstrip(b"N")
    if startup_ok and rest.startswith(b"R"):
        return
    assert closed, f"the proxy kept the connection open after {data!r}"
    if rest:
        ms = messages(rest)
        assert len(ms) == 1 and ms[0][0] == b"E", ms
        fields = error_fields(ms[0][1])
        assert fields["S"] == "FATAL" and fields["C"][:2] in ("08", "53", "3D", "28"), fields


HEADERS = st.one_of(
    st.integers(-2**31, 2**31 - 1),
    st.sampled_from([0, 4, 7, 8, 9, 16, 44, 268, 269, MAX_STARTUP, MAX_STARTUP + 1, 2**31 - 1]),
)
CODES = st.one_of(st.integers(-2**31, 2**31 - 1),
                  st.sampled_from([SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST, PROTOCOL_3, PROTOCOL_3 + 2,
                                   2 << 16, 4 << 16]))
PARAMS = st.dictionaries(st.sampled_from(["user", "database", "options", "application_name", "x"]),
                         st.sampled_from(["postgres", "db.a", "db.zz", "endpoint=db.a", "", "\u00e9"]),
                         max_size=4)


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["garbage", "header", "ssl", "startup", "truncated"]))
        if kind == "garbage":
            parts.append(draw(st.binary(max_size=64)))
        elif kind == "header":
            parts.append(struct.pack("!ii", draw(HEADERS), draw(CODES)) + draw(st.binary(max_size=32)))
        elif kind == "ssl":
            parts.append(struct.pack("!ii", 8, draw(st.sampled_from([SSL_REQUEST, GSSENC_REQUEST]))))
        elif kind == "startup":
            body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in draw(PARAMS).items()) + b"\0"
            body = body[:draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
            parts.append(struct.pack("!ii", 8 + len(body) + draw(st.sampled_from([0, 0, 1, -1, 100])),
                                     draw(st.sampled_from([PROTOCOL_3, PROTOCOL_3 + 2]))) + body)
        else:
            p = startup_packet({"user": "postgres", "database": "db.a"})
            parts.append(p[:draw(st.integers(0, len(p) - 1))])
    return b"".join(parts)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=hostile_bytes(), half_close=st.booleans())
def test_hostile_startup_bytes_get_an_error_or_a_close(proxy, data, half_close):
    with connect(proxy.port) as s:
        with contextlib.suppress(ConnectionError):
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        got, closed = read_until_closed(s, STARTUP_TIMEOUT + 3)
    assert_answered_sanely(got, closed, startup_ok=True)


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=200))
def test_startup_parameters_are_parsed_or_refused_with_a_protocol_error(body):
    try:
        params = parse_params(body)
    except ProtocolError:
        return
    assert startup_packet(params)[8:] == body or len(set(params)) < body.count(b"\0") // 2


@settings(max_examples=500)
@given(length=HEADERS, code=CODES)
def test_a_startup_header_is_known_or_refused_with_a_protocol_error(length, code):
    try:
        kind = startup_kind(length, code)
    except ProtocolError:
        assert not 8 <= length <= MAX_STARTUP or code >> 16 != 3 or code in (SSL_REQUEST, GSSENC_REQUEST,
                                                                            CANCEL_REQUEST)
        return
    assert 8 <= length <= MAX_STARTUP
    assert length == {"ssl": 8, "gssenc": 8}.get(kind, length)
    assert kind != "cancel" or 16 <= length <= 12 + 256  # protocol 3.2's keys are up to 256 bytes
    assert kind == {SSL_REQUEST: "ssl", GSSENC_REQUEST: "gssenc", CANCEL_REQUEST: "cancel"}.get(code, "startup")


def test_a_good_client_is_served(proxy):
    with connect(proxy.port) as s:
        got = query(s)
    assert b"C\0\0\0\x0dSELECT 1\0" in got


def test_a_second_ssl_request_is_an_error(proxy):
    ssl = struct.pack("!ii", 8, SSL_REQUEST)
    with connect(proxy.port) as s:
        s.sendall(ssl)
        assert s.recv(1) == b"N"
        s.sendall(ssl)
        fields = last_word(s)
    assert "SSLRequest sent twice" in fields["M"]


def test_a_client_that_sends_nothing_is_closed_after_the_startup_timeout(proxy):
    before = proxy.refused("startup_timeout")
    with connect(proxy.port) as s:
        t0 = time.monotonic()
        s.sendall(b"\0\0")  # half a header, then nothing
        fields = last_word(s, STARTUP_TIMEOUT + 5)
        took = time.monotonic() - t0
    assert STARTUP_TIMEOUT - 0.1 < took < STARTUP_TIMEOUT + 2
    assert fields["C"] == "08P01" and "no startup packet" in fields["M"]
    assert proxy.refused("startup_timeout") == before + 1


def test_a_compute_that_never_finishes_authentication_is_given_up(proxy):
    before = proxy.refused("auth_timeout")
    with connect(proxy.port) as s:
        said = login(s, "db.b")
        fields = error_fields(messages(said)[0][1])
        assert last_word_after(s, said)
    assert fields["C"] == "08006" and "authentication did not end" in fields["M"]
    assert proxy.refused("auth_timeout") == before + 1


def test_the_protocol_version_a_client_asks_for_reaches_the_compute(proxy):
    with connect(proxy.port) as s:
        assert login(s, "db.c", code=PROTOCOL_3 + 2) == AUTH_OK
        s.sendall(msg(b"X", b""))
    assert proxy.compute.codes[-1] == PROTOCOL_3 + 2


def test_a_slowloris_of_500_does_not_keep_a_client_waiting():
    h = Harness(ProxyLimits(startup_timeout=5.0))
    loris = []
    t_loris = time.perf_counter()
    try:
        for i in range(500):
            s = connect(h.port)
            if i % 2:
                s.sendall(struct.pack("!i", 100))  # a length, and then nothing
            loris.append(s)
        wait_for(lambda: h.open_connections() == 500)
        print(f"\n500 loris connected in {time.perf_counter() - t_loris:.2f} s")
        took = []
        for _ in range(20):
            t0 = time.perf_counter()
            with connect(h.port) as s:
                got = query(s)
            took.append(time.perf_counter() - t0)
            assert b"SELECT 1" in got
        print(f"a client meanwhile: connect and query p50 {statistics.median(took) * 1e3:.1f} ms, "
              f"max {max(took) * 1e3:.1f} ms")
        assert max(took) < 1.0, took
        assert h.open_connections() >= 500  # they were all still there
        deadline = time.monotonic() + 5.0 + 10
        for s in loris:  # each is closed once its startup time is up
            _, closed = read_until_closed(s, max(0.01, deadline - time.monotonic()))
            assert closed
        assert h.refused("startup_timeout") == 500
    finally:
        for s in loris:
            s.close()
        h.close()


def test_the_caps_refuse_with_53300_and_spare_other_branches():
    h = Harness(ProxyLimits(max_connections=6, branch_connections=3, startup_timeout=5))
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            s = connect(h.port)
            assert login(s, "db.a") == AUTH_OK
            held.append(s)
        with connect(h.port) as s:  # a fourth on db.a
            said = login(s, "db.a")
            fields = error_fields(messages(said)[0][1])
            assert last_word_after(s, said)
        assert fields["C"] == "53300" and "branch db.a" in fields["M"], fields
        assert h.refused("branch_full") == 1
        with connect(h.port) as s:  # another branch is still served
            assert login(s, "db.c") == AUTH_OK
            s.sendall(msg(b"X", b""))
        wait_for(lambda: h.open_connections() == 3)  # that one gone
        for _ in range(3):
            held.append(connect(h.port))  # silent: they count against the total
        wait_for(lambda: h.open_connections() == 6)
        with connect(h.port) as s:  # as libpq asks: SSL first; the refusal comes after it
            s.sendall(struct.pack("!ii", 8, SSL_REQUEST))
            assert s.recv(1) == b"N"
            said = login(s, "db.c")
            fields = error_fields(messages(said)[0][1])
            assert last_word_after(s, said)
        assert fields["C"] == "53300" and "takes 6 at once" in fields["M"], fields
        assert h.refused("proxy_full") == 1
        cancels = h.compute.codes.count(CANCEL_REQUEST)
        with connect(h.port) as s:  # a cancel still gets through a full proxy
            s.sendall(struct.pack("!iiii", 16, CANCEL_REQUEST, 4242, 1))  # the first db.a session's key
            read_until_closed(s, 5)
        wait_for(lambda: h.compute.codes.count(CANCEL_REQUEST) == cancels + 1)
    finally:
        for s in held:
            s.close()
        h.close()


def test_client_sockets_keep_alive_so_a_vanished_peer_is_closed(proxy):
    with connect(proxy.port) as s:
        assert login(s, "db.a") == AUTH_OK
        mine = s.getsockname()
        theirs = None
        deadline = time.monotonic() + 5
        while theirs is None and time.monotonic() < deadline:
            theirs = _socket_with_peer(mine)  # the proxy's end, in this process
        assert theirs is not None
        with theirs:
            assert theirs.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
            # no user timeout: a live client that stops reading a while is not cut off
            assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        s.sendall(msg(b"X", b""))


def wait_for(cond, timeout: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _socket_with_peer(peer: tuple[str, int]) -> socket.socket | None:
    import os

    for fd in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM and s.getpeername() == peer:
                return s
        except OSError:
            pass
        s.close()
    return None


def test_bad_limits_are_refused_naming_the_limit():
    with pytest.raises(BadRequestError, match="branch_connections"):
        ProxyLimits(branch_connections=0)
    with pytest.raises(BadRequestError, match="startup_timeout"):
        ProxyLimits(startup_timeout=-1)


def test_clients_that_reset_at_once_crash_no_handler(proxy):
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        s.close()
    with connect(proxy.port) as s:  # and the proxy still serves
        assert b"SELECT 1" in query(s)
    # (the module's fixture fails the run if a handler logged a crash)


def test_libpq_s_negotiation_gss_then_ssl_then_startup_is_served(proxy):
    with connect(proxy.port) as s:
        s.sendall(struct.pack("!ii", 8, GSSENC_REQUEST))
        assert s.recv(1) == b"N"
        s.sendall(struct.pack("!ii", 8, SSL_REQUEST))
        assert s.recv(1) == b"N"
        assert login(s, "db.a") == AUTH_OK
        s.sendall(msg(b"X", b""))


def test_one_wake_per_branch_however_many_clients_wait():
    h = Harness(ProxyLimits(), slow=1.0)
    try:
        def client(_: int) -> bytes:
            with connect(h.port) as s:
                got = login(s, "db.slow")
                s.sendall(msg(b"X", b""))
                return got

        with ThreadPoolExecutor(20) as ex:
            slow = [ex.submit(client, i) for i in range(20)]
            time.sleep(0.3)  # all waiting for the wake
            with connect(h.port) as s:
                t0 = time.monotonic()
                assert b"SELECT 1" in query(s)  # another branch is not held up
                assert time.monotonic() - t0 < 0.9
            assert all(f.result() == AUTH_OK for f in slow)
        assert h.control.routed.count("db.slow") == 1, h.control.routed
    finally:
        h.close()


def test_a_wrong_password_is_refused_with_28p01_before_any_wake(proxy):
    before, routed = proxy.refused("auth_failed"), len(proxy.control.routed)
    with connect(proxy.port) as s:
        said = login(s, "db.a", password="not-" + PASSWORD)
        fields = error_fields(messages(said)[0][1])
        assert last_word_after(s, said)
    assert fields["C"] == "28P01" and fields["M"] == 'password authentication failed for user "postgres"', fields
    assert proxy.refused("auth_failed") == before + 1
    assert len(proxy.control.routed) == routed  # no compute was woken (or even looked up) for it


def test_an_expired_credential_is_refused_and_a_live_one_still_opens(proxy):
    live = proxy.control.records["db.a"]
    old = Credential(make_verifier("expired-pw", SALT), created_at=0.0, expires_at=time.time() - 1)
    proxy.control.records["db.a"] = BranchRecord(**{**live.__dict__, "credentials": (*live.credentials, old)})
    try:
        with connect(proxy.port) as s:
            said = login(s, "db.a", password="expired-pw")
            assert error_fields(messages(said)[0][1])["C"] == "28P01"
        with connect(proxy.port) as s:
            assert b"SELECT 1" in query(s)
    finally:
        proxy.control.records["db.a"] = live


@st.composite
def hostile_sasl(draw: st.DrawFn) -> bytes:
    """What a client might send where its SASLInitialResponse belongs."""
    kind = draw(st.sampled_from(["garbage", "wrong_type", "bad_length", "bad_mechanism", "bad_scram", "huge"]))
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    if kind == "wrong_type":
        return msg(draw(st.sampled_from([b"Q", b"X", b"\0", b"P"])), draw(st.binary(max_size=16)))
    if kind == "bad_length":
        return b"p" + struct.pack("!i", draw(st.sampled_from([-1, 0, 3, 4, 2**31 - 1, 1 << 20])))
    if kind == "bad_mechanism":
        mech = draw(st.sampled_from([b"SCRAM-SHA-256-PLUS", b"PLAIN", b"", b"SCRAM-SHA-256"]))
        data = draw(st.binary(max_size=32))
        return msg(b"p", mech + b"\0" + struct.pack("!i", draw(st.sampled_from([len(data), -1, 999]))) + data)
    if kind == "bad_scram":
        first = draw(st.sampled_from([b"n,,n=,r=", b"p=x,,n=,r=abc", b"n,,r=abc", b"y,,n=,r=a,b", b"n,,n=,r=\x00"]))
        return msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    return msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 5000) + b"a" * 5000)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=hostile_sasl(), half_close=st.booleans())
def test_hostile_password_messages_get_an_error_or_a_close(proxy, data, half_close):
    routed = len(proxy.control.routed)
    with connect(proxy.port) as s:
        s.sendall(startup_packet({"user": "postgres", "database": "db.a"}))
        t, body = read_message(s)
        assert t == b"R" and body[:4] == struct.pack("!i", 10)
        with contextlib.suppress(ConnectionError):
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        got, closed = read_until_closed(s, STARTUP_TIMEOUT + 3)
    assert_answered_sanely(got, closed)
    if got:
        assert error_fields(messages(got)[0][1])["C"] in ("28P01", "08P01"), got
    assert len(proxy.control.routed) == routed  # and no wake


def test_a_client_that_stops_in_the_password_exchange_is_closed_after_the_startup_timeout(proxy):
    before = proxy.refused("startup_timeout")
    with connect(proxy.port) as s:
        s.sendall(startup_packet({"user": "postgres", "database": "db.a"}))
        assert read_message(s)[0] == b"R"
        t0 = time.monotonic()
        fields = last_word(s, STARTUP_TIMEOUT + 5)
        assert time.monotonic() - t0 < STARTUP_TIMEOUT + 2
    assert fields["C"] == "08P01" and "password exchange" in fields["M"], fields
    assert proxy.refused("startup_timeout") == before + 1
