"""The daemon's HTTP API against a real origin server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from conftest import CHUNK, DaemonFactory, ImageDir, Origin, metric, sha256
from swarmcache import buffers
from swarmcache.buffers import BufferPool

SIZE = 17 * CHUNK + 123  # 18 chunks, the last one short


async def daemon_for_origin(
    aiohttp_client, aiohttp_server, tmp_path: Path, handler: Callable[..., Awaitable[object]]
) -> TestClient:
    """An in-process daemon whose origin is `handler` at /images/{name}."""
    from conftest import make_config, serve_app

    app = web.Application()
    app.router.add_get("/images/{name}", handler)
    server = await aiohttp_server(app)
    url = str(server.make_url("/images/")) + "{image_id}"
    return await serve_app(aiohttp_client, make_config(tmp_path, {"origin": {"url": url}}))


async def status(client: TestClient, image_id: str) -> dict:
    resp = await client.get(f"/v1/images/{image_id}/status")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def wait_chunks(client: TestClient, image_id: str, n: int) -> dict:
    """Wait until at least n chunks of a running fetch are durable."""
    for _ in range(500):
        st = await status(client, image_id)
        if st["chunks_present"] >= n:
            return st
        await asyncio.sleep(0.01)
    raise AssertionError(f"{image_id} never had {n} chunks: {st}")


async def leave_partial(client: TestClient, origin: Origin, image_id: str, n: int) -> dict:
    """Fetch slowly until n chunks are durable, then let the origin fail: a partial image.

    Needs a daemon with origin retries = 0; the origin is healthy again on return.
    """
    origin.faults.delay = 0.02
    await client.post(f"/v1/images/{image_id}/fetch")
    await wait_chunks(client, image_id, n)
    origin.faults.status = 503
    st = await wait_state(client, image_id, "failed")
    origin.faults.status = None
    origin.faults.delay = 0
    return st


async def wait_state(client: TestClient, image_id: str, *states: str) -> dict:
    for _ in range(500):
        st = await status(client, image_id)
        if st["state"] in states:
            return st
        await asyncio.sleep(0.01)
    raise AssertionError(f"{image_id} never reached {states}: {st}")


async def test_cold_fetch_then_warm_hit(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    data = images.add("img", SIZE)
    client = await daemon()
    resp = await client.get("/v1/images/img")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(SIZE)
    assert resp.headers["Accept-Ranges"] == "bytes"
    etag = resp.headers["ETag"]
    assert await resp.read() == data
    st = await wait_state(client, "img", "complete")
    assert st["sha256"] == sha256(data) == st["origin_sha256"]
    assert st["chunks_present"] == st["chunks_total"] == 18
    assert origin.stats.bytes_by_path["img"] == SIZE
    before = origin.stats.total_bytes

    resp = await client.get("/v1/images/img")
    assert resp.status == 200
    assert resp.headers["ETag"] == etag
    assert await resp.read() == data
    assert origin.stats.total_bytes == before  # warm hit: the origin sends nothing
    st = await status(client, "img")
    assert st["hits"] == 2
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, "swarmcache_cache_hits_total") == 1
    assert metric(metrics, "swarmcache_cache_misses_total") == 1
    assert metric(metrics, "swarmcache_fetched_bytes_total", source="origin") == SIZE
    assert metric(metrics, "swarmcache_served_bytes_total") == 2 * SIZE
    assert metric(metrics, "swarmcache_images", state="complete") == 1
    assert metric(metrics, "swarmcache_fetch_duration_seconds_count") == 1


async def test_directory_origin(aiohttp_client, tmp_path: Path, images: ImageDir) -> None:
    from conftest import make_config, serve_app

    data = images.add("disk.img", SIZE)
    cfg = make_config(tmp_path, {"origin": {"kind": "directory", "path": str(images.root)}})
    client = await serve_app(aiohttp_client, cfg)
    resp = await client.get("/v1/images/disk.img")
    assert await resp.read() == data
    st = await wait_state(client, "disk.img", "complete")
    assert st["sha256"] == sha256(data)
    resp = await client.get("/v1/images/missing")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"] == "image not found at origin"
    assert "missing" in body["detail"]


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=100-70000", 100, 70000),
        (f"bytes={SIZE - 10}-", SIZE - 10, SIZE - 1),
        ("bytes=-5", SIZE - 5, SIZE - 1),
        ("bytes=0-", 0, SIZE - 1),
    ],
)
async def test_range_on_complete_image(
    daemon: DaemonFactory, images: ImageDir, header: str, start: int, end: int
) -> None:
    data = images.add("img", SIZE)
    client = await daemon()
    assert await (await client.get("/v1/images/img")).read() == data
    resp = await client.get("/v1/images/img", headers={"Range": header})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert resp.headers["Content-Length"] == str(end - start + 1)
    assert await resp.read() == data[start : end + 1]


class _CountingPool(BufferPool):
    """A pool that counts the buffers handed back to it."""

    given = 0

    def give(self, buf: bytearray) -> None:
        self.given += 1
        super().give(buf)


async def test_buffers_are_reused_during_a_fetch_and_let_go_after_it(
    daemon: DaemonFactory, images: ImageDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _CountingPool(1 << 30)
    monkeypatch.setattr(buffers, "SHARED", pool)
    data = images.add("img", SIZE)
    client = await daemon()
    resp = await client.post("/v1/images/img/fetch?wait=60")
    assert resp.status == 200
    assert pool.given >= 18  # every chunk read back (sealed, hashed) into a pooled buffer
    for _ in range(200):  # the fetch's task ends just after it answers
        if pool.held == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.held == 0  # no fetch running: an idle daemon keeps no spare buffers
    assert await (await client.get("/v1/images/img")).read() == data


async def test_range_on_uncached_image_fetches_needed_chunks_first(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    data = images.add("img", SIZE)
    client = await daemon(origin={"concurrency": 1})
    start, end = 10 * CHUNK + 5, 11 * CHUNK + 5
    resp = await client.get("/v1/images/img", headers={"Range": f"bytes={start}-{end}"})
    assert resp.status == 206
    assert await resp.read() == data[start : end + 1]
    offsets = origin.chunk_requests("img")
    # chunk 0 may already be in flight when the reader asks; 10 and 11 come right after
    assert offsets[:2] == [10 * CHUNK, 11 * CHUNK] or offsets[:3] == [0, 10 * CHUNK, 11 * CHUNK]
    await wait_state(client, "img", "complete")


async def test_range_on_partial_image(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    data = images.add("img", SIZE)
    client = await daemon(origin={"concurrency": 1, "retries": 0})
    st = await leave_partial(client, origin, "img", 3)
    present = st["chunks_present"]
    assert 3 <= present < 18
    origin.stats.requests.clear()

    # one byte range across the last present chunk and the first missing one
    start, end = (present - 1) * CHUNK + 10, present * CHUNK + 10
    resp = await client.get("/v1/images/img", headers={"Range": f"bytes={start}-{end}"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert await resp.read() == data[start : end + 1]
    await wait_state(client, "img", "complete")
    refetched = sorted(o // CHUNK for o in origin.chunk_requests("img"))
    assert refetched == list(range(present, 18))  # durable chunks were not fetched again


async def test_head_and_416(daemon: DaemonFactory, images: ImageDir, origin: Origin) -> None:
    images.add("img", SIZE)
    client = await daemon()
    resp = await client.head("/v1/images/img")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(SIZE)
    assert resp.headers["Accept-Ranges"] == "bytes"
    etag = resp.headers["ETag"]
    assert origin.stats.bytes_by_path["img"] == 0  # HEAD on an uncached image does not fetch
    assert (await client.get("/v1/images/img/status")).status == 404
    resp = await client.get("/v1/images/img", headers={"Range": f"bytes={SIZE}-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{SIZE}"
    assert (await resp.json())["error"] == "range not satisfiable"
    assert (await client.get("/v1/images/img/status")).status == 404  # 416 fetched nothing
    # a start of 5,000 digits (more than int() parses) is past the end like any other
    resp = await client.get("/v1/images/img", headers={"Range": "bytes=" + "9" * 5000 + "-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{SIZE}"
    assert origin.stats.bytes_by_path["img"] == 0
    await (await client.get("/v1/images/img")).read()
    await wait_state(client, "img", "complete")
    resp = await client.get("/v1/images/img", headers={"Range": f"bytes={SIZE}-"})
    assert resp.status == 416
    resp = await client.head("/v1/images/img", headers={"Range": "bytes=0-9"})
    assert resp.status == 206
    assert resp.headers["Content-Length"] == "10"
    assert resp.headers["ETag"] == etag
    resp = await client.get("/v1/images/img", headers={"If-None-Match": etag})
    assert resp.status == 304
    resp = await client.get("/v1/images/img", headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert resp.status == 200  # a changed validator: the whole image


async def test_single_flight(daemon: DaemonFactory, images: ImageDir, origin: Origin) -> None:
    data = images.add("img", SIZE)
    client = await daemon()
    origin.faults.delay = 0.02  # keep the fetch going while the readers pile up
    bodies = await asyncio.gather(*(_read(client, "/v1/images/img") for _ in range(10)))
    assert all(b == data for b in bodies)
    per_chunk = Counter(origin.chunk_requests("img"))
    assert sorted(per_chunk) == [i * CHUNK for i in range(18)]
    assert set(per_chunk.values()) == {1}, per_chunk
    assert origin.stats.bytes_by_path["img"] == SIZE


async def _read(client: TestClient, path: str) -> bytes:
    async with client.get(path) as resp:
        assert resp.status == 200
        return await resp.read()


async def test_checksum_mismatch_is_never_served_complete(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    images.add("bad", SIZE, wrong_sidecar=True)
    client = await daemon()
    received = 0
    async with client.get("/v1/images/bad") as resp:
        assert resp.status == 200  # headers went out before the end was known
        with pytest.raises(aiohttp.ClientPayloadError):
            async for block in resp.content.iter_any():
                received += len(block)
    assert 0 < received <= 17 * CHUNK  # the last (short) chunk was never sent
    st = await wait_state(client, "bad", "failed")
    assert st["error"]["error"] == "verification failed"
    assert "does not match" in st["error"]["detail"]
    assert st["bytes"] == 0  # the bytes were discarded
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, "swarmcache_verification_failures_total", kind="image") == 1
    listing = await (await client.get("/v1/images")).json()
    assert [i["state"] for i in listing["images"]] == ["failed"]


async def test_streaming_read_holds_back_last_chunk_until_verified(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    """A Range that ends at the image's end is answered only after the whole check."""
    images.add("bad", SIZE, wrong_sidecar=True)
    client = await daemon()
    resp = await client.get("/v1/images/bad", headers={"Range": f"bytes={SIZE - 100}-"})
    assert resp.status == 206
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/images/..%2Fetc%2Fpasswd", 400),
        ("/v1/images/", 400),
        ("/v1/images/" + "a" * 200, 400),
        ("/v1/images/.hidden", 400),
        ("/v1/images/a%20b/status", 400),
        ("/v1/images/..%2F..%2Fx/fetch", 400),
    ],
)
async def test_bad_ids_are_rejected(
    daemon: DaemonFactory, origin: Origin, path: str, status: int
) -> None:
    client = await daemon()
    method = "POST" if path.endswith("/fetch") else "GET"
    resp = await client.request(method, path)
    assert resp.status == status
    body = await resp.json()
    assert body["error"] == "invalid image id"
    assert origin.stats.requests == []


