"""The object-store seam (issue: beyond one disk): the few operations the
remote tier needs, a backend on a local file system (for tests, a NAS or a
second disk) and one on the S3 API (through obstore), both opened from a
URL by `open_object_store`: `file:///path` or `s3://bucket/prefix`.

    get(key) -> Object            the bytes and their ETag (ObjectNotFoundError)
    get_range(key, start, end)    bytes [start, end), clipped at the object's end
    put(key, data) -> etag        unconditional
    put_if_absent(key, data)      PreconditionFailedError if the key exists
    put_if_match(key, data, etag) PreconditionFailedError unless its ETag is `etag`
    delete(keys)                  batched; missing keys are not an error
    list(prefix) -> [Listed]      keys below a prefix of whole segments ("a/b"
                                  lists "a/b/c", never "a/bc"), sorted, with sizes

Keys are what S3 takes and a file system can hold: 1-1024 bytes of UTF-8,
`/`-separated segments of [A-Za-z0-9._=-] (no empty, `.` or `..` segment).
The local backend cannot hold both `a` and `a/b` (S3 can): keys the remote
tier makes never do that.
An ETag is an opaque string with no quotes (backends that quote theirs, as
S3 does, strip them: `normalise_etag`); the local backend's is the xxh3_64
of the bytes, in hex, S3's is what the server says (an MD5, for most).

The S3 backend (`S3ObjectStore`) sends If-None-Match: * and If-Match, and
relies on the server to honour them: `probe_conditional_writes` checks that
it does (servers differ; some ignore the headers), and the remote tier
refuses to fence with a store that fails it. If-Match goes as RFC 9110
writes it, the ETag in quotes; a server that refuses its own current ETag
so quoted (Ceph RGW, which compares the header's text with its unquoted
ETag) is sent it unquoted from then on. obstore retries 5xx answers,
timeouts and dropped connections itself, with backoff. A conditional PUT
whose answer was lost is retried and refused (412) by its own success: so a
refusal is checked by reading the object back, and a write that finds its
own bytes in place has won. Callers make conditional bodies unique (a lease
names its holder and a nonce), so equal bytes mean this writer's.

The local layout (versioned by its marker; objects are stored as given:
the formats that go up carry their own checksums):

    <root>/STRATA-OBJECTSTORE   "strata-objectstore 1\\n": what this directory is
    <root>/objects/<key>        one file per object
    <root>/tmp/                 writes in progress (removed at open)
    <root>/lock                 flock'ed around each conditional write

Every put writes a temporary file, fsyncs it, renames it into place and
fsyncs the directory: a crash leaves the old object or the new one.
`put_if_absent` links the temporary file into place (link fails if the
name exists), so it needs no lock; `put_if_match` checks the ETag and
renames under an exclusive flock of `lock`, which serialises it against
every other conditional write of any thread or process (each call opens
the lock file itself: flock excludes open file descriptions).
Unconditional puts and deletes take the lock shared, so they never land
between a conditional write's check and its rename.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import secrets
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .checksums import xxh3
from .errors import InvalidArgumentError, StrataError

MARKER = "STRATA-OBJECTSTORE"
MARKER_TEXT = "strata-objectstore 1\n"
MAX_KEY = 1024
_SEGMENT = re.compile(r"^[A-Za-z0-9._=-]+$")


class ObjectStoreError(StrataError):
    """What an object store refused or could not do."""


class ObjectNotFoundError(ObjectStoreError, LookupError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no object {key!r}")
        self.key = key


class ConditionalWritesUnsupportedError(ObjectStoreError):
    """The store does not honour If-None-Match / If-Match: it cannot fence."""


class PreconditionFailedError(ObjectStoreError):
    """A conditional write lost: the object exists, or its ETag changed."""

    def __init__(self, key: str, why: str, current: str | None = None) -> None:
        super().__init__(f"conditional write of {key!r} refused: {why}")
        self.key = key
        self.current = current  # the object's ETag as read after the refusal, when it was read


@dataclass(frozen=True)
class Object:
    data: bytes
    etag: str


@dataclass(frozen=True)
class Listed:
    key: str
    size: int


class ObjectStore(Protocol):
    def get(self, key: str) -> Object: ...
    def get_range(self, key: str, start: int, end: int) -> bytes: ...
    def put(self, key: str, data: bytes) -> str: ...
    def put_if_absent(self, key: str, data: bytes) -> str: ...
    def put_if_match(self, key: str, data: bytes, etag: str) -> str: ...
    def delete(self, keys: Sequence[str]) -> None: ...
    def list(self, prefix: str = "") -> list[Listed]: ...


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY:
        raise InvalidArgumentError(f"invalid object key {key!r}: use 1-{MAX_KEY} bytes")
    for seg in key.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT.match(seg):
            raise InvalidArgumentError(f"invalid object key {key!r}: segments of [A-Za-z0-9._=-], "
                                       "none empty, '.' or '..'")
    return key


def _list_prefix(prefix: str) -> str:
    """`prefix` as the start of the keys below it ("" or "a/b/")."""
    prefix = prefix.rstrip("/")
    return check_key(prefix) + "/" if prefix else ""


def normalise_etag(etag: str) -> str:
    """An ETag as this interface speaks it: without quotes or a weak prefix."""
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


def etag_of(data: bytes) -> str:
    return f"{xxh3(data):016x}"


class LocalObjectStore:
    """An object store in a directory (see the top for its layout)."""

    def __init__(self, root: str, *, create: bool = True) -> None:
        self.root = os.path.abspath(root)
        marker = os.path.join(self.root, MARKER)
        if not os.path.exists(marker):
            if not create:
                raise ObjectStoreError(f"{self.root} is not an object store (no {MARKER})")
            if os.path.isdir(self.root) and os.listdir(self.root):
                raise ObjectStoreError(f"{self.root} has files and is not an object store: "
                                       "give an empty or new directory")
            for d in ("objects", "tmp"):
                os.makedirs(os.path.join(self.root, d), mode=0o700, exist_ok=True)
            self._write_new(marker, MARKER_TEXT.encode(), replace=True)
        else:
            with open(marker) as f:
                if f.read() != MARKER_TEXT:
                    raise ObjectStoreError(f"{marker}: unknown object store version (this is {MARKER_TEXT!r})")
        self._tmp = os.path.join(self.root, "tmp")
        with contextlib.suppress(FileNotFoundError):  # writes a crash interrupted
            for name in os.listdir(self._tmp):
                os.unlink(os.path.join(self._tmp, name))
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.root, "objects"), mode=0o700, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({self.root!r})"

    # --- reads ----------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return os.path.join(self.root, "objects", check_key(key))

    def get(self, key: str) -> Object:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(key) from None
        return Object(data, etag_of(data))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if not 0 <= start <= end:
            raise InvalidArgumentError(f"invalid range [{start}, {end}) of {key!r}")
        try:
            with open(self._path(key), "rb") as f:
                return os.pread(f.fileno(), end - start, start)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(key) from None

    def list(self, prefix: str = "") -> list[Listed]:
        base = os.path.join(self.root, "objects")
        below = _list_prefix(prefix)
        out = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                path = os.path.join(dirpath, name)
                key = os.path.relpath(path, base).replace(os.sep, "/")
                if key.startswith(below):
                    with contextlib.suppress(FileNotFoundError):  # (deleted meanwhile)
                        out.append(Listed(key, os.stat(path).st_size))
        return sorted(out, key=lambda x: x.key)

    # --- writes ---------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with self._locked(fcntl.LOCK_SH):
            self._write_new(path, data, replace=True)
        return etag_of(data)

    def put_if_absent(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with self._locked(fcntl.LOCK_SH):
            try:
                self._write_new(path, data, replace=False)
            except FileExistsError:
                raise PreconditionFailedError(key, "it exists") from None
        return etag_of(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        want = normalise_etag(etag)
        with self._locked(fcntl.LOCK_EX):
            try:
                now = self._etag_at(path)
            except FileNotFoundError:
                raise PreconditionFailedError(key, "it does not exist") from None
            if now != want:
                raise PreconditionFailedError(key, f"its ETag is {now}, not {want}")
            self._write_new(path, data, replace=True)
        return etag_of(data)

    def _etag_at(self, path: str) -> str:
        with open(path, "rb") as f:
            return etag_of(f.read())

    def delete(self, keys: Sequence[str]) -> None:
        paths = [self._path(k) for k in keys]  # (all checked before any is deleted)
        with self._locked(fcntl.LOCK_SH):
            dirs = set()
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                    dirs.add(os.path.dirname(p))
            for d in dirs:
                _sync_dir(d)

    # --- helpers --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)  # (releases the flock)

    def _write_new(self, path: str, data: bytes, *, replace: bool) -> None:
        """write-temp, fsync, rename (or link, when it must not exist), fsync-directory."""
        parent = os.path.dirname(path)
        made = _makedirs(parent)
        tmp = os.path.join(self.root, "tmp", secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if os.path.isdir(path):
                raise InvalidArgumentError(f"{path}: a local object store cannot hold an object and keys "
                                           "below it as one name (S3 can)")
            if replace:
                os.rename(tmp, path)
            else:
                os.link(tmp, path)  # FileExistsError if it is there: atomic
                os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _sync_dir(parent)
        for d in made:  # (new directories' entries in their parents)
            _sync_dir(os.path.dirname(d))


def _makedirs(path: str) -> list[str]:
    """Make `path` and its missing parents (0700); the ones made, top first."""
    made: list[str] = []
    p = path
    while not os.path.isdir(p):
        if os.path.lexists(p) and not os.path.isdir(p):  # (made meanwhile by another writer: fine)
            raise InvalidArgumentError(f"{p}: a local object store cannot hold an object and keys "
                                       "below it as one name (S3 can)")
        made.append(p)
        p = os.path.dirname(p)
    for d in reversed(made):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
    return list(reversed(made))


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- S3 ---------------------------------------------------------------------------------


def _s3_error(e: Exception, key: str, what: str) -> ObjectStoreError:
    """An obstore error as ours, with its first line (the request, its status)
    and never the request's headers or credentials."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ObjectStoreError(f"{what} {key!r}: {first}")


