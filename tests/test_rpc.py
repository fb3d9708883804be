"""The page server's local RPC (pageserver.control.rpc), against a fake
control plane: calls and typed errors round-trip, only listed calls run,
a front end that goes releases the connections it held, and ending
sessions reaches the front end and back."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pageserver.control import rpc
from pageserver.control.catalog import BranchRecord
from pageserver.control.objects import BranchInfo
from pageserver.errors import ComputeLimitError, ServiceNotRunningError, UnknownObjectError


class FakePlane:
    def __init__(self) -> None:
        self.session_enders: list = []
        self.open: dict[int, int] = {}
        self.calls: list[str] = []

    def resolve(self, address: str) -> BranchRecord:
        if address == "nope.main":
            raise UnknownObjectError("branch", address)
        return BranchRecord(id=7, database=1, name="main", timeline="ab" * 16, created_at=1.0)

    def branch(self, database: str, name: str, *, sizes: bool = True) -> BranchInfo:
        return BranchInfo(database, name, f"{database}.{name}", "postgresql://x", "running", 42, "ab" * 16, None,
                          None, None, 300.0, None, False, None, 0, 10 if sizes else None)

    def route(self, br: BranchRecord) -> tuple[str, int]:
        raise ComputeLimitError("all 2 compute slots are busy")

    def connection_opened(self, br: BranchRecord) -> None:
        self.open[br.id] = self.open.get(br.id, 0) + 1

    def connection_closed(self, br: BranchRecord) -> None:
        self.open[br.id] -= 1

    def shutdown_everything(self) -> None:  # not in CALLS: must never run
        self.calls.append("shutdown_everything")


@pytest.fixture
def served(tmp_path):
    plane = FakePlane()
    server = rpc.RpcServer(plane, str(tmp_path / "control.sock"), trusted_uids=set())
    server.start()
    client = rpc.RemoteControl(server.path)
    try:
        yield plane, server, client
    finally:
        client.close()
        server.close()


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_calls_and_typed_errors_round_trip(served):
    plane, server, client = served
    br = client.resolve("shop.main")
    assert isinstance(br, BranchRecord) and br.id == 7 and br.timeline == "ab" * 16
    info = client.branch("shop", "main", sizes=False)
    assert isinstance(info, BranchInfo) and info.logical_size is None and info.lsn == 42
    with pytest.raises(UnknownObjectError, match="nope.main") as e:
        client.resolve("nope.main")
    assert e.value.status == 404  # the HTTP API maps it as in one process
    with pytest.raises(ComputeLimitError, match="compute slots are busy"):
        client.route(br)
    assert oct(os.stat(server.path).st_mode & 0o777) == "0o660"


def test_only_listed_calls_run(served):
    plane, _, client = served
    with pytest.raises(AttributeError):
        client.shutdown_everything  # noqa: B018
    with pytest.raises(rpc.RpcProtocolError, match="no RPC call named"):
        client.call("shutdown_everything")
    assert plane.calls == []


def test_a_front_end_that_goes_releases_its_connections(served):
    plane, server, client = served
    client.subscribe()
    br = client.resolve("shop.main")
    for _ in range(3):
        client.connection_opened(br)
    client.connection_closed(br)  # (not waited for: it goes in order with the next)
    wait_for(lambda: plane.open == {7: 2})
    client.close()  # the front end dies: its subscription closes
    wait_for(lambda: plane.open == {7: 0})


def test_a_count_in_flight_when_its_front_end_dies_is_released(served):
    """Paused between the page server taking the count and recording it,
    while the front end dies: the count is still released (it belongs to
    the subscription it came on, whose end closes it)."""
    plane, server, client = served
    entered, release = threading.Event(), threading.Event()
    real = plane.connection_opened

    def slow(br):
        entered.set()
        release.wait(10)
        real(br)

    plane.connection_opened = slow
    client.subscribe()
    br = client.resolve("shop.main")
    opener = threading.Thread(target=client.connection_opened, args=(br,))
    opener.start()
    assert entered.wait(10)
    client.close()  # dies with the count taken but not recorded
    release.set()
    opener.join(15)
    wait_for(lambda: plane.open == {7: 0})


def test_counts_need_a_subscription_and_survive_a_page_server_restart(tmp_path):
    path = str(tmp_path / "control.sock")
    first_plane, second_plane = FakePlane(), FakePlane()
    first = rpc.RpcServer(first_plane, path, trusted_uids=set())
    first.start()
    client = rpc.RemoteControl(path)
    try:
        br = client.resolve("a.main")
        t0 = time.monotonic()
        with pytest.raises(ServiceNotRunningError, match="no subscription"):  # never subscribed
            client.connection_opened(br)
        assert time.monotonic() - t0 >= rpc.SUBSCRIBE_WAIT * 0.9 and first_plane.open == {}
        client.subscribe()
        client.connection_opened(br)
        client.connection_opened(br)
        assert first_plane.open == {7: 2}
        first.close()  # the page server goes; a new one comes: the front end's two connections are announced
        second = rpc.RpcServer(second_plane, path, trusted_uids=set())
        second.start()
        try:
            wait_for(lambda: second_plane.open == {7: 2})
            client.connection_closed(br)
            wait_for(lambda: second_plane.open == {7: 1})
        finally:
            second.close()
    finally:
        client.close()


def test_ending_sessions_reaches_the_front_end(served):
    plane, server, client = served
    asked = []
    client.session_enders.append(lambda ids, why: asked.append((ids, why)) or len(ids))
    client.subscribe()
    wait_for(lambda: client.client in server._subscribers)
    assert plane.session_enders[0](([7, 8]), "branch shop/main expired") == 2
    assert asked == [([7, 8], "branch shop/main expired")]


def test_a_restarted_page_server_is_reached_again(tmp_path):
    """Idle connections to a page server that went are noticed, not used."""
    path = str(tmp_path / "control.sock")
    plane = FakePlane()
    first = rpc.RpcServer(plane, path, trusted_uids=set())
    first.start()
    client = rpc.RemoteControl(path)
    try:
        assert client.resolve("a.main").id == 7
        first.close()
        with pytest.raises(ServiceNotRunningError, match="not answering"):
            client.resolve("a.main")
        second = rpc.RpcServer(plane, path, trusted_uids=set())
        second.start()
        try:
            assert client.resolve("a.main").id == 7
        finally:
            second.close()
    finally:
        client.close()


def test_untrusted_peers_are_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to connect as another user") if not os.environ.get("CI") else pytest.fail(
            "CI runs as root")
    plane = FakePlane()
    open_dir = tempfile.mkdtemp(prefix="strata-rpc-test-")  # (tmp_path's parents are 0700: reachable by root only)
    os.chmod(open_dir, 0o755)
    server = rpc.RpcServer(plane, os.path.join(open_dir, "control.sock"), trusted_uids=set())
    os.chmod(server.path, 0o666)  # even with the file open to all, the peer's uid is checked
    server.start()
    got: list[object] = []
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setgid(65534)
                os.setuid(65534)
                c = rpc.RemoteControl(server.path)
                try:
                    c.resolve("a.main")
                    os._exit(0)
                except ServiceNotRunningError:
                    os._exit(3)
            finally:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        got.append(os.waitstatus_to_exitcode(status))
    finally:
        server.close()
        shutil.rmtree(open_dir, ignore_errors=True)
    assert got == [3], "an untrusted uid got an answer"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
                    lambda kids: st.lists(kids) | st.dictionaries(st.text().filter(lambda k: k != "$"), kids),
                    max_leaves=20))
def test_plain_values_encode_to_themselves(value):
    assert rpc.decode(rpc.encode(value)) == value


def test_frames_over_the_limit_or_not_json_are_refused():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(rpc._LEN.pack(rpc.MAX_FRAME + 1))
        with pytest.raises(rpc.RpcProtocolError, match="over the limit"):
            rpc.recv(b)
        a.sendall(rpc._LEN.pack(3) + b"{x}")
        with pytest.raises(rpc.RpcProtocolError, match="not JSON"):
            rpc.recv(b)
        a.sendall(rpc._LEN.pack(2) + b"[]")
        with pytest.raises(rpc.RpcProtocolError, match="not a JSON object"):
            rpc.recv(b)
    @dataclasses.dataclass
    class Secret:
        password: str

    with pytest.raises(rpc.RpcProtocolError, match="cannot cross"):
        rpc.encode(Secret("hunter2"))  # only the listed types cross
    with pytest.raises(rpc.RpcProtocolError, match="unknown type"):
        rpc.decode({"$": "Popen", "args": []})
