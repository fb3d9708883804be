"""The control plane: databases and branches in a catalog timeline
(`catalog`), the names and shapes it speaks (`objects`), the plane itself
with its scheduling and housekeeping (`plane`), its metrics, and the local
RPC by which the front ends reach it (`rpc`). `python -m pageserver.control`
is the page server process."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pageserver.control.plane import ControlPlane

__all__ = ["ControlPlane"]


def __getattr__(name: str) -> object:
    """The plane on first use (PEP 562): the front end and the CLI import
    `rpc`, `limits` and `objects` without the page server behind them."""
    if name != "ControlPlane":
        raise AttributeError(f"module 'pageserver.control' has no attribute {name!r}")
    from pageserver.control.plane import ControlPlane

    return ControlPlane
