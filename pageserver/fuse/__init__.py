"""The FUSE adapter: one mount that serves every attached data directory
(`filesystem`), bound to libfuse 3 (`libfuse`)."""
