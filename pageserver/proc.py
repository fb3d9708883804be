"""A process's identity, as the kernel vouches for it: its pid, its start
time in clock ticks since boot (/proc/<pid>/stat, field 22) and the boot's
id. A pid is reused; the three together are not."""

from __future__ import annotations


def process_start(pid: int, *, live: bool = False) -> int | None:
    """When process `pid` started, in clock ticks since boot (None: no such
    process; with `live`, also a zombie, dead but not yet reaped). With the
    boot, a process's identity: a reused pid differs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if live and fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of proc(5), counting from the state (field 3)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def is_process(pid: object, start: object, boot: object) -> bool:
    """Is `pid` still the process that started at `start` in boot `boot`?"""
    return (isinstance(pid, int) and isinstance(start, int) and isinstance(boot, str) and bool(boot)
            and boot == boot_id() and process_start(pid, live=True) == start)
