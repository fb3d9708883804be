"""PostgreSQL's side of a data directory kept in a timeline: which files
stay with the compute, and the settings Strata adds to every cluster.

Compute-local files never travel to a branch: `postmaster.pid`,
`postmaster.opts`, the directories PostgreSQL empties at every start
(`pg_dynshmem`, `pg_notify`, `pg_serial`, `pg_snapshots`, `pg_stat_tmp`,
`pg_subtrans`, `pg_replslot`), temporary files (`pgsql_tmp*`) and the
relation cache's init files (`pg_internal.init*`). The FUSE adapter keeps
them in the attachment's local directory, the importer leaves them out,
and the exporter makes the empty directories PostgreSQL expects.
"""

from __future__ import annotations

import re

LOCAL_TOP = frozenset({
    "postmaster.pid", "postmaster.opts", "pg_dynshmem", "pg_notify", "pg_serial",
    "pg_snapshots", "pg_stat_tmp", "pg_subtrans", "pg_replslot",
})
LOCAL_DIRS = sorted(n for n in LOCAL_TOP if n.startswith("pg_"))


def is_local(rel: str) -> bool:
    """Is this path (relative to a data directory) compute-local?"""
    parts = rel.split("/")
    if parts[0] in LOCAL_TOP:
        return True
    # relcache init files are written as pg_internal.init.<pid> and renamed into place:
    # both names must be on the same side, or the rename fails (EXDEV) and every backend
    # rebuilds its relation cache
    return any(p.startswith("pgsql_tmp") for p in parts) or parts[-1].startswith("pg_internal.init")


# A relation's data (a fork, or a 1 GB segment of one; a temporary
# relation's too, t<backend>_<node>): in a database's directory, in global/
# (the shared catalogs) or in a tablespace's. What grows with the data, and
# what a branch's cap checks as it is written (pageserver.pgdata.datadir);
# not pg_control, pg_filenode.map or PG_VERSION.
_NODE = r"(?:t\d+_)?\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?"
RELATION_FILE = re.compile(rf"^(?:base/\d+/{_NODE}|global/{_NODE}|pg_tblspc/\d+/PG_[^/]+/\d+/{_NODE})$")
# ... of which some may take the cap's headroom (as every file's first page
# may): the free space and visibility maps, a small fraction of their
# relation, which VACUUM must be able to make on a full branch (or the rows
# it would free could never be reused); and the system catalogs (their
# initdb-given file numbers are below 16384), which TRUNCATE, DROP and
# temporary tables grow a little
_MAP = re.compile(r"_(?:fsm|vm)(?:\.\d+)?$")
_MAIN = re.compile(r"/(\d+)(?:\.\d+)?$")
FIRST_NORMAL_OID = 16384


def lenient(rel: str) -> bool:
    """May this relation file (RELATION_FILE) take the cap's headroom?"""
    if _MAP.search(rel):
        return True
    m = _MAIN.search(rel)
    return m is not None and int(m.group(1)) < FIRST_NORMAL_OID


PG_CONF = """
# --- added by strata ---
listen_addresses = ''
password_encryption = 'scram-sha-256'
dynamic_shared_memory_type = posix
"""
PG_HBA = """# strata: computes listen on their Unix socket only, which only the page server and the
# front ends can reach; clients come through the proxy, which checks their passwords
local   all   all                 trust
"""
