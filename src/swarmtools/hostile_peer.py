"""A hostile peer for the fault-injection tests: its own small program, not a switch in
the product. It speaks enough of the peer protocol (hello, join, links, blocks; see
swarmcache.wire) to be taken for a daemon holding one image, and misbehaves:

  claim     announces every block, answers every block request 404
  stall     announces every block, accepts block requests and never answers
  wrong     announces the true digests, serves other bytes
  forged    serves other bytes and announces their digests (a manifest of its own
            making, with the origin's size, checksum and validator): the bytes match
            what it announced, and only a signed manifest or the whole-image check
            can tell
  garbage   says hello properly, then answers joins and links with malformed and
            oversized msgpack
  mute      says hello properly, then accepts joins, links and block requests and
            never answers any of them

    python -m swarmtools.hostile_peer MODE --listen HOST:PORT --image FILE --image-id ID
        --origin URL [--chunk-size 64KiB] [--block-size 64KiB] [--digest blake3]
        [--join HOST:PORT ...]

With --join it joins the image at those daemons every two seconds (as a host holding
it would), so they hand it out to the hosts that fetch it.

It needs no cluster secret: tests run the daemons without one (a peer holding the
secret and misbehaving is the case the daemons' own defences are for).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from swarmcache.config import parse_size
from swarmcache.manifest import Checksum, Manifest
from swarmcache.wire import PROTOCOL_VERSION, Hello, Join, Peers, Slot, State, Subscribe
from swarmcache.wire import decode as decode_message
from swarmcache.wire import encode as encode_message

log = logging.getLogger("hostile_peer")
MODES = ("claim", "stall", "wrong", "forged", "garbage", "mute")
MUTE = 3600.0  # seconds a mute peer keeps a request waiting
NODE = "bad0" + secrets.token_hex(6)


def digest_all(m: Manifest, data: bytes) -> Manifest:
    """Fill in every chunk and block digest of `m` from the image's bytes; `m`."""
    for index in range(m.chunks):
        offset, length = m.span(index)
        digest, blocks = m.hash_chunk([data[offset : offset + length]])
        m.set_digest(index, digest)
        for b, d in zip(m.blocks_of(index), blocks, strict=True):
            m.set_block_digest(b, d)
    return m


def _flip(data: bytes) -> bytes:
    """Other bytes of the same length."""
    return bytes(b ^ 0x5A for b in data)


class Hostile:
    """The peer's state: the true image, what it pretends, what it was asked."""

    def __init__(self, mode: str, data: bytes, manifest: Manifest, port: int) -> None:
        self.mode = mode
        self.data = data
        self.true = manifest
        self.port = port
        self.shown = self._shown()
        self.block_requests = 0

    def _shown(self) -> Manifest:
        """The manifest it announces: the true one, or (forged) one of its own bytes."""
        m = Manifest.decode(self.true.encode())
        if self.mode == "forged":
            digest_all(m, _flip(self.data))
        m.complete = True
        return m

    def served(self, block: int) -> bytes:
        offset, length = self.true.block_span(block)
        return _flip(self.data[offset : offset + length])

    def have(self) -> bytes:
        return b"\xff" * ((self.true.blocks + 7) // 8)


async def hello(request: web.Request) -> web.Response:
    h: Hostile = request.app["hostile"]
    return web.json_response(
        {
            "node": NODE,
            "version": PROTOCOL_VERSION,
            "port": h.port,
            "generation": 1,
            "role": "host",
            "images": 1,
            "chunks": h.true.chunks,
        }
    )


async def join(request: web.Request) -> web.Response:
    h: Hostile = request.app["hostile"]
    msg = decode_message(await request.read())
    assert isinstance(msg, Join)
    if h.mode == "mute":
        await asyncio.sleep(MUTE)
    if h.mode == "garbage":
        return web.Response(body=b"\xc1" + os.urandom(2048))
    return web.Response(body=encode_message(Peers(msg.image_id, h.shown, ())))


async def link(request: web.Request) -> web.WebSocketResponse:
    h: Hostile = request.app["hostile"]
    if h.mode == "mute":  # the upgrade is never answered
        await asyncio.sleep(MUTE)
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    async for frame in ws:
        if frame.type != aiohttp.WSMsgType.BINARY:
            continue
        if h.mode == "garbage":
            await ws.send_bytes(b"\xc1\xc1\xc1")  # not msgpack
            await ws.send_bytes(b"\x92" + os.urandom(64))  # msgpack of the wrong shape
            await ws.send_bytes(os.urandom(5 * 1024 * 1024))  # bigger than any message
            continue
        try:
            msg = decode_message(frame.data)
        except Exception:
            continue
        if isinstance(msg, Hello):
            await ws.send_bytes(encode_message(Hello(NODE, "", h.port)))
        elif isinstance(msg, Subscribe):
            await ws.send_bytes(encode_message(State(msg.image_id, h.shown, h.have(), False)))
            await ws.send_bytes(encode_message(Slot(msg.image_id, True)))
    return ws


async def block(request: web.Request) -> web.StreamResponse:
    h: Hostile = request.app["hostile"]
    h.block_requests += 1
    index = int(request.match_info["block"])
    if h.mode in ("claim", "garbage"):
        return web.Response(status=404)
    if h.mode in ("stall", "mute"):
        await asyncio.sleep(MUTE)
    body = h.served(index)
    digest = h.shown.block_digest(index) or b""
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={"X-Block-Digest": digest.hex()},
    )


