"""Fetching images into the store: chunk sources, one job per image, single-flight.

A FetchJob fills one CachedImage. Its workers take chunk indices from a pure
ChunkPlan, read each chunk from a ChunkSource (the origin today; peers are a second
kind of source), hash and write it in a thread, and wake the readers waiting for
that chunk. The image's sha256 advances as chunks land; it must match the origin's
before the image is complete.

The Fetcher keeps at most one job per image, so any number of concurrent readers
of an uncached image cause exactly one read of each chunk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .errors import (
    FetchFailed,
    ImageBusy,
    ImageNotFound,
    IntegrityError,
    PeerError,
    PeerGone,
    ShuttingDown,
    StorageError,
    StreamRefused,
    SwarmcacheError,
)
from .manifest import Manifest, Pieces, pieces_digest, pieces_size
from .metrics import Metrics
from .origin import Origin, Sink
from .planner import DONE, SwarmPlan
from .store import CachedImage, Store

if TYPE_CHECKING:
    from .peers.swarm import Swarm

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_FAILURES = 1000  # failure records kept for the API; the oldest go first
UNHASHED_BYTES = 64 * 1024 * 1024  # per job: chunks kept in memory for the hasher
CHECK_BATCH = 16  # chunks re-checked per thread call when a fetch resumes
REFRESH_EVERY = 2.0  # seconds between looks for peers that came up during a fetch
IDLE_TICK = 1.0  # longest sleep of an idle worker (deadlines of peers' chunks expire)
ENDGAME_CHUNKS = 8  # with this few chunks left, slow peer reads get a second source
ENDGAME_AFTER = 1.0  # seconds a peer read runs at least before the endgame doubles it
ENDGAME_FACTOR = 3.0  # ... and this many times the usual peer read time of the fetch
STREAM_BATCH = 256 * 1024  # bytes of a chunk in flight handed to streaming peers at once


class ChunkSource(Protocol):
    """Anything that can hand over the bytes of one chunk."""

    name: str

    async def read_chunk(
        self, manifest: Manifest, index: int, sink: Sink | None = None
    ) -> list[bytes]:
        """The bytes of chunk `index`, in pieces (unverified: the caller checks them)."""
        ...


class OriginSource:
    """The origin as a chunk source."""

    name = "origin"

    def __init__(self, origin: Origin) -> None:
        self.origin = origin

    async def read_chunk(
        self, manifest: Manifest, index: int, sink: Sink | None = None
    ) -> list[bytes]:
        """Read the chunk's byte range from the origin (retries inside)."""
        offset, length = manifest.span(index)
        return await self.origin.read(
            manifest.image_id, offset, length, manifest.origin_validator, manifest.size, sink
        )


