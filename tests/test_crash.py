"""kill -9 in the middle of a fetch: a restart keeps every verified chunk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from conftest import CHUNK, ImageDir, Origin, sha256, start_daemon_process
from swarmcache.manifest import decode_log

CHUNKS = 64
SIZE = CHUNKS * CHUNK - 1000


async def _status(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as resp:
        return await resp.json()


async def test_kill9_mid_fetch_then_restart_refetches_only_missing(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list
) -> None:
    data = images.add("img", SIZE)
    origin.faults.delay = 0.02  # slow enough to be killed mid-way
    d = await start_daemon_process(tmp_path, origin.url, extra="concurrency = 2\n")
    daemon_processes.append(d)
    status_url = d.url + "/v1/images/img/status"
    async with aiohttp.ClientSession() as session:
        async with session.post(d.url + "/v1/images/img/fetch") as resp:
            assert resp.status == 202
        for _ in range(500):
            st = await _status(session, status_url)
            if st["chunks_present"] >= 12:
                break
            await asyncio.sleep(0.01)
        await d.kill9()
        assert st["state"] == "fetching"

        log = (d.cache_dir / "images" / "img" / "chunks.log").read_bytes()
        durable = {i for i, _ in decode_log(log, CHUNKS)}
        assert 12 <= len(durable) < CHUNKS
        fetched_before = set(origin.chunk_requests("img"))
        origin.stats.requests.clear()
        origin.faults.delay = 0

        d2 = await start_daemon_process(tmp_path, origin.url, name="d", extra="concurrency = 2\n")
        daemon_processes.append(d2)
        for _ in range(1000):  # the restart resumes the partial image by itself
            st = await _status(session, d2.url + "/v1/images/img/status")
            if st["state"] in ("complete", "failed"):
                break
            await asyncio.sleep(0.01)
        assert st["state"] == "complete", st
        assert st["sha256"] == sha256(data)

        refetched = origin.chunk_requests("img")
        assert len(refetched) == len(set(refetched))
        assert {o // CHUNK for o in refetched} == set(range(CHUNKS)) - durable
        assert fetched_before  # the first run did fetch
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
        for _ in range(500):
            if (await _status(session, d.url + "/v1/images/img/status"))["state"] == "complete":
                break
            await asyncio.sleep(0.01)
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
        async with session.get(d2.url + "/v1/images/img") as resp:
            assert await resp.read() == data


async def test_sigterm_mid_fetch_stops_cleanly_and_keeps_chunks(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list
) -> None:
    data = images.add("img", SIZE)
    origin.faults.delay = 0.02
    d = await start_daemon_process(tmp_path, origin.url, extra="concurrency = 2\n")
    daemon_processes.append(d)
    async with aiohttp.ClientSession() as session:
        async with session.post(d.url + "/v1/images/img/fetch") as resp:
            assert resp.status == 202
        for _ in range(500):
            st = await _status(session, d.url + "/v1/images/img/status")
            if st["chunks_present"] >= 8:
                break
            await asyncio.sleep(0.01)
        reader = await session.get(d.url + "/v1/images/img")  # a client mid-stream
        origin.faults.delay = 0.3  # the rest would take seconds: stopping must not wait
        d.proc.terminate()
        assert await asyncio.wait_for(d.proc.wait(), 15) == 0
        with pytest.raises(aiohttp.ClientPayloadError):
            await reader.read()  # cut short, not completed during the stop
        reader.release()
        log = (d.cache_dir / "images" / "img" / "chunks.log").read_bytes()
        durable = {i for i, _ in decode_log(log, CHUNKS)}
        assert 8 <= len(durable) < CHUNKS
        daemon_log = (tmp_path / "d.log").read_text()
        assert "swarmcache stopping" in daemon_log
        assert "fetch img cancelled" in daemon_log
        assert "Traceback" not in daemon_log

        origin.faults.delay = 0
        origin.stats.requests.clear()
        d2 = await start_daemon_process(tmp_path, origin.url, name="d")
        daemon_processes.append(d2)
        async with session.get(d2.url + "/v1/images/img") as resp:
            assert await resp.read() == data
        assert not durable & {o // CHUNK for o in origin.chunk_requests("img")}
