"""pytest plugin: a seeded database once per session, a branch of it per test.

    def test_checkout(strata_db):
        with strata_db.connect() as conn:
            conn.execute("insert into orders ...")   # commits: only this test sees them

Fixtures:
  strata         the SDK client (session); uses the running service for the
                 home (`strata_home` ini option, `$STRATA_HOME`, ./.strata),
                 or starts one and stops it when the session ends
  strata_seed    override it to return a callable seed(conn) (session)
  strata_base    the seeded base database (session; seeded once, also
                 under pytest-xdist, where every worker branches the same one)
  strata_db      a fresh branch of the base for one test: `.uri`,
                 `.connect()`, `.sql()`; deleted after the test

Seeding, in order: the `strata_seed` fixture, the `strata_seed_sql` ini
option (a SQL file, relative to the rootdir), the `strata_seed_cmd` ini
option (a shell command that gets the base's URI in $DATABASE_URL, for
migration tools). A seed that fails, or a service that cannot be reached,
ends the session at once with the reason, instead of failing every test.

`--strata-keep-failed` keeps the branches of failed tests and prints how to
connect to each. Everything the plugin makes carries a TTL
(`strata_ttl`, default 1h), so an interrupted run leaves nothing for long.
`strata_prewarm` (default 2) branches are created and started ahead of the
tests that will take them.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from engine import StrataError
from pageserver.clients.loadonce import run_with_url
from pageserver.clients.sdk import Branch, Database, Strata
from pageserver.service import daemon as service

_REPORT = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("strata", "Strata: a database branch per test")
    group.addoption("--strata-keep-failed", action="store_true",
                    help="keep the branches of failed tests and print how to connect to them")
    parser.addini("strata_home", "the Strata service's home (default: $STRATA_HOME or ./.strata)")
    parser.addini("strata_seed_sql", "SQL file that seeds the base database")
    parser.addini("strata_seed_cmd", "shell command that seeds the base ($DATABASE_URL is its URI)")
    parser.addini("strata_ttl", "TTL of the base and of every test branch", default="1h")
    parser.addini("strata_prewarm", "branches started ahead of the tests that take them", default="2")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _shared_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory every process of this run sees (xdist workers get
    <controller's basetemp>/popen-gwN)."""
    base = tmp_path_factory.getbasetemp()
    return str(base.parent if _is_worker(config) else base)


def _home(config: pytest.Config) -> str:
    ini = config.getini("strata_home")
    if ini:
        return os.path.join(str(config.rootpath), ini) if not os.path.isabs(ini) else ini
    return service.default_home()


