"""The PostgreSQL wire protocol, as far as the proxy reads it: pure
functions over bytes, with no I/O (property-tested without a server).

A connection starts with a startup packet (PostgreSQL protocol 3.0,
"Message Formats"):

    Int32 length | Int32 code | body
    code 80877103  SSLRequest      -> answer 'N' (no TLS on loopback), read again
    code 80877104  GSSENCRequest   -> answer 'N', read again
    code 80877102  CancelRequest   body: Int32 pid, secret key (4 bytes;
                   protocol 3.2: up to 256)
    code 196608    StartupMessage  body: (name \\0 value \\0)* \\0
                   (3.0; a 3.x code, 196608 + x, is passed on as it
                   came: the compute answers NegotiateProtocolVersion)

After it, every message is Byte1 type | Int32 length (counting itself) |
body; `Framer` follows their boundaries in a relayed stream.

The proxy authenticates the client itself (SASL, SCRAM-SHA-256: see
`pageserver.scram`), before it wakes the branch:

    proxy   'R' Int32 10  mechanism names \0 ... \0     AuthenticationSASL
    client  'p' mechanism \0 Int32 n, data[n]            SASLInitialResponse (client-first)
    proxy   'R' Int32 11  data                           AuthenticationSASLContinue (server-first)
    client  'p' data                                     SASLResponse (client-final)
    proxy   'R' Int32 12  data                           AuthenticationSASLFinal (server-final)

then the compute's own AuthenticationOk (its Unix socket is trusted) and
the rest of its startup are relayed.
"""

from __future__ import annotations

import struct

from pageserver.scram import MAX_MESSAGE as MAX_SCRAM_MESSAGE

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST, PROTOCOL_3 = 80877103, 80877104, 80877102, 196608
MAX_STARTUP = 10_000  # PostgreSQL's own limit on a startup packet
MAX_CANCEL_KEY = 256  # protocol 3.2's longest cancel key (3.0's is 4 bytes)
I32 = struct.Struct("!i")
STARTUP_HEAD = struct.Struct("!ii")


class ProtocolError(Exception):
    pass


def startup_kind(length: int, code: int) -> str:
    """What a startup packet's header announces: "ssl", "gssenc",
    "cancel" or "startup"; ProtocolError for a length or protocol no
    client sends (the message names which)."""
    if not 8 <= length <= MAX_STARTUP:
        raise ProtocolError(f"invalid startup packet length {length} (8 to {MAX_STARTUP} bytes)")
    if code == SSL_REQUEST:
        kind = "ssl"
    elif code == GSSENC_REQUEST:
        kind = "gssenc"
    elif code == CANCEL_REQUEST:
        kind = "cancel"
    elif code >> 16 == 3:
        kind = "startup"
    else:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: the proxy speaks 3.x")
    if kind in ("ssl", "gssenc") and length != 8:
        raise ProtocolError(f"invalid {'SSLRequest' if kind == 'ssl' else 'GSSENCRequest'} length {length}")
    if kind == "cancel" and not 16 <= length <= 12 + MAX_CANCEL_KEY:
        raise ProtocolError(f"invalid CancelRequest length {length}")
    return kind


def parse_params(body: bytes) -> dict[str, str]:
    parts = body.split(b"\0")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolError("startup parameters are not NUL-terminated")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolError("a startup parameter has no value")
    try:
        return {items[i].decode(): items[i + 1].decode() for i in range(0, len(items), 2)}
    except UnicodeDecodeError as e:
        raise ProtocolError(f"a startup parameter is not UTF-8 ({e.reason} at byte {e.start})") from None


def startup_packet(params: dict[str, str], code: int = PROTOCOL_3) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return STARTUP_HEAD.pack(8 + len(body), code) + body


def error_response(code: str, message: str, severity: str = "FATAL") -> bytes:
    fields = b"".join(t + v.encode() + b"\0" for t, v in ((b"S", severity), (b"V", severity),
                                                         (b"C", code), (b"M", message)))
    body = fields + b"\0"
    return b"E" + I32.pack(4 + len(body)) + body


AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 10, 11, 12
MAX_AUTH_MESSAGE = MAX_SCRAM_MESSAGE + 64  # a SASL message's body: SCRAM's, and the mechanism's name before it


