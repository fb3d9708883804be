"""What the proxy lets one client, or one branch's clients, take: a module
of its own, light, so that the supervisor reads the defaults without the
proxy's server behind them."""

from __future__ import annotations

from dataclasses import dataclass

from pageserver.errors import BadRequestError

COMPUTE_MAX_CONNECTIONS = 100  # PostgreSQL's default, which computes keep
SUPERUSER_RESERVED = 3  # ... of which the page server's own connections need these (tenants are superusers)


@dataclass(frozen=True)
class ProxyLimits:
    """What one client, or one branch's clients, may take of the proxy."""

    max_connections: int = 4096  # client connections at once, all branches (each holds two descriptors)
    branch_connections: int = COMPUTE_MAX_CONNECTIONS - SUPERUSER_RESERVED  # per branch
    startup_timeout: float = 10.0  # to send the whole startup packet (SSL negotiation included)
    auth_timeout: float = 60.0  # from the startup packet reaching the compute to its first ReadyForQuery

    def __post_init__(self) -> None:
        for name in ("max_connections", "branch_connections"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BadRequestError(f"proxy limit {name} must be a whole number of at least 1, "
                                      f"not {getattr(self, name)!r}")
        for name in ("startup_timeout", "auth_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise BadRequestError(f"proxy limit {name} must be a number of seconds above 0, not {v!r}")
