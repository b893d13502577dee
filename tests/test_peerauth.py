"""peerauth: the cluster-secret signatures of peer requests and answers (pure)."""

from __future__ import annotations

import pytest

from swarmcache.peerauth import (
    EMPTY_SHA256,
    AuthError,
    Verifier,
    check_reply,
    sign_reply,
    sign_request,
)

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def test_a_signed_request_passes_once() -> None:
    v = Verifier(SECRET)
    signed = sign_request(SECRET, "GET", "/v1/peer/hello", EMPTY_SHA256, NOW)
    assert v.check("GET", "/v1/peer/hello", EMPTY_SHA256, signed.header, NOW + 1) == signed.nonce
    with pytest.raises(AuthError, match="replayed"):
        v.check("GET", "/v1/peer/hello", EMPTY_SHA256, signed.header, NOW + 2)


@pytest.mark.parametrize(
    ("method", "path", "body", "secret", "at", "problem"),
    [
        ("POST", "/v1/peer/hello", EMPTY_SHA256, SECRET, NOW, "bad signature"),  # method
        ("GET", "/v1/peer/ws", EMPTY_SHA256, SECRET, NOW, "bad signature"),  # path
        ("GET", "/v1/peer/hello", "0" * 64, SECRET, NOW, "bad signature"),  # body
        ("GET", "/v1/peer/hello", EMPTY_SHA256, b"t" * 32, NOW, "bad signature"),  # secret
        ("GET", "/v1/peer/hello", EMPTY_SHA256, SECRET, NOW + 61, "more than 60s"),  # late
        ("GET", "/v1/peer/hello", EMPTY_SHA256, SECRET, NOW - 61, "more than 60s"),  # early
    ],
)
def test_a_request_that_does_not_prove_the_secret_is_refused(
    method: str, path: str, body: str, secret: bytes, at: float, problem: str
) -> None:
    signed = sign_request(SECRET, "GET", "/v1/peer/hello", EMPTY_SHA256, NOW)
    with pytest.raises(AuthError, match=problem):
        Verifier(secret).check(method, path, body, signed.header, at)


@pytest.mark.parametrize("header", [None, "", "v1", "v2 ts=1 nonce=00 mac=00", "v1 ts=1"])
def test_a_missing_or_malformed_header_is_refused(header: str | None) -> None:
    with pytest.raises(AuthError, match="no valid"):
        Verifier(SECRET).check("GET", "/", EMPTY_SHA256, header, NOW)


def test_nonces_are_forgotten_once_their_timestamps_are_refused_anyway() -> None:
    v = Verifier(SECRET, skew=60)
    for i in range(5):
        v.check(
            "GET",
            "/",
            EMPTY_SHA256,
            sign_request(SECRET, "GET", "/", EMPTY_SHA256, NOW + i).header,
            NOW + i,
        )
    late = sign_request(SECRET, "GET", "/", EMPTY_SHA256, NOW + 200)
    v.check("GET", "/", EMPTY_SHA256, late.header, NOW + 200)
    assert len(v._seen) == 1  # the five older ones are past 2 * skew


def test_the_nonce_memory_is_bounded() -> None:
    v = Verifier(SECRET, max_nonces=10)
    for _ in range(50):
        v.check(
            "GET",
            "/",
            EMPTY_SHA256,
            sign_request(SECRET, "GET", "/", EMPTY_SHA256, NOW).header,
            NOW,
        )
    assert len(v._seen) == 10


def test_an_answer_proves_the_secret_for_its_request_only() -> None:
    signed = sign_request(SECRET, "GET", "/b", EMPTY_SHA256, NOW)
    reply = sign_reply(SECRET, signed.nonce, 200, "digest-abc")
    check_reply(SECRET, signed.nonce, 200, "digest-abc", reply)
    for nonce, status, binding, header, problem in (
        (signed.nonce, 200, "digest-abc", None, "not signed"),
        (signed.nonce, 200, "digest-xyz", reply, "another secret"),  # other bytes
        (signed.nonce, 404, "digest-abc", reply, "another secret"),  # other status
        ("0" * 32, 200, "digest-abc", reply, "another secret"),  # another request's
        (
            signed.nonce,
            200,
            "digest-abc",
            sign_reply(b"t" * 32, signed.nonce, 200, "digest-abc"),
            "another secret",
        ),
    ):
        with pytest.raises(AuthError, match=problem):
            check_reply(SECRET, nonce, status, binding, header)