async def test_origin_404(daemon: DaemonFactory, origin: Origin) -> None:
    client = await daemon()
    resp = await client.get("/v1/images/nothere")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"] == "image not found at origin"
    assert "nothere" in body["detail"]
    assert (await client.get("/v1/images")).status == 200


async def test_origin_down_is_502(aiohttp_client, tmp_path: Path) -> None:
    from conftest import free_port, make_config, serve_app

    url = f"http://127.0.0.1:{free_port()}/images/{{image_id}}"
    client = await serve_app(aiohttp_client, make_config(tmp_path, {"origin": {"url": url}}))
    resp = await client.get("/v1/images/img")
    assert resp.status == 502
    body = await resp.json()
    assert body["error"] == "origin unavailable"
    assert "127.0.0.1" in body["detail"]


async def test_origin_5xx_is_502_after_retries(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE)
    client = await daemon()
    origin.faults.status = 500
    resp = await client.get("/v1/images/img")
    assert resp.status == 502
    assert "500" in (await resp.json())["detail"]


async def test_origin_timeout_is_504(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE)
    client = await daemon(origin={"read_timeout": "100ms", "retries": 1})
    origin.faults.delay = 1.0
    resp = await client.get("/v1/images/img")
    assert resp.status == 504
    assert (await resp.json())["error"] == "origin timeout"