def _controller_dir(config: pytest.Config) -> str | None:
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return None
    try:
        return str(factory.getbasetemp())
    except OSError:
        return None


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller (under xdist the workers cannot tell whether the
    others are done) deletes the base, unless failed tests' branches were
    kept, and stops a service this run started."""
    if _is_worker(config):
        return
    shared = _controller_dir(config)
    if shared is None:
        return
    started = os.path.join(shared, "strata-started.json")
    record = os.path.join(shared, "strata-base.json")
    kept = os.path.exists(os.path.join(shared, "strata-kept.jsonl"))
    home = None
    if os.path.exists(started):
        with open(started) as f:
            home = json.load(f)["home"]
    if os.path.exists(record) and not kept:
        with open(record) as f:
            name = json.load(f).get("name")
        if name:
            try:
                with Strata(home, start=False) as client:
                    client.database(name).delete()
            except StrataError:
                pass  # its TTL ends it
    if home is not None and not kept:
        service.stop(home)
    for path in (started, record):
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture(scope="session")
def strata(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Strata]:
    config = request.config
    home = _home(config)
    shared = _shared_dir(config, tmp_path_factory)
    url, token = os.environ.get("STRATA_URL"), os.environ.get("STRATA_TOKEN")
    try:
        if url and token:
            client = Strata(url=url, token=token)
            client.status()  # reachable, and the token is good
        else:
            with service.file_lock(os.path.join(shared, "strata.lock")):
                if service.read_state(home) is None:
                    service.start(home)
                    with open(os.path.join(shared, "strata-started.json"), "w") as f:
                        json.dump({"home": home}, f)
            client = Strata(home, start=False)
    except StrataError as e:
        pytest.exit(f"strata: cannot reach or start the service: {e}", returncode=3)
    yield client
    client.close()


@pytest.fixture(scope="session")
def strata_seed() -> Callable[[psycopg.Connection[Any]], None] | None:
    """Override to return seed(conn), called once with a connection to the base."""
    return None


def _seed(config: pytest.Config, db: Database, seed: Callable[[psycopg.Connection[Any]], None] | None) -> str:
    if seed is not None:
        with db.connect(autocommit=False) as conn:
            seed(conn)
            conn.commit()
        return "the strata_seed fixture"
    sql_file = config.getini("strata_seed_sql")
    if sql_file:
        path = os.path.join(str(config.rootpath), sql_file)
        with open(path) as f:
            text = f.read()
        with db.connect(autocommit=True) as conn:
            conn.execute(text.encode())  # several statements: the simple query protocol
        return sql_file
    cmd = config.getini("strata_seed_cmd")
    if cmd:
        code, out, _ = run_with_url(cmd, db.uri, cwd=str(config.rootpath))
        if code != 0:
            raise RuntimeError(f"`{cmd}` exited with {code}:\n{out[-2000:]}")
        return f"`{cmd}`"
    return "nothing (no strata_seed fixture, strata_seed_sql or strata_seed_cmd)"


@pytest.fixture(scope="session")
def strata_base(request: pytest.FixtureRequest, strata: Strata, strata_seed: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    config = request.config
    shared = _shared_dir(config, tmp_path_factory)
    record = os.path.join(shared, "strata-base.json")
    ttl = config.getini("strata_ttl")
    with service.file_lock(os.path.join(shared, "strata.lock")):
        if os.path.exists(record):
            with open(record) as f:
                saved = json.load(f)
            if "error" in saved:
                pytest.exit(saved["error"], returncode=3)
            base = strata.database(saved["name"])
        else:
            base = strata.create_database(f"pytest-{secrets.token_hex(4)}", ttl=ttl)
            try:
                how = _seed(config, base, strata_seed)
            except Exception as e:  # noqa: BLE001 - one clear message for the session
                msg = f"strata: seeding the base database failed: {e}"
                with open(record, "w") as f:
                    json.dump({"error": msg}, f)
                base.delete()
                pytest.exit(msg, returncode=3)
            base.suspend()  # its branches start their own computes
            with open(record, "w") as f:
                json.dump({"name": base.database, "seeded_by": how}, f)
    yield base  # deleted by pytest_unconfigure, once every worker is done


class _Prewarm:
    """Branches of the base created and started ahead of the tests."""

    def __init__(self, base: Database, size: int, ttl: str) -> None:
        self.base, self.size, self.ttl = base, size, ttl
        self.ready: queue.Queue[Branch] = queue.Queue()
        self._want = threading.Semaphore(size)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        if size > 0:
            self._thread.start()

    def _new(self) -> Branch:
        return self.base.create_branch(f"t-{secrets.token_hex(5)}", ttl=self.ttl)

    def _run(self) -> None:
        while True:
            self._want.acquire()
            if self._stop:
                return
            try:
                br = self._new()
                br.start()
                self.ready.put(br)
            except Exception:  # noqa: BLE001 - the tests make their own then
                return

    def take(self) -> Branch:
        if self.size > 0:
            try:
                br = self.ready.get_nowait()
                self._want.release()
                return br
            except queue.Empty:
                pass
        return self._new()

    def close(self) -> None:
        self._stop = True
        self._want.release()
        if self.size > 0:
            self._thread.join(30)
        while not self.ready.empty():
            try:
                self.ready.get_nowait().delete()
            except StrataError:
                pass


@pytest.fixture(scope="session")
def _strata_prewarm(request: pytest.FixtureRequest, strata_base: Database) -> Iterator[_Prewarm]:
    pool = _Prewarm(strata_base, int(request.config.getini("strata_prewarm")), request.config.getini("strata_ttl"))
    yield pool
    pool.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep: pytest.TestReport = yield
    item.stash.setdefault(_REPORT, {})[rep.when] = rep
    return rep


@pytest.fixture
def strata_db(request: pytest.FixtureRequest, _strata_prewarm: _Prewarm,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Branch]:
    """A branch of the seeded base for this test alone."""
    br = _strata_prewarm.take()
    t0 = time.monotonic()
    yield br
    reports = request.node.stash.get(_REPORT, {})
    failed = any(r.failed for r in reports.values())
    if failed and request.config.getoption("strata_keep_failed"):
        shared = _shared_dir(request.config, tmp_path_factory)
        with service.file_lock(os.path.join(shared, "strata.lock")), \
                open(os.path.join(shared, "strata-kept.jsonl"), "a") as f:
            f.write(json.dumps({"test": request.node.nodeid, "branch": f"{br.database}/{br.name}",
                                "uri": br.uri}) + "\n")
        return
    try:
        br.delete()
    except StrataError as e:
        request.node.warn(pytest.PytestWarning(f"strata: could not delete {br.name} "
                                               f"after {time.monotonic() - t0:.1f} s: {e}"))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    shared = _controller_dir(config)
    path = os.path.join(shared, "strata-kept.jsonl") if shared else ""
    if _is_worker(config) or not os.path.exists(path):
        return
    terminalreporter.section("strata: branches kept for failed tests")
    with open(path) as f:
        for line in f:
            kept = json.loads(line)
            terminalreporter.write_line(f"{kept['test']}\n    strata psql {kept['branch']}\n"
                                        f"    psql '{kept['uri']}'")
    terminalreporter.write_line("(the service stays up for them; `strata down` when done)")