def authentication(code: int, data: bytes = b"") -> bytes:
    """An Authentication message ('R') of `code`, with `data` after it."""
    return b"R" + I32.pack(8 + len(data)) + I32.pack(code) + data


def sasl_mechanisms(*names: str) -> bytes:
    return authentication(AUTH_SASL, b"".join(n.encode() + b"\0" for n in names) + b"\0")


def auth_message_length(head: bytes) -> int:
    """The body length of a client's authentication message from its
    5-byte header: ProtocolError unless it is a 'p' of sane length."""
    if head[:1] != b"p":
        raise ProtocolError(f"expected a password message ('p'), got {head[:1]!r}")
    (n,) = I32.unpack_from(head, 1)
    if not 4 <= n <= 4 + MAX_AUTH_MESSAGE:
        raise ProtocolError(f"invalid password message length {n} (4 to {4 + MAX_AUTH_MESSAGE})")
    return n - 4


def parse_sasl_initial(body: bytes) -> tuple[str, bytes]:
    """(mechanism, its initial response) of a SASLInitialResponse."""
    end = body.find(b"\0")
    if end < 0 or len(body) < end + 5:
        raise ProtocolError("malformed SASLInitialResponse")
    try:
        mechanism = body[:end].decode()
    except UnicodeDecodeError:
        raise ProtocolError("malformed SASLInitialResponse: mechanism is not UTF-8") from None
    (n,) = I32.unpack_from(body, end + 1)
    data = body[end + 5 :]
    if n != len(data):
        raise ProtocolError(f"SASLInitialResponse says {n} bytes of data, has {len(data)}")
    return mechanism, data


def take_endpoint(params: dict[str, str]) -> str | None:
    """The endpoint named in `options` (removed from it), else in the
    database name (which becomes `postgres`)."""
    options = params.get("options", "")
    kept, endpoint = [], None
    for token in options.split():
        for prefix in ("endpoint=", "--endpoint="):
            if token.startswith(prefix):
                endpoint = token[len(prefix):]
                break
        else:
            kept.append(token)
    if endpoint is not None:
        if kept:
            params["options"] = " ".join(kept)
        else:
            params.pop("options", None)
        return endpoint
    db = params.get("database", "")
    if "." in db:
        params["database"] = "postgres"
        return db
    return None


_Z = ord("Z")


class Framer:
    """Follows the message boundaries of a relayed stream of backend
    messages (Byte1 type, Int32 length counting itself, body), chunk by
    chunk, so that the proxy knows when it may insert a message of its own."""

    __slots__ = ("left", "head", "last", "broken")

    def __init__(self) -> None:
        self.left = 0  # bytes of the current message still to come
        self.head = b""  # the start of a header split across chunks
        self.last = 0  # the type of the message begun last
        self.broken = False  # a length no backend sends: never between again

    def feed(self, data: bytes) -> None:
        n, pos = len(data), 0
        if self.left:
            if self.left >= n:
                self.left -= n
                return
            pos, self.left = self.left, 0
        if self.head:
            take = 5 - len(self.head)
            h = self.head + bytes(data[pos : pos + take])
            if len(h) < 5:
                self.head = h
                return
            self.head = b""
            pos = self._begin(h, 0, pos + take, n)
        while pos < n:
            if n - pos < 5:
                self.head = bytes(data[pos:])
                return
            pos = self._begin(data, pos, pos + 5, n)

    def _begin(self, header: bytes, at: int, body: int, n: int) -> int:
        """A message whose header is header[at:at+5] and whose body starts
        at offset `body` of a chunk of n bytes: where the next one starts
        (n, with `left` set, if it goes on in a later chunk)."""
        self.last = header[at]
        length = int.from_bytes(header[at + 1 : at + 5], "big")
        if length < 4:
            self.broken = True
            return n
        end = body + length - 4
        if end > n:
            self.left = end - n
            return n
        return end

    @property
    def between(self) -> bool:
        return not self.left and not self.head and not self.broken

    @property
    def ready(self) -> bool:
        """Between messages, the last a ReadyForQuery: the compute waits for the client."""
        return self.between and self.last == _Z
