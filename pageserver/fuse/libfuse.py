"""mfusepy, bound to libfuse 3 whatever else is installed.

mfusepy picks its library when it is imported: `$FUSE_LIBRARY_PATH` if
set, else `find_library('fuse')` (libfuse 2) first and libfuse 3 only
when there is no libfuse 2. Many machines have both (desktops, Ceph's
packages), and with libfuse 2 every mount fails (`fuse: unknown option
'max_threads=64'`). So this module finds libfuse 3 itself
(`$STRATA_LIBFUSE3`, else `find_library('fuse3')`), hands it to mfusepy
for the import only, and refuses, naming what to install, when there is
none or when mfusepy was already imported with another library. Import
it before mfusepy (`pageserver.fusefs` does).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from types import ModuleType


class LibfuseError(ImportError):
    pass


def find_libfuse3() -> str:
    path = os.environ.get("STRATA_LIBFUSE3") or ctypes.util.find_library("fuse3")
    if not path:
        raise LibfuseError("libfuse 3 is not installed: install the fuse3 and libfuse3-dev packages "
                           "(apt-get install fuse3 libfuse3-dev; `make system` does it), "
                           "or point $STRATA_LIBFUSE3 at libfuse3.so.3")
    return path


def bind() -> ModuleType:
    """Import mfusepy bound to libfuse 3 (once); returns the module."""
    module = sys.modules.get("mfusepy")
    if module is None:
        path = find_libfuse3()
        saved = os.environ.get("FUSE_LIBRARY_PATH")
        os.environ["FUSE_LIBRARY_PATH"] = path
        try:
            import mfusepy

            module = mfusepy
        finally:
            if saved is None:
                del os.environ["FUSE_LIBRARY_PATH"]
            else:
                os.environ["FUSE_LIBRARY_PATH"] = saved
    if module.fuse_version_major != 3:
        raise LibfuseError(f"mfusepy was imported with libfuse {module.fuse_version_major} "
                           f"({module._libfuse_path}) before Strata could bind it to libfuse 3: "
                           "import pageserver.fusefs first, or set FUSE_LIBRARY_PATH to libfuse3.so.3")
    return module


bind()
