"""Python SDK over the HTTP API.

    from pageserver.clients.sdk import Strata
    db = Strata().create_database(ttl="1h")
    db.sql("select 1")
    db.delete()

`Strata()` finds the service from `url`/`token`, or `$STRATA_URL` and
`$STRATA_TOKEN`, or the home directory (`home`, `$STRATA_HOME`, or
`./.strata`), and starts one there if none runs (`start=False` to refuse;
it keeps AUTO_WARM_POOL spare computes).
Errors come back as the typed errors of `pageserver.errors` (and the
engine's), named by the service.

The HTTP path is one kept-alive HTTP/1.1 connection on a socket (JSON in
and out; HTTPS through the standard library's `http.client`), and psycopg
is imported only to connect: a CLI call that makes one API request pays
for neither httpx, http.client (email, ssl) nor psycopg (issue: the CLI at
agent speed).

Concurrency: a `Strata` holds one connection, and a lock (`_Http.mu`)
makes each request and its answer one step, so threads may share it
(their requests then go one at a time).
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import engine.errors as engine_errors
from pageserver import errors as ps_errors
from pageserver.errors import ControlPlaneError, ServiceNotRunningError
from pageserver.service import daemon as service

if TYPE_CHECKING:
    import psycopg


def _error_class(name: str) -> type[Exception]:
    for mod in (ps_errors, engine_errors):
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls
    return ControlPlaneError


class ApiError(ControlPlaneError):
    """An error the service reported, with its HTTP status and type name.
    It is also an instance of the typed error it names (UnknownObjectError,
    ProtectedError, ...), so callers branch on the same types as in-process."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        Exception.__init__(self, message)
        self.status = status
        self.kind = kind


_typed: dict[str, type[ApiError]] = {}


def _raise(status: int, text: str) -> None:
    try:
        body = json.loads(text)
        kind, message = body.get("error", "HTTPError"), body.get("message", text)
    except (ValueError, AttributeError):
        kind, message = "HTTPError", text
    cls = _error_class(kind)
    typed: type[ApiError] = ApiError
    if not issubclass(ApiError, cls):
        typed = _typed.get(kind) or _typed.setdefault(kind, type(kind, (ApiError, cls), {}))
    raise typed(status, kind, message)


# A service started on demand keeps a spare compute: a new database's first query does not wait for a
# postgres to start (create to first query from a shell, p50: 286 ms without, 210 ms with; issue 16).
AUTO_WARM_POOL = 1
IDLE_REUSE_S = 2.0  # a connection idle longer is not reused (the server closes idle ones after 5 s)


class HttpError(OSError):
    """An answer that is not HTTP/1.1 as this client reads it."""


