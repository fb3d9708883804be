"""Where a home's processes keep their files, and how those directories are
made: private to this user (`private_dir`), the run directory a home's
mount, sockets and computes live in (`run_dir_for`), and the object store a
home's store lives in (`remote_url`). Light on purpose: the CLI and the
supervisor use it without importing the page server."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

from pageserver.errors import UnsafeDirectoryError

# Run directories: 0700 when the computes run as this user; 0711 (others may pass
# through, never list) on the path the `postgres` user walks to its own 0700
# directories when the page server runs as root.
RUN_MODE = 0o711 if os.geteuid() == 0 else 0o700


def private_dir(path: str, mode: int = 0o700) -> str:
    """Make `path` a directory of this user's with `mode`, or refuse one
    that another user owns, that is a symlink, or that is not a directory
    (a predictable path in /tmp could be anybody's); a wider mode is
    tightened. Returns `path`."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except FileNotFoundError:  # (its parents are ordinary directories)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileExistsError):  # (another process made it meanwhile)
            os.mkdir(path, mode)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectoryError(path, "it is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectoryError(path, "it is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectoryError(path, f"it belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    return path


def run_dir_for(home: str) -> str:
    import hashlib

    digest = hashlib.sha1(os.path.abspath(home).encode()).hexdigest()[:12]
    base = "/run/strata" if os.geteuid() == 0 else os.path.join(tempfile.gettempdir(), f"strata-{os.getuid()}")
    private_dir(base, RUN_MODE)
    return os.path.join(base, digest)


REMOTE_FILE = "remote.json"


def remote_url(home: str, given: str | None) -> str | None:
    """The object store a home's store lives in: `given` (kept in
    <home>/remote.json at its first use), or the one kept. A home keeps its
    remote: another URL is refused, naming both."""
    import json

    from engine.fs import OsFileSystem, write_atomically
    from engine.objectstore import open_object_store

    path = os.path.join(home, REMOTE_FILE)
    try:
        with open(path) as f:
            kept = json.load(f)["url"]
    except FileNotFoundError:
        kept = None
    if given is None or given == kept:
        return kept
    if kept is not None:
        raise ValueError(f"{home} lives in {kept}, not {given}: a home keeps its remote "
                         "(restore into a new home to use another)")
    open_object_store(given)  # (a bad URL is refused before it is kept)
    private_dir(home)
    write_atomically(OsFileSystem(), path, json.dumps({"url": given}).encode())
    return given
