"""What the control plane speaks: names, durations and times as callers
give them (checked, with a clear error naming what was wrong), and the
snapshots of databases and branches it answers with."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pageserver.errors import BadRequestError

if TYPE_CHECKING:
    from engine.check import CheckReport

MAIN = "main"  # every database's first branch
OPERATOR = "@operator"  # the caller the operator's token is (no database's name has an @)

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise BadRequestError(
            f"invalid {kind} name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def parse_duration(value: float | int | str | None, what: str = "duration") -> float | None:
    """Seconds from 90, 90.5, "90", "90s", "15m", "1h", "2d" (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequestError(f"invalid {what}: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
        if not m:
            raise BadRequestError(f"invalid {what} {value!r}: use seconds or a number with s, m, h or d")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not seconds > 0:
        raise BadRequestError(f"invalid {what} {value!r}: must be positive")
    return seconds


def parse_time(value: str | float | dt.datetime, now: float | None = None) -> dt.datetime:
    """A moment from ISO 8601, epoch seconds or a datetime; with `now`,
    one in the future is refused."""
    when = _parse_time(value)
    if now is not None and when.timestamp() > now:
        raise BadRequestError(f"time {when.isoformat()} is in the future")
    return when


def _parse_time(value: str | float | dt.datetime) -> dt.datetime:
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, int | float):
        when = dt.datetime.fromtimestamp(value, dt.UTC)
    else:
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as e:
            raise BadRequestError(f"invalid time {value!r}: use ISO 8601, e.g. 2026-01-31T12:00:00Z") from e
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def iso(t: float | None) -> str | None:
    return None if not t else dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


@dataclass
class BranchInfo:
    """What a caller sees of a branch (a snapshot)."""

    database: str
    name: str
    endpoint: str
    uri: str  # at the proxy; with a password only in the answer that made one
    state: str  # "running" | "suspended"
    lsn: int
    timeline: str
    parent: str | None
    created_at: str | None
    expires_at: str | None
    idle_timeout: float
    expire_after_idle: float | None
    protected: bool
    last_used: str | None
    connections: int
    logical_size: int | None = None
    exclusive_size: int | None = None
    password: str | None = None  # only in the answer that made it (then also in `uri`)
    limits: dict[str, int] = field(default_factory=dict)  # its database's, defaults filled in
    data_size: int | None = None  # bytes of relation files, which max_size caps (when running)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DatabaseInfo:
    name: str
    branch: str  # the root branch
    uri: str  # of the root branch
    created_at: str | None
    expires_at: str | None
    idle_timeout: float
    expire_after_idle: float | None
    last_used: str | None
    branches: list[str]
    limits: dict[str, int] = field(default_factory=dict)  # defaults filled in (0: none)
    durable: bool = False  # its commits return once the object store has them (with a remote)
    token: str | None = None  # the database-scoped API token: only in the creation's answer
    password: str | None = None  # of its main branch: only in the creation's answer (then also in `uri`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_report(r: CheckReport) -> dict[str, Any]:
    """A store check's report as JSON."""
    return {"ok": r.ok, "timelines": r.timelines, "layers": r.layers, "values": r.values,
            "reads": r.reads, "problems": r.problems}
