"""[security] cluster_secret_file: peer routes answer only requests signed with the
cluster secret; daemons sharing it trade blocks, a daemon with another one is refused
and fetches from the origin alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from conftest import (
    ImageDir,
    Origin,
    make_config,
    metric,
    serve_app,
    sha256,
    start_daemon_process,
    wait_log,
    wait_peers,
)
from swarmcache.daemon import build_app
from swarmcache.errors import ConfigError
from swarmcache.peerauth import EMPTY_SHA256, HEADER, sign_request

SECRET = b"correct horse battery staple, 32"
MIB = 1024 * 1024


def _secret_file(tmp_path: Path, secret: bytes, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_bytes(secret + b"\n")
    return path


async def test_peer_routes_answer_only_signed_requests(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> None:
    config = make_config(
        tmp_path, {"security": {"cluster_secret_file": str(_secret_file(tmp_path, SECRET))}}
    )
    client = await serve_app(aiohttp_client, config)
    resp = await client.get("/v1/peer/hello")
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthorized"
    signed = sign_request(SECRET, "GET", "/v1/peer/hello", EMPTY_SHA256, time.time())
    resp = await client.get("/v1/peer/hello", headers={HEADER: signed.header})
    assert resp.status == 200
    replay = await client.get("/v1/peer/hello", headers={HEADER: signed.header})
    assert replay.status == 401
    other = sign_request(b"x" * 32, "GET", "/v1/peer/hello", EMPTY_SHA256, time.time())
    assert (await client.get("/v1/peer/hello", headers={HEADER: other.header})).status == 401
    # a signature for one path does not open another
    block = sign_request(SECRET, "GET", "/v1/peer/hello", EMPTY_SHA256, time.time())
    resp = await client.get("/v1/peer/images/img/blocks/0", headers={HEADER: block.header})
    assert resp.status == 401
    assert (await client.get("/healthz")).status == 200  # the client API is not a peer route
    text = await (await client.get("/metrics")).text()
    assert metric(text, "swarmcache_peer_auth_failures_total") == 4


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"short", "at least 16"), (None, "cannot read"), (b"\n\n", "not a one-line")],
)
def test_an_unusable_secret_stops_the_daemon(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    config = make_config(tmp_path, {"security": {"cluster_secret_file": str(path)}})
    with pytest.raises(ConfigError, match=problem) as info:  # exit 2: no restart helps
        build_app(config)
    assert info.value.key == "security.cluster_secret_file"


async def _get(s: aiohttp.ClientSession, url: str) -> bytes:
    async with s.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_hosts_sharing_the_secret_trade_and_a_stranger_is_refused(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 3 * MIB + 5)
    good = _secret_file(tmp_path, SECRET, "good")
    bad = _secret_file(tmp_path, b"another cluster's secret, 32 by", "bad")
    a = await start_daemon_process(
        tmp_path, origin.url, name="a", extra=f'[security]\ncluster_secret_file = "{good}"\n'
    )
    daemon_processes.append(a)
    a_addr = a.url.removeprefix("http://")
    peers = f'[discovery]\nmdns = false\nstatic_peers = ["{a_addr}"]\n'
    b = await start_daemon_process(
        tmp_path,
        origin.url,
        name="b",
        extra=peers + f'[security]\ncluster_secret_file = "{good}"\n',
    )
    c = await start_daemon_process(
        tmp_path,
        origin.url,
        name="c",
        extra=peers + f'[security]\ncluster_secret_file = "{bad}"\n',
    )
    daemon_processes.extend([b, c])
    async with aiohttp.ClientSession() as s:
        assert await _get(s, a.url + "/v1/images/img") == data
        sent = origin.stats.bytes_by_path["img"]
        await wait_peers(s, b.url)  # b hears of a (a signed hello)
        assert sha256(await _get(s, b.url + "/v1/images/img")) == sha256(data)
        assert origin.stats.bytes_by_path["img"] == sent  # b: every byte from a
        assert sha256(await _get(s, c.url + "/v1/images/img")) == sha256(data)
        async with s.get(c.url + "/metrics") as resp:
            c_metrics = await resp.text()
        async with s.get(a.url + "/metrics") as resp:
            a_metrics = await resp.text()
    # c never got a block from a: a refused it, and its image came from the origin
    assert metric(c_metrics, "swarmcache_fetched_bytes_total", source="peer") == 0
    assert metric(c_metrics, "swarmcache_fetched_bytes_total", source="origin") == len(data)
    assert metric(a_metrics, "swarmcache_peer_auth_failures_total") >= 1


async def test_a_host_that_cannot_sign_its_answers_is_never_a_source(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """A host answering on a peer's address without the secret (here a daemon with
    none, holding the image, answering everything) is not taken as a peer: its
    unsigned answers are refused, and the image comes from the origin."""
    data = images.add("img", 2 * MIB + 3)
    stranger = await start_daemon_process(tmp_path, origin.url, name="stranger")
    daemon_processes.append(stranger)
    async with aiohttp.ClientSession() as s:
        assert await _get(s, stranger.url + "/v1/images/img") == data
    sent = origin.stats.bytes_by_path["img"]
    secret = _secret_file(tmp_path, SECRET)
    addr = stranger.url.removeprefix("http://")
    d = await start_daemon_process(
        tmp_path,
        origin.url,
        name="d",
        extra=f'[discovery]\nmdns = false\nstatic_peers = ["{addr}"]\n'
        f'[security]\ncluster_secret_file = "{secret}"\n',
    )
    daemon_processes.append(d)
    async with aiohttp.ClientSession() as s:
        # the static loop asks the stranger within its first turns
        assert await wait_log(tmp_path / "d.log", "refused")
        async with s.get(d.url + "/v1/peers") as resp:
            assert (await resp.json())["peers"] == []
        assert await _get(s, d.url + "/v1/images/img") == data
        async with s.get(d.url + "/metrics") as resp:
            text = await resp.text()
    assert metric(text, "swarmcache_fetched_bytes_total", source="peer") == 0
    assert origin.stats.bytes_by_path["img"] == sent + len(data)
    assert "static peer" in (tmp_path / "d.log").read_text()


async def test_a_link_whose_upgrade_is_not_answered_with_the_secret_is_refused(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    aiohttp_server: Any,
    tmp_path: Path,
) -> None:
    """A link carries announcements: its upgrade answer (101) must prove the cluster
    secret like every other answer. A server that takes any WebSocket (no secret) is
    refused; a daemon holding the secret is linked to."""
    from aiohttp import web

    from swarmcache.config import PeersConfig
    from swarmcache.metrics import Metrics
    from swarmcache.peers.swarm import Swarm

    async def any_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v1/peer/ws", any_ws)
    impostor = await aiohttp_server(app)
    config = make_config(
        tmp_path, {"security": {"cluster_secret_file": str(_secret_file(tmp_path, SECRET))}}
    )
    member = await serve_app(aiohttp_client, config)
    swarm = Swarm("a" * 16, ("127.0.0.1", 1), PeersConfig(timeout=5.0), 4, Metrics(), secret=SECRET)
    async with swarm:
        swarm.seen("b" * 16, "127.0.0.1", impostor.port, "static")
        assert await swarm._link_to("b" * 16) is None
        swarm.seen("c" * 16, "127.0.0.1", member.server.port, "static")
        link = await swarm._link_to("c" * 16)
        assert link is not None
        assert link.open


async def test_a_signed_request_whose_body_dribbles_is_cut_off(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> None:
    """A peer route reads the body its signature covers for 5 s at most: a sender
    dribbling it holds a request (and a place under max_peer_connections) no longer."""
    import socket

    config = make_config(
        tmp_path, {"security": {"cluster_secret_file": str(_secret_file(tmp_path, SECRET))}}
    )
    client = await serve_app(aiohttp_client, config)
    port = client.server.port
    signed = sign_request(SECRET, "POST", "/v1/peer/images/img/join", "0" * 64, time.time())
    head = (
        "POST /v1/peer/images/img/join HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n"
        f"{HEADER}: {signed.header}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    try:
        await loop.sock_sendall(sock, head + b"x")
        t0 = time.monotonic()
        answer = b""
        async with asyncio.timeout(20):
            while b"\r\n\r\n" not in answer:
                try:
                    await loop.sock_sendall(sock, b"x")  # a byte now and then
                except OSError:
                    break
                try:
                    async with asyncio.timeout(0.5):
                        answer += await loop.sock_recv(sock, 4096)
                except TimeoutError:
                    continue
        took = time.monotonic() - t0
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"did not arrive within 5s" in answer
    assert took >= 4.5  # the 5 s bound, not sooner
