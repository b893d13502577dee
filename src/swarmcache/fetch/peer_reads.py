"""Peer reads: the blocks the exchange asks of neighbours, each checked as it lands.

Every outcome of one read maps to exactly one set of consequences, in `_read`:
landed (the first copy wins; slower copies are cancelled), busy (ask again after
the peer's Retry-After), gone (ask others at once), failed (counted against the
peer; repeated failures put it down for a while), wrong bytes (the peer is
quarantined), disk failure (the fetch ends).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from ..errors import (
    IntegrityError,
    PeerError,
    PeerGone,
    PeerLacks,
    StorageError,
    SwarmcacheError,
)
from ..exchange import Exchange
from ..limits import Limits
from ..metrics import Metrics
from ..peers.swarm import PeerBusy, Swarm
from ..store import CachedImage
from .common import Tally, Wakeup
from .landing import Landing

log = logging.getLogger(__name__)


class PeerReads:
    """Asks neighbours for blocks whenever the exchange has requests to make."""

    def __init__(
        self,
        image: CachedImage,
        swarm: Swarm,
        exchange: Exchange,
        landing: Landing,
        metrics: Metrics,
        tally: Tally,
        wakeup: Wakeup,
        on_landed: Callable[[int, bytes, str | None], None],
        on_error: Callable[[SwarmcacheError], None],
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.image = image
        self.swarm = swarm
        self.exchange = exchange
        self.landing = landing
        self.metrics = metrics
        self.tally = tally
        self.wakeup = wakeup
        self.on_landed = on_landed
        self.on_error = on_error
        self.used: set[str] = set()  # peers whose blocks we kept
        self._reads: dict[tuple[int, str], asyncio.Task[None]] = {}  # in flight

    @property
    def image_id(self) -> str:
        """The image read."""
        return self.image.image_id

    async def run(self) -> None:
        """Start the reads the exchange asks for, until every block is in."""
        while not self.exchange.finished:
            self.wakeup.clear()
            for node, block in self.exchange.next_requests(time.monotonic()):
                task = asyncio.create_task(self._read(node, block))
                self._reads[(block, node)] = task
                task.add_done_callback(self._read_done)
            await self.wakeup.idle()

    def cancel(self, block: int, nodes: Iterable[str]) -> None:
        """Block `block` landed: end the slower reads of it from `nodes` (endgame)."""
        for node in nodes:
            task = self._reads.get((block, node))
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        """Cancel every read in flight and wait for them."""
        reads = list(self._reads.values())
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)

    def _read_done(self, task: asyncio.Task[None]) -> None:
        for key, t in list(self._reads.items()):
            if t is task:
                del self._reads[key]

    async def _read(self, node: str, block: int) -> None:
        """One read of a block from a neighbour; the first copy to land wins."""
        swarm = self.swarm
        await self.limits.download.take(self.image.manifest.block_span(block)[1])
        t0 = time.monotonic()
        try:
            data = await swarm.read_block(node, self.image.manifest, block)
            size = len(data)
            try:
                digest = await self._land(node, block, data)
            except asyncio.CancelledError:
                raise  # a thread may still be writing `data`: its buffer is not reused
            except BaseException:
                swarm.blocks.recycle(data)
                raise
            swarm.blocks.recycle(data)
            if digest is None:
                return  # another copy (endgame) landed first
        except PeerBusy as err:
            self.metrics.block_requests.labels("busy").inc()
            now = time.monotonic()
            self.exchange.refused(block, node, now, now + err.retry_after)
            return
        except PeerGone as err:
            self.metrics.block_requests.labels("gone").inc()
            log.info("%s: block %d from peer %s: %s", self.image_id, block, node, err)
            self.exchange.failed(block, node)
            if isinstance(err, PeerLacks):
                swarm.lacks(self.image_id, node)
            return
        except PeerError as err:
            log.info("%s: block %d from peer %s failed: %s", self.image_id, block, node, err)
            self.metrics.block_requests.labels("failed").inc()
            self.metrics.peer_errors.inc()
            self.metrics.source_errors.labels("peer").inc()
            self.exchange.failed(block, node)
            if swarm.table.failed(node, time.monotonic()):
                log.warning("peer %s is down after repeated failures", node)
                swarm.gone_for_now(node)
            return
        except IntegrityError as err:
            log.warning(
                "%s: block %d from peer %s does not match its digest; peer quarantined (%s)",
                self.image_id,
                block,
                node,
                err.detail,
            )
            self.metrics.block_requests.labels("bad").inc()
            self.metrics.verification_failures.labels("chunk").inc()
            self.exchange.failed(block, node)
            swarm.quarantine(node)
            return
        except StorageError as err:
            self.on_error(err)
            return
        finally:
            self.wakeup.set()
        self.metrics.block_requests.labels("ok").inc()
        seconds = time.monotonic() - t0
        swarm.table.succeeded(node, size, seconds, time.monotonic())
        self.used.add(node)
        self.tally.add("peer", size, seconds)
        self.on_landed(block, digest, node)

    async def _land(self, node: str, block: int, data: bytearray) -> bytes | None:
        """Check a block read from `node` and write it: its digest, or None when another
        copy landed first (endgame)."""
        expected = self.swarm.digest(self.image_id, node, block)
        if expected is None:
            if not self.swarm.trading(self.image_id, node):
                # unlinked while the block was on its way (it evicted the image, or
                # the link rotated): nothing to check it against, and no fault of its
                raise PeerGone(f"peer {node} left {self.image_id} while block {block} came")
            raise PeerError(f"peer {node} announced block {block} without a digest")
        if self.image.has_block(block):
            self.metrics.block_requests.labels("ok").inc()  # served, just too late
            self.exchange.landed(block, node, time.monotonic())
            return None
        return await self.landing.write(block, data, expected)
