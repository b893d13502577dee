"""HTTP API: handlers, the image response, and the one error middleware.

Domain errors become HTTP statuses only here (errors.SwarmcacheError.status).
Image bytes always go out with sendfile from the cache file; on a miss the
response follows the fetch chunk by chunk, and the chunk that ends the image is
held back until the whole image has passed verification, so a client never
receives a complete image that failed its checksum.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .config import parse_duration
from .errors import (
    BadRequest,
    ImageNotFound,
    RangeNotSatisfiable,
    SwarmcacheError,
)
from .fetch import Fetcher, FetchJob
from .httpfile import sendfile
from .manifest import Checksum, Manifest, validate_image_id
from .metrics import CONTENT_TYPE, Metrics
from .peers.swarm import Swarm
from .ranges import parse_range
from .signing import key_id
from .store import CachedImage, Store

log = logging.getLogger(__name__)

STORE = web.AppKey("store", Store)
FETCHER = web.AppKey("fetcher", Fetcher)
METRICS = web.AppKey("metrics", Metrics)
SWARM = web.AppKey("swarm", Swarm)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# image bytes a response sent with sendfile (for the access log)
SENT = web.ResponseKey("swarmcache.sent", int)
SEND_SLICE = 16 * 1024 * 1024
MAX_WAIT = 3600.0  # longest ?wait= on status and fetch


class AccessLog(AbstractAccessLogger):
    """One line per request: client, request line, status, body bytes, seconds."""

    @property
    def enabled(self) -> bool:
        """Only build the line when it will be written (log_level info or debug)."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write the line (sendfile bytes counted, which aiohttp's own logger misses)."""
        sent = response.get(SENT, response.body_length)
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6f',
            request.remote,
            request.method,
            request.path_qs,
            request.version.major,
            request.version.minor,
            response.status,
            sent,
            time,
        )


def error_body(status: int, error: str, detail: str) -> web.Response:
    """The JSON error shape every failure uses."""
    return web.json_response({"error": error, "detail": detail}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map SwarmcacheError and aiohttp's HTTP exceptions to JSON errors."""
    try:
        return await handler(request)
    except SwarmcacheError as err:
        resp = error_body(err.status, err.error, err.detail)
        if isinstance(err, RangeNotSatisfiable):
            resp.headers["Content-Range"] = f"bytes */{err.size}"
        if err.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, err.status, err.detail)
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error_body(exc.status, exc.reason.lower(), exc.text or exc.reason)
        if "Allow" in exc.headers:  # 405 names the methods that would work
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as err:  # a bug: still a JSON answer, and a traceback in the log
        log.exception("%s %s failed", request.method, request.path)
        return error_body(500, "internal error", f"{err.__class__.__name__}: {err}")


def image_id_from(request: web.Request) -> str:
    """The validated image id of a request's path (400 if it is not one)."""
    return validate_image_id(request.match_info["image_id"])


def image_state(image: CachedImage | None, job: FetchJob | None, failed: bool) -> str:
    """complete | fetching | failed | partial."""
    if image is not None and image.complete:
        return "complete"
    if job is not None:
        return "fetching"
    return "failed" if failed else "partial"


def describe(fetcher: Fetcher, image_id: str, *, progress: bool) -> dict[str, Any]:
    """The JSON description of one image (status and list entries)."""
    image = fetcher.store.get(image_id)
    job = fetcher.jobs.get(image_id)
    failure = fetcher.failures.get(image_id)
    if image is None and failure is None:
        raise ImageNotFound(f"image {image_id!r} is not in the cache")
    out: dict[str, Any] = {"id": image_id, "state": image_state(image, job, failure is not None)}
    if image is not None:
        m = image.manifest
        out.update(
            size=m.size,
            chunk_size=m.chunk_size,
            chunks_present=m.chunks if m.complete else image.present_chunks,
            chunks_total=m.chunks,
            bytes=image.present_bytes,
            last_access=image.last_access,
            hits=image.hits,
            pinned=image.pinned,
            readers=image.readers,
            digest=m.digest_algo,
            signed_by=key_id(m.signer) if m.trusted else None,
            **_hashes(m.image_hash, m.origin_hash),
        )
    else:  # a failure with nothing cached: the same keys, nothing known
        assert failure is not None
        out.update(
            size=failure.size,
            chunk_size=None,
            chunks_present=0,
            chunks_total=None,
            bytes=0,
            last_access=None,
            hits=0,
            pinned=False,
            readers=0,
            digest=None,
            signed_by=None,
            **_hashes(None, None),
        )
    if failure is not None and out["state"] == "failed":
        out["error"] = {
            "error": failure.error.error,
            "detail": failure.error.detail,
            "at": failure.at,
        }
    if progress and job is not None:
        out["fetch"] = job.progress()
    return out


