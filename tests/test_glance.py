"""swarmcache with a real Glance (glance-api 33 under uWSGI, swarmtools.glance): the
Glance origin, the Glance-compatible endpoint as glanceclient and openstacksdk use
it, its pass-through, its cache API, and what happens to bytes Glance corrupted.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from conftest import make_config, metric, serve_app
from swarmcache.daemon import GLANCE_ADDRESS, build_app
from swarmtools.glance import ADMIN_HEADERS, GlanceServer

# the module's Glance starts once (about 3 s; on a fresh machine the install first)
pytestmark = pytest.mark.timeout(300)

MIB = 1024 * 1024
GLANCE_CLI = Path(sys.executable).with_name("glance")


@pytest.fixture(scope="module")
def glance() -> Iterator[GlanceServer]:
    """A real Glance for the module (noauth: every caller is an admin)."""
    with GlanceServer() as server:
        yield server


@pytest.fixture(scope="module")
def guarded_glance() -> Iterator[GlanceServer]:
    """A real Glance that tells callers apart (identity headers, no Keystone): a caller
    without them is an anonymous non-admin."""
    with GlanceServer(auth="headers") as server:
        yield server


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def _upload(glance: GlanceServer, data: bytes, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = await asyncio.to_thread(glance.create_image, data, **extra)
    assert meta["status"] == "active"
    assert meta["os_hash_value"] == hashlib.sha512(data).hexdigest()
    return meta


class Node:
    """An in-process daemon whose origin is a Glance, with its Glance-compatible endpoint."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.endpoint = "http://" + client.server.app[GLANCE_ADDRESS]

    async def metric(self, name: str, **labels: str) -> float:
        """One value of the daemon's /metrics."""
        return metric(await (await self.client.get("/metrics")).text(), name, **labels)

    async def status(self, image_id: str) -> dict[str, Any]:
        """GET /v1/images/{id}/status, once a running fetch ended (it ends a moment
        after its last byte went out: the image is made durable first)."""
        resp = await self.client.get(f"/v1/images/{image_id}/status?wait=10")
        body: dict[str, Any] = await resp.json()
        return body


NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
def node(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> Callable[..., Awaitable[Node]]:
    """Start a daemon with `[origin] kind = "glance"` at `url` and `[glance_api]` on."""

    async def start(url: str, **origin: Any) -> Node:
        config = make_config(
            tmp_path,
            {
                "origin": {"kind": "glance", "url": url, **origin},
                "cache": {"chunk_size": "1MiB"},
                "glance_api": {"listen": "127.0.0.1:0"},
            },
        )
        return Node(await serve_app(aiohttp_client, config))

    return start


async def _run(*argv: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run a command without blocking the loop the in-process daemon runs on."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _glance_cli(endpoint: str, *args: str) -> list[str]:
    # no --os-image-api-version: the client reads GET /versions first, as operators' do
    return [str(GLANCE_CLI), "--os-image-url", endpoint, "--os-auth-token", "any", *args]


async def test_glance_origin_fetches_an_image_that_matches_its_os_hash_value(
    glance: GlanceServer, node: NodeFactory
) -> None:
    data = _random(5 * MIB + 17, 1)
    meta = await _upload(glance, data)
    n = await node(glance.url)
    resp = await n.client.get(f"/v1/images/{meta['id']}")
    assert resp.status == 200
    assert await resp.read() == data
    st = await n.status(meta["id"])
    assert st["state"] == "complete"
    assert st["hash"] == st["origin_hash"] == f"sha512:{meta['os_hash_value']}"
    fetched = await n.metric("swarmcache_fetched_bytes_total", source="origin")
    assert fetched == len(data)
    # a second read, either way in, sends nothing from Glance
    assert await (await n.client.get(f"/v1/images/{meta['id']}")).read() == data
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{n.endpoint}/v2/images/{meta['id']}/file") as r,
    ):
        assert await r.read() == data
    assert await n.metric("swarmcache_fetched_bytes_total", source="origin") == fetched


async def test_glanceclient_downloads_through_the_endpoint_and_uploads_land_in_glance(
    glance: GlanceServer, node: NodeFactory, tmp_path: Path
) -> None:
    data = _random(3 * MIB + 5, 2)
    meta = await _upload(glance, data)
    n = await node(glance.url)
    out = tmp_path / "out"
    code, _, err = await _run(
        *_glance_cli(n.endpoint, "image-download", "--file", str(out), meta["id"])
    )
    assert code == 0, err
    assert out.read_bytes() == data  # glanceclient checked os_hash_value itself too
    assert (await n.status(meta["id"]))["state"] == "complete"
    # a snapshot-like upload through the endpoint: streamed to Glance unchanged
    upload = tmp_path / "upload"
    upload.write_bytes(_random(2 * MIB + 3, 3))
    code, text, err = await _run(
        *_glance_cli(
            n.endpoint,
            "image-create",
            "--name",
            "snap",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--file",
            str(upload),
        )
    )
    assert code == 0, err
    new_id = next(
        line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| id ")
    )
    created = await asyncio.to_thread(glance.image, new_id)
    assert created["status"] == "active"
    assert created["os_hash_value"] == hashlib.sha512(upload.read_bytes()).hexdigest()
    assert (await n.client.get(f"/v1/images/{new_id}/status")).status == 404  # not cached


async def test_an_upload_with_a_content_length_streams_through_to_glance(
    glance: GlanceServer, node: NodeFactory
) -> None:
    n = await node(glance.url)
    data = _random(3 * MIB + 11, 9)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{n.endpoint}/v2/images",
            json={"name": "put", "disk_format": "raw", "container_format": "bare"},
        ) as r:
            image_id = (await r.json())["id"]
        async with s.put(
            f"{n.endpoint}/v2/images/{image_id}/file",
            data=io.BytesIO(data),  # sized: sent with Content-Length, not chunked
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        ) as r:
            assert r.status == 204
    meta = await asyncio.to_thread(glance.image, image_id)
    assert (meta["status"], meta["size"]) == ("active", len(data))
    assert meta["os_hash_value"] == hashlib.sha512(data).hexdigest()