async def test_fetch_is_idempotent_and_lists(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE)
    client = await daemon()
    first = await client.post("/v1/images/img/fetch")
    second = await client.post("/v1/images/img/fetch")
    assert first.status == second.status == 202
    assert (await first.json())["state"] in ("fetching", "complete")
    st = await wait_state(client, "img", "complete")
    assert (await client.post("/v1/images/img/fetch")).status == 202
    assert origin.stats.bytes_by_path["img"] == SIZE
    listing = (await (await client.get("/v1/images")).json())["images"]
    assert listing == [{k: v for k, v in st.items() if k != "fetch"}]
    for key in (
        "id",
        "size",
        "state",
        "chunks_present",
        "chunks_total",
        "bytes",
        "last_access",
        "hits",
        "pinned",
    ):
        assert key in listing[0]


async def test_fetch_and_status_wait_for_the_end_of_the_fetch(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE)
    images.add("bad", SIZE, wrong_sidecar=True)
    client = await daemon(origin={"concurrency": 1})
    origin.faults.delay = 0.01  # 18 chunks: the fetch is still running when we ask
    started = await client.post("/v1/images/img/fetch")
    assert started.status == 202
    assert (await started.json())["state"] == "fetching"
    st = await (await client.get("/v1/images/img/status?wait=60")).json()
    assert st["state"] == "complete"
    assert st["sha256"] == st["origin_sha256"]
    # POST ?wait: 200 once complete (at once for a cached image), the failure otherwise
    done = await client.post("/v1/images/img/fetch?wait=60s")
    assert done.status == 200
    assert (await done.json())["state"] == "complete"
    failed = await client.post("/v1/images/bad/fetch?wait=60")
    assert failed.status == 502, await failed.text()
    assert "does not match" in (await failed.json())["detail"]
    # a short wait on a running fetch answers 202 with its progress
    images.add("slow", SIZE)
    origin.faults.delay = 0.2
    running = await client.post("/v1/images/slow/fetch?wait=0.05")
    assert running.status == 202
    assert (await running.json())["state"] == "fetching"
    for bad in ("x", "-1", "2h", "1e3"):
        resp = await client.get(f"/v1/images/img/status?wait={bad}")
        assert resp.status == 400, bad
        assert "wait must be" in (await resp.json())["detail"]
    origin.faults.delay = 0


async def test_status_shows_progress_of_running_fetch(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE)
    client = await daemon(origin={"concurrency": 1})
    origin.faults.delay = 0.05
    await client.post("/v1/images/img/fetch")
    st = await status(client, "img")
    for _ in range(100):
        st = await status(client, "img")
        if st.get("fetch", {}).get("bytes_done"):
            break
        await asyncio.sleep(0.02)
    assert st["state"] == "fetching"
    assert st["fetch"]["sources"]["origin"] == st["fetch"]["bytes_done"] > 0
    assert st["fetch"]["rate_bytes_per_s"] > 0
    origin.faults.delay = 0


