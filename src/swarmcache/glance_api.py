"""A Glance-compatible endpoint: nova-compute and the OpenStack clients read images
through the swarm while everything else reaches Glance unchanged.

Theory of operation. Nova uses one Glance endpoint for everything (`[glance]
endpoint_override`): image downloads, but also snapshot uploads, metadata, members.
So this endpoint is a reverse proxy to Glance (`origin.url`) with one route taken
over: `GET /v2/images/{id}/file`.

- Authorization stays Glance's: before a byte is served, the caller's own request
  for `GET /v2/images/{id}` (its X-Auth-Token, X-Service-Token, request id, ...) goes
  to Glance. A 401, 403 or 404 is passed back as Glance wrote it. An image that is
  not active or has no hash is passed through to Glance, so Glance decides (204, 403).
- The bytes come from the swarm (the local cache, peers, Glance as origin), keyed by
  the image id with its hash and size: a cached copy of another version is dropped,
  never served. The response is Glance's: 200, or 206 for one range (several: 400,
  past the end: 416), `Content-Type: application/octet-stream`, `Content-MD5` (the
  image's md5 checksum, as Glance sends it, also on 206), no Accept-Ranges.
- Bytes that fail verification never reach the client as a clean response: the last
  chunk waits for the whole-image check, and any failure after the headers cuts the
  connection, so the client's own checksum fails (api.send_image).
- Every other method and path streams both ways, unbuffered (image uploads are
  gigabytes); `direct_url` and `locations` are not rewritten. The version documents
  (`/`, `/versions`) point their links here, and list the cache API (v2.14), which
  this endpoint answers itself (`/v2/cache...`: swarmcache's cache, in Glance's shape).
- Glance unreachable: 503 (nova retries it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .access import API_TOKEN, check_access
from .api import FETCHER, METRICS, STORE, error_middleware, image_response, send_image
from .config import Config
from .errors import (
    BadRequest,
    GlanceUnreachable,
    ImageNotFound,
    RangeNotSatisfiable,
    SwarmcacheError,
)
from .fetch import Fetcher, FetchJob
from .manifest import Manifest, validate_image_id
from .origin.glance import glance_endpoint, glance_image
from .peer_api import PEER_AUTH
from .ranges import parse_range
from .store import CachedImage

log = logging.getLogger(__name__)

MAX_META_BYTES = 1024 * 1024
# RFC 9110 7.6.1: headers about one connection, never forwarded
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
    )
)
CACHE_API = "v2.14"  # the Glance API version that brought /v2/cache


class Upstream:
    """The connection pool to Glance; an async context manager."""

    def __init__(self, endpoint: str, connect_timeout: float, read_timeout: float) -> None:
        self.endpoint = endpoint
        # passed-through requests: uploads and Glance's own slow answers may be silent
        # for minutes; our own small questions (metadata, versions) may not
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.short = aiohttp.ClientTimeout(total=connect_timeout + 30, sock_connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Upstream:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            auto_decompress=False,  # bodies pass through byte for byte, encoding and all
            cookie_jar=aiohttp.DummyCookieJar(),  # one caller's cookies are not another's
            connector=aiohttp.TCPConnector(limit=0),  # no waiting for a pooled connection
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def request(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        data: Any = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> Any:
        """A request to Glance (`async with`), with the caller's headers as given."""
        assert self._session is not None
        return self._session.request(
            method,
            self.endpoint + path_qs,
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=timeout or self._timeout,
            # send what the caller sent, nothing aiohttp would add on its own
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )


UPSTREAM = web.AppKey("upstream", Upstream)


def forwarded_headers(request: web.Request, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """The caller's headers minus hop-by-hop ones (and `drop`), for Glance."""
    named = {
        h.strip().lower() for v in request.headers.getall("Connection", []) for h in v.split(",")
    }  # headers the Connection header names are about this hop only
    skip = HOP_BY_HOP | NOT_FORWARDED | named | {d.lower() for d in drop}
    return CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in skip)


