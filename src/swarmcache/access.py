"""Who may use the client API: this host, or a caller with the API token.

The client API (reads, fetch, warm, seed, evict, pin, verify, metrics, the peer
table; on the Glance-compatible endpoint its /v2/cache routes) answers requests
from this host without more: from loopback, or from one of the host's own addresses
to itself (the kernel drops packets from outside that claim a local source, so
neither can be forged over TCP). Anyone else needs one of

- `Authorization: Bearer <token>` with the token of `[security] api_token_file`
  (an operator's script, a remote `swarmcache --daemon`, Prometheus);
- a request signed with the cluster secret (`X-Swarmcache-Auth`, see peerauth.py),
  or, with mutual TLS, over a connection that presented a certificate of the
  cluster CA (tls.py): another daemon of the cluster, e.g. one running a
  `swarmcache warm --hosts` job.

Refused: 401 when a token or a cluster secret could have opened it, else 403 (the
API answers this host only). `/healthz` answers everyone (it says nothing but
"up"); peer routes have their own check (peer_api.peer_auth_middleware).
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from .api import METRICS, Handler
from .errors import Forbidden, Unauthorized
from .peer_api import PEER_AUTH, check_signed
from .peerauth import HEADER, AuthError
from .tls import TLS, has_cluster_cert

API_TOKEN = web.AppKey("api_token", str)  # [security] api_token_file's token, if set
OPEN_PATHS = frozenset({"/healthz"})


def is_local(request: web.Request) -> bool:
    """The request comes from this host: loopback, or one of its addresses to itself."""
    remote = request.remote
    if not remote:
        return False
    try:
        ip = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    transport = request.transport
    sock = transport.get_extra_info("sockname") if transport is not None else None
    if not sock:
        return False
    return str(sock[0]).split("%")[0] in (remote, str(ip))


async def check_access(request: web.Request) -> None:
    """Raise Unauthorized/Forbidden unless the caller may use the client API."""
    if is_local(request) or has_cluster_cert(request):
        return
    token = request.app.get(API_TOKEN)
    verifier = request.app.get(PEER_AUTH)
    given = request.headers.get("Authorization", "")
    if token and given.startswith("Bearer "):
        if hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return
        _refused(request)
        raise Unauthorized("the API token is not right")
    if verifier is not None and HEADER in request.headers:
        try:
            await check_signed(request, verifier)
        except AuthError as err:
            _refused(request)
            raise Unauthorized(f"signed API request refused: {err}") from None
        return
    _refused(request)
    if token or verifier is not None or TLS in request.app:
        raise Unauthorized(
            "this API answers other hosts with a token (Authorization: Bearer, "
            "[security] api_token_file), a request signed with the cluster secret or a "
            "client certificate of the cluster CA"
        )
    raise Forbidden(
        "this API answers this host only; set [security] api_token_file to let callers "
        "elsewhere in with the token"
    )


def _refused(request: web.Request) -> None:
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.api_auth_failures.inc()


@web.middleware
async def api_access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The client API's access rule (see the module's docstring); peer routes pass."""
    if not request.path.startswith("/v1/peer/") and request.path not in OPEN_PATHS:
        await check_access(request)
    return await handler(request)
