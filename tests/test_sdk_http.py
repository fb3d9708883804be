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
