"""Peer authentication with a cluster secret: pure (no I/O; the clock is passed in).

Theory of operation. Every daemon of a cluster holds the same secret
(`[security] cluster_secret_file`). A request to a peer route carries

    X-Swarmcache-Auth: v1 ts=<unix seconds> nonce=<32 hex> mac=<64 hex>

where mac = HMAC-SHA256(secret, "req\\n" METHOD "\\n" PATH "\\n" ts "\\n" nonce "\\n"
sha256(body)). The receiver recomputes it, refuses a timestamp more than SKEW
seconds off its own clock, and refuses a nonce it has seen within the last 2 * SKEW
seconds (a replay); any refusal is a 401. The answer proves the peer holds the
secret too, so a host that merely answers on the port is never used as a source:

    X-Swarmcache-Auth-Reply: v1 mac=<64 hex>

with mac = HMAC-SHA256(secret, "rep\\n" nonce "\\n" STATUS "\\n" BINDING), the request's
nonce and a value the answer carries (a block's digest header, or the sha256 of a
small body): an attacker without the secret can neither sign a request nor forge
the answer to one. Bytes themselves are checked against digests as before; what
this adds is who may ask and who may answer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass

HEADER = "X-Swarmcache-Auth"
REPLY_HEADER = "X-Swarmcache-Auth-Reply"
SKEW = 60.0  # seconds a request's timestamp may differ from our clock
MAX_NONCES = 200_000  # nonces remembered (about 2 * SKEW seconds of requests)
MIN_SECRET = 16  # bytes: shorter secrets are refused at start
_HEADER_RE = re.compile(r"v1 ts=(\d{1,12}) nonce=([0-9a-f]{32}) mac=([0-9a-f]{64})")
_REPLY_RE = re.compile(r"v1 mac=([0-9a-f]{64})")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class AuthError(Exception):
    """A request or an answer that does not prove the cluster secret (a 401)."""


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Signed:
    """A signed request: the header to send and the nonce its answer must echo."""

    header: str
    nonce: str


def sign_request(
    secret: bytes, method: str, path: str, body_sha256: str, now: float, nonce: str | None = None
) -> Signed:
    """The auth header of a request (body_sha256: hex sha256 of its body)."""
    nonce = nonce or secrets.token_hex(16)
    ts = str(int(now))
    mac = _mac(secret, "req", method.upper(), path, ts, nonce, body_sha256)
    return Signed(f"v1 ts={ts} nonce={nonce} mac={mac}", nonce)


def sign_reply(secret: bytes, nonce: str, status: int, binding: str) -> str:
    """The reply header proving we hold the secret too."""
    return "v1 mac=" + _mac(secret, "rep", nonce, str(status), binding)


def check_reply(secret: bytes, nonce: str, status: int, binding: str, header: str | None) -> None:
    """AuthError unless the answer's header proves the secret for this request."""
    m = _REPLY_RE.fullmatch(header or "")
    if m is None:
        raise AuthError("the peer's answer is not signed: it does not hold the cluster secret")
    want = _mac(secret, "rep", nonce, str(status), binding)
    if not hmac.compare_digest(m.group(1), want):
        raise AuthError("the peer's answer is signed with another secret")


class Verifier:
    """Checks requests' auth headers; remembers recent nonces to refuse replays."""

    def __init__(self, secret: bytes, skew: float = SKEW, max_nonces: int = MAX_NONCES) -> None:
        self.secret = secret
        self.skew = skew
        self.max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when, oldest first

    def check(
        self, method: str, path: str, body_sha256: str, header: str | None, now: float
    ) -> str:
        """The request's nonce if its header proves the secret; AuthError otherwise."""
        m = _HEADER_RE.fullmatch(header or "")
        if m is None:
            raise AuthError(f"no valid {HEADER} header: peer routes need the cluster secret")
        ts, nonce, mac = int(m.group(1)), m.group(2), m.group(3)
        want = _mac(self.secret, "req", method.upper(), path, m.group(1), nonce, body_sha256)
        if not hmac.compare_digest(mac, want):
            raise AuthError("bad signature (another cluster secret, or an altered request)")
        if abs(now - ts) > self.skew:
            raise AuthError(f"timestamp {ts} is more than {self.skew:.0f}s from ours ({now:.0f})")
        self._forget(now)
        if nonce in self._seen:
            raise AuthError("a replayed request (nonce seen before)")
        self._seen[nonce] = now
        while len(self._seen) > self.max_nonces:  # bounded even under a flood
            self._seen.popitem(last=False)
        return nonce

    def _forget(self, now: float) -> None:
        """Drop nonces older than 2 * skew: their timestamps are refused anyway."""
        horizon = now - 2 * self.skew
        while self._seen:
            nonce, when = next(iter(self._seen.items()))
            if when >= horizon:
                break
            del self._seen[nonce]
