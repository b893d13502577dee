"""Mutual TLS between daemons: `[security] tls_cert`, `tls_key`, `tls_ca`.

Theory of operation. The cluster has its own certificate authority (`tls_ca`, a PEM
file of one or more CA certificates): every daemon holds a certificate it signed
(`tls_cert`, with its private key `tls_key`), and a certificate signed by it is what
makes a host a member, as holding the cluster secret does (peerauth.py). With TLS
set, the daemon's port (`daemon.listen`) speaks HTTPS to everyone:

- a request to a peer route must come over a connection whose client presented a
  certificate the cluster CA signed, else 401; a client presenting one the CA did
  not sign fails the handshake (the server asks for a certificate but does not
  insist, so that this host's own tools reach the client API without one);
- a daemon connecting to a peer (hellos, links, joins, block reads, a warm job's
  requests) checks the peer's certificate against the cluster CA and presents its
  own: a host whose certificate the CA did not sign is never a source. Peers are
  addressed by IP (mDNS, static peers), so names in certificates are not checked:
  the CA must sign for this cluster's hosts only;
- the client API takes a request from another host that presented a cluster
  certificate as it takes one signed with the cluster secret (access.py).

The cluster secret and TLS can be set together: peer requests must then pass both.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass

from aiohttp import web

from .config import SecurityConfig
from .errors import ConfigError

KEYS = ("tls_cert", "tls_key", "tls_ca")


@dataclass(frozen=True)
class Tls:
    """The daemon's TLS contexts: `server` for its port, `client` for its peers."""

    server: ssl.SSLContext
    client: ssl.SSLContext


TLS = web.AppKey("tls", Tls)  # set when [security] tls_* are


def load(sec: SecurityConfig) -> Tls | None:
    """The contexts of [security] tls_* (None: all three empty). ConfigError naming the
    key if only some are set or a file is unreadable or not what it should be."""
    given = {key: getattr(sec, key) for key in KEYS}
    if not any(given.values()):
        return None
    for key, value in given.items():
        if not value:
            raise ConfigError(
                "config", f"security.{key}", "tls_cert, tls_key and tls_ca are set together"
            )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_OPTIONAL  # peer routes check it; local tools need none
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(server, sec.tls_ca)
    client = _client(sec.tls_ca)
    for ctx in (server, client):
        _load_chain(ctx, sec.tls_cert, sec.tls_key)
    return Tls(server, client)


def client_context(sec: SecurityConfig) -> ssl.SSLContext | None:
    """A context for this host's tools (the CLI) to reach the daemon's HTTPS port: the
    daemon's certificate checked against tls_ca (names not checked, as between
    peers); the host's certificate presented if this user may read its key. None if
    TLS is not configured."""
    if not sec.tls_ca:
        return None
    ctx = _client(sec.tls_ca)
    if sec.tls_cert and sec.tls_key:
        # not readable by this user: the local API needs no certificate
        with contextlib.suppress(OSError, ssl.SSLError):
            ctx.load_cert_chain(sec.tls_cert, sec.tls_key, password=_no_password)
    return ctx


def has_cluster_cert(request: web.Request) -> bool:
    """The request's connection presented a certificate the cluster CA signed (the
    handshake fails for any other, so a certificate seen here is a verified one)."""
    transport = request.transport
    if transport is None or not is_tls(transport):
        return False
    return bool(transport.get_extra_info("peercert"))


def is_tls(transport: object) -> bool:
    """The transport is a TLS one (its socket carries records, not the bytes)."""
    get = getattr(transport, "get_extra_info", None)
    return get is not None and get("sslcontext") is not None


def _client(ca: str) -> ssl.SSLContext:
    """A client context that checks the server's certificate against the cluster CA
    `ca` and not its names (peers are addressed by IP: the CA is the check)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, ca)
    return ctx


def _load_ca(ctx: ssl.SSLContext, path: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except OSError as err:
        raise ConfigError(
            path, "security.tls_ca", f"cannot read: {err.strerror or err} (it checks peers)"
        ) from None
    except ssl.SSLError as err:
        raise ConfigError(path, "security.tls_ca", f"not a PEM CA certificate: {err}") from None


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    for path, name in ((cert, "tls_cert"), (key, "tls_key")):
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise ConfigError(path, f"security.{name}", f"cannot read: {err.strerror}") from None
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as err:
        raise ConfigError(
            cert,
            "security.tls_cert",
            f"certificate and key do not load together (an encrypted key is not supported): {err}",
        ) from None


def _no_password() -> bytes:
    """An encrypted key fails to load rather than asking for a passphrase on a
    terminal (a daemon has none to ask on)."""
    return b""
