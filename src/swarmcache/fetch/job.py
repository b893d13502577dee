"""One image's fetch: an orchestrator over the parts that do the work.

The pure `Exchange` decides which block to ask of which neighbour and the pure
`OriginLane` what this host reads from the origin (see exchange.py); the job only
wires them to the parts that carry it out: `OriginReads` (runs of blocks from the
origin), `PeerReads` (blocks from neighbours) and `Landing` (write, seal, durable,
hashed). It also keeps the readers' waits (a client waiting for chunk i) and the
progress the API shows. The image's hash must match the origin's before the image
is complete.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import (
    FetchFailed,
    ImageNotFound,
    IntegrityError,
    ManifestRefuted,
    SwarmcacheError,
)
from ..exchange import GATHER, Exchange, Geometry, OriginLane
from ..limits import Limits
from ..manifest import Manifest
from ..metrics import Metrics
from ..origin import Origin
from ..peers.swarm import Swarm
from ..signing import Signer
from ..store import CachedImage
from .common import Tally, Wakeup
from .landing import Landing
from .origin_reads import OriginReads
from .peer_reads import PeerReads

log = logging.getLogger(__name__)
CHECK_BATCH = 16  # chunks re-checked per thread call when a fetch resumes
STALL = 30.0  # seconds without a block from anywhere before a host reads what it lacks


class FetchJob:
    """Fetches the missing blocks of one image, verifies it, makes it durable.

    What runs at once: `lane.streams` origin readers and a peer requester land
    blocks (a landed block is served to peers at once), chunks are sealed when their
    last block lands, a flusher makes sealed chunks durable in group commits, and
    the image's hash advances over the sealed prefix. `verified` resolves when the
    checksum passed, `result` when the image is also durable and marked complete.
    """

    def __init__(
        self,
        image: CachedImage,
        origin: Origin,
        metrics: Metrics,
        concurrency: int,
        executor: ThreadPoolExecutor,
        swarm: Swarm | None = None,
        hosts: set[str] | None = None,
        signer: Signer | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.image = image
        self.signer = signer  # a seeder's key: the manifest is signed once the image checked
        # the origin's own manifest, when ours came unsigned from a peer and we trust only
        # signed ones (Fetcher._start): the image must be the version the origin names
        self.confirm: asyncio.Future[Manifest] | None = None
        self.confirm_again: Callable[[], Awaitable[Manifest]] | None = None  # if it failed
        self.metrics = metrics
        self.concurrency = concurrency
        self.swarm = swarm
        self.hosts = hosts or set()
        m = image.manifest
        self.exchange = Exchange(
            Geometry(m.size, m.chunk_size, m.block_size),
            [b for b in range(m.blocks) if image.has_block(b)],
            random.Random(),
            slots=swarm.config.concurrency if swarm is not None else 1,
        )
        now = time.monotonic()
        self.lane = OriginLane(
            self.exchange,
            swarm.node_id if swarm is not None else "",
            self.image_id,
            [n for n in swarm.members_now() if n != swarm.node_id] if swarm is not None else [],
            concurrency,
            STALL,
            now,
            gather=GATHER if swarm is not None else 0.0,
            seeders=swarm.seeders_now() if swarm is not None else (),
        )
        self.started = now
        self.wakeup = Wakeup()
        self.tally = Tally(self.image_id, metrics)
        self.landing = Landing(
            image, executor, metrics, self._chunk_ready, self._lost, self._failed
        )
        self.origin_reads = OriginReads(
            image,
            origin,
            self.exchange,
            self.lane,
            self.landing,
            metrics,
            self.tally,
            self.wakeup,
            self._landed,
            limits,
        )
        self.peer_reads = (
            PeerReads(
                image,
                swarm,
                self.exchange,
                self.landing,
                metrics,
                self.tally,
                self.wakeup,
                self._landed,
                self._failed,
                limits,
            )
            if swarm is not None
            else None
        )
        loop = asyncio.get_running_loop()
        self.verified: asyncio.Future[None] = loop.create_future()
        self.result: asyncio.Future[None] = loop.create_future()
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._error: SwarmcacheError | None = None  # a part failed: the fetch ends with it

    @property
    def image_id(self) -> str:
        """The image being fetched."""
        return self.image.image_id

    @property
    def manifest(self) -> Manifest:
        """The manifest being filled."""
        return self.image.manifest

    @property
    def bytes_by_source(self) -> dict[str, int]:
        """Bytes fetched in this run, by source."""
        return dict(self.tally.by_source)

    def progress(self) -> dict[str, Any]:
        """Bytes done, rate and sources of this run, for the status API."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = sum(self.tally.by_source.values())
        rate = done / elapsed
        left = self.image.manifest.size - self.image.present_bytes
        return {
            "bytes_done": done,
            "elapsed_s": round(elapsed, 3),
            "rate_bytes_per_s": round(rate),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
            "sources": self.bytes_by_source,
            "verified": self.verified.done() and self.verified.exception() is None,
            "readers": list(self.lane.readers),
            "neighbours": len(self.exchange.neighbours),
        }

    def poke(self) -> None:
        """Something changed (a neighbour's state): idle workers look again."""
        self.wakeup.set()

    # -- readers ---------------------------------------------------------------------------

    def want(self, first: int, last: int) -> None:
        """A reader needs chunks first..last next: their blocks go ahead of the rest.

        A window of a few chunks keeps the workers on what the reader needs without
        queueing the blocks of a whole 100 GiB image; wait_chunk() moves it along.
        """
        m = self.image.manifest
        stop = min(last + 1, first + max(2, self.concurrency), m.chunks)
        self.exchange.want(
            b for i in range(first, stop) if not self.image.has(i) for b in m.blocks_of(i)
        )
        self.wakeup.set()

    async def wait_chunk(self, index: int, last: int | None = None) -> None:
        """Return once chunk `index` can be read; raise if the fetch fails.

        `last` is the last chunk the reader will want after this one (for read-ahead).
        """
        if self.image.has(index):
            return
        if not 0 <= index < self.image.manifest.chunks:
            raise FetchFailed(f"{self.image_id} has no chunk {index}")
        if self.result.done():
            self.result.result()  # raises the failure
            raise FetchFailed(f"fetch of {self.image_id} ended without chunk {index}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(index, []).append(fut)
        self.want(index, index if last is None else last)
        await fut

    def raise_if_failed(self) -> None:
        """Raise the fetch's failure, if it has failed (readers check between sends)."""
        if self.result.done() and self.result.exception() is not None:
            self.result.result()

    async def wait_verified(self) -> None:
        """Return once the whole image passed its checksum; raise if the fetch fails."""
        await asyncio.shield(self.verified)

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The job's body: fetch, verify, make durable, mark complete. Sets `result`."""
        tasks: list[asyncio.Task[None]] = []
        try:
            # Chunks logged before a restart are checked again alongside the rest.
            unchecked = self.image.unchecked()
            m = self.image.manifest
            self.exchange.hold(b for i in unchecked for b in m.blocks_of(i))
            # a chunk whose blocks all landed in an earlier fetch of this run that
            # ended before sealing it (it failed, or was cancelled): seal it now
            for index in range(m.chunks):
                blocks = m.blocks_of(index)
                if not self.image.has(index) and all(self.image.has_block(b) for b in blocks):
                    self.landing.seal_soon(index)
            if self.swarm is not None:
                await self.swarm.start(self, self.hosts)
                log.debug(
                    "%s: %d neighbours, readers %s",
                    self.image_id,
                    len(self.exchange.neighbours),
                    ", ".join(self.lane.readers),
                )
            tasks = [
                asyncio.create_task(self.origin_reads.run(), name=f"origin-{self.image_id}-{n}")
                for n in range(self.lane.streams)
            ]
            if self.peer_reads is not None:
                tasks.append(
                    asyncio.create_task(self.peer_reads.run(), name=f"peers-{self.image_id}")
                )
            hasher = asyncio.create_task(self.landing.hasher(), name=f"hash-{self.image_id}")
            flusher = asyncio.create_task(self.landing.flusher(), name=f"flush-{self.image_id}")
            checker = asyncio.create_task(self._checker(unchecked), name=f"check-{self.image_id}")
            tasks += [hasher, flusher, checker]
            # Until every chunk is in and hashed, the first failure of any part ends it.
            pending: set[asyncio.Future[Any]] = set(tasks)
            while not hasher.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for part in done:
                    part.result()
                if self._error is not None:
                    raise self._error
            await self._confirmed()
            self._verify()
            self.landing.finish()
            await flusher
            m = self.image.manifest
            signable = m.digest_algo != "xxh3" and m.origin_hash is not None
            signer = self.signer if signable else None
            if self.signer is not None and signer is None:
                log.warning(
                    "%s: not signed: %s", self.image_id,
                    "the origin publishes no checksum to check it against"
                    if m.origin_hash is None else "xxh3 digests are not cryptographic",
                )  # fmt: skip
            await self.landing.thread(self.image.mark_complete, self.landing.image_hash, signer)
        except SwarmcacheError as err:
            self._fail(err)
        except asyncio.CancelledError:
            self._fail(FetchFailed(f"fetch of {self.image_id} was cancelled"))
            raise
        except Exception as err:  # a bug must not leave readers hanging
            log.exception("fetch of %s crashed", self.image_id)
            self._fail(FetchFailed(f"fetch of {self.image_id} crashed: {err!r}"))
        else:
            self.result.set_result(None)
            self._fail(FetchFailed(f"fetch of {self.image_id} ended"))  # no waiter left behind
        finally:
            if self.swarm is not None:
                self.swarm.stop(self)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.peer_reads is not None:
                await self.peer_reads.close()
            await self.landing.close()

    async def _checker(self, unchecked: list[int]) -> None:
        """Re-check chunks logged before a restart, in order; good ones become readable."""
        m = self.image.manifest
        for start in range(0, len(unchecked), CHECK_BATCH):
            batch = unchecked[start : start + CHECK_BATCH]
            bad = set(await self.landing.thread(self.image.check_present, batch))
            for index in batch:
                if index in bad:
                    log.warning(
                        "%s: chunk %d on disk is corrupt; fetching it again", self.image_id, index
                    )
                    self.metrics.verification_failures.labels("chunk").inc()
                    self.exchange.release(m.blocks_of(index))
                    continue
                for b in m.blocks_of(index):
                    self.exchange.landed(b)
                    digest = m.block_digest(b)
                    if self.swarm is not None and digest is not None:
                        self.swarm.announce_have(self.image_id, b, digest)
                self.landing.ready(index, durable=True)
            self.wakeup.set()

    # -- what the parts report ------------------------------------------------------------------

    def _landed(self, block: int, digest: bytes, node: str | None) -> None:
        """A block is written and checked: tell the exchange and the neighbours, end
        slower reads of it."""
        now = time.monotonic()
        others = self.exchange.landed(block, node, now)
        if self.peer_reads is not None:
            self.peer_reads.cancel(block, others)
        self.lane.landed(now)
        if self.swarm is not None:
            self.swarm.announce_have(self.image_id, block, digest)
        self.wakeup.set()

    def _chunk_ready(self, index: int) -> None:
        """Chunk `index` is readable: its waiting readers go on."""
        for fut in self._waiters.pop(index, ()):
            if not fut.done():
                fut.set_result(None)

    def _lost(self, blocks: list[int]) -> None:
        """Blocks failed their check on disk: fetch them again."""
        self.exchange.lost(blocks)
        self.wakeup.set()

    def _failed(self, err: SwarmcacheError) -> None:
        """A part failed for good (the disk): the fetch ends with it."""
        self._error = err
        self.wakeup.set()

    async def _confirmed(self) -> None:
        """IntegrityError if the origin names another version than the manifest a peer
        gave us (see `confirm`); the origin's errors if it cannot say."""
        if self.confirm is None:
            return
        try:
            origin = await self.confirm
        except ImageNotFound:
            raise ManifestRefuted(
                f"{self.image_id}: the origin does not have the image peers described"
            ) from None
        except SwarmcacheError:
            if self.confirm_again is None:
                raise
            origin = await self.confirm_again()  # asked at the start; once more now
        m = self.image.manifest
        if not origin.same_version(m):
            self.metrics.verification_failures.labels("manifest").inc()
            raise ManifestRefuted(
                f"{self.image_id}: the manifest from peers names {m.origin_hash} "
                f"({m.size} bytes), the origin {origin.origin_hash} ({origin.size} bytes); "
                "image discarded (the next read fetches the origin's)"
            )

    def _verify(self) -> None:
        manifest = self.image.manifest
        got = self.landing.image_hash
        if manifest.origin_hash is not None and got != manifest.origin_hash:
            self.metrics.verification_failures.labels("image").inc()
            used = self.peer_reads.used if self.peer_reads is not None else set()
            if self.swarm is not None and used:
                # Each chunk matched its holder's digest, so a holder lied consistently:
                # we cannot tell which, so none of them is trusted for a while.
                log.warning(
                    "%s failed its %s with chunks from peers %s: quarantining them",
                    self.image_id,
                    got.algo,
                    ", ".join(sorted(used)),
                )
                for node in used:
                    self.swarm.quarantine(node)
            raise IntegrityError(
                f"{self.image_id}: {got.algo} {got.hex} does not match the origin's "
                f"{manifest.origin_hash.hex}; image discarded"
            )
        self.verified.set_result(None)

    def _fail(self, err: SwarmcacheError) -> None:
        for fut in (self.verified, self.result):
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: a failure nobody awaits is not an error
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(err)
        self._waiters.clear()
