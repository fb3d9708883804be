"""The control plane: databases and branches in a catalog timeline
(`catalog`), the names and shapes it speaks (`objects`), the plane itself
with its scheduling and housekeeping (`plane`), its metrics, and the local
RPC by which the front ends reach it (`rpc`). `python -m pageserver.control`
is the page server process."""

from pageserver.control.plane import ControlPlane

__all__ = ["ControlPlane"]
