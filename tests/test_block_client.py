"""The block client (peers/blocks.py) against a real aiohttp server on loopback, and
against raw servers that misbehave."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from swarmcache import buffers
from swarmcache.buffers import BufferPool
from swarmcache.peers import blocks
from swarmcache.peers.blocks import MAX_HEAD, BlockClient, ProtocolError

BLOCK = 256 * 1024
DATA = os.urandom(3 * BLOCK)


@pytest.fixture
async def server(aiohttp_server: Any) -> tuple[int, list[str]]:
    """An aiohttp server like the peer API: blocks with Content-Length, a 503 with
    Retry-After, a 404. Records each request's client port (one per connection)."""
    ports: list[str] = []

    async def block(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ports.append(str(peer[1]) if peer else "?")
        index = int(request.match_info["n"])
        if index == 7:
            return web.Response(status=503, headers={"Retry-After": "0.250"})
        if index == 8:
            return web.json_response({"error": "not held"}, status=404)
        if request.headers.get("X-Test") != "yes":
            return web.Response(status=400)
        resp = web.StreamResponse()
        resp.content_length = BLOCK
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        await resp.write(DATA[index * BLOCK : (index + 1) * BLOCK])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/blocks/{n}", block)
    running = await aiohttp_server(app)
    return running.port, ports


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockClient]:
    """A block client (with a pool of its own), closed after the test."""
    monkeypatch.setattr(buffers, "SHARED", BufferPool(16 * BLOCK))
    c = BlockClient(connect_timeout=5)
    yield c
    c.close()


async def test_blocks_arrive_whole_over_one_reused_connection(
    server: tuple[int, list[str]],
    client: BlockClient,
) -> None:
    port, ports = server
    for i in (0, 1, 2, 1):
        resp = await client.get("127.0.0.1", port, f"/blocks/{i}", {"X-Test": "yes"}, BLOCK)
        assert resp.status == 200
        assert bytes(resp.body) == DATA[i * BLOCK : (i + 1) * BLOCK]
    assert client.connections == 1
    assert len(set(ports)) == 1  # the server saw one connection too
    # concurrent reads each take a connection of their own
    got = await asyncio.gather(
        *(
            client.get("127.0.0.1", port, f"/blocks/{i}", {"X-Test": "yes"}, BLOCK)
            for i in (0, 1, 2)
        )
    )
    assert b"".join(bytes(r.body) for r in got) == DATA
    assert client.connections == 3


async def test_a_refusal_keeps_its_connection_other_statuses_end_theirs(
    server: tuple[int, list[str]],
    client: BlockClient,
) -> None:
    port, ports = server
    busy = await client.get("127.0.0.1", port, "/blocks/7", {}, BLOCK)
    assert busy.status == 503
    assert busy.headers["retry-after"] == "0.250"
    ok = await client.get("127.0.0.1", port, "/blocks/0", {"X-Test": "yes"}, BLOCK)
    assert bytes(ok.body) == DATA[:BLOCK]
    assert client.connections == 1  # a 503 has no body: its connection is used again
    assert len(set(ports)) == 1
    missing = await client.get("127.0.0.1", port, "/blocks/8", {}, BLOCK)
    assert missing.status == 404
    ok = await client.get("127.0.0.1", port, "/blocks/1", {"X-Test": "yes"}, BLOCK)
    assert bytes(ok.body) == DATA[BLOCK : 2 * BLOCK]
    assert client.connections == 2  # a 404's body is not read: no reuse
    assert len(set(ports)) == 2


