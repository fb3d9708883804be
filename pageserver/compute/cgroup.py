"""Memory limits for computes, through Linux cgroups (root only).

Each page server owns one parent group, `<name>`, and each compute one
child group in it, `<name>/<compute id>`, whose limit bounds the
postmaster and every process it forks afterwards. The parent is not
limited: it is a namespace, so that `reap` finds what a killed page
server left (the same name is used again) and nothing else is touched.

    cgroup v2   <root> is cgroup2 and its cgroup.controllers lists memory; our
                group is the `0::<path>` line of /proc/self/cgroup. Limit:
                memory.max (and memory.swap.max 0); OOM kills: memory.events.
    cgroup v1   <root>/memory is the memory hierarchy (also on hybrid systems,
                whose <root>/unified is cgroup2 without memory); our group is
                the `N:memory:<path>` line. Limit: memory.limit_in_bytes, then
                memory.memsw.limit_in_bytes (memory plus swap) where the
                kernel has it; OOM kills: the oom_kill line of
                memory.oom_control (0 where the kernel does not say).

In v1 the parent goes below our own group. In v2 a child gets the memory
controller only when its parent lists `+memory` in cgroup.subtree_control,
and a group with processes of its own cannot do that (the "no internal
processes" rule; only the root is exempt). Our group holds this process,
so the parent goes below it only at the root, else beside it, below our
group's parent, which must have memory enabled for its children (it is
enabled there if it can be). A v1 memsw limit is never below the memory
limit: a raise writes memsw first, a lower writes it last.

Writing a pid to cgroup.procs moves that process only: children forked
before it stay where they were, so a compute is added as soon as it starts.
Where limits cannot be set (not root, no memory controller, read-only,
a rule refused), `version` is None, `why_not` says why, and `create`
returns None. Detection is lazy (first use) and done once.

Concurrency: `MemoryCgroups._lock` guards the detection result and
`_live` (groups handed out and not yet removed, which `reap` leaves
alone; a name is live before its directory exists). A Cgroup holds no
mutable state, but its v1 limit is two writes: one caller at a time calls
`set_limit` on a group. Nothing blocks but on cgroupfs (no disk I/O).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading

log = logging.getLogger("strata.compute")

MIN_LIMIT = 1 << 20  # bytes


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _count(text: str, key: str) -> int:
    """The value of the `key N` line of a flat-keyed cgroup file (0: none)."""
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return 0


def _check_limit(limit: int) -> None:
    if not isinstance(limit, int) or limit < MIN_LIMIT:
        raise ValueError(f"memory limit {limit!r} bytes: must be an int of at least {MIN_LIMIT} (1 MiB)")


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} cannot name a cgroup")


class Cgroup:
    """One compute's group: a directory of cgroupfs."""

    def __init__(self, path: str, version: str, owner: MemoryCgroups | None = None) -> None:
        self.path = path
        self.version = version
        self._owner = owner

    def set_limit(self, limit: int) -> None:
        """Set the limit, raised or lowered while processes run (a lower one
        than they use makes the kernel reclaim, or refuse: EBUSY in v1)."""
        _check_limit(limit)
        p = self.path
        if self.version == "v2":
            steps = [("memory.max", str(limit))]
            if os.path.exists(os.path.join(p, "memory.swap.max")):
                steps.append(("memory.swap.max", "0"))
        else:
            steps = [("memory.limit_in_bytes", str(limit))]
            if os.path.exists(os.path.join(p, "memory.memsw.limit_in_bytes")):
                raising = limit > int(_read(os.path.join(p, "memory.limit_in_bytes")))
                steps.insert(0 if raising else 1, ("memory.memsw.limit_in_bytes", str(limit)))
        for file, value in steps:
            try:
                _write(os.path.join(p, file), value)
            except OSError as e:
                raise OSError(e.errno, f"cannot set the memory limit of cgroup {p} to {limit} bytes "
                                       f"({file}): {e.strerror}", os.path.join(p, file)) from e

    def add(self, pid: int) -> None:
        """Move process `pid` in (not its existing children); a gone one is ignored."""
        try:
            _write(os.path.join(self.path, "cgroup.procs"), str(pid))
        except ProcessLookupError:
            pass

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in _read(os.path.join(self.path, "cgroup.procs")).split()]
        except FileNotFoundError:
            return []

    def oom_kills(self) -> int:
        """Processes the OOM killer ended in this group so far (0: the kernel does not say)."""
        file = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            return _count(_read(os.path.join(self.path, file)), "oom_kill")
        except OSError:
            return 0

    def remove(self) -> None:
        """Remove the group; one with processes left is left for `reap`."""
        if self._owner is not None:
            self._owner._release(os.path.basename(self.path))
        try:
            os.rmdir(self.path)
            log.debug("removed cgroup %s", self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cgroup %s not removed (%s: processes %s): reap() will try again",
                        self.path, e.strerror, self.pids())


