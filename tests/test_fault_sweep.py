"""Fail the Nth storage operation with EIO or ENOSPC, for N from 1 until the
workload completes (SQLite's way), on the crash simulator: then the fault
clears (space is freed), the power goes (what was not synced is lost), and
the store must reopen uncorrupted with everything it acknowledged, and take
writes again. A failed fsync must fail closed: the engine never retries one
and reports success.

`make test` runs every `STEP`th N; `TORTURE=1` (make torture) runs every N,
with one-shot and with sticky faults, and prints the figures."""

from __future__ import annotations

import errno
import os

import pytest

from engine.errors import CorruptionError
from engine.testing.faultfs import FaultFileSystem

from .failpoint_workload import main as workload
from .failpoint_workload import verify

TORTURE = bool(os.environ.get("TORTURE"))


def one_run(n: int, err: int, sticky: bool) -> tuple[bool, str | None]:
    """(did the fault fire, what went wrong after it or None)."""
    fs = FaultFileSystem(seed=n)
    fs.fail(after=n, err=err, sticky=sticky)
    lines: list[str] = []
    workload("/store", fs=fs, say=lines.append)
    fired = any(f.fired for f in fs._faults)
    fs.clear_faults()  # space freed, device back
    fs.crash()  # and a power loss: only what was synced survives
    try:
        verify("/store", lines, fs=fs)
    except CorruptionError as e:
        return fired, f"corrupt reopen: {e}"
    except AssertionError as e:
        return fired, f"false acknowledgement: {e}"
    return fired, None


def total_ops() -> int:
    fs = FaultFileSystem(seed=0)
    workload("/store", fs=fs, say=lambda line: None)
    return fs.op_count


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("sticky", [False, True] if TORTURE else [False], ids=lambda s: "sticky" if s else "once")
def test_the_nth_operation_fails(err, sticky):
    ops = total_ops()
    step = 1 if TORTURE else max(1, ops // 40)
    runs, failures = 0, []
    n = 1
    while True:
        fired, problem = one_run(n, err, sticky)
        runs += 1
        if problem:
            failures.append(f"N={n}: {problem}")
        if not fired:
            break  # the workload completed before its Nth operation
        n += step
    print(f"{errno.errorcode[err]} {'sticky' if sticky else 'once'}: {runs} runs over {ops} operations, "
          f"{len(failures)} failures")
    assert runs > 10 and not failures, failures[:5]
