"""Origins: where image bytes come from when no nearer copy exists.

Every origin answers two questions, `stat` (how big is the image, what identifies
this version, what checksum does the origin publish) and `read` (these bytes,
please). Retries with backoff and jitter live here, once, for every kind; an
origin kind only says which of its failures are worth retrying (OriginError that
is not OriginNotFound).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar

from ..config import OriginConfig
from ..errors import OriginError
from ..manifest import Checksum, pieces_size

log = logging.getLogger(__name__)
T = TypeVar("T")
_SHA256_LINE = re.compile(rb"^\s*([0-9a-fA-F]{64})(?:\s|$)")
MAX_SIDECAR_BYTES = 64 * 1024


@dataclass(frozen=True)
class OriginImage:
    """What the origin says about an image."""

    size: int
    validator: str  # changes when the bytes change (ETag, Last-Modified, mtime)
    checksum: Checksum | None  # of the whole image, if the origin publishes one


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * (2**attempt)))


def parse_sha256_sidecar(data: bytes) -> str:
    """The digest from sha256sum output ("<hex>  <name>"); ValueError if there is none."""
    m = _SHA256_LINE.match(data[:MAX_SIDECAR_BYTES])
    if not m:
        raise ValueError("not in sha256sum format")
    return m.group(1).decode().lower()


class Sink(Protocol):
    """Receives a chunk's bytes while an origin read is under way (peers stream them)."""

    def restart(self) -> None:
        """A new attempt starts: forget what was fed."""

    def feed(self, data: bytes) -> None:
        """The next bytes of the chunk."""


class Origin(ABC):
    """An image store swarmcache reads from; an async context manager."""

    name = "origin"

    def __init__(self, config: OriginConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()

    async def __aenter__(self) -> Origin:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    @abstractmethod
    def describe(self, image_id: str) -> str:
        """Where this image lives at the origin (URL or path), for messages."""

    @abstractmethod
    async def _stat(self, image_id: str) -> OriginImage: ...

    @abstractmethod
    async def _read(
        self,
        image_id: str,
        offset: int,
        length: int,
        validator: str,
        size: int | None,
        sink: Sink | None,
    ) -> list[bytes]: ...

    async def stat(self, image_id: str) -> OriginImage:
        """Size, version validator and published checksum of an image (with retries)."""
        return await self._retry(f"stat {image_id}", lambda: self._stat(image_id))

    async def read(
        self,
        image_id: str,
        offset: int,
        length: int,
        validator: str = "",
        size: int | None = None,
        sink: Sink | None = None,
    ) -> list[bytes]:
        """Exactly `length` bytes at `offset` of the version `validator` (and `size`) names,
        in the pieces they arrived in.

        `sink` gets the bytes as they arrive; each retry restarts it.
        """

        async def attempt() -> list[bytes]:
            if sink is not None:
                sink.restart()
            pieces = await self._read(image_id, offset, length, validator, size, sink)
            got = pieces_size(pieces)
            if got != length:
                raise OriginError(
                    f"{self.describe(image_id)}: got {got} bytes at {offset}, want {length}"
                )
            return pieces

        return await self._retry(f"read {image_id}@{offset}+{length}", attempt)

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        retries = self.config.retries
        for attempt in range(retries + 1):
            try:
                return await op()
            except OriginError as err:
                if not err.retryable or attempt == retries:
                    raise
                delay = backoff_delay(attempt, self.config.retry_backoff, 30.0, self._rng)
                if err.retry_after is not None:  # the origin said when: believe it (capped)
                    delay = max(delay, min(err.retry_after, 30.0))
                log.warning(
                    "origin %s failed (%s), retry %d/%d in %.2fs",
                    what,
                    err.detail,
                    attempt + 1,
                    retries,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")