def _answer_headers(resp: aiohttp.ClientResponse) -> CIMultiDict[str]:
    return CIMultiDict(
        (k, v)
        for k, v in resp.headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
    )


# Never forwarded: `Expect: 100-continue` was answered by aiohttp here, and Glance
# holding the body back for a 100 of its own would hang the upload.
NOT_FORWARDED = frozenset(("expect",))


async def proxy(request: web.Request) -> web.StreamResponse:
    """Any request but an image download: to Glance and back, streamed both ways."""
    return await forward(request, request.raw_path)


async def forward(request: web.Request, path_qs: str) -> web.StreamResponse:
    """Send the request to Glance as it came (streaming its body) and stream the answer."""
    upstream = request.app[UPSTREAM]
    headers = forwarded_headers(request)
    body = request.content.iter_chunked(1024 * 1024) if request.can_read_body else None
    resp: web.StreamResponse | None = None
    try:
        async with upstream.request(request.method, path_qs, headers, body) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            resp.headers.extend(_answer_headers(up))
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            if request.method != "HEAD":
                async for data in up.content.iter_chunked(1024 * 1024):
                    await resp.write(data)
            await resp.write_eof()
            return resp
    except (aiohttp.ClientError, TimeoutError) as err:
        if resp is not None and resp.prepared:
            # mid-body (Glance or the caller went away): all that is left is to cut it
            log.info("%s %s cut short mid-answer: %r", request.method, path_qs, err)
            if request.transport is not None:
                request.transport.abort()
            return resp
        raise GlanceUnreachable(f"Glance at {upstream.endpoint} did not answer: {err!r}") from None


async def _ask(
    request: web.Request,
    path: str,
    extra: dict[str, str] | None = None,
    unread: tuple[int, ...] = (),
) -> tuple[int, bytes, web.Response]:
    """One of our own small questions to Glance in the caller's name: (status, body,
    Glance's answer as a response to pass back). The body of a status in `unread` is
    not read (the connection is closed instead). GlanceUnreachable if Glance is silent."""
    upstream = request.app[UPSTREAM]
    headers = _asking_headers(request)
    headers.update(extra or {})
    try:
        async with upstream.request("GET", path, headers, timeout=upstream.short) as up:
            body = b""
            if up.status in unread:
                up.close()
            else:
                body = await _small_body(up)
            return up.status, body, _passed_back(up, body)
    except (aiohttp.ClientError, TimeoutError) as err:
        raise GlanceUnreachable(f"Glance at {upstream.endpoint} did not answer: {err!r}") from None


async def _image_meta(
    request: web.Request, image_id: str
) -> tuple[dict[str, Any] | None, web.Response | None]:
    """Glance's `GET /v2/images/{id}` with the caller's credentials: (metadata, None),
    or (None, Glance's answer to pass back) when Glance said anything but 200."""
    status, body, answer = await _ask(request, f"/v2/images/{image_id}")
    if status != 200:
        return None, answer
    try:
        meta = json.loads(body)
    except ValueError:
        meta = None
    if len(body) > MAX_META_BYTES or not isinstance(meta, dict):
        raise GlanceUnreachable(f"Glance's answer for image {image_id} is not an image")
    return meta, None


async def _may_download(request: web.Request, image_id: str) -> web.Response | None:
    """Ask Glance whether the caller may download the image (its `download_image`
    policy, which may be stricter than seeing the image): one byte of `/file` with
    the caller's credentials. None if it may, else Glance's answer to pass back."""
    # a 200/206 is not read: one byte, or (a Glance ignoring Range) the whole image
    status, _, answer = await _ask(
        request, f"/v2/images/{image_id}/file", {"Range": "bytes=0-0"}, unread=(200, 206)
    )
    return None if status in (200, 206) else answer


