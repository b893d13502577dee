"""Two and three real daemons on loopback, peers by discovery.static_peers (no mDNS)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import (
    DaemonFactory,
    ImageDir,
    Origin,
    free_port,
    metric,
    sha256,
    start_daemon_process,
    wait_peers,
)
from swarmcache.manifest import Checksum, Manifest, block_digest
from swarmcache.wire import Hello, Join, Slot, State, Status, Subscribe, decode, encode

MIB = 1024 * 1024


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def _pair(
    tmp_path: Path,
    origin: Origin,
    daemon_processes: list[Any],
    names: tuple[str, str] = ("a", "b"),
    env: dict[str, str] | None = None,
    extra: str = "",
) -> tuple[Any, Any]:
    """Two daemons: the first with `env`, the second with the first as its static
    peer and `extra` in its config."""
    first = await start_daemon_process(tmp_path, origin.url, name=names[0], env=env)
    daemon_processes.append(first)
    port = first.url.rsplit(":", 1)[1]
    second = await start_daemon_process(
        tmp_path,
        origin.url,
        name=names[1],
        extra=f'{extra}[discovery]\nmdns = false\nstatic_peers = ["127.0.0.1:{port}"]\n',
    )
    daemon_processes.append(second)
    return first, second


async def test_second_host_takes_every_chunk_from_the_first(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 3 * MIB + 123)
    a, b = await _pair(tmp_path, origin, daemon_processes)
    a_port = a.url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as s:
        assert await _get(s, a.url + "/v1/images/img") == data
        origin_bytes = origin.stats.bytes_by_path["img"]
        peers = await wait_peers(s, b.url, 1)
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
        a_peers = await wait_peers(s, a.url, 1)
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
    bad, good = await _pair(
        tmp_path,
        origin,
        daemon_processes,
        ("bad", "good"),
        env={"SWARMCACHE_TEST_CORRUPT_PEER_CHUNKS": "1"},
    )
    async with aiohttp.ClientSession() as s:
        assert await _get(s, bad.url + "/v1/images/img") == data
        await wait_peers(s, good.url, 1)
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


async def _static_swarm(
    tmp_path: Path,
    origin: Origin,
    daemon_processes: list[Any],
    count: int,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """`count` daemons on loopback, each listing the others as static peers."""
    ports = [free_port() for _ in range(count)]
    daemons = []
    for n, port in enumerate(ports):
        others = ", ".join(f'"127.0.0.1:{p}"' for p in ports if p != port)
        d = await start_daemon_process(
            tmp_path,
            origin.url,
            name=f"h{n}",
            port=port,
            extra=f"[discovery]\nmdns = false\nstatic_peers = [{others}]\n",
            env=env,
        )
        daemons.append(d)
        daemon_processes.append(d)
    return daemons


async def test_three_hosts_starting_together_share_the_origin_reads(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 8 * MIB)
    daemons = await _static_swarm(tmp_path, origin, daemon_processes, 3)
    async with aiohttp.ClientSession() as s:
        for d in daemons:
            await wait_peers(s, d.url, 2)
        got = await asyncio.gather(*(_get(s, d.url + "/v1/images/img") for d in daemons))
        assert all(g == data for g in got)
        # each chunk came from the origin about once, not three times
        sent = origin.stats.bytes_by_path["img"]
        assert sent <= 1.05 * len(data), sent


async def _link(
    s: aiohttp.ClientSession, url: str, image_id: str
) -> tuple[aiohttp.ClientWebSocketResponse, State]:
    """Link to a daemon as peer "tester", subscribe to an image, answer with an empty
    State of our own; returns the socket and the daemon's State."""
    ws = await s.ws_connect(url + "/v1/peer/ws")
    await ws.send_bytes(encode(Hello("tester", "127.0.0.1", 9)))
    assert isinstance(decode((await ws.receive(timeout=10)).data), Hello)
    await ws.send_bytes(encode(Subscribe(image_id, True)))
    state = decode((await ws.receive(timeout=10)).data)
    assert isinstance(state, State)
    if state.manifest is not None:
        mine = state.manifest.restarted()
        await ws.send_bytes(encode(State(image_id, mine, bytes(len(state.have)), True)))
    return ws, state


