"""Strata's page server: stock PostgreSQL on branches of the engine's store.

The subpackages are the layers, each importing only those below it (`make
lint` checks it with import-linter):

    clients/   SDK, `strata` CLI, pytest plugin, benchmark runs, demo
    service/   the daemon: home directory, supervision of its processes
    frontend/  the unprivileged front-end process: HTTP API and proxy
    proxy/     the PostgreSQL wire protocol and the proxy server
    control/   catalog, control plane, its local RPC; the page server process
    compute/   postgres processes; the node (store + mount + computes)
    fuse/      the FUSE operations and the mount
    pgdata/    a data directory kept in a timeline; PostgreSQL file policy
    errors     the typed errors every layer raises

The SDK is `pageserver.clients.sdk.Strata` (also `pageserver.sdk.Strata`).
See docs/architecture.md.
"""
