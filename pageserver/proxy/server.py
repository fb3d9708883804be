"""The PostgreSQL proxy: one loopback port for every branch, waking
suspended ones on connect.

A connection starts with a startup packet (`protocol`: SSLRequest and
GSSENCRequest are answered 'N', a CancelRequest is routed by its key).
The branch is named by its endpoint `DB.BRANCH`, given as
`options=endpoint=DB.BRANCH` (libpq: `?options=endpoint%3DDB.BRANCH` in a
URI), or, for clients that cannot pass options, as the database name
(which then becomes `postgres`). An unknown endpoint gets an ErrorResponse
at once. Otherwise the proxy checks the client's password (SCRAM-SHA-256,
against the verifiers of the branch's credentials: `pageserver.scram`;
the proxy never sees a password), and only then wakes the branch
(connections that arrive while it starts wait for the same start), sends
the startup packet on to the compute's Unix socket without the endpoint,
and relays bytes both ways. The compute trusts its socket, which only the
page server and the front ends can reach, and listens on no TCP port: the
proxy is a database's only door. The proxy reads the compute's
BackendKeyData on the way, so that a CancelRequest, which comes on a new
connection with only the key, reaches the compute that issued it.

Nothing here blocks the event loop: routing and connection counts (calls
to the control plane: RPCs to the page server process, or in this
process) run in a small pool of threads, wakes in a pool of their own, so
that a quick call never waits behind a wake that waits for a start. The control plane ends a branch's connections
(its TTL ran out, it was deleted) with `end_sessions`, from any thread
but the loop's: each session stops relaying the client's bytes, lets the
query in flight finish (or cancels it after a moment), and, when the
stream is between messages (the proxy follows the compute's message
boundaries as it relays them), sends the client a FATAL ErrorResponse with
the reason before it closes. A client still waiting for its wake hears the
reason at once.

Every client may be hostile (`ProxyLimits`): a connection over the
proxy's total, or over its branch's share, is refused with SQLSTATE 53300
(as PostgreSQL's own "too many clients"); the startup packet must come
whole within `startup_timeout` (a slowloris holds a connection that long
and no longer), SSLRequest and GSSENCRequest at most once each, lengths
and protocol as PostgreSQL accepts them; the password exchange must end
within `startup_timeout` too; the compute's authentication must
end (its first ReadyForQuery) within `auth_timeout`. While the proxy is
full, a few connections at a time still have their startup read, so that
a CancelRequest gets through. One thread wakes a branch however many of
its clients wait. Clients' sockets keep TCP keepalive, so that an idle
peer that vanished without a FIN (a half-open connection) is closed in
about two minutes. Every refusal
is an ErrorResponse naming what was wrong, counted by reason in
`strata_proxy_refused_total`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from pageserver.control.catalog import BranchRecord
from pageserver.control.rpc import RemoteControl
from pageserver.errors import (
    ComputeLimitError,
    ControlPlaneError,
    ServiceNotRunningError,
    UnknownObjectError,
)
from pageserver.proxy.limits import ProxyLimits
from pageserver.proxy.protocol import (
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    CANCEL_REQUEST,
    I32,
    MAX_CANCEL_KEY,
    STARTUP_HEAD,
    Framer,
    ProtocolError,
    auth_message_length,
    authentication,
    error_response,
    parse_params,
    parse_sasl_initial,
    sasl_mechanisms,
    startup_kind,
    startup_packet,
    take_endpoint,
)
from pageserver.scram import MECHANISM, ScramError, ScramServer

if TYPE_CHECKING:
    from pageserver.control.plane import ControlPlane

log = logging.getLogger("strata.proxy")

ENDING_GRACE = 1.0  # seconds a query in flight may finish before an ending session cancels it
ENDING_LIMIT = 3.0  # ... and before it is closed without a message
WAKE_THREADS = 64  # wakes wait in threads of their own (for a start, or behind a branch lock)
CALL_THREADS = 8  # resolve and connection counts
KEEPALIVE = (60, 10, 6)  # idle seconds, interval, probes: a vanished idle peer is closed after 2 minutes
OVER_CAP = 64  # connections over the cap whose startup is read (a cancel among them goes through)
OVER_CAP_WAIT = 2.0  # ... for at most this long
BACKLOG = 4096  # accepts waiting: a burst of connections is not dropped (clients would retry after 1 s)


class ProxyMetrics:
    REASONS = ("proxy_full", "branch_full", "startup_timeout", "auth_timeout", "protocol", "unknown_branch",
               "unavailable", "compute_limit", "auth_failed", "wrong_role")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.refused = Counter("strata_proxy_refused", "Client connections the proxy refused or closed, by reason",
                               ["reason"], registry=self.registry)
        for r in self.REASONS:
            self.refused.labels(r)
        self.connections = Gauge("strata_proxy_connections", "Client connections open at the proxy",
                                 registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


class _Session:
    """A client of a branch, from the moment it named its branch (only the
    event loop touches it)."""

    def __init__(self, branch_id: int, reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter) -> None:
        self.branch_id = branch_id
        self.reader = reader  # the client's (read only by the relay, then by the last word)
        self.writer = writer
        self.tasks: list[asyncio.Task[None]] = []  # once relaying: [compute -> client, client -> compute]
        self.framer = Framer()
        self.idle = asyncio.Event()  # set when the compute waits for the client
        self.key: bytes | None = None  # BackendKeyData, to cancel its query
        self.address: tuple[str, int] = ("", 0)
        self.ending: str | None = None
        self.started = False  # the compute's first ReadyForQuery relayed (authentication done)
        self.farewell: asyncio.Task[None] | None = None  # telling the client why, after the compute is gone
        self.said = asyncio.Event()  # the last word said, and the client's side closed

    @property
    def between(self) -> bool:
        return self.framer.between


class Proxy:
    def __init__(self, control: ControlPlane | RemoteControl, host: str = "127.0.0.1", port: int = 0, *,
                 limits: ProxyLimits | None = None, registry: CollectorRegistry | None = None) -> None:
        self.control = control
        self.host = host
        self.port = port
        self.limits = limits or ProxyLimits()
        self.metrics = ProxyMetrics(registry)
        self._open = 0  # client connections (only the loop touches it)
        self._over = 0  # ... over the cap, having their startup read (OVER_CAP at most)
        self._waking: dict[int, asyncio.Future[tuple[str, int]]] = {}  # branch id -> its wake in a thread
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel_keys: dict[bytes, tuple[str, int]] = {}  # pid+key -> compute address
        self._conns: set[asyncio.Task[Any]] = set()
        self._sessions: dict[int, set[_Session]] = {}  # branch id -> its sessions
        self._wakes = concurrent.futures.ThreadPoolExecutor(WAKE_THREADS, thread_name_prefix="strata-wake")
        # the quick calls (resolve, connection counts) apart: never queued behind wakes that wait
        self._calls = concurrent.futures.ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="strata-proxy-call")
        control.session_enders.append(self.end_sessions)

    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  backlog=min(BACKLOG, self.limits.max_connections + OVER_CAP))
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
        message = error_response("57P01", f"strata proxy: {why}; this connection is closed")
        if not s.tasks:  # not relaying yet (waking, connecting): nothing of the compute's sent
            await _last_word(s, message)
            return
        down, up = s.tasks
        up.cancel()  # no new query from the client
        await asyncio.gather(up, return_exceptions=True)  # (the last word reads the client after it)
        if s.started and not s.idle.is_set():  # a query in flight: let it finish, or cancel it
            if not await _quiet(s, down, ENDING_GRACE) and s.key is not None:
                await self._cancel(s.key)  # then the compute answers, and is between messages again
                await _quiet(s, down, ENDING_LIMIT - ENDING_GRACE)
        down.cancel()  # the compute is out of it from here: it may stop
        if s.between:  # then the client is told, when it next asks (see _last_word)
            s.farewell = asyncio.create_task(_last_word(s, message, answer=s.started and s.idle.is_set()))
        else:
            s.farewell = asyncio.create_task(_last_word(s, None))

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
        self._wakes.shutdown(wait=False, cancel_futures=True)
        self._calls.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._open >= self.limits.max_connections:
            await self._over_the_cap(reader, writer)
            return
        self._open += 1
        self.metrics.connections.inc()
        self._conns.add(task)
        try:
            _keepalive(writer)
            await self._session(reader, writer)
        except ProtocolError as e:
            self.metrics.refused.labels("protocol").inc()
            await _refuse(writer, "08P01", f"strata proxy: {e}", reader=reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._open -= 1
            self.metrics.connections.dec()
            self._conns.discard(task)
            writer.close()

    async def _over_the_cap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection while the proxy is full: a few at a time (OVER_CAP)
        have their startup read (briefly), so that a CancelRequest still
        reaches its compute (a full proxy is when runaway queries need
        cancelling) and a client hears 53300 after its SSL negotiation, as
        libpq expects it; beyond those, the refusal comes at once."""
        message = f"strata proxy: too many connections (the proxy takes {self.limits.max_connections} at once)"
        try:
            if self._over >= OVER_CAP:
                self.metrics.refused.labels("proxy_full").inc()
                await _refuse(writer, "53300", message, reader=reader)
                return
            self._over += 1
            try:
                async with asyncio.timeout(min(self.limits.startup_timeout, OVER_CAP_WAIT)):
                    kind, _, body = await self._startup(reader, writer)
                if kind == "cancel":
                    await self._cancel(body)
                    return
                self.metrics.refused.labels("proxy_full").inc()
                await _refuse(writer, "53300", message, reader=reader)
            except (ProtocolError, TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                self.metrics.refused.labels("proxy_full").inc()
            finally:
                self._over -= 1
        finally:
            writer.close()

    async def _startup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[str, int, bytes]:
        """Read up to the startup packet (answering an SSLRequest and a
        GSSENCRequest 'N', each once): (kind, code, body)."""
        asked: set[str] = set()
        while True:
            length, code = STARTUP_HEAD.unpack(await reader.readexactly(8))
            kind = startup_kind(length, code)
            body = await reader.readexactly(length - 8)
            if kind in ("ssl", "gssenc"):
                if kind in asked:
                    raise ProtocolError(f"{'SSLRequest' if kind == 'ssl' else 'GSSENCRequest'} sent twice")
                asked.add(kind)
                writer.write(b"N")
                await writer.drain()
                continue
            return kind, code, body

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.limits.startup_timeout):
                kind, code, body = await self._startup(reader, writer)
        except TimeoutError:
            self.metrics.refused.labels("startup_timeout").inc()
            await _refuse(writer, "08P01", f"strata proxy: no startup packet within "
                          f"{self.limits.startup_timeout:g} s", reader=reader)
            return
        if kind == "cancel":
            await self._cancel(body)
            return
        params = parse_params(body)
        endpoint = take_endpoint(params)
        if endpoint is None:
            self.metrics.refused.labels("unknown_branch").inc()
            await _refuse(writer, "08004", "strata proxy: say which branch: options=endpoint=DB.BRANCH "
                          "(in a URI: ?options=endpoint%3DDB.BRANCH), or DB.BRANCH as the database name")
            return
        loop = asyncio.get_running_loop()
        try:
            br = await loop.run_in_executor(self._calls, self.control.resolve, endpoint)
        except ServiceNotRunningError as e:
            self.metrics.refused.labels("unavailable").inc()
            await _refuse(writer, "08006", f"strata proxy: {e}")
            return
        except ControlPlaneError:
            self.metrics.refused.labels("unknown_branch").inc()
            await _refuse(writer, "3D000", f'strata proxy: no branch with endpoint "{endpoint}"')
            return
        if not await self._authenticate(reader, writer, br, params.get("user", "")):
            return
        limit = br.limits.branch_connections or self.limits.branch_connections  # (its database's, if it chose)
        if len(self._sessions.get(br.id, ())) >= limit:  # (checked and counted below with no await between)
            self.metrics.refused.labels("branch_full").inc()
            await _refuse(writer, "53300", f"strata proxy: too many connections to branch {endpoint} "
                          f"(it takes {limit} at once)", reader=reader)
            return
        s = _Session(br.id, reader, writer)
        self._sessions.setdefault(br.id, set()).add(s)  # from here on, a stop with a reason reaches it
        try:
            await loop.run_in_executor(self._calls, self.control.connection_opened, br)
        except ServiceNotRunningError as e:
            self._forget_session(s)
            self.metrics.refused.labels("unavailable").inc()
            await _refuse(writer, "08006", f"strata proxy: {e}")
            return
        except BaseException:
            self._forget_session(s)
            raise
        try:
            await self._relay(s, br, endpoint, params, code, reader)
            if s.ending is not None:  # the last word takes its time: the caller must not close under it
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ENDING_LIMIT + FAREWELL_WAIT + 2):
                        await s.said.wait()
        finally:
            self._forget_session(s)
            try:
                await loop.run_in_executor(self._calls, self.control.connection_closed, br)
            except ServiceNotRunningError:
                pass  # the page server went: it forgets this front end's connections itself

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, br: BranchRecord,
                            user: str) -> bool:
        """Check the client's password against the branch's credentials
        (SCRAM-SHA-256), within `startup_timeout`; False (the client told
        why) if it fails."""
        failed = f'password authentication failed for user "{user}"'
        try:
            async with asyncio.timeout(self.limits.startup_timeout):
                creds = br.live_credentials(time.time())
                scram = ScramServer([c.verifier for c in creds])
                writer.write(sasl_mechanisms(MECHANISM))
                await writer.drain()
                mechanism, first = parse_sasl_initial(await _auth_message(reader))
                if mechanism != MECHANISM:
                    raise ProtocolError(f"SASL mechanism {mechanism!r} is not offered (only {MECHANISM})")
                writer.write(authentication(AUTH_SASL_CONTINUE, scram.first(first)))
                await writer.drain()
                final = scram.final(await _auth_message(reader))
                role = creds[scram.matched].role if scram.matched is not None else None
                if role is not None and role != user:  # (a read-only credential: pageserver.control.catalog)
                    self.metrics.refused.labels("wrong_role").inc()
                    await _refuse(writer, "28000", f'strata proxy: this password opens the branch only as role '
                                  f'"{role}", not "{user}"', reader=reader)
                    return False
                writer.write(authentication(AUTH_SASL_FINAL, final))  # (the compute's AuthenticationOk follows)
                return True
        except TimeoutError:
            self.metrics.refused.labels("startup_timeout").inc()
            await _refuse(writer, "08P01", f"strata proxy: the password exchange did not end within "
                          f"{self.limits.startup_timeout:g} s", reader=reader)
        except ScramError as e:
            self.metrics.refused.labels("auth_failed").inc()
            why = failed if str(e) == "password authentication failed" else f"{failed}: {e}"
            await _refuse(writer, "28P01", why, reader=reader)
        return False

    def _forget_session(self, s: _Session) -> None:
        mine = self._sessions.get(s.branch_id)
        if mine is not None:
            mine.discard(s)
            if not mine:
                del self._sessions[s.branch_id]

    async def _relay(self, s: _Session, br: BranchRecord, endpoint: str, params: dict[str, str], code: int,
                     reader: asyncio.StreamReader) -> None:
        writer = s.writer
        try:
            host, port = await asyncio.shield(self._wake(br))
        except ComputeLimitError as e:
            self.metrics.refused.labels("compute_limit").inc()
            await _refuse(writer, "53300", f"strata proxy: {e}")
            return
        except UnknownObjectError:  # deleted while the client connected
            await _refuse(writer, "3D000", f'strata proxy: no branch with endpoint "{endpoint}" (it was deleted)')
            return
        except Exception as e:  # noqa: BLE001 - the client must hear why
            if s.ending is None:
                log.exception("waking %s", endpoint)
                await _refuse(writer, "08006", f"strata proxy: branch {endpoint} could not start: "
                              f"{str(e).splitlines()[0]}")
            return
        if s.ending is not None:
            return  # told the client why already
        try:
            up_reader, up_writer = await _connect(host, port)
        except OSError as e:
            if s.ending is None:
                await _refuse(writer, "08006", f"strata proxy: compute of {endpoint} is gone: {e}")
            return
        s.address = (host, port)
        try:
            up_writer.write(startup_packet(params, code))
            await up_writer.drain()
            if s.ending is not None:
                return
            s.tasks = [asyncio.create_task(self._downstream(up_reader, s)),
                       asyncio.create_task(self._upstream(reader, up_writer, s))]
            await asyncio.wait(s.tasks, return_when=asyncio.FIRST_COMPLETED)
            if s.ending is not None:  # let _end finish what it says to the client
                await asyncio.gather(*s.tasks, return_exceptions=True)
        finally:
            for t in s.tasks:
                t.cancel()
            await asyncio.gather(*s.tasks, return_exceptions=True)
            if s.key is not None:
                self._cancel_keys.pop(s.key, None)
            up_writer.close()

    def _wake(self, br: BranchRecord) -> asyncio.Future[tuple[str, int]]:
        """The branch's wake (route): one thread per branch, however many of
        its clients wait for it, so that one branch's crowd, within its cap,
        cannot take every wake thread from the others."""
        fut = self._waking.get(br.id)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(self._wakes, self.control.route, br)
            self._waking[br.id] = fut

            def done(f: asyncio.Future[tuple[str, int]], b: int = br.id) -> None:
                if self._waking.get(b) is f:
                    del self._waking[b]
                if not f.cancelled():
                    f.exception()  # (retrieved: every waiter may have gone)

            fut.add_done_callback(done)
        return fut

    async def _downstream(self, up: asyncio.StreamReader, s: _Session) -> None:
        """Relay the compute's messages, reading them one by one until the
        first ReadyForQuery (to learn BackendKeyData), then as bytes,
        following their boundaries (`Framer`)."""
        client = s.writer
        framer = s.framer
        try:
            try:
                async with asyncio.timeout(self.limits.auth_timeout):
                    head = await self._authentication(up, s)
            except TimeoutError:  # (between two whole messages: the client can read this one)
                self.metrics.refused.labels("auth_timeout").inc()
                client.write(error_response("08006", f"strata proxy: authentication did not end within "
                                                     f"{self.limits.auth_timeout:g} s"))
                return
            framer.last = head[0]
            s.started = True
            if framer.ready:
                s.idle.set()
            await client.drain()
            while True:
                data = await up.read(65536)
                if not data:
                    break
                client.write(data)
                framer.feed(data)
                if framer.ready:
                    s.idle.set()
                await client.drain()
        except (asyncio.IncompleteReadError, ConnectionError, RuntimeError):  # (RuntimeError: uvloop, closed)
            pass
        finally:
            if s.ending is None:
                with contextlib.suppress(OSError, RuntimeError):
                    client.write_eof()

    async def _authentication(self, up: asyncio.StreamReader, s: _Session) -> bytes:
        """Relay the compute's messages one by one until its first
        ReadyForQuery or ErrorResponse (learning BackendKeyData on the
        way); the header of that last one."""
        client = s.writer
        while True:
            head = await up.readexactly(5)
            (n,) = I32.unpack_from(head, 1)
            if n < 4:
                raise asyncio.IncompleteReadError(head, None)  # no compute sends that: treat it as gone
            body = await up.readexactly(n - 4)
            if head[:1] == b"K" and 8 <= len(body) <= 4 + MAX_CANCEL_KEY:  # pid + key (3.2: up to 256 bytes)
                s.key = body
                self._cancel_keys[body] = s.address
            client.write(head + body)
            if head[:1] in (b"Z", b"E"):
                return head

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
        except (ConnectionError, RuntimeError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                up.write_eof()

    async def _cancel(self, body: bytes) -> None:
        target = self._cancel_keys.get(bytes(body))
        if target is None:
            return  # as PostgreSQL does: no answer either way
        try:
            _, w = await _connect(*target)
            w.write(STARTUP_HEAD.pack(8 + len(body), CANCEL_REQUEST) + body)
            await w.drain()
            w.close()
        except OSError:
            pass


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to a compute: `host` is its socket's directory (as
    libpq takes it), or a TCP host."""
    if host.startswith("/"):
        return await asyncio.open_unix_connection(os.path.join(host, f".s.PGSQL.{port}"))
    return await asyncio.open_connection(host, port)


async def _auth_message(reader: asyncio.StreamReader) -> bytes:
    """The body of the client's next password message ('p')."""
    n = auth_message_length(await reader.readexactly(5))
    return await reader.readexactly(n)