async def _small_body(up: aiohttp.ClientResponse) -> bytes:
    """A whole answer of at most MAX_META_BYTES (+1: one byte more says "too big"),
    however many reads it arrives in."""
    parts: list[bytes] = []
    size = 0
    async for data in up.content.iter_any():
        parts.append(data)
        size += len(data)
        if size > MAX_META_BYTES:
            break
    return b"".join(parts)[: MAX_META_BYTES + 1]


def _asking_headers(request: web.Request) -> CIMultiDict[str]:
    """The caller's headers for our own small questions to Glance in its name."""
    headers = forwarded_headers(request, drop=("Range", "If-Range", "Content-Length"))
    headers.popall("Accept-Encoding", None)
    return headers


def _passed_back(up: aiohttp.ClientResponse, body: bytes) -> web.Response:
    return web.Response(status=up.status, reason=up.reason, body=body, headers=_answer_headers(up))


async def _downloadable(
    request: web.Request, image_id: str, meta: dict[str, Any]
) -> tuple[dict[str, Any] | None, web.Response | None]:
    """(meta, None) if the caller may download the image or Glance must decide anyway
    (not active: the request goes to Glance as it is), else (None, Glance's refusal)."""
    if meta.get("status") != "active":
        return meta, None
    refusal = await _may_download(request, image_id)
    return (meta, None) if refusal is None else (None, refusal)


async def image_file(request: web.Request) -> web.StreamResponse:
    """GET /v2/images/{id}/file: Glance authorizes, the swarm serves."""
    raw_id = request.match_info["image_id"]
    try:
        image_id = validate_image_id(raw_id)
    except BadRequest:
        return await proxy(request)  # not an id we can cache: Glance answers it
    counted = request.app[METRICS].glance_downloads
    try:
        meta, refusal = await _image_meta(request, image_id)
        if meta is not None and refusal is None:
            meta, refusal = await _downloadable(request, image_id, meta)
    except GlanceUnreachable:
        counted.labels("error").inc()
        raise
    if refusal is not None:
        counted.labels("refused" if refusal.status < 500 else "error").inc()
        return refusal
    assert meta is not None
    # Glance's spelling of the id keys the cache (a database with case-insensitive
    # ids would otherwise give one image several entries)
    if isinstance(meta.get("id"), str) and meta["id"].lower() == image_id.lower():
        image_id = validate_image_id(meta["id"])
    fetcher = request.app[FETCHER]
    try:
        stat = glance_image(meta)
    except SwarmcacheError as err:  # not active, no usable size or hash: Glance decides
        log.info("%s: passed to Glance (%s)", image_id, err.detail)
        counted.labels("passed").inc()
        return await proxy(request)
    if stat.checksum is None or stat.size == 0:
        log.info("%s has no hash or no bytes in Glance: passed to Glance", image_id)
        counted.labels("passed").inc()
        return await proxy(request)
    wanted = fetcher.manifest_from(image_id, stat)
    byte_range = _glance_range(request.headers.getall("Range", []), wanted.size)
    try:
        image, job = await _open(fetcher, request, wanted)
    except (SwarmcacheError, OSError) as err:
        # too big for this cache, its disk failed, swarmcache's own account may not
        # read the image or cannot reach Glance or Keystone: the caller may read it
        # (Glance just said so), and Glance serves it as it would have
        detail = err.detail if isinstance(err, SwarmcacheError) else repr(err)
        log.warning("%s: not from the swarm (%s): passed to Glance", image_id, detail)
        counted.labels("passed").inc()
        return await proxy(request)
    manifest = image.manifest
    resp, start, end = image_response(manifest.size, byte_range)
    if isinstance(meta.get("checksum"), str):
        resp.headers["Content-MD5"] = meta["checksum"]
    if "X-OpenStack-Request-ID" in request.headers:
        resp.headers["X-OpenStack-Request-ID"] = request.headers["X-OpenStack-Request-ID"]
    try:
        await send_image(request, resp, fetcher, image, job, manifest, start, end)
    except SwarmcacheError as err:
        if resp.prepared:  # (send_image cuts the connection itself once headers are out)
            if request.transport is not None:
                request.transport.abort()
            return resp
        # the cache file went before a byte went out: Glance can still serve it
        log.warning("%s: not from the swarm (%s): passed to Glance", image_id, err.detail)
        counted.labels("passed").inc()
        return await proxy(request)
    counted.labels("swarm").inc()
    return resp


