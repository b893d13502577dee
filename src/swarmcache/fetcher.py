"""Fetching images into the store: one job per image, single-flight.

A FetchJob fills one CachedImage block by block. The pure `Exchange` decides which
block to ask of which neighbour and the pure `OriginLane` what this host reads from
the origin (see exchange.py); the job only carries that out: origin readers read
runs of blocks (each block lands as soon as its bytes are in, so peers can have it
while the rest of the chunk still arrives), a requester asks neighbours for blocks
(each checked against the digest its sender announced), and once every block of a
chunk is in, the chunk is sealed (read back and checked), becomes readable to
clients and is made durable in group commits. The image's sha256 advances as
chunks are sealed; it must match the origin's before the image is complete.

The Fetcher keeps at most one job per image, so any number of concurrent readers
of an uncached image cause exactly one read of each block.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import random
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import (
    FetchFailed,
    ImageBusy,
    ImageNotFound,
    IntegrityError,
    PeerError,
    PeerGone,
    ShuttingDown,
    StorageError,
    SwarmcacheError,
)
from .exchange import GATHER, Exchange, Geometry, OriginLane
from .manifest import Buffer, Manifest, pieces_digest, pieces_size
from .metrics import Metrics
from .origin import Origin
from .peers.swarm import PeerBusy, Swarm
from .store import CachedImage, Store

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_FAILURES = 1000  # failure records kept for the API; the oldest go first
CHECK_BATCH = 16  # chunks re-checked per thread call when a fetch resumes
IDLE_TICK = 0.25  # longest sleep of an idle worker (busy peers, endgame, the stall)
STALL = 30.0  # seconds without a block from anywhere before a host reads what it lacks
JOIN_KEPT = 10.0  # seconds the hosts a join named are used for the fetch that follows
FRESH_FOR = 10.0  # seconds an origin's answer about an image is used again


class _Cutter:
    """Cuts an origin read's bytes into blocks as they arrive (an origin Sink)."""

    def __init__(self, job: FetchJob, first: int, end: int) -> None:
        self.job = job
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
        manifest = self.job.image.manifest
        view = memoryview(data)
        while view and self.next < self.end:
            length = manifest.block_span(self.next)[1]
            part = view[: length - self.filled]
            self.pieces.append(part if len(part) != len(data) else data)
            self.filled += len(part)
            view = view[len(part) :]
            if self.filled == length:
                if not self.job.image.has_block(self.next):
                    land = self.job.land_from_origin(self.next, self.pieces)
                    self.landing.append(asyncio.ensure_future(land))
                self.next += 1
                self.pieces, self.filled = [], 0


@dataclass
class Failure:
    """Why the last fetch of an image failed."""

    error: SwarmcacheError
    at: float
    size: int | None


