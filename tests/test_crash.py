"""kill -9 in the middle of a fetch: a restart keeps every verified chunk.

The origin's gate stops each fetch at a known point: it lets the first chunks through
and holds every later read, so the daemon is killed with exactly those chunks durable
and its fetch certainly unfinished, however slow the machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from conftest import CHUNK, ImageDir, Origin, sha256, start_daemon_process
from swarmcache.manifest import decode_log
from swarmtools.origin_server import Gate

T = TypeVar("T")

CHUNKS = 64
SIZE = CHUNKS * CHUNK - 1000
CONCURRENCY = 2  # origin reads the daemon has in flight: all of them end up held
POLL = 0.01  # seconds between looks at something we wait for
WAIT = 20.0  # seconds any one wait may take


@pytest.fixture
async def gate(origin: Origin) -> AsyncIterator[Gate]:
    """The origin's gate; whatever it still holds at the end is refused, not left hanging."""
    yield origin.faults.gate
    origin.faults.gate.open(refuse_held=True)


async def _poll(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The first answer of `probe` that is not None; it is asked at most WAIT/POLL
    times, for at most WAIT seconds in all."""
    try:
        async with asyncio.timeout(WAIT):
            for _ in range(int(WAIT / POLL)):
                found = await probe()
                if found is not None:
                    return found
                await asyncio.sleep(POLL)
    except TimeoutError:
        pass
    pytest.fail(f"no {what} within {WAIT:.0f}s")


async def _status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def _stalled(
    session: aiohttp.ClientSession, url: str, gate: Gate, chunks: int
) -> dict[str, Any]:
    """Wait until `chunks` chunks are durable and every origin read is held at the gate."""

    async def probe() -> dict[str, Any] | None:
        st = await _status(session, url)
        return st if st["chunks_present"] >= chunks and gate.held >= CONCURRENCY else None

    st = await _poll(probe, f"fetch stalled with {chunks} chunks durable")
    # nothing more can come: the gate let exactly `chunks` through and holds the rest
    assert st["chunks_present"] == chunks, st
    assert gate.held == CONCURRENCY
    return st


async def _settled(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """Wait until the image is complete or failed."""

    async def probe() -> dict[str, Any] | None:
        st = await _status(session, url)
        return st if st["state"] in ("complete", "failed") else None

    return await _poll(probe, "complete or failed image")


def _durable(cache_dir: Path) -> set[int]:
    """The chunks the image's log records as durable."""
    log = (cache_dir / "images" / "img" / "chunks.log").read_bytes()
    return {i for i, _ in decode_log(log, CHUNKS)}


def _bytes(chunks: set[int]) -> int:
    """Bytes of these chunks of the image (the last one is short)."""
    return sum(min(CHUNK, SIZE - i * CHUNK) for i in chunks)


def _check_refetch(origin: Origin, durable: set[int]) -> None:
    """Since the stats were reset, the origin sent each missing chunk once, and no more."""
    refetched = origin.chunk_requests("img")
    assert len(refetched) == len(set(refetched))
    assert {o // CHUNK for o in refetched} == set(range(CHUNKS)) - durable
    assert origin.stats.bytes_by_path["img"] == SIZE - _bytes(durable)


async def test_origin_gate_holds_reads_past_its_allowance(
    origin: Origin, gate: Gate, images: ImageDir
) -> None:
    data = images.add("img", 4 * CHUNK)
    base = origin.server.make_url("")

    async def read(index: int) -> tuple[int, bytes]:
        rng = f"bytes={index * CHUNK}-{(index + 1) * CHUNK - 1}"
        async with session.get(base / "images" / "img", headers={"Range": rng}) as resp:
            return resp.status, await resp.read()

    async def held(n: int) -> bool | None:
        return True if gate.held == n else None

    async with aiohttp.ClientSession() as session:
        async with session.post(base / "_faults", json={"hold_after": 2 * CHUNK}) as resp:
            assert resp.status == 200
        assert await read(0) == (206, data[:CHUNK])
        async with session.get(base / "images" / "img.sha256") as resp:
            assert resp.status == 200  # not an image body: never held
        assert await read(1) == (206, data[CHUNK : 2 * CHUNK])
        third = asyncio.create_task(read(2))
        await _poll(lambda: held(1), "held read")
        assert not third.done()
        assert origin.chunk_requests("img") == [0, CHUNK]  # held reads are not counted yet
        async with session.post(base / "_faults", json={}) as resp:
            assert resp.status == 200
        assert await asyncio.wait_for(third, WAIT) == (206, data[2 * CHUNK : 3 * CHUNK])
        assert origin.stats.bytes_by_path["img"] == 3 * CHUNK

        gate.close(0)
        fourth = asyncio.create_task(read(3))
        await _poll(lambda: held(1), "held read")
        gate.open(refuse_held=True)
        status, _ = await asyncio.wait_for(fourth, WAIT)
        assert status == 503
        assert origin.stats.bytes_by_path["img"] == 3 * CHUNK  # a refused read sent nothing


async def test_kill9_mid_fetch_then_restart_refetches_only_missing(
    tmp_path: Path, images: ImageDir, origin: Origin, gate: Gate, daemon_processes: list
) -> None:
    data = images.add("img", SIZE)
    gate.close(12 * CHUNK)  # 12 chunks get through, then the origin holds every read
    extra = f"concurrency = {CONCURRENCY}\n"
    d = await start_daemon_process(tmp_path, origin.url, extra=extra)
    daemon_processes.append(d)
    status_url = d.url + "/v1/images/img/status"
    async with aiohttp.ClientSession() as session:
        async with session.post(d.url + "/v1/images/img/fetch") as resp:
            assert resp.status == 202
        st = await _stalled(session, status_url, gate, 12)
        await d.kill9()
        assert st["state"] == "fetching"

        durable = _durable(d.cache_dir)
        fetched_before = origin.chunk_requests("img")
        assert len(durable) == 12
        # the first run fetched each of them once, and exactly those became durable
        assert sorted(fetched_before) == sorted(i * CHUNK for i in durable)
        gate.open(refuse_held=True)  # the dead daemon's held reads send nothing
        origin.stats.reset()

        d2 = await start_daemon_process(tmp_path, origin.url, name="d", extra=extra)
        daemon_processes.append(d2)
        st = await _settled(session, d2.url + "/v1/images/img/status")  # resumes by itself
        assert st["state"] == "complete", st
        assert st["sha256"] == sha256(data)
        _check_refetch(origin, durable)
        async with session.get(d2.url + "/v1/images/img") as resp:
            assert await resp.read() == data


async def test_restart_discards_unreadable_entries(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list
) -> None:
    data = images.add("img", SIZE)
    d = await start_daemon_process(tmp_path, origin.url)
    daemon_processes.append(d)
    async with aiohttp.ClientSession() as session:
        async with session.post(d.url + "/v1/images/img/fetch") as resp:
            assert resp.status == 202
        st = await _settled(session, d.url + "/v1/images/img/status")
        assert st["state"] == "complete", st
        await d.kill9()
        images_dir = d.cache_dir / "images"
        (images_dir / "junk").mkdir()  # a dir with no manifest
        (images_dir / "junk" / "manifest").write_bytes(b"\x00garbage")
        (images_dir / "..bad").mkdir()
        d2 = await start_daemon_process(tmp_path, origin.url, name="d")
        daemon_processes.append(d2)
        async with session.get(d2.url + "/v1/images") as resp:
            listing = await resp.json()
        assert [i["id"] for i in listing["images"]] == ["img"]
        assert not (images_dir / "junk").exists()
        origin.stats.reset()
        async with session.get(d2.url + "/v1/images/img") as resp:
            assert await resp.read() == data
        assert origin.stats.bytes_by_path["img"] == 0  # the complete image survived the kill


async def test_sigterm_mid_fetch_stops_cleanly_and_keeps_chunks(
    tmp_path: Path, images: ImageDir, origin: Origin, gate: Gate, daemon_processes: list
) -> None:
    data = images.add("img", SIZE)
    gate.close(8 * CHUNK)
    extra = f"concurrency = {CONCURRENCY}\n"
    d = await start_daemon_process(tmp_path, origin.url, extra=extra)
    daemon_processes.append(d)
    async with aiohttp.ClientSession() as session:
        async with session.post(d.url + "/v1/images/img/fetch") as resp:
            assert resp.status == 202
        await _stalled(session, d.url + "/v1/images/img/status", gate, 8)
        reader = await session.get(d.url + "/v1/images/img")  # a client mid-stream
        # the rest never comes while the gate holds it: stopping must not wait for it
        d.proc.terminate()
        assert await asyncio.wait_for(d.proc.wait(), 15) == 0
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(reader.read(), WAIT)  # cut short, not completed
        reader.release()
        durable = _durable(d.cache_dir)
        assert len(durable) == 8
        assert sorted(origin.chunk_requests("img")) == sorted(i * CHUNK for i in durable)
        daemon_log = (tmp_path / "d.log").read_text()
        assert "swarmcache stopping" in daemon_log
        assert "fetch img cancelled" in daemon_log
        assert "Traceback" not in daemon_log

        gate.open(refuse_held=True)
        origin.stats.reset()
        d2 = await start_daemon_process(tmp_path, origin.url, name="d")
        daemon_processes.append(d2)
        async with session.get(d2.url + "/v1/images/img") as resp:
            assert await resp.read() == data
        _check_refetch(origin, durable)


KILLS = 20
KILL_CHUNKS = 96


async def test_twenty_kills_at_random_points_never_refetch_a_durable_chunk(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """kill -9 at KILLS random moments of one fetch (seed printed: set
    SWARMCACHE_KILL_SEED to replay a run): every restart resumes, no chunk durable at a
    kill is read from the origin again, what the kills cost is printed, and the image
    ends complete and right."""
    import os
    import random

    seed = int(os.environ.get("SWARMCACHE_KILL_SEED") or random.randrange(2**32))
    print(f"kill seed {seed}")
    rng = random.Random(seed)
    size = KILL_CHUNKS * CHUNK - 123
    data = images.add("img", size)
    origin.faults.delay = 0.2  # each origin answer: a whole fetch takes about 5 s
    async with aiohttp.ClientSession() as s:
        kills = []  # (chunks durable at the kill, origin requests made before it)
        for _ in range(KILLS):
            d = await start_daemon_process(tmp_path, origin.url, name="k")
            async with s.post(f"{d.url}/v1/images/img/fetch") as resp:
                assert resp.status in (200, 202), await resp.text()
            await asyncio.sleep(rng.uniform(0.0, 0.4))
            await d.kill9()
            log = d.cache_dir / "images" / "img" / "chunks.log"
            durable = (
                {i for i, _ in decode_log(log.read_bytes(), KILL_CHUNKS)} if log.exists() else set()
            )
            kills.append((durable, len(origin.stats.requests)))
        d = await start_daemon_process(tmp_path, origin.url, name="k")
        daemon_processes.append(d)
        async with s.post(f"{d.url}/v1/images/img/fetch?wait=60") as resp:
            st = await resp.json()
        assert (st["state"], st["sha256"]) == ("complete", sha256(data)), st
        async with s.get(f"{d.url}/v1/images/img") as resp:
            assert await resp.read() == data
    requests = origin.stats.requests
    chunk_of = [
        int(r[2].removeprefix("bytes=").split("-")[0]) // CHUNK
        for r in requests
        if r[1] == "img" and r[2]
    ]
    for durable, before in kills:
        later = {
            int(r[2].removeprefix("bytes=").split("-")[0]) // CHUNK
            for r in requests[before:]
            if r[1] == "img" and r[2]
        }
        assert not durable & later, f"durable chunks {sorted(durable & later)} read again"
    extra = len(chunk_of) - len(set(chunk_of))
    print(
        f"{KILLS} kills (seed {seed}) of a {KILL_CHUNKS}-chunk fetch: {extra} chunks read "
        f"twice or more ({extra * CHUNK} bytes), {origin.stats.bytes_by_path['img'] / size:.2f} "
        "copies from the origin in all"
    )
    # a kill costs at most the reads in flight then (origin.concurrency, 4 here)
    assert extra <= KILLS * 4
