"""Landing: where the blocks of one fetch go to disk. No network.

A block lands once its bytes are written and match their digest (`write`); it can be
served on at once. When the last block of a chunk lands, the chunk is sealed: read
back, every block checked once more against its digest, and made readable to
clients (`on_ready`). Sealed chunks become durable in group commits (the flusher),
and the image's hash (the origin's algorithm, sha256 if it names none) advances
over the sealed prefix in order (the hasher), so the whole-image check needs no
second pass over the file. Blocking calls run in the fetcher's thread pool and are
tracked: `close` waits for every one of them, so no thread writes to an image after its fetch ended.

Blocks are written on the event loop itself, not in a thread, while the disk keeps up:
a 256 KiB write into the page cache and its digest take tens of microseconds, and the
trip to a thread and back (queue, wake-up, GIL hand-over, the loop's self-pipe) cost
more than that. Measured with two daemons on loopback (512 MiB, one peer to the
other): receiver CPU 3.53 -> 2.97 core-s per GiB, wall 1.94 -> 1.62 s. A write can
block, though, when the kernel throttles writers because the disk is behind: so when
the chunks sealed but not yet durable pass INLINE_BACKLOG bytes (the flusher's fsync
lags the network), or when one write on the loop took longer than SLOW_WRITE, block
writes go to the thread pool again (for SLOW_PAUSE seconds after a slow one). The
backlog counts this image's sealed chunks only: blocks of chunks not yet sealed and
other fetches' dirty pages are not in it; SLOW_WRITE is the guard for those.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import IntegrityError, SwarmcacheError
from ..manifest import DEFAULT_HASH, Buffer, Checksum, Pieces
from ..metrics import Metrics
from ..store import CachedImage

log = logging.getLogger(__name__)
T = TypeVar("T")

INLINE_BACKLOG = 64 * 1024 * 1024  # bytes sealed, not yet durable: past this, writes go to threads
SLOW_WRITE = 0.05  # seconds: a write on the loop that took longer sends the next ones to threads
SLOW_PAUSE = 10.0  # ... for this long


class Landing:
    """Writes, seals, makes durable and hashes the blocks of one image."""

    def __init__(
        self,
        image: CachedImage,
        executor: ThreadPoolExecutor,
        metrics: Metrics,
        on_ready: Callable[[int], None],
        on_lost: Callable[[list[int]], None],
        on_error: Callable[[SwarmcacheError], None],
    ) -> None:
        self.image = image
        self.executor = executor
        self.metrics = metrics
        self.on_ready = on_ready  # a chunk became readable
        self.on_lost = on_lost  # blocks that failed their check on disk: fetch them again
        self.on_error = on_error  # the disk failed: the fetch ends
        self._threads: set[concurrent.futures.Future[Any]] = set()
        self._seals: set[asyncio.Task[None]] = set()
        self._unsynced: list[int] = []
        self._dirty = asyncio.Event()
        self._closing = False
        origin_hash = image.manifest.origin_hash
        self._algo = origin_hash.algo if origin_hash is not None else DEFAULT_HASH
        self._sha = hashlib.new(self._algo)
        self._hash_next = 0  # chunks before this one are in _sha or being added to it
        self._hash_wake = asyncio.Event()
        self.error: SwarmcacheError | None = None
        self._threads_until = float("-inf")  # block writes go to threads until then
        self._syncing = 0  # chunks in the flusher's fdatasync now
        self.inline_writes = 0  # blocks written on the event loop (for tests)

    async def thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking `fn` in the pool, tracked until it really ends."""
        cf = self.executor.submit(fn, *args)
        self._threads.add(cf)
        cf.add_done_callback(self._threads.discard)
        return await asyncio.wrap_future(cf)

    # -- blocks and chunks --------------------------------------------------------------

    async def write(self, block: int, data: Buffer | Pieces, expected: bytes | None) -> bytes:
        """Write one block in a thread and return its digest; when it was the last
        block of its chunk, the chunk is sealed next. With `expected` (a peer's
        announced digest), a block that does not match it is not written: the
        IntegrityError names both digests. A trusted (signed) manifest's digest is
        expected of every block, from a peer or from the origin."""
        m = self.image.manifest
        if m.trusted:
            expected = m.block_digest(block)

        def check_and_write() -> tuple[bytes, bool]:
            pieces = [data] if isinstance(data, Buffer) else data
            digest = self.image.manifest.hash_block(pieces)
            if expected is not None and digest != expected:
                return digest, False
            return digest, self.image.write_block(block, pieces, digest)

        start = time.monotonic()
        if self._inline(start):
            digest, last = check_and_write()
            self.inline_writes += 1
            took = time.monotonic() - start
            if took > SLOW_WRITE:
                log.info(
                    "%s: writing block %d took %.3f s; block writes go to threads for %g s",
                    self.image.image_id,
                    block,
                    took,
                    SLOW_PAUSE,
                )
                self._threads_until = start + took + SLOW_PAUSE
        else:
            digest, last = await self.thread(check_and_write)
        if expected is not None and digest != expected:
            raise IntegrityError(
                f"block {block} of {self.image.image_id} has digest {digest.hex()}, "
                f"{'signed' if m.trusted else 'announced'} {expected.hex()}"
            )
        if last:
            self.seal_soon(block * m.block_size // m.chunk_size)
        return digest

    def _inline(self, now: float) -> bool:
        """Write the next block on the event loop (see the module's docstring)."""
        if now < self._threads_until:
            return False
        waiting = len(self._unsynced) + self._syncing
        return waiting * self.image.manifest.chunk_size <= INLINE_BACKLOG

    def seal_soon(self, chunk: int) -> None:
        """Seal chunk `chunk` (every block of it is written) in the background."""
        seal = asyncio.create_task(self._seal(chunk))
        self._seals.add(seal)
        seal.add_done_callback(self._seals.discard)

    async def _seal(self, chunk: int) -> None:
        try:
            await self.thread(self.image.seal_chunk, chunk)
        except IntegrityError as err:
            log.warning("%s: %s; fetching them again", self.image.image_id, err.detail)
            self.metrics.verification_failures.labels("chunk").inc()
            m = self.image.manifest
            self.on_lost([b for b in m.blocks_of(chunk) if not self.image.has_block(b)])
            return
        except SwarmcacheError as err:
            self._failed(err)
            return
        self.ready(chunk)

    def ready(self, index: int, durable: bool = False) -> None:
        """Chunk `index` is readable: hashable, on its way to durable unless it is
        already (re-checked after a restart), readers told."""
        log.debug("%s: chunk %d sealed", self.image.image_id, index)
        if not durable:
            self._unsynced.append(index)
            self._dirty.set()
        self._hash_wake.set()
        self.on_ready(index)

    def _failed(self, err: SwarmcacheError) -> None:
        self.error = err
        self._hash_wake.set()
        self.on_error(err)

    # -- durability and the whole-image hash ----------------------------------------------

    async def flusher(self) -> None:
        """Make sealed chunks durable in group commits until `finish` is called."""
        while True:
            if not self._unsynced and not self._closing:
                self._dirty.clear()
                await self._dirty.wait()
            batch, self._unsynced = self._unsynced, []
            if batch:
                self._syncing = len(batch)
                try:
                    await self.thread(self.image.sync_chunks, batch)
                finally:
                    self._syncing = 0
            elif self._closing:
                return

    async def hasher(self) -> None:
        """Advance the image's hash over the readable prefix, as chunks are sealed;
        returns when every chunk is in it (or the disk failed)."""
        chunks = self.image.manifest.chunks
        while self._hash_next < chunks:
            if self.error is not None:
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
            await self.thread(self._hash_run, run)

    def _hash_run(self, run: list[int]) -> None:
        """Add chunks to the hash in order, read back from the page cache (in a thread)."""
        for index in run:
            with self.image.read_chunk(index) as data:
                self._sha.update(data)

    @property
    def image_hash(self) -> Checksum:
        """The hash of what the hasher has seen (the image, once it returned)."""
        return Checksum(self._algo, self._sha.hexdigest())

    def finish(self) -> None:
        """No more chunks: the flusher makes the last ones durable and returns."""
        self._closing = True
        self._dirty.set()

    async def close(self) -> None:
        """Stop sealing, wait for every thread, and make what was sealed durable
        (a failed or cancelled fetch keeps what it got; not after a failed sync: then
        the store forgot every unlogged chunk and has() filters them out)."""
        for seal in list(self._seals):
            seal.cancel()
        await asyncio.gather(*self._seals, return_exceptions=True)
        # Threads cannot be cancelled: wait for the ones still writing to this image's
        # files, so nobody closes or deletes them underneath.
        await asyncio.gather(
            *(asyncio.wrap_future(f) for f in list(self._threads)), return_exceptions=True
        )
        batch = [i for i in self._unsynced if self.image.has(i)]
        self._unsynced = []
        if batch:
            with contextlib.suppress(SwarmcacheError):
                await self.thread(self.image.sync_chunks, batch)
