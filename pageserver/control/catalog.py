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

No password is kept: a branch record holds its credentials as SCRAM
verifiers (`pageserver.scram`). A database record written before held its
password in plaintext (`password`); the control plane turns that into a
credential of each of its branches, and rewrites the record without it,
when it opens the catalog (`legacy_passwords`).

A credential may name the one role it opens its branch as (`role`:
READONLY_ROLE for a read-only grant; absent: any role); the proxy refuses
it for any other user name.

A branch made from a running parent holds in `extra["in_flight"]` the
parent's timeline id, the branch LSN and the transaction ids that may
have been in flight there (`xids`; null if too many began while it was
made), for `pageserver.control.diff` to check.

Both kinds of record hold the limits their database chose (`limits`, an
object of `pageserver.control.limits.Limits`; a record without one chose
none): the database's, and a copy in each of its branches, rewritten
together.

A durable database (`durable`, with a remote: `engine.remote`'s durable
mode) has every timeline of its branches in the remote's durable set, so
that an fsync of its compute returns once the object store has it; and a
change of its records (or of its branches') returns once the object store
has that too. The set is replaced under `_mu` with the snapshot that
changed it, so a branch is durable from the moment its record exists.

Object ids are never reused. A record names its objects by id (a branch's
database and parent), so renaming nothing ever rewrites more than one
record. Timelines are created before the record that points at them and
deleted after the record that pointed at them: a crash in between leaves an
unreferenced timeline, which the control plane deletes (when it starts,
and in its housekeeping).

Concurrency: readers never lock and never wait. The catalog's state is an
immutable `Snapshot` (records are frozen dataclasses, maps are HAMTs from
`immutables`), replaced whole, with one attribute store, by each change:
readers take `catalog.snapshot` once and work on it, however long, while
changes go on. A change is a function of the current snapshot that checks
what it needs and returns the records to put and delete (or raises, and
nothing changes); `change` calls it, commits its records to the catalog
timeline and publishes the new snapshot, all under `_mu`, so a change is
checked, committed and published at one point. The fsync comes after, out
of the lock (concurrent changes share it, group commit); `change` returns
once its change is durable. Nothing in the proxy or on an event loop
takes `_mu`.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from immutables import Map

from engine import CorruptionError
from engine.checksums import xxh64
from pageserver.control.limits import Limits

if TYPE_CHECKING:
    from engine import Store, Timeline

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


@dataclass(frozen=True)
class Credential:
    """A password that opens a branch, as its SCRAM verifier (`pageserver.scram`;
    the password itself is shown once, when it is made, and kept nowhere)."""

    verifier: str
    created_at: float
    expires_at: float | None = None
    role: str | None = None  # the only role it opens the branch as (READONLY_ROLE); None: any




@dataclass(frozen=True)
class DatabaseRecord:
    id: int
    name: str
    created_at: float
    expires_at: float | None = None
    idle_timeout: float | None = None  # default for its branches
    expire_after_idle: float | None = None
    last_used: float = 0.0
    token_sha256: str | None = None  # of the API token scoped to this database
    limits: Limits = field(default_factory=Limits)  # those it chose (the rest: the service's defaults)
    durable: bool = False  # with a remote: its commits, and its records here, wait for the object store

    def __post_init__(self) -> None:
        _limits_from_json(self)


def _limits_from_json(rec: Any) -> None:
    if isinstance(rec.limits, dict):  # (from JSON, or across the RPC)
        names = {f.name for f in fields(Limits)}
        object.__setattr__(rec, "limits", Limits(**{k: v for k, v in rec.limits.items() if k in names}))


@dataclass(frozen=True)
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
    salt: str = ""  # of its credentials' verifiers (one exchange checks a proof against all of them)
    credentials: tuple[Credential, ...] = ()
    limits: Limits = field(default_factory=Limits)  # its database's (copied: the proxy reads them here)

    def __post_init__(self) -> None:  # (from JSON, or across the RPC: dicts and lists)
        _limits_from_json(self)
        creds = tuple(c if isinstance(c, Credential) else Credential(**c) for c in self.credentials)
        object.__setattr__(self, "credentials", creds)

    def verifiers(self, now: float) -> list[str]:
        """The verifiers of its credentials that have not expired at `now`."""
        return [c.verifier for c in self.live_credentials(now)]

    def live_credentials(self, now: float) -> list[Credential]:
        """Its credentials that have not expired at `now` (in `verifiers`' order)."""
        return [c for c in self.credentials if c.expires_at is None or c.expires_at > now]


Record = DatabaseRecord | BranchRecord


def _from(cls: Any, body: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in body.items() if k in names})


_EMPTY: Map[Any, Any] = Map()


