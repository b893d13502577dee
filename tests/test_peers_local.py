"""Two and three real daemons on loopback, peers by discovery.static_peers (no mDNS)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import ImageDir, Origin, free_port, metric, sha256, start_daemon_process
from swarmcache.manifest import chunk_digest
from swarmcache.wire import Hello, State, Subscribe, decode, encode

MIB = 1024 * 1024


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def _wait_peers(session: aiohttp.ClientSession, url: str, n: int) -> list[dict[str, Any]]:
    for _ in range(100):
        async with session.get(url + "/v1/peers") as resp:
            peers = (await resp.json())["peers"]
        if len([p for p in peers if p["state"] == "ok"]) >= n:
            return list(peers)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} knows {peers}, wanted {n} usable peers")


async def test_second_host_takes_every_chunk_from_the_first(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 3 * MIB + 123)
    a = await start_daemon_process(tmp_path, origin.url, name="a")
    daemon_processes.append(a)
    a_port = a.url.rsplit(":", 1)[1]
    b = await start_daemon_process(
        tmp_path,
        origin.url,
        name="b",
        extra=f'[discovery]\nmdns = false\nstatic_peers = ["127.0.0.1:{a_port}"]\n',
    )
    daemon_processes.append(b)
    async with aiohttp.ClientSession() as s:
        assert await _get(s, a.url + "/v1/images/img") == data
        origin_bytes = origin.stats.bytes_by_path["img"]
        peers = await _wait_peers(s, b.url, 1)
        assert peers[0]["source"] == "static"
        got = await _get(s, b.url + "/v1/images/img")
        assert sha256(got) == sha256(data)
        # every image byte B got came from A (B asked the origin only for the
        # image's size and checksum)
        assert origin.stats.bytes_by_path["img"] == origin_bytes == len(data)
        async with s.get(b.url + "/metrics") as resp:
            text = await resp.text()
        assert metric(text, "swarmcache_fetched_bytes_total", source="peer") == len(data)
        assert metric(text, "swarmcache_fetched_bytes_total", source="origin") == 0
        # A learnt of B from its hello and lists it as an inbound peer
        a_peers = await _wait_peers(s, a.url, 1)
        assert a_peers[0]["source"] == "inbound"
    # the operator's view of B's peer table: A, usable, with a measured rate
    out = subprocess.run(
        [sys.executable, "-m", "swarmcache", "--daemon", b.url, "peers"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[1].split()[:5] == ["NODE", "ADDRESS", "STATE", "SOURCE", "LAST"]
    row = lines[2].split()
    assert row[1:4] == [f"127.0.0.1:{a_port}", "ok", "static"]
    assert row[-1].endswith("/s")  # a rate was measured


async def test_peer_serving_corrupt_chunks_is_quarantined_and_image_still_correct(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 2 * MIB)
    bad = await start_daemon_process(
        tmp_path, origin.url, name="bad", env={"SWARMCACHE_TEST_CORRUPT_PEER_CHUNKS": "1"}
    )
    daemon_processes.append(bad)
    bad_port = bad.url.rsplit(":", 1)[1]
    good = await start_daemon_process(
        tmp_path,
        origin.url,
        name="good",
        extra=f'[discovery]\nmdns = false\nstatic_peers = ["127.0.0.1:{bad_port}"]\n',
    )
    daemon_processes.append(good)
    async with aiohttp.ClientSession() as s:
        assert await _get(s, bad.url + "/v1/images/img") == data
        await _wait_peers(s, good.url, 1)
        got = await _get(s, good.url + "/v1/images/img")
        assert got == data
        async with s.get(good.url + "/metrics") as resp:
            text = await resp.text()
        assert metric(text, "swarmcache_peer_quarantines_total") == 1
        assert metric(text, "swarmcache_verification_failures_total", kind="chunk") >= 1
        async with s.get(good.url + "/v1/peers") as resp:
            peers = (await resp.json())["peers"]
        assert [p["state"] for p in peers] == ["quarantined"]
        # the rest came from the origin
        assert metric(text, "swarmcache_fetched_bytes_total", source="origin") >= len(data) - (
            4 * 64 * 1024
        )


async def test_three_hosts_starting_together_share_the_origin_reads(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 8 * MIB)
    ports = [free_port() for _ in range(3)]
    daemons = []
    for n, port in enumerate(ports):
        others = ", ".join(f'"127.0.0.1:{p}"' for p in ports if p != port)
        d = await start_daemon_process(
            tmp_path,
            origin.url,
            name=f"h{n}",
            port=port,
            extra=f"[discovery]\nmdns = false\nstatic_peers = [{others}]\n",
        )
        daemons.append(d)
        daemon_processes.append(d)
    async with aiohttp.ClientSession() as s:
        for d in daemons:
            await _wait_peers(s, d.url, 2)
        got = await asyncio.gather(*(_get(s, d.url + "/v1/images/img") for d in daemons))
        assert all(g == data for g in got)
        # each chunk came from the origin about once, not three times
        sent = origin.stats.bytes_by_path["img"]
        assert sent <= 1.05 * len(data), sent


async def test_peer_api_serves_held_chunks_only_and_survives_garbage(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 1 * MIB)
    a = await start_daemon_process(tmp_path, origin.url, name="a")
    daemon_processes.append(a)
    async with aiohttp.ClientSession() as s:
        async with s.get(a.url + "/v1/peer/images/img/chunks/0") as resp:
            assert resp.status == 404  # not held yet
        assert await _get(s, a.url + "/v1/images/img") == data
        # The response ends once the image passed its checksum; the fetch then still makes
        # it durable and marks it complete. A peer saying hello before that is subscribed
        # to by the running fetch (one more peer error: nothing listens on its port 9) and
        # told the image is not complete yet: wait for the fetch to end.
        async with s.get(a.url + "/v1/images/img/status?wait=30") as resp:
            assert (await resp.json())["state"] == "complete"
        async with s.get(a.url + "/v1/peer/images/img/chunks/3") as resp:
            assert resp.status == 200
            assert await resp.read() == data[3 * 64 * 1024 : 4 * 64 * 1024]
            assert len(resp.headers["X-Chunk-Digest"]) == 32
        async with s.get(a.url + "/v1/peer/images/img/chunks/99") as resp:
            assert resp.status == 404
        async with s.get(
            a.url + "/v1/peer/images/img/chunks/1", headers={"If-Match": '"other"'}
        ) as resp:
            assert resp.status == 412
        async with s.get(a.url + "/v1/peer/images/img/chunks/x") as resp:
            assert resp.status == 400
        # a peer speaking garbage, or skipping its hello, loses its socket, nothing more
        for frame in (b"\xc1\xc1", b"\x93\x01\x02\x03", encode(Subscribe("img", True))):
            async with s.ws_connect(a.url + "/v1/peer/ws") as ws:
                await ws.send_bytes(frame)
                msg = await ws.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        # a well-behaved subscriber gets the state: every chunk held
        async with s.ws_connect(a.url + "/v1/peer/ws") as ws:
            await ws.send_bytes(encode(Hello("tester", "127.0.0.1", 9)))
            assert isinstance(decode((await ws.receive(timeout=10)).data), Hello)
            await ws.send_bytes(encode(Subscribe("img", False)))
            state = decode((await ws.receive(timeout=10)).data)
            assert isinstance(state, State)
            assert state.manifest is not None
            assert state.manifest.complete
            assert state.have == b"\xff" * 2
        async with s.get(a.url + "/healthz") as resp:
            assert resp.status == 200
        async with s.get(a.url + "/metrics") as resp:
            assert metric(await resp.text(), "swarmcache_peer_errors_total") == 3


async def test_chunk_in_flight_from_the_origin_is_streamed_with_its_digest(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 1 * MIB)
    a = await start_daemon_process(tmp_path, origin.url, name="a")
    daemon_processes.append(a)
    origin.faults.delay = 1.0  # every origin answer waits: chunks stay in flight a while
    async with aiohttp.ClientSession() as s:
        async with s.post(a.url + "/v1/images/img/fetch") as resp:
            assert resp.status == 202
        taking: tuple[int, ...] = ()
        async with s.ws_connect(a.url + "/v1/peer/ws") as ws:
            await ws.send_bytes(encode(Hello("tester", "127.0.0.1", 9)))
            await ws.receive(timeout=10)
            for _ in range(50):
                await ws.send_bytes(encode(Subscribe("img", False)))
                state = decode((await ws.receive(timeout=10)).data)
                assert isinstance(state, State)
                if state.taking:
                    taking = state.taking
                    break
                await asyncio.sleep(0.05)
        assert taking, "the daemon never announced a chunk it was taking"
        index = taking[0]
        chunk = data[index * 64 * 1024 : (index + 1) * 64 * 1024]
        url = f"{a.url}/v1/peer/images/img/chunks/{index}"
        async with s.get(url) as resp:
            assert resp.status == 404  # not held yet: only a streamed read gets it
        async with s.get(url, headers={"X-Swarmcache-Stream": "1"}) as resp:
            assert resp.status == 200
            body = await resp.read()
        assert body[: len(chunk)] == chunk
        assert body[len(chunk) :] == chunk_digest(chunk)
        origin.faults.delay = 0


async def test_a_relay_serves_only_what_it_may_pass_on() -> None:
    """Streams in flight: an origin read to anyone, a relayed one only to a peer that will
    not pass it on again (no chains, so no cycles), one arriving within the wait."""
    from swarmcache.api import _in_flight
    from swarmcache.fetcher import InFlight

    class Job:  # the two things _in_flight reads of a FetchJob and a CachedImage
        def __init__(self) -> None:
            self.inflight: dict[int, InFlight] = {}

        def has(self, index: int) -> bool:
            return False

    job = Job()
    origin, relayed = InFlight(10), InFlight(10)
    relayed.relayed = True
    job.inflight.update({0: origin, 1: relayed})
    assert await _in_flight(job, job, 0, to_relay=True) is origin
    assert await _in_flight(job, job, 1, to_relay=False) is relayed
    assert await _in_flight(job, job, 1, to_relay=True) is None
    assert await _in_flight(job, job, 3, to_relay=False) is None  # nothing within the wait
    late = InFlight(10)
    asyncio.get_running_loop().call_later(0.1, job.inflight.__setitem__, 4, late)
    assert await _in_flight(job, job, 4, to_relay=False) is late


async def test_reads_from_a_peer_that_is_gone_end_at_once() -> None:
    """A hung peer (stopped, or cut off without a reset) holds our reads from it only
    until we learn it is gone (its link's heartbeat fails), not until their timeouts."""
    from swarmcache.config import PeersConfig
    from swarmcache.errors import PeerGone
    from swarmcache.manifest import Manifest
    from swarmcache.metrics import Metrics
    from swarmcache.peers.swarm import Swarm

    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads the request, never answers

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    swarm = Swarm(
        "a" * 16,
        ("127.0.0.1", 1),
        PeersConfig(timeout=600.0),
        origin_deadline=600.0,
        metrics=Metrics(),
    )
    manifest = Manifest("img", size=2 * MIB, chunk_size=MIB)
    try:
        async with swarm:
            swarm.seen("b" * 16, "127.0.0.1", port, "static")
            held = asyncio.create_task(swarm.read_chunk("b" * 16, manifest, 0))
            streamed = asyncio.create_task(swarm.read_chunk_streamed("b" * 16, manifest, 1))
            for _ in range(100):  # both requests are at the peer
                if len(accepted) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(accepted) == 2
            assert not held.done()
            assert not streamed.done()
            swarm.quarantine("b" * 16)  # as for a peer that is down, or whose link is lost
            async with asyncio.timeout(5):  # not 600 s
                results = await asyncio.gather(held, streamed, return_exceptions=True)
            for result in results:  # not counted against it once more per read
                assert isinstance(result, PeerGone), result
                assert "the peer is gone" in str(result)
            # and a read that starts after it went away does not wait either
            with pytest.raises(PeerGone, match="is quarantined"):
                await swarm.read_chunk("b" * 16, manifest, 0)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
