"""The front ends: the HTTP API (`api`) and the process that serves it and
the proxy, unprivileged, over the page server's local RPC
(`python -m pageserver.frontend`)."""