class MemoryCgroups:
    """One parent group per page server (named by `name`, e.g. "strata-1a2b3c"),
    beside or below this process's own memory cgroup; one child group per compute."""

    def __init__(self, name: str, root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> None:
        _check_name(name)
        self.name, self.root, self.proc_cgroup = name, root, proc_cgroup
        self._lock = threading.Lock()
        self._detected = False
        self._version: str | None = None
        self._why: str | None = None
        self._parent = ""  # the parent group's directory, once detected
        self._logged = False
        self._live: set[str] = set()

    @property
    def version(self) -> str | None:
        return self._detect()[0]

    @property
    def why_not(self) -> str | None:
        return self._detect()[1]

    @property
    def parent(self) -> str | None:
        """The parent group's directory (None: unavailable)."""
        return self._parent if self._detect()[0] else None

    def create(self, compute_id: str, limit: int) -> Cgroup | None:
        _check_limit(limit)
        _check_name(compute_id)
        version, why = self._detect()
        with self._lock:
            if version is None:
                if not self._logged:
                    self._logged = True
                    log.info("computes run without memory limits: %s", why)
                return None
            self._live.add(compute_id)
        cg = Cgroup(os.path.join(self._parent, compute_id), version, self)
        try:
            with contextlib.suppress(FileExistsError):  # (a previous run's: reused)
                os.mkdir(cg.path, 0o700)
            cg.set_limit(limit)
        except BaseException:
            cg.remove()
            raise
        log.info("compute %s: memory cgroup %s (%s), limit %d bytes", compute_id, cg.path, version, limit)
        return cg

    def reap(self) -> int:
        """Remove the empty child groups that no Cgroup of ours holds (a
        previous run's); a non-empty one is left alone. Returns how many."""
        if self._detect()[0] is None:
            return 0
        n = 0
        with self._lock:
            try:
                names = [e.name for e in os.scandir(self._parent) if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                return 0
            for name in set(names) - self._live:
                try:
                    os.rmdir(os.path.join(self._parent, name))
                    n += 1
                except OSError as e:
                    log.info("cgroup %s/%s left: %s", self._parent, name, e.strerror)
        if n:
            log.info("reaped %d leftover compute cgroups in %s", n, self._parent)
        return n

    def close(self) -> None:
        """Remove the parent group if no child is left in it (else the next
        run reaps and reuses it)."""
        with self._lock:
            if not self._detected or self._version is None or self._live:
                return
            try:
                os.rmdir(self._parent)
            except OSError as e:
                log.info("cgroup %s left: %s", self._parent, e.strerror)

    def _release(self, compute_id: str) -> None:
        with self._lock:
            self._live.discard(compute_id)

    def _detect(self) -> tuple[str | None, str | None]:
        with self._lock:
            if not self._detected:
                try:
                    self._version, self._why = self._find(), None
                except _Unavailable as e:
                    self._version, self._why = None, str(e)
                self._detected = True
            return self._version, self._why

    def _find(self) -> str:
        if os.geteuid() != 0:
            raise _Unavailable("memory limits need root (cgroup directories are root's)")
        try:
            lines = [line.split(":", 2) for line in _read(self.proc_cgroup).splitlines()]
        except OSError as e:
            raise _Unavailable(f"cannot read {self.proc_cgroup}: {e.strerror}") from e
        paths = {c: p for _, cs, p in (x for x in lines if len(x) == 3) for c in cs.split(",")}
        try:
            v2 = "memory" in _read(os.path.join(self.root, "cgroup.controllers")).split()
        except OSError:
            v2 = None  # not cgroup2 at root
        if v2 is False:
            raise _Unavailable(f"{self.root} is cgroup v2 without the memory controller")
        if v2 and "" in paths:
            mount, version = self.root, "v2"
            own = os.path.normpath(mount + paths[""])
        elif "memory" in paths and os.path.isdir(os.path.join(self.root, "memory")):
            mount, version = os.path.join(self.root, "memory"), "v1"
            own = os.path.normpath(mount + paths["memory"])
        else:
            raise _Unavailable(f"no memory controller: {self.root} is not cgroup v2 with it, and "
                               f"{self.proc_cgroup} names no v1 memory group")
        if not os.path.isdir(own):
            raise _Unavailable(f"our memory cgroup {own} is not there (another cgroup namespace's view?)")
        base = own
        if version == "v2":  # below ours where the rule allows it (the root), else beside it
            for base in [own] if own == mount else [own, os.path.dirname(own)]:
                if (why := _enable_memory(base)) is None:
                    break
            else:
                raise _Unavailable(why)
        self._parent = os.path.join(base, self.name)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self._parent, 0o700)
        except OSError as e:
            raise _Unavailable(f"cannot make cgroup {self._parent}: {e.strerror}") from e
        if not os.access(self._parent, os.W_OK):  # (an existing one on a read-only mount)
            raise _Unavailable(f"cannot write in cgroup {self._parent}: read-only")
        if version == "v2" and (why := _enable_memory(self._parent)) is not None:
            raise _Unavailable(why)
        return version


class _Unavailable(Exception):
    pass


def _enable_memory(group: str) -> str | None:
    """Let `group`'s children have the v2 memory controller (None), or say why not."""
    try:
        if "memory" in _read(os.path.join(group, "cgroup.subtree_control")).split():
            return None
        if "memory" not in _read(os.path.join(group, "cgroup.controllers")).split():
            return f"cgroup {group} does not have the memory controller (its parent does not enable it)"
        _write(os.path.join(group, "cgroup.subtree_control"), "+memory")
        return None
    except OSError as e:
        if e.errno == errno.EBUSY:  # (the root is exempt)
            return (f"cgroup {group} has processes of its own, so cgroup v2 does not let its children "
                    "have the memory controller (the no-internal-processes rule)")
        return f"cannot enable the memory controller below cgroup {group}: {e.strerror}"