@dataclass(frozen=True)
class Snapshot:
    """The catalog at one moment: records by id and the indexes over them.
    Never changes; a change makes a new one."""

    databases: Map[int, DatabaseRecord] = _EMPTY
    branches: Map[int, BranchRecord] = _EMPTY
    database_named: Map[str, DatabaseRecord] = _EMPTY
    branch_named: Map[tuple[int, str], BranchRecord] = _EMPTY  # (database id, name)
    branch_on: Map[str, BranchRecord] = _EMPTY  # timeline id -> its branch
    branches_in: Map[int, Map[int, BranchRecord]] = _EMPTY  # database id -> its branches
    database_with_token: Map[str, DatabaseRecord] = _EMPTY  # sha256 of its scoped token
    version: int = 0  # how many changes made it

    def children(self, br: BranchRecord) -> list[BranchRecord]:
        return [b for b in self.branches_in.get(br.database, _EMPTY).values() if b.parent == br.id]

    def with_changes(self, put: Sequence[Record] = (), delete: Sequence[Record] = ()) -> Snapshot:
        dbs, brs = self.databases.mutate(), self.branches.mutate()
        named, bnamed = self.database_named.mutate(), self.branch_named.mutate()
        on, tokens = self.branch_on.mutate(), self.database_with_token.mutate()
        within: dict[int, Any] = {}  # database id -> its branches, being changed

        def siblings(db: int) -> Any:
            if db not in within:
                within[db] = self.branches_in.get(db, _EMPTY).mutate()
            return within[db]

        for rec in [*delete, *put]:  # a put replaces: out with the old record first
            if isinstance(rec, DatabaseRecord):
                old_db = dbs.get(rec.id)
                if old_db is not None:
                    del dbs[rec.id]
                    named.pop(old_db.name, None)
                    if old_db.token_sha256:
                        tokens.pop(old_db.token_sha256, None)
            else:
                old = brs.get(rec.id)
                if old is not None:
                    del brs[rec.id]
                    bnamed.pop((old.database, old.name), None)
                    on.pop(old.timeline, None)
                    siblings(old.database).pop(old.id, None)
        for rec in put:
            if isinstance(rec, DatabaseRecord):
                dbs[rec.id] = named[rec.name] = rec
                if rec.token_sha256:
                    tokens[rec.token_sha256] = rec
            else:
                brs[rec.id] = bnamed[(rec.database, rec.name)] = on[rec.timeline] = rec
                siblings(rec.database)[rec.id] = rec
        bin_ = self.branches_in.mutate()
        for db, m in within.items():
            done = m.finish()
            if len(done):
                bin_[db] = done
            else:
                bin_.pop(db, None)
        return Snapshot(dbs.finish(), brs.finish(), named.finish(), bnamed.finish(), on.finish(),
                        bin_.finish(), tokens.finish(), self.version + 1)


Change = Callable[[Snapshot], tuple[Sequence[Record], Sequence[Record]]]


def is_durable(snap: Snapshot, rec: Record) -> bool:
    """Is `rec` (as given, or as `snap` has it) a durable database, or a branch of one in `snap`?"""
    if isinstance(rec, DatabaseRecord):
        db = snap.databases.get(rec.id)
        return rec.durable or (db is not None and db.durable)
    db = snap.databases.get(rec.database)
    return db is not None and db.durable


def durable_timelines(snap: Snapshot) -> frozenset[bytes]:
    """The timelines of every branch of every durable database."""
    return frozenset(bytes.fromhex(br.timeline) for db in snap.databases.values() if db.durable
                     for br in snap.branches_in.get(db.id, _EMPTY).values())


class Catalog:
    """Databases and branches, loaded whole at open (a record is a few
    hundred bytes: 10,000 branches are a few MB and load in well under a
    second) and written through to the catalog timeline."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._mu = threading.Lock()  # serialises changes; guards _next_id
        if CATALOG_ID in store:
            self._tl: Timeline = store.timeline(CATALOG_ID)
        else:
            self._tl = store.create_timeline(CATALOG_ID)
        self._next_id = 1
        records: list[Record] = []
        self.legacy_passwords: dict[int, str] = {}  # database id -> the password an older version kept
        for key, value in self._tl.scan():
            body = decode_record(key, value)
            kind = key >> 56
            if kind == KIND_HEADER:
                self._next_id = int(body["next_id"])
            elif kind == KIND_DATABASE:
                if "password" in body:
                    self.legacy_passwords[int(body["id"])] = str(body["password"])
                records.append(_from(DatabaseRecord, body))
            elif kind == KIND_BRANCH:
                records.append(_from(BranchRecord, body))
        self.snapshot: Snapshot = Snapshot().with_changes(put=records)  # readers: take it, don't lock
        if store._remote is not None:
            store._remote.set_durable(durable_timelines(self.snapshot))

    @property
    def timeline_id(self) -> str:
        return self._tl.id

    def new_id(self) -> int:
        """An object id never handed out before (made durable with the
        first change that uses it)."""
        with self._mu:
            oid = self._next_id
            self._next_id += 1
            return oid

    def change(self, fn: Change) -> Snapshot:
        """Check, commit and publish one change at one point: `fn(current
        snapshot)` returns (records to put, records to delete) or raises
        (then nothing changes). Returns the new snapshot once the change
        is durable."""
        with self._mu:
            put, delete = fn(self.snapshot)
            batch: dict[int, bytes | None] = {
                record_key(KIND_HEADER, 0): encode_record({"next_id": self._next_id}),
            }
            for rec in delete:
                batch[self._key(rec)] = None
            for rec in put:
                batch[self._key(rec)] = encode_record(asdict(rec))
            old = self.snapshot
            new = old.with_changes(put, delete)
            self._tl.commit(batch)
            self.snapshot = new
            remote = self._store._remote
            shipped = remote is not None and any(
                is_durable(snap, rec) for rec in [*put, *delete] for snap in (old, new))
            if shipped:
                remote.set_durable(durable_timelines(new))  # type: ignore[union-attr]
        self._tl.sync(shipped=shipped)  # also makes durable every earlier record of the store's log
        return new

    def write(self, put: Sequence[Record] = (), delete: Sequence[Record] = ()) -> Snapshot:
        """Put and delete records unconditionally (a change that checks nothing)."""
        return self.change(lambda _: (put, delete))

    @staticmethod
    def _key(rec: Record) -> int:
        kind = KIND_DATABASE if isinstance(rec, DatabaseRecord) else KIND_BRANCH
        return record_key(kind, rec.id & _ID_MASK)
