"""HTTP bodies without needless copies, shared by the API, the origin and peer reads:
file ranges go out with sendfile, and chunk bodies come in as the pieces the socket
gave (never joined: see manifest.Pieces)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import IO

import aiohttp
from aiohttp import web

from .tls import is_tls

RCVLOWAT = 256 * 1024  # bytes the kernel gathers before it wakes a body read


async def read_small(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """A whole (small) body, or None if it is longer than `limit` bytes. (One
    `stream.read(n)` returns what has arrived so far, not n bytes: a body of a few
    TCP segments would be cut short.)"""
    data = bytearray()
    while len(data) <= limit:
        piece = await stream.read(limit + 1 - len(data))
        if not piece:
            return bytes(data)
        data += piece
    return None


async def read_pieces(
    resp: aiohttp.ClientResponse,
    length: int,
    feed: Callable[[bytes], None] | None = None,
    then: int = 0,
    lowat: bool = True,
) -> list[bytes]:
    """Exactly `length` bytes of `resp`'s body in the pieces they arrived in; each is
    also passed to `feed` as it arrives. `then`: body bytes after these (the caller
    reads them). asyncio.IncompleteReadError if the body ends early.

    While the body comes, SO_RCVLOWAT asks the kernel to wake us only once 256 KiB
    (or the rest of the body) has arrived: one event-loop wake-up and one piece per
    256 KiB instead of one per TCP burst (at a few Mbit/s per stream, a few KiB).
    (`lowat=False`: plain wake-ups.)
    """
    stream = resp.content  # total_bytes counts body bytes as sent: no decompression here
    water = _LowWater(resp if lowat else None)
    body = length + then
    pieces: list[bytes] = []
    have = 0
    try:
        while have < length:
            water.set(body - stream.total_bytes)
            piece = await stream.read(length - have)
            if not piece:
                raise asyncio.IncompleteReadError(b"".join(pieces), length)
            pieces.append(piece)
            have += len(piece)
            if feed is not None:
                feed(piece)
    finally:
        water.set(1)
    return pieces


class _LowWater:
    """SO_RCVLOWAT of a response's connection, set only when it changes."""

    def __init__(self, resp: aiohttp.ClientResponse | None) -> None:
        conn = resp.connection if resp is not None else None
        transport = conn.transport if conn is not None else None
        # TLS: the socket holds records, a little more than the body's bytes; waiting
        # for the rest of the body there could wait for bytes that never come
        if transport is None or is_tls(transport):
            self.sock = None
        else:
            self.sock = transport.get_extra_info("socket")
        self.value = 1

    def set(self, wanted: int) -> None:
        value = max(1, min(RCVLOWAT, wanted))
        if self.sock is None or value == self.value:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        except OSError:
            self.sock = None  # not a socket that knows it: plain wake-ups
        else:
            self.value = value


async def sendfile(
    request: web.Request, resp: web.StreamResponse, f: IO[bytes], offset: int, count: int
) -> None:
    """Send `count` bytes of `f` from `offset` after `resp.prepare()`; zero-copy when possible.

    A TLS transport cannot take sendfile: the bytes are read (in a thread, 1 MiB at a
    time) and written. (asyncio's own fallback reads 16 KiB per thread hop: a 256 KiB
    block cost 16 of them, and a peer served blocks at a quarter of the plain rate.)"""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    if is_tls(transport):
        await _copy(resp, f, offset, count)
        return
    loop = asyncio.get_running_loop()
    try:
        sent = await loop.sendfile(transport, f, offset, count)
        if sent != count:
            raise ConnectionResetError(f"sent {sent} of {count} bytes: the file is short")
    except NotImplementedError:  # a transport without sendfile at all
        await _copy(resp, f, offset, count)


async def _copy(resp: web.StreamResponse, f: IO[bytes], offset: int, count: int) -> None:
    """Send `count` bytes of `f` from `offset` by reading and writing them."""
    done = 0
    while done < count:
        data = await asyncio.to_thread(
            os.pread, f.fileno(), min(1 << 20, count - done), offset + done
        )
        if not data:
            raise ConnectionResetError("file is shorter than promised")
        await resp.write(data)
        done += len(data)
