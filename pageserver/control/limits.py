"""What one database may take: its limits, the service's defaults, and
where each is enforced.

    limit                 of              enforced by
    max_size              each branch     the FUSE layer: a write that would grow the branch's
                                          relation files (in base/, global/ and in-place
                                          tablespaces; temporary ones too) past it gets
                                          ENOSPC, so PostgreSQL says "could not extend file
                                          ... No space left on device" and rolls back (a
                                          headroom of 1/16 for first pages, maps and system
                                          catalogs, so TRUNCATE and VACUUM work at the cap;
                                          nothing refused while postgres recovers); WAL and
                                          temporary files are held near it by settings on
                                          the command line (see `Limits.settings`). Not
                                          counted: what a superuser writes outside its
                                          relations (COPY TO a file, a tablespace linked
                                          elsewhere): tenants are superusers
    branch_connections    each branch     the proxy (53300 past it)
    shared_buffers,       each compute    its postgres command line (-c, which ALTER SYSTEM
    work_mem                              cannot override: shared_buffers is a ceiling, work_mem
                                          the default a session starts with)
    memory                each compute    a memory cgroup holding all its processes, where the
                                          system allows one (`pageserver.compute.cgroup`): past
                                          it the kernel kills a backend, and postgres restarts
                                          the others, as after any crash
    creations_per_minute  each token      the control plane: databases, branches and passwords
                                          made through the API with one token, as a token
                                          bucket (a burst of that many, refilled evenly); past
                                          it, 429 with Retry-After

A database record keeps only the limits given when it was created (or
changed since); the rest follow the service's defaults (`strata up
--max-size ...`), so changing a default reaches every database that did
not choose its own. 0 means no limit, for the limits that allow none.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pageserver.errors import BadRequestError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": TiB, "tb": TiB, "tib": TiB}
_SIZES = ("max_size", "shared_buffers", "work_mem", "memory")
_NONE = ("none", "unlimited")
MAX_BRANCH_CONNECTIONS = 97  # a compute's 100 less the 3 its superusers' reserve keeps (see the proxy)


@dataclass(frozen=True)
class Limits:
    """A set of limits; None is "the service's default" (see `over`)."""

    max_size: int | None = None  # bytes; 0: none
    branch_connections: int | None = None
    shared_buffers: int | None = None  # bytes
    work_mem: int | None = None  # bytes
    memory: int | None = None  # bytes; 0: none
    creations_per_minute: int | None = None  # 0: none

    def over(self, base: Limits) -> Limits:
        """These limits where they are set, `base`'s elsewhere."""
        return replace(base, **{k: v for k, v in asdict(self).items() if v is not None})

    def given(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def check(self) -> Limits:
        """Itself, if every limit it sets is in range; else BadRequestError naming it."""
        _range(self.max_size, "max_size", 32 * MiB, 1 << 50, none=True, unit="bytes")
        _range(self.branch_connections, "branch_connections", 1, MAX_BRANCH_CONNECTIONS)
        _range(self.shared_buffers, "shared_buffers", 1 * MiB, 64 * GiB, unit="bytes")
        _range(self.work_mem, "work_mem", 64 * KiB, 2 * GiB - 1, unit="bytes")
        _range(self.memory, "memory", 64 * MiB, 1 << 50, none=True, unit="bytes")
        _range(self.creations_per_minute, "creations_per_minute", 1, 1_000_000, none=True)
        if self.memory and self.shared_buffers and self.memory < self.shared_buffers + 32 * MiB:
            raise BadRequestError(f"memory {_show(self.memory)} leaves no room beside shared_buffers "
                                  f"{_show(self.shared_buffers)}: give it at least 32 MB more")
        return self

    def settings(self) -> dict[str, str]:
        """The postgres settings these limits set. A capped branch's WAL is
        kept near its cap too (no WAL kept for standbys or archiving, slots
        held to the cap, checkpoints by then), and so are its temporary files
        (compute-local: on the page server's disk). On the command line, none
        of these can be changed by ALTER SYSTEM, and all but temp_file_limit
        by no one (a superuser may SET that one)."""
        out = {}
        if self.shared_buffers:
            out["shared_buffers"] = f"{self.shared_buffers // KiB}kB"
        if self.work_mem:
            out["work_mem"] = f"{self.work_mem // KiB}kB"
        if self.max_size:
            out.update(archive_mode="off", wal_keep_size="0",
                       max_slot_wal_keep_size=f"{max(self.max_size // MiB, 32)}MB",
                       max_wal_size=f"{min(max(self.max_size // MiB, 64), 1024)}MB",
                       temp_file_limit=f"{self.max_size // KiB}kB")
        return out


DEFAULTS = Limits(max_size=0, branch_connections=MAX_BRANCH_CONNECTIONS, shared_buffers=128 * MiB,
                  work_mem=4 * MiB, memory=1 * GiB, creations_per_minute=600)


def _range(v: int | None, name: str, low: int, high: int, *, none: bool = False, unit: str = "") -> None:
    if v is None or (none and v == 0):
        return
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        shown = f"{_show(low)} to {_show(high)}" if unit else f"{low} to {high}"
        raise BadRequestError(f"invalid {name} {v!r}: use {shown}" + (" (or 0 for none)" if none else ""))


def _show(n: int) -> str:
    for unit, size in (("TB", TiB), ("GB", GiB), ("MB", MiB), ("kB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def parse_size(value: int | str | None, what: str = "size") -> int | None:
    """Bytes from 1048576, "512MB", "1 GiB", "64kB" (units are binary, as
    PostgreSQL's), "none" (0); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequestError(f"invalid {what}: {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and value.strip().lower() in _NONE:
        return 0
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m and _UNITS.get(m.group(2).lower())
        if not m or unit is None:
            raise BadRequestError(f"invalid {what} {value!r}: use bytes or a number with kB, MB, GB or TB")
        n = int(float(m.group(1)) * unit)
        if n == 0 and float(m.group(1)) != 0:
            raise BadRequestError(f"invalid {what} {value!r}: less than a byte")
    if n < 0:
        raise BadRequestError(f"invalid {what} {value!r}: must not be negative")
    return n


def parse_count(value: int | str | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in _NONE:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    raise BadRequestError(f"invalid {what} {value!r}: use a whole number")


def limits_of(values: dict[str, Any] | Limits | None) -> Limits:
    """Limits from what a caller gave (sizes as bytes or "512MB"), checked."""
    if values is None:
        return Limits()
    if isinstance(values, Limits):
        return values.check()
    if not isinstance(values, dict):
        raise BadRequestError(f"invalid limits {values!r}: give an object of limits")
    names = {f.name for f in fields(Limits)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise BadRequestError(f"unknown limit {unknown[0]!r}: the limits are {', '.join(sorted(names))}")
    parsed = {k: parse_size(v, k) if k in _SIZES else parse_count(v, k) for k, v in values.items()}
    return Limits(**parsed).check()


def shown(limits: Limits) -> dict[str, Any]:
    """For people: sizes with units, 0 as "none"."""
    out: dict[str, Any] = {}
    for k, v in asdict(limits).items():
        if v is None:
            continue
        out[k] = "none" if v == 0 else _show(v) if k in _SIZES else v
    return out