class S3ObjectStore:
    """An object store in an S3 bucket, under an optional prefix.

    Credentials, region and endpoint come from `options` or else the usual
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_REGION or AWS_DEFAULT_REGION, AWS_ENDPOINT_URL); an http:// endpoint
    (a test server, a store on the LAN) is allowed when it is given."""

    def __init__(
        self, bucket: str, prefix: str = "", *, options: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None, timeout_s: float = 30.0, retries: int = 4,
    ) -> None:
        from obstore.store import S3Store

        env = os.environ if env is None else env
        opts = dict(options or {})
        endpoint = opts.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint"] = endpoint
        opts.setdefault("region", env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1")
        for name, var in (("access_key_id", "AWS_ACCESS_KEY_ID"), ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                          ("session_token", "AWS_SESSION_TOKEN")):
            if var in env and name not in opts:
                opts[name] = env[var]
        if prefix:
            check_key(prefix.strip("/"))
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # If-Match with the ETag quoted (RFC 9110), until the server refuses its own current ETag so
        # (Ceph RGW matches the unquoted text); then unquoted. One flag, flipped once: no lock.
        self.quote_if_match = True
        self.endpoint = endpoint or f"https://s3.{opts['region']}.amazonaws.com"
        self._store = S3Store(
            bucket, prefix=self.prefix or None, config=opts,  # type: ignore[arg-type]
            client_options={
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
                "timeout": datetime.timedelta(seconds=timeout_s),
                "connect_timeout": datetime.timedelta(seconds=min(5.0, timeout_s)),
            },
            retry_config={
                "max_retries": retries,
                "retry_timeout": datetime.timedelta(seconds=timeout_s * 2),
                "backoff": {"init_backoff": datetime.timedelta(milliseconds=50),
                            "max_backoff": datetime.timedelta(seconds=2), "base": 2},
            },
        )

    def __repr__(self) -> str:
        return f"S3ObjectStore(s3://{self.bucket}/{self.prefix} at {self.endpoint})"

    def get(self, key: str) -> Object:
        import obstore

        check_key(key)
        try:
            r = obstore.get(self._store, key)
            data = bytes(r.bytes())
        except FileNotFoundError:
            raise ObjectNotFoundError(key) from None
        except Exception as e:
            raise _s3_error(e, key, "could not read") from None
        return Object(data, normalise_etag(r.meta.get("e_tag") or ""))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        import obstore

        check_key(key)
        if not 0 <= start <= end:
            raise InvalidArgumentError(f"invalid range [{start}, {end}) of {key!r}")
        if start == end:
            self.get(key)  # (an empty range of a missing object is still missing)
            return b""
        try:
            return bytes(obstore.get_range(self._store, key, start=start, end=end))
        except FileNotFoundError:
            raise ObjectNotFoundError(key) from None
        except Exception as e:
            if "416 Range Not Satisfiable" in str(e):  # all of it past the end: clipped to nothing
                return b""
            raise _s3_error(e, key, "could not read") from None

    def list(self, prefix: str = "") -> list[Listed]:
        import obstore

        below = _list_prefix(prefix)
        try:
            out = [Listed(m["path"], m["size"]) for batch in obstore.list(self._store, prefix=below or None)
                   for m in batch]
        except Exception as e:
            raise _s3_error(e, below, "could not list") from None
        return sorted(out, key=lambda x: x.key)

    def put(self, key: str, data: bytes) -> str:
        return self._put(key, data, "overwrite")

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self._put(key, data, "create")

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        etag = normalise_etag(etag)
        quoted = self.quote_if_match
        try:
            return self._put(key, data, {"e_tag": f'"{etag}"' if quoted else etag})
        except PreconditionFailedError as e:
            if not (quoted and e.current == etag):
                raise
        # refused though its ETag is the one given: the server wants it unquoted (still conditional)
        try:
            out = self._put(key, data, {"e_tag": etag})
        except PreconditionFailedError as e:
            if e.current == etag:
                raise ConditionalWritesUnsupportedError(
                    f"{self!r} refuses If-Match with the object's own ETag {etag}, quoted or not") from None
            raise
        self.quote_if_match = False
        return out

    def _put(self, key: str, data: bytes, mode: object) -> str:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        check_key(key)
        try:
            r = obstore.put(self._store, key, data, mode=mode, use_multipart=False)  # type: ignore[arg-type]
        except (AlreadyExistsError, PreconditionError, FileNotFoundError) as e:
            # Refused: by another writer, or by this one's own lost success?
            try:
                now = self.get(key)
            except ObjectNotFoundError:
                raise PreconditionFailedError(key, "it does not exist") from None
            if now.data == data:
                return now.etag
            why = "it exists" if mode == "create" else f"its ETag is {now.etag}, not {normalise_etag(mode['e_tag'])}"  # type: ignore[index]
            raise PreconditionFailedError(key, why, current=now.etag) from e
        except Exception as e:
            raise _s3_error(e, key, "could not write") from None
        return normalise_etag(r["e_tag"] or "")

    def delete(self, keys: Sequence[str]) -> None:
        import obstore

        keys = [check_key(k) for k in keys]
        for i in range(0, len(keys), 1000):  # (S3's batch limit)
            try:
                obstore.delete(self._store, keys[i:i + 1000])
            except FileNotFoundError:
                continue
            except Exception as e:
                raise _s3_error(e, keys[i], "could not delete") from None


# --- opening by URL, and probing ---------------------------------------------------------


def open_object_store(url: str, *, env: Mapping[str, str] | None = None) -> ObjectStore:
    """`file:///abs/path` (made if missing) or `s3://bucket[/prefix]`."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidArgumentError(f"a remote is a URL, file:///path or s3://bucket/prefix, got {url!r}")
    u = urllib.parse.urlsplit(url)
    if u.query or u.fragment:
        raise InvalidArgumentError(f"remote URL {url!r}: no query or fragment is understood")
    if u.scheme == "file":
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise InvalidArgumentError(f"remote URL {url!r}: a file URL is file:///absolute/path")
        return LocalObjectStore(urllib.parse.unquote(u.path))
    if u.scheme == "s3":
        if not u.netloc or u.username or u.password:
            raise InvalidArgumentError(f"remote URL {url!r}: s3://bucket/prefix, with credentials "
                                       "in AWS_* variables, never in the URL")
        return S3ObjectStore(u.netloc, u.path.strip("/"), env=env)
    raise InvalidArgumentError(f"remote URL {url!r}: the scheme is file or s3, not {u.scheme!r}")


def probe_conditional_writes(store: ObjectStore) -> None:
    """Check that `store` honours put-if-absent and put-if-match (raises
    ConditionalWritesUnsupportedError naming what it ignored). Writes and
    deletes one object under `probe/`."""
    key = f"probe/{secrets.token_hex(8)}"
    try:
        first = store.put_if_absent(key, b"probe 1 " + key.encode())
        try:
            store.put_if_absent(key, b"probe 2 " + key.encode())
        except PreconditionFailedError:
            pass
        else:
            raise ConditionalWritesUnsupportedError(
                f"{store!r} ignored If-None-Match: a second put-if-absent of {key!r} overwrote the first")
        # the current ETag first: a server that wants it bare switches the client to bare (S3ObjectStore),
        # and the stale one is then tried in the form every later write uses
        try:
            store.put_if_match(key, b"probe 3 " + key.encode(), first)
        except PreconditionFailedError as e:
            raise ConditionalWritesUnsupportedError(
                f"{store!r} refused If-Match with the ETag its own put-if-absent answered: {e}") from None
        try:
            store.put_if_match(key, b"probe 4 " + key.encode(), etag_of(b"not this"))
        except PreconditionFailedError:
            pass
        else:
            raise ConditionalWritesUnsupportedError(f"{store!r} ignored If-Match: a stale ETag overwrote {key!r}")
        if store.get(key).data != b"probe 3 " + key.encode():
            raise ConditionalWritesUnsupportedError(f"{store!r}: put-if-match with the current ETag was lost")
    finally:
        store.delete([key])
