"""A PostgreSQL cluster on local disk, for baselines measured beside ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import psycopg

from pageserver.compute.postgres import free_port, pg_bindir, run_as


class LocalPg:
    """initdb + pg_ctl start in a temporary directory (as the postgres
    user under root), trust auth on a private Unix socket."""

    def __init__(self, fsync: bool = True) -> None:
        self.root = tempfile.mkdtemp(prefix="strata-bench-pg-")
        self.user, uid, gid = run_as()
        os.chmod(self.root, 0o755)
        os.chown(self.root, uid, gid)
        self.pgdata, self.port = os.path.join(self.root, "pgdata"), free_port()
        self._fsync = fsync

    def _run(self, *cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, user=self.user, cwd="/")

    def start(self) -> LocalPg:
        initdb = [os.path.join(pg_bindir(), "initdb"), "-D", self.pgdata, "-A", "trust", "-U", "postgres"]
        self._run(*initdb, *([] if self._fsync else ["--no-sync"]))
        self._run(os.path.join(pg_bindir(), "pg_ctl"), "-D", self.pgdata, "-l", self.pgdata + ".log", "start",
                  "-w", "-o", f"-p {self.port} -c listen_addresses='' -c unix_socket_directories={self.root}")
        return self

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.root} port={self.port} user=postgres dbname={dbname}"

    def first_query(self, dbname: str = "postgres") -> None:
        first_query(self.conninfo(dbname))

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([os.path.join(pg_bindir(), "pg_ctl"), "-D", self.pgdata, "stop", "-m", mode],
                       capture_output=True, user=self.user, cwd="/")
        shutil.rmtree(self.root, ignore_errors=True)


def first_query(conninfo: str) -> None:
    with psycopg.connect(conninfo, connect_timeout=60) as conn:
        conn.execute("select 1").fetchone()
