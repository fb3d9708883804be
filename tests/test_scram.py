"""pageserver.scram: verifiers and the server side of SCRAM-SHA-256, checked
against RFC 7677's worked example and against scramp's client (an
independent implementation), and fuzzed: a malformed message is a
ScramError, never another exception, and never a login."""

from __future__ import annotations

import base64

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from pageserver.scram import (
    MAX_MESSAGE,
    ScramError,
    ScramServer,
    make_verifier,
    new_password,
    new_salt,
    parse_verifier,
)

# RFC 7677, section 3
RFC_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_the_rfc_7677_example():
    server = ScramServer([make_verifier("pencil", RFC_SALT)], nonce=RFC_SERVER_NONCE)
    assert server.first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_a_wrong_password_fails_the_rfc_example():
    server = ScramServer([make_verifier("pen", RFC_SALT)], nonce=RFC_SERVER_NONCE)
    server.first(RFC_CLIENT_FIRST)
    with pytest.raises(ScramError, match="password authentication failed"):
        server.final(RFC_CLIENT_FINAL)


def test_a_verifier_is_in_postgresql_text_form_and_holds_no_password():
    pw = new_password()
    text = make_verifier(pw, new_salt())
    mech, head, keys = text.split("$")
    assert mech == "SCRAM-SHA-256" and head.startswith("4096:") and ":" in keys
    assert pw not in text and str(parse_verifier(text)) == text
    for bad in ("", "md5abc", "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA", "SCRAM-SHA-256$x:AAAA$" + "A" * 44 + ":" + "A" * 44):
        with pytest.raises(ScramError):
            parse_verifier(bad)


# printable ASCII, which SASLprep leaves as it is (Strata's passwords are
# generated, URL-safe: make_verifier does not SASLprep, scramp's client does)
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


def scram_client(password: str) -> scramp.ScramClient:
    return scramp.ScramClient(["SCRAM-SHA-256"], "postgres", password)  # (libpq's user name is empty)


def exchange(server: ScramServer, password: str) -> None:
    """One exchange through scramp's client; raises ScramError if the
    server refuses, and checks the server's signature."""
    client = scram_client(password)
    client.set_server_first(server.first(client.get_client_first().encode()).decode())
    client.set_server_final(server.final(client.get_client_final().encode()).decode())  # checks v=


@settings(max_examples=25, deadline=None)
@given(password=st.text(PRINTABLE, min_size=1, max_size=40),
       others=st.lists(st.text(PRINTABLE, min_size=1, max_size=10), max_size=3))
def test_any_of_a_branchs_credentials_logs_in_and_no_other_password_does(password, others):
    salt = new_salt()
    verifiers = [make_verifier(o + "\x01", salt) for o in others] + [make_verifier(password, salt)]
    exchange(ScramServer(verifiers), password)
    with pytest.raises(ScramError, match="password authentication failed"):
        exchange(ScramServer(verifiers), password + "x")


def test_no_credentials_means_every_proof_fails_after_a_full_exchange():
    with pytest.raises(ScramError, match="password authentication failed"):
        exchange(ScramServer([]), "anything")


def test_channel_binding_and_out_of_order_messages_are_refused():
    with pytest.raises(ScramError, match="channel binding"):
        ScramServer([]).first(b"p=tls-server-end-point,,n=,r=abc")
    with pytest.raises(ScramError, match="before client-first"):
        ScramServer([]).final(RFC_CLIENT_FINAL)
    with pytest.raises(ScramError, match="at most"):
        ScramServer([]).first(b"n,,n=,r=" + b"a" * MAX_MESSAGE)


def test_a_replayed_final_message_fails_against_a_new_nonce():
    verifier = make_verifier("pencil", RFC_SALT)
    server = ScramServer([verifier])  # a fresh server nonce, not the RFC's
    server.first(RFC_CLIENT_FIRST)
    with pytest.raises(ScramError, match="nonce"):
        server.final(RFC_CLIENT_FINAL)


@settings(max_examples=300, deadline=None)
@given(first=st.binary(max_size=200), final=st.binary(max_size=200))
def test_garbage_is_a_scram_error(first, final):
    server = ScramServer([make_verifier("pencil", RFC_SALT)])
    with pytest.raises(ScramError):
        server.first(first)
        server.final(final)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_mutated_exchange_never_logs_in(data):
    """Flip, drop or insert bytes in the RFC's client messages: the result
    is a ScramError (or, for a change outside what the proof covers, the
    same login), never another exception."""
    def mutate(msg: bytes) -> bytes:
        b = bytearray(msg)
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(b)))
            op = data.draw(st.sampled_from(["flip", "drop", "insert"]))
            if op == "insert" or i == len(b):
                b.insert(i, data.draw(st.integers(0, 255)))
            elif op == "drop":
                del b[i]
            else:
                b[i] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(b)

    which = data.draw(st.sampled_from(["first", "final"]))
    server = ScramServer([make_verifier("pencil", RFC_SALT)], nonce=RFC_SERVER_NONCE)
    first = mutate(RFC_CLIENT_FIRST) if which == "first" else RFC_CLIENT_FIRST
    final = mutate(RFC_CLIENT_FINAL) if which == "final" else RFC_CLIENT_FINAL
    try:
        server.first(first)
        answer = server.final(final)
    except ScramError:
        return
    # the proof covers every byte of client-first, and all of client-final
    # but the proof itself: only mutations that cancel out, or base64 that
    # decodes to the same proof, can pass
    assert answer == RFC_SERVER_FINAL
    assert first == RFC_CLIENT_FIRST
    if which == "final":
        assert base64.b64decode(final.rpartition(b",p=")[2]) == base64.b64decode(RFC_CLIENT_FINAL.rpartition(b",p=")[2])
