"""The parts of a fetch, each alone, on a real CachedImage in a temp dir.

Landing (write, seal, durable, whole-image hash) with no network at all; OriginReads
against a real directory origin. The parts report through plain callbacks, which the
tests record.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import swarmcache.fetch.landing as landing_mod
from swarmcache.config import OriginConfig
from swarmcache.errors import IntegrityError, SwarmcacheError
from swarmcache.exchange import Exchange, Geometry, OriginLane
from swarmcache.fetch.common import Tally, Wakeup
from swarmcache.fetch.landing import Landing
from swarmcache.fetch.origin_reads import OriginReads
from swarmcache.manifest import Checksum, Manifest, block_digest
from swarmcache.metrics import Metrics
from swarmcache.origin import make_origin
from swarmcache.store import CachedImage, Store

BLOCK = 16 * 1024
CHUNK = 4 * BLOCK
SIZE = 3 * CHUNK + 2 * BLOCK + 100  # a short last chunk with a short last block


@dataclass
class Reports:
    """What a part told the job."""

    ready: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    errors: list[SwarmcacheError] = field(default_factory=list)
    landed: list[tuple[int, bytes, str | None]] = field(default_factory=list)


@dataclass
class Bench:
    image: CachedImage
    data: bytes
    landing: Landing
    reports: Reports
    metrics: Metrics


@pytest.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    data = random.Random(7).randbytes(SIZE)
    store = Store(tmp_path / "cache", 1 << 30)
    store.open()
    manifest = Manifest("img", size=SIZE, chunk_size=CHUNK, block_size=BLOCK)
    image = store.make_entry(manifest)
    store.add(image)
    image.cut(BLOCK)
    reports = Reports()
    metrics = Metrics()
    with ThreadPoolExecutor(2) as pool:
        landing = Landing(
            image, pool, metrics, reports.ready.append, reports.lost.extend, reports.errors.append
        )
        yield Bench(image, data, landing, reports, metrics)
        await landing.close()
    store.close()


def block_bytes(b: Bench, block: int) -> bytes:
    offset, length = b.image.manifest.block_span(block)
    return b.data[offset : offset + length]


async def settle(b: Bench, chunks: int) -> None:
    """Wait (bounded) until `chunks` chunks were reported ready."""
    async with asyncio.timeout(10):
        while len(b.reports.ready) < chunks:
            await asyncio.sleep(0.01)


async def test_blocks_landing_in_any_order_seal_their_chunks_and_hash_the_image(
    bench: Bench,
) -> None:
    b = bench
    m = b.image.manifest
    hasher = asyncio.create_task(b.landing.hasher())
    flusher = asyncio.create_task(b.landing.flusher())
    order = list(range(m.blocks))
    random.Random(3).shuffle(order)
    for block in order:
        data = block_bytes(b, block)
        digest = await b.landing.write(block, data, block_digest([data]))
        assert digest == block_digest([data])
        assert b.image.has_block(block)  # served on at once, before its chunk is sealed
    await settle(b, m.chunks)
    assert sorted(b.reports.ready) == list(range(m.chunks))
    async with asyncio.timeout(10):
        await hasher
    assert b.landing.image_hash == Checksum("sha256", hashlib.sha256(b.data).hexdigest())
    b.landing.finish()
    async with asyncio.timeout(10):
        await flusher
    assert b.image.present_chunks == m.chunks  # durable: logged after fdatasync
    assert b.image.data_path.read_bytes()[:SIZE] == b.data
    assert b.reports.lost == []
    assert b.reports.errors == []


async def test_a_block_that_does_not_match_its_announced_digest_is_not_written(
    bench: Bench,
) -> None:
    b = bench
    good = block_bytes(b, 1)
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(IntegrityError, match="announced"):
        await b.landing.write(1, bad, block_digest([good]))
    assert not b.image.has_block(1)
    assert bad not in b.image.data_path.read_bytes()
    # the right bytes are taken afterwards
    await b.landing.write(1, good, block_digest([good]))
    assert b.image.has_block(1)


async def test_a_block_changed_on_disk_before_its_chunk_is_sealed_is_fetched_again(
    bench: Bench,
) -> None:
    b = bench
    m = b.image.manifest
    for block in m.blocks_of(0)[:-1]:
        await b.landing.write(block, block_bytes(b, block), None)
    # the disk loses a block we already counted (bit rot, a bad write)
    fd = os.open(b.image.data_path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 8, BLOCK + 5)
    finally:
        os.close(fd)
    last = m.blocks_of(0)[-1]
    await b.landing.write(last, block_bytes(b, last), None)
    async with asyncio.timeout(10):
        while not b.reports.lost:
            await asyncio.sleep(0.01)
    assert b.reports.lost == [1]  # only the changed block is fetched again
    assert not b.image.has(0)
    assert b.reports.ready == []
    assert b.metrics.verification_failures.labels("chunk")._value.get() == 1
    await b.landing.write(1, block_bytes(b, 1), None)
    await settle(b, 1)
    with b.image.read_chunk(0) as data:
        assert data == b.data[:CHUNK]


async def test_close_makes_the_sealed_chunks_durable_and_waits_for_threads(
    bench: Bench,
) -> None:
    b = bench
    m = b.image.manifest
    for block in m.blocks_of(1):
        await b.landing.write(block, block_bytes(b, block), None)
    await settle(b, 1)
    assert b.image.present_chunks == 0  # sealed and readable, not yet durable
    await b.landing.close()  # a fetch ending early (failed, cancelled) keeps what it has
    assert b.image.present_chunks == 1
    assert b.image.has(1)


async def test_blocks_are_written_on_the_loop_until_the_disk_falls_behind(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No flusher runs here, so sealed chunks pile up undurable, as behind a disk
    slower than the network: past the backlog, writes go to the thread pool."""
    b = bench
    m = b.image.manifest
    monkeypatch.setattr(landing_mod, "INLINE_BACKLOG", CHUNK)  # one chunk may wait
    monkeypatch.setattr(landing_mod, "SLOW_WRITE", 60.0)  # a loaded machine: not this rule
    for block in m.blocks_of(0):
        await b.landing.write(block, block_bytes(b, block), None)
    await settle(b, 1)
    assert b.landing.inline_writes == len(m.blocks_of(0))  # none went to a thread
    for block in m.blocks_of(1):
        await b.landing.write(block, block_bytes(b, block), None)
    await settle(b, 2)
    # two chunks wait for their fsync: more than the backlog allows
    before = b.landing.inline_writes
    for block in m.blocks_of(2):
        await b.landing.write(block, block_bytes(b, block), None)
    assert b.landing.inline_writes == before  # all three through the pool
    await settle(b, 3)
    flusher = asyncio.create_task(b.landing.flusher())  # the disk catches up
    async with asyncio.timeout(10):
        while b.image.present_chunks < 3:
            await asyncio.sleep(0.01)
    await b.landing.write(m.blocks_of(3)[0], block_bytes(b, m.blocks_of(3)[0]), None)
    assert b.landing.inline_writes == before + 1  # on the loop again
    b.landing.finish()
    async with asyncio.timeout(10):
        await flusher
    assert b.image.data_path.read_bytes()[: 3 * CHUNK + BLOCK] == b.data[: 3 * CHUNK + BLOCK]