class FetchJob:
    """Fetches the missing blocks of one image, verifies it, makes it durable.

    What runs at once: origin readers and a peer requester land blocks (a landed
    block is served to peers at once), chunks are sealed when their last block
    lands, a flusher makes sealed chunks durable in group commits, and the sha256
    of the image advances over the sealed prefix, so the whole-image check needs no
    second read of the file. `verified` resolves when the checksum passed, `result`
    when the image is also durable and marked complete.
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
    ) -> None:
        self.image = image
        self.origin = origin
        self.executor = executor
        self._threads: set[concurrent.futures.Future[Any]] = set()
        self.metrics = metrics
        self.concurrency = concurrency
        self.swarm = swarm
        self.hosts = hosts or set()
        m = image.manifest
        geometry = Geometry(m.size, m.chunk_size, m.block_size)
        self.exchange = Exchange(
            geometry,
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
        )
        self.peers_used: set[str] = set()
        self.started = now
        self.bytes_by_source: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        self.verified: asyncio.Future[None] = loop.create_future()
        self.result: asyncio.Future[None] = loop.create_future()
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._changed = asyncio.Event()
        self._reads: dict[tuple[int, str], asyncio.Task[None]] = {}  # peer reads in flight
        self._seals: set[asyncio.Task[None]] = set()
        self._error: SwarmcacheError | None = None  # a part failed: the fetch ends with it
        self._unsynced: list[int] = []
        self._dirty = asyncio.Event()
        self._closing = False
        self._sha = hashlib.sha256()
        self._hash_next = 0  # chunks before this one are in _sha or being added to it
        self._hash_wake = asyncio.Event()

    @property
    def image_id(self) -> str:
        """The image being fetched."""
        return self.image.image_id

    @property
    def manifest(self) -> Manifest:
        """The manifest being filled."""
        return self.image.manifest

    def progress(self) -> dict[str, Any]:
        """Bytes done, rate and sources of this run, for the status API."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = sum(self.bytes_by_source.values())
        rate = done / elapsed
        left = self.image.manifest.size - self.image.present_bytes
        return {
            "bytes_done": done,
            "elapsed_s": round(elapsed, 3),
            "rate_bytes_per_s": round(rate),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
            "sources": dict(self.bytes_by_source),
            "verified": self.verified.done() and self.verified.exception() is None,
            "readers": list(self.lane.readers),
            "neighbours": len(self.exchange.neighbours),
        }

    def poke(self) -> None:
        """Something changed (a neighbour's state): idle workers look again."""
        self._changed.set()

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
        self._changed.set()

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
                    self._seal_soon(index)
            if self.swarm is not None:
                await self.swarm.start(self, self.hosts)
                log.debug(
                    "%s: %d neighbours, readers %s",
                    self.image_id,
                    len(self.exchange.neighbours),
                    ", ".join(self.lane.readers),
                )
            tasks = [
                asyncio.create_task(self._origin_reader(), name=f"origin-{self.image_id}-{n}")
                for n in range(self.lane.streams)
            ]
            if self.swarm is not None:
                tasks.append(asyncio.create_task(self._requester(), name=f"peers-{self.image_id}"))
            hasher = asyncio.create_task(self._hasher(), name=f"hash-{self.image_id}")
            flusher = asyncio.create_task(self._flusher(), name=f"flush-{self.image_id}")
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
            self._verify()
            self._closing = True
            self._dirty.set()
            await flusher
            await self._thread(self.image.mark_complete, self._sha.hexdigest())
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
            for t in [*tasks, *self._reads.values(), *self._seals]:
                t.cancel()
            await asyncio.gather(
                *tasks, *self._reads.values(), *self._seals, return_exceptions=True
            )
            # Threads cannot be cancelled: wait for the ones still writing to this
            # image's files, so nobody closes or deletes them underneath.
            await asyncio.gather(
                *(asyncio.wrap_future(f) for f in list(self._threads)), return_exceptions=True
            )
            # A failed or cancelled fetch keeps what it got (not after a failed sync:
            # then the store forgot every unlogged chunk and has() filters them out).
            batch = [i for i in self._unsynced if self.image.has(i)]
            self._unsynced = []
            if batch:
                with contextlib.suppress(SwarmcacheError):
                    await self._thread(self.image.sync_chunks, batch)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking `fn` in the fetcher's pool, tracked until it really ends."""
        cf = self.executor.submit(fn, *args)
        self._threads.add(cf)
        cf.add_done_callback(self._threads.discard)
        return await asyncio.wrap_future(cf)

    async def _checker(self, unchecked: list[int]) -> None:
        """Re-check chunks logged before a restart, in order; good ones become readable."""
        m = self.image.manifest
        for start in range(0, len(unchecked), CHECK_BATCH):
            batch = unchecked[start : start + CHECK_BATCH]
            bad = set(await self._thread(self.image.check_present, batch))
            for index in batch:
                if index in bad:
                    log.warning(
                        "%s: chunk %d on disk is corrupt; fetching it again", self.image_id, index
                    )
                    self.metrics.verification_failures.labels("chunk").inc()
                    self.exchange.release(m.blocks_of(index))
                else:
                    for b in m.blocks_of(index):
                        self.exchange.landed(b)
                    self._chunk_ready(index, announce=True)
            self._changed.set()

    # -- the origin ------------------------------------------------------------------

    async def _origin_reader(self) -> None:
        """Read the runs of blocks the origin lane gives this host, one at a time."""
        while not self.exchange.finished:
            self._changed.clear()
            run = self.lane.next_read(time.monotonic())
            if run is None:
                await self._idle()
                continue
            await self._read_origin(*run)

    async def _read_origin(self, first: int, end: int) -> None:
        m = self.image.manifest
        offset = m.block_span(first)[0]
        last_offset, last_length = m.block_span(end - 1)
        length = last_offset + last_length - offset
        cutter = _Cutter(self, first, end)
        t0 = time.monotonic()
        try:
            await self.origin.read(
                self.image_id, offset, length, m.origin_validator, m.size, cutter
            )
            await asyncio.gather(*cutter.landing)
        except BaseException as err:
            for task in cutter.landing:
                task.cancel()
            await asyncio.gather(*cutter.landing, return_exceptions=True)
            self.lane.read_done(first, failed_from=first)
            self._changed.set()
            if isinstance(err, SwarmcacheError):
                self.metrics.source_errors.labels("origin").inc()
            raise
        self.lane.read_done(first)
        self._account("origin", length, time.monotonic() - t0)

    async def land_from_origin(self, block: int, pieces: list[Buffer]) -> None:
        """One block of an origin read is in: its digest is what the origin sent."""

        def write() -> tuple[bytes, bool]:
            digest = pieces_digest(pieces)
            return digest, self.image.write_block(block, pieces, digest)

        digest, last = await self._thread(write)
        await self._landed(block, digest, last, None)

    # -- peers ----------------------------------------------------------------------------

    async def _requester(self) -> None:
        """Ask neighbours for blocks whenever the exchange has requests to make."""
        assert self.swarm is not None
        while not self.exchange.finished:
            self._changed.clear()
            for node, block in self.exchange.next_requests(time.monotonic()):
                task = asyncio.create_task(self._peer_block(node, block))
                self._reads[(block, node)] = task
                task.add_done_callback(self._read_done)
            await self._idle()

    def _read_done(self, task: asyncio.Task[None]) -> None:
        for key, t in list(self._reads.items()):
            if t is task:
                del self._reads[key]

    async def _peer_block(self, node: str, block: int) -> None:
        """One read of a block from a neighbour; the first copy to land wins."""
        assert self.swarm is not None
        swarm = self.swarm
        t0 = time.monotonic()
        try:
            data = await swarm.read_block(node, self.image.manifest, block)
            expected = swarm.digest(self.image_id, node, block)
            if expected is None:
                raise PeerError(f"peer {node} announced block {block} without a digest")
            if self.image.has_block(block):
                self.exchange.landed(block, node, time.monotonic())
                return  # another copy (endgame) landed first

            def check_and_write() -> tuple[bytes, bool]:  # one trip to a thread per block
                digest = pieces_digest(data)
                if digest != expected:
                    return digest, False
                return digest, self.image.write_block(block, data, digest)

            digest, last = await self._thread(check_and_write)
            if digest != expected:
                log.warning(
                    "%s: block %d from peer %s does not match its digest; peer quarantined",
                    self.image_id,
                    block,
                    node,
                )
                self.metrics.verification_failures.labels("chunk").inc()
                self.exchange.failed(block, node)
                swarm.quarantine(node)
                return
        except PeerBusy as err:
            now = time.monotonic()
            self.exchange.refused(block, node, now, now + err.retry_after)
            return
        except PeerGone as err:
            log.info("%s: block %d from peer %s: %s", self.image_id, block, node, err)
            self.exchange.failed(block, node)
            return
        except PeerError as err:
            log.info("%s: block %d from peer %s failed: %s", self.image_id, block, node, err)
            self.metrics.peer_errors.inc()
            self.metrics.source_errors.labels("peer").inc()
            self.exchange.failed(block, node)
            if swarm.table.failed(node, time.monotonic()):
                log.warning("peer %s is down after repeated failures", node)
                swarm.gone_for_now(node)
            return
        except StorageError as err:
            self._error = err
            self._changed.set()
            return
        finally:
            self._changed.set()
        seconds = time.monotonic() - t0
        size = pieces_size(data)
        swarm.table.succeeded(node, size, seconds, time.monotonic())
        self.peers_used.add(node)
        self._account("peer", size, seconds)
        await self._landed(block, digest, last, node)

    # -- landing -----------------------------------------------------------------------------

    async def _landed(self, block: int, digest: bytes, last: bool, node: str | None) -> None:
        """A block is written and checked: tell the exchange and the neighbours; seal its
        chunk if it was the last one."""
        now = time.monotonic()
        for other in self.exchange.landed(block, node, now):
            task = self._reads.get((block, other))
            if task is not None and task is not asyncio.current_task():
                task.cancel()  # a slower copy (endgame)
        self.lane.landed(now)
        if self.swarm is not None:
            self.swarm.announce_have(self.image_id, block, digest)
        self._changed.set()
        if last:
            self._seal_soon(
                block * self.image.manifest.block_size // self.image.manifest.chunk_size
            )

    def _seal_soon(self, chunk: int) -> None:
        seal = asyncio.create_task(self._seal(chunk))
        self._seals.add(seal)
        seal.add_done_callback(self._seals.discard)

    async def _seal(self, chunk: int) -> None:
        try:
            await self._thread(self.image.seal_chunk, chunk)
        except IntegrityError as err:
            log.warning("%s: %s; fetching them again", self.image_id, err.detail)
            self.metrics.verification_failures.labels("chunk").inc()
            m = self.image.manifest
            self.exchange.lost(b for b in m.blocks_of(chunk) if not self.image.has_block(b))
            self._changed.set()
            return
        except SwarmcacheError as err:
            self._error = err
            self._changed.set()
            self._hash_wake.set()
            return
        self._chunk_ready(chunk)

    def _chunk_ready(self, index: int, announce: bool = False) -> None:
        """Chunk `index` is readable: on its way to durable, hashable, waiters woken."""
        log.debug("%s: chunk %d sealed", self.image_id, index)
        if announce and self.swarm is not None:  # re-checked after a restart
            m = self.image.manifest
            for b in m.blocks_of(index):
                digest = m.block_digest(b)
                if digest is not None:
                    self.swarm.announce_have(self.image_id, b, digest)
        if not announce:
            self._unsynced.append(index)
            self._dirty.set()
        self._hash_wake.set()
        for fut in self._waiters.pop(index, ()):
            if not fut.done():
                fut.set_result(None)

    async def _idle(self) -> None:
        """Wait until something changed, or a short tick (busy peers, endgame, stall)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_TICK):
                await self._changed.wait()

    async def _flusher(self) -> None:
        while True:
            if not self._unsynced and not self._closing:
                self._dirty.clear()
                await self._dirty.wait()
            batch, self._unsynced = self._unsynced, []
            if batch:
                await self._thread(self.image.sync_chunks, batch)
            elif self._closing:
                return

    def _account(self, source: str, nbytes: int, seconds: float) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %d bytes from %s in %.3fs", self.image_id, nbytes, source, seconds)
        self.metrics.chunk_latency.labels(source).observe(seconds)
        self.metrics.bytes_fetched.labels(source).inc(nbytes)
        self.bytes_by_source[source] += nbytes

    async def _hasher(self) -> None:
        """Advance the image's sha256 over the readable prefix, as chunks are sealed."""
        chunks = self.image.manifest.chunks
        while self._hash_next < chunks:
            if self._error is not None:
                return
            if not self.image.has(self._hash_next):
                self._hash_wake.clear()
                await self._hash_wake.wait()
                continue
            run = []
            i = self._hash_next
            while i < chunks and self.image.has(i):
                run.append(i)
                i += 1
            self._hash_next = i
            await self._thread(self._hash_run, run)

    def _hash_run(self, run: list[int]) -> None:
        """Add chunks to the sha256 in order, read back from the page cache (in a thread)."""
        for index in run:
            self._sha.update(self.image.read_chunk(index))

    def _verify(self) -> None:
        manifest = self.image.manifest
        sha256 = self._sha.hexdigest()
        if manifest.origin_sha256 is not None and sha256 != manifest.origin_sha256:
            self.metrics.verification_failures.labels("image").inc()
            if self.swarm is not None and self.peers_used:
                # Each chunk matched its holder's digest, so a holder lied consistently:
                # we cannot tell which, so none of them is trusted for a while.
                log.warning(
                    "%s failed its sha256 with chunks from peers %s: quarantining them",
                    self.image_id,
                    ", ".join(sorted(self.peers_used)),
                )
                for node in self.peers_used:
                    self.swarm.quarantine(node)
            raise IntegrityError(
                f"{self.image_id}: sha256 {sha256} does not match the origin's "
                f"{manifest.origin_sha256}; image discarded"
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


class Fetcher:
    """Owns every running FetchJob (at most one per image) and the I/O thread pool."""

    def __init__(
        self,
        store: Store,
        origin: Origin,
        metrics: Metrics,
        concurrency: int,
        chunk_size: int,
        swarm: Swarm | None = None,
        block_size: int = 256 * 1024,
    ) -> None:
        self.swarm = swarm
        self.store = store
        self.origin = origin
        self.block_size = block_size
        self.metrics = metrics
        self.concurrency = concurrency
        self.chunk_size = chunk_size
        self.jobs: dict[str, FetchJob] = {}
        self.failures: dict[str, Failure] = {}
        self.executor = ThreadPoolExecutor(
            max_workers=concurrency + 4, thread_name_prefix="swarmcache-io"
        )
        self._starting: dict[str, asyncio.Task[Any]] = {}
        self._stats: dict[str, asyncio.Task[Any]] = {}
        self._origin_stats: dict[str, asyncio.Task[Any]] = {}
        self._fresh: dict[str, tuple[float, Manifest]] = {}  # ride-alongs: (when, origin's)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()  # deletes, stats saves, ride-alongs
        self._reserved: dict[str, int] = {}  # bytes promised to fetches being set up
        self._joined: dict[str, tuple[float, set[str]]] = {}  # image -> (when, hosts named)
        self.stopping = False
        self._closed = False

    def _lock(self, image_id: str) -> asyncio.Lock:
        """The lock that orders starting and removing one image's cache entry."""
        lock = self._locks.get(image_id)
        if lock is None:
            lock = self._locks[image_id] = asyncio.Lock()
        return lock

    async def manifest_for(self, image_id: str) -> Manifest:
        """The manifest of a cached image, or a fresh one: from the image's readers when
        they have it (N hosts starting together ask the origin about once), else from
        the origin's stat."""
        image = self.store.get(image_id)
        if image is not None:
            return image.manifest
        # single-flight: concurrent first readers of an image ask once
        return await self._shared(self._stats, image_id, lambda: self._find_manifest(image_id))

    async def _find_manifest(self, image_id: str) -> Manifest:
        if self.swarm is not None:
            found, hosts = await self.swarm.join(image_id)
            self._joined[image_id] = (time.monotonic(), hosts)
            if found is not None and found.block_size == self.block_size:
                log.info(
                    "%s: manifest from peers (%d bytes, origin sha256 %s); not asking the origin",
                    image_id,
                    found.size,
                    found.origin_sha256,
                )
                return dataclasses.replace(
                    found.restarted(), block_size=found.block_size, block_digests=bytearray()
                )
        return await self._origin_manifest(image_id)

    async def _origin_manifest(self, image_id: str) -> Manifest:
        """A fresh manifest from the origin's stat (single-flight per image)."""
        return await self._shared(self._origin_stats, image_id, lambda: self._stat_origin(image_id))

    async def _stat_origin(self, image_id: str) -> Manifest:
        try:
            stat = await self.origin.stat(image_id)
        except ImageNotFound:
            raise
        except SwarmcacheError as err:
            self.metrics.source_errors.labels(self.origin.name).inc()
            self._record_failure(image_id, err, None)
            raise
        manifest = Manifest(
            image_id=image_id,
            size=stat.size,
            chunk_size=self.chunk_size,
            origin_sha256=stat.sha256,
            origin_validator=stat.validator,
            block_size=self.block_size,
        )
        # kept here, in the one task all callers share, not by a caller that wakes up
        # later: a Join handled in between would find neither and ask the origin again
        self._fresh.pop(image_id, None)
        self._fresh[image_id] = (time.monotonic(), manifest)
        while len(self._fresh) > MAX_FAILURES:
            del self._fresh[next(iter(self._fresh))]
        return manifest.restarted()

    async def ride_along(self, image_id: str) -> Manifest | None:
        """A host joined an image we read from the origin: fetch it too if we do not
        (our share is read by nobody else), and answer with our manifest. Never asks
        other readers (they may be asking us): only the store or the origin."""
        image = self.store.get(image_id)
        if image is None or not image.complete:
            if image is not None and image_id in self.jobs:
                return image.manifest
            # every host that starts Joins us, and our own fetch takes a moment to
            # begin: the origin's answer of the last FRESH_FOR seconds does for them
            fresh = self._fresh.get(image_id)
            if fresh is None or time.monotonic() - fresh[0] >= FRESH_FOR:
                await self._origin_manifest(image_id)  # the stat itself fills _fresh
                fresh = self._fresh[image_id]
            manifest = fresh[1].restarted()  # the store fills in what it gets
            self.in_background_async(self.start(image_id, fresh=manifest), f"ride-{image_id}")
            image = self.store.get(image_id)
            return image.manifest if image is not None else manifest
        if not image.manifest.block_size:
            await asyncio.to_thread(image.ensure_blocks, self.block_size)
        return image.manifest

    def in_background_async(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run a coroutine without making a request wait; its failure is logged."""
        if self._closed or self.stopping:
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    async def _shared(
        self,
        table: dict[str, asyncio.Task[Any]],
        image_id: str,
        make: Callable[[], Coroutine[Any, Any, T]],
    ) -> T:
        """Run make() once per image however many callers wait; a caller that goes away
        (a client hanging up) does not cancel it for the others."""
        task = table.get(image_id)
        if task is None:
            task = asyncio.create_task(make(), name=f"shared-{image_id}")
            table[image_id] = task

            def done(t: asyncio.Task[Any]) -> None:
                if table.get(image_id) is t:
                    del table[image_id]
                if not t.cancelled():
                    t.exception()  # retrieved, even if every caller went away

            task.add_done_callback(done)
        try:
            result: T = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # cancel_all() stopped the shared work, not our caller: say so
                raise ShuttingDown(f"the daemon is stopping ({image_id})") from None
            raise
        return result

    async def start(self, image_id: str, fresh: Manifest | None = None) -> FetchJob | None:
        """The running job for an image, started if needed; None if already complete.

        `fresh` is a manifest just built from the origin's stat, to save asking again.
        """
        if image_id in self.jobs:
            return self.jobs[image_id]
        image = self.store.get(image_id)
        if image is not None and image.complete:
            return None
        if self.stopping:
            raise ShuttingDown(f"the daemon is stopping; not starting a fetch of {image_id}")
        return await self._shared(
            self._starting, image_id, lambda: self._start_locked(image_id, fresh)
        )

    async def _start_locked(self, image_id: str, fresh: Manifest | None) -> FetchJob | None:
        try:
            async with self._lock(image_id):
                return await self._start(image_id, fresh)
        except SwarmcacheError as err:
            if not isinstance(err, (ImageNotFound, ShuttingDown)):
                self._record_failure(image_id, err, None)
            raise

    async def _start(self, image_id: str, fresh: Manifest | None) -> FetchJob | None:
        if image_id in self.jobs:
            return self.jobs[image_id]
        manifest = fresh or await self._find_manifest(image_id)
        image = self.store.get(image_id)
        if image is not None and image.complete:
            return None
        if image is not None and not image.manifest.same_source(manifest):
            log.info(
                "%s changed at the origin; dropping %d cached chunks",
                image_id,
                image.present_chunks,
            )
            self._purge(self.store.remove(image_id, force=True))
            image = None
        self.check_fits(manifest)
        self._evict(manifest.size - (image.present_bytes if image else 0), keep=image_id)
        if image is None:
            self._reserved[image_id] = manifest.size  # counted by _evict while we wait
            try:
                image = await asyncio.to_thread(self.store.make_entry, manifest)
            finally:
                del self._reserved[image_id]
            self.store.add(image)
        if self.stopping:
            raise ShuttingDown(f"the daemon is stopping; not starting a fetch of {image_id}")
        image.cut(self.block_size)
        joined = self._joined.pop(image_id, None)
        fresh_join = joined is not None and time.monotonic() - joined[0] < JOIN_KEPT
        hosts = joined[1] if joined is not None and fresh_join else None
        if self.swarm is not None and hosts is None:
            _, hosts = await self.swarm.join(image_id)
        job = FetchJob(
            image, self.origin, self.metrics, self.concurrency, self.executor, self.swarm, hosts
        )
        self.jobs[image_id] = job
        self.failures.pop(image_id, None)
        self._tasks[image_id] = asyncio.create_task(self._run(job), name=f"fetch-{image_id}")
        log.info(
            "fetch %s started: %d bytes, %d chunks, %d durable",
            image_id,
            manifest.size,
            manifest.chunks,
            image.present_chunks,
        )
        return job

    def check_fits(self, manifest: Manifest) -> None:
        """Raise StorageError (507) for an image that can never fit in cache.max_size."""
        if manifest.size > self.store.max_size:
            raise StorageError(
                f"image {manifest.image_id} ({manifest.size} bytes) is larger than "
                f"cache.max_size ({self.store.max_size} bytes)"
            )

    async def _run(self, job: FetchJob) -> None:
        image_id = job.image_id
        try:
            await job.run()
        except asyncio.CancelledError:
            log.info(
                "fetch %s cancelled after %.2fs: %d durable chunks kept",
                image_id,
                time.monotonic() - job.started,
                job.image.present_chunks,
            )
            raise
        finally:
            self.jobs.pop(image_id, None)
            self._tasks.pop(image_id, None)
        elapsed = time.monotonic() - job.started
        err = job.result.exception() if job.result.done() else None
        if err is None:
            self.metrics.fetches.labels("complete").inc()
            self.metrics.fetch_duration.observe(elapsed)
            log.info(
                "fetch %s complete: %d bytes in %.2fs, sources %s",
                image_id,
                job.image.manifest.size,
                elapsed,
                dict(job.bytes_by_source),
            )
            self._evict(0)
            return
        self.metrics.fetches.labels("failed").inc()
        assert isinstance(err, SwarmcacheError)
        self._record_failure(image_id, err, job.image.manifest.size)
        log.error("fetch %s failed after %.2fs: %s", image_id, elapsed, err.detail)
        if isinstance(err, IntegrityError) and self.store.get(image_id) is job.image:
            # Never keep bytes that failed the whole-image check.
            self._purge(self.store.remove(image_id, force=True))
            self._gone(image_id)

    def _record_failure(self, image_id: str, err: SwarmcacheError, size: int | None) -> None:
        self.failures.pop(image_id, None)
        self.failures[image_id] = Failure(err, time.time(), size)
        while len(self.failures) > MAX_FAILURES:
            del self.failures[next(iter(self.failures))]

    def _evict(self, incoming: int, keep: str | None = None) -> None:
        """Evict for `incoming` bytes plus what every running fetch still has to write."""
        reserved = sum(
            j.image.manifest.size - j.image.present_bytes for i, j in self.jobs.items() if i != keep
        ) + sum(n for i, n in self._reserved.items() if i != keep)
        in_use = set(self.jobs) | ({keep} if keep else set())
        before = set(self.store.images)
        trash = self.store.evict(in_use, incoming + reserved)
        for image_id in before - set(self.store.images):
            self._gone(image_id)
        self.metrics.evictions.inc(len(trash))
        for path in trash:
            self._purge(path)

    def evict_now(self) -> None:
        """Bring the cache under max_size now (at start-up)."""
        self._evict(0)

    def _gone(self, image_id: str) -> None:
        if self.swarm is not None:
            self.swarm.announce_gone(image_id)

    def _purge(self, path: Path) -> None:
        """Delete a removed entry's files in a thread, tracked until done."""
        self.in_background(self.store.purge, path)

    def in_background(self, fn: Callable[..., None], *args: Any) -> None:
        """Run blocking `fn` in a thread without making a request wait; awaited at close.

        Nothing new starts once the fetcher is closed (Store.close saves what is left).
        """
        if self._closed:
            return
        task = asyncio.create_task(asyncio.to_thread(fn, *args))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    async def remove(self, image_id: str) -> None:
        """Cancel the image's fetch, if any, and drop it (ImageBusy while it is read)."""
        async with self._lock(image_id):
            image = self.store.get(image_id)
            if image is None:
                if self.failures.pop(image_id, None) is None:
                    raise ImageNotFound(f"image {image_id!r} is not in the cache")
                return
            if image.readers:
                raise ImageBusy(f"image {image_id!r} is being read by {image.readers} client(s)")
            task = self._tasks.get(image_id)
            if task is not None:
                task.cancel()
                # wait() lets our own cancellation through but not the task's: the fetch
                # must have stopped (threads included) before its files go.
                await asyncio.wait({task})
            self._purge(self.store.remove(image_id))
            self._gone(image_id)
            self.failures.pop(image_id, None)

    async def wait(self, image_id: str, seconds: float) -> None:
        """Return once the image's running fetch has ended (its outcome recorded), or
        after `seconds`; at once if none runs."""
        task = self._tasks.get(image_id)
        if task is not None and seconds > 0:
            # wait() neither cancels the fetch on timeout nor raises its failure
            await asyncio.wait({task}, timeout=seconds)

    async def resume_partial(self) -> None:
        """Restart the fetch of every partial image (after a restart or crash)."""
        for image_id, image in list(self.store.images.items()):
            if image.complete:
                continue
            try:
                await self.start(image_id)
            except SwarmcacheError as err:
                log.warning("cannot resume %s: %s", image_id, err.detail)

    async def cancel_all(self) -> None:
        """Start no more fetches; cancel every running one and wait until each stopped."""
        self.stopping = True
        tasks = [
            *self._tasks.values(),
            *self._starting.values(),
            *self._stats.values(),
            *self._origin_stats.values(),
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel every running fetch, wait for it and for pending deletes, stop the pool."""
        await self.cancel_all()
        self._closed = True
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.executor.shutdown(wait=True)
