"""The page server's local RPC: how the front-end process reaches the
control plane across a process (and privilege) boundary.

Transport: a Unix stream socket in the service's run directory. Its file
is mode 0660 with the front-end user's group, and the server checks each
peer's uid (SO_PEERCRED) against the ones it was told to trust: no other
local user gets as far as the first frame. Every frame is

    +--------------------+------------------------------------------+
    | u32 length (BE)    | JSON object, UTF-8 (length bytes, <= 64 MiB) |
    +--------------------+------------------------------------------+

    hello    first frame, client to server:
             {"hello": CLIENT_ID, "version": 1, "subscribe": false|true}
             answered {"id": 0, "ok": {"version": 1, "pid": PID}}
    request  {"id": N, "call": NAME, "args": [...], "kwargs": {...}}
    reply    {"id": N, "ok": VALUE}
             {"id": N, "error": {"type": ERROR_CLASS, "message": TEXT}}
    push     on a subscribed connection, server to client, answered by a
             reply with the same id: {"id": N, "call": "end_sessions",
             "args": [[BRANCH_ID, ...], WHY]}

A value is JSON, or one of a fixed set of dataclasses (the control plane's
records and snapshots) as {"$": TYPE, FIELD: VALUE, ...}; nothing else is
decoded (no pickle: the peer is less trusted than this process). An error
comes back as the same `StrataError` subclass with the same message, so
the HTTP API maps it to the same status as in one process. Only the names
in `CALLS` can be called. The protocol is local to one machine and one
version of Strata: `version` guards against a front end and a page server
of different checkouts.

Each front-end process has a client id and one subscription. Its proxy
connections are counted on the subscription itself (connection_opened and
connection_closed frames, answered, in order), never on a call connection:
a count can then only belong to a subscription that is there, and when the
subscription ends (the front end stopped or died) the page server closes
exactly what it counted, so that a dead front end holds no branch awake.
The front end keeps its own counts too, and announces them in the hello
of every new subscription (after a page server restart, or a reconnect),
under the same lock that orders the counts it sends: none is lost or
counted twice.

Concurrency: the server runs a thread per connection (calls on one
connection are serial; a client opens more for concurrency). `_mu` guards
`_subscribers` and `_live`; a subscription's counts are touched only by
its own thread; its `send_mu` orders the frames written to it, and
`pending` holds the pushes waiting for their replies. A client keeps idle
connections in a list under its `_mu` and takes one per call, so calls
from many threads run at once; `_acct_mu` guards its counts, `_sub` and
`_pending`, and is taken before `_sub_send_mu`, which orders what it
writes to the subscription.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import engine.errors as engine_errors
import pageserver.errors as ps_errors
from engine import StrataError
from pageserver.control.catalog import BranchRecord, Credential
from pageserver.control.limits import Limits
from pageserver.control.objects import BranchInfo, DatabaseInfo
from pageserver.errors import ServiceNotRunningError

log = logging.getLogger("strata.rpc")

VERSION = 1
MAX_FRAME = 64 << 20
_LEN = struct.Struct("!I")
assert _LEN.size == 4
PUSH_TIMEOUT = 15.0  # seconds the page server waits for a front end to end a branch's sessions

# what the front ends may call: the control plane's public API, and the proxy's hooks
CALLS = frozenset({
    "create_database", "database", "databases", "delete_database", "update_database", "claim_database",
    "create_branch", "branch", "branches", "update_branch", "delete_branch",
    "reset_branch", "restore_branch", "detach_branch", "suspend", "start", "lsn", "diff", "merge",
    "database_for_token", "resolve", "route", "status", "metrics_text", "check", "uri", "endpoint",
})  # (connection_opened and connection_closed go on the subscription: see RpcServer._subscribed)
SLOW_CALLS = frozenset({"route", "start", "create_database", "create_branch", "check", "delete_database",
                        "update_database", "delete_branch", "reset_branch", "restore_branch", "detach_branch", "suspend",
                        "diff", "merge", "claim_database", "uri"})  # (a read-only password wakes its branch)
CALL_TIMEOUT, SLOW_CALL_TIMEOUT = 60.0, 900.0  # seconds before a call is given up (the page server hangs)
SUBSCRIBE_WAIT = 10.0  # seconds a connection count waits for the subscription (after a page server restart)

_TYPES: dict[str, type] = {t.__name__: t for t in (BranchInfo, DatabaseInfo, BranchRecord, Credential, Limits)}


def _errors() -> dict[str, type[StrataError]]:
    found: dict[str, type[StrataError]] = {}
    for module in (engine_errors, ps_errors):
        for v in vars(module).values():
            if isinstance(v, type) and issubclass(v, StrataError):
                found[v.__name__] = v
    return found


_ERRORS = _errors()


class RpcProtocolError(ps_errors.PageServerError):
    """A frame that breaks the protocol (from a peer of another version, or a bug)."""


_ERRORS[RpcProtocolError.__name__] = RpcProtocolError


def encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _TYPES.get(name) is not type(value):
            raise RpcProtocolError(f"a {name} cannot cross the RPC")
        return {"$": name, **{f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "$" in value:
            cls = _TYPES.get(value["$"])
            if cls is None:
                raise RpcProtocolError(f"unknown type {value['$']!r} in a frame")
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: decode(v) for k, v in value.items() if k in names})
        return {k: decode(v) for k, v in value.items()}
    return value


def error_of(e: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
    retry_after = getattr(e, "retry_after", None)
    if isinstance(retry_after, int | float):
        out["retry_after"] = retry_after
    return out


def raise_error(err: dict[str, Any]) -> None:
    """Raise what the other side raised: the same class, the same message."""
    cls = _ERRORS.get(str(err.get("type")))
    message = str(err.get("message", ""))
    if cls is None:
        raise ps_errors.PageServerError(f"page server: {err.get('type')}: {message}")
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    if isinstance(err.get("retry_after"), int | float):
        e.retry_after = err["retry_after"]  # type: ignore[attr-defined]
    raise e


def send(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise RpcProtocolError(f"a frame of {len(data)} bytes is over the limit of {MAX_FRAME}")
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionResetError("the peer closed in the middle of a frame")
        got += k
    return bytes(buf)


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame, or None if the peer closed between frames."""
    head = _recv_exactly(sock, 4)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise RpcProtocolError(f"a frame of {n} bytes is over the limit of {MAX_FRAME}")
    body = _recv_exactly(sock, n)
    if body is None:
        raise ConnectionResetError("the peer closed in the middle of a frame")
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise RpcProtocolError(f"a frame is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise RpcProtocolError("a frame is not a JSON object")
    return obj


# --- the server (in the page server process) ------------------------------------------------------


class _Subscriber:
    def __init__(self, client: str, sock: socket.socket) -> None:
        self.client = client
        self.sock = sock
        self.send_mu = threading.Lock()
        self.pending: dict[int, Future[Any]] = {}
        self.ids = itertools.count(1)
        # only its own thread touches these: the connections counted through it
        self.opened: Counter[int] = Counter()
        self.records: dict[int, BranchRecord] = {}


class RpcServer:
    """Serves `target`'s methods named in CALLS on a Unix socket. `target`
    is the control plane; its `session_enders` gets one ender that asks
    every subscribed front end."""

    def __init__(self, target: Any, path: str, *, trusted_uids: set[int], group: int | None = None) -> None:
        self.target = target
        self.path = path
        self.trusted = set(trusted_uids) | {0, os.geteuid()}
        self._mu = threading.Lock()
        self._subscribers: dict[str, list[_Subscriber]] = {}  # client -> its subscriptions (one, but
        # for a moment while a reconnect replaces an old one)
        self._live: set[socket.socket] = set()  # every connection being served (closed by close())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server._handle(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        old = os.umask(0o117)
        try:
            self._server = Server(path, Handler)
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, 0o660)
        self._thread: threading.Thread | None = None
        target.session_enders.append(self.end_sessions)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="strata-rpc", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.target.session_enders.remove(self.end_sessions)
        self._server.shutdown()
        self._server.server_close()
        with self._mu:
            live = list(self._live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _handle(self, sock: socket.socket) -> None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in self.trusted:
            log.warning("refused an RPC connection from uid %d (pid %d)", uid, pid)
            return
        with self._mu:
            self._live.add(sock)
        try:
            hello = recv(sock)
            if hello is None:
                return
            if hello.get("version") != VERSION or not isinstance(hello.get("hello"), str):
                send(sock, {"id": 0, "error": error_of(RpcProtocolError(
                    f"this page server speaks RPC version {VERSION}, the client {hello.get('version')!r}"))})
                return
            client = hello["hello"]
            send(sock, {"id": 0, "ok": {"version": VERSION, "pid": os.getpid()}})
            if hello.get("subscribe"):
                self._subscribed(client, sock, hello)
            else:
                self._calls(client, sock)
        except (OSError, RpcProtocolError) as e:
            log.debug("RPC connection ended: %s", e)
        finally:
            with self._mu:
                self._live.discard(sock)

    def _calls(self, client: str, sock: socket.socket) -> None:
        while True:
            req = recv(sock)
            if req is None:
                return
            rid, name = req.get("id"), req.get("call")
            try:
                if name not in CALLS:
                    raise RpcProtocolError(f"no RPC call named {name!r}")
                args = decode(req.get("args") or [])
                kwargs = decode(req.get("kwargs") or {})
                result = self._call(client, str(name), args, kwargs)
                reply = {"id": rid, "ok": encode(result)}
            except StrataError as e:
                reply = {"id": rid, "error": error_of(e)}
            except Exception as e:  # noqa: BLE001 - the caller hears it; this process goes on
                log.exception("RPC call %s", name)
                reply = {"id": rid, "error": {"type": "PageServerError", "message": f"{type(e).__name__}: {e}"}}
            send(sock, reply)

    def _call(self, client: str, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return getattr(self.target, name)(*args, **kwargs)

    def _subscribed(self, client: str, sock: socket.socket, hello: dict[str, Any]) -> None:
        """A front end's subscription: the page server's pushes go out on
        it, and the front end's connection counts come in on it, in order.
        The hello brings the counts the front end has open (after a
        reconnect, or a page server restart); when the subscription ends,
        whatever it still counts is closed."""
        sub = _Subscriber(client, sock)
        for n, record in (decode(hello.get("open")) or {}).values():
            if isinstance(record, BranchRecord):
                for _ in range(int(n)):
                    self._opened_by(sub, record)
        with self._mu:
            self._subscribers.setdefault(client, []).append(sub)
        try:
            while True:
                frame = recv(sock)
                if frame is None:
                    return
                name = frame.get("call")
                if name in ("connection_opened", "connection_closed"):
                    args = decode(frame.get("args") or [])
                    br = args[0] if args and isinstance(args[0], BranchRecord) else None
                    if br is None:
                        raise RpcProtocolError(f"{name} needs a branch record")
                    if name == "connection_opened":
                        self._opened_by(sub, br)
                    elif sub.opened[br.id] > 0:
                        sub.opened[br.id] -= 1
                        if not sub.opened[br.id]:
                            del sub.opened[br.id]
                            sub.records.pop(br.id, None)
                        self.target.connection_closed(br)
                    with sub.send_mu:
                        send(sock, {"id": frame.get("id"), "ok": None})
                    continue
                try:
                    fut = sub.pending.pop(int(frame.get("id", -1)), None)
                except (TypeError, ValueError):
                    raise RpcProtocolError(f"a reply with id {frame.get('id')!r}") from None
                if fut is not None:
                    if "error" in frame:
                        fut.set_exception(ps_errors.PageServerError(str(frame["error"].get("message"))))
                    else:
                        fut.set_result(frame.get("ok"))
        finally:
            for fut in list(sub.pending.values()):
                fut.set_result(0)
            with self._mu:
                subs = self._subscribers.get(client, [])
                if sub in subs:
                    subs.remove(sub)
                if not subs:
                    self._subscribers.pop(client, None)
            self._forget(sub)

    def _opened_by(self, sub: _Subscriber, br: BranchRecord) -> None:
        self.target.connection_opened(br)
        sub.opened[br.id] += 1
        sub.records[br.id] = br

    def _forget(self, sub: _Subscriber) -> None:
        """A subscription ended (its front end stopped or died): close what it counted."""
        n = 0
        for bid, k in sub.opened.items():
            for _ in range(k):
                self.target.connection_closed(sub.records[bid])
                n += 1
        sub.opened.clear()
        if n:
            log.info("front end %s went with %d connections open: closed them", sub.client[:8], n)

    def end_sessions(self, branch_ids: list[int], why: str) -> int:
        """The control plane's ender: ask every front end, wait for each."""
        with self._mu:
            subs = [sub for mine in self._subscribers.values() for sub in mine[-1:]]
        futures = []
        for sub in subs:
            fut: Future[Any] = Future()
            rid = next(sub.ids)
            sub.pending[rid] = fut
            try:
                with sub.send_mu:
                    send(sub.sock, {"id": rid, "call": "end_sessions", "args": [list(branch_ids), why]})
            except OSError:
                sub.pending.pop(rid, None)
                continue
            futures.append(fut)
        ended = 0
        for fut in futures:
            try:
                ended += int(fut.result(PUSH_TIMEOUT) or 0)
            except Exception:  # noqa: BLE001 - stopping the compute ends the sessions anyway
                log.warning("a front end did not end the sessions of branches %s in time", branch_ids)
        return ended


@contextlib.contextmanager
def _closed_on_error(s: socket.socket, what: str) -> Iterator[None]:
    """Close `s` if the block fails; an OSError becomes ServiceNotRunningError("what: ...")."""
    try:
        yield
    except OSError as e:
        s.close()
        raise ServiceNotRunningError(f"{what}: {e}") from e
    except BaseException:
        s.close()
        raise


# --- the client (in the front-end process) --------------------------------------------------------


class RemoteControl:
    """The control plane as the front end sees it: the methods in CALLS,
    each an RPC. Thread-safe; `session_enders` is called when the page
    server asks to end a branch's connections (see `subscribe`)."""

    def __init__(self, path: str, *, connect_timeout: float = 5.0) -> None:
        self.path = path
        self.client = uuid.uuid4().hex
        self.connect_timeout = connect_timeout
        self.session_enders: list[Callable[[list[int], str], int]] = []
        self._mu = threading.Lock()
        self._idle: list[socket.socket] = []
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self._sub: socket.socket | None = None
        self._sub_thread: threading.Thread | None = None
        self._acct_mu = threading.Lock()  # the counts and their order on the subscription (before _sub_send_mu)
        self._sub_send_mu = threading.Lock()  # frames written to the subscription
        self._subscribed = threading.Event()
        self._open: Counter[int] = Counter()  # branch id -> this front end's open proxy connections
        self._records: dict[int, BranchRecord] = {}
        self._pending: dict[int, Future[Any]] = {}  # counts sent, waiting for their answer
        self.page_server_pid: int | None = None

    def _connect(self, subscribe: bool = False, hello_extra: dict[str, Any] | None = None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _closed_on_error(s, f"the page server is not answering on {self.path}"):
            s.settimeout(self.connect_timeout)
            s.connect(self.path)
            send(s, {"hello": self.client, "version": VERSION, "subscribe": subscribe, **(hello_extra or {})})
            answer = recv(s)
            if answer is None:
                raise ConnectionResetError("the page server closed the connection")
            if "error" in answer:
                raise_error(answer["error"])
            self.page_server_pid = answer["ok"].get("pid")
            s.settimeout(None)
        return s

    def _take(self) -> socket.socket:
        """An idle connection that is still open (the page server may have
        restarted since it was used), else a new one."""
        while True:
            with self._mu:
                s = self._idle.pop() if self._idle else None
            if s is None:
                return self._connect()
            try:
                s.settimeout(0)  # (with a timeout set, Python would wait for data before the peek)
                if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    s.close()  # closed by the other side: stale
                    continue
            except BlockingIOError:
                return s  # open, nothing unread: as it should be
            except OSError:
                s.close()
                continue
            s.close()  # unread bytes on an idle connection: out of step, not to be used
            continue

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        s = self._take()
        rid = next(self._ids)
        frame = {"id": rid, "call": name, "args": encode(list(args)), "kwargs": encode(kwargs)}
        timeout = SLOW_CALL_TIMEOUT if name in SLOW_CALLS else CALL_TIMEOUT
        try:
            s.settimeout(timeout)
            send(s, frame)
        except (BrokenPipeError, ConnectionResetError):  # not delivered: safe to send again
            s.close()
            s = self._connect()
            s.settimeout(timeout)
            send(s, frame)
        with _closed_on_error(s, f"the page server went away during {name}"):
            reply = recv(s)
            if reply is None:
                raise ConnectionResetError("the page server closed the connection")
        if reply.get("id") != rid:
            s.close()
            raise RpcProtocolError(f"a reply for call {reply.get('id')} came for call {rid}")
        with self._mu:
            if self._closed.is_set():
                s.close()
            else:
                self._idle.append(s)
        if "error" in reply:
            raise_error(reply["error"])
        return decode(reply.get("ok"))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in CALLS:
            raise AttributeError(name)
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)

    # --- the subscription: pushes in, connection counts out, in order ----------------------------

    def subscribe(self) -> None:
        """Take the page server's requests to end sessions, and carry this
        front end's connection counts, on a connection of its own
        (reconnected at once, then with backoff, while this client is open)."""
        self._sub_thread = threading.Thread(target=self._subscription, name="strata-rpc-sub", daemon=True)
        self._sub_thread.start()

    def connection_opened(self, br: BranchRecord) -> None:
        """Count a proxy connection; returns once the page server counts it
        (before the wake, so that suspension sees it)."""
        deadline = time.monotonic() + SUBSCRIBE_WAIT
        while True:
            with self._acct_mu:
                sub = self._sub
                if sub is not None or self._closed.is_set():
                    self._open[br.id] += 1
                    self._records[br.id] = br
                    fut = self._send_count(sub, "connection_opened", br) if sub is not None else None
                    break
            if time.monotonic() > deadline:
                raise ServiceNotRunningError(f"the page server is not answering on {self.path} "
                                             "(no subscription to it)")
            self._subscribed.wait(0.05)
        if fut is not None:
            with contextlib.suppress(Exception):  # a subscription that went: its successor's hello counts it
                fut.result(SUBSCRIBE_WAIT)

    def connection_closed(self, br: BranchRecord) -> None:
        with self._acct_mu:
            if self._open[br.id] <= 0:
                return
            self._open[br.id] -= 1
            if not self._open[br.id]:
                del self._open[br.id]
                self._records.pop(br.id, None)
            if self._sub is not None:
                self._send_count(self._sub, "connection_closed", br)

    def _send_count(self, sub: socket.socket, name: str, br: BranchRecord) -> Future[Any]:
        """(under _acct_mu) Send a count on the subscription; its answer comes to `_pending`."""
        fut: Future[Any] = Future()
        rid = next(self._ids)
        self._pending[rid] = fut
        try:
            with self._sub_send_mu:
                send(sub, {"id": rid, "call": name, "args": encode([br])})
        except OSError as e:
            self._pending.pop(rid, None)
            fut.set_exception(e)
        return fut

    def _subscription(self) -> None:
        delay = 0.0
        while not self._closed.is_set():
            if delay and self._closed.wait(delay):
                return
            try:
                with self._acct_mu:  # the counts announced and the ones sent after: nothing lost or doubled
                    s = self._connect(subscribe=True, hello_extra={"open": encode(
                        {str(bid): [n, self._records[bid]] for bid, n in self._open.items() if n > 0})})
                    self._sub = s
                    self._subscribed.set()
            except (ServiceNotRunningError, RpcProtocolError) as e:
                log.debug("subscription: %s", e)
                delay = min(max(delay * 2, 0.05), 1.0)
                continue
            delay = 0.0
            try:
                while True:
                    frame = recv(s)
                    if frame is None:
                        break
                    if "call" in frame:  # a push
                        threading.Thread(target=self._push, args=(s, frame), daemon=True).start()
                        continue
                    rid = frame.get("id")
                    fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
                    if fut is not None:
                        fut.set_result(frame.get("ok"))
            except (OSError, RpcProtocolError) as e:
                log.debug("subscription ended: %s", e)
            finally:
                with self._acct_mu:
                    self._sub = None
                    self._subscribed.clear()
                    pending, self._pending = self._pending, {}
                for fut in pending.values():
                    fut.set_exception(ConnectionResetError("the subscription ended"))
                s.close()
            delay = 0.05 if delay == 0.0 else delay

    def _push(self, s: socket.socket, push: dict[str, Any]) -> None:
        ended = 0
        try:
            if push.get("call") == "end_sessions":
                ids, why = push["args"]
                for end in list(self.session_enders):
                    ended += int(end([int(i) for i in ids], str(why)) or 0)
            reply: dict[str, Any] = {"id": push.get("id"), "ok": ended}
        except Exception as e:  # noqa: BLE001 - the page server hears it
            log.exception("ending sessions")
            reply = {"id": push.get("id"), "error": error_of(e)}
        with contextlib.suppress(OSError), self._sub_send_mu:
            send(s, reply)

    def close(self) -> None:
        self._closed.set()
        with self._mu:
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()
        sub = self._sub
        if sub is not None:
            with contextlib.suppress(OSError):
                sub.shutdown(socket.SHUT_RDWR)
        if self._sub_thread is not None:
            self._sub_thread.join(5)
