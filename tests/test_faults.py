"""Fault injection beyond hostile peers: packets lost at random on every link, the origin
going down in the middle of a fetch (with and without peers that hold the rest)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import (
    DaemonFactory,
    ImageDir,
    Origin,
    metric,
    need_testbed,
    sha256,
    start_daemon_process,
    wait_peers,
)
from swarmtools.testbed import Testbed, start_origin
from test_api import wait_chunks, wait_state
from test_swarm import Swarm, add_image, fetch_all, image_bytes_sent, ok_peers, wait_for

MIB = 1024 * 1024
LOSSY_HOSTS = 5


@pytest.fixture(scope="module")
def lossy_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, Path]]:
    """Five hosts and an origin on 100 Mbit/s links, 5% of packets dropped everywhere."""
    need_testbed()
    work = tmp_path_factory.mktemp("lossy")
    (work / "images").mkdir()
    with Testbed(LOSSY_HOSTS, rate="100mbit") as bed:
        start_origin(bed, work / "images", log=work / "origin.log")
        bed.drop_randomly(5)
        yield bed, work


def test_five_hosts_fetch_through_five_percent_packet_loss(
    lossy_bed: tuple[Testbed, Path], request: pytest.FixtureRequest
) -> None:
    bed, work = lossy_bed
    swarm = Swarm(bed, work, request.node.name)
    try:
        for h in bed.hosts:
            swarm.start(h)
        for h in bed.hosts:
            want = {f"{o.addr}:7480" for o in bed.hosts if o is not h}
            wait_for(f"{h.name} finds the others", lambda h=h, w=want: ok_peers(swarm, h) >= w, 60)
        sha = add_image(work, "lossy", 16)
        t0 = time.monotonic()
        got = fetch_all(swarm, bed.hosts, "lossy")
        took = time.monotonic() - t0
        sent = image_bytes_sent(bed, "lossy")
        print(
            f"{LOSSY_HOSTS} hosts, 16 MiB, 5% loss, 100 Mbit/s: {took:.1f}s "
            f"(link limit {16 * 8 / 100:.2f}s), origin sent {sent / (16 * MIB):.2f} copies"
        )
        assert got == {h.name: sha for h in bed.hosts}
    finally:
        swarm.close()


async def test_origin_down_while_a_peer_holds_the_image(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """The origin answers nothing but 503 and a peer holds the image: the fetch needs
    nothing from the origin (the manifest comes from the peer, every block too)."""
    data = images.add("img", 4 * MIB)
    holder = await start_daemon_process(tmp_path, origin.url, name="holder")
    daemon_processes.append(holder)
    async with aiohttp.ClientSession() as s:
        async with s.get(holder.url + "/v1/images/img") as resp:
            assert sha256(await resp.read()) == sha256(data)
        addr = holder.url.removeprefix("http://")
        d = await start_daemon_process(
            tmp_path,
            origin.url,
            name="d",
            extra=f'[discovery]\nmdns = false\nstatic_peers = ["{addr}"]\n',
        )
        daemon_processes.append(d)
        await wait_peers(s, d.url)
        origin.faults.status = 503
        async with s.get(d.url + "/v1/images/img") as resp:
            assert resp.status == 200
            assert sha256(await resp.read()) == sha256(data)
        # the fetch ends a moment after its last byte went out (made durable first)
        st = await (await s.get(d.url + "/v1/images/img/status?wait=10")).json()
        text = await (await s.get(d.url + "/metrics")).text()
    origin.faults.status = None
    assert st["state"] == "complete"
    assert metric(text, "swarmcache_fetched_bytes_total", source="peer") == len(data)


async def test_origin_down_and_nobody_holds_it_fails_clearly_then_resumes(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    data = images.add("img", 16 * 64 * 1024)
    client = await daemon(origin={"concurrency": 1, "retries": 2, "retry_backoff": "10ms"})
    origin.faults.delay = 0.03
    assert (await client.post("/v1/images/img/fetch")).status == 202
    await wait_chunks(client, "img", 3)
    origin.faults.status = 503
    st = await wait_state(client, "img", "failed")
    assert "503" in st["error"]["detail"]  # the origin's answer, after the retry budget
    kept = st["chunks_present"]
    assert 0 < kept < 16
    assert (await client.get("/healthz")).status == 200
    origin.faults.status, origin.faults.delay = None, 0.0
    origin.stats.requests.clear()
    resp = await client.get("/v1/images/img")
    assert await resp.read() == data
    assert (await wait_state(client, "img", "complete"))["state"] == "complete"
    assert len(origin.chunk_requests("img")) <= 16 - kept  # it resumed: no durable chunk again
