"""Fault injection: a hostile peer (swarmtools/hostile_peer.py, its own program) beside
real daemon processes on loopback and a real origin. For each misbehaviour: the fetch
ends with the right bytes, /healthz answers in under a second throughout, and a peer
that sent bad bytes is quarantined and shows in the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import ImageDir, Origin, free_port, metric, sha256, start_daemon_process, wait_peers
from test_seeder import start_seeder

MIB = 1024 * 1024


async def start_hostile(
    tmp_path: Path, origin: Origin, mode: str, image: str, join: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    """The hostile peer program in `mode` for `image` (joining it at `join`); (process,
    host:port)."""
    port = free_port()
    log = open(tmp_path / f"hostile-{mode}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmtools.hostile_peer", mode, "--listen",
         f"127.0.0.1:{port}", "--image", str(tmp_path / "origin" / image),
         "--image-id", image, "--origin", origin.url, *(["--join", *join] if join else [])],
        stdout=log,
        stderr=log,
    )  # fmt: skip
    log.close()
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(f"http://127.0.0.1:{port}/_hostile") as resp:
                    if resp.status == 200:
                        return proc, f"127.0.0.1:{port}"
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError((tmp_path / f"hostile-{mode}.log").read_text())


@pytest.fixture
def hostiles() -> Any:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(10)


class HealthWatch:
    """Polls /healthz every 50 ms while a test runs: the slowest answer seen."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.polls = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        async with aiohttp.ClientSession() as s:
            while True:
                t0 = time.monotonic()
                async with s.get(self.url + "/healthz") as resp:
                    assert resp.status == 200
                    await resp.read()
                self.slowest = max(self.slowest, time.monotonic() - t0)
                self.polls += 1
                await asyncio.sleep(0.05)


async def _victim(tmp_path: Path, origin: Origin, peer: str, extra: str = "") -> Any:
    return await start_daemon_process(
        tmp_path,
        origin.url,
        name="victim",
        extra=f'[discovery]\nmdns = false\nstatic_peers = ["{peer}"]\n'
        f'[peers]\ntimeout = "1s"\n' + extra,
    )