async def _quiet(s: _Session, down: asyncio.Task[None], timeout: float) -> bool:
    """Wait until the compute waits for the client, or is gone from the
    session (its side closed); False if neither came within `timeout`."""
    idle = asyncio.ensure_future(s.idle.wait())
    try:
        done, _ = await asyncio.wait({idle, down}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        idle.cancel()
    return bool(done)


FAREWELL_WAIT = 30.0  # seconds an ended idle client has to ask something, before it is told anyway
_PENDING = 0.02  # how long to take in what a client has already sent, before the close


async def _last_word(s: _Session, message: bytes | None, *, answer: bool = False) -> None:
    """Say `message` (if any) and close, so that the client hears it.

    With `answer` (the client is idle: it asked nothing), the message waits
    for the client's next message and answers it: libpq takes an error that
    comes unasked, in the same read as the answer before it, for a closed
    connection, and loses it. Whatever else the client sent is taken in
    first: unread bytes would make the kernel answer our close with a
    reset, which loses the message too. Then the close follows the message
    at once, as PostgreSQL's own FATAL errors do (libpq waits for it)."""
    w, r = s.writer, s.reader
    try:
        if r is not None:
            if answer and message is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FAREWELL_WAIT):
                        await r.read(65536)  # its next query (or its close)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PENDING):
                    while await r.read(65536):
                        pass
        if message is not None:
            w.write(message)
        await w.drain()
    except (ConnectionError, RuntimeError, OSError):
        pass
    finally:
        w.close()
        s.said.set()