async def _open(
    fetcher: Fetcher, request: web.Request, wanted: Manifest
) -> tuple[CachedImage, FetchJob | None]:
    """(image, running job or None) of exactly the version `wanted` names: cached, or
    fetching now. ImageNotFound if the cache holds, or a running fetch reads, another
    version (a manifest a peer gave): Glance serves that request instead."""
    store, metrics = request.app[STORE], request.app[METRICS]
    image_id = wanted.image_id
    image = store.get(image_id)
    if image is not None and image.complete and image.manifest.same_version(wanted):
        metrics.cache_hits.inc()
        return image, None
    running = fetcher.jobs.get(image_id)
    if running is None or not running.image.manifest.same_version(wanted):
        # the caller may read the image; a fetch needs swarmcache's own account to
        await fetcher.origin.stat(image_id)
    metrics.cache_misses.inc()
    job = await fetcher.start_version(wanted)
    image = job.image if job is not None else store.get(image_id)
    if image is None or not image.manifest.same_version(wanted):
        raise ImageNotFound(f"image {image_id}: no copy of Glance's version at hand")
    return image, job


def _glance_range(headers: list[str], size: int) -> tuple[int, int] | None:
    """The one byte range asked for, as Glance 33 reads Range: several ranges are a
    400; one it cannot satisfy (past the end, reversed, another unit) a 416; no
    header: None (the whole image)."""
    if not headers:
        return None
    if len(headers) > 1 or "," in headers[0]:
        raise BadRequest("multiple ranges are not supported (one byte range at most)")
    byte_range = parse_range(headers[0], size)
    if byte_range is None:
        raise RangeNotSatisfiable(f"cannot serve the range {headers[0][:100]!r}", size)
    return byte_range


async def versions(request: web.Request) -> web.Response:
    """GET / and /versions: Glance's version document, links pointing here, the cache
    API listed (this endpoint answers it whatever Glance's own configuration)."""
    upstream = request.app[UPSTREAM]
    status, body, _ = await _ask(request, "/versions")
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    listed = doc.get("versions") if isinstance(doc, dict) else None
    if not isinstance(listed, list):
        raise GlanceUnreachable(f"Glance's /versions answered {status} without versions")
    here = f"{request.scheme}://{request.host}"
    for version in listed:
        for link in version.get("links", []) if isinstance(version, dict) else []:
            href = link.get("href") if isinstance(link, dict) else None
            if isinstance(href, str) and href.startswith(upstream.endpoint):
                link["href"] = here + href[len(upstream.endpoint) :]
    if not any(isinstance(v, dict) and v.get("id") == CACHE_API for v in listed):
        listed.append(
            {
                "id": CACHE_API,
                "status": "SUPPORTED",
                "links": [{"rel": "self", "href": here + "/v2/"}],
            }
        )
    # Glance answers / with 300 Multiple Choices and /versions with 200
    return web.json_response(doc, status=300 if request.path == "/" else 200)


def _cache_entry(image: CachedImage) -> dict[str, Any]:
    try:  # when its bytes were last written: Glance's "last_modified" of a cached image
        modified = os.stat(image.data_path).st_mtime
    except OSError:
        modified = 0.0
    return {
        "image_id": image.image_id,
        "hits": image.hits,
        "last_accessed": image.last_access or 0,
        "last_modified": modified,
        "size": image.manifest.size,
    }