async def test_an_upload_that_expects_100_continue_does_not_hang(
    glance: GlanceServer, node: NodeFactory, tmp_path: Path
) -> None:
    """curl sends `Expect: 100-continue` with a body over 1 MiB; the endpoint answers
    the 100 itself and must not make Glance wait for one of its own."""
    n = await node(glance.url)
    upload = tmp_path / "upload"
    upload.write_bytes(_random(2 * MIB, 10))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{n.endpoint}/v2/images",
            json={"name": "curl", "disk_format": "raw", "container_format": "bare"},
        ) as r,
    ):
        image_id = (await r.json())["id"]
    code, _, err = await _run(
        "curl", "-sSf", "--max-time", "60", "-T", str(upload),
        "-H", "Content-Type: application/octet-stream", "-H", "Expect: 100-continue",
        f"{n.endpoint}/v2/images/{image_id}/file",
    )  # fmt: skip
    assert code == 0, err
    meta = await asyncio.to_thread(glance.image, image_id)
    assert meta["os_hash_value"] == hashlib.sha512(upload.read_bytes()).hexdigest()


_SDK_SCRIPT = """
import sys, openstack
conn = openstack.connection.Connection(
    auth_type="none", image_endpoint_override=sys.argv[1], image_api_version="2"
)
image = conn.image.get_image(sys.argv[2])
conn.image.download_image(image, output=sys.argv[3])
print(image.hash_algo, image.hash_value)
"""


async def test_openstacksdk_downloads_through_the_endpoint(
    glance: GlanceServer, node: NodeFactory, tmp_path: Path
) -> None:
    data = _random(2 * MIB + 1, 4)
    meta = await _upload(glance, data)
    n = await node(glance.url)
    out = tmp_path / "sdk-out"
    code, text, err = await _run(
        sys.executable, "-c", _SDK_SCRIPT, n.endpoint, meta["id"], str(out)
    )
    assert code == 0, err
    assert text.split() == ["sha512", meta["os_hash_value"]]
    assert out.read_bytes() == data
    assert (await n.status(meta["id"]))["state"] == "complete"


async def _get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers) as r:
        return r.status, r.headers, await r.read()


async def test_the_endpoint_answers_downloads_as_glance_does(
    glance: GlanceServer, node: NodeFactory
) -> None:
    data = _random(3 * MIB, 5)
    meta = await _upload(glance, data)
    n = await node(glance.url)
    url = f"{n.endpoint}/v2/images/{meta['id']}/file"
    for ours, theirs in ((url, f"{glance.url}/v2/images/{meta['id']}/file"),):
        for headers in ({}, {"Range": "bytes=100-1048675"}, {"Range": "bytes=-10"}):
            s1, h1, b1 = await _get(ours, headers)
            s2, h2, b2 = await _get(theirs, headers)
            assert (s1, b1) == (s2, b2), headers
            for name in ("Content-Type", "Content-MD5", "Content-Range", "Content-Length"):
                assert h1.get(name) == h2.get(name), (headers, name)
            assert "Accept-Ranges" not in h1
        for headers, status in (
            ({"Range": "bytes=0-1,5-6"}, 400),
            ({"Range": f"bytes={len(data)}-"}, 416),
            ({"Range": "bytes=9-5"}, 416),
            ({"Range": "items=0-1"}, 416),
        ):
            assert (await _get(ours, headers))[0] == status == (await _get(theirs, headers))[0]
    # passed through to Glance: HEAD (405), an unknown image (404), metadata
    assert (await _get(url, method="HEAD"))[0] == 405
    assert (await _get(f"{n.endpoint}/v2/images/{'0' * 8}-0000-0000-0000-{'0' * 12}/file"))[
        0
    ] == 404
    status, _, body = await _get(f"{n.endpoint}/v2/images/{meta['id']}")
    assert (status, json.loads(body)["os_hash_value"]) == (200, meta["os_hash_value"])