class _Plain:
    """One HTTP/1.1 connection over a TCP socket: a request, and its
    answer with a Content-Length or chunked body. (The standard library's
    http.client imports email and ssl: 17 ms of a CLI call's 100. HTTPS
    goes through http.client.)"""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.host = f"{host}:{port}"

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", *(f"{k}: {v}" for k, v in headers.items()),
                 f"Content-Length: {len(body or b'')}", "", ""]
        self.sock.sendall("\r\n".join(lines).encode("latin-1") + (body or b""))
        status_line = self.file.readline(65537)
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP answer: {status_line[:80]!r}")
        status = int(parts[1])
        fields: dict[bytes, bytes] = {}
        while True:
            line = self.file.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            data = b""
        elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while True:
                head = self.file.readline(65537)
                if not head.endswith(b"\n"):
                    raise ConnectionResetError("the server closed the connection mid-answer")
                try:
                    size = int(head.split(b";")[0].strip(), 16)
                except ValueError:
                    raise HttpError(f"not a chunk size: {head[:40]!r}") from None
                if size == 0:
                    while self.file.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # (trailers)
                    break
                chunks.append(self._exactly(size))
                self.file.readline(65537)
            data = b"".join(chunks)
        elif b"content-length" in fields:
            data = self._exactly(int(fields[b"content-length"]))
        else:
            data = self.file.read()  # (to the end: the server closes)
            fields[b"connection"] = b"close"
        if fields.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, data

    def _exactly(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            raise ConnectionResetError("the server closed the connection mid-answer")
        return data

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class _Tls:
    """HTTPS through the standard library's http.client."""

    def __init__(self, host: str, port: int | None, timeout: float) -> None:
        import http.client

        self.conn = http.client.HTTPSConnection(host, port, timeout=timeout)
        self.closed = False

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        import http.client

        try:
            self.conn.request(method, path, body=body, headers=headers)
            r = self.conn.getresponse()
            return r.status, r.read()
        except http.client.RemoteDisconnected as e:
            raise ConnectionResetError(str(e)) from e
        except http.client.HTTPException as e:
            raise HttpError(f"not an HTTP answer: {e}") from e

    def close(self) -> None:
        self.conn.close()
        self.closed = True


class _Http:
    """JSON over one kept-alive HTTP/1.1 connection; `mu` makes a request
    and its answer one step. A connection idle for `IDLE_REUSE_S` is
    replaced before a request, so that a POST never meets one the server
    is closing (whether it ran would be unknown); a GET that does is sent
    once more on a new one."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ServiceNotRunningError(f"not an http(s) URL of a Strata service: {url!r}")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._conn: _Plain | _Tls | None = None
        self._used = 0.0
        self.mu = threading.Lock()

    def _connection(self) -> _Plain | _Tls:
        if self._conn is None or self._conn.closed:
            if self.scheme == "https":
                self._conn = _Tls(self.host, self.port, self.timeout)
            else:
                self._conn = _Plain(self.host, self.port or 80, self.timeout)
        return self._conn

    def request(self, method: str, path: str, body: Any) -> tuple[int, str]:
        if not path.isascii() or any(c <= " " or c == "\x7f" for c in path):
            # (a name with a space or a line break would end the request line and start another request)
            raise ps_errors.BadRequestError(f"{path!r} is not a path of the API: no spaces, control characters "
                                            "or non-ASCII in names")
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        with self.mu:
            for attempt in (0, 1):
                if time.monotonic() - self._used > IDLE_REUSE_S:
                    self.close()
                fresh = self._conn is None or self._conn.closed
                try:
                    conn = self._connection()
                    status, raw = conn.request(method, self.prefix + path, data, headers)
                    self._used = time.monotonic()
                    return status, raw.decode("utf-8", "replace")
                except (BrokenPipeError, ConnectionResetError):
                    self.close()  # (a kept-alive connection the server closed meanwhile: once more, anew)
                    if attempt or fresh or method not in ("GET", "HEAD"):
                        raise
                except BaseException:
                    self.close()
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Strata:
    def __init__(self, home: str | None = None, *, url: str | None = None, token: str | None = None,
                 start: bool = True, timeout: float = 120.0) -> None:
        import os

        url = url or os.environ.get("STRATA_URL")
        token = token or os.environ.get("STRATA_TOKEN")
        if url is None or token is None:
            home = os.path.abspath(home or service.default_home())
            state = service.read_state(home)
            if state is None:
                if not start:
                    raise ServiceNotRunningError(f"no Strata service runs for {home} (run `strata up`)")
                state = service.start(home, warm_pool=AUTO_WARM_POOL)
            url = url or state["api"]
            if token is None:
                with open(state["token_file"]) as f:
                    token = f.read().strip()
        self.url = url.rstrip("/")
        self._http = _Http(self.url + "/v1", token, timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Strata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            status, text = self._http.request(method, path, body)
        except OSError as e:  # (a timeout and a malformed answer are OSErrors too)
            raise ServiceNotRunningError(f"cannot reach the Strata service at {self.url}: {e}") from e
        if status >= 400:
            _raise(status, text)
        return None if status == 204 or not text else json.loads(text)

    # --- databases -------------------------------------------------------------

    def create_database(self, name: str | None = None, *, ttl: float | str | None = None,
                        idle_timeout: float | str | None = None,
                        expire_after_idle: float | str | None = None, durable: bool = False,
                        **limits: int | str) -> Database:
        """`limits` (max_size="1GB", branch_connections=10, shared_buffers, work_mem,
        memory, creations_per_minute) override the service's defaults for
        this database (`pageserver.control.limits`). `durable` (the service
        needs a remote): its commits return once the object store has them."""
        info = self.call("POST", "/databases", {"name": name, "ttl": ttl, "idle_timeout": idle_timeout,
                                                "expire_after_idle": expire_after_idle, "durable": durable,
                                                **limits})
        return Database(self, info["name"], info["uri"], info)

    def database(self, name: str) -> Database:
        info = self.call("GET", f"/databases/{name}")
        return Database(self, info["name"], info["uri"], info)

    def databases(self) -> list[Database]:
        return [Database(self, d["name"], d["uri"], d) for d in self.call("GET", "/databases")]

    def branch(self, address: str) -> Branch:
        """A branch by `DB/BRANCH` (or `DB` for its main branch)."""
        db, _, name = address.partition("/")
        info = self.call("GET", f"/databases/{db}/branches/{name or 'main'}")
        return Branch(self, db, info["name"], info["uri"], info)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/status")
        return result


class Branch:
    """A branch: connect to it, query it, branch it, suspend, reset,
    restore or delete it."""

    def __init__(self, client: Strata, database: str, name: str, uri: str, info: dict[str, Any]) -> None:
        self.client = client
        self.database = database
        self.name = name
        self._uri = uri if info.get("password") else None  # (a URI with no password opens nothing)
        self.info = info

    @property
    def uri(self) -> str:
        """A URI that opens this branch: the one its creation answered, or
        else one with a new password (`new_uri`), made on first use."""
        if self._uri is None:
            self._uri = self.new_uri()
        return self._uri

    def new_uri(self, *, ttl: float | str | None = None, readonly: bool = False) -> str:
        """A URI with a new password of this branch's, valid for `ttl` (or
        as long as the branch). The service keeps only its verifier.
        `readonly`: the password opens the branch only as a role that
        PostgreSQL keeps from writing."""
        return str(self.client.call("POST", self._path + "/credentials", {"ttl": ttl, "readonly": readonly})["uri"])

    @property
    def _path(self) -> str:
        return f"/databases/{self.database}/branches/{self.name}"

    def __repr__(self) -> str:
        return f"<Branch {self.database}/{self.name}>"

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(self.uri, **kwargs)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement (autocommit); its rows, or [] if it returns none."""
        import psycopg

        with psycopg.connect(self.uri, autocommit=True) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def refresh(self) -> dict[str, Any]:
        self.info = self.client.call("GET", self._path)
        return self.info

    @property
    def state(self) -> str:
        return str(self.refresh()["state"])

    def lsn(self) -> int:
        return int(self.client.call("GET", self._path + "/lsn")["lsn"])

    def create_branch(self, name: str, *, lsn: int | None = None, time: str | None = None,
                      ttl: float | str | None = None, idle_timeout: float | str | None = None,
                      expire_after_idle: float | str | None = None, protected: bool = False) -> Branch:
        info = self.client.call("POST", f"/databases/{self.database}/branches", {
            "name": name, "parent": self.name, "lsn": lsn, "time": time, "ttl": ttl,
            "idle_timeout": idle_timeout, "expire_after_idle": expire_after_idle, "protected": protected})
        return Branch(self.client, self.database, info["name"], info["uri"], info)

    def suspend(self) -> None:
        self.info = self.client.call("POST", self._path + "/suspend")

    def start(self) -> None:
        self.info = self.client.call("POST", self._path + "/start")

    def reset(self) -> None:
        self.info = self.client.call("POST", self._path + "/reset")

    def restore(self, *, lsn: int | None = None, time: str | None = None) -> Branch:
        """Back to this branch's state at `lsn` or `time`; returns the backup
        branch holding what it was before."""
        info = self.client.call("POST", self._path + "/restore", {"lsn": lsn, "time": time})
        backup = info.pop("backup")
        self.info = info
        return Branch(self.client, self.database, backup["name"], backup["uri"], backup)

    def detach(self) -> None:
        self.info = self.client.call("POST", self._path + "/detach")

    def update(self, **changes: Any) -> None:
        self.info = self.client.call("PATCH", self._path, changes)

    def delete(self) -> None:
        self.client.call("DELETE", self._path)


