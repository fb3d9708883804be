"""A process is taken for Strata's only by an identity the kernel vouches
for: the service by the flock it holds on its home's lock, a compute's
postmaster by its pid and start time, a backend by its working directory.
A pid a dead one left in a file, now another process's, is never
signalled, whatever that process is called."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from pageserver.compute.postgres import BOOT_ID, process_start, reap_stale, signal_process
from pageserver.service import daemon


def impostor(name: str) -> subprocess.Popen:
    """A live process whose command line says `name`."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", name])


def test_a_stale_service_file_does_not_make_another_process_the_service(tmp_path):
    home = str(tmp_path)
    p = impostor("pageserver.service")  # the name the old check looked for
    try:
        with open(os.path.join(home, daemon.STATE), "w") as f:
            json.dump({"pid": p.pid, "api": "http://127.0.0.1:1", "proxy": "127.0.0.1:1"}, f)
        assert daemon.read_state(home) is None
        assert daemon.stop(home) is None  # `strata down`: not running, and nothing signalled
        time.sleep(0.1)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_a_service_file_naming_a_live_pid_by_another_start_or_boot_is_stale(tmp_path):
    """The fast path (pid, start time, boot: no /proc/locks) takes only the
    process that wrote the file; a pid reused since, or one from before a
    reboot, falls to the lock's word (nobody holds it here: not running)."""
    home = str(tmp_path)
    p = impostor("pageserver.service")
    try:
        start = process_start(p.pid)
        for wrong in ({"start": start - 1, "boot": BOOT_ID}, {"start": start, "boot": "another-boot"},
                      {"start": str(start), "boot": BOOT_ID}, {}):
            with open(os.path.join(home, daemon.STATE), "w") as f:
                json.dump({"pid": p.pid, "api": "http://127.0.0.1:1", **wrong}, f)
            assert daemon.read_state(home) is None, wrong
        with open(os.path.join(home, daemon.STATE), "w") as f:
            json.dump({"pid": p.pid, "api": "http://127.0.0.1:1", "start": start, "boot": BOOT_ID,
                       "home": home + "-elsewhere"}, f)
        assert daemon.read_state(home) is None  # (a copied home's file names the original's service)
        with open(os.path.join(home, daemon.STATE), "w") as f:
            json.dump({"pid": p.pid, "api": "http://127.0.0.1:1", "start": start, "boot": BOOT_ID, "home": home}, f)
        assert daemon.read_state(home) is not None  # (the writer itself, alive: as the service writes it)
        p.kill()
        time.sleep(0.2)  # dead, not yet reaped: a zombie keeps its pid and start time, and is not the service
        assert daemon.read_state(home) is None
    finally:
        p.kill()
        p.wait()


def test_the_service_is_whoever_holds_its_lock(tmp_path):
    home = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pageserver.service import daemon; "
        f"daemon.hold_service_lock({home!r}); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert daemon.service_pid(home) == holder.pid
        with open(os.path.join(home, daemon.STATE), "w") as f:
            json.dump({"pid": holder.pid}, f)
        assert daemon.read_state(home) == {"pid": holder.pid}
        try:
            daemon.hold_service_lock(home)
        except daemon.AnotherServiceError as e:
            assert f"pid {holder.pid}" in str(e)
        else:
            raise AssertionError("a second service took the lock")
    finally:
        holder.kill()
        holder.wait()
    assert daemon.service_pid(home) is None  # the lock died with it
    assert daemon.read_state(home) is None


def test_a_reused_pid_in_a_compute_state_file_is_not_killed(tmp_path):
    computes = tmp_path / "computes"
    (computes / "c1").mkdir(parents=True)
    p = impostor("postgres")  # the name the old cleanup looked for
    try:
        start = process_start(p.pid)
        assert start is not None
        (computes / "c1" / "state.json").write_text(json.dumps(
            {"pid": p.pid, "start": start - 1, "boot": BOOT_ID, "pgdata": str(tmp_path / "mnt" / "c1")}))
        assert reap_stale(str(computes)) == 1  # its directory is cleaned up ...
        time.sleep(0.1)
        assert p.poll() is None  # ... and the process that got its pid lives
        (computes / "c2").mkdir()
        (computes / "c2" / "state.json").write_text(json.dumps(
            {"pid": p.pid, "start": start, "boot": BOOT_ID, "pgdata": str(tmp_path / "mnt" / "c2")}))
        reap_stale(str(computes))  # the same identity: that is the compute's postmaster
        assert p.wait(10) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


def test_after_a_reboot_a_recorded_pid_is_nobody_s(tmp_path):
    computes = tmp_path / "computes"
    (computes / "c1").mkdir(parents=True)
    p = impostor("postgres")
    try:
        (computes / "c1" / "state.json").write_text(json.dumps(
            {"pid": p.pid, "start": process_start(p.pid), "boot": "another-boot", "pgdata": "/nonexistent"}))
        reap_stale(str(computes))
        time.sleep(0.1)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_a_signal_is_sent_only_while_the_check_holds():
    p = impostor("x")
    try:
        assert not signal_process(p.pid, signal.SIGTERM, lambda: False)
        time.sleep(0.1)
        assert p.poll() is None
        assert signal_process(p.pid, signal.SIGTERM, lambda: True)
        assert p.wait(10) == -signal.SIGTERM
    finally:
        p.kill()
        p.wait()


def test_the_lock_holder_is_found_beside_a_waiter_and_a_posix_lock(tmp_path):
    import fcntl

    home = str(tmp_path)
    daemon.hold_service_lock(home)  # (this process: the descriptor stays open for the test's life)
    try:
        path = os.path.join(home, daemon.LOCK)
        waiter = subprocess.Popen([sys.executable, "-c", (
            f"import fcntl, os; fd = os.open({path!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)")])
        other = os.open(path, os.O_RDWR)
        fcntl.lockf(other, fcntl.LOCK_EX, 10, 0)  # somebody's POSIX lock on the same file
        time.sleep(0.2)  # (the waiter blocks: its line in /proc/locks is "->")
        assert daemon.service_pid(home) == os.getpid()
    finally:
        waiter.kill()
        waiter.wait()


def test_a_process_in_a_neighbouring_directory_is_not_a_backend(tmp_path):
    from pageserver.compute.postgres import kill_compute

    (tmp_path / "c2").mkdir()
    (tmp_path / "c2 backup").mkdir()
    inside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path / "c2")
    beside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path / "c2 backup")
    try:
        assert kill_compute(None, None, str(tmp_path / "c2")) == 1
        assert inside.wait(10) == -signal.SIGKILL
        time.sleep(0.1)
        assert beside.poll() is None
    finally:
        for p in (inside, beside):
            p.kill()
            p.wait()