async def test_an_image_without_data_is_glances_to_answer(
    glance: GlanceServer, node: NodeFactory
) -> None:
    n = await node(glance.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{n.endpoint}/v2/images",
            json={"name": "empty", "disk_format": "raw", "container_format": "bare"},
        ) as r:
            assert r.status == 201
            queued = await r.json()
        async with s.get(f"{n.endpoint}/v2/images/{queued['id']}/file") as r:
            assert r.status == 204  # Glance's own answer for a queued image
        async with s.put(f"{n.endpoint}/v2/cache/{queued['id']}") as r:
            assert r.status == 409  # nothing to cache yet: said, not a 2xx
            assert (await r.json())["error"] == "image not active"
    assert (await n.client.get(f"/v1/images/{queued['id']}/status")).status == 404


async def test_versions_point_here_and_glances_cache_commands_work(
    glance: GlanceServer, node: NodeFactory
) -> None:
    data = _random(MIB + 9, 6)
    meta = await _upload(glance, data)
    n = await node(glance.url)
    status, _, body = await _get(f"{n.endpoint}/versions")
    versions = json.loads(body)["versions"]
    assert status == 200
    assert any(v["id"] == "v2.14" for v in versions)
    assert all(link["href"].startswith(n.endpoint) for v in versions for link in v["links"])
    assert (await _get(n.endpoint + "/"))[0] == 300
    code, _, err = await _run(*_glance_cli(n.endpoint, "cache-queue", meta["id"]))
    assert code == 0, err
    for _ in range(100):  # 10 s at most
        if (await n.status(meta["id"])).get("state") == "complete":
            break
        await asyncio.sleep(0.1)
    code, text, err = await _run(*_glance_cli(n.endpoint, "cache-list"))
    assert code == 0, err
    row = next(line for line in text.splitlines() if meta["id"] in line)
    assert "cached" in row
    assert str(len(data)) in row
    code, _, err = await _run(*_glance_cli(n.endpoint, "cache-delete", meta["id"]))
    assert code == 0, err
    assert (await n.client.get(f"/v1/images/{meta['id']}/status")).status == 404
    await _run(*_glance_cli(n.endpoint, "cache-queue", meta["id"]))
    code, _, err = await _run(*_glance_cli(n.endpoint, "cache-clear", "--target", "cache"))
    assert code == 0, err


async def test_bytes_that_fail_os_hash_value_are_never_a_clean_download(
    glance: GlanceServer, node: NodeFactory, tmp_path: Path
) -> None:
    data = _random(4 * MIB + 100, 7)
    meta = await _upload(glance, data)
    path = glance.image_file_path(meta["id"])
    with open(path, "r+b") as f:  # Glance's store now holds other bytes than it hashed
        f.seek(3 * MIB + 5)
        f.write(bytes([data[3 * MIB + 5] ^ 0xFF]))
    n = await node(glance.url)
    out = tmp_path / "out"
    code, _, _err = await _run(
        *_glance_cli(n.endpoint, "image-download", "--file", str(out), meta["id"])
    )
    assert code != 0
    # whatever glanceclient kept, it is not the whole image: the last chunk never came
    assert not out.exists() or out.stat().st_size < len(data)
    st = await n.status(meta["id"])
    assert st["state"] == "failed"
    assert "does not match" in st["error"]["detail"]
    # a direct reader is cut short too, never handed the whole wrong image
    with pytest.raises(aiohttp.ClientPayloadError):
        await _get(f"{n.endpoint}/v2/images/{meta['id']}/file")


