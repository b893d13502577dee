"""HTTP origin: `origin.url` with {image_id} filled in, read with Range requests.

One ClientSession (one connection pool) serves every fetch; several chunk reads are
in flight at once, so a cold fetch keeps the link as busy as a single stream would.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from types import TracebackType
from typing import TypeVar
from urllib.parse import quote

import aiohttp

from ..config import OriginConfig
from ..errors import OriginChanged, OriginError, OriginInvalid, OriginNotFound, OriginTimeout
from ..httpfile import read_pieces, read_small
from ..manifest import Checksum, validate_image_id
from .base import MAX_SIDECAR_BYTES, Origin, OriginImage, Sink, parse_sha256_sidecar

T = TypeVar("T")

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class HttpOrigin(Origin):
    """Reads images from a plain HTTP server that supports Range requests."""

    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpOrigin:
        cfg = self.config
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(8, cfg.concurrency * 2)),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout
            ),
            auto_decompress=False,
            # identity: compressed bytes would be stored as the image
            headers={"User-Agent": "swarmcache", "Accept-Encoding": "identity"},
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared connection pool (only inside `async with`)."""
        if self._session is None:
            raise RuntimeError("HttpOrigin used outside 'async with'")
        return self._session

    def describe(self, image_id: str) -> str:
        """The image's URL."""
        return self.config.url.replace("{image_id}", quote(validate_image_id(image_id), safe=""))

    async def _stat(self, image_id: str) -> OriginImage:
        url = self.describe(image_id)
        async with self._request("HEAD", url) as resp:
            if resp.status in (405, 501):  # no HEAD: ask for one byte instead
                size: int | None = None
                validator = ""
            else:
                self._check(resp, url, (200,))
                size = resp.content_length
                validator = _validator(resp)
        if size is None:
            async with self._request("GET", url, headers={"Range": "bytes=0-0"}) as resp:
                self._check(resp, url, (200, 206))
                if resp.status == 200:
                    raise OriginInvalid(
                        f"{url}: origin ignores Range requests; swarmcache needs them"
                    )
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or m.group(3) == "*":
                    raise OriginInvalid(f"{url}: no usable size in the origin's answer")
                size = int(m.group(3))
                validator = _validator(resp)
        sha256 = await self._sidecar(url) if self.config.checksum_sidecar else None
        checksum = Checksum("sha256", sha256) if sha256 is not None else None
        return OriginImage(size=size, validator=validator, checksum=checksum)

    async def _sidecar(self, url: str) -> str | None:
        sidecar = url + ".sha256"
        async with self._request("GET", sidecar) as resp:
            if resp.status == 404:
                return None
            self._check(resp, sidecar, (200,))
            body = await self._body(resp, sidecar, MAX_SIDECAR_BYTES, self.config)
        try:
            return parse_sha256_sidecar(body)
        except ValueError as err:
            raise OriginInvalid(f"checksum sidecar {sidecar} is unusable: {err}") from err

    async def _read(
        self,
        image_id: str,
        offset: int,
        length: int,
        validator: str,
        size: int | None,
        sink: Sink | None,
    ) -> list[bytes]:
        url = self.describe(image_id)
        end = offset + length - 1
        headers = {"Range": f"bytes={offset}-{end}"}
        # Bind every chunk to the version the fetch started with: a replaced image
        # answers 412 instead of mixing bytes of two versions.
        if validator.startswith('"'):
            headers["If-Match"] = validator
        elif validator and not validator.startswith("W/"):
            headers["If-Unmodified-Since"] = validator
        async with self._request("GET", url, headers=headers) as resp:
            if resp.status == 412:
                raise OriginChanged(f"{url}: the image changed at the origin during the fetch")
            if resp.status == 416:
                raise OriginChanged(f"{url}: the origin no longer has bytes {offset}-{end}")
            return await self._range_body(resp, url, offset, length, size, sink)

    async def _range_body(
        self,
        resp: aiohttp.ClientResponse,
        url: str,
        offset: int,
        length: int,
        size: int | None,
        sink: Sink | None,
    ) -> list[bytes]:
        """The body of an answer to a Range request for `length` bytes at `offset`, once
        its status and Content-Range say it is exactly those bytes of the same image."""
        end = offset + length - 1
        self._check(resp, url, (200, 206))
        if resp.status == 200:
            raise OriginInvalid(f"{url}: origin ignores Range requests; swarmcache needs them")
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset or int(m.group(2)) != end:
            raise OriginInvalid(
                f"{url}: origin answered a different range "
                f"({resp.headers.get('Content-Range')!r}) for {offset}-{end}"
            )
        if size is not None and m.group(3) not in ("*", str(size)):
            raise OriginChanged(
                f"{url}: the image is now {m.group(3)} bytes, not {size}: it changed"
            )
        return await self._pieces(resp, url, length, self.config, sink)

    @staticmethod
    async def _body(
        resp: aiohttp.ClientResponse, url: str, limit: int, config: OriginConfig
    ) -> bytes:
        """A body of at most `limit` bytes (a sidecar), as OriginErrors."""

        async def read() -> bytes:
            body = await read_small(resp.content, limit)
            if body is None:
                raise OriginInvalid(f"{url}: body larger than {limit} bytes")
            return body

        return await HttpOrigin._guard_body(read(), url, limit, config)

    @staticmethod
    async def _pieces(
        resp: aiohttp.ClientResponse,
        url: str,
        length: int,
        config: OriginConfig,
        sink: Sink | None,
    ) -> list[bytes]:
        """Exactly `length` bytes of body in the pieces they arrived in, each handed to
        `sink` as it arrives; as OriginErrors."""
        return await HttpOrigin._guard_body(
            # no SO_RCVLOWAT: aiohttp's read_timeout counts the silence between wake-ups,
            # and must see an origin that trickles (below min_rate) as trickling
            read_pieces(resp, length, sink.feed if sink is not None else None, lowat=False),
            url,
            length,
            config,
        )

    @staticmethod
    async def _guard_body(read: Awaitable[T], url: str, limit: int, config: OriginConfig) -> T:
        """Await a body read of up to `limit` bytes with a deadline, as OriginErrors.

        read_timeout catches an origin that goes silent; the deadline here catches one
        that trickles (slower on average than min_rate bytes/s). It starts once the
        answer's headers are in, so waiting for a pooled connection does not count.
        """
        budget = config.read_timeout + limit / config.min_rate
        try:
            async with asyncio.timeout(budget):
                return await HttpOrigin._converted(read, url, limit)
        except TimeoutError as err:
            if isinstance(err, OriginTimeout):
                raise
            raise OriginTimeout(
                f"{url}: {limit} bytes not read in {budget:.0f}s "
                f"(slower than origin.min_rate, {config.min_rate} bytes/s)"
            ) from None

    @staticmethod
    async def _converted(read: Awaitable[T], url: str, limit: int) -> T:
        try:
            return await read
        except asyncio.IncompleteReadError as err:
            raise OriginError(
                f"{url}: connection closed after {len(err.partial)} of {limit} bytes"
            ) from err
        except TimeoutError as err:  # before ClientError: ServerTimeoutError is both
            raise OriginTimeout(f"{url}: read timed out") from err
        except aiohttp.ClientError as err:
            raise OriginError(f"{url}: {err.__class__.__name__}: {err}") from err

    def _request(self, method: str, url: str, headers: dict[str, str] | None = None) -> _Guarded:
        return _Guarded(self.session, method, url, headers)

    @staticmethod
    def _check(resp: aiohttp.ClientResponse, url: str, ok: tuple[int, ...]) -> None:
        if resp.status in ok:
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding != "identity":
                raise OriginInvalid(f"{url}: origin sent {encoding}-encoded bytes")
            return
        if resp.status == 404:
            raise OriginNotFound(f"origin has no image at {url} (404)")
        retryable = resp.status >= 500 or resp.status in (408, 429)
        retry_after = resp.headers.get("Retry-After", "")
        raise OriginError(
            f"{url}: origin answered {resp.status} {resp.reason}",
            retryable=retryable,
            retry_after=float(retry_after) if retry_after.isdigit() else None,
        )


class _Guarded:
    """`async with` around a request that turns aiohttp/timeout errors into OriginError."""

    def __init__(
        self, session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str] | None
    ) -> None:
        self._cm = session.request(method, url, headers=headers, allow_redirects=True)
        self._url = url

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            return await self._cm.__aenter__()
        except TimeoutError as err:  # before ClientError: ServerTimeoutError is both
            raise OriginTimeout(f"{self._url}: origin did not answer in time") from err
        except aiohttp.TooManyRedirects as err:
            raise OriginInvalid(f"{self._url}: too many redirects") from err
        except aiohttp.ClientError as err:
            raise OriginError(f"{self._url}: {err.__class__.__name__}: {err}") from err

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._cm.__aexit__(et, e, tb)


def _validator(resp: aiohttp.ClientResponse) -> str:
    """What names this version: a strong ETag (for If-Match), else Last-Modified
    (for If-Unmodified-Since), else a weak ETag (compared only between fetches)."""
    etag = resp.headers.get("ETag", "")
    if etag.startswith('"'):
        return etag
    return resp.headers.get("Last-Modified") or etag
