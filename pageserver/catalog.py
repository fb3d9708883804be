"""The control plane's catalog: databases and branches, kept in the store.

The catalog is a timeline of its own (CATALOG_ID) in the page server's
store. Every change is one durable engine commit of one or more records,
so it is atomic and survives a crash through the commit log, like any
page; the store remains the one thing to back up.

Keys (64-bit engine keys):

    +--------+--------------------------------------------------------+
    | kind 8 |                    object id 56                        |
    +--------+--------------------------------------------------------+
    kind 0, id 0: the header (next object id)   kind 1: a database
    kind 2: a branch

Value of every record:

    0        4        6                 14
    +--------+--------+-----------------+------------------------------+
    | "STCR" | ver u16| xxh64(body) u64 | body: UTF-8 JSON object      |
    +--------+--------+-----------------+------------------------------+

Object ids are never reused. A record names its objects by id (a branch's
database and parent), so renaming nothing ever rewrites more than one
record. Timelines are created before the record that points at them and
deleted after the record that pointed at them: a crash in between leaves an
unreferenced timeline, which the control plane deletes when it starts.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engine import CorruptionError, Store, Timeline
from engine.checksums import xxh64

CATALOG_ID = "7374726174612d636174616c6f670000"  # "strata-catalog" in hex
MAGIC = b"STCR"
VERSION = 1
RECORD = struct.Struct("<4sHQ")
assert RECORD.size == 14

KIND_HEADER, KIND_DATABASE, KIND_BRANCH = 0, 1, 2
_ID_MASK = (1 << 56) - 1


def record_key(kind: int, object_id: int) -> int:
    return kind << 56 | object_id


def encode_record(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return RECORD.pack(MAGIC, VERSION, xxh64(raw)) + raw


def decode_record(key: int, value: bytes) -> dict[str, Any]:
    where = f"catalog record {key:#x}"
    if len(value) < RECORD.size:
        raise CorruptionError(where, 0, "record too short", RECORD.size, len(value))
    magic, version, checksum = RECORD.unpack_from(value)
    if magic != MAGIC:
        raise CorruptionError(where, 0, "bad magic", MAGIC, magic)
    if version != VERSION:
        raise CorruptionError(where, 4, "unknown record version", VERSION, version)
    raw = value[RECORD.size :]
    if xxh64(raw) != checksum:
        raise CorruptionError(where, RECORD.size, "checksum mismatch", checksum, xxh64(raw))
    body: dict[str, Any] = json.loads(raw)
    return body


@dataclass
class DatabaseRecord:
    id: int
    name: str
    password: str
    created_at: float
    expires_at: float | None = None
    idle_timeout: float | None = None  # default for its branches
    expire_after_idle: float | None = None
    last_used: float = 0.0
    token_sha256: str | None = None  # of the API token scoped to this database


@dataclass
class BranchRecord:
    id: int
    database: int
    name: str
    timeline: str
    created_at: float
    parent: int | None = None  # branch id
    expires_at: float | None = None
    idle_timeout: float | None = None
    expire_after_idle: float | None = None
    protected: bool = False
    last_used: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _from(cls: Any, body: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in body.items() if k in names})


class Catalog:
    """Databases and branches by id, loaded whole at open (a record is a
    few hundred bytes: 10,000 branches are a few MB and load in well under
    a second) and written through to the catalog timeline."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._mu = threading.Lock()
        if CATALOG_ID in store:
            self._tl: Timeline = store.timeline(CATALOG_ID)
        else:
            self._tl = store.create_timeline(CATALOG_ID)
        self.databases: dict[int, DatabaseRecord] = {}
        self.branches: dict[int, BranchRecord] = {}
        # indexes, kept with the records
        self.database_named: dict[str, DatabaseRecord] = {}
        self.branch_named: dict[tuple[int, str], BranchRecord] = {}  # (database id, name)
        self.branch_on: dict[str, BranchRecord] = {}  # timeline id -> its branch
        self.branches_in: dict[int, dict[int, BranchRecord]] = {}  # database id -> its branches
        self.database_with_token: dict[str, DatabaseRecord] = {}  # sha256 of its scoped token
        self._next_id = 1
        for key, value in self._tl.scan():
            body = decode_record(key, value)
            kind = key >> 56
            if kind == KIND_HEADER:
                self._next_id = int(body["next_id"])
            elif kind == KIND_DATABASE:
                self._add(_from(DatabaseRecord, body))
            elif kind == KIND_BRANCH:
                self._add(_from(BranchRecord, body))

    @property
    def timeline_id(self) -> str:
        return self._tl.id

    def new_id(self) -> int:
        """An object id never handed out before (made durable with the
        first write that uses it)."""
        with self._mu:
            oid = self._next_id
            self._next_id += 1
            return oid

    def write(
        self,
        put: Sequence[DatabaseRecord | BranchRecord] = (),
        delete: Sequence[DatabaseRecord | BranchRecord] = (),
    ) -> None:
        """Put and delete records in one commit, durable when this returns.
        The sync is outside the lock, so concurrent writers share fsyncs
        (group commit); it also makes durable every earlier record of the
        store's log, such as the branch a new record points at."""
        with self._mu:
            batch: dict[int, bytes | None] = {
                record_key(KIND_HEADER, 0): encode_record({"next_id": self._next_id}),
            }
            for rec in put:
                batch[self._key(rec)] = encode_record(asdict(rec))
            for rec in delete:
                batch[self._key(rec)] = None
            self._tl.commit(batch)
            for rec in delete:
                self._remove(rec)
            for rec in put:
                self._remove(rec)
                self._add(rec)
        self._tl.sync()

    def _add(self, rec: DatabaseRecord | BranchRecord) -> None:
        if isinstance(rec, DatabaseRecord):
            self.databases[rec.id] = rec
            self.database_named[rec.name] = rec
            if rec.token_sha256:
                self.database_with_token[rec.token_sha256] = rec
        else:
            self.branches[rec.id] = rec
            self.branch_named[(rec.database, rec.name)] = rec
            self.branch_on[rec.timeline] = rec
            self.branches_in.setdefault(rec.database, {})[rec.id] = rec

    def _remove(self, rec: DatabaseRecord | BranchRecord) -> None:
        if isinstance(rec, DatabaseRecord):
            old_db = self.databases.pop(rec.id, None)
            if old_db is not None:
                self.database_named.pop(old_db.name, None)
                self.database_with_token.pop(old_db.token_sha256 or "", None)
        else:
            old = self.branches.pop(rec.id, None)
            if old is not None:
                self.branch_named.pop((old.database, old.name), None)
                self.branch_on.pop(old.timeline, None)
                siblings = self.branches_in.get(old.database, {})
                siblings.pop(old.id, None)
                if not siblings:
                    self.branches_in.pop(old.database, None)

    @staticmethod
    def _key(rec: DatabaseRecord | BranchRecord) -> int:
        kind = KIND_DATABASE if isinstance(rec, DatabaseRecord) else KIND_BRANCH
        return record_key(kind, rec.id & _ID_MASK)
