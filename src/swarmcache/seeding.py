"""The seeder's API: images fed into the swarm ahead of demand, signed.

A seeder (`[daemon] role = "seeder"`) is a daemon beside the origin. `POST
/v1/images/{id}/seed` fetches an image from the origin like any read would (the
fetch signs the manifest once the image matched the origin's checksum: see
FetchJob) and answers when it is complete and signed; an image it already held
whole and checked before it was a seeder is signed on the spot. `PUT
/v1/images/{id}/seed` takes the image's bytes in the request body instead (an
operator's local copy: `swarmcache seed --file PATH --image-id ID`): they are cut
into chunks and digested as they arrive, and kept only if they match the size and
checksum the origin publishes for that image, so a file can never put bytes into
the swarm that the origin would not have sent. Other daemons answer 409.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from aiohttp import web

from .api import FETCHER, describe, fetch_ended, image_id_from, wait_seconds
from .errors import BadRequest, CannotSign, NotASeeder
from .fetch.fetcher import Fetcher
from .manifest import Checksum
from .store import CachedImage

log = logging.getLogger(__name__)
SYNC_EVERY = 16  # chunks written between group commits of an ingest


def _seeder(request: web.Request) -> Fetcher:
    fetcher = request.app[FETCHER]
    if fetcher.signer is None:
        raise NotASeeder(
            'this daemon does not sign manifests: seed on the daemon.role = "seeder" host'
        )
    return fetcher


async def seed_image(request: web.Request) -> web.Response:
    """POST /v1/images/{id}/seed[?wait=S]: fetch it from the origin and sign it; 200 once
    complete and signed, 202 while it is fetched (after S seconds, default 0)."""
    image_id = image_id_from(request)
    fetcher = _seeder(request)
    seconds = wait_seconds(request)
    await fetcher.start(image_id)
    if await fetch_ended(fetcher, image_id, seconds):
        await sign_held(fetcher, image_id)
        return web.json_response(describe(fetcher, image_id, progress=False))
    return web.json_response(describe(fetcher, image_id, progress=True), status=202)


async def sign_held(fetcher: Fetcher, image_id: str) -> None:
    """Sign a complete image held from before this daemon was a seeder (it matched the
    origin's checksum when it was fetched). No-op if it is signed already."""
    signer = fetcher.signer
    image = fetcher.store.get(image_id)
    if signer is None or image is None or not image.complete or image.manifest.trusted:
        return
    m = image.manifest
    origin = fetcher.manifest_from(image_id, await fetcher.origin.stat(image_id))
    if not origin.same_version(m):
        raise CannotSign(
            f"the copy of {image_id!r} held here is not the origin's version now: "
            "evict it and seed it again"
        )
    if m.origin_hash is None:
        raise CannotSign(
            f"the origin publishes no checksum for {image_id!r}: nothing checked the "
            "bytes, so they are not signed"
        )
    if (
        m.digest_algo == "xxh3"
        or not m.block_size
        or m.image_hash is None
        or m.image_hash != m.origin_hash
    ):
        raise CannotSign(
            f"image {image_id!r} is held with {m.digest_algo} digests or without the "
            "origin's checksum: evict it and seed it again"
        )
    await asyncio.to_thread(image.mark_complete, m.image_hash, signer)
    log.info("%s: signed with key %s", image_id, signer.key_id)


async def ingest_image(request: web.Request) -> web.Response:
    """PUT /v1/images/{id}/seed: the image's bytes in the body, checked against the
    origin's size and checksum, kept and signed if they match."""
    image_id = image_id_from(request)
    fetcher = _seeder(request)
    length = request.content_length
    if length is None:
        raise BadRequest("send the image with a Content-Length")
    stat = await fetcher.origin.stat(image_id)
    checksum = stat.checksum
    if checksum is None:
        raise BadRequest(
            f"the origin publishes no checksum for {image_id!r}: a file cannot be checked "
            "against it (seed it from the origin instead)"
        )
    if length != stat.size:
        raise BadRequest(f"the body is {length} bytes; the origin's {image_id} is {stat.size}")
    manifest = fetcher.manifest_from(image_id, stat)
    held = fetcher.store.get(image_id)
    if held is not None and held.complete and held.manifest.same_source(manifest):
        await sign_held(fetcher, image_id)  # the body is not needed
        return web.json_response(describe(fetcher, image_id, progress=False))
    t0 = time.monotonic()
    await fetcher.ingest(manifest, lambda image: _take_body(request, image, checksum.algo))
    log.info(
        "%s: seeded from a file (%d bytes in %.2fs), signed with key %s",
        image_id,
        stat.size,
        time.monotonic() - t0,
        fetcher.signer.key_id if fetcher.signer else "-",
    )
    return web.json_response(describe(fetcher, image_id, progress=False))


async def _take_body(request: web.Request, image: CachedImage, algo: str) -> Checksum:
    """Cut the body into chunks as it arrives, digest and write them, make them
    durable in group commits; the hash (`algo`) of the whole."""
    m = image.manifest
    whole = hashlib.new(algo)
    unsynced: list[int] = []

    def land(index: int, data: bytes) -> None:
        whole.update(data)
        digest, _ = m.hash_chunk([data])
        image.write_chunk(index, data, digest)

    for index in range(m.chunks):
        try:
            data = await request.content.readexactly(m.span(index)[1])
        except asyncio.IncompleteReadError:
            raise BadRequest("the body ended before the image did") from None
        await asyncio.to_thread(land, index, data)
        unsynced.append(index)
        if len(unsynced) >= SYNC_EVERY:
            await asyncio.to_thread(image.sync_chunks, unsynced)
            unsynced = []
    await asyncio.to_thread(image.sync_chunks, unsynced)
    return Checksum(algo, whole.hexdigest())


def add_routes(app: web.Application) -> None:
    """Register the seeder's routes (every daemon has them; others answer 409)."""
    app.router.add_post("/v1/images/{image_id}/seed", seed_image)
    app.router.add_put("/v1/images/{image_id}/seed", ingest_image)
