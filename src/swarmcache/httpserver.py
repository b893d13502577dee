"""The HTTP server under both listeners: aiohttp's, with requests that fail in its own
parser answered like every other error and logged without flooding the log.

aiohttp answers a request it cannot parse (a header or request line over 8190
bytes, more than 128 headers, a NUL in the path, a malformed chunked body, an
unknown method) before any handler or middleware runs: with a plain-text 400 and
an ERROR line with a traceback per request, so any client could fill the log at
will. Here the answer is the JSON error shape (`{"error", "detail"}`), and the log
gets one short line per such request, at most BURST lines per WINDOW seconds, then
one line saying how many were left out.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

log = logging.getLogger(__name__)

BURST = 10  # lines about bad requests per WINDOW
WINDOW = 60.0


class LogLimit:
    """At most `burst` lines per `window` seconds; counts what it held back."""

    def __init__(self, burst: int = BURST, window: float = WINDOW) -> None:
        self.burst = burst
        self.window = window
        self._start = float("-inf")
        self._lines = 0
        self.dropped = 0

    def allow(self, now: float) -> bool:
        """May a line be written now? (`dropped` tells how many were not since.)"""
        if now - self._start >= self.window:
            self._start, self._lines = now, 0
        if self._lines < self.burst:
            self._lines += 1
            return True
        self.dropped += 1
        return False


LIMIT = LogLimit()


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler with its own errors in our JSON shape."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request aiohttp itself could not take (JSON, connection closed)."""
        detail = message or (str(exc) if exc is not None else "") or "cannot parse the request"
        if LIMIT.allow(time.monotonic()):
            dropped, LIMIT.dropped = LIMIT.dropped, 0
            more = f" ({dropped} more left out of the log before this)" if dropped else ""
            if status >= 500:
                log.error("request from %s failed: %r%s", request.remote, exc, more, exc_info=exc)
            else:
                log.info("bad request from %s: %d %s%s", request.remote, status, detail, more)
        if request.writer.output_size > 0:  # a response is under way: only a cut is left
            raise ConnectionError("cannot send an error after a response started")
        error = "internal error" if status >= 500 else "bad request"
        resp = web.json_response({"error": error, "detail": detail[:500]}, status=status)
        resp.force_close()
        return resp


class JsonErrorServer(Server):
    """aiohttp's Server making JsonErrorHandlers."""

    def __call__(self) -> RequestHandler:
        """A handler for one new connection."""
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """web.AppRunner whose server answers parser errors as JSON (see the module doc)."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # aiohttp builds the Server in Application._make_handler with no hook for its
        # class; the subclass changes only which handler a connection gets
        server.__class__ = JsonErrorServer
        return server