async def test_delete_and_pin(daemon: DaemonFactory, images: ImageDir, origin: Origin) -> None:
    data = images.add("img", SIZE)
    client = await daemon()
    assert (await client.put("/v1/images/img/pin")).status == 404
    assert await (await client.get("/v1/images/img")).read() == data
    await wait_state(client, "img", "complete")
    resp = await client.put("/v1/images/img/pin")
    assert (await resp.json())["pinned"] is True
    resp = await client.delete("/v1/images/img/pin")
    assert (await resp.json())["pinned"] is False

    resp = await client.delete("/v1/images/img")
    assert resp.status == 200
    assert (await client.get("/v1/images/img/status")).status == 404
    assert (await client.delete("/v1/images/img")).status == 404

    images.add("slow", SIZE)
    origin.faults.delay = 0.05
    async with client.get("/v1/images/slow") as reading:  # a reader waiting for chunks
        assert reading.status == 200
        busy = await client.delete("/v1/images/slow")
        assert busy.status == 409
        assert (await busy.json())["error"] == "image busy"
        origin.faults.delay = 0
        assert len(await reading.read()) == SIZE


async def test_eviction_keeps_pinned_and_lru(daemon: DaemonFactory, images: ImageDir) -> None:
    size = 4 * CHUNK
    for name in ("a", "b", "c", "d"):
        images.add(name, size)
    client = await daemon(cache={"max_size": 3 * size})
    for name in ("a", "b", "c"):
        await (await client.get(f"/v1/images/{name}")).read()
        await wait_state(client, name, "complete")
    await client.put("/v1/images/a/pin")  # a is oldest but pinned
    await (await client.get("/v1/images/c")).read()  # c most recent
    await (await client.get("/v1/images/d")).read()
    await wait_state(client, "d", "complete")
    listing = (await (await client.get("/v1/images")).json())["images"]
    assert [i["id"] for i in listing] == ["a", "c", "d"]  # b was least recently used
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, "swarmcache_evictions_total") == 1
    assert metric(metrics, "swarmcache_cache_bytes") == 3 * size


async def test_image_larger_than_cache_is_refused(daemon: DaemonFactory, images: ImageDir) -> None:
    images.add("huge", 5 * CHUNK)
    client = await daemon(cache={"max_size": 4 * CHUNK})
    resp = await client.get("/v1/images/huge")
    assert resp.status == 507
    assert "max_size" in (await resp.json())["detail"]


async def test_unknown_route_and_method_are_json(daemon: DaemonFactory) -> None:
    client = await daemon()
    resp = await client.get("/nope")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not found"
    resp = await client.post("/v1/images/x")
    assert resp.status == 405
    assert "error" in await resp.json()


async def test_healthz(daemon: DaemonFactory) -> None:
    client = await daemon()
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ok"


async def test_empty_image(daemon: DaemonFactory, images: ImageDir) -> None:
    images.add("empty", 0)
    client = await daemon()
    resp = await client.get("/v1/images/empty")
    assert resp.status == 200
    assert await resp.read() == b""
    st = await wait_state(client, "empty", "complete")
    assert st["sha256"] == hashlib.sha256(b"").hexdigest()


async def test_origin_without_range_support_is_a_clear_error(
    aiohttp_client, aiohttp_server, tmp_path: Path
) -> None:

    async def whole(request: web.Request) -> web.Response:
        if request.match_info["name"].endswith(".sha256"):
            raise web.HTTPNotFound()
        return web.Response(body=b"x" * 1000)

    client = await daemon_for_origin(aiohttp_client, aiohttp_server, tmp_path, whole)
    resp = await client.get("/v1/images/img")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    st = await wait_state(client, "img", "failed")
    assert "Range" in st["error"]["detail"]


async def test_full_disk_fails_clearly_and_keeps_durable_chunks(
    aiohttp_client, tiny_fs: Path, images: ImageDir, origin: Origin
) -> None:
    import subprocess

    from conftest import make_config, serve_app

    small = images.add("small", 2 * CHUNK)
    data = images.add("img", 16 * CHUNK)  # 1 MiB on a 512 KiB filesystem
    cfg = make_config(tiny_fs, {"origin": {"url": origin.url}})
    client = await serve_app(aiohttp_client, cfg)
    assert await (await client.get("/v1/images/small")).read() == small
    assert (await client.post("/v1/images/img/fetch")).status == 202
    st = await wait_state(client, "img", "failed")
    assert st["error"]["error"] == "cache storage error"
    assert "disk full" in st["error"]["detail"]
    kept = st["chunks_present"]
    assert 0 < kept < 16
    assert (await client.get("/healthz")).status == 200
    # a read that needs room answers 507 at once; what is cached is still served
    resp = await client.get("/v1/images/img")
    assert resp.status in (200, 507)  # 200: headers went out before the disk filled again
    if resp.status == 507:
        assert (await resp.json())["error"] == "cache storage error"
    else:
        try:
            body = await resp.read()
        except aiohttp.ClientPayloadError:
            body = b""
        assert len(body) < len(data)  # cut short: never a whole copy of what is not there
    assert await (await client.get("/v1/images/small")).read() == small

    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_fs)], check=True)
    origin.stats.requests.clear()
    resp = await client.get("/v1/images/img")
    assert await resp.read() == data
    st = await wait_state(client, "img", "complete")
    assert len(origin.chunk_requests("img")) <= 16 - kept  # durable chunks were not refetched


