"""A plain HTTP origin: serves a directory's files with Range support and counts bytes.

Used by the demo, the tests and the benchmarks as "the origin": GET/HEAD
/images/<name> with sendfile, one Range per request (206), 416 past the end. It
counts what it sends per path, and lists each request (range, client, time), at
GET /_stats. Fault switches for
tests (POST /_faults with JSON; each POST sets them all): `status` (answer every
image request with this status), `delay` (seconds before each answer), `truncate`
(close after this many bytes of a body), `hold_after` (let this many body bytes of
image GETs through, then hold the rest unanswered until a POST without it: a stalled
origin, so a test stops a fetch at a known chunk).

    python -m swarmtools.origin_server DIR [--listen 127.0.0.1:7481]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from swarmcache.errors import RangeNotSatisfiable
from swarmcache.httpfile import sendfile
from swarmcache.manifest import IMAGE_ID_RE
from swarmcache.ranges import parse_range


@dataclass
class OriginStats:
    """What the origin has sent."""

    bytes_by_path: Counter[str] = field(default_factory=Counter)
    # (method, path, Range header, status, client address, loop time)
    requests: list[tuple[str, str, str | None, int, str, float]] = field(default_factory=list)

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.bytes_by_path.clear()
        self.requests.clear()

    @property
    def total_bytes(self) -> int:
        """Body bytes sent for all paths."""
        return sum(self.bytes_by_path.values())

    def as_json(self) -> dict[str, Any]:
        """The /_stats answer."""
        return {
            "total_bytes": self.total_bytes,
            "bytes_by_path": dict(self.bytes_by_path),
            "requests": [list(r) for r in self.requests],
        }


class Gate:
    """Holds image GETs once a byte allowance has gone out, until opened: a stalled origin.

    Tests close it to stop a fetch at a known point: the first `allowance` body bytes
    go out, and every later image GET waits here, unanswered and not yet counted in
    OriginStats, until `open()`. Nothing passes a held request (first come, first
    held). Open at the start.
    """

    def __init__(self) -> None:
        self.allowance: int | None = None  # None: open
        self.passed = 0  # body bytes let through since close()
        self._held: list[asyncio.Future[bool]] = []

    @property
    def held(self) -> int:
        """Requests waiting at the gate now."""
        return len(self._held)

    def close(self, allowance: int) -> None:
        """Let `allowance` more body bytes through, then hold every image GET."""
        self.allowance = allowance
        self.passed = 0

    def open(self, *, refuse_held: bool = False) -> None:
        """Let image GETs through again. The held ones go on, or with `refuse_held` (their
        client is gone, e.g. a killed daemon) get a 503 that is not counted, so they
        cannot add to OriginStats after the test has read it."""
        self.allowance = None
        held, self._held = self._held, []
        for fut in held:
            if not fut.done():
                fut.set_result(not refuse_held)

    async def admit(self, nbytes: int) -> None:
        """Return once a body of `nbytes` may go out; HTTPServiceUnavailable if refused."""
        if self.allowance is None:
            return
        if not self._held and self.passed + nbytes <= self.allowance:
            self.passed += nbytes
            return
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._held.append(fut)
        try:
            go = await fut
        finally:
            if fut in self._held:  # cancelled while held
                self._held.remove(fut)
        if not go:
            raise web.HTTPServiceUnavailable(text="refused at the gate")


@dataclass
class Faults:
    """Test switches."""

    status: int | None = None
    delay: float = 0.0
    truncate: int | None = None
    gate: Gate = field(default_factory=Gate)


STATS = web.AppKey("stats", OriginStats)
FAULTS = web.AppKey("faults", Faults)
ROOT = web.AppKey("root", Path)


def make_origin_app(root: Path) -> web.Application:
    """The origin application serving `root`."""
    app = web.Application()
    app[ROOT] = Path(root)
    app[STATS] = OriginStats()
    app[FAULTS] = Faults()
    app.router.add_get("/images/{name}", _serve)
    app.on_response_prepare.append(_count)
    app.router.add_get("/_stats", _stats)
    app.router.add_post("/_stats/reset", _reset)
    app.router.add_post("/_faults", _faults)
    return app


async def _serve(request: web.Request) -> web.StreamResponse:
    faults = request.app[FAULTS]
    if faults.delay:
        await asyncio.sleep(faults.delay)
    name = request.match_info["name"]
    base = name.removesuffix(".sha256")
    if not IMAGE_ID_RE.fullmatch(base):
        raise web.HTTPNotFound()
    if faults.status is not None:
        return web.Response(status=faults.status, text="fault injected")
    path = request.app[ROOT] / name
    if not path.is_file():
        raise web.HTTPNotFound()
    if faults.truncate is not None and request.method == "GET" and name == base:
        return await _truncated(request, path, faults.truncate)
    return await _send(request, path, faults.gate if name == base else None)


async def _send(request: web.Request, path: Path, gate: Gate | None = None) -> web.StreamResponse:
    """200 or 206 (one range) with sendfile; 416 past the end. HEAD sends headers only.
    A GET's body waits for `gate`."""
    with open(path, "rb") as f:  # noqa: ASYNC230 - local file, closed on every path
        size = os.fstat(f.fileno()).st_size
        try:
            byte_range = parse_range(request.headers.get("Range"), size)
        except RangeNotSatisfiable:
            raise web.HTTPRequestRangeNotSatisfiable(
                headers={"Content-Range": f"bytes */{size}"}
            ) from None
        etag = f'"{os.fstat(f.fileno()).st_mtime_ns:x}-{size:x}"'
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match not in ("*", etag):
            raise web.HTTPPreconditionFailed()
        start, end = byte_range if byte_range is not None else (0, size - 1)
        if gate is not None and request.method == "GET":
            await gate.admit(end - start + 1 if size else 0)
        resp = web.StreamResponse(status=200 if byte_range is None else 206)
        resp.content_type = "application/octet-stream"
        resp.content_length = end - start + 1 if size else 0
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers["ETag"] = etag
        if byte_range is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        await resp.prepare(request)
        if request.method == "GET" and size:
            await sendfile(request, resp, f, start, end - start + 1)
        await resp.write_eof()
        return resp