async def _until(ws: aiohttp.ClientWebSocketResponse, what: type, seconds: float = 10) -> Any:
    """The next message of type `what` on the socket (others are skipped)."""
    async with asyncio.timeout(seconds):
        while True:
            msg = decode((await ws.receive()).data)
            if isinstance(msg, what):
                return msg


async def test_peer_api_serves_held_blocks_only_and_survives_garbage(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 1 * MIB)
    a = await start_daemon_process(tmp_path, origin.url, name="a")
    daemon_processes.append(a)
    block = 64 * 1024  # the test chunk size: each chunk is one block
    async with aiohttp.ClientSession() as s:
        async with s.get(a.url + "/v1/peer/images/img/blocks/0") as resp:
            assert resp.status == 404  # not held yet
        assert await _get(s, a.url + "/v1/images/img") == data
        async with s.get(a.url + "/v1/images/img/status?wait=30") as resp:
            assert (await resp.json())["state"] == "complete"
        async with s.get(a.url + "/v1/peer/images/img/blocks/3") as resp:
            assert resp.status == 503  # held, but we hold none of its upload slots
            assert float(resp.headers["Retry-After"]) > 0
        ws, state = await _link(s, a.url, "img")
        assert state.manifest is not None
        assert state.manifest.complete
        assert state.have == b"\xff" * 2
        slot = await _until(ws, Slot)
        assert slot == Slot("img", True)  # we lack what it holds: it gives us a slot
        node = {"X-Swarmcache-Node": "tester"}
        async with s.get(a.url + "/v1/peer/images/img/blocks/3", headers=node) as resp:
            assert resp.status == 200
            body = await resp.read()
            assert body == data[3 * block : 4 * block]
            assert resp.headers["X-Block-Digest"] == block_digest([body]).hex()
            assert state.manifest.block_digest(3) == block_digest([body])
        async with s.get(a.url + "/v1/peer/images/img/blocks/99", headers=node) as resp:
            assert resp.status == 404
        async with s.get(
            a.url + "/v1/peer/images/img/blocks/1", headers={**node, "If-Match": '"other"'}
        ) as resp:
            assert resp.status == 412
        async with s.get(a.url + "/v1/peer/images/img/blocks/x", headers=node) as resp:
            assert resp.status == 400
        await ws.close()
        # a peer speaking garbage, or skipping its hello, loses its socket, nothing more
        for frame in (b"\xc1\xc1", b"\x93\x01\x02\x03", encode(Subscribe("img", True))):
            async with s.ws_connect(a.url + "/v1/peer/ws") as bad:
                await bad.send_bytes(frame)
                msg = await bad.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        # a join that is not msgpack, or for another image, is a 400
        async with s.post(a.url + "/v1/peer/images/img/join", data=b"\xc1") as resp:
            assert resp.status == 400
        join = encode(Join("other", "tester", "127.0.0.1", 9, True))
        async with s.post(a.url + "/v1/peer/images/img/join", data=join) as resp:
            assert resp.status == 400
        async with s.get(a.url + "/healthz") as resp:
            assert resp.status == 200
        async with s.get(a.url + "/metrics") as resp:
            assert metric(await resp.text(), "swarmcache_peer_errors_total") == 3


async def test_a_block_is_served_before_its_chunk_is_complete(daemon: DaemonFactory) -> None:
    """Blocks of 16 KiB in chunks of 64 KiB: a daemon holding two blocks of a chunk
    that is not whole (a fetch under way elsewhere) serves them to a peer holding one
    of its upload slots, with the digest it announced; the chunk stays unreadable to
    clients, and a block it does not hold is a 404."""
    from swarmcache.api import STORE

    client = await daemon()
    store = client.app[STORE]
    image = store.make_entry(
        Manifest("img", size=4 * 64 * 1024, chunk_size=64 * 1024, block_size=16 * 1024)
    )
    store.add(image)
    blocks = [bytes([b]) * 16 * 1024 for b in range(2)]
    for b, data in enumerate(blocks):
        image.write_block(b, data, block_digest([data]))
    base = str(client.make_url(""))
    async with aiohttp.ClientSession() as s:
        ws, state = await _link(s, base, "img")
        assert state.manifest is not None
        assert state.have[0] == 0b11  # blocks 0 and 1 of 16
        assert await _until(ws, Slot) == Slot("img", True)
        node = {"X-Swarmcache-Node": "tester"}
        async with s.get(base + "/v1/peer/images/img/blocks/1", headers=node) as resp:
            assert resp.status == 200
            body = await resp.read()
            assert resp.headers["X-Block-Digest"] == block_digest([blocks[1]]).hex()
        assert body == blocks[1]
        assert state.manifest.block_digest(1) == block_digest([blocks[1]])
        async with s.get(base + "/v1/peer/images/img/blocks/2", headers=node) as resp:
            assert resp.status == 404
        assert not image.has(0)  # the chunk is not whole: clients cannot read it
        await ws.close()