async def test_a_slow_write_on_the_loop_sends_the_next_ones_to_threads(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = bench
    slow = {"left": 1}
    write_block = b.image.write_block

    def stalling_write(*args: object) -> bool:  # the kernel throttling a writer once
        if slow["left"]:
            slow["left"] -= 1
            time.sleep(0.03)
        return write_block(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(b.image, "write_block", stalling_write)
    monkeypatch.setattr(landing_mod, "SLOW_WRITE", 0.02)
    monkeypatch.setattr(landing_mod, "SLOW_PAUSE", 0.5)
    await b.landing.write(0, block_bytes(b, 0), None)
    assert b.landing.inline_writes == 1  # that one took 30 ms on the loop
    await b.landing.write(1, block_bytes(b, 1), None)
    assert b.landing.inline_writes == 1  # the next went to a thread
    await asyncio.sleep(0.6)  # the pause is over
    await b.landing.write(2, block_bytes(b, 2), None)
    assert b.landing.inline_writes == 2
    assert all(b.image.has_block(i) for i in range(3))


async def test_origin_reads_land_each_block_of_a_run_and_read_only_their_share(
    bench: Bench, tmp_path: Path
) -> None:
    b = bench
    m = b.image.manifest
    root = tmp_path / "origin"
    root.mkdir()
    (root / "img").write_bytes(b.data)
    origin = make_origin(OriginConfig(kind="directory", path=root, checksum_sidecar=False))
    exchange = Exchange(Geometry(m.size, m.chunk_size, m.block_size), [], random.Random(1))
    # alone: the lane gives this host every chunk
    lane = OriginLane(exchange, "me", "img", [], 2, 30.0, 0.0, gather=0.0)
    tally = Tally("img", b.metrics)

    def landed(block: int, digest: bytes, node: str | None) -> None:
        b.reports.landed.append((block, digest, node))
        exchange.landed(block, node, 0.0)

    hasher = asyncio.create_task(b.landing.hasher())
    async with origin, asyncio.timeout(20):
        reads = OriginReads(
            b.image, origin, exchange, lane, b.landing, b.metrics, tally, Wakeup(), landed
        )
        await asyncio.gather(*(reads.run() for _ in range(lane.streams)))
        await hasher
    assert sorted(block for block, _, _ in b.reports.landed) == list(range(m.blocks))
    assert all(node is None for _, _, node in b.reports.landed)
    for block, digest, _ in b.reports.landed:
        assert digest == block_digest([block_bytes(b, block)])
    assert tally.by_source["origin"] == SIZE  # each byte read once
    assert b.landing.image_hash == Checksum("sha256", hashlib.sha256(b.data).hexdigest())


async def test_a_job_seals_a_chunk_whose_blocks_an_earlier_fetch_left_unsealed(
    bench: Bench, tmp_path: Path
) -> None:
    """A fetch that failed (or was cancelled) after the last block of a chunk landed but
    before the chunk was sealed: the next fetch of the image seals it and reads none of
    it again (else its readers, and the image's sha256, waited for ever)."""
    from swarmcache.fetch import FetchJob

    b = bench
    m = b.image.manifest
    for block in m.blocks_of(2):  # landed, never sealed
        data = block_bytes(b, block)
        b.image.write_block(block, [data], block_digest([data]))
    assert not b.image.has(2)
    root = tmp_path / "origin"
    root.mkdir()
    (root / "img").write_bytes(b.data)
    origin = make_origin(OriginConfig(kind="directory", path=root, checksum_sidecar=False))
    with ThreadPoolExecutor(2) as pool:
        async with origin:
            job = FetchJob(b.image, origin, b.metrics, 2, pool)
            async with asyncio.timeout(20):
                await job.run()
            job.result.result()  # no failure
    assert b.image.complete
    assert job.bytes_by_source == {"origin": SIZE - CHUNK}  # chunk 2 was not read again
    assert b.image.data_path.read_bytes() == b.data


class _LeavingSwarm:
    """What PeerReads uses of a Swarm: a neighbour whose block arrives after it left
    the image (its link dropped: it evicted the image), or, with `left=False`, one
    still linked that announced the block without a digest."""

    def __init__(self, data: bytes, left: bool) -> None:
        self.data = data
        self.left = left
        self.failures: list[str] = []
        self.blocks = self
        self.table = self

    async def read_block(self, node: str, manifest: Manifest, block: int) -> bytearray:
        return bytearray(self.data)

    def digest(self, image_id: str, node: str, block: int) -> bytes | None:
        return None

    def trading(self, image_id: str, node: str) -> bool:
        return not self.left

    def recycle(self, body: bytearray) -> None:
        pass

    def failed(self, node: str, now: float) -> bool:
        self.failures.append(node)
        return False

    def lacks(self, image_id: str, node: str) -> None:
        pass


@pytest.mark.parametrize("left", [True, False])
async def test_a_block_from_a_peer_that_left_meanwhile_is_dropped_without_blame(
    bench: Bench, left: bool
) -> None:
    """A block whose sender unlinked while it came has nothing to be checked against:
    dropped and asked elsewhere, the peer not counted as failing (eviction churn made
    busy peers look broken); a linked peer without a digest for what it announced is."""
    from swarmcache.fetch.peer_reads import PeerReads

    m = bench.image.manifest
    exchange = Exchange(Geometry(m.size, m.chunk_size, m.block_size), [], random.Random(1))
    swarm = _LeavingSwarm(block_bytes(bench, 0), left)
    reads = PeerReads(
        bench.image,
        swarm,  # type: ignore[arg-type]
        exchange,
        bench.landing,
        bench.metrics,
        Tally("img", bench.metrics),
        Wakeup(),
        bench.reports.landed.append,  # type: ignore[arg-type]
        bench.reports.errors.append,
    )
    await reads._read("peer-1", 0)
    assert bench.reports.landed == []
    assert not bench.image.has_block(0)
    outcome = bench.metrics.block_requests.labels("gone" if left else "failed")
    assert outcome._value.get() == 1
    assert swarm.failures == ([] if left else ["peer-1"])
    assert bench.metrics.peer_errors._value.get() == (0 if left else 1)
