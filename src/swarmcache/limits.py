"""Per-daemon limits ([limits]): bandwidth caps and how many peer requests run at once.

The rates are leaky buckets (aiolimiter) of bytes per second, each holding at most
one second's worth: `upload_rate` is taken before a block goes out to a peer,
`download_rate` before a block is asked of a peer or a range of the origin, and
`origin_rate` before a range of the origin (both apply there). A transfer larger
than a second's worth waits for its parts in turn, so the average over a few
seconds is the cap; a single transfer may go out at line rate once its share is
granted. 0 means no cap.

`max_peer_connections` bounds the peer requests this daemon serves at once (block
GETs in flight, open links, joins, hellos): one more gets `503` with `Retry-After`
at once, never a wait (the peer asks another host or comes back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from .config import LimitsConfig

RETRY_AFTER = 1.0  # seconds a peer refused for max_peer_connections is told to wait


class Rate:
    """A cap in bytes per second (0: none)."""

    def __init__(self, bytes_per_s: int) -> None:
        self.bytes_per_s = bytes_per_s
        self._bucket = AsyncLimiter(bytes_per_s, 1.0) if bytes_per_s > 0 else None

    async def take(self, n: int) -> None:
        """Wait until `n` more bytes fit under the cap."""
        bucket = self._bucket
        if bucket is None:
            return
        while n > 0:
            part = min(n, self.bytes_per_s)
            await bucket.acquire(part)
            n -= part


@dataclass
class Limits:
    """What one daemon may send, receive and serve at once."""

    upload: Rate = field(default_factory=lambda: Rate(0))
    download: Rate = field(default_factory=lambda: Rate(0))
    origin: Rate = field(default_factory=lambda: Rate(0))
    max_peer_connections: int = 0  # 0: no bound
    peer_requests: int = 0  # being served now

    @classmethod
    def from_config(cls, config: LimitsConfig) -> Limits:
        """The limits [limits] sets."""
        return cls(
            Rate(config.upload_rate),
            Rate(config.download_rate),
            Rate(config.origin_rate),
            config.max_peer_connections,
        )

    async def from_origin(self, n: int) -> None:
        """Wait until `n` bytes may be read from the origin."""
        await self.origin.take(n)
        await self.download.take(n)

    def peer_request_starts(self) -> bool:
        """Count one more peer request being served; False (not counted) when that
        would pass max_peer_connections."""
        if self.max_peer_connections and self.peer_requests >= self.max_peer_connections:
            return False
        self.peer_requests += 1
        return True

    def peer_request_ends(self) -> None:
        """One peer request counted by peer_request_starts ended."""
        self.peer_requests -= 1