async def _refuse(writer: asyncio.StreamWriter, code: str, message: str, *,
                  reader: asyncio.StreamReader | None = None) -> None:
    """Say why, as a FATAL ErrorResponse. With `reader`, take in for a
    moment what the client sent meanwhile (unread bytes make the kernel
    answer the close with a reset, and the client may lose the message)."""
    try:
        writer.write(error_response(code, message))
        await writer.drain()
        if reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PENDING):
                    while await reader.read(65536):
                        pass
    except (ConnectionError, RuntimeError):  # uvloop: RuntimeError on a transport the client closed
        pass


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive on a client's socket: an idle peer gone without a FIN
    (half-open) is found and closed."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle, interval, probes = KEEPALIVE
    with contextlib.suppress(OSError):  # a client gone already: its transport closed the socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
        # (no TCP_USER_TIMEOUT: it would also cut off a live client that stops reading for a while)


class ProxyThread:
    """The proxy on an event loop of its own thread, for a ControlPlane
    embedded in a synchronous program (the service runs it on its own loop
    instead). Sets the control plane's advertised proxy port."""

    def __init__(self, control: ControlPlane, host: str = "127.0.0.1", port: int = 0, *,
                 limits: ProxyLimits | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="strata-proxy", daemon=True)
        self._thread.start()
        self.proxy = Proxy(control, host, port, limits=limits)
        _, control.proxy_port = asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