async def stats(request: web.Request) -> web.Response:
    h: Hostile = request.app["hostile"]
    return web.json_response({"block_requests": h.block_requests, "mode": h.mode})


async def true_manifest(
    origin: str, image_id: str, data: bytes, chunk: int, block: int, digest: str
) -> Manifest:
    """The manifest an honest host would make: the origin's validator and checksum."""
    url = origin.replace("{image_id}", image_id)
    async with aiohttp.ClientSession() as s:
        async with s.head(url) as resp:
            validator = resp.headers.get("ETag", "")
        async with s.get(url + ".sha256") as resp:
            sidecar = (await resp.text()).split()[0] if resp.status == 200 else ""
    if sidecar and sidecar != hashlib.sha256(data).hexdigest():
        raise SystemExit("the image file is not the origin's")
    m = Manifest(
        image_id,
        size=len(data),
        chunk_size=chunk,
        origin_hash=Checksum("sha256", sidecar) if sidecar else None,
        origin_validator=validator,
        block_size=block,
        digest_algo=digest,
    )
    return digest_all(m, data)


async def join_loop(h: Hostile, daemons: list[str], host: str) -> None:
    """Tell `daemons` we hold the image, again and again."""
    body = encode_message(Join(h.true.image_id, NODE, host, h.port, False))
    async with aiohttp.ClientSession() as s:
        for _ in range(1800):  # an hour at most
            for daemon in daemons:
                url = f"http://{daemon}/v1/peer/images/{h.true.image_id}/join"
                try:
                    async with s.post(url, data=body) as resp:
                        await resp.read()
                except aiohttp.ClientError:
                    pass
            await asyncio.sleep(2.0)


def make_app(h: Hostile, join_at: list[str] | None = None, host: str = "") -> web.Application:
    app = web.Application()
    app["hostile"] = h

    async def joining(app: web.Application) -> Any:
        task = asyncio.create_task(join_loop(h, join_at or [], host))
        yield
        task.cancel()

    if join_at:
        app.cleanup_ctx.append(joining)
    app.router.add_get("/v1/peer/hello", hello)
    app.router.add_get("/v1/peer/ws", link)
    app.router.add_post("/v1/peer/images/{image_id}/join", join)
    app.router.add_get("/v1/peer/images/{image_id}/blocks/{block}", block)
    app.router.add_get("/_hostile", stats)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("mode", choices=MODES)
    p.add_argument("--listen", required=True, help="host:port")
    p.add_argument("--image", required=True, type=Path, help="the true image file")
    p.add_argument("--image-id", required=True)
    p.add_argument("--origin", required=True, help="origin.url template of the daemons")
    p.add_argument("--chunk-size", default="64KiB")
    p.add_argument("--block-size", default="64KiB")
    p.add_argument("--digest", default="blake3")
    p.add_argument("--join", nargs="*", default=[], help="daemons to join the image at")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    host, _, port = args.listen.rpartition(":")
    data = args.image.read_bytes()
    manifest = asyncio.run(
        true_manifest(
            args.origin,
            args.image_id,
            data,
            parse_size(args.chunk_size),
            parse_size(args.block_size),
            args.digest,
        )
    )
    hostile = Hostile(args.mode, data, manifest, int(port))
    web.run_app(
        make_app(hostile, args.join, host), host=host, port=int(port), print=None, access_log=None
    )


if __name__ == "__main__":
    main()
