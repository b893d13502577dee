"""Origin reads: the runs of blocks the origin lane gives this host, read one at a time.

Each block of a run lands as soon as its bytes are in (a `_Cutter` is the origin's
sink), so peers can have it while the rest of the chunk still arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..errors import SwarmcacheError
from ..exchange import Exchange, OriginLane
from ..limits import Limits
from ..manifest import Buffer
from ..metrics import Metrics
from ..origin import Origin
from ..store import CachedImage
from .common import Tally, Wakeup
from .landing import Landing

log = logging.getLogger(__name__)


class _Cutter:
    """Cuts an origin read's bytes into blocks as they arrive (an origin Sink)."""

    def __init__(self, reads: OriginReads, first: int, end: int) -> None:
        self.reads = reads
        self.first = first
        self.end = end
        self.next = first  # the block being filled
        self.pieces: list[Buffer] = []  # slices of the pieces fed, never copied
        self.filled = 0
        self.landing: list[asyncio.Task[None]] = []

    def restart(self) -> None:
        """A retry starts over at the first block (blocks that landed stay landed)."""
        self.next, self.pieces, self.filled = self.first, [], 0

    def feed(self, data: bytes) -> None:
        """The next bytes of the run."""
        image = self.reads.image
        manifest = image.manifest
        view = memoryview(data)
        while view and self.next < self.end:
            length = manifest.block_span(self.next)[1]
            part = view[: length - self.filled]
            self.pieces.append(part if len(part) != len(data) else data)
            self.filled += len(part)
            view = view[len(part) :]
            if self.filled == length:
                if not image.has_block(self.next):
                    land = self.reads.land(self.next, self.pieces)
                    self.landing.append(asyncio.ensure_future(land))
                self.next += 1
                self.pieces, self.filled = [], 0


class OriginReads:
    """Reads from the origin what the lane says this host reads."""

    def __init__(
        self,
        image: CachedImage,
        origin: Origin,
        exchange: Exchange,
        lane: OriginLane,
        landing: Landing,
        metrics: Metrics,
        tally: Tally,
        wakeup: Wakeup,
        on_landed: Callable[[int, bytes, str | None], None],
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.image = image
        self.origin = origin
        self.exchange = exchange
        self.lane = lane
        self.landing = landing
        self.metrics = metrics
        self.tally = tally
        self.wakeup = wakeup
        self.on_landed = on_landed

    async def run(self) -> None:
        """One reader: take the lane's next run, read it, until every block is in.
        The job runs `lane.streams` of these."""
        while not self.exchange.finished:
            self.wakeup.clear()
            stalled = self.lane.stalled
            run = self.lane.next_read(time.monotonic())
            if self.lane.stalled and not stalled:
                log.warning(
                    "%s: no block from the swarm for a while (%d neighbours): reading "
                    "what no neighbour serving us holds from the origin",
                    self.image.image_id,
                    len(self.exchange.neighbours),
                )
            if run is None:
                await self.wakeup.idle()
                continue
            await self.read(*run)

    async def read(self, first: int, end: int) -> None:
        """Read blocks first..end-1 in one request (the origin retries as it is set to)."""
        m = self.image.manifest
        offset = m.block_span(first)[0]
        last_offset, last_length = m.block_span(end - 1)
        length = last_offset + last_length - offset
        cutter = _Cutter(self, first, end)
        await self.limits.from_origin(length)  # [limits] origin_rate, download_rate
        t0 = time.monotonic()
        try:
            await self.origin.read(
                self.image.image_id, offset, length, m.origin_validator, m.size, cutter
            )
            await asyncio.gather(*cutter.landing)
        except BaseException as err:
            for task in cutter.landing:
                task.cancel()
            await asyncio.gather(*cutter.landing, return_exceptions=True)
            self.lane.read_done(first, failed_from=first)
            self.wakeup.set()
            if isinstance(err, SwarmcacheError):
                self.metrics.source_errors.labels("origin").inc()
            raise
        self.lane.read_done(first)
        self.tally.add("origin", length, time.monotonic() - t0)

    async def land(self, block: int, pieces: list[Buffer]) -> None:
        """One block of a read is in: its digest is what the origin sent."""
        digest = await self.landing.write(block, pieces, None)
        self.on_landed(block, digest, None)
