"""Memory cgroups for computes (pageserver.compute.cgroup): against a fake
cgroupfs under tmp_path (v1, hybrid, v2), and for real on this machine (root)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from pageserver.compute import cgroup
from pageserver.compute.cgroup import MemoryCgroups

from .conftest import in_ci
from .pg import requires_root

MiB = 1 << 20
UNLIMITED = "9223372036854771712"
NAME = "strata-1a2b3c"


class FakeCgroupFs:
    """What the kernel does on cgroupfs, for directories under `root`: mkdir
    fills a group with its control files, rmdir refuses a group with
    processes or children (EBUSY), and writes keep v1's memory <= memsw
    rule and v2's no-internal-processes rule."""

    def __init__(self, root: str, version: str) -> None:
        self.root, self.version = root, version
        self.memsw = True  # the kernel accounts swap (v1: memory.memsw.*)
        self.refuse: dict[str, int] = {}  # control file name -> errno its writes fail with
        self.pause: dict[str, tuple[threading.Event, threading.Event]] = {}  # path -> (reached, go)
        self._mkdir, self._rmdir, self._write = os.mkdir, os.rmdir, cgroup._write

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "mkdir", self.mkdir)
        monkeypatch.setattr(os, "rmdir", self.rmdir)
        monkeypatch.setattr(cgroup, "_write", self.write)

    def _ours(self, path: str) -> bool:
        return os.path.abspath(path).startswith(self.root + os.sep)

    def group(self, path: str, procs: list[int] | None = None, **files: str) -> str:
        """A group as the kernel would show it, with `files` overriding."""
        self.mkdir(path)
        files.setdefault("cgroup.procs", "".join(f"{p}\n" for p in procs or []))
        for name, text in files.items():
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
        return path

    def mkdir(self, path: str, mode: int = 0o777, *a: object, **kw: object) -> None:
        self._mkdir(path, mode)
        if not self._ours(path):
            return
        parent = os.path.dirname(path)
        if self.version == "v1":
            files = {"memory.limit_in_bytes": UNLIMITED,
                     "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"}
            if self.memsw:
                files["memory.memsw.limit_in_bytes"] = UNLIMITED
        else:
            try:
                enabled = cgroup._read(os.path.join(parent, "cgroup.subtree_control"))
            except FileNotFoundError:
                enabled = ""
            files = {"cgroup.controllers": enabled, "cgroup.subtree_control": ""}
            if "memory" in enabled.split():
                files.update({"memory.max": "max\n", "memory.swap.max": "max\n",
                              "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"})
        files["cgroup.procs"] = ""
        for name, text in files.items():
            with open(os.path.join(path, name), "w") as f:
                f.write(text)

    def rmdir(self, path: str, *a: object, **kw: object) -> None:
        if not self._ours(path) or not os.path.exists(os.path.join(path, "cgroup.procs")):
            return self._rmdir(path)
        if cgroup._read(os.path.join(path, "cgroup.procs")).split() or any(
                e.is_dir() for e in os.scandir(path)):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        shutil.rmtree(path)

    def write(self, path: str, value: str) -> None:
        d, name = os.path.split(path)
        if path in self.pause:
            reached, go = self.pause[path]
            reached.set()
            assert go.wait(10)
        if name in self.refuse:
            raise OSError(self.refuse[name], os.strerror(self.refuse[name]), path)
        memsw = os.path.join(d, "memory.memsw.limit_in_bytes")
        if name == "memory.limit_in_bytes" and os.path.exists(memsw) and int(value) > int(cgroup._read(memsw)):
            raise OSError(errno.EINVAL, "Invalid argument", path)  # memory <= memory + swap, always
        if name == "memory.memsw.limit_in_bytes" and int(value) < int(cgroup._read(os.path.join(d, "memory.limit_in_bytes"))):
            raise OSError(errno.EINVAL, "Invalid argument", path)
        if name == "cgroup.subtree_control":
            if value != "+memory":
                raise OSError(errno.EINVAL, "Invalid argument", path)
            if "memory" not in cgroup._read(os.path.join(d, "cgroup.controllers")).split():
                raise OSError(errno.ENOENT, "No such file or directory", path)
            if d != self.root and cgroup._read(os.path.join(d, "cgroup.procs")).split():
                raise OSError(errno.EBUSY, "Device or resource busy", path)
            value = "memory"
        if name == "cgroup.procs":
            value = cgroup._read(path) + value + "\n"
        self._write(path, value)


