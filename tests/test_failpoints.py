"""Every registered failpoint, with `exit` (a crash right there) and with
`raise` (a failure right there, the process going on): the workload of
tests/failpoint_workload.py runs in a subprocess with one failpoint armed;
then the store is reopened, checked end to end, and compared with what the
workload had acknowledged."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine import Store, failpoints
from engine.failpoints import REGISTERED, FailpointError

from .failpoint_workload import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [(name, action) for name in REGISTERED for action in ("exit", "raise")]


def run_workload(path: str, arm: str | None) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("STRATA_FAILPOINTS", None)
    if arm:
        env["STRATA_FAILPOINTS"] = arm
    r = subprocess.run([sys.executable, "-m", "tests.failpoint_workload", path], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    lines = r.stdout.split("\n")[:-1]  # complete lines only
    if r.returncode not in (0, failpoints.EXIT_STATUS):
        raise AssertionError(f"workload failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.returncode, lines


def test_the_workload_passes_every_registered_failpoint(tmp_path):
    """Unarmed, the workload completes and everything it acknowledged reads back."""
    code, lines = run_workload(str(tmp_path / "s"), None)
    assert code == 0 and lines[-1] == "done"
    verify(str(tmp_path / "s"), lines)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    base = tmp_path_factory.mktemp("failpoints")

    def one(case):
        name, action = case
        path = str(base / f"{name}-{action}")
        code, lines = run_workload(path, f"{name}={action}")
        fired = code == failpoints.EXIT_STATUS if action == "exit" else f"fired {name}" in lines
        return case, fired, path, lines

    with ThreadPoolExecutor(2) as ex:
        return {case: rest for case, *rest in ex.map(one, CASES)}


@pytest.mark.parametrize("case", CASES, ids=[f"{n}={a}" for n, a in CASES])
def test_a_failpoint_loses_nothing_acknowledged(outcomes, case):
    fired, path, lines = outcomes[case]
    assert fired, f"{case[0]} never fired with {case[1]}: the workload does not pass it"
    verify(path, lines)


def test_every_registered_failpoint_is_exercised(outcomes):
    exercised = sum(1 for fired, _, _ in outcomes.values() if fired)
    print(f"failpoints exercised: {exercised} of {len(CASES)} ({len(REGISTERED)} failpoints x exit, raise)")
    assert exercised == len(CASES)


def test_failpoints_are_checked_and_cleared():
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.arm("wal-sideways", "raise")
    with pytest.raises(ValueError, match="unknown failpoint action"):
        failpoints.arm("wal-before-fsync", "explode")
    failpoints.arm("timeline-before-create", "raise")
    try:
        with pytest.raises(FailpointError):
            failpoints.hit("timeline-before-create")
    finally:
        failpoints.disarm()
    failpoints.hit("timeline-before-create")  # off again: nothing happens


def test_pause_holds_the_caller_until_disarmed(tmp_path):
    store = Store.open(str(tmp_path / "s"), background=False)
    try:
        failpoints.arm("timeline-before-create", "pause")
        made: list[str] = []
        t = threading.Thread(target=lambda: made.append(store.create_timeline().id))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not made  # held at the failpoint
        failpoints.disarm("timeline-before-create")
        t.join(10)
        assert made and made[0] in store.timeline_ids()
    finally:
        failpoints.disarm()
        store.close()