async def test_corrupt_chunk_on_disk_after_restart_is_never_served(
    aiohttp_client, tmp_path: Path, images: ImageDir, origin: Origin
) -> None:
    from conftest import make_config, serve_app

    data = images.add("img", SIZE)
    cfg = make_config(tmp_path, {"origin": {"url": origin.url, "concurrency": 1}})
    first = await serve_app(aiohttp_client, cfg)
    origin.faults.delay = 0.03
    await first.post("/v1/images/img/fetch")
    await wait_chunks(first, "img", 4)
    await first.close()  # shutdown cancels the fetch; durable chunks stay
    origin.faults.delay = 0
    with open(tmp_path / "cache" / "images" / "img" / "data", "r+b") as f:
        f.write(b"\xff" * 16)  # chunk 0, logged as good, now rotten

    second = await serve_app(aiohttp_client, cfg)
    origin.stats.requests.clear()
    resp = await second.get("/v1/images/img")
    assert resp.status == 200
    assert await resp.read() == data
    assert 0 in origin.chunk_requests("img")  # refetched, not served from disk
    metrics = await (await second.get("/metrics")).text()
    assert metric(metrics, "swarmcache_verification_failures_total", kind="chunk") == 1


async def test_delete_during_fetch_cancels_it(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    data = images.add("img", SIZE)
    client = await daemon(origin={"concurrency": 1})
    origin.faults.delay = 0.05
    assert (await client.post("/v1/images/img/fetch")).status == 202
    resp = await client.delete("/v1/images/img")
    assert resp.status == 200
    assert (await client.get("/v1/images/img/status")).status == 404
    sent = len(origin.chunk_requests("img"))
    await asyncio.sleep(0.2)
    assert len(origin.chunk_requests("img")) <= sent + 1  # the fetch stopped
    origin.faults.delay = 0
    assert await (await client.get("/v1/images/img")).read() == data


async def test_image_replaced_at_origin_mid_fetch(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE, sidecar=False)
    client = await daemon(origin={"concurrency": 1, "retries": 0})
    origin.faults.delay = 0.03
    await client.post("/v1/images/img/fetch")
    await wait_chunks(client, "img", 2)
    new = images.add("img", SIZE, sidecar=False, seed=1)  # a new version, new mtime
    st = await wait_state(client, "img", "failed", "complete")
    assert st["state"] == "failed"
    assert "changed at the origin" in st["error"]["detail"]
    origin.faults.delay = 0
    assert await (await client.get("/v1/images/img")).read() == new  # starts over


async def test_empty_image_with_wrong_checksum_is_not_served(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    images.add("empty", 0, wrong_sidecar=True)
    client = await daemon()
    resp = await client.get("/v1/images/empty")
    assert resp.status == 502
    assert (await resp.json())["error"] == "verification failed"


async def test_sidecar_sent_in_pieces_is_read_whole(
    aiohttp_client, aiohttp_server, tmp_path: Path
) -> None:

    body = b"x" * 1000
    line = hashlib.sha256(body).hexdigest().encode() + b"  img\n"

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.match_info["name"].endswith(".sha256"):
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(0, len(line), 7):  # trickle it
                await resp.write(line[i : i + 7])
                await asyncio.sleep(0.001)
            return resp
        return web.Response(body=body)

    client = await daemon_for_origin(aiohttp_client, aiohttp_server, tmp_path, handler)
    resp = await client.head("/v1/images/img")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "1000"


async def test_range_to_the_end_of_a_good_uncached_image(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    data = images.add("img", SIZE)
    client = await daemon()
    resp = await client.get("/v1/images/img", headers={"Range": f"bytes={SIZE - 100}-"})
    assert resp.status == 206
    assert await resp.read() == data[-100:]
    st = await status(client, "img")  # the last chunk waited for the whole-image check:
    assert st["state"] == "complete" or st["fetch"]["verified"] is True


async def test_failed_check_cuts_short_a_range_that_ends_before_the_last_chunk(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    size = 256 * CHUNK  # 16 MiB: more than socket buffers hold
    images.add("bad", size, wrong_sidecar=True)
    client = await daemon()
    async with client.get("/v1/images/bad", headers={"Range": f"bytes=0-{size - CHUNK - 1}"}) as r:
        assert r.status == 206
        await wait_state(client, "bad", "failed")  # the client has not read a byte yet
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_io_error_after_headers_cuts_the_connection(
    daemon: DaemonFactory, images: ImageDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from swarmcache import api

    images.add("img", SIZE)
    client = await daemon()
    await (await client.get("/v1/images/img")).read()
    await wait_state(client, "img", "complete")

    async def broken(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(api, "sendfile", broken)
    resp = await client.get("/v1/images/img", headers={"Range": "bytes=0-1255"})
    assert resp.status == 206
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_deleted_images_leave_no_open_files(
    daemon: DaemonFactory, images: ImageDir, tmp_path: Path
) -> None:
    import os

    client = await daemon(origin={"concurrency": 4})
    for n in range(8):
        images.add(f"img{n}", SIZE)
    await asyncio.gather(*(_read(client, f"/v1/images/img{n}") for n in range(8)))
    for n in range(8):
        await wait_state(client, f"img{n}", "complete")
        assert (await client.delete(f"/v1/images/img{n}")).status == 200
    cache = str(tmp_path / "cache")
    for _ in range(200):  # deletes finish in a thread
        if not any((tmp_path / "cache" / "tmp").iterdir()):
            break
        await asyncio.sleep(0.01)
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(cache) and not target.endswith("/lock"):
            open_files.append(target)
    assert open_files == []


async def test_concurrent_fetches_evict_for_each_other(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    size = 4 * CHUNK
    for name in ("a", "b", "c"):
        images.add(name, size)
    client = await daemon(cache={"max_size": 8 * CHUNK})
    await (await client.get("/v1/images/c")).read()
    await wait_state(client, "c", "complete")
    origin.faults.delay = 0.05
    first, second = await asyncio.gather(
        client.post("/v1/images/a/fetch"), client.post("/v1/images/b/fetch")
    )
    assert first.status == second.status == 202
    listing = (await (await client.get("/v1/images")).json())["images"]
    assert sorted(i["id"] for i in listing) == ["a", "b"]  # c made room before either wrote
    origin.faults.delay = 0
    for name in ("a", "b"):
        await wait_state(client, name, "complete")


async def test_an_image_in_use_keeps_its_place_in_the_lru_order(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    """A fetch that ends with the cache over max_size, because the least recently used
    image is being read, does not evict the image it just fetched for being last: the
    cache waits over max_size until the read ends, and then LRU picks (the image just
    read is the most recent now)."""
    images.add("a", 320 * CHUNK)  # more than the socket buffers hold: the read waits
    images.add("c", 8 * CHUNK)
    client = await daemon(cache={"max_size": 324 * CHUNK})
    await (await client.get("/v1/images/a")).read()
    await wait_state(client, "a", "complete")
    reading = await client.get("/v1/images/a")
    await reading.content.readexactly(CHUNK)  # a is in use from now on
    resp = await client.post("/v1/images/c/fetch?wait=30")
    assert resp.status == 200, await resp.text()
    listing = (await (await client.get("/v1/images")).json())["images"]
    assert sorted((i["id"], i["state"]) for i in listing) == [
        ("a", "complete"),
        ("c", "complete"),
    ]
    reading.close()  # the read ends: the cache settles under max_size
    for _ in range(200):
        listing = (await (await client.get("/v1/images")).json())["images"]
        if len(listing) == 1:
            break
        await asyncio.sleep(0.02)
    assert [i["id"] for i in listing] == ["a"]
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, "swarmcache_cache_bytes") <= 324 * CHUNK


async def test_peers_fetching_an_image_from_us_keep_it_from_eviction_until_they_stop(
    daemon: DaemonFactory, images: ImageDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image peers are fetching from this host (Swarm.uploading) is not evicted to
    make room; once they stop, without a word (a peer stops asking, the grace runs
    out: tests/test_swarm_pure.py), the cache goes back under max_size by itself.
    (Real peers finishing: tests/test_peers_local.py.)"""
    from swarmcache.api import FETCHER
    from swarmcache.fetch import fetcher as fetcher_module

    monkeypatch.setattr(fetcher_module, "RESETTLE", 0.2)
    images.add("a", 8 * CHUNK)
    images.add("b", 8 * CHUNK)
    client = await daemon(cache={"max_size": 12 * CHUNK})
    fetcher = client.app[FETCHER]
    assert fetcher.swarm is not None
    await (await client.get("/v1/images/a")).read()
    await wait_state(client, "a", "complete")
    uploads = {"a"}
    monkeypatch.setattr(fetcher.swarm, "uploading", lambda within: set(uploads))
    resp = await client.post("/v1/images/b/fetch?wait=30")
    assert resp.status == 200, await resp.text()
    await asyncio.sleep(0.5)  # settles come and go: a stays while it is uploaded
    listing = (await (await client.get("/v1/images")).json())["images"]
    assert sorted(i["id"] for i in listing) == ["a", "b"]  # a spared, b not evicted
    uploads.clear()  # the peers stop asking: nothing else happens on this host
    for _ in range(100):
        listing = (await (await client.get("/v1/images")).json())["images"]
        if len(listing) == 1:
            break
        await asyncio.sleep(0.05)
    assert [i["id"] for i in listing] == ["b"]  # LRU, once a is no longer in use


async def test_failure_records_are_capped(daemon: DaemonFactory) -> None:
    from swarmcache.api import FETCHER
    from swarmcache.errors import OriginError
    from swarmcache.fetch import MAX_FAILURES

    client = await daemon()
    fetcher = client.app[FETCHER]
    for n in range(MAX_FAILURES + 5):
        fetcher._record_failure(f"img{n}", OriginError("down"), None)
    assert len(fetcher.failures) == MAX_FAILURES
    assert "img0" not in fetcher.failures
    assert f"img{MAX_FAILURES + 4}" in fetcher.failures


async def test_client_going_away_and_cancelled_fetch_log_no_errors(
    daemon: DaemonFactory, images: ImageDir, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    import gc
    import logging

    caplog.set_level(logging.DEBUG)
    images.add("big", 256 * CHUNK)
    images.add("slow", SIZE)
    client = await daemon()
    await (await client.get("/v1/images/big")).read()
    await wait_state(client, "big", "complete")
    for _ in range(3):  # a reader that hangs up mid-stream
        resp = await client.get("/v1/images/big")
        await resp.content.read(CHUNK)
        resp.close()
    origin.faults.delay = 0.05
    assert (await client.post("/v1/images/slow/fetch")).status == 202
    assert (await client.delete("/v1/images/slow")).status == 200  # cancels the fetch
    await asyncio.sleep(0.2)
    gc.collect()  # "exception was never retrieved" is logged when a future is collected
    await asyncio.sleep(0)
    assert (await client.get("/healthz")).status == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert any("fetch slow cancelled" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("header", ['"nope", {etag}', "W/{etag}", "*", "{etag}"])
async def test_if_none_match_forms(daemon: DaemonFactory, images: ImageDir, header: str) -> None:
    images.add("img", SIZE)
    client = await daemon()
    await (await client.get("/v1/images/img")).read()
    etag = (await client.head("/v1/images/img")).headers["ETag"]
    resp = await client.get("/v1/images/img", headers={"If-None-Match": header.format(etag=etag)})
    assert resp.status == 304


async def test_head_of_image_too_big_for_the_cache_is_507(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    images.add("huge", 5 * CHUNK)
    client = await daemon(cache={"max_size": 4 * CHUNK})
    assert (await client.head("/v1/images/huge")).status == 507


async def test_origin_failures_are_listed_and_counted_for_get_too(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE)
    (images.root / "img.sha256").write_text("not a checksum\\n")
    client = await daemon()
    resp = await client.get("/v1/images/img")
    assert resp.status == 502
    body = await resp.json()
    assert body["error"] == "unusable origin answer"
    sidecar_gets = [r for r in origin.stats.requests if r[1] == "img.sha256"]
    assert len(sidecar_gets) == 1  # not retried: it will not get better
    listing = (await (await client.get("/v1/images")).json())["images"]
    assert [(i["id"], i["state"]) for i in listing] == [("img", "failed")]
    assert set(listing[0]) >= {"chunk_size", "chunks_total", "sha256", "readers", "last_access"}
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, "swarmcache_source_errors_total", source="origin") == 1


async def test_restart_with_smaller_max_size_evicts(
    aiohttp_client, tmp_path: Path, images: ImageDir, origin: Origin
) -> None:
    from conftest import make_config, serve_app

    for name in ("a", "b"):
        images.add(name, 4 * CHUNK)
    big = make_config(tmp_path, {"origin": {"url": origin.url}})
    first = await serve_app(aiohttp_client, big)
    for name in ("a", "b"):
        await (await first.get(f"/v1/images/{name}")).read()
        await wait_state(first, name, "complete")
    await first.close()
    small = make_config(tmp_path, {"origin": {"url": origin.url}, "cache": {"max_size": 5 * CHUNK}})
    second = await serve_app(aiohttp_client, small)
    listing = (await (await second.get("/v1/images")).json())["images"]
    assert [i["id"] for i in listing] == ["b"]  # a was read least recently


async def test_image_replaced_by_another_size_while_partial(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE, sidecar=False)
    client = await daemon(origin={"concurrency": 1, "retries": 0})
    await leave_partial(client, origin, "img", 3)
    for new_size in (SIZE + 100, SIZE - CHUNK - 5):
        new = images.add("img", new_size, sidecar=False, seed=new_size)
        resp = await client.get("/v1/images/img")
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(new_size)
        assert await resp.read() == new
        await wait_state(client, "img", "complete")
        assert (await client.delete("/v1/images/img")).status == 200
        await (await client.get("/v1/images/img", headers={"Range": "bytes=0-0"})).read()
        origin.faults.status = 503  # leave a partial copy of this version for the next round
        await wait_state(client, "img", "failed", "complete")
        origin.faults.status = None


def _ranged(body: bytes, **extra: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An origin handler that answers HEAD and one Range, with extra headers."""

    async def handler(request: web.Request) -> web.Response:
        if request.match_info["name"].endswith(".sha256"):
            raise web.HTTPNotFound()
        rng = request.headers.get("Range")
        if request.method == "HEAD" or not rng:
            return web.Response(body=body, headers={"ETag": '"v1"'})
        first, last = (int(x) for x in rng.split("=")[1].split("-"))
        headers = {"Content-Range": f"bytes {first}-{last}/{len(body)}", "ETag": '"v1"'}
        return web.Response(status=206, body=body[first : last + 1], headers={**headers, **extra})

    return handler


async def test_compressed_origin_answer_is_refused(
    aiohttp_client, aiohttp_server, tmp_path: Path
) -> None:
    handler = _ranged(b"x" * 1000, **{"Content-Encoding": "gzip"})
    client = await daemon_for_origin(aiohttp_client, aiohttp_server, tmp_path, handler)
    resp = await client.get("/v1/images/img")
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    st = await wait_state(client, "img", "failed")
    assert st["error"]["error"] == "unusable origin answer"
    assert "gzip" in st["error"]["detail"]


async def test_range_total_disagreeing_with_head_is_a_changed_image(
    aiohttp_client, aiohttp_server, tmp_path: Path
) -> None:
    body = b"y" * 1000

    async def handler(request: web.Request) -> web.Response:
        if request.match_info["name"].endswith(".sha256"):
            raise web.HTTPNotFound()
        if request.method == "HEAD":
            return web.Response(body=body[:900], headers={"ETag": '"v1"'})  # says 900
        first, last = (int(x) for x in request.headers["Range"].split("=")[1].split("-"))
        return web.Response(
            status=206,
            body=body[first : last + 1],
            headers={"Content-Range": f"bytes {first}-{last}/1000", "ETag": '"v1"'},
        )

    client = await daemon_for_origin(aiohttp_client, aiohttp_server, tmp_path, handler)
    await client.post("/v1/images/img/fetch")
    st = await wait_state(client, "img", "failed")
    assert st["error"]["error"] == "image changed at origin"


async def test_trickling_origin_times_out(aiohttp_client, aiohttp_server, tmp_path: Path) -> None:
    from conftest import make_config, serve_app

    body = b"z" * CHUNK

    async def trickle(request: web.Request) -> web.StreamResponse:
        if request.match_info["name"].endswith(".sha256"):
            raise web.HTTPNotFound()
        if request.method == "HEAD":
            return web.Response(body=body)
        resp = web.StreamResponse(status=206)
        resp.content_length = CHUNK
        resp.headers["Content-Range"] = f"bytes 0-{CHUNK - 1}/{CHUNK}"
        await resp.prepare(request)
        for _ in range(200):  # a byte every 20 ms: never silent long enough for read_timeout
            await resp.write(b"z")
            await asyncio.sleep(0.02)
        return resp

    app = web.Application()
    app.router.add_get("/images/{name}", trickle)
    server = await aiohttp_server(app)
    url = str(server.make_url("/images/")) + "{image_id}"
    origin_cfg = {
        "url": url,
        "retries": 0,
        "connect_timeout": "100ms",
        "read_timeout": "200ms",
        "min_rate": "1MiB",
    }
    client = await serve_app(aiohttp_client, make_config(tmp_path, {"origin": origin_cfg}))
    await client.post("/v1/images/img/fetch")
    st = await wait_state(client, "img", "failed")
    assert st["error"]["error"] == "origin timeout"
    assert "origin.min_rate" in st["error"]["detail"]


async def test_retry_after_is_honoured(aiohttp_client, aiohttp_server, tmp_path: Path) -> None:
    import time

    from conftest import make_config, serve_app

    body = b"r" * 1000
    ranged = _ranged(body)
    ready_at = time.monotonic() + 0.5

    async def busy_then_fine(request: web.Request) -> web.Response:
        if time.monotonic() < ready_at:
            return web.Response(status=503, headers={"Retry-After": "1"})
        return await ranged(request)

    app = web.Application()
    app.router.add_get("/images/{name}", busy_then_fine)
    server = await aiohttp_server(app)
    url = str(server.make_url("/images/")) + "{image_id}"
    cfg = make_config(tmp_path, {"origin": {"url": url, "retries": 1, "retry_backoff": "10ms"}})
    client = await serve_app(aiohttp_client, cfg)
    resp = await client.get("/v1/images/img")
    assert resp.status == 200
    assert await resp.read() == body


async def test_client_hanging_up_stops_being_a_reader(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("img", SIZE)
    client = await daemon(origin={"concurrency": 1})
    origin.faults.delay = 0.1
    resp = await client.get("/v1/images/img")
    assert resp.status == 200
    assert (await status(client, "img"))["readers"] == 1
    resp.close()  # the hypervisor gives up
    for _ in range(200):
        if (await status(client, "img"))["readers"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (await client.delete("/v1/images/img")).status == 200


async def test_concurrent_first_reads_ask_the_origin_once(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    data = images.add("img", SIZE)
    client = await daemon()
    origin.faults.delay = 0.05
    bodies = await asyncio.gather(*(_read(client, "/v1/images/img") for _ in range(10)))
    assert all(b == data for b in bodies)
    sidecar_gets = [r for r in origin.stats.requests if r[1] == "img.sha256"]
    assert len(sidecar_gets) == 1


async def test_recreated_entry_does_not_inherit_old_stats(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    images.add("img", SIZE)
    client = await daemon()
    await (await client.get("/v1/images/img")).read()
    await wait_state(client, "img", "complete")
    await client.put("/v1/images/img/pin")
    await client.delete("/v1/images/img/pin")
    assert (await client.delete("/v1/images/img")).status == 200
    await (await client.get("/v1/images/img")).read()
    st = await wait_state(client, "img", "complete")
    assert st["pinned"] is False
    assert st["hits"] == 1  # a new entry: the old one's stats stayed with it


async def test_a_cached_copy_of_another_version_is_dropped_not_served(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    """What the Glance-compatible endpoint relies on: starting the version the origin
    names now drops a complete copy of another version (other hash), read or not."""
    from swarmcache.api import FETCHER

    old = images.add("img", 3 * CHUNK + 1)
    client = await daemon()
    assert await (await client.get("/v1/images/img")).read() == old
    new = images.add("img", 3 * CHUNK + 1, seed=1)  # same size, other bytes and sha256
    fetcher = client.server.app[FETCHER]
    stat = await fetcher.origin.stat("img")
    job = await fetcher.start_version(fetcher.manifest_from("img", stat))
    assert job is not None  # the old copy did not count as this version
    await asyncio.wait_for(job.result, 10)
    assert await (await client.get("/v1/images/img")).read() == new
    status = await (await client.get("/v1/images/img/status?wait=10")).json()
    assert status["sha256"] == sha256(new)
    # the same version again: served from the cache, no new fetch
    again = await fetcher.start_version(fetcher.manifest_from("img", stat))
    assert again is None