async def _peer_state(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(url + "/v1/peers") as resp:
        peers = (await resp.json())["peers"]
    assert len(peers) == 1
    return dict(peers[0])


@pytest.mark.parametrize("mode", ["claim", "stall", "wrong", "garbage", "mute"])
async def test_a_hostile_peer_costs_time_not_correctness(
    tmp_path: Path,
    images: ImageDir,
    origin: Origin,
    daemon_processes: list[Any],
    hostiles: list[Any],
    mode: str,
) -> None:
    data = images.add("img", 2 * MIB + 333)
    proc, addr = await start_hostile(tmp_path, origin, mode, "img")
    hostiles.append(proc)
    victim = await _victim(tmp_path, origin, addr)
    daemon_processes.append(victim)
    async with aiohttp.ClientSession() as s:
        await wait_peers(s, victim.url)
        async with HealthWatch(victim.url) as health, s.get(victim.url + "/v1/images/img") as resp:
            assert resp.status == 200
            assert sha256(await resp.read()) == sha256(data)
        text = await (await s.get(victim.url + "/metrics")).text()
        async with s.get(f"http://{addr}/_hostile") as resp:
            asked = (await resp.json())["block_requests"]
        state = (await _peer_state(s, victim.url))["state"]
    if mode in ("wrong", "garbage"):  # bad bytes, or not our protocol at all
        assert state == "quarantined"
    else:  # it failed requests: it is down for a while (or still asked now and then)
        assert state in ("ok", "down")
    assert health.polls > 0
    assert health.slowest < 1.0, health.slowest
    if mode == "wrong":
        assert asked >= 1
        assert metric(text, "swarmcache_peer_quarantines_total") == 1
        assert metric(text, "swarmcache_verification_failures_total", kind="chunk") >= 1
    if mode in ("claim", "stall"):
        assert asked >= 1  # it was asked, and the victim went elsewhere
        assert metric(text, "swarmcache_fetched_bytes_total", source="peer") == 0


async def test_forged_blocks_with_forged_digests_never_make_a_wrong_image(
    tmp_path: Path,
    images: ImageDir,
    origin: Origin,
    daemon_processes: list[Any],
    hostiles: list[Any],
) -> None:
    """Without a signed manifest, blocks that match the digests their sender announced
    are taken: the whole-image check then fails, every peer that supplied blocks is
    quarantined, the image is discarded, and the next read gets the origin's bytes."""
    data = images.add("img", 2 * MIB + 333)
    proc, addr = await start_hostile(tmp_path, origin, "forged", "img")
    hostiles.append(proc)
    victim = await _victim(tmp_path, origin, addr)
    daemon_processes.append(victim)
    async with aiohttp.ClientSession() as s:
        await wait_peers(s, victim.url)
        async with s.post(victim.url + "/v1/images/img/fetch?wait=30") as resp:
            first = await resp.json()
        assert resp.status == 502
        assert first["error"] == "verification failed"
        assert (await _peer_state(s, victim.url))["state"] == "quarantined"
        async with s.get(victim.url + "/v1/images/img/status") as resp:
            assert (await resp.json())["state"] == "failed"  # nothing of it kept
        async with s.get(victim.url + "/v1/images/img") as resp:
            assert sha256(await resp.read()) == sha256(data)
        text = await (await s.get(victim.url + "/metrics")).text()
    assert metric(text, "swarmcache_verification_failures_total", kind="image") == 1


async def test_with_a_signed_manifest_no_forged_byte_is_ever_served(
    tmp_path: Path,
    images: ImageDir,
    origin: Origin,
    daemon_processes: list[Any],
    hostiles: list[Any],
) -> None:
    """A seeder signed the image; the host trusts it and also links to a peer serving
    forged bytes with forged digests. Every forged block is refused before it is
    written (the peer quarantined), and a client streaming the image while it arrives
    gets only the true bytes."""
    data = images.add("img", MIB + 333)
    # a slow seeder: the host asks the other peer for blocks too
    seeder, public = await start_seeder(
        tmp_path, origin, daemon_processes, '[limits]\nupload_rate = "256KiB"\n'
    )
    async with (
        aiohttp.ClientSession() as s,
        s.post(seeder.url + "/v1/images/img/seed?wait=30") as resp,
    ):
        assert resp.status == 200
    seeder_addr = seeder.url.removeprefix("http://")
    # it tells the seeder it holds the image: the seeder names it to the hosts
    proc, addr = await start_hostile(tmp_path, origin, "forged", "img", (seeder_addr,))
    hostiles.append(proc)
    host = await start_daemon_process(
        tmp_path,
        origin.url,
        name="host",
        extra=f'[discovery]\nmdns = false\nstatic_peers = ["{seeder_addr}", "{addr}"]\n'
        f'[security]\ntrusted_manifest_keys = ["{public}"]\n',
    )
    daemon_processes.append(host)
    async with aiohttp.ClientSession() as s:
        await wait_peers(s, host.url, 2)
        async with HealthWatch(host.url) as health, s.get(host.url + "/v1/images/img") as resp:
            got = await resp.read()
        assert got == data
        async with s.get(host.url + "/v1/peers") as resp:
            states = {p["address"]: p["state"] for p in (await resp.json())["peers"]}
        async with s.get(f"http://{addr}/_hostile") as resp:
            asked = (await resp.json())["block_requests"]
        status = await (await s.get(host.url + "/v1/images/img/status")).json()
        text = await (await s.get(host.url + "/metrics")).text()
    assert status["signed_by"] is not None
    assert asked >= 1  # it was asked for a block, sent forged bytes, and paid for it
    assert states[addr] == "quarantined"
    assert metric(text, "swarmcache_peer_quarantines_total") == 1
    assert metric(text, "swarmcache_verification_failures_total", kind="chunk") >= 1
    assert metric(text, "swarmcache_verification_failures_total", kind="image") == 0
    assert health.slowest < 1.0


async def test_slowloris_connections_do_not_starve_the_daemon(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """200 connections that send a request head one byte at a time: /healthz and a
    fetch go on, and the dribblers' connections are closed in bounded time."""
    data = images.add("img", 2 * MIB)
    d = await start_daemon_process(tmp_path, origin.url, name="d")
    daemon_processes.append(d)
    port = int(d.url.rsplit(":", 1)[1])
    socks = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        sock.send(b"GET /v1/images HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    try:
        async with aiohttp.ClientSession() as s, HealthWatch(d.url) as health:
            for _ in range(10):  # a few seconds of dribbling, a byte per connection
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
                await asyncio.sleep(0.2)
            async with s.get(d.url + "/v1/images/img") as resp:
                assert sha256(await resp.read()) == sha256(data)
        assert health.polls >= 10
        assert health.slowest < 1.0, health.slowest
    finally:
        for sock in socks:
            sock.close()
