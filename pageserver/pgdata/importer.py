"""Importing a data directory into a timeline, and exporting one back.

Import walks an existing data directory (from `initdb` or `pg_basebackup`,
with no server running on it) into a new timeline, leaving out what is
compute-local (see `pageserver.fusefs`). It shows a progress bar on a
terminal. A failed import deletes the half-made timeline.

Export writes a timeline as of an LSN (default: its head, as one consistent
image) to a new plain directory that stock PostgreSQL starts on: all-zero
pages stay holes, the compute-local directories are created empty, every
file and directory is fsynced.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Callable

from tqdm import tqdm

from engine import Store, Timeline
from pageserver.errors import DestinationNotEmptyError, NotADataDirectoryError
from pageserver.pgdata.datadir import DataDir
from pageserver.pgdata.layout import DIRECTORY, PAGE, ROOT, SYMLINK
from pageserver.pgdata.policy import LOCAL_DIRS, is_local

log = logging.getLogger("strata.import")

CHUNK = 32 * PAGE  # bytes per commit while importing a file


def check_data_directory(path: str) -> None:
    if not os.path.isdir(path):
        raise NotADataDirectoryError(path, "no such directory")
    for f in ("PG_VERSION", "global/pg_control"):
        if not os.path.isfile(os.path.join(path, f)):
            raise NotADataDirectoryError(path, f"{f} is missing")
    if os.path.exists(os.path.join(path, "postmaster.pid")):
        raise NotADataDirectoryError(path, "postmaster.pid exists: stop the server first")


def _progress(total: int, desc: str, show: bool | None) -> tqdm:
    show = sys.stderr.isatty() if show is None else show
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show)


def import_datadir(
    store: Store, src: str, *, timeline_id: str | None = None, progress: bool | None = None,
) -> Timeline:
    """A new root timeline holding the data directory at `src`."""
    src = os.path.abspath(src)
    check_data_directory(src)
    entries = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames.sort()
        keep = []
        for name in dirnames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if is_local(rel):
                continue
            entries.append((rel, os.lstat(os.path.join(dirpath, name))))
            if not os.path.islink(os.path.join(dirpath, name)):
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if is_local(rel):
                continue
            st = os.lstat(os.path.join(dirpath, name))
            entries.append((rel, st))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    root = os.stat(src)
    tl = store.create_timeline(timeline_id)
    try:
        DataDir.format(tl, uid=root.st_uid, gid=root.st_gid, mode=root.st_mode)
        dd = DataDir(tl)
        with _progress(total, "importing", progress) as bar:
            for rel, st in entries:
                parent, _, name = rel.rpartition("/")
                pino, bname = dd.resolve(parent), name.encode("utf-8", "surrogateescape")
                path = os.path.join(src, rel)
                if stat.S_ISDIR(st.st_mode):
                    dd.mkdir(pino, bname, st.st_mode, st.st_uid, st.st_gid)
                elif stat.S_ISLNK(st.st_mode):
                    dd.symlink(pino, bname, os.fsencode(os.readlink(path)), st.st_uid, st.st_gid)
                elif stat.S_ISREG(st.st_mode):
                    ino = dd.create(pino, bname, st.st_mode, st.st_uid, st.st_gid)
                    with open(path, "rb") as f:
                        offset = 0
                        while chunk := f.read(CHUNK):
                            dd.write(ino, offset, chunk)
                            offset += len(chunk)
                            bar.update(len(chunk))
                else:
                    log.warning("import %s: skipped %s (not a file, directory or symlink)", src, rel)
        dd.fsync()
    except BaseException:
        store.delete_timeline(tl)
        raise
    log.info("imported %s into timeline %s: %d entries, %d bytes", src, tl.id, len(entries), total)
    return tl


def export_datadir(
    timeline: Timeline, dest: str, *, lsn: int | None = None, progress: bool | None = None,
    on_file: Callable[[str], None] | None = None,
) -> int:
    """Write the tree as of `lsn` (default: the head now) to `dest`, which
    must not exist or be empty. Returns the LSN exported."""
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise DestinationNotEmptyError(dest)
    at = timeline.head_lsn if lsn is None else lsn
    dd = DataDir(timeline, lsn=at)
    items = list(dd.walk())
    total = sum(n.size for _, _, n in items if n.kind not in (DIRECTORY, SYMLINK))
    root = dd.inode(ROOT)
    existed = os.path.exists(dest)
    os.makedirs(dest, exist_ok=True)
    try:
        with _progress(total, "exporting", progress) as bar:
            for rel, ino, node in items:
                path = os.path.join(dest, rel)
                if node.kind == DIRECTORY:
                    os.mkdir(path, 0o700)
                elif node.kind == SYMLINK:
                    os.symlink(os.fsdecode(node.target), path)
                else:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        for off in range(0, node.size, CHUNK):
                            data = dd.read(ino, off, CHUNK)
                            if data.count(0) != len(data):
                                os.pwrite(fd, data, off)
                            bar.update(len(data))
                        os.ftruncate(fd, node.size)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                if node.kind != SYMLINK:
                    os.chmod(path, node.mode)
                os.lchown(path, node.uid, node.gid)
                if on_file is not None:
                    on_file(rel)
            for d in LOCAL_DIRS:
                p = os.path.join(dest, d)
                os.makedirs(p, 0o700, exist_ok=True)
                os.chown(p, root.uid, root.gid)
            os.chmod(dest, root.mode)
            os.chown(dest, root.uid, root.gid)
            for dirpath, _, _ in os.walk(dest):
                fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except BaseException:  # leave the destination as it was
        import shutil

        if existed:
            for name in os.listdir(dest):
                p = os.path.join(dest, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        else:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    log.info("exported timeline %s at LSN %d to %s (%d bytes)", timeline.id, at, dest, total)
    return at
