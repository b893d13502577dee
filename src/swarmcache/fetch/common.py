"""What the parts of one fetch share: a wake-up for idle workers and the byte tally."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

from ..metrics import Metrics

log = logging.getLogger("swarmcache.fetch")
IDLE_TICK = 0.25  # longest sleep of an idle worker (busy peers, endgame, the stall)


class Wakeup:
    """Idle workers sleep here until something changed (or a short tick passed)."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def set(self) -> None:
        """Something changed: idle workers look again."""
        self._changed.set()

    def clear(self) -> None:
        """A worker is about to look: changes from now on wake it."""
        self._changed.clear()

    async def idle(self) -> None:
        """Wait until something changed, or IDLE_TICK (busy peers, endgame, the stall)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_TICK):
                await self._changed.wait()


class Tally:
    """Bytes fetched by source, in this run and in the metrics."""

    def __init__(self, image_id: str, metrics: Metrics) -> None:
        self.image_id = image_id
        self.metrics = metrics
        self.by_source: Counter[str] = Counter()

    def add(self, source: str, nbytes: int, seconds: float) -> None:
        """`nbytes` came from `source` ("origin" or "peer") in `seconds`."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %d bytes from %s in %.3fs", self.image_id, nbytes, source, seconds)
        self.metrics.chunk_latency.labels(source).observe(seconds)
        self.metrics.bytes_fetched.labels(source).inc(nbytes)
        self.by_source[source] += nbytes