@pytest.mark.parametrize(
    ("header", "wait"),
    [("0.25", 0.25), ("nan", None), ("inf", None), ("-5", 0.0), ("1e9", 60.0), ("soon", None)],
)
async def test_a_busy_peers_retry_after_is_bounded(
    aiohttp_server: Any, header: str, wait: float | None
) -> None:
    """A 503's Retry-After becomes PeerBusy.retry_after, within [0, 60] s; what is not
    a finite number counts as the exchange's usual wait (a NaN would leave the peer
    never asked again)."""
    from aiohttp import web

    from swarmcache.config import PeersConfig
    from swarmcache.exchange import ROTATE
    from swarmcache.manifest import Manifest
    from swarmcache.metrics import Metrics
    from swarmcache.peers.swarm import PeerBusy, Swarm

    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": header})

    app = web.Application()
    app.router.add_get("/v1/peer/images/{image_id}/blocks/{n}", busy)
    port = (await aiohttp_server(app)).port
    swarm = Swarm("a" * 16, ("127.0.0.1", 1), PeersConfig(timeout=10.0), 4, Metrics())
    manifest = Manifest("img", size=2 * MIB, chunk_size=MIB, block_size=MIB)
    async with swarm:
        swarm.seen("b" * 16, "127.0.0.1", port, "static")
        with pytest.raises(PeerBusy) as caught:
            await swarm.read_block("b" * 16, manifest, 0)
        assert caught.value.retry_after == (ROTATE if wait is None else wait)


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
    swarm = Swarm("a" * 16, ("127.0.0.1", 1), PeersConfig(timeout=600.0), 4, Metrics())
    manifest = Manifest("img", size=2 * MIB, chunk_size=MIB, block_size=MIB)
    try:
        async with swarm:
            swarm.seen("b" * 16, "127.0.0.1", port, "static")
            held = asyncio.create_task(swarm.read_block("b" * 16, manifest, 0))
            streamed = asyncio.create_task(swarm.read_block("b" * 16, manifest, 1))
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
                await swarm.read_block("b" * 16, manifest, 0)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("answer", ["rides along", "declines", "busy, then rides along"])