class InFlight:
    """A chunk on its way from the origin, which peers may stream before it landed.

    The origin read feeds it piece by piece (a retry restarts it); readers get the
    pieces in batches of STREAM_BATCH bytes, each joined on first use and then shared,
    so each of the peers streaming the chunk wakes and writes once per batch, not once
    per socket read (and a chunk nobody streams is never joined). Once the chunk is
    checked and written, `finish` records its digest. Readers wait on `changed()`.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.attempt = 0  # moves on restart: a reader mid-way must give up
        self.digest: bytes | None = None
        self.failed = False
        self.relayed = False  # it comes from the peer reading it, not from the origin
        self._event = asyncio.Event()
        self._pieces: list[bytes] = []  # as fed
        self._fed = 0  # bytes in _pieces
        self._ends: list[int] = []  # batch k is _pieces[_ends[k-1]:_ends[k]]
        self._pending = 0  # bytes fed since the last batch
        self._joined: dict[int, bytes] = {}

    @property
    def batches(self) -> int:
        """Batches ready for readers."""
        return len(self._ends)

    def batch(self, k: int) -> bytes:
        """The bytes of batch `k` (< batches)."""
        joined = self._joined.get(k)
        if joined is None:
            parts = self._pieces[self._ends[k - 1] if k else 0 : self._ends[k]]
            joined = self._joined[k] = parts[0] if len(parts) == 1 else b"".join(parts)
        return joined

    def restart(self) -> None:
        """A new origin attempt: the bytes fed so far are void."""
        self._pieces, self._fed, self._ends, self._pending = [], 0, [], 0
        self._joined = {}
        self.attempt += 1
        self._wake()

    def feed(self, data: bytes) -> None:
        """The next piece from the origin."""
        self._pieces.append(data)
        self._fed += len(data)
        self._pending += len(data)
        if self._pending >= STREAM_BATCH or self._fed >= self.length:
            self._ends.append(len(self._pieces))
            self._pending = 0
            self._wake()

    def finish(self, digest: bytes | None) -> None:
        """The chunk landed with this digest (None: it failed)."""
        self.digest = digest
        self.failed = digest is None
        self._wake()

    @property
    def over(self) -> bool:
        """Finished or failed: nothing more will be fed."""
        return self.digest is not None or self.failed

    async def changed(self) -> None:
        """Wait for the next piece, restart or end."""
        await self._event.wait()

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


@dataclass
class Failure:
    """Why the last fetch of an image failed."""

    error: SwarmcacheError
    at: float
    size: int | None


class FetchJob:
    """Fetches the missing chunks of one image, verifies it, makes it durable.

    Three things run at once: workers fetch chunks and write them (a written chunk
    can be read at once), a flusher makes written chunks durable in group commits
    (fdatasync of the data, then their log records), and the sha256 of the image
    advances over the written prefix as chunks land, so the whole-image check needs
    no second read of the file. `verified` resolves when the checksum passed,
    `result` when the image is also durable and marked complete.
    """

    def __init__(
        self,
        image: CachedImage,
        sources: list[ChunkSource],
        metrics: Metrics,
        concurrency: int,
        executor: ThreadPoolExecutor,
        swarm: Swarm | None = None,
        peer_workers: int = 4,
        stream_workers: int = 8,
    ) -> None:
        self.image = image
        self.executor = executor
        self._threads: set[concurrent.futures.Future[Any]] = set()
        self.sources = sources
        self.metrics = metrics
        self.concurrency = concurrency
        self.swarm = swarm
        self.peer_workers = peer_workers if swarm is not None else 0
        self.stream_workers = stream_workers if swarm is not None else 0
        manifest = image.manifest
        present = [i for i in range(manifest.chunks) if image.has(i)]
        self.plan = (
            swarm.new_plan(manifest, present)
            if swarm is not None
            else SwarmPlan(manifest.chunks, present, "", manifest.image_id, stall=0.0)
        )
        self.taking: set[int] = set()  # chunks being read from the origin
        self.inflight: dict[int, InFlight] = {}  # the same, streamable to peers
        self._peer_reads: dict[int, dict[str, asyncio.Task[None]]] = {}
        self._read_started: dict[int, tuple[float, bool]] = {}  # first read: when, streamed
        # EWMA of successful peer read durations: held chunks (the peer's pace), streamed
        # ones (the origin's pace, set by the host reading it)
        self._read_time = {False: 0.0, True: 0.0}
        self.peers_used: set[str] = set()
        self.started = time.monotonic()
        self.bytes_by_source: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        self.verified: asyncio.Future[None] = loop.create_future()
        self.result: asyncio.Future[None] = loop.create_future()
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._changed = asyncio.Event()
        self._unsynced: list[int] = []
        self._dirty = asyncio.Event()
        self._closing = False
        self._sha = hashlib.sha256()
        self._hash_next = 0  # chunks before this one are in _sha or being added to it
        self._hash_wake = asyncio.Event()
        self._unhashed: dict[int, Pieces] = {}  # written chunks the hasher has not seen yet
        self._unhashed_bytes = 0

    @property
    def image_id(self) -> str:
        """The image being fetched."""
        return self.image.image_id

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
        }

    def poke(self) -> None:
        """Something changed (a peer's state): idle workers look at the plan again."""
        self._changed.set()

    def want(self, first: int, last: int) -> None:
        """A reader needs chunks first..last next: put a window of them ahead of the rest.

        The window (twice the worker count) keeps every worker busy on what the reader
        needs without queueing the chunk list of a whole 100 GiB image; the reader's
        wait_chunk() moves the window along.
        """
        stop = min(last + 1, first + 2 * self.concurrency, self.image.manifest.chunks)
        self.plan.want(i for i in range(first, stop) if not self.image.has(i))
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
        workers: asyncio.Future[Any] | None = None
        try:
            # Chunks logged before a restart are re-checked alongside the fetch of the rest.
            unchecked = self.image.unchecked()
            for index in unchecked:
                self.plan.hold(index)
            if self.swarm is not None:
                # peers' states first, so the origin is asked only for our share
                await self.swarm.join(self)
                log.debug(
                    "%s: %d other fetchers, handover %.3fs",
                    self.image_id,
                    len(self.plan.fetchers),
                    self.plan.handover,
                )
            tasks = (
                [
                    asyncio.create_task(self._origin_worker(), name=f"fetch-{self.image_id}-{n}")
                    for n in range(self.concurrency)
                ]
                + [
                    asyncio.create_task(self._peer_worker(False), name=f"peer-{self.image_id}-{n}")
                    for n in range(self.peer_workers)
                ]
                + [
                    asyncio.create_task(self._peer_worker(True), name=f"stream-{self.image_id}-{n}")
                    for n in range(self.stream_workers)
                ]
            )
            workers = asyncio.gather(*tasks)
            hasher = asyncio.create_task(self._hasher(), name=f"hash-{self.image_id}")
            flusher = asyncio.create_task(self._flusher(), name=f"flush-{self.image_id}")
            checker = asyncio.create_task(self._checker(unchecked), name=f"check-{self.image_id}")
            tasks += [hasher, flusher, checker]
            if self.swarm is not None:
                tasks.append(asyncio.create_task(self._refresher(), name=f"peers-{self.image_id}"))
            # Until every chunk is in and hashed, the first failure of any part ends it.
            pending: set[asyncio.Future[Any]] = {workers, hasher, flusher, checker}
            while not (workers.done() and hasher.done()):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for part in done:
                    part.result()
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
                self.swarm.leave(self)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if workers is not None and workers.done() and not workers.cancelled():
                workers.exception()  # retrieved: the failure was handled above
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
        for start in range(0, len(unchecked), CHECK_BATCH):
            batch = unchecked[start : start + CHECK_BATCH]
            bad = set(await self._thread(self.image.check_present, batch))
            for index in batch:
                if index in bad:
                    log.warning(
                        "%s: chunk %d on disk is corrupt; fetching it again", self.image_id, index
                    )
                    self.metrics.verification_failures.labels("chunk").inc()
                    self.plan.failed(index)
                else:
                    self.plan.done(index)
                    self._wake(index)
            self._changed.set()
            self._hash_wake.set()

    async def _origin_worker(self) -> None:
        """Read the chunks the plan gives the origin lane, one at a time."""
        while not self.plan.finished:
            self._changed.clear()
            index = (
                self.plan.next_origin(time.monotonic())
                if len(self.taking) < self._origin_slots()
                else None
            )
            if index is None:
                await self._idle()
                continue
            self.taking.add(index)
            flight = self.inflight[index] = InFlight(self.image.manifest.span(index)[1])
            if self.swarm is not None:
                self.swarm.announce_taking(self.image_id, index)
            try:
                await self._fetch_chunk(
                    index, self.sources[0], self.image.manifest.digest(index), flight
                )
            except BaseException:
                self.plan.failed(index)
                flight.finish(None)
                raise
            finally:
                self.taking.discard(index)
                del self.inflight[index]
            flight.finish(self.image.manifest.digest(index))
            self._landed(index)

    def _origin_slots(self) -> int:
        """Origin reads this host may have in flight: origin.concurrency shared by the hosts
        fetching the image, so the origin serves about that many streams in all, and
        each chunk arrives (and can be passed on to peers) as early as possible."""
        return max(1, -(-self.concurrency // (1 + len(self.plan.fetchers))))

    async def _peer_worker(self, streams: bool) -> None:
        """Read chunks from peers: held ones, or (`streams`) ones still arriving at a peer.

        Streams get workers of their own: they go at the origin's pace and must start
        the moment a peer announces the chunk, not when a held read frees a worker.
        A failing peer costs a retry elsewhere, not the fetch.
        """
        assert self.swarm is not None
        swarm = self.swarm
        limit = swarm.config.concurrency
        while not self.plan.finished:
            self._changed.clear()
            now = time.monotonic()

            def pick(holders: list[str], now: float = now) -> str | None:
                return swarm.table.rank(holders, now, limit)

            task = self.plan.next_peer(pick, now, streams=streams)
            if task is None and not streams:
                task = self._endgame(limit)
            if task is None:
                await self._idle()
                continue
            await self._peer_read(*task)

    def _endgame(self, limit: int) -> tuple[int, str, bool] | None:
        """Near the end, a chunk slow to come from one peer is asked of a second one too."""
        assert self.swarm is not None
        if self.plan.remaining > ENDGAME_CHUNKS:
            return None
        now = time.monotonic()
        for index, reads in self._peer_reads.items():
            started, streamed = self._read_started[index]
            # slow = well behind what such a read usually takes in this fetch; a streamed
            # chunk comes at the origin's pace, and doubling it early only splits our own
            # link between two copies
            slow = max(ENDGAME_AFTER, ENDGAME_FACTOR * self._read_time[streamed])
            if (
                self.plan.state[index] == DONE  # landed; the losers are being cancelled
                or len(reads) != 1
                or now - started < slow
            ):
                continue
            others = [n for n in self.plan.holders_of(index) if n not in reads]
            node = self.swarm.table.rank(others, now, limit)
            if node is not None:
                log.debug("%s: endgame: chunk %d also from %s", self.image_id, index, node)
                return index, node, False
        return None

    async def _peer_read(self, index: int, node: str, streamed: bool) -> None:
        """One read of a chunk from a peer; the first of duplicate reads to land wins."""
        assert self.swarm is not None
        reads = self._peer_reads.setdefault(index, {})
        if not reads:
            self._read_started[index] = (time.monotonic(), streamed)
        read = asyncio.create_task(self._fetch_from_peer(index, node, streamed))
        reads[node] = read
        peer = self.swarm.table.get(node)
        if peer is not None:
            peer.inflight += 1
        try:
            await read
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if read.cancelled() and current is not None and not current.cancelling():
                return  # a duplicate landed first
            raise
        except (PeerError, IntegrityError):
            if len(reads) == 1:  # no other read of it running: it is missing again
                self.plan.failed(index)
                self._changed.set()
            return
        finally:
            if peer is not None:
                peer.inflight -= 1
            reads.pop(node, None)
            if not reads:
                self._peer_reads.pop(index, None)
                self._read_started.pop(index, None)
        for other in list(reads.values()):
            other.cancel()
        self._peer_reads.pop(index, None)  # the cancelled reads are no longer candidates
        if self.plan.state[index] != DONE:
            self._landed(index)

    async def _fetch_from_peer(self, index: int, node: str, streamed: bool) -> None:
        taker = self.plan.taken.get(index, ("", 0.0))[0]
        relay = None
        if streamed and node == taker and index not in self.inflight:
            # pass it on as it arrives: we may be other hosts' relay (stream_source);
            # only a chunk that comes straight from its reader, so there are no chains
            relay = self.inflight[index] = InFlight(self.image.manifest.span(index)[1])
            relay.relayed = True
        checked = False
        try:
            checked = await self._fetch_from_peer_into(index, node, streamed, taker, relay)
        finally:
            if relay is not None:
                if self.inflight.get(index) is relay:
                    del self.inflight[index]
                # our digest only for the bytes we passed on and then checked ourselves
                relay.finish(self.image.manifest.digest(index) if checked else None)

    async def _fetch_from_peer_into(
        self, index: int, node: str, streamed: bool, taker: str, relay: InFlight | None
    ) -> bool:
        """One read; True if its bytes were checked and written here."""
        assert self.swarm is not None
        swarm = self.swarm
        t0 = time.monotonic()
        try:
            if streamed:
                # the digest comes after the bytes: the peer knows it once they are in
                data, expected = await swarm.read_chunk_streamed(
                    node,
                    self.image.manifest,
                    index,
                    relay.feed if relay is not None else None,
                    # we pass it on: the peer must send what it reads from the origin
                    to_relay=relay is not None,
                )
            else:
                announced = swarm.digest(self.image_id, node, index)
                if announced is None:
                    raise PeerError(f"peer {node} announced chunk {index} without a digest")
                expected = announced
                data = await swarm.read_chunk(node, self.image.manifest, index)
        except StreamRefused as err:
            log.debug("%s: chunk %d: %s", self.image_id, index, err)
            if node == taker:  # it is not reading it (any more): wait for news of it
                self.plan.not_taking(node, index)
            else:
                self.plan.relay_failed(index)  # from its reader next time
            raise
        except PeerError as err:
            if streamed and node != taker:
                # a relay is cut off when its own stream breaks: not its failure
                log.debug("%s: chunk %d via relay %s: %s", self.image_id, index, node, err)
                self.plan.relay_failed(index)
                raise
            if isinstance(err, PeerGone):  # counted once, where it went away
                log.info("%s: chunk %d from peer %s: %s", self.image_id, index, node, err)
                raise
            log.info("%s: chunk %d from peer %s failed: %s", self.image_id, index, node, err)
            self.metrics.peer_errors.inc()
            self.metrics.source_errors.labels("peer").inc()
            if swarm.table.failed(node, time.monotonic()):
                log.warning("peer %s is down after repeated failures", node)
                swarm.gone_for_now(node)
            raise
        if self.plan.state[index] == DONE:
            return False  # a duplicate read (endgame) landed first: nothing to store
        try:
            if not await self._store(index, data, expected):
                return False
        except IntegrityError:
            log.warning(
                "%s: chunk %d from peer %s does not match its digest; peer quarantined",
                self.image_id,
                index,
                node,
            )
            swarm.quarantine(node)
            raise
        seconds = time.monotonic() - t0
        usual = self._read_time[streamed]
        self._read_time[streamed] = seconds if not usual else 0.8 * usual + 0.2 * seconds
        size = pieces_size(data)
        swarm.table.succeeded(node, size, 0.0 if streamed else seconds, time.monotonic())
        self.peers_used.add(node)
        log.debug("%s: chunk %d from %s%s", self.image_id, index, node, " (streamed)" * streamed)
        self._account("peer", size, seconds)
        return True

    async def _idle(self) -> None:
        """Wait until the plan may have work (a change, or a peer's deadline passing)."""
        timeout = IDLE_TICK
        deadline = self.plan.next_deadline(time.monotonic())
        if deadline is not None:
            timeout = min(timeout, max(0.01, deadline - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def _refresher(self) -> None:
        assert self.swarm is not None
        while True:
            await asyncio.sleep(REFRESH_EVERY)
            await self.swarm.refresh(self)

    def _landed(self, index: int) -> None:
        """Chunk `index` is written and checked: readable, on its way to durable."""
        log.debug("%s: chunk %d landed", self.image_id, index)
        self.plan.done(index)
        self._unsynced.append(index)
        self._dirty.set()
        self._changed.set()
        self._wake(index)

    def _wake(self, index: int) -> None:
        if self.swarm is not None:
            digest = self.image.manifest.digest(index)
            if digest is not None:
                self.swarm.announce_have(self.image_id, index, digest)
        for fut in self._waiters.pop(index, ()):
            if not fut.done():
                fut.set_result(None)

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

    async def _fetch_chunk(
        self, index: int, source: ChunkSource, expected: bytes | None, sink: Sink | None = None
    ) -> None:
        manifest = self.image.manifest
        t0 = time.monotonic()
        try:
            data = await source.read_chunk(manifest, index, sink)
        except SwarmcacheError:
            self.metrics.source_errors.labels(source.name).inc()
            raise
        await self._store(index, data, expected)
        self._account(source.name, pieces_size(data), time.monotonic() - t0)

    async def _store(self, index: int, data: Pieces, expected: bytes | None) -> bool:
        """Check a chunk against `expected` and write it (in a thread); False if another
        read's copy was in already."""
        size = pieces_size(data)
        # the hasher takes it from memory, or (past the cap) from the page cache; a late
        # duplicate (endgame) of a chunk that is in or already hashed is not kept
        if (
            index >= self._hash_next
            and index not in self._unhashed
            and not self.image.has(index)
            and self._unhashed_bytes + size <= UNHASHED_BYTES
        ):
            self._unhashed[index] = data
            self._unhashed_bytes += size
        try:
            written = await self._thread(self._commit, index, data, expected)
        except BaseException:
            if self._unhashed.get(index) is data:  # not another read's copy of the chunk
                del self._unhashed[index]
                self._unhashed_bytes -= size
            raise
        self._hash_wake.set()
        return written

    def _account(self, source: str, nbytes: int, seconds: float) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %d bytes from %s in %.3fs", self.image_id, nbytes, source, seconds)
        self.metrics.chunk_latency.labels(source).observe(seconds)
        self.metrics.bytes_fetched.labels(source).inc(nbytes)
        self.bytes_by_source[source] += nbytes

    def _commit(self, index: int, data: Pieces, expected: bytes | None) -> bool:
        """Check and write one chunk (runs in a thread); False if it was in already."""
        if self.image.has(index):
            return False  # a duplicate read (endgame) lost the race
        digest = pieces_digest(data)
        if expected is not None and digest != expected:
            self.metrics.verification_failures.labels("chunk").inc()
            raise IntegrityError(f"chunk {index} of {self.image_id} does not match its digest")
        self.image.write_chunk(index, data, digest)
        return True

    async def _hasher(self) -> None:
        """Advance the image's sha256 over the readable prefix, as chunks land.

        The loop takes the run of readable chunks (with what memory holds of them) and
        a thread hashes it: only the loop touches `_unhashed` and its byte count.
        """
        chunks = self.image.manifest.chunks
        while self._hash_next < chunks:
            if not self.image.has(self._hash_next):
                self._hash_wake.clear()
                await self._hash_wake.wait()
                continue
            run: list[tuple[int, Pieces | None]] = []
            i = self._hash_next
            while i < chunks and self.image.has(i):
                data = self._unhashed.pop(i, None)
                if data is not None:
                    self._unhashed_bytes -= pieces_size(data)
                run.append((i, data))
                i += 1
            self._hash_next = i
            await self._thread(self._hash_run, run)

    def _hash_run(self, run: list[tuple[int, Pieces | None]]) -> None:
        """Add chunks to the sha256 in order, from memory or the page cache (in a thread)."""
        for index, data in run:
            for piece in data if data is not None else (self.image.read_chunk(index),):
                self._sha.update(piece)

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
    ) -> None:
        self.swarm = swarm
        self.store = store
        self.origin = origin
        self.sources: list[ChunkSource] = [OriginSource(origin)]
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
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()  # deletes, stats saves
        self._reserved: dict[str, int] = {}  # bytes promised to fetches being set up
        self.stopping = False
        self._closed = False

    def _lock(self, image_id: str) -> asyncio.Lock:
        """The lock that orders starting and removing one image's cache entry."""
        lock = self._locks.get(image_id)
        if lock is None:
            lock = self._locks[image_id] = asyncio.Lock()
        return lock

    async def manifest_for(self, image_id: str) -> Manifest:
        """The manifest of a cached image, or a fresh one from the origin's stat."""
        image = self.store.get(image_id)
        if image is not None:
            return image.manifest
        # single-flight: concurrent first readers of an image ask the origin once
        return await self._shared(self._stats, image_id, lambda: self._origin_manifest(image_id))

    async def _origin_manifest(self, image_id: str) -> Manifest:
        try:
            stat = await self.origin.stat(image_id)
        except ImageNotFound:
            raise
        except SwarmcacheError as err:
            self.metrics.source_errors.labels(self.origin.name).inc()
            self._record_failure(image_id, err, None)
            raise
        return Manifest(
            image_id=image_id,
            size=stat.size,
            chunk_size=self.chunk_size,
            origin_sha256=stat.sha256,
            origin_validator=stat.validator,
        )

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
        manifest = fresh or await self._origin_manifest(image_id)
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
        job = FetchJob(
            image, self.sources, self.metrics, self.concurrency, self.executor, self.swarm
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

    def _background_done(self, task: asyncio.Task[None]) -> None:
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
        tasks = [*self._tasks.values(), *self._starting.values(), *self._stats.values()]
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