async def cache_list(request: web.Request) -> web.Response:
    """GET /v2/cache: complete images, and images being fetched, in Glance's shape."""
    await check_access(request)  # this host's cache: its callers or the token
    fetcher = request.app[FETCHER]
    cached, queued = [], []
    for image_id, image in sorted(fetcher.store.images.items()):
        if image.complete:
            cached.append(_cache_entry(image))
        elif image_id in fetcher.jobs:
            queued.append(image_id)
    return web.json_response({"cached_images": cached, "queued_images": queued})


async def cache_queue(request: web.Request) -> web.Response:
    """PUT /v2/cache/{id}: fetch the image into this host's cache (202), if the
    caller may read it in Glance."""
    await check_access(request)  # this host's cache: its callers or the token
    image_id = validate_image_id(request.match_info["image_id"])
    meta, refusal = await _image_meta(request, image_id)
    if refusal is not None:
        return refusal
    assert meta is not None
    stat = glance_image(meta)  # 409 for an image that is not active
    refusal = await _may_download(request, image_id)
    if refusal is not None:
        return refusal
    fetcher = request.app[FETCHER]
    await fetcher.start_version(fetcher.manifest_from(image_id, stat))
    log.info("image %s queued for caching through the Glance endpoint", image_id)
    return web.Response(status=202)


async def cache_delete(request: web.Request) -> web.Response:
    """DELETE /v2/cache/{id}: drop it from this host's cache (or stop its fetch)."""
    await check_access(request)  # this host's cache: its callers or the token
    image_id = validate_image_id(request.match_info["image_id"])
    await request.app[FETCHER].remove(image_id)
    log.info("image %s removed through the Glance endpoint's cache API", image_id)
    return web.Response(status=204)


async def cache_clear(request: web.Request) -> web.Response:
    """DELETE /v2/cache: drop cached images, queued ones or both
    (x-image-cache-clear-target: cache | queue | both, the default)."""
    await check_access(request)  # this host's cache: its callers or the token
    target = request.headers.get("x-image-cache-clear-target", "both").strip().lower()
    if target not in ("cache", "queue", "both"):
        raise BadRequest(f"x-image-cache-clear-target must be cache, queue or both, not {target!r}")
    fetcher = request.app[FETCHER]
    cleared = {"cache_deleted": 0, "queue_deleted": 0}
    for image_id, image in list(fetcher.store.images.items()):
        queued = not image.complete
        if (queued and target == "cache") or (not queued and target == "queue"):
            continue
        try:
            await fetcher.remove(image_id)
        except SwarmcacheError as err:  # busy (being read), or gone meanwhile
            log.info("cache clear: %s kept: %s", image_id, err.detail)
            continue
        cleared["queue_deleted" if queued else "cache_deleted"] += 1
    log.info("cache cleared through the Glance endpoint (%s): %s", target, cleared)
    return web.json_response(cleared)


def build_glance_app(config: Config, parent: web.Application) -> web.Application:
    """The endpoint as an aiohttp app sharing the daemon's store, fetcher and metrics."""
    app = web.Application(middlewares=[error_middleware], handler_args={"max_field_size": 65536})
    for key in (STORE, FETCHER, METRICS, API_TOKEN, PEER_AUTH):
        if key in parent:
            app[key] = parent[key]  # type: ignore[misc]
    endpoint = glance_endpoint(config.origin.url)

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        # uploads and Glance's own slow answers: minutes of silence are not a failure
        async with Upstream(endpoint, config.origin.connect_timeout, 3600.0) as upstream:
            app[UPSTREAM] = upstream
            yield

    app.cleanup_ctx.append(upstream_ctx)
    app.router.add_get("/", versions, allow_head=False)
    app.router.add_get("/versions", versions, allow_head=False)
    app.router.add_get("/v2/images/{image_id}/file", image_file, allow_head=False)
    app.router.add_get("/v2/cache", cache_list, allow_head=False)
    app.router.add_delete("/v2/cache", cache_clear)
    app.router.add_put("/v2/cache/{image_id}", cache_queue)
    app.router.add_delete("/v2/cache/{image_id}", cache_delete)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app