async def test_a_reader_that_dropped_the_image_stays_a_reader_and_is_joined_again(
    aiohttp_server: Any, answer: str
) -> None:
    """A reader that answers 404 for a block it announced (it evicted the image) is no
    source of it until it tells its state again, but stays one of the image's readers:
    which host happened to get the 404 differs from host to host, and hosts whose
    readers differ leave chunks to nobody. It is joined again, once (asked again while
    it answers 503), so that it rides along (reads its share). One that answers that
    join without the image (it will not read it now), or lacks what it announced again
    later than a read from before could answer, is no reader any more."""
    import random

    from aiohttp import web

    from swarmcache.config import PeersConfig
    from swarmcache.exchange import ActiveSet, Exchange, Geometry, OriginLane
    from swarmcache.metrics import Metrics
    from swarmcache.peers.swarm import Swarm, Trade
    from swarmcache.wire import Peers

    joins: list[Join] = []
    manifest = Manifest("img", size=4 * MIB, chunk_size=MIB, block_size=MIB)
    busy = [2 if answer.startswith("busy") else 0]

    async def join(request: web.Request) -> web.Response:
        msg = decode(await request.read())
        assert isinstance(msg, Join)
        joins.append(msg)
        if busy[0]:
            busy[0] -= 1
            return web.Response(status=503, headers={"Retry-After": "0.05"})
        reply = Peers(msg.image_id, None if answer == "declines" else manifest, ())
        return web.Response(body=encode(reply))

    app = web.Application()
    app.router.add_post("/v1/peer/images/{image_id}/join", join)
    port = (await aiohttp_server(app)).port
    me, b, c = "a" * 16, "b" * 16, "c" * 16
    exchange = Exchange(Geometry(manifest.size, MIB, MIB), [], random.Random(1))
    lane = OriginLane(exchange, me, "img", [b, c], 4, 30.0, now=0.0, gather=0.0)

    class Job:
        image_id = "img"

        def __init__(self) -> None:
            self.manifest = manifest
            self.exchange = exchange
            self.lane = lane

        def poke(self) -> None:
            pass

    now = [1000.0]
    config = PeersConfig(timeout=5.0)
    swarm = Swarm(me, ("127.0.0.1", 1), config, 4, Metrics(), clock=lambda: now[0])
    async with swarm:
        swarm.seen(b, "127.0.0.1", port, "static")
        swarm.seen(c, "127.0.0.1", 9, "static")
        trade = Trade("img", manifest, exchange, ActiveSet(12, random.Random(1)), job=Job())
        swarm.trades["img"] = trade
        trade.active.add(b)
        exchange.add_neighbour(b, bytes([0b1111]))
        readers = list(lane.readers)
        assert b in readers
        swarm.lacks("img", b)
        swarm.lacks("img", b)  # another read of it in flight answered 404 too
        assert lane.readers == readers  # the same readers as every other host's
        assert b not in trade.active.links
        assert b not in exchange.neighbours  # no source until it tells its state again
        async with asyncio.timeout(10):
            while not joins or trade.tasks:
                await asyncio.sleep(0.01)
        want = 3 if answer.startswith("busy") else 1
        assert [(j.image_id, j.node, j.fetching) for j in joins] == [("img", me, True)] * want
        if answer == "declines":
            assert b not in lane.readers  # it will not read its share: others do
            return
        assert lane.readers == readers
        # it links again and announces blocks; a 404 from a read sent before the
        # first one (within peers.timeout of it) is no news; a later one is
        trade.active.add(b)
        exchange.add_neighbour(b, bytes([0b1111]))
        swarm.lacks("img", b)
        assert lane.readers == readers
        now[0] += config.timeout + 1
        trade.active.add(b)
        exchange.add_neighbour(b, bytes([0b1111]))
        swarm.lacks("img", b)
        assert b not in lane.readers
        assert len(joins) == want

        # a reader that says it dropped the image (Status gone) is joined again too
        assert c in lane.readers
        trade.active.add(c)

        class Link:
            node_id = c

        swarm.on_message(Link(), Status("img", False, gone=True))  # type: ignore[arg-type]
        assert c not in trade.active.links
        assert c in trade.lacked  # a join of it is on its way (c answers nothing here)


