"""The SDK's HTTP path (the standard library's http.client): JSON both
ways, typed errors from the service's error bodies, one kept-alive
connection replaced when idle, and an unreachable service said as such."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pageserver.clients import sdk
from pageserver.clients.sdk import Strata
from pageserver.errors import ServiceNotRunningError, UnknownObjectError


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # (keep-alive)
    connections: set[int] = set()
    seen: list[tuple[str, str, str | None, dict]] = []

    def _answer(self) -> None:
        Handler.connections.add(id(self.connection))
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        Handler.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
        status, out = (404, {"error": "UnknownObjectError", "message": "no branch named 'a/b'"}) \
            if self.path.endswith("/missing") else (200, {"echo": body, "path": self.path})
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    Handler.connections, Handler.seen = set(), []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_json_both_ways_typed_errors_and_one_kept_alive_connection(server, monkeypatch):
    s = Strata(url=server, token="t0k")
    try:
        assert s.call("POST", "/databases", {"name": "x"}) == {"echo": {"name": "x"}, "path": "/v1/databases"}
        assert s.call("GET", "/status")["path"] == "/v1/status"
        assert len(Handler.connections) == 1  # (kept alive)
        assert all(auth == "Bearer t0k" for _, _, auth, _ in Handler.seen)
        with pytest.raises(UnknownObjectError, match="a/b") as e:
            s.call("GET", "/databases/a/branches/missing")
        assert e.value.status == 404  # type: ignore[attr-defined]
        monkeypatch.setattr(sdk, "IDLE_REUSE_S", 0.0)  # (idle too long: a new connection before the next)
        s.call("POST", "/databases", {"name": "y"})
        assert len(Handler.connections) == 2
    finally:
        s.close()


def test_an_unreachable_service_is_said_so():
    s = Strata(url="http://127.0.0.1:1", token="t", timeout=2)
    with pytest.raises(ServiceNotRunningError, match="cannot reach"):
        s.call("GET", "/status")
    with pytest.raises(ServiceNotRunningError, match="not an http"):
        Strata(url="ftp://x", token="t")


def raw_server(answers: list[bytes | None]):
    """A one-thread server that, per request, sends the next answer (None:
    close the connection without one). Returns (url, requests seen, stop)."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    seen: list[bytes] = []

    def run() -> None:
        while answers:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            f = conn.makefile("rb")
            with conn, f:  # (both: the socket closes only when its file does too)
                while answers:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = f.readline()
                        if not line:
                            break
                        head += line
                    if not head:
                        break
                    n = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                                  if ln.lower().startswith(b"content-length")), b"0"))
                    seen.append(head + f.read(n))
                    answer = answers.pop(0)
                    if answer is None:
                        break  # (closed: a kept-alive connection the server dropped)
                    conn.sendall(answer)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", seen, srv.close


def test_chunked_and_empty_answers_and_a_dropped_kept_alive_connection():
    ok = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{"a": 1}\n'
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\n{\"b\"\r\n5;ext=1\r\n: 2}\n\r\n0\r\nTrailer: x\r\n\r\n")
    empty = b"HTTP/1.1 204 No Content\r\n\r\n"
    url, seen, stop = raw_server([ok, chunked, empty, None, ok, None])
    s = Strata(url=url, token="t")
    try:
        assert s.call("GET", "/x") == {"a": 1}
        assert s.call("GET", "/y") == {"b": 2}
        assert s.call("DELETE", "/z") is None
        assert s.call("GET", "/again") == {"a": 1}  # dropped unanswered: sent once more on a new connection
        assert [r.split(b" ")[1] for r in seen] == [b"/v1/x", b"/v1/y", b"/v1/z", b"/v1/again", b"/v1/again"]
        with pytest.raises(ServiceNotRunningError, match="closed"):
            s.call("POST", "/once", {"n": 1})  # a POST is never sent twice: whether it ran is unknown
        assert seen[-1].endswith(b'{"n": 1}') and len(seen) == 6
    finally:
        s.close()
        stop()


def test_an_answer_that_is_not_http_is_said_so():
    url, _, stop = raw_server([b"SSH-2.0-OpenSSH_9.2\r\n\r\n"])
    try:
        with pytest.raises(ServiceNotRunningError, match="not an HTTP answer"):
            Strata(url=url, token="t").call("GET", "/status")
    finally:
        stop()
