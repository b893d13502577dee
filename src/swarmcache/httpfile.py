"""Sending file ranges on an aiohttp response with sendfile (shared by the API and origin)."""

from __future__ import annotations

import asyncio
import os
from typing import IO

from aiohttp import web


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