async def _count(request: web.Request, resp: web.StreamResponse) -> None:
    """on_response_prepare: count the body bytes of every image GET."""
    name = request.match_info.get("name")
    if request.method != "GET" or name is None or resp.status >= 300:
        return
    stats = request.app[STATS]
    stats.bytes_by_path[name] += resp.content_length or 0
    stats.requests.append(
        (
            request.method,
            name,
            request.headers.get("Range"),
            resp.status,
            request.remote or "",
            round(asyncio.get_running_loop().time(), 3),
        )
    )


async def _truncated(request: web.Request, path: Path, limit: int) -> web.StreamResponse:
    """Promise the full body, send `limit` bytes, hang up (a dying origin)."""
    size = path.stat().st_size  # noqa: ASYNC240 - test fault path, small files
    resp = web.StreamResponse(status=200)
    resp.content_length = size
    await resp.prepare(request)
    with open(path, "rb") as f:  # noqa: ASYNC230
        await resp.write(f.read(min(limit, size)))
    assert request.transport is not None
    request.transport.close()
    return resp


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].as_json())


async def _reset(request: web.Request) -> web.Response:
    request.app[STATS].reset()
    return web.json_response({"reset": True})


async def _faults(request: web.Request) -> web.Response:
    body = await request.json()
    faults = request.app[FAULTS]
    faults.status = body.get("status")
    faults.delay = float(body.get("delay", 0))
    faults.truncate = body.get("truncate")
    hold_after = body.get("hold_after")
    if hold_after is None:
        faults.gate.open()
    else:
        faults.gate.close(int(hold_after))
    return web.json_response({"faults": body})


def main() -> None:
    """Serve a directory as an origin until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("root", type=Path, help="directory holding the image files")
    p.add_argument("--listen", default="127.0.0.1:7481", help="host:port (default %(default)s)")
    args = p.parse_args()
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.WARNING)
    web.run_app(make_origin_app(args.root), host=host, port=int(port), print=None, access_log=None)


if __name__ == "__main__":
    main()