async def test_callers_rights_are_glances(guarded_glance: GlanceServer, node: NodeFactory) -> None:
    data = _random(MIB, 8)
    public = await _upload(guarded_glance, data)
    private = await _upload(guarded_glance, data, visibility="private")
    n = await node(guarded_glance.url, token_file="")  # the daemon itself: anonymous
    anonymous: dict[str, str] = {}
    # an image the caller may not see: Glance's 404, and nothing cached
    status, _, _ = await _get(f"{n.endpoint}/v2/images/{private['id']}/file", anonymous)
    assert status == 404
    assert (await n.client.get(f"/v1/images/{private['id']}/status")).status == 404
    # the admin may, but swarmcache's own (anonymous) account may not: Glance serves it
    status, _, body = await _get(f"{n.endpoint}/v2/images/{private['id']}/file", ADMIN_HEADERS)
    assert (status, body) == (200, data)
    assert (await n.client.get(f"/v1/images/{private['id']}/status")).status == 404
    # deactivated: Glance decides (403 for a non-admin), even with the bytes cached
    status, _, body = await _get(f"{n.endpoint}/v2/images/{public['id']}/file", anonymous)
    assert (status, body) == (200, data)
    # may see the image but not download it (Glance's download_image policy): Glance's
    # 403, though the bytes are cached
    viewer = {**ADMIN_HEADERS, "X-Roles": "reader,no_download"}
    status, _, _ = await _get(f"{n.endpoint}/v2/images/{public['id']}", viewer)
    assert status == 200
    status, _, _ = await _get(f"{n.endpoint}/v2/images/{public['id']}/file", viewer)
    assert status == 403
    await asyncio.to_thread(guarded_glance.deactivate, public["id"])
    status, _, _ = await _get(f"{n.endpoint}/v2/images/{public['id']}/file", anonymous)
    assert status == 403
    # what the operator sees: served by the swarm, handed to Glance, refused by Glance
    outcomes = {
        o: await n.metric("swarmcache_glance_downloads_total", outcome=o)
        for o in ("swarm", "passed", "refused")
    }
    # (refused: the private image, the viewer; passed: the admin's read of what
    # swarmcache's account may not read, and the deactivated image)
    assert outcomes == {"swarm": 1, "passed": 2, "refused": 2}


async def test_glance_unreachable_is_a_503(node: NodeFactory) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    n = await node(dead)
    for path in ("/v2/images/abc/file", "/v2/images", "/versions"):
        status, _, body = await _get(n.endpoint + path)
        assert status == 503, path
        assert json.loads(body)["error"] == "glance unreachable"


async def test_a_seeder_beside_glance_signs_and_hosts_download_through_their_endpoint(
    glance: GlanceServer,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
) -> None:
    """A seeder with the Glance origin seeds an image (checked against os_hash_value,
    signed); a host trusting its key, with the seeder as its one peer, serves
    `glance image-download` through its endpoint with every block from the seeder,
    checked against the signed manifest, and nothing from Glance."""
    from conftest import free_port, wait_peers
    from swarmcache.signing import encode_key, key_id, new_private_key, public_key

    data = _random(4 * MIB + 9, 11)
    meta = await _upload(glance, data)
    private = new_private_key()
    key_file = tmp_path / "manifest.key"
    key_file.write_text(encode_key(private) + "\n")
    key_file.chmod(0o600)

    async def start(name: str, **sections: dict[str, Any]) -> Node:
        port = free_port()
        raw: dict[str, dict[str, Any]] = {
            "daemon": {"listen": f"127.0.0.1:{port}"},
            "origin": {"kind": "glance", "url": glance.url},
            "cache": {"dir": str(tmp_path / name), "chunk_size": "1MiB"},
            "glance_api": {"listen": "127.0.0.1:0"},
        }
        for section, keys in sections.items():
            raw.setdefault(section, {}).update(keys)
        app = build_app(make_config(tmp_path, raw))
        kwargs = {"handler_cancellation": True, "port": port}
        return Node(await aiohttp_client(app, server_kwargs=kwargs))

    seeder = await start(
        "seeder", daemon={"role": "seeder"}, security={"manifest_key_file": str(key_file)}
    )
    resp = await seeder.client.post(f"/v1/images/{meta['id']}/seed?wait=60")
    seeded = await resp.json()
    assert resp.status == 200, seeded
    kid = key_id(public_key(private))
    assert seeded["signed_by"] == kid
    assert seeded["hash"] == f"sha512:{meta['os_hash_value']}"
    host = await start(
        "host",
        discovery={"static_peers": [f"127.0.0.1:{seeder.client.server.port}"]},
        security={"trusted_manifest_keys": [encode_key(public_key(private))]},
    )
    await wait_peers(host.client, "")
    out = tmp_path / "out"
    code, _, err = await _run(
        *_glance_cli(host.endpoint, "image-download", "--file", str(out), meta["id"])
    )
    assert code == 0, err
    assert out.read_bytes() == data
    status = await host.status(meta["id"])
    assert (status["state"], status["signed_by"]) == ("complete", kid)
    assert await host.metric("swarmcache_fetched_bytes_total", source="origin") == 0
    assert await host.metric("swarmcache_fetched_bytes_total", source="peer") == len(data)
    assert await seeder.metric("swarmcache_fetched_bytes_total", source="origin") == len(data)
