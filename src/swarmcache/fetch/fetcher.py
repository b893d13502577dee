"""The fetcher: at most one FetchJob per image, the I/O thread pool, manifests.

Any number of concurrent readers of an uncached image share one job, so each block
is read once. A new image's manifest comes from its readers in the swarm when they
have it (N hosts starting together ask the origin about once), else from the
origin's stat; a host that joins us for an image we read rides along (fetches it
too). Starting and removing an image's cache entry are ordered by a lock per image,
and the cache is kept under max_size (eviction) as fetches start and end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .. import buffers
from ..errors import (
    ImageBusy,
    ImageNotFound,
    IntegrityError,
    ManifestRefuted,
    ShuttingDown,
    StorageError,
    SwarmcacheError,
)
from ..limits import Limits
from ..manifest import DEFAULT_DIGEST, Checksum, Manifest
from ..metrics import Metrics
from ..origin import Origin, OriginImage
from ..peers.swarm import Swarm
from ..signing import Signer, key_id
from ..store import CachedImage, Store
from .job import FetchJob

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_FAILURES = 1000  # failure records kept for the API; the oldest go first
JOIN_KEPT = 10.0  # seconds the hosts a join named are used for the fetch that follows
FRESH_FOR = 10.0  # seconds an origin's answer about an image is used again
UPLOAD_GRACE = 60.0  # seconds a run of uploads of an image keeps it from eviction
RESETTLE = 5.0  # seconds between looks while uploads hold the cache over max_size
REFUTED_FOR = 60.0  # seconds peers' manifests of an image are not taken after a wrong one


@dataclass
class Failure:
    """Why the last fetch of an image failed."""

    error: SwarmcacheError
    at: float
    size: int | None


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
        digest_algo: str = DEFAULT_DIGEST,
        signer: Signer | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.swarm = swarm
        self.limits = limits or Limits()  # [limits]: the caps every fetch shares
        self.digest_algo = digest_algo
        self.signer = signer  # a seeder signs what it fetched and checked
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
        self._setting_up: set[str] = set()  # images whose job is not registered yet
        # a settle to come while uploads keep the cache over max_size (_evict)
        self._resettle: asyncio.TimerHandle | None = None
        self._joined: dict[str, tuple[float, set[str]]] = {}  # image -> (when, hosts named)
        # image -> when the origin refuted a peer's manifest of it (FetchJob._confirmed)
        self._refuted: dict[str, float] = {}
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
        refuted = self._refuted.get(image_id)
        if refuted is not None and time.monotonic() - refuted < REFUTED_FOR:
            return await self._origin_manifest(image_id)  # peers named a wrong version
        if self.swarm is not None:
            found, hosts = await self.swarm.join(image_id)
            self._joined[image_id] = (time.monotonic(), hosts)
            if (
                found is not None
                and found.block_size == self.block_size
                and found.digest_algo == self.digest_algo
            ):
                log.info(
                    "%s: manifest from peers (%d bytes, origin checksum %s); not asking the origin",
                    image_id,
                    found.size,
                    found.origin_hash,
                )
                return dataclasses.replace(found.restarted(), from_peer=True)
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
        manifest = self.manifest_from(image_id, stat)
        # kept here, in the one task all callers share, not by a caller that wakes up
        # later: a Join handled in between would find neither and ask the origin again
        self._fresh.pop(image_id, None)
        self._fresh[image_id] = (time.monotonic(), manifest)
        while len(self._fresh) > MAX_FAILURES:
            del self._fresh[next(iter(self._fresh))]
        return manifest.restarted()

    def manifest_from(self, image_id: str, stat: OriginImage) -> Manifest:
        """A fresh manifest for what the origin says about an image."""
        return Manifest(
            image_id=image_id,
            size=stat.size,
            chunk_size=self.chunk_size,
            origin_hash=stat.checksum,
            origin_validator=stat.validator,
            block_size=self.block_size,
            digest_algo=self.digest_algo,
        )

    async def start_version(self, manifest: Manifest) -> FetchJob | None:
        """`start` for the version `manifest` names (from a caller that asked the origin
        itself): a cached or fetching copy of another version is dropped first, even
        while it is read (its readers keep the old file open). The caller checks the
        version of what it gets: a start already under way with a manifest from the
        swarm may still win."""
        image_id = manifest.image_id
        async with self._lock(image_id):
            image = self.store.get(image_id)
            if image is not None and not image.manifest.same_version(manifest):
                log.info(
                    "%s: the cached copy (%s, %d bytes) is not the origin's version "
                    "(%s, %d bytes): dropping it",
                    image_id,
                    image.manifest.origin_hash,
                    image.manifest.size,
                    manifest.origin_hash,
                    manifest.size,
                )
                await self._remove_locked(image_id, force=True)
        return await self.start(image_id, fresh=manifest)

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
        # until the job is registered (a join in between), nobody's eviction takes it
        self._setting_up.add(image_id)
        try:
            return await self._set_up(image_id, manifest, image)
        finally:
            self._setting_up.discard(image_id)

    async def _set_up(
        self, image_id: str, manifest: Manifest, image: CachedImage | None
    ) -> FetchJob | None:
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
            found, hosts = await self.swarm.join(image_id)
            if found is not None and found.trusted and not image.manifest.trusted:
                # a signed manifest of this version (the Glance endpoint's path, or a
                # partial copy from before): every block is checked against it now
                if await asyncio.to_thread(image.adopt, found):
                    log.info("%s: signed manifest by key %s adopted", image_id,
                             key_id(found.signer))  # fmt: skip
                else:
                    log.warning(
                        "%s: chunks held here disagree with the signed manifest; "
                        "the whole-image check decides", image_id,
                    )  # fmt: skip
        job = FetchJob(
            image,
            self.origin,
            self.metrics,
            self.concurrency,
            self.executor,
            self.swarm,
            hosts,
            self.signer,
            self.limits,
        )
        if manifest.from_peer and self.swarm and self.swarm.trust:
            # a host that trusts signed manifests takes a peer's word for the origin's
            # current version from nobody (a signed manifest may be of an older one):
            # it asks the origin, while the bytes come
            job.confirm = asyncio.ensure_future(self._origin_manifest(image_id))
            job.confirm.add_done_callback(lambda f: f.cancelled() or f.exception())
            job.confirm_again = lambda: self._origin_manifest(image_id)
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
            if not self.jobs:  # nothing takes buffers until the next fetch: let them go
                buffers.SHARED.clear()
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
            self.settle_cache()
            return
        self.metrics.fetches.labels("failed").inc()
        assert isinstance(err, SwarmcacheError)
        self._record_failure(image_id, err, job.image.manifest.size)
        if isinstance(err, ManifestRefuted):  # the next fetch asks the origin, not peers
            self._refuted.pop(image_id, None)
            self._refuted[image_id] = time.monotonic()
            while len(self._refuted) > MAX_FAILURES:
                del self._refuted[next(iter(self._refuted))]
        log.error("fetch %s failed after %.2fs: %s", image_id, elapsed, err.detail)
        if isinstance(err, IntegrityError) and self.store.get(image_id) is job.image:
            # Never keep bytes that failed the whole-image check.
            self._purge(self.store.remove(image_id, force=True))
            self._gone(image_id)
        self.settle_cache()  # its partial copy is no longer in use

    def _record_failure(self, image_id: str, err: SwarmcacheError, size: int | None) -> None:
        self.failures.pop(image_id, None)
        self.failures[image_id] = Failure(err, time.time(), size)
        while len(self.failures) > MAX_FAILURES:
            del self.failures[next(iter(self.failures))]

    def _evict(self, incoming: int, keep: str | None = None, wait: bool = False) -> None:
        """Evict for `incoming` bytes plus what every running fetch still has to write
        (`wait`: see plan_eviction)."""
        reserved = sum(
            j.image.manifest.size - j.image.present_bytes for i, j in self.jobs.items() if i != keep
        ) + sum(n for i, n in self._reserved.items() if i != keep)
        # in use (besides images clients read: the store sees those): fetched here, or
        # fetched from us by peers (Swarm.uploading)
        uploads = self.swarm.uploading(UPLOAD_GRACE) if self.swarm is not None else set()
        in_use = set(self.jobs) | self._setting_up | uploads | ({keep} if keep else set())
        before = set(self.store.images)
        trash = self.store.evict(in_use, incoming + reserved, wait)
        # uploads that end without a word (a peer stops asking, the grace runs out) call
        # for no settle: look again while they may hold the cache over max_size
        if uploads and self._resettle is None and self.store.used_bytes() > self.store.max_size:
            self._resettle = asyncio.get_running_loop().call_later(RESETTLE, self._resettled)
        for image_id in before - set(self.store.images):
            self._gone(image_id)
        self.metrics.evictions.inc(len(trash))
        for path in trash:
            self._purge(path)

    def evict_now(self) -> None:
        """Bring the cache under max_size now (at start-up)."""
        self._evict(0)

    def _resettled(self) -> None:
        self._resettle = None
        self.settle_cache()

    def settle_cache(self) -> None:
        """Bring the cache back under max_size when an image stops being in use (a
        fetch, a client's read, or peers' reads of it ended), in LRU order: an image
        still in use that is next in that order is waited for, not passed over for a
        younger one (the image just fetched, say a pre-warm, for being last)."""
        if not (self._closed or self.stopping) and self.store.used_bytes() > self.store.max_size:
            self._evict(0, wait=True)

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

    async def remove(self, image_id: str, force: bool = False) -> None:
        """Cancel the image's fetch, if any, and drop it (ImageBusy while it is read,
        unless `force`: a reader of the dropped copy keeps reading its open file)."""
        async with self._lock(image_id):
            await self._remove_locked(image_id, force)

    async def _remove_locked(self, image_id: str, force: bool) -> None:
        image = self.store.get(image_id)
        if image is None:
            if self.failures.pop(image_id, None) is None and not force:
                raise ImageNotFound(f"image {image_id!r} is not in the cache")
            return
        if image.readers and not force:
            raise ImageBusy(f"image {image_id!r} is being read by {image.readers} client(s)")
        task = self._tasks.get(image_id)
        if task is not None:
            task.cancel()
            # wait() lets our own cancellation through but not the task's: the fetch
            # must have stopped (threads included) before its files go.
            await asyncio.wait({task})
        self._purge(self.store.remove(image_id, force=force))
        self._gone(image_id)
        self.failures.pop(image_id, None)

    async def ingest(
        self, manifest: Manifest, fill: Callable[[CachedImage], Awaitable[Checksum]]
    ) -> None:
        """Put an image into the cache from elsewhere than the origin (a seeder's local
        copy): `fill` writes every chunk durably and returns the hash of what it wrote,
        which must be the origin's checksum in `manifest`; the image is then complete
        (and signed, on a seeder). Under the image's lock: a read of it meanwhile waits
        and then finds it complete. A copy held before is replaced (ImageBusy while it
        is read or fetched)."""
        image_id = manifest.image_id
        async with self._lock(image_id):
            if image_id in self.jobs:
                raise ImageBusy(f"image {image_id!r} is being fetched")
            if self.store.get(image_id) is not None:
                await self._remove_locked(image_id, force=False)
            self.check_fits(manifest)
            self._evict(manifest.size, keep=image_id)
            # counted by every eviction until it is in the store (it is not before)
            self._reserved[image_id] = manifest.size
            try:
                await self._ingest_reserved(manifest, fill)
            finally:
                del self._reserved[image_id]

    async def _ingest_reserved(
        self, manifest: Manifest, fill: Callable[[CachedImage], Awaitable[Checksum]]
    ) -> None:
        image_id = manifest.image_id
        image = await asyncio.to_thread(self.store.make_entry, manifest)
        try:
            got = await fill(image)
            if got != manifest.origin_hash:
                self.metrics.verification_failures.labels("image").inc()
                raise IntegrityError(
                    f"the bytes' {got} is not the origin's {manifest.origin_hash} "
                    f"for {image_id}: not kept"
                )
            await asyncio.to_thread(image.mark_complete, got, self.signer)
        except BaseException:
            self._purge(self.store.discard(image))
            raise
        self.store.add(image)

    async def verify(self, image_id: str) -> tuple[int, list[int]]:
        """Re-hash the image's chunks on disk and drop the bad ones (swarmcache verify):
        (chunks checked, bad chunks). ImageBusy while it is being fetched."""
        async with self._lock(image_id):
            image = self.store.get(image_id)
            if image is None:
                raise ImageNotFound(f"image {image_id!r} is not in the cache")
            if image_id in self.jobs:
                raise ImageBusy(f"image {image_id!r} is being fetched; verify it after")
            checked, bad = await asyncio.to_thread(image.verify)
        if bad:
            self.metrics.verification_failures.labels("chunk").inc(len(bad))
            log.warning(
                "verify %s: %d of %d chunks do not match their digests on disk: dropped "
                "(fetched again on the next read): %s",
                image_id,
                len(bad),
                checked,
                bad[:20],
            )
            self._gone(image_id)  # peers must not count on what we held
        else:
            log.info("verify %s: %d chunks match their digests", image_id, checked)
        return checked, bad

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
        if self._resettle is not None:
            self._resettle.cancel()
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.executor.shutdown(wait=True)