async def test_a_block_of_the_wrong_length_is_refused(
    server: tuple[int, list[str]],
    client: BlockClient,
) -> None:
    port, _ = server
    with pytest.raises(ProtocolError, match="want 1000"):
        await client.get("127.0.0.1", port, "/blocks/0", {"X-Test": "yes"}, 1000)
    # the next read does not see that body's bytes: a fresh connection
    ok = await client.get("127.0.0.1", port, "/blocks/1", {"X-Test": "yes"}, BLOCK)
    assert bytes(ok.body) == DATA[BLOCK : 2 * BLOCK]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _Raw:
    """A raw TCP server running `handler` per connection; `close` waits for them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> _Raw:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # type: ignore[arg-type]
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: what some tests want
        finally:
            writer.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:  # e.g. waiting for a client that keeps its connection
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def _answer(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, raw: bytes) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(raw)
    await writer.drain()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", "connection"),  # cut short
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "Content-Length"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD, "head over"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789EXTRA", "more than"),
    ],
)
async def test_a_hostile_server_gets_a_clear_error_not_a_hang(
    raw: bytes,
    error: str,
    client: BlockClient,
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answer(writer, reader, raw)
        if error != "connection":  # else: cut short, the connection ends here
            await reader.read()  # until the client hangs up

    async with _Raw(serve) as server, asyncio.timeout(5):
        with pytest.raises(ConnectionError, match=error):
            await client.get("127.0.0.1", server.port, "/b", {}, 10)


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(
    client: BlockClient,
) -> None:
    """The first connection is closed by the server right after its answer (as an
    idle keep-alive timeout would); the next read opens a fresh one and succeeds."""
    served = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        await _answer(writer, reader, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")

    async with _Raw(serve) as server:
        for _ in range(3):
            resp = await client.get("127.0.0.1", server.port, "/b", {}, 3)
            assert bytes(resp.body) == b"abc"
            await asyncio.sleep(0.05)  # the close arrives while the connection idles
        assert served == 3
        assert client.connections == 3


async def test_a_cancelled_read_closes_its_connection(
    client: BlockClient,
) -> None:
    """A read cut off by its deadline mid-body leaves nothing half-read in the pool."""
    conns = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        first = conns == 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await writer.drain()
        if first:
            await reader.read()  # stalls after half the body, until the client hangs up
            return
        writer.write(b"cd")
        await writer.drain()
        await reader.read()  # until the client closes

    async with _Raw(serve) as server:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.get("127.0.0.1", server.port, "/b", {}, 4)
        resp = await client.get("127.0.0.1", server.port, "/b", {}, 4)
        assert bytes(resp.body) == b"abcd"
        assert client.connections == 2


@pytest.mark.parametrize("host", ["ħost", "a\x00b", "a" * 70 + ".example", "evil\r\nX-Injected: 1"])
async def test_a_peer_that_names_a_bad_host_gets_a_connection_error(
    host: str,
    client: BlockClient,
) -> None:
    """A peer names its own host in its Hello: whatever it says, asking it fails as
    a ConnectionError (a PeerError to the fetch), never with another exception that
    would leave its block in flight for ever, and never as a header of ours."""
    with pytest.raises(ConnectionError):
        await client.get(host, 1, "/b", {}, 10)


async def test_idle_connections_are_swept_and_forgotten(
    server: tuple[int, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    client: BlockClient,
) -> None:
    port, _ = server
    await client.get("127.0.0.1", port, "/blocks/0", {"X-Test": "yes"}, BLOCK)
    assert client.idle() == 1
    client.sweep()
    assert client.idle() == 1  # idle for less than IDLE_KEEP: kept
    monkeypatch.setattr(blocks, "IDLE_KEEP", 0.0)
    client.sweep()
    assert client.idle() == 0  # closed
    monkeypatch.undo()
    await client.get("127.0.0.1", port, "/blocks/1", {"X-Test": "yes"}, BLOCK)
    assert client.idle() == 1
    client.forget("127.0.0.1", port)  # the peer is gone
    assert client.idle() == 0
    assert client.connections == 2


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 200 OK\r\n"])
async def test_a_kept_connection_closed_as_we_ask_is_asked_again_once(
    partial: bytes,
    client: BlockClient,
) -> None:
    """The peer closes a kept connection as our request arrives: with nothing of an
    answer received, the request goes once more on a fresh connection; once part of
    an answer came, it fails (the peer did answer, then broke off)."""
    conns = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        await _answer(writer, reader, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        await reader.readuntil(b"\r\n\r\n")  # the second request on this connection
        writer.write(partial)
        await writer.drain()  # ... and the connection ends here

    async with _Raw(serve) as server:
        first = await client.get("127.0.0.1", server.port, "/b", {}, 3)
        assert bytes(first.body) == b"abc"
        if partial:
            with pytest.raises(ConnectionError):
                await client.get("127.0.0.1", server.port, "/b", {}, 3)
            assert client.connections == 1
        else:
            again = await client.get("127.0.0.1", server.port, "/b", {}, 3)
            assert bytes(again.body) == b"abc"
            assert client.connections == 2
            assert conns == 2


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nRetry-After: 0.1\r\n\r\n", True),
        (b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n", False),  # not final
        (b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 3\r\n\r\nbye", False),
    ],
)
async def test_only_a_final_empty_answer_keeps_its_connection(
    raw: bytes, kept: bool, client: BlockClient
) -> None:
    """Whatever a peer sends after a response head we do not read must not be taken
    for the next response: only a final status with an empty, unchunked body (a 503
    refusal) leaves its connection in the pool."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answer(writer, reader, raw)
        await reader.read()  # until the client hangs up

    async with _Raw(serve) as srv:
        resp = await client.get("127.0.0.1", srv.port, "/blocks/0", {}, BLOCK)
        assert resp.status == int(raw.split(b" ")[1])
        assert client.idle() == (1 if kept else 0)


async def test_recycled_bodies_are_reused_and_fully_overwritten(
    server: tuple[int, list[str]],
    client: BlockClient,
) -> None:
    port, _ = server
    first = await client.get("127.0.0.1", port, "/blocks/0", {"X-Test": "yes"}, BLOCK)
    buffer = first.body
    client.recycle(buffer)
    assert client.pool.held == BLOCK
    second = await client.get("127.0.0.1", port, "/blocks/2", {"X-Test": "yes"}, BLOCK)
    assert second.body is buffer  # the same memory, holding the new block's bytes only
    assert bytes(second.body) == DATA[2 * BLOCK :]
    assert client.pool.held == 0
    # a body not handed back is never given out again
    third = await client.get("127.0.0.1", port, "/blocks/1", {"X-Test": "yes"}, BLOCK)
    assert third.body is not buffer
    assert bytes(second.body) == DATA[2 * BLOCK :]
