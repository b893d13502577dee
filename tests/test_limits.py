"""[limits]: bandwidth caps hold (a transfer takes at least what the cap allows: a lower
bound, never a speed asserted) and a peer over max_peer_connections gets 503 with
Retry-After at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from conftest import ImageDir, Origin, make_config, metric, serve_app, sha256
from swarmcache.config import build_config
from swarmcache.errors import ConfigError
from swarmcache.limits import Limits, Rate
from test_seeder import start_seeder, trusting_host

MIB = 1024 * 1024


async def test_a_rate_grants_a_second_at_once_then_the_rest_at_the_cap() -> None:
    rate = Rate(MIB)
    await rate.take(MIB)  # the bucket holds one second's worth
    t0 = time.monotonic()
    await rate.take(MIB // 2)
    assert time.monotonic() - t0 >= 0.4  # half a second more, at least
    await rate.take(3 * MIB)  # more than a second's worth: in parts, at the cap
    assert time.monotonic() - t0 >= 3.3
    await Rate(0).take(10**12)  # no cap: no wait


def test_limits_config() -> None:
    cfg = build_config({"limits": {"upload_rate": "10MiB", "max_peer_connections": 3}}, {}, "t")
    limits = Limits.from_config(cfg.limits)
    assert (limits.upload.bytes_per_s, limits.download.bytes_per_s) == (10 * MIB, 0)
    assert [limits.peer_request_starts() for _ in range(4)] == [True, True, True, False]
    limits.peer_request_ends()
    assert limits.peer_request_starts()
    with pytest.raises(ConfigError, match=r"limits\.origin_rate"):
        build_config({"limits": {"origin_rate": "-1"}}, {}, "t")


async def test_origin_rate_caps_a_fetch(daemon: Any, images: ImageDir) -> None:
    data = images.add("img", 3 * MIB)
    client = await daemon(limits={"origin_rate": "1MiB"})
    t0 = time.monotonic()
    resp = await client.get("/v1/images/img")
    assert sha256(await resp.read()) == sha256(data)
    assert time.monotonic() - t0 >= 1.8  # 1 MiB at once, then 2 MiB at 1 MiB/s


async def test_a_peer_over_max_peer_connections_is_told_to_come_back(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> None:
    client = await serve_app(
        aiohttp_client, make_config(tmp_path, {"limits": {"max_peer_connections": 1}})
    )
    async with client.ws_connect("/v1/peer/ws"):  # a link: one peer request while open
        resp = await client.get("/v1/peer/hello")  # answered while the link stays open
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"] == "busy"
        assert (await client.get("/v1/images")).status == 200  # the client API is not counted
    for _ in range(50):  # the link is closed: peer requests are served again
        if (await client.get("/v1/peer/hello")).status == 200:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the link's place was never freed")
    text = await (await client.get("/metrics")).text()
    assert metric(text, "swarmcache_peer_requests_refused_total") >= 1


async def test_upload_rate_caps_what_a_seeder_sends(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 3 * MIB)
    seeder, public = await start_seeder(
        tmp_path, origin, daemon_processes, '[limits]\nupload_rate = "1MiB"\n'
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(seeder.url + "/v1/images/img/seed?wait=30") as resp:
            assert resp.status == 200
        host = await trusting_host(tmp_path, origin, daemon_processes, seeder, public)
        t0 = time.monotonic()
        async with s.get(host.url + "/v1/images/img") as resp:
            assert sha256(await resp.read()) == sha256(data)
        took = time.monotonic() - t0
        text = await (await s.get(host.url + "/metrics")).text()
    assert metric(text, "swarmcache_fetched_bytes_total", source="peer") == len(data)
    assert took >= 1.8, took  # every byte from the seeder, 1 MiB/s after the first
