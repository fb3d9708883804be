"""The PostgreSQL proxy: one loopback port for every branch, waking
suspended ones on connect.

A connection starts with a startup packet (PostgreSQL protocol 3.0,
"Message Formats"):

    Int32 length | Int32 code | body
    code 80877103  SSLRequest      -> answer 'N' (no TLS on loopback), read again
    code 80877104  GSSENCRequest   -> answer 'N', read again
    code 80877102  CancelRequest   body: Int32 pid, Int32 secret key
    code 196608    StartupMessage  body: (name \\0 value \\0)* \\0

The branch is named by its endpoint `DB.BRANCH`, given as
`options=endpoint=DB.BRANCH` (libpq: `?options=endpoint%3DDB.BRANCH` in a
URI), or, for clients that cannot pass options, as the database name
(which then becomes `postgres`). An unknown endpoint gets an ErrorResponse
at once. Otherwise the proxy wakes the branch (connections that arrive
while it starts wait for the same start), sends the startup packet on to
the compute without the endpoint, and relays bytes both ways. It reads the
compute's BackendKeyData on the way, so that a CancelRequest, which comes
on a new connection with only the key, reaches the compute that issued it.
Authentication is the compute's own (SCRAM with the database's password).

Nothing here blocks the event loop: routing reads the control plane's
immutable catalog snapshot, connection counts take one short lock, and a
wake runs in a thread. The control plane ends a branch's connections
(its TTL ran out, it was deleted) with `end_sessions`, from any thread
but the loop's: each session stops relaying the client's bytes, lets the
query in flight finish (or cancels it after a moment), and, when the
stream is between messages (the compute's last bytes were a
ReadyForQuery), sends the client a FATAL ErrorResponse with the reason
before it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
from typing import Any

from .catalog import BranchRecord
from .control import ControlPlane
from .errors import ComputeLimitError, ControlPlaneError, UnknownObjectError

log = logging.getLogger("strata.proxy")

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST, PROTOCOL_3 = 80877103, 80877104, 80877102, 196608
MAX_STARTUP = 10_000  # PostgreSQL's own limit on a startup packet
_I32 = struct.Struct("!i")
_HEAD = struct.Struct("!ii")


class ProtocolError(Exception):
    pass


def parse_params(body: bytes) -> dict[str, str]:
    parts = body.split(b"\0")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolError("startup parameters are not NUL-terminated")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolError("a startup parameter has no value")
    return {items[i].decode(): items[i + 1].decode() for i in range(0, len(items), 2)}


def startup_packet(params: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return _HEAD.pack(8 + len(body), PROTOCOL_3) + body


def error_response(code: str, message: str, severity: str = "FATAL") -> bytes:
    fields = b"".join(t + v.encode() + b"\0" for t, v in ((b"S", severity), (b"V", severity),
                                                         (b"C", code), (b"M", message)))
    body = fields + b"\0"
    return b"E" + _I32.pack(4 + len(body)) + body


def take_endpoint(params: dict[str, str]) -> str | None:
    """The endpoint named in `options` (removed from it), else in the
    database name (which becomes `postgres`)."""
    options = params.get("options", "")
    kept, endpoint = [], None
    for token in options.split():
        for prefix in ("endpoint=", "--endpoint="):
            if token.startswith(prefix):
                endpoint = token[len(prefix):]
                break
        else:
            kept.append(token)
    if endpoint is not None:
        if kept:
            params["options"] = " ".join(kept)
        else:
            params.pop("options", None)
        return endpoint
    db = params.get("database", "")
    if "." in db:
        params["database"] = "postgres"
        return db
    return None


ENDING_GRACE = 1.0  # seconds a query in flight may finish before an ending session cancels it
ENDING_LIMIT = 5.0  # ... and before it is closed without a message


def ends_between_messages(data: bytes) -> bool:
    """Do these relayed bytes end with a ReadyForQuery ('Z', length 5, a
    status byte), so that the next byte starts a message?"""
    return len(data) >= 6 and data[-6] == 0x5A and data[-5:-1] == b"\0\0\0\x05"


class _Session:
    """A client relayed to a compute (only the event loop touches it)."""

    def __init__(self, branch_id: int, writer: asyncio.StreamWriter) -> None:
        self.branch_id = branch_id
        self.writer = writer
        self.tasks: list[asyncio.Task[None]] = []  # [compute -> client, client -> compute]
        self.between = True  # the client's stream is between two messages
        self.idle = asyncio.Event()  # set when it is, with nothing asked of the compute
        self.key: bytes | None = None  # BackendKeyData, to cancel its query
        self.port = 0
        self.ending: str | None = None


class Proxy:
    def __init__(self, control: ControlPlane, host: str = "127.0.0.1", port: int = 0) -> None:
        self.control = control
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel_keys: dict[bytes, tuple[str, int]] = {}  # pid+key -> compute address
        self._conns: set[asyncio.Task[Any]] = set()
        self._sessions: dict[int, set[_Session]] = {}  # branch id -> its relayed sessions
        control.session_enders.append(self.end_sessions)

    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("proxy listening on %s:%d", self.host, self.port)
        return self.host, self.port

    def end_sessions(self, branch_ids: list[int], why: str, timeout: float = ENDING_LIMIT + 5) -> int:
        """End the connections of these branches, telling each client
        `why`. Called from a thread other than the loop's; returns how
        many it ended."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return 0
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("end_sessions would wait for its own event loop: call it from another thread")
        fut = asyncio.run_coroutine_threadsafe(self._end_all(branch_ids, why), loop)
        return fut.result(timeout)

    async def _end_all(self, branch_ids: list[int], why: str) -> int:
        sessions = [s for b in branch_ids for s in self._sessions.get(b, ())]
        await asyncio.gather(*(self._end(s, why) for s in sessions), return_exceptions=True)
        return len(sessions)

    async def _end(self, s: _Session, why: str) -> None:
        if s.ending is not None:
            return
        s.ending = why
        down, up = (s.tasks + [None, None])[:2]
        if up is not None:
            up.cancel()  # no new query from the client
        if not s.idle.is_set():
            try:
                await asyncio.wait_for(s.idle.wait(), ENDING_GRACE)
            except TimeoutError:
                if s.key is not None:
                    await self._cancel(s.key)  # then the compute answers, and is between messages again
                try:
                    await asyncio.wait_for(s.idle.wait(), ENDING_LIMIT - ENDING_GRACE)
                except TimeoutError:
                    pass
        if down is not None:
            down.cancel()
        try:  # in one step with the cancel: the relay writes nothing in between
            if s.between:
                s.writer.write(error_response("57P01", f"strata proxy: {why}; this connection is closed"))
                await s.writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            s.writer.close()

    async def stop(self) -> None:
        if self.end_sessions in self.control.session_enders:
            self.control.session_enders.remove(self.end_sessions)
        if self._server is not None:
            self._server.close()
            conns = list(self._conns)
            for t in conns:
                t.cancel()
            await asyncio.gather(*conns, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._session(reader, writer)
        except (ProtocolError, UnicodeDecodeError) as e:
            await _refuse(writer, "08P01", f"strata proxy: {e}")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            length, code = _HEAD.unpack(await reader.readexactly(8))
            if not 8 <= length <= MAX_STARTUP:
                raise ProtocolError(f"invalid startup packet length {length}")
            body = await reader.readexactly(length - 8)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            if code == CANCEL_REQUEST:
                await self._cancel(body)
                return
            if code != PROTOCOL_3:
                raise ProtocolError(f"unsupported protocol {code >> 16}.{code & 0xFFFF}")
            break
        params = parse_params(body)
        endpoint = take_endpoint(params)
        if endpoint is None:
            await _refuse(writer, "08004", "strata proxy: say which branch: options=endpoint=DB.BRANCH "
                          "(in a URI: ?options=endpoint%3DDB.BRANCH), or DB.BRANCH as the database name")
            return
        try:
            br = self.control.resolve(endpoint)
        except ControlPlaneError:
            await _refuse(writer, "3D000", f'strata proxy: no branch with endpoint "{endpoint}"')
            return
        self.control.connection_opened(br)
        try:
            await self._relay(br, endpoint, params, reader, writer)
        finally:
            self.control.connection_closed(br)

    async def _relay(self, br: BranchRecord, endpoint: str, params: dict[str, str],
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            compute = await asyncio.to_thread(self.control.wake, br)
        except ComputeLimitError as e:
            await _refuse(writer, "53300", f"strata proxy: {e}")
            return
        except UnknownObjectError:  # deleted while the client connected
            await _refuse(writer, "3D000", f'strata proxy: no branch with endpoint "{endpoint}" (it was deleted)')
            return
        except Exception as e:  # noqa: BLE001 - the client must hear why
            log.exception("waking %s", endpoint)
            await _refuse(writer, "08006", f"strata proxy: branch {endpoint} could not start: "
                          f"{str(e).splitlines()[0]}")
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", compute.port)
        except OSError as e:
            await _refuse(writer, "08006", f"strata proxy: compute of {endpoint} is gone: {e}")
            return
        s = _Session(br.id, writer)
        s.port = compute.port
        self._sessions.setdefault(br.id, set()).add(s)
        try:
            up_writer.write(startup_packet(params))
            await up_writer.drain()
            s.tasks = [asyncio.create_task(self._downstream(up_reader, s)),
                       asyncio.create_task(self._upstream(reader, up_writer, s))]
            await asyncio.wait(s.tasks, return_when=asyncio.FIRST_COMPLETED)
            if s.ending is not None:  # let _end finish what it says to the client
                await asyncio.gather(*s.tasks, return_exceptions=True)
                await _closed(writer)
        finally:
            for t in s.tasks:
                t.cancel()
            await asyncio.gather(*s.tasks, return_exceptions=True)
            if s.key is not None:
                self._cancel_keys.pop(s.key, None)
            mine = self._sessions.get(br.id)
            if mine is not None:
                mine.discard(s)
                if not mine:
                    del self._sessions[br.id]
            up_writer.close()

    async def _downstream(self, up: asyncio.StreamReader, s: _Session) -> None:
        """Relay the compute's messages, reading them one by one until the
        first ReadyForQuery (to learn BackendKeyData), then as bytes,
        noting whether the client's stream is between messages."""
        client = s.writer
        try:
            while True:
                head = await up.readexactly(5)
                (n,) = _I32.unpack_from(head, 1)
                body = await up.readexactly(n - 4)
                if head[:1] == b"K" and len(body) == 8:
                    s.key = body
                    self._cancel_keys[body] = ("127.0.0.1", s.port)
                client.write(head + body)
                if head[:1] in (b"Z", b"E"):
                    break
            s.idle.set()
            await client.drain()
            while True:
                data = await up.read(65536)
                if not data:
                    break
                client.write(data)
                s.between = ends_between_messages(data)
                if s.between:
                    s.idle.set()
                await client.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if s.ending is None:
                with contextlib.suppress(OSError, RuntimeError):
                    client.write_eof()

    async def _upstream(self, client: asyncio.StreamReader, up: asyncio.StreamWriter, s: _Session) -> None:
        """Relay the client's bytes; anything it sends asks something of the
        compute (until its next ReadyForQuery)."""
        try:
            while True:
                data = await client.read(65536)
                if not data:
                    break
                s.idle.clear()
                up.write(data)
                await up.drain()
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                up.write_eof()

    async def _cancel(self, body: bytes) -> None:
        target = self._cancel_keys.get(bytes(body[:8]))
        if target is None:
            return  # as PostgreSQL does: no answer either way
        try:
            _, w = await asyncio.open_connection(*target)
            w.write(_HEAD.pack(16, CANCEL_REQUEST) + body[:8])
            await w.drain()
            w.close()
        except OSError:
            pass


async def _closed(writer: asyncio.StreamWriter, timeout: float = ENDING_LIMIT + 2) -> None:
    """Wait until `_end` has closed this writer (it writes the reason first)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not writer.is_closing() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


async def _refuse(writer: asyncio.StreamWriter, code: str, message: str) -> None:
    try:
        writer.write(error_response(code, message))
        await writer.drain()
    except ConnectionError:
        pass


class ProxyThread:
    """The proxy on an event loop of its own thread, for a ControlPlane
    embedded in a synchronous program (the service runs it on its own loop
    instead). Sets the control plane's advertised proxy port."""

    def __init__(self, control: ControlPlane, host: str = "127.0.0.1", port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="strata-proxy", daemon=True)
        self._thread.start()
        self.proxy = Proxy(control, host, port)
        _, control.proxy_port = asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

