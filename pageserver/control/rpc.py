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

Each front-end process has a client id. The connections it opened through
the proxy are counted per client; when its subscribed connection closes
(the front end stopped or died) the page server closes what it still had
open, so that a dead front end leaves no branch held awake.

Concurrency: the server runs a thread per connection (calls on one
connection are serial; a client opens more for concurrency). `_mu` guards
`_opened`, `_subscribers` and `_live`; a subscriber's `send_mu` orders the frames
written to it and `pending` holds the pushes waiting for their replies.
A client keeps idle connections in a list under its `_mu` and takes one
per call, so calls from many threads run at once.
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
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import engine.errors as engine_errors
import pageserver.errors as ps_errors
from engine import StrataError
from pageserver.control.catalog import BranchRecord
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
    "create_database", "database", "databases", "delete_database",
    "create_branch", "branch", "branches", "update_branch", "delete_branch",
    "reset_branch", "restore_branch", "detach_branch", "suspend", "start", "lsn",
    "database_for_token", "resolve", "route", "status", "metrics_text", "check",
    "connection_opened", "connection_closed", "uri", "endpoint",
})

_TYPES: dict[str, type] = {t.__name__: t for t in (BranchInfo, DatabaseInfo, BranchRecord)}


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


def error_of(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "message": str(e)}


def raise_error(err: dict[str, Any]) -> None:
    """Raise what the other side raised: the same class, the same message."""
    cls = _ERRORS.get(str(err.get("type")))
    message = str(err.get("message", ""))
    if cls is None:
        raise ps_errors.PageServerError(f"page server: {err.get('type')}: {message}")
    e = cls.__new__(cls)
    Exception.__init__(e, message)
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


class RpcServer:
    """Serves `target`'s methods named in CALLS on a Unix socket. `target`
    is the control plane; its `session_enders` gets one ender that asks
    every subscribed front end."""

    def __init__(self, target: Any, path: str, *, trusted_uids: set[int], group: int | None = None) -> None:
        self.target = target
        self.path = path
        self.trusted = set(trusted_uids) | {0, os.geteuid()}
        self._mu = threading.Lock()
        self._opened: dict[str, Counter[int]] = {}  # client -> branch id -> connections it opened
        self._records: dict[int, BranchRecord] = {}  # branch id -> a record to close them with
        self._subscribers: dict[str, _Subscriber] = {}
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
                self._subscribed(client, sock)
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
        if name == "connection_opened":
            br = args[0]
            self.target.connection_opened(br)
            with self._mu:
                self._opened.setdefault(client, Counter())[br.id] += 1
                self._records[br.id] = br
            return None
        if name == "connection_closed":
            br = args[0]
            with self._mu:
                mine = self._opened.get(client)
                if mine is None or mine[br.id] <= 0:
                    return None  # closed already (the client's channel went and came back)
                mine[br.id] -= 1
            self.target.connection_closed(br)
            return None
        return getattr(self.target, name)(*args, **kwargs)

    def _subscribed(self, client: str, sock: socket.socket) -> None:
        sub = _Subscriber(client, sock)
        with self._mu:
            old = self._subscribers.get(client)
            self._subscribers[client] = sub
        if old is not None:
            with contextlib.suppress(OSError):
                old.sock.shutdown(socket.SHUT_RDWR)
        try:
            while True:
                reply = recv(sock)
                if reply is None:
                    return
                fut = sub.pending.pop(int(reply.get("id", -1)), None)
                if fut is not None:
                    if "error" in reply:
                        fut.set_exception(ps_errors.PageServerError(str(reply["error"].get("message"))))
                    else:
                        fut.set_result(reply.get("ok"))
        finally:
            for fut in list(sub.pending.values()):
                fut.set_result(0)
            with self._mu:
                if self._subscribers.get(client) is sub:
                    del self._subscribers[client]
                    self._forget(client)

    def _forget(self, client: str) -> None:
        """The front end `client` is gone: close what it had open (under _mu)."""
        mine = self._opened.pop(client, None) or Counter()
        for bid, n in mine.items():
            br = self._records.get(bid)
            for _ in range(n if br is not None else 0):
                self.target.connection_closed(br)
        if mine and sum(mine.values()):
            log.info("front end %s went with %d connections open: closed them", client[:8], sum(mine.values()))

    def end_sessions(self, branch_ids: list[int], why: str) -> int:
        """The control plane's ender: ask every front end, wait for each."""
        with self._mu:
            subs = list(self._subscribers.values())
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
        self.page_server_pid: int | None = None

    def _connect(self, subscribe: bool = False) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.connect_timeout)
            s.connect(self.path)
            send(s, {"hello": self.client, "version": VERSION, "subscribe": subscribe})
            answer = recv(s)
            if answer is None:
                raise ConnectionResetError("the page server closed the connection")
            if "error" in answer:
                raise_error(answer["error"])
            self.page_server_pid = answer["ok"].get("pid")
            s.settimeout(None)
            return s
        except OSError as e:
            s.close()
            raise ServiceNotRunningError(f"the page server is not answering on {self.path}: {e}") from e
        except BaseException:
            s.close()
            raise

    def _take(self) -> socket.socket:
        """An idle connection that is still open (the page server may have
        restarted since it was used), else a new one."""
        while True:
            with self._mu:
                s = self._idle.pop() if self._idle else None
            if s is None:
                return self._connect()
            try:
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
        try:
            try:
                send(s, frame)
            except (BrokenPipeError, ConnectionResetError):  # not delivered: safe to send again
                s.close()
                s = self._connect()
                send(s, frame)
            reply = recv(s)
            if reply is None:
                raise ConnectionResetError("the page server closed the connection")
        except OSError as e:
            s.close()
            raise ServiceNotRunningError(f"the page server went away during {name}: {e}") from e
        except BaseException:
            s.close()
            raise
        with self._mu:
            if self._closed.is_set():
                s.close()
            else:
                self._idle.append(s)
        if reply.get("id") != rid:
            raise RpcProtocolError(f"a reply for call {reply.get('id')} came for call {rid}")
        if "error" in reply:
            raise_error(reply["error"])
        return decode(reply.get("ok"))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in CALLS:
            raise AttributeError(name)
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)

    def subscribe(self) -> None:
        """Take the page server's requests to end sessions, on a connection
        of its own (reconnecting while this client is open)."""
        self._sub_thread = threading.Thread(target=self._subscription, name="strata-rpc-sub", daemon=True)
        self._sub_thread.start()

    def _subscription(self) -> None:
        delay = 0.05
        while not self._closed.is_set():
            try:
                s = self._connect(subscribe=True)
            except (ServiceNotRunningError, RpcProtocolError) as e:
                log.debug("subscription: %s", e)
                self._closed.wait(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            self._sub = s
            send_mu = threading.Lock()
            try:
                while True:
                    push = recv(s)
                    if push is None:
                        break
                    threading.Thread(target=self._push, args=(s, send_mu, push), daemon=True).start()
            except (OSError, RpcProtocolError) as e:
                log.debug("subscription ended: %s", e)
            finally:
                s.close()
                self._sub = None

    def _push(self, s: socket.socket, send_mu: threading.Lock, push: dict[str, Any]) -> None:
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
        with contextlib.suppress(OSError), send_mu:
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