def _why(m: MemoryCgroups) -> str:
    """Why `m` cannot set limits (it must not)."""
    assert m.version is None and m.why_not is not None, m.parent
    return m.why_not


def _proc(tmp_path, text: str) -> str:
    p = tmp_path / "proc-self-cgroup"
    p.write_text(text)
    return str(p)


@pytest.fixture
def as_root(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


@pytest.fixture
def v1(tmp_path, monkeypatch, as_root) -> Iterator[tuple[FakeCgroupFs, MemoryCgroups]]:
    """This machine's layout: a tmpfs with v1 hierarchies, and a cgroup2
    `unified` without memory."""
    root = str(tmp_path / "cgroup")
    fs = FakeCgroupFs(root, "v1")
    fs.install(monkeypatch)
    os.makedirs(os.path.join(root, "unified"))
    (tmp_path / "cgroup" / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    fs.group(os.path.join(root, "memory"), [1])
    fs.group(os.path.join(root, "memory", "process_api"))
    fs.group(os.path.join(root, "memory", "process_api", "48b8"), [os.getpid()])
    proc = _proc(tmp_path, "9:name=systemd:/\n4:memory:/process_api/48b8\n1:cpu:/\n0::/\n")
    yield fs, MemoryCgroups(NAME, root=root, proc_cgroup=proc)


def _v2(tmp_path, monkeypatch, *, root_enabled: str = "memory", slice_enabled: str = "memory",
        slice_procs: tuple[int, ...] = ()) -> tuple[FakeCgroupFs, MemoryCgroups]:
    """A pure v2 system; we run in /system.slice/strata.service."""
    root = str(tmp_path / "cgroup")
    fs = FakeCgroupFs(root, "v2")
    fs.install(monkeypatch)
    fs.group(root, [1], **{"cgroup.controllers": "cpu io memory pids\n", "cgroup.subtree_control": root_enabled})
    fs.group(os.path.join(root, "system.slice"), list(slice_procs), **{"cgroup.subtree_control": slice_enabled})
    fs.group(os.path.join(root, "system.slice", "strata.service"), [os.getpid()])
    proc = _proc(tmp_path, "0::/system.slice/strata.service\n")
    return fs, MemoryCgroups(NAME, root=root, proc_cgroup=proc)


# --- detection ---------------------------------------------------------------------


def test_v1_hybrid_parent_below_our_group(v1):
    fs, m = v1
    assert (m.version, m.why_not) == ("v1", None)
    assert m.parent == os.path.join(fs.root, "memory", "process_api", "48b8", NAME)
    assert os.stat(m.parent).st_mode & 0o777 == 0o700


def test_v2_parent_beside_our_group(tmp_path, monkeypatch, as_root):
    fs, m = _v2(tmp_path, monkeypatch)
    assert (m.version, m.why_not) == ("v2", None)
    assert m.parent == os.path.join(fs.root, "system.slice", NAME)  # ours has a process: not below it
    assert cgroup._read(os.path.join(m.parent, "cgroup.subtree_control")).split() == ["memory"]
    assert os.stat(m.parent).st_mode & 0o777 == 0o700


def test_v2_at_the_root_parent_below_it(tmp_path, monkeypatch, as_root):
    fs, _ = _v2(tmp_path, monkeypatch, root_enabled="")
    m = MemoryCgroups(NAME, root=fs.root, proc_cgroup=_proc(tmp_path, "0::/\n"))
    assert (m.version, m.why_not) == ("v2", None)
    assert m.parent == os.path.join(fs.root, NAME)
    assert cgroup._read(os.path.join(fs.root, "cgroup.subtree_control")) == "memory"  # the root is exempt


def test_v2_memory_enabled_where_it_can_be(tmp_path, monkeypatch, as_root):
    fs, m = _v2(tmp_path, monkeypatch, slice_enabled="")
    assert (m.version, m.why_not) == ("v2", None)
    assert cgroup._read(os.path.join(fs.root, "system.slice", "cgroup.subtree_control")).split() == ["memory"]


def test_v2_parent_with_processes_says_why(tmp_path, monkeypatch, as_root):
    fs, m = _v2(tmp_path, monkeypatch, slice_enabled="", slice_procs=(4242,))
    assert "no-internal-processes" in _why(m)
    assert "system.slice" in _why(m)
    assert not os.path.exists(os.path.join(fs.root, "system.slice", NAME))


def test_v2_memory_not_available_to_the_parent(tmp_path, monkeypatch, as_root):
    fs, _ = _v2(tmp_path, monkeypatch, slice_enabled="")
    with open(os.path.join(fs.root, "cgroup.subtree_control"), "w") as f:
        f.write("cpu\n")  # the root does not pass memory on
    with open(os.path.join(fs.root, "system.slice", "cgroup.controllers"), "w") as f:
        f.write("cpu\n")
    m = MemoryCgroups(NAME, root=fs.root, proc_cgroup=_proc(tmp_path, "0::/system.slice/strata.service\n"))
    assert "does not have the memory controller" in _why(m)


def test_v2_without_memory_at_all(tmp_path, as_root):
    (tmp_path / "cgroup.controllers").write_text("cpu io pids\n")
    m = MemoryCgroups(NAME, root=str(tmp_path), proc_cgroup=_proc(tmp_path, "0::/\n"))
    assert "without the memory controller" in _why(m)


def test_hybrid_without_v1_memory(tmp_path, as_root):
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    m = MemoryCgroups(NAME, root=str(tmp_path), proc_cgroup=_proc(tmp_path, "1:cpu:/\n0::/\n"))
    assert "no memory controller" in _why(m)


def test_our_group_missing(v1, tmp_path):
    fs, _ = v1
    m = MemoryCgroups(NAME, root=fs.root, proc_cgroup=_proc(tmp_path, "4:memory:/elsewhere\n"))
    assert "/elsewhere is not there" in _why(m)
    assert not os.path.exists(os.path.join(fs.root, "memory", "elsewhere"))


def test_not_root(v1, monkeypatch, caplog):
    fs, m = v1
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with caplog.at_level(logging.INFO, logger="strata.compute"):
        assert m.create("c1", 64 * MiB) is None
        assert m.create("c2", 64 * MiB) is None
    assert "root" in _why(m)
    assert m.reap() == 0
    assert [r.getMessage() for r in caplog.records] == [f"computes run without memory limits: {m.why_not}"]
    assert not os.path.exists(os.path.join(fs.root, "memory", "process_api", "48b8", NAME))


def test_detection_is_lazy_and_once(v1, monkeypatch):
    fs, m = v1
    assert not os.path.exists(os.path.join(fs.root, "memory", "process_api", "48b8", NAME))
    calls = []
    find = MemoryCgroups._find

    def slow_find(self: MemoryCgroups) -> str:
        calls.append(1)
        time.sleep(0.05)  # the others arrive meanwhile
        return find(self)

    monkeypatch.setattr(MemoryCgroups, "_find", slow_find)
    threads = [threading.Thread(target=lambda: m.version) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.version == "v1" and len(calls) == 1


# --- groups -------------------------------------------------------------------------


def test_v1_create_set_limit_remove(v1):
    fs, m = v1
    cg = m.create("c1", 64 * MiB)
    assert cg is not None and cg.path == os.path.join(m.parent, "c1")
    assert os.stat(cg.path).st_mode & 0o777 == 0o700

    def limits() -> tuple[int, int]:
        return (int(cgroup._read(os.path.join(cg.path, "memory.limit_in_bytes"))),
                int(cgroup._read(os.path.join(cg.path, "memory.memsw.limit_in_bytes"))))

    assert limits() == (64 * MiB, 64 * MiB)
    cg.set_limit(512 * MiB)  # raised: memsw first (memory <= memsw, always)
    assert limits() == (512 * MiB, 512 * MiB)
    cg.set_limit(32 * MiB)  # lowered: memsw last
    assert limits() == (32 * MiB, 32 * MiB)
    cg.add(4242)
    assert cg.pids() == [4242]
    cg.remove()
    assert os.path.isdir(cg.path)  # processes left: kept for reap
    with open(os.path.join(cg.path, "cgroup.procs"), "w"):
        pass  # (they exit)
    cg.remove()
    assert not os.path.exists(cg.path)
    cg.remove()  # idempotent
    assert cg.pids() == []


def test_v1_without_memsw(v1):
    fs, m = v1
    fs.memsw = False  # a kernel without swap accounting
    cg = m.create("c1", 64 * MiB)
    cg.set_limit(128 * MiB)
    assert int(cgroup._read(os.path.join(cg.path, "memory.limit_in_bytes"))) == 128 * MiB
    assert not os.path.exists(os.path.join(cg.path, "memory.memsw.limit_in_bytes"))


def test_v2_create_sets_memory_max_and_no_swap(tmp_path, monkeypatch, as_root):
    fs, m = _v2(tmp_path, monkeypatch)
    cg = m.create("c1", 64 * MiB)
    assert cg is not None and cg.path == os.path.join(fs.root, "system.slice", NAME, "c1")
    assert cgroup._read(os.path.join(cg.path, "memory.max")) == str(64 * MiB)
    assert cgroup._read(os.path.join(cg.path, "memory.swap.max")) == "0"
    cg.set_limit(1 * MiB)
    assert cgroup._read(os.path.join(cg.path, "memory.max")) == str(MiB)
    cg.remove()
    assert not os.path.exists(cg.path)


def test_limits_below_one_mib_refused(v1):
    fs, m = v1
    with pytest.raises(ValueError, match="1048575"):
        m.create("c1", MiB - 1)
    with pytest.raises(ValueError, match="1.5"):
        m.create("c1", 1.5)  # type: ignore[arg-type]
    cg = m.create("c1", MiB)
    with pytest.raises(ValueError, match="4096"):
        cg.set_limit(4096)
    assert int(cgroup._read(os.path.join(cg.path, "memory.limit_in_bytes"))) == MiB
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            m.create(bad, 64 * MiB)


def test_refused_limit_raises_and_leaves_no_group(v1):
    fs, m = v1
    fs.refuse["memory.limit_in_bytes"] = errno.EBUSY
    with pytest.raises(OSError, match=r"cannot set the memory limit of cgroup .*/c1 to 67108864 bytes") as e:
        m.create("c1", 64 * MiB)
    assert e.value.errno == errno.EBUSY
    assert not os.path.exists(os.path.join(m.parent, "c1"))


def test_reap_removes_empty_leftovers_only(v1):
    fs, m = v1
    parent = os.path.join(fs.root, "memory", "process_api", "48b8", NAME)
    fs.group(parent)  # a previous run's
    fs.group(os.path.join(parent, "old1"))
    fs.group(os.path.join(parent, "old2"))
    fs.group(os.path.join(parent, "busy"), [4242])
    live = m.create("live", 64 * MiB)  # ours, not yet holding a process
    assert m.reap() == 2
    assert {e.name for e in os.scandir(parent) if e.is_dir()} == {"busy", "live"}
    live.remove()
    assert m.reap() == 0  # busy: still has a process


def test_reap_leaves_a_group_being_created(v1):
    """create() paused after its mkdir, before its limit: reap() must not take the group."""
    fs, m = v1
    assert m.version == "v1"
    reached, go = threading.Event(), threading.Event()
    fs.pause[os.path.join(m.parent, "c1", "memory.limit_in_bytes")] = (reached, go)
    made: list[cgroup.Cgroup | None] = []
    t = threading.Thread(target=lambda: made.append(m.create("c1", 64 * MiB)))
    t.start()
    try:
        assert reached.wait(10)
        assert m.reap() == 0
        assert os.path.isdir(os.path.join(m.parent, "c1"))
    finally:
        go.set()
        t.join()
    assert made and made[0] is not None
    assert int(cgroup._read(os.path.join(made[0].path, "memory.limit_in_bytes"))) == 64 * MiB


def test_oom_kills_parsing(v1, tmp_path):
    fs, m = v1
    cg = m.create("c1", 64 * MiB)
    oom = os.path.join(cg.path, "memory.oom_control")
    assert cg.oom_kills() == 0
    with open(oom, "w") as f:
        f.write("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert cg.oom_kills() == 3
    with open(oom, "w") as f:
        f.write("oom_kill_disable 0\nunder_oom 0\n")  # an older kernel: it does not say
    assert cg.oom_kills() == 0
    os.unlink(oom)
    assert cg.oom_kills() == 0
    v2 = cgroup.Cgroup(str(tmp_path), "v2")
    (tmp_path / "memory.events").write_text("low 0\nhigh 1\nmax 9\noom 4\noom_kill 2\noom_group_kill 5\n")
    assert v2.oom_kills() == 2


@requires_root
def test_read_only_cgroupfs(tmp_path):
    src, ro = str(tmp_path / "src"), str(tmp_path / "ro")
    os.makedirs(os.path.join(src, "memory", "g"))
    os.makedirs(ro)
    proc = _proc(tmp_path, "4:memory:/g\n")
    subprocess.run(["mount", "--bind", src, ro], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
        m = MemoryCgroups(NAME, root=ro, proc_cgroup=proc)
        assert "Read-only" in _why(m)
        os.mkdir(os.path.join(src, "memory", "g", NAME))  # left by a previous run
        m = MemoryCgroups(NAME, root=ro, proc_cgroup=proc)
        assert "read-only" in _why(m)
        assert m.create("c1", 64 * MiB) is None
    finally:
        subprocess.run(["umount", ro], check=True)


# --- for real (root) -----------------------------------------------------------------

HOG = "import sys; sys.stdin.buffer.read(1); b = b'x' * (256 << 20); sys.stdout.write('survived')"


@pytest.fixture
def real() -> Iterator[MemoryCgroups]:
    """A parent group of this test's, removed at the end with whatever is in it."""
    m = MemoryCgroups(f"strata-test-{uuid.uuid4().hex[:8]}")
    if m.version is None:
        why = f"this machine cannot set memory limits: {m.why_not}"
        pytest.fail(f"CI runs every test: {why}") if in_ci() else pytest.skip(why)
    try:
        yield m
    finally:
        parent, version = m.parent, m.version
        assert parent is not None and version is not None
        for name in os.listdir(parent):
            child = cgroup.Cgroup(os.path.join(parent, name), version)
            if os.path.isdir(child.path):
                for pid in child.pids():
                    os.kill(pid, signal.SIGKILL)
                for _ in range(100):
                    if not child.pids():
                        break
                    time.sleep(0.05)
                os.rmdir(child.path)
        os.rmdir(parent)


def _hog(cg: cgroup.Cgroup) -> subprocess.CompletedProcess[str]:
    """The hog, moved in before it allocates."""
    p = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        cg.add(p.pid)
        assert cg.pids() == [p.pid]
        out, _ = p.communicate("x", timeout=120)
    finally:
        p.kill()
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def _kernel_counts_oom_kills(cg: cgroup.Cgroup) -> bool:
    file = "memory.events" if cg.version == "v2" else "memory.oom_control"
    try:
        return "oom_kill " in cgroup._read(os.path.join(cg.path, file))
    except OSError:
        return False


@requires_root
def test_real_limit_kills_a_process_past_it(real):
    cg = real.create("oom", 64 * MiB)
    assert cg is not None and os.stat(cg.path).st_mode & 0o777 == 0o700
    assert cg.oom_kills() == 0
    r = _hog(cg)
    assert r.returncode == -signal.SIGKILL, r
    if _kernel_counts_oom_kills(cg):
        assert cg.oom_kills() >= 1
    cg.remove()
    assert not os.path.exists(cg.path)


@requires_root
def test_real_process_within_the_limit_survives(real):
    cg = real.create("roomy", 512 * MiB)
    r = _hog(cg)
    assert (r.returncode, r.stdout) == (0, "survived"), r
    assert cg.oom_kills() == 0


@requires_root
def test_real_set_limit_raise_and_lower(real):
    cg = real.create("moving", 64 * MiB)
    cg.set_limit(512 * MiB)  # raised (v1: memsw first)
    r = _hog(cg)
    assert r.returncode == 0, r
    cg.set_limit(64 * MiB)  # lowered
    r = _hog(cg)
    assert r.returncode == -signal.SIGKILL, r


@requires_root
def test_real_lowered_while_running(real):
    cg = real.create("squeezed", 512 * MiB)
    p = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE)
    try:
        cg.add(p.pid)
        cg.set_limit(64 * MiB)
        p.communicate(b"x", timeout=120)
        assert p.returncode == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


@requires_root
def test_real_add_remove_reap(real):
    cg = real.create("busy", 64 * MiB)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cg.add(gone.pid)  # exited and reaped: ignored
    assert cg.pids() == []
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cg.add(p.pid)
        assert cg.pids() == [p.pid]
        cg.remove()  # a process left: kept, and not reaped
        assert os.path.isdir(cg.path)
        assert real.reap() == 0
    finally:
        p.kill()
        p.wait()
    for _ in range(100):
        if not cg.pids():
            break
        time.sleep(0.05)
    os.mkdir(os.path.join(real.parent, "leftover"), 0o700)
    assert real.reap() == 2
    assert not [n for n in os.listdir(real.parent) if os.path.isdir(os.path.join(real.parent, n))]
