"""A reference point for the page server's benchmarks: Strata's own FUSE
layer with the engine taken out.

`PassthroughFS` is `StrataFS` with every path compute-local, so every
request takes the same route through libfuse, mfusepy and the same Python
handlers, with the same kernel settings (writeback cache, long timeouts, no
FSYNC), but lands on a plain directory on local disk instead of a timeline.
Writes are fdatasynced before they are answered, as the page server makes
them durable, so PostgreSQL's commits keep their meaning. What a workload
loses on it is what FUSE and a Python server cost on this machine before
any storage work is done: a ceiling for the page server's ratios.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from pageserver.fuse.filesystem import Mount, StrataFS, operation


class PassthroughFS(StrataFS):
    is_local = staticmethod(lambda rel: True)

    @operation
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        n = super().write(path, data, offset, fh)
        os.fdatasync(self._handle(fh).fd)
        return n

    @operation
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        super().truncate(path, length, fh)
        if fh is not None:
            os.fsync(self._handle(fh).fd)
        return 0


@contextlib.contextmanager
def passthrough(directory: str, uid: int, gid: int) -> Iterator[str]:
    """Mount `directory` through PassthroughFS; yields the path that shows it."""
    mnt = tempfile.mkdtemp(prefix="strata-passthrough-")
    mount = Mount(mnt, statfs_path=directory, ops=PassthroughFS())
    mount.start()
    try:
        mount.ops.attach("data", None, directory, uid, gid)  # type: ignore[arg-type]
        yield os.path.join(mnt, "data")
    finally:
        mount.stop()
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
