"""HTTP bodies without needless copies, shared by the API, the origin and peer reads:
file ranges go out with sendfile, and chunk bodies come in as the pieces the socket
gave (never joined: see manifest.Pieces)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import IO

import aiohttp
from aiohttp import web


async def read_pieces(
    stream: aiohttp.StreamReader, length: int, feed: Callable[[bytes], None] | None = None
) -> list[bytes]:
    """Exactly `length` bytes of `stream` in the pieces they arrived in; each is also
    passed to `feed` as it arrives. asyncio.IncompleteReadError if the body ends early."""
    pieces: list[bytes] = []
    have = 0
    while have < length:
        piece = await stream.read(length - have)
        if not piece:
            raise asyncio.IncompleteReadError(b"".join(pieces), length)
        pieces.append(piece)
        have += len(piece)
        if feed is not None:
            feed(piece)
    return pieces


async def sendfile(
    request: web.Request, resp: web.StreamResponse, f: IO[bytes], offset: int, count: int
) -> None:
    """Send `count` bytes of `f` from `offset` after `resp.prepare()`; zero-copy when possible."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    try:
        sent = await loop.sendfile(transport, f, offset, count)
        if sent != count:
            raise ConnectionResetError(f"sent {sent} of {count} bytes: the file is short")
    except NotImplementedError:  # e.g. TLS transports: fall back to reads
        done = 0
        while done < count:
            data = await asyncio.to_thread(
                os.pread, f.fileno(), min(1 << 20, count - done), offset + done
            )
            if not data:
                raise ConnectionResetError("file is shorter than promised") from None
            await resp.write(data)
            done += len(data)