class Database(Branch):
    """A database, used as its main branch; `branch(name)` makes another.
    `token` (set when this client created it) is the API token scoped to it."""

    def __init__(self, client: Strata, name: str, uri: str, info: dict[str, Any]) -> None:
        super().__init__(client, name, "main", uri, info)
        self.token: str | None = info.get("token")

    def __repr__(self) -> str:
        return f"<Database {self.database}>"

    def branch(self, name: str, **kwargs: Any) -> Branch:
        return self.create_branch(name, **kwargs)

    @property
    def limits(self) -> dict[str, int]:
        """What it may take (its own, with the service's defaults filled in; 0: none)."""
        return dict(self.client.call("GET", f"/databases/{self.database}")["limits"])

    def set_limits(self, **limits: int | str) -> dict[str, int]:
        """Change its limits (operator token): a raised cap reaches its running computes at once."""
        return dict(self.client.call("PATCH", f"/databases/{self.database}", limits)["limits"])

    @property
    def durable(self) -> bool:
        """Do its commits return only once the object store has them?"""
        return bool(self.client.call("GET", f"/databases/{self.database}")["durable"])

    def set_durable(self, durable: bool = True) -> bool:
        """Turn its durable mode on or off (operator token; the service needs a remote)."""
        return bool(self.client.call("PATCH", f"/databases/{self.database}", {"durable": durable})["durable"])

    def branches(self) -> list[Branch]:
        return [Branch(self.client, self.database, b["name"], b["uri"], b)
                for b in self.client.call("GET", f"/databases/{self.database}/branches")]

    def delete(self) -> None:
        self.client.call("DELETE", f"/databases/{self.database}")