async def test_hosts_starting_together_ask_the_origin_about_the_image_once(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """origin.concurrency = 1: one reader. Four hosts ask for the image at once; the
    reader asks the origin (one HEAD and one .sha256 GET), everyone else gets the
    manifest from the reader; the origin sends the image once."""
    data = images.add("img", 4 * MIB)
    env = {"SWARMCACHE_ORIGIN_CONCURRENCY": "1"}
    daemons = await _static_swarm(tmp_path, origin, daemon_processes, 4, env)
    async with aiohttp.ClientSession() as s:
        for d in daemons:
            await wait_peers(s, d.url, 3)
        got = await asyncio.gather(*(_get(s, d.url + "/v1/images/img") for d in daemons))
    assert all(g == data for g in got)
    sidecar = [r for r in origin.stats.requests if r[1] == "img.sha256"]
    assert len(sidecar) == 1, sidecar  # the reader's stat, nobody else's
    told = [(tmp_path / f"h{n}.log").read_text().count("manifest from peers") for n in range(4)]
    assert sorted(told) == [0, 1, 1, 1], told  # three joiners, one reader
    assert origin.stats.bytes_by_path["img"] == len(data)


@pytest.mark.parametrize(
    ("size", "limit", "whole"), [(40_000, 65_536, True), (70_000, 65_536, False)]
)
async def test_a_small_body_is_read_whole_when_it_comes_in_several_pieces(
    size: int, limit: int, whole: bool
) -> None:
    """A join's answer (a manifest with every block digest: 16 KiB for 256 MiB) comes
    in several TCP segments over a real link; one StreamReader.read() returns only the
    first, and the join failed as 'not valid msgpack' (seen in an 8-host fan-out)."""
    from aiohttp import web

    from swarmcache.httpfile import read_small

    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def dribble(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for at in range(0, len(body), 9000):  # pieces apart in time, as segments are
            await resp.write(body[at : at + 9000])
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", dribble)
    async with _loopback(app) as port:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as resp:
            got = await read_small(resp.content, limit)
        assert got == (body if whole else None)


@pytest.mark.parametrize("oversize", [False, True])
async def test_an_origin_sidecar_is_read_whole_and_bounded(oversize: bool) -> None:
    """The origin's .sha256 sidecar goes through the same bounded whole-body read as a
    join's answer: one that comes in pieces is read whole; one over 64 KiB is refused."""
    import hashlib

    from aiohttp import web

    from swarmcache.config import OriginConfig
    from swarmcache.errors import OriginInvalid
    from swarmcache.origin import MAX_SIDECAR_BYTES, make_origin

    data = b"image bytes" * 100
    line = f"{hashlib.sha256(data).hexdigest()}  img\n".encode()
    sidecar = line + (b"#" * MAX_SIDECAR_BYTES if oversize else b"")

    async def image(request: web.Request) -> web.StreamResponse:
        return web.Response(body=data)

    async def dribble(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for at in range(0, len(sidecar), 20):  # a few bytes at a time
            await resp.write(sidecar[at : at + 20])
            if at < 200:
                await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/img", image)
    app.router.add_get("/img.sha256", dribble)
    async with _loopback(app) as port:
        config = OriginConfig(url=f"http://127.0.0.1:{port}/{{image_id}}", retries=0)
        async with make_origin(config) as origin:
            if oversize:
                with pytest.raises(OriginInvalid, match="larger than"):
                    await origin.stat("img")
            else:
                assert (await origin.stat("img")).checksum == Checksum(
                    "sha256", hashlib.sha256(data).hexdigest()
                )


@contextlib.asynccontextmanager
async def _loopback(app: Any) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1 (an ephemeral port) while the block runs; its port."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_a_have_of_a_block_the_peer_holds_rides_along_with_the_next() -> None:
    """Haves the peer needs for its requests go out at once (after the batch wait);
    one of a block it holds already waits for them, or for LAZY_HAVE on its own."""
    from collections import Counter

    from swarmcache.exchange import LAZY_HAVE
    from swarmcache.peers.swarm import Link
    from swarmcache.wire import Have

    loop = asyncio.get_running_loop()
    sent: list[tuple[float, Any]] = []

    class _Ws:
        closed = False

        async def send_bytes(self, data: bytes) -> None:
            sent.append((loop.time(), decode(data)))

        async def close(self) -> None:
            self.closed = True

    class _Swarm:
        messages: Counter[tuple[str, str]] = Counter()

        def have_batch(self) -> float:
            return 0.01

    link = Link(_Swarm(), "n" * 16, _Ws())  # type: ignore[arg-type]
    link.start()
    d5, d6, d7 = (bytes([i]) * 16 for i in (5, 6, 7))
    try:
        t0 = loop.time()
        link.send_lazy(Have("img", ((5, d5),)))
        await asyncio.sleep(0.2)
        assert sent == []  # waits
        link.send(Have("img", ((6, d6),)))
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.01)
        (at, msg), *rest = sent
        assert rest == []
        assert msg == Have("img", ((6, d6), (5, d5)))  # one message, the news first
        assert at - t0 < LAZY_HAVE / 2
        sent.clear()
        t1 = loop.time()
        link.send_lazy(Have("img", ((7, d7),)))
        async with asyncio.timeout(LAZY_HAVE + 2):
            while not sent:
                await asyncio.sleep(0.02)
        ((at, msg),) = sent
        assert msg == Have("img", ((7, d7),))
        assert at - t1 >= LAZY_HAVE * 0.9
        assert _Swarm.messages["sent", "Have"] == 2
    finally:
        await link.close()


async def test_a_finished_fetch_keeps_trading_with_a_peer_whose_state_is_not_in_yet() -> None:
    """A fetch that ends (a seeder done before the host it rides along for) keeps the
    image's trade while a peer is linked for it, even one whose State has not arrived:
    ending it would unsubscribe that peer, which may have no other source. With no
    peer linked, the trade ends."""
    import random

    from swarmcache.config import PeersConfig
    from swarmcache.exchange import ActiveSet, Exchange, Geometry, OriginLane
    from swarmcache.metrics import Metrics
    from swarmcache.peers.swarm import Swarm, Trade

    me, b = "a" * 16, "b" * 16
    manifest = Manifest("img", size=4 * MIB, chunk_size=MIB, block_size=MIB)

    class Store:
        def get(self, image_id: str) -> object:
            return object()  # the image is held here

    class Job:
        image_id = "img"

        def __init__(self) -> None:
            self.manifest = manifest
            self.exchange = Exchange(Geometry(manifest.size, MIB, MIB), [], random.Random(1))
            self.lane = OriginLane(self.exchange, me, "img", [me], 4, 30.0, now=0.0, gather=0.0)

        def poke(self) -> None:
            pass

    swarm = Swarm(me, ("127.0.0.1", 1), PeersConfig(timeout=5.0), 4, Metrics())
    swarm.store = Store()
    async with swarm:
        for linked in (True, False):
            job = Job()
            trade = Trade("img", manifest, job.exchange, ActiveSet(12, random.Random(1)), job=job)
            swarm.trades["img"] = trade
            if linked:
                trade.active.add(b)  # subscribed; its State not in: no neighbour yet
                trade.waiting.add(b)
            assert not job.exchange.neighbours
            swarm.stop(job)
            assert trade.job is None
            assert ("img" in swarm.trades) is linked


async def test_an_image_a_peer_fetches_from_us_is_evicted_only_once_it_is_done(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """A holds img and B fetches it from A (slowly: A's upload_rate); meanwhile A
    fetches another image its cache has room for only without img (at full speed:
    B, a reader of it too, reads its share from the origin and sends it to A). A
    keeps img while B reads it (a 404 would send B to the origin and make it a
    reader of img again) and evicts it once B is done, without another fetch to set
    it off."""
    data = images.add("img", 3 * MIB)
    images.add("other", 3 * MIB)
    a, b = await _pair(
        tmp_path,
        origin,
        daemon_processes,
        env={"SWARMCACHE_CACHE_MAX_SIZE": "5MiB", "SWARMCACHE_LIMITS_UPLOAD_RATE": "512KiB"},
    )
    async with aiohttp.ClientSession() as s:
        assert await _get(s, a.url + "/v1/images/img") == data
        await wait_peers(s, b.url, 1)
        reading = asyncio.create_task(_get(s, b.url + "/v1/images/img"))
        for _ in range(100):  # until B has part of it
            async with s.get(b.url + "/v1/images/img/status") as resp:
                if resp.status == 200 and (await resp.json()).get("bytes", 0) > 0:
                    break
            await asyncio.sleep(0.05)
        async with s.post(a.url + "/v1/images/other/fetch?wait=30") as resp:
            assert resp.status == 200, await resp.text()
        async with s.get(a.url + "/v1/images/img/status") as resp:
            assert resp.status == 200  # still here: B is reading it
        assert not reading.done()  # (B needs 6 s at 512 KiB/s: the test's premise)
        assert sha256(await reading) == sha256(data)
        # B read none of img from the origin (A, fetching `other`, joined B at it: B
        # fetches `other` too, so B's totals by source are no measure here)
        assert origin.stats.bytes_by_path["img"] == len(data)  # sent once, to A
        for _ in range(100):  # B is done: A's cache goes back under max_size
            listing = (await (await s.get(a.url + "/v1/images")).json())["images"]
            if [i["id"] for i in listing] == ["other"]:
                break
            await asyncio.sleep(0.1)
        assert [(i["id"], i["state"]) for i in listing] == [("other", "complete")]
