"""Computes: a stock postgres process on a mounted data directory
(`postgres`), and the node that owns the store, the mount and the
computes (`node`)."""
