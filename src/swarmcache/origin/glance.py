"""Glance origin: images from an OpenStack Image service (Glance v2 API).

`stat` is `GET /v2/images/{id}`: only an `active` image is fetched (any other status
is a 409 naming it); its size, and the checksum the whole image must match before it
is complete: `os_hash_algo` + `os_hash_value` (sha512 by default in Glance), else
the md5 `checksum`. The hash is computed as chunks land in order (fetch/landing.py),
so the check ends with the transfer. `read` is `GET /v2/images/{id}/file` with one
Range (Glance answers 206 with Content-Range and refuses several ranges with 400).

Image data in Glance never changes once the image is active (a new upload is a new
image id), so the version validator is the image's hash: the cache key is the id
with its hash and size, and a Glance that somehow answers with other bytes fails
the whole-image check and is discarded.

Authentication, from files only (never the TOML, never a log line): `token_file` (a
token another tool keeps fresh; re-read when the file changes), or Keystone v3
through keystoneauth1 (password or application credential), whose plugin renews
the token shortly before it expires; a 401 renews it once more and retries. With
neither, requests carry no token (a Glance run with noauth).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from ..config import OriginConfig, read_secret
from ..errors import (
    ConfigError,
    ImageNotActive,
    OriginDenied,
    OriginError,
    OriginInvalid,
    OriginNotFound,
)
from ..manifest import HASH_ALGORITHMS, Checksum, validate_image_id
from .base import OriginImage, Sink
from .http import HttpOrigin

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_METADATA_BYTES = 1024 * 1024  # an image's JSON (its properties included)


class GlanceAuth(ABC):
    """Where the X-Auth-Token for Glance comes from."""

    @abstractmethod
    async def token(self) -> str | None:
        """The token to send (None: send none)."""

    async def renew(self) -> bool:
        """Glance said 401: get a new token. False if there is no way to."""
        return False

    def close(self) -> None:  # noqa: B027 (most sources hold nothing)
        """Release what the source holds."""


class NoAuth(GlanceAuth):
    """A Glance that needs no token (noauth deployments, tests)."""

    async def token(self) -> str | None:
        """None: no X-Auth-Token header."""
        return None


class TokenFileAuth(GlanceAuth):
    """A token kept in a file by something else; read again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    async def token(self) -> str | None:
        """The file's token (re-read if its mtime, size or inode changed)."""
        try:
            st = await asyncio.to_thread(os.stat, self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key != self._seen:
                self._token = await asyncio.to_thread(read_secret, self.path, "origin.token_file")
                self._seen = key
        except (OSError, ConfigError) as err:
            detail = err.detail if isinstance(err, ConfigError) else err.strerror
            raise OriginDenied(f"origin.token_file {self.path}: {detail}") from None
        return self._token

    async def renew(self) -> bool:
        """Read the file again (someone may have just replaced the token)."""
        self._seen = None
        return True


class KeystoneAuth(GlanceAuth):
    """Keystone v3 through keystoneauth1: password or application credential.

    keystoneauth1 is blocking (requests), so every call runs in a thread; its plugin
    caches the token and fetches a new one when it expires within 120 s.
    """

    def __init__(self, config: OriginConfig) -> None:
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3

        plugin: Any
        if config.application_credential_id:
            plugin = v3.ApplicationCredential(
                auth_url=config.auth_url,
                application_credential_id=config.application_credential_id,
                application_credential_secret=read_secret(
                    config.application_credential_secret_file,
                    "origin.application_credential_secret_file",
                ),
            )
        else:
            plugin = v3.Password(
                auth_url=config.auth_url,
                username=config.username,
                password=read_secret(config.password_file, "origin.password_file"),
                user_domain_name=config.user_domain_name,
                project_name=config.project_name or None,
                project_domain_name=config.project_domain_name if config.project_name else None,
            )
        self._plugin = plugin
        self._session = ks_session.Session(auth=plugin, timeout=config.connect_timeout * 6)
        self._lock = asyncio.Lock()  # one token request at a time, not one per chunk

    async def token(self) -> str | None:
        """A valid token (renewed by the plugin shortly before it expires)."""
        from keystoneauth1 import exceptions as ks_exc

        async with self._lock:
            try:
                token: str | None = await asyncio.to_thread(self._plugin.get_token, self._session)
            except ks_exc.Unauthorized as err:
                raise OriginDenied(f"Keystone refused the credentials: {err}") from None
            except ks_exc.ClientException as err:
                raise OriginError(f"cannot get a token from Keystone: {err}") from None
        return token

    async def renew(self) -> bool:
        """Forget the cached token; the next `token` asks Keystone."""
        self._plugin.invalidate()
        return True

    def close(self) -> None:
        """Close keystoneauth1's connection pool."""
        self._session.session.close()


def make_auth(config: OriginConfig) -> GlanceAuth:
    """The auth source the config names (validated in config.py)."""
    if config.token_file:
        return TokenFileAuth(Path(config.token_file))
    if config.auth_url:
        return KeystoneAuth(config)
    return NoAuth()


def image_checksum(meta: dict[str, Any]) -> Checksum | None:
    """The checksum an image must match: os_hash_algo/os_hash_value, else md5 `checksum`."""
    algo, value = meta.get("os_hash_algo"), meta.get("os_hash_value")
    if isinstance(algo, str) and isinstance(value, str) and algo and value:
        if algo in HASH_ALGORITHMS:
            return Checksum(algo, value.lower())
        log.warning("image %s: os_hash_algo %r is not one swarmcache knows", meta.get("id"), algo)
    md5 = meta.get("checksum")
    if isinstance(md5, str) and md5:
        return Checksum("md5", md5.lower())
    return None


def glance_image(meta: dict[str, Any]) -> OriginImage:
    """What an image's Glance metadata says about its bytes; ImageNotActive (409) unless
    it is active, OriginInvalid if its size or hash is unusable."""
    image_id = meta.get("id")
    status = meta.get("status")
    if status != "active":
        raise ImageNotActive(
            f"image {image_id} is {status!r} in Glance, not 'active': it has no data to "
            "serve yet (or any more)",
            str(status),
        )
    size = meta.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise OriginInvalid(f"image {image_id}: Glance gave no usable size ({size!r})")
    try:
        checksum = image_checksum(meta)
    except ValueError as err:
        raise OriginInvalid(f"image {image_id}: unusable hash in Glance: {err}") from None
    # Glance never changes an active image's data: its hash names the version
    validator = str(checksum) if checksum is not None else f"size:{size}"
    return OriginImage(size=size, validator=validator, checksum=checksum)


class GlanceOrigin(HttpOrigin):
    """Reads images from Glance's v2 API (`origin.url` is the endpoint, e.g.
    http://glance.example:9292)."""

    name = "glance"
    _auth: GlanceAuth | None = None

    async def __aenter__(self) -> GlanceOrigin:
        self._auth = make_auth(self.config)  # first: an unreadable secret opens nothing
        await super().__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._auth is not None:
            self._auth.close()
            self._auth = None
        await super().__aexit__(et, e, tb)

    @property
    def endpoint(self) -> str:
        """The Glance endpoint without a trailing slash or /v2 (as nova strips them)."""
        return glance_endpoint(self.config.url)

    def describe(self, image_id: str) -> str:
        """The image's metadata URL."""
        return f"{self.endpoint}/v2/images/{quote(validate_image_id(image_id), safe='')}"

    async def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        assert self._auth is not None, "GlanceOrigin used outside 'async with'"
        headers = dict(extra or {})
        token = await self._auth.token()
        if token is not None:
            headers["X-Auth-Token"] = token
        return headers

    async def _stat(self, image_id: str) -> OriginImage:
        meta = await self._authorized(self.describe(image_id), None, self._metadata)
        stat = glance_image(meta)
        if stat.checksum is None:
            log.warning("image %s has no checksum in Glance: only chunk digests apply", image_id)
        return stat

    async def _metadata(self, resp: aiohttp.ClientResponse, url: str) -> dict[str, Any]:
        self._check(resp, url, (200,))
        body = await self._body(resp, url, MAX_METADATA_BYTES, self.config)
        try:
            meta = json.loads(body)
        except ValueError as err:
            raise OriginInvalid(f"{url}: Glance's answer is not JSON: {err}") from None
        if not isinstance(meta, dict):
            raise OriginInvalid(f"{url}: Glance's answer is not an image")
        return meta

    async def _read(
        self,
        image_id: str,
        offset: int,
        length: int,
        validator: str,
        size: int | None,
        sink: Sink | None,
    ) -> list[bytes]:
        url = self.describe(image_id) + "/file"
        rng = {"Range": f"bytes={offset}-{offset + length - 1}"}

        async def body(resp: aiohttp.ClientResponse, url: str) -> list[bytes]:
            if resp.status == 204:  # Glance: "no data" (the image lost its data)
                raise OriginNotFound(f"{url}: Glance has no data for image {image_id} (204)")
            return await self._range_body(resp, url, offset, length, size, sink)

        return await self._authorized(url, rng, body)

    async def _authorized(
        self,
        url: str,
        extra: dict[str, str] | None,
        handle: Callable[[aiohttp.ClientResponse, str], Awaitable[T]],
    ) -> T:
        """GET `url` with the token and hand the answer to `handle`; on a 401 renew the
        token once and try again; 403 (and a second 401) are OriginDenied."""
        assert self._auth is not None, "GlanceOrigin used outside 'async with'"
        for attempt in (1, 2):
            headers = await self._headers(extra)
            async with self._request("GET", url, headers=headers) as resp:
                if resp.status == 401 and attempt == 1 and await self._auth.renew():
                    log.info("Glance answered 401 for %s: renewing the token", url)
                    continue
                if resp.status in (401, 403):
                    raise OriginDenied(
                        f"{url}: Glance answered {resp.status} {resp.reason}: check the "
                        "origin's credentials and that its project may read this image"
                    )
                return await handle(resp, url)
        raise AssertionError("unreachable")


def glance_endpoint(url: str) -> str:
    """A Glance URL as an endpoint: no trailing slash, no trailing /v2 (or /v1)."""
    url = url.rstrip("/")
    for suffix in ("/v2", "/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url
