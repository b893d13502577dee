"""Block reads from peers: plain keep-alive HTTP/1.1 GETs, the body received straight
into the block's own buffer.

A host lands hundreds of blocks a second and asks each of a neighbour with one GET
(`GET /v1/peer/images/{id}/blocks/{n}`, served with sendfile by peer_api.py). Through
aiohttp's client each cost more CPU than the bytes: building the request (URL, header
multidicts, tracing, timers), parsing the response in pieces and copying them through a
stream reader. Measured with py-spy on a daemon receiving 512 MiB from one peer over
loopback, half of its event loop's busy time went there; and with 32 daemons sharing 2
cores the CPU is what bounds a boot storm. This client does only what the block
protocol needs, for servers that are our own daemons (and must survive ones that are
not: every size is bounded, anything unexpected ends the connection):

- one request at a time per connection, connections kept per peer and reused;
- the response head (status line and headers, at most MAX_HEAD bytes) is parsed by hand;
- a 200 body must be exactly the block's length (Content-Length; no chunked encoding)
  and is received with `recv_into` into one bytearray: no copies, no pieces, one
  event-loop wake-up per block (SO_RCVLOWAT, see httpfile.RCVLOWAT);
- any other status ends the connection after its head, unless its body is empty (a 503
  refusal, which names Retry-After: with 32 daemons at 50 Mbit/s a host was refused
  about 100 of its 350 requests, each then cost a new connection);
- a connection the peer closed while idle is noticed (it is dropped from the pool), and
  a request on one it closed at that very moment is sent again once on a fresh one;
- bodies are received into buffers kept for reuse (buffers.SHARED): the caller
  hands a body back with `recycle` once it is written; a new 256 KiB bytearray per
  block is zero-filled and faults in 64 fresh pages.

Cancelling a read (its timeout, the peer gone) closes its connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Mapping

from .. import buffers
from ..buffers import BufferPool
from ..httpfile import RCVLOWAT
from ..tls import is_tls

MAX_HEAD = 16 * 1024  # bytes of status line and headers a peer may send
IDLE_KEEP = 15.0  # seconds an idle connection is kept for the next request
IDLE_PER_PEER = 8  # idle connections kept per peer


class BlockResponse:
    """A response: status, headers (names lower-case) and, for a 200, the body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytearray) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class ProtocolError(ConnectionError):
    """The peer's response is not one this client accepts."""


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection: a request, then its response, then the next."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self._head = bytearray(MAX_HEAD)
        self._head_len = 0
        self._view = memoryview(bytearray())  # the body's buffer (a 200's, in flight)
        self._got = 0
        self._length = 0  # the body length a 200 must have
        self._response: BlockResponse | None = None
        self._waiter: asyncio.Future[BlockResponse] | None = None
        self._lowat = 1
        self.received = 0  # bytes of the current response so far

    # -- asyncio.BufferedProtocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._response is not None:  # the body: straight into the block's buffer
            return self._view[self._got :]
        if self._head_len >= MAX_HEAD:  # cannot happen: buffer_updated fails first
            return memoryview(bytearray(1))
        return memoryview(self._head)[self._head_len :]

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self._waiter is None or self._waiter.done():
            self._fail(ProtocolError("the peer sent bytes nobody asked for"))
            return
        if self._response is not None:
            self._got += nbytes
            if self._got == self._length:
                self._finish()
            else:  # never more than what is still to come: it would never wake us
                self._set_lowat(min(RCVLOWAT, self._length - self._got))
            return
        self._head_len += nbytes
        end = self._head.find(b"\r\n\r\n", 0, self._head_len)
        if end < 0:
            if self._head_len >= MAX_HEAD:
                self._fail(ProtocolError(f"response head over {MAX_HEAD} bytes"))
            return
        try:
            response = self._parse(bytes(self._head[:end]))
        except ProtocolError as err:
            self._fail(err)
            return
        extra = self._head_len - (end + 4)
        if response.status != 200:
            # a final answer with an empty body (a 503 refusal) leaves the connection as
            # it was; any other body is not read (nor a 1xx's answer that would follow):
            # the connection ends with it
            if (
                extra
                or response.status < 200
                or "transfer-encoding" in response.headers
                or response.headers.get("content-length") != "0"
            ):
                self.closed = True
            self._response = response
            self._finish()
            return
        if extra > self._length:
            self._fail(ProtocolError("the peer sent more than the block"))
            return
        response.body = self.pool.take(self._length)
        self._view = memoryview(response.body)
        self._view[:extra] = self._head[end + 4 : self._head_len]
        self._got = extra
        self._response = response
        if self._got == self._length:
            self._finish()
        else:
            self._set_lowat(min(RCVLOWAT, self._length - self._got))

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("the peer closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection lost"))

    # -- requests --------------------------------------------------------------------

    async def request(self, head: bytes, length: int) -> BlockResponse:
        """Send a request head; the response (a 200's body must be `length` bytes)."""
        assert self.transport is not None
        assert self._waiter is None, "one request at a time"
        self._head_len = self._got = self.received = 0
        self._length = length
        self._response = None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head)
        try:
            return await self._waiter
        finally:
            self._waiter = None
            self._view = memoryview(bytearray())  # the caller has the body: let it go
            self.idle_since = time.monotonic()

    def reusable(self, now: float) -> bool:
        """Open, and idle for less than IDLE_KEEP: fit for the next request."""
        return not self.closed and now - self.idle_since < IDLE_KEEP

    def close(self) -> None:
        """End the connection (at once: nothing is flushed)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _parse(self, head: bytes) -> BlockResponse:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if parts[0] == b"HTTP/1.0" or headers.get("connection", "").lower() == "close":
            self.closed = True  # served, then not reused
        if status == 200:
            if "transfer-encoding" in headers:
                raise ProtocolError("a block must come with a Content-Length")
            if headers.get("content-length") != str(self._length):
                raise ProtocolError(
                    f"block of {headers.get('content-length')} bytes, want {self._length}"
                )
        return BlockResponse(status, headers, bytearray())

    def _finish(self) -> None:
        self._set_lowat(1)
        if self._waiter is not None and not self._waiter.done():
            assert self._response is not None
            self._waiter.set_result(self._response)
        self._response = None

    def _fail(self, err: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(err)
        if not self.closed:
            self.close()

    def _set_lowat(self, value: int) -> None:
        """Wake us once `value` bytes are in (one wake-up per block, not per burst)."""
        if value == self._lowat or self.transport is None or is_tls(self.transport):
            return  # TLS: the socket holds records, whose bytes are not the body's
        sock = self.transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        except (OSError, AttributeError):
            return
        self._lowat = value


class BlockClient:
    """Keep-alive connections to peers, for block GETs."""

    def __init__(self, connect_timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.tls = tls  # mutual TLS (tls.py): every connection is a TLS one
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self.connections = 0  # opened so far (for tests and metrics)
        self.pool = buffers.SHARED

    async def get(
        self, host: str, port: int, path: str, headers: Mapping[str, str], length: int
    ) -> BlockResponse:
        """GET `path` from host:port. A 200's body must be `length` bytes (else
        ProtocolError). OSError (ConnectionError) on any failure of the connection."""
        lines = [f"GET {path} HTTP/1.1", f"Host: {_authority(host, port)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:  # a peer names its own host (Hello): it may be any string
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        except UnicodeError:
            raise ProtocolError(f"cannot ask {host!r}: not an ASCII host name") from None
        if any(c in host for c in "\r\n\0 "):
            raise ProtocolError(f"cannot ask {host!r}: not a host name")
        conn = self._take(host, port)
        if conn is not None:
            try:
                return await self._use(host, port, conn, head, length)
            except ConnectionResetError:
                if conn.received:
                    raise
                # the peer closed it as we sent: once more on a fresh connection
        conn = await self._connect(host, port)
        return await self._use(host, port, conn, head, length)

    async def _use(
        self, host: str, port: int, conn: _Connection, head: bytes, length: int
    ) -> BlockResponse:
        self._busy.add(conn)
        try:
            response = await conn.request(head, length)
        except BaseException:
            conn.close()
            raise
        finally:
            self._busy.discard(conn)
        if conn.closed:
            conn.close()
        else:
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < IDLE_PER_PEER:
                idle.append(conn)
            else:
                conn.close()
        return response

    def _take(self, host: str, port: int) -> _Connection | None:
        idle = self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.reusable(now):
                return conn
            conn.close()
        return None

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.pool), host, port, ssl=self.tls
                )
        except ValueError as err:  # e.g. a label too long for IDNA: not an OSError
            raise ProtocolError(f"cannot connect to {host!r}: {err}") from None
        self.connections += 1
        return conn

    def recycle(self, body: bytearray) -> None:
        """A 200's body is written and nobody holds it any more: reuse its buffer."""
        self.pool.give(body)

    def forget(self, host: str, port: int) -> None:
        """Close the idle connections to a peer (it is gone)."""
        for conn in self._idle.pop((host, port), []):
            conn.close()

    def sweep(self) -> None:
        """Close the connections idle for more than IDLE_KEEP (a peer never asked
        again would otherwise keep them open as long as it likes)."""
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if c.reusable(now)]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def idle(self) -> int:
        """Idle connections kept."""
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        """Close every connection."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
