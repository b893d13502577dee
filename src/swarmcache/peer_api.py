"""The peer API: what daemons ask of each other (hello, links, blocks, joins).

Clients and hypervisors use api.py; these routes serve other daemons only. They share
the port and the error middleware with the client API (see daemon.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

from aiohttp import web

from .api import METRICS, SENT, STORE, SWARM, Handler, image_id_from
from .errors import BadRequest, ImageNotFound, PreconditionFailed, Unauthorized
from .httpfile import sendfile
from .limits import RETRY_AFTER, Limits
from .peerauth import EMPTY_SHA256, HEADER, REPLY_HEADER, AuthError, Verifier, sign_reply
from .peers.swarm import DIGEST_HEADER, NODE_HEADER
from .store import CachedImage
from .tls import TLS, has_cluster_cert
from .wire import PROTOCOL_VERSION, Join, WireError, decode, encode

# Test-only fault switch: a daemon started with this set serves corrupted blocks to
# peers (the multi-host tests use it to play a bad peer). Never set it in production.
CORRUPT_CHUNKS_ENV = "SWARMCACHE_TEST_CORRUPT_PEER_CHUNKS"
MAX_JOIN = 4096  # bytes of a join message
BODY_TIMEOUT = 5.0  # seconds to receive the body of a signed request
PEER_AUTH = web.AppKey("peer_auth", Verifier)  # set when a cluster secret is configured
AUTH_NONCE = web.RequestKey("swarmcache.auth_nonce", str)  # of a request that proved it
LIMITS = web.AppKey("limits", Limits)  # [limits]


@web.middleware
async def peer_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """[limits] max_peer_connections: one peer request more than that gets 503 with
    Retry-After at once. Counted once the request proved the cluster secret (strangers
    are refused before, so they cannot fill the places)."""
    limits = request.app.get(LIMITS)
    if limits is None or not request.path.startswith("/v1/peer/"):
        return await handler(request)
    if not limits.peer_request_starts():
        request.app[METRICS].peer_requests_refused.inc()
        return web.json_response(
            {
                "error": "busy",
                "detail": f"serving {limits.max_peer_connections} peer requests already",
            },
            status=503,
            headers={"Retry-After": f"{RETRY_AFTER:g}"},
        )
    try:
        return await handler(request)
    finally:
        limits.peer_request_ends()


@web.middleware
async def peer_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With mutual TLS, a peer route answers only a client that presented a cluster
    certificate; with a cluster secret, only requests signed with it (401); with both,
    both are needed."""
    if not request.path.startswith("/v1/peer/"):
        return await handler(request)
    if TLS in request.app and not has_cluster_cert(request):
        request.app[METRICS].peer_auth_failures.inc()
        raise Unauthorized(
            "peer request refused: peer routes need a client certificate signed by the "
            "cluster CA ([security] tls_ca)"
        )
    verifier = request.app.get(PEER_AUTH)
    if verifier is None:
        return await handler(request)
    try:
        nonce = await check_signed(request, verifier)
    except AuthError as err:
        request.app[METRICS].peer_auth_failures.inc()
        raise Unauthorized(f"peer request refused: {err}") from None
    request[AUTH_NONCE] = nonce
    return await handler(request)


async def check_signed(request: web.Request, verifier: Verifier) -> str:
    """The nonce of a request signed with the cluster secret (AuthError if it is not).
    The small body the signature covers is read within BODY_TIMEOUT, so a sender that
    dribbles it holds nothing for long (BadRequest, as for a body too large)."""
    if request.content_length is not None and request.content_length > MAX_JOIN:
        raise BadRequest(f"a signed request's body is at most {MAX_JOIN} bytes")
    body = b""
    if request.can_read_body:
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await request.read()
        except TimeoutError:
            raise BadRequest(f"the request body did not arrive within {BODY_TIMEOUT:g}s") from None
    digest = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    return verifier.check(
        request.method, request.raw_path, digest, request.headers.get(HEADER), time.time()
    )


