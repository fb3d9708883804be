"""Passwords as SCRAM-SHA-256 verifiers (RFC 5802, RFC 7677), and the
server side of the exchange, as PostgreSQL speaks it.

Strata never keeps a password: the catalog holds each credential's
verifier, in PostgreSQL's own text form (what `pg_authid.rolpassword`
holds, and libpq's `PQencryptPasswordConn` makes):

    SCRAM-SHA-256$<iterations>:<salt, base64>$<StoredKey, base64>:<ServerKey, base64>

    SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, iterations)
    StoredKey      = SHA-256(HMAC(SaltedPassword, "Client Key"))
    ServerKey      = HMAC(SaltedPassword, "Server Key")

From a verifier one can check a client's proof of the password, and prove
to the client that one holds the verifier, but not log in as the client.
A branch's credentials share one salt and iteration count, so that one
exchange (whose first answer names the salt) checks a proof against all of
them.

The exchange (the proxy's side; `ScramServer`):

    client-first  n,,n=<ignored>,r=<client nonce>   gs2 header "n" or "y": no channel binding
    server-first  r=<client nonce><server nonce>,s=<salt>,i=<iterations>
    client-final  c=biws,r=<nonce>,p=<proof>        ("biws" is base64 of the gs2 header "n,,")
    server-final  v=<ServerSignature>

PostgreSQL ignores the user name in the SCRAM messages (libpq sends it
empty: the startup packet names the user), and so does this. A client that
asks for channel binding (gs2 header "p") is refused: the proxy does not
speak TLS (on loopback). scramp, the maintained Python SCRAM library,
refuses libpq's empty user name, which is why this is written out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)
SALT_BYTES = 16
NONCE_BYTES = 18
MAX_MESSAGE = 1024  # bytes of a client's SCRAM message (libpq's are about 100)


class ScramError(Exception):
    """A SCRAM message that is malformed, or a proof that does not check."""


@dataclass(frozen=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        return (f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
                f"${_b64(self.stored_key)}:{_b64(self.server_key)}")


def new_password() -> str:
    """A generated password: 144 random bits, URL-safe."""
    return secrets.token_urlsafe(18)


def new_salt() -> str:
    return _b64(secrets.token_bytes(SALT_BYTES))


def make_verifier(password: str, salt: str | None = None, iterations: int = ITERATIONS) -> str:
    """The verifier of `password`, with `salt` (base64; a new one if None).
    The password is taken as it is, without SASLprep: libpq's SASLprep
    leaves Strata's generated (URL-safe ASCII) passwords unchanged."""
    raw_salt = base64.b64decode(salt, validate=True) if salt is not None else secrets.token_bytes(SALT_BYTES)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), raw_salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return str(Verifier(iterations, raw_salt, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")))


def parse_verifier(text: str) -> Verifier:
    try:
        mech, rest = text.split("$", 1)
        head, keys = rest.split("$", 1)
        iterations, salt = head.split(":", 1)
        stored, server = keys.split(":", 1)
        v = Verifier(int(iterations), base64.b64decode(salt, validate=True),
                     base64.b64decode(stored, validate=True), base64.b64decode(server, validate=True))
    except ValueError as e:
        raise ScramError(f"not a SCRAM-SHA-256 verifier: {e}") from None
    if mech != MECHANISM or v.iterations < 1 or len(v.stored_key) != 32 or len(v.server_key) != 32:
        raise ScramError("not a SCRAM-SHA-256 verifier")
    return v


class ScramServer:
    """One exchange, checking the client's proof against any of
    `verifiers` (which must share salt and iterations; none: every proof
    fails, after the same exchange)."""

    def __init__(self, verifiers: list[str], *, nonce: str | None = None) -> None:
        parsed = [parse_verifier(v) for v in verifiers]
        if len({(v.salt, v.iterations) for v in parsed}) > 1:
            raise ValueError("the verifiers of one exchange must share salt and iterations")
        self._verifiers = parsed
        self._salt = parsed[0].salt if parsed else secrets.token_bytes(SALT_BYTES)
        self._iterations = parsed[0].iterations if parsed else ITERATIONS
        self._server_nonce = nonce or _b64(secrets.token_bytes(NONCE_BYTES))
        self._first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._gs2 = ""
        self.matched: int | None = None  # which verifier the proof checked against (after `final`)

    def first(self, client_first: bytes) -> bytes:
        """The server-first message answering the client's first."""
        text = _text(client_first)
        gs2, sep, bare = _gs2_split(text)
        if not sep:
            raise ScramError("malformed client-first message")
        if gs2[0] == "p":
            raise ScramError("channel binding is not offered (the proxy does not use TLS)")
        attrs = _attrs(bare)
        if "r" not in attrs or "n" not in attrs or not attrs["r"] or "m" in attrs:
            raise ScramError("malformed client-first message: it needs n= and r=, and no m=")
        if any(c < "!" or c > "~" or c == "," for c in attrs["r"]):
            raise ScramError("malformed client nonce")
        self._gs2 = gs2
        self._first_bare = bare
        self._nonce = attrs["r"] + self._server_nonce
        self._server_first = f"r={self._nonce},s={_b64(self._salt)},i={self._iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        """The server-final message, if the client's proof checks against
        one of the verifiers; ScramError otherwise."""
        if not self._nonce:
            raise ScramError("client-final message before client-first")
        text = _text(client_final)
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed client-final message: no proof")
        attrs = _attrs(without_proof)
        try:
            binding = base64.b64decode(attrs.get("c", ""), validate=True)
            proof = base64.b64decode(proof_text, validate=True)
        except ValueError:
            raise ScramError("malformed client-final message: bad base64") from None
        if binding != self._gs2.encode():
            raise ScramError("channel binding data does not match the client's first message")
        if not hmac.compare_digest(attrs.get("r", ""), self._nonce):
            raise ScramError("the nonce does not match the exchange's")
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        ok: Verifier | None = None
        for i, v in enumerate(self._verifiers):  # (every one is tried: the time does not tell which matched)
            signature = _hmac(v.stored_key, auth_message)
            client_key = bytes(a ^ b for a, b in zip(proof, signature)) if len(proof) == 32 else b""
            if hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key) and ok is None:
                ok, self.matched = v, i
        if ok is None:
            raise ScramError("password authentication failed")
        return f"v={_b64(_hmac(ok.server_key, auth_message))}".encode()


def _gs2_split(text: str) -> tuple[str, bool, str]:
    """(gs2 header with its two commas, found, client-first-bare)."""
    parts = text.split(",", 2)
    if len(parts) != 3 or not (parts[0] in ("n", "y") or parts[0].startswith("p=")):
        return "", False, ""
    if parts[1] and not parts[1].startswith("a="):
        return "", False, ""
    return f"{parts[0]},{parts[1]},", True, parts[2]


def _attrs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        if len(item) < 2 or item[1] != "=" or not item[0].isalpha():
            raise ScramError(f"malformed SCRAM attribute {item[:20]!r}")
        out.setdefault(item[0], item[2:])
    return out


def _text(data: bytes) -> str:
    if len(data) > MAX_MESSAGE:
        raise ScramError(f"SCRAM message of {len(data)} bytes (at most {MAX_MESSAGE})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("SCRAM message is not UTF-8") from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