def _hashes(image_hash: Checksum | None, origin_hash: Checksum | None) -> dict[str, Any]:
    """The whole-image hashes as "algo:hex", and as sha256 hex (the older keys) when
    that is the algorithm."""

    def sha256(c: Checksum | None) -> str | None:
        return c.hex if c is not None and c.algo == "sha256" else None

    return {
        "hash": None if image_hash is None else str(image_hash),
        "origin_hash": None if origin_hash is None else str(origin_hash),
        "sha256": sha256(image_hash),
        "origin_sha256": sha256(origin_hash),
    }


async def empty_id(request: web.Request) -> web.Response:
    """/v1/images/ with no id."""
    validate_image_id("")
    raise AssertionError("unreachable")


async def list_images(request: web.Request) -> web.Response:
    """GET /v1/images."""
    fetcher = request.app[FETCHER]
    ids = sorted(set(fetcher.store.images) | set(fetcher.failures))
    return web.json_response({"images": [describe(fetcher, i, progress=False) for i in ids]})


def wait_seconds(request: web.Request) -> float:
    """The `wait` query parameter: how long to wait for a running fetch to end."""
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = parse_duration(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_WAIT:
        raise BadRequest(
            f"wait must be a duration of at most {MAX_WAIT:.0f}s (e.g. 30 or 30s), got {raw!r}"
        )
    return seconds


async def image_status(request: web.Request) -> web.Response:
    """GET /v1/images/{id}/status[?wait=S]: with wait, answers once a running fetch has
    ended or S seconds have passed (a progress poll that hears the end at once)."""
    image_id = image_id_from(request)
    seconds = wait_seconds(request)
    fetcher = request.app[FETCHER]
    await fetcher.wait(image_id, seconds)
    return web.json_response(describe(fetcher, image_id, progress=True))


async def start_fetch(request: web.Request) -> web.Response:
    """POST /v1/images/{id}/fetch[?wait=S]: start a background fetch (idempotent).

    202 while it runs. With wait, the answer waits up to S seconds for the fetch to
    end: 200 once the image is complete, the fetch's own error if it failed.
    """
    image_id = image_id_from(request)
    seconds = wait_seconds(request)
    fetcher = request.app[FETCHER]
    await fetcher.start(image_id)
    if seconds and await fetch_ended(fetcher, image_id, seconds):
        return web.json_response(describe(fetcher, image_id, progress=True))
    return web.json_response(describe(fetcher, image_id, progress=True), status=202)


async def fetch_ended(fetcher: Fetcher, image_id: str, seconds: float) -> bool:
    """Wait up to `seconds` for the image's running fetch to end: True if the image is
    complete then, the fetch's own error if it failed, False while it still runs."""
    await fetcher.wait(image_id, seconds)
    image = fetcher.store.get(image_id)
    if image is not None and image.complete:
        return True
    failure = fetcher.failures.get(image_id)
    if failure is not None and image_id not in fetcher.jobs:
        raise failure.error
    return False


async def verify_image(request: web.Request) -> web.Response:
    """POST /v1/images/{id}/verify: re-hash its chunks on disk, drop the bad ones."""
    image_id = image_id_from(request)
    fetcher = request.app[FETCHER]
    checked, bad = await fetcher.verify(image_id)
    out = describe(fetcher, image_id, progress=False)
    out["verify"] = {"chunks_checked": checked, "bad_chunks": bad}
    return web.json_response(out)


async def delete_image(request: web.Request) -> web.Response:
    """DELETE /v1/images/{id}: drop it from the cache (409 while being read)."""
    image_id = image_id_from(request)
    await request.app[FETCHER].remove(image_id)
    log.info("image %s removed by request", image_id)
    return web.json_response({"id": image_id, "deleted": True})


async def set_pin(request: web.Request) -> web.Response:
    """PUT/DELETE /v1/images/{id}/pin."""
    image_id = image_id_from(request)
    image = request.app[STORE].get(image_id)
    if image is None:
        raise ImageNotFound(f"image {image_id!r} is not in the cache (only cached images pin)")
    image.pinned = request.method == "PUT"
    await asyncio.to_thread(image.save_meta)
    log.info("image %s %s", image_id, "pinned" if image.pinned else "unpinned")
    return web.json_response(describe(request.app[FETCHER], image_id, progress=False))


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz."""
    store = request.app[STORE]
    return web.json_response(
        {
            "status": "ok",
            "images": len(store.images),
            "bytes": store.used_bytes(),
            "max_size": store.max_size,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics (Prometheus text format)."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def get_image(request: web.Request) -> web.StreamResponse:
    """GET/HEAD /v1/images/{id}: the bytes, from cache or following a fetch."""
    image_id = image_id_from(request)
    store, fetcher, m = request.app[STORE], request.app[FETCHER], request.app[METRICS]
    image = store.get(image_id)
    head = request.method == "HEAD"
    job: FetchJob | None = None
    cached = image is not None and image.complete
    # A cached manifest, or one from the origin's stat: enough to answer 304, 416 and
    # HEAD without starting a fetch.
    manifest = image.manifest if image is not None else await fetcher.manifest_for(image_id)
    byte_range = _requested_range(request, manifest)
    if _etag_listed(request.headers.get("If-None-Match"), manifest.etag):
        return web.Response(status=304, headers={"ETag": manifest.etag})
    if head and not cached:
        request.app[FETCHER].check_fits(manifest)  # the same 507 a GET would get
    if not head:
        if cached:
            m.cache_hits.inc()
        else:
            m.cache_misses.inc()
            job = await fetcher.start(image_id, fresh=manifest if image is None else None)
            image = job.image if job is not None else store.get(image_id)
            if image is None:
                raise ImageNotFound(f"image {image_id!r} vanished from the cache")
            if image.manifest is not manifest:
                # The fetch found a new version at the origin (or another request won
                # the start): every header comes from the manifest that will be served.
                manifest = image.manifest
                byte_range = _requested_range(request, manifest)
    size = manifest.size
    resp, start, end = image_response(size, byte_range)
    resp.headers["Accept-Ranges"] = "bytes"
    resp.headers["ETag"] = manifest.etag
    if head or image is None or size == 0:
        if job is not None and not head:
            await job.wait_verified()  # an empty image is checked like any other
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    await send_image(request, resp, fetcher, image, job, manifest, start, end)
    return resp


def image_response(
    size: int, byte_range: tuple[int, int] | None
) -> tuple[web.StreamResponse, int, int]:
    """(response, first byte, last byte) for all of an image or one range of it: 200 or
    206, application/octet-stream, Content-Length, Content-Range."""
    start, end = byte_range if byte_range is not None else (0, size - 1)
    resp = web.StreamResponse(status=206 if byte_range is not None else 200)
    resp.content_type = "application/octet-stream"
    resp.content_length = end - start + 1 if size else 0
    if byte_range is not None:
        resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return resp, start, end


async def send_image(
    request: web.Request,
    resp: web.StreamResponse,
    fetcher: Fetcher,
    image: CachedImage,
    job: FetchJob | None,
    manifest: Manifest,
    start: int,
    end: int,
) -> None:
    """Send bytes start..end of an image as `resp` (headers set by the caller), from the
    cache or following `job`; counted as a read (a reader blocks eviction meanwhile)."""
    image.readers += 1
    try:
        await _send_image(request, resp, image, job, manifest, start, end)
    finally:
        image.readers -= 1
        if image.touch(time.time()) and fetcher.store.get(image.image_id) is image:
            # not awaited: the response is done, and the client may already be gone
            fetcher.in_background(_save_meta_quietly, image)
        if not image.readers:
            fetcher.settle_cache()


def _requested_range(request: web.Request, manifest: Manifest) -> tuple[int, int] | None:
    """The byte range to send (None: all); 416 if it selects nothing; If-Range honoured."""
    byte_range = parse_range(request.headers.get("Range"), manifest.size)
    if_range = request.headers.get("If-Range")
    if byte_range is not None and if_range is not None and if_range != manifest.etag:
        return None
    return byte_range


def _etag_listed(header: str | None, etag: str) -> bool:
    """If-None-Match: "*" or a list of (possibly weak) entity tags, compared weakly."""
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _save_meta_quietly(image: CachedImage) -> None:
    if image.removed:  # evicted, deleted or discarded meanwhile: its meta is gone too
        return
    try:
        image.save_meta()
    except SwarmcacheError as err:  # stats only: never fail a read over them
        log.warning("cannot save access stats of %s: %s", image.image_id, err.detail)


async def _send_image(
    request: web.Request,
    resp: web.StreamResponse,
    image: CachedImage,
    job: FetchJob | None,
    manifest: Manifest,
    start: int,
    end: int,
) -> None:
    """Send bytes start..end with sendfile, waiting for chunks a running fetch still owes."""
    try:
        # open/close stay on the loop: microseconds on a local file, and a file opened in
        # a thread leaks if the client goes away while the thread runs
        f = open(image.data_path, "rb")  # noqa: SIM115, ASYNC230
    except OSError as err:
        raise ImageNotFound(f"image {image.image_id!r} is no longer in the cache") from err
    try:
        if job is not None:
            job.want(start // manifest.chunk_size, end // manifest.chunk_size)
        sent = 0
        await resp.prepare(request)
        pos = start
        last_chunk = manifest.chunks - 1
        while pos <= end:
            index = pos // manifest.chunk_size
            if job is not None and not image.has(index):
                await job.wait_chunk(index, end // manifest.chunk_size)
            if job is not None and index == last_chunk and not image.complete:
                await job.wait_verified()
            if job is not None:
                job.raise_if_failed()  # a failed check stops every reader, not just the last
            # Send the whole run of chunks already present in one sendfile call.
            run_end = min(end, (index + 1) * manifest.chunk_size - 1)
            while run_end < end and (
                image.complete or image.has(run_end // manifest.chunk_size + 1)
            ):
                nxt = run_end // manifest.chunk_size + 1
                if job is not None and nxt == last_chunk and not image.complete:
                    break
                run_end = min(end, (nxt + 1) * manifest.chunk_size - 1)
            while pos <= run_end:  # in slices, so a hang-up still logs what was sent
                n = min(run_end - pos + 1, SEND_SLICE)
                await sendfile(request, resp, f, pos, n)
                sent += n
                pos += n
                resp[SENT] = sent
        if job is not None:
            job.raise_if_failed()
        await resp.write_eof()
        request.app[METRICS].bytes_served.inc(sent)
    except ConnectionError:
        # The client went away (a hypervisor dropping a connection is routine).
        log.debug("client of %s went away after %d bytes", image.image_id, sent)
        if request.transport is not None:
            request.transport.abort()
    except Exception as err:
        # Headers are out: the only honest signal left is to cut the connection short
        # (never an error body inside the image bytes).
        detail = err.detail if isinstance(err, SwarmcacheError) else repr(err)
        log.error("read of %s aborted after headers: %s", image.image_id, detail)
        if request.transport is not None:
            request.transport.abort()
    finally:
        f.close()


async def list_peers(request: web.Request) -> web.Response:
    """GET /v1/peers: the peer table."""
    swarm = request.app[SWARM]
    host, port = swarm.advertise
    return web.json_response(
        {"node_id": swarm.node_id, "address": f"{host}:{port}", "peers": swarm.peers_json()}
    )


def add_routes(app: web.Application) -> None:
    """Register the routes of the client API (peer_api.add_routes: the daemons' own)."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/images", list_images)
    app.router.add_route("*", "/v1/images/", empty_id)
    app.router.add_get("/v1/images/{image_id}", get_image)  # also HEAD
    app.router.add_delete("/v1/images/{image_id}", delete_image)
    app.router.add_get("/v1/images/{image_id}/status", image_status)
    app.router.add_post("/v1/images/{image_id}/fetch", start_fetch)
    app.router.add_post("/v1/images/{image_id}/verify", verify_image)
    app.router.add_put("/v1/images/{image_id}/pin", set_pin)
    app.router.add_delete("/v1/images/{image_id}/pin", set_pin)
    app.router.add_get("/v1/peers", list_peers)