async def sign_answer(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: sign the answer to a request that proved the secret, over
    its nonce, status and what it carries (a block's digest header, else the body's
    sha256), so the asker knows a cluster member answered."""
    nonce = request.get(AUTH_NONCE)
    verifier = request.app.get(PEER_AUTH)
    if nonce is None or verifier is None:
        return
    if DIGEST_HEADER in response.headers:
        binding = response.headers[DIGEST_HEADER]
    elif isinstance(response, web.Response):
        body = response.body if isinstance(response.body, bytes) else b""
        binding = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    else:
        binding = ""
    response.headers[REPLY_HEADER] = sign_reply(verifier.secret, nonce, response.status, binding)


async def peer_hello(request: web.Request) -> web.Response:
    """GET /v1/peer/hello: who we are (static peers ask this to learn our node id)."""
    swarm = request.app[SWARM]
    images, chunks = swarm.inventory()
    return web.json_response(
        {
            "node": swarm.node_id,
            "version": PROTOCOL_VERSION,
            "port": swarm.advertise[1],
            "generation": swarm.generation,
            "role": "seeder" if swarm.seeder else "host",
            "images": images,
            "chunks": chunks,
        }
    )


async def peer_ws(request: web.Request) -> web.StreamResponse:
    """GET /v1/peer/ws: a peer's subscriptions to our images (see wire.py)."""
    return await request.app[SWARM].serve(request)


async def peer_block(request: web.Request) -> web.StreamResponse:
    """GET /v1/peer/images/{id}/blocks/{index}: one block we hold, with sendfile.

    404 if we do not hold it, 412 if If-Match names another version, 503 with
    Retry-After if the asker (X-Swarmcache-Node) holds none of our upload slots.
    """
    image_id = image_id_from(request)
    try:
        block = int(request.match_info["index"])
    except ValueError:
        raise BadRequest("block index must be an integer") from None
    image = request.app[STORE].get(image_id)
    if image is None or not 0 <= block < image.manifest.blocks or not image.has_block(block):
        raise ImageNotFound(f"block {block} of {image_id!r} is not held here")
    if_match = request.headers.get("If-Match")
    if if_match is not None and if_match != image.manifest.etag:
        raise PreconditionFailed(f"{image_id!r} here is another version ({image.manifest.etag})")
    swarm = request.app[SWARM]
    node = request.headers.get(NODE_HEADER)
    wait = swarm.may_serve(image_id, node)
    if wait is not None:
        return web.Response(status=503, headers={"Retry-After": f"{wait:.3f}"})
    assert node is not None  # may_serve refuses a request that names no node
    try:
        return await _send_block(request, image, block)
    finally:
        swarm.sent(image_id, node)


async def _send_block(request: web.Request, image: CachedImage, block: int) -> web.StreamResponse:
    """The block's bytes, with sendfile (or corrupted, for the fault tests)."""
    image_id = image.manifest.image_id
    offset, length = image.manifest.block_span(block)
    digest = image.manifest.block_digest(block)
    resp = web.StreamResponse()
    resp.content_type = "application/octet-stream"
    resp.content_length = length
    if digest is not None:
        resp.headers[DIGEST_HEADER] = digest.hex()
    corrupt = bool(os.environ.get(CORRUPT_CHUNKS_ENV))
    limits = request.app.get(LIMITS)
    if limits is not None:
        await limits.upload.take(length)  # [limits] upload_rate
    try:
        f = open(image.data_path, "rb")  # noqa: SIM115, ASYNC230
    except OSError as err:
        raise ImageNotFound(f"image {image_id!r} is no longer in the cache") from err
    image.readers += 1
    try:
        await resp.prepare(request)
        if corrupt:
            data = bytearray(await asyncio.to_thread(os.pread, f.fileno(), length, offset))
            data[len(data) // 2] ^= 0xFF
            await resp.write(bytes(data))
        else:
            await sendfile(request, resp, f, offset, length)
        await resp.write_eof()
        resp[SENT] = length
        request.app[METRICS].bytes_served_peers.inc(length)
    except ConnectionError:
        if request.transport is not None:
            request.transport.abort()
    finally:
        image.readers -= 1
        f.close()
    return resp


async def peer_join(request: web.Request) -> web.Response:
    """POST /v1/peer/images/{id}/join: a host joins an image we read (see wire.Join)."""
    image_id = image_id_from(request)
    if request.content_length is not None and request.content_length > MAX_JOIN:
        raise BadRequest("join message too large")
    body = await request.read()  # bounded by the app's client_max_size (1 MiB) too
    if len(body) > MAX_JOIN:
        raise BadRequest("join message too large")
    try:
        msg = decode(body)
    except WireError as err:
        raise BadRequest(f"bad join message: {err.detail}") from None
    if not isinstance(msg, Join) or msg.image_id != image_id:
        raise BadRequest("expected a join for this image")
    answer = await request.app[SWARM].answer_join(msg, request.remote)
    return web.Response(body=encode(answer), content_type="application/x-msgpack")


def add_routes(app: web.Application) -> None:
    """Register the peer API's routes."""
    app.router.add_get("/v1/peer/hello", peer_hello)
    app.router.add_get("/v1/peer/ws", peer_ws)
    app.router.add_get("/v1/peer/images/{image_id}/blocks/{index}", peer_block)
    app.router.add_post("/v1/peer/images/{image_id}/join", peer_join)
