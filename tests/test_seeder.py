"""The seeder: feeds images into the swarm ahead of demand, signs their manifests; hosts
that trust its key take every block against the signature, and read nothing from the
origin while it is up. Real daemon processes on loopback, a real origin, the real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from conftest import ImageDir, Origin, metric, sha256, start_daemon_process, wait_peers
from swarmcache.signing import decode_key, encode_key, key_id, new_private_key, public_key
from test_cli import swarmcache

MIB = 1024 * 1024


def _keys(tmp_path: Path) -> tuple[Path, str]:
    private = new_private_key()
    path = tmp_path / "manifest.key"
    path.write_text(encode_key(private) + "\n")
    path.chmod(0o600)
    return path, encode_key(public_key(private))


async def _json(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url) as resp:
        return await resp.json()


async def _seeder_and_host(
    tmp_path: Path, origin: Origin, daemon_processes: list[Any]
) -> tuple[Any, Any, str]:
    seeder, public = await start_seeder(tmp_path, origin, daemon_processes)
    host = await trusting_host(tmp_path, origin, daemon_processes, seeder, public)
    async with aiohttp.ClientSession() as s:
        peers = (await _json(s, host.url + "/v1/peers"))["peers"]
        assert [p["role"] for p in peers] == ["seeder"]  # its hello said so
    return seeder, host, key_id(decode_key(public))


async def start_seeder(
    tmp_path: Path, origin: Origin, daemon_processes: list[Any], extra: str = ""
) -> tuple[Any, str]:
    """A seeder daemon with a new key (and `extra` config); its public key."""
    key_file, public = _keys(tmp_path)
    seeder = await start_daemon_process(
        tmp_path,
        origin.url,
        name="seeder",
        daemon_extra='role = "seeder"\n',
        extra=f'[security]\nmanifest_key_file = "{key_file}"\n' + extra,
    )
    daemon_processes.append(seeder)
    return seeder, public


async def trusting_host(
    tmp_path: Path, origin: Origin, daemon_processes: list[Any], peer: Any, public: str
) -> Any:
    """A host that trusts `public` and has `peer` as its one static peer, once it knows it."""
    addr = peer.url.removeprefix("http://")
    host = await start_daemon_process(
        tmp_path,
        origin.url,
        name="host",
        extra=f'[discovery]\nmdns = false\nstatic_peers = ["{addr}"]\n'
        f'[security]\ntrusted_manifest_keys = ["{public}"]\n',
    )
    daemon_processes.append(host)
    async with aiohttp.ClientSession() as s:
        await wait_peers(s, host.url)  # the host said hello to its static peer
    return host


async def test_a_seeded_image_reaches_hosts_signed_and_the_origin_sends_it_once(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 3 * MIB + 17)
    later = images.add("later", 2 * MIB + 5)
    seeder, host, kid = await _seeder_and_host(tmp_path, origin, daemon_processes)
    code, out, err = await swarmcache("--daemon", seeder.url, "seed", "img")
    assert code == 0, err
    assert out.strip() == f"img: seeded, 3.0 MiB, sha256:{sha256(data)}, signed by key {kid}"
    assert origin.stats.bytes_by_path["img"] == len(data)
    async with aiohttp.ClientSession() as s:
        async with s.get(host.url + "/v1/images/img") as resp:
            assert resp.status == 200
            assert sha256(await resp.read()) == sha256(data)
        status = await _json(s, host.url + "/v1/images/img/status")
        assert (status["signed_by"], status["digest"]) == (kid, "blake3")
        # an image nobody seeded: the hosts' reader is the seeder, which reads it once
        # (and signs it once it matched); the host reads nothing from the origin
        async with s.get(host.url + "/v1/images/later") as resp:
            assert sha256(await resp.read()) == sha256(later)
        host_metrics = await (await s.get(host.url + "/metrics")).text()
        seeded = await _json(s, seeder.url + "/v1/images/later/status")
    assert origin.stats.bytes_by_path["img"] == len(data)  # still once: to the seeder
    assert origin.stats.bytes_by_path["later"] == len(later)
    assert metric(host_metrics, "swarmcache_fetched_bytes_total", source="origin") == 0
    assert metric(host_metrics, "swarmcache_fetched_bytes_total", source="peer") == len(data) + len(
        later
    )
    assert seeded["signed_by"] == kid
    # the seeder's log says what it signed with; seeding again is a no-op
    assert f"signing manifests with key {kid}" in (tmp_path / "seeder.log").read_text()
    code, out, _ = await swarmcache("--daemon", seeder.url, "seed", "img", "missing")
    assert code == 1
    assert out.splitlines()[0].startswith("img: seeded")
    assert "missing: FAILED: image not found" in out


async def test_seeding_from_a_file_keeps_only_the_origins_bytes(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 2 * MIB + 100)
    seeder, host, kid = await _seeder_and_host(tmp_path, origin, daemon_processes)
    wrong = tmp_path / "wrong.img"
    wrong.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    code, _, err = await swarmcache(
        "--daemon", seeder.url, "seed", "--file", str(wrong), "--image-id", "img"
    )
    assert code == 1
    assert "is not the origin's" in err
    short = tmp_path / "short.img"
    short.write_bytes(data[:-1])
    code, _, err = await swarmcache(
        "--daemon", seeder.url, "seed", "--file", str(short), "--image-id", "img"
    )
    assert code == 1
    assert "bytes; the origin's img is" in err
    async with aiohttp.ClientSession() as s:
        assert (await _json(s, seeder.url + "/v1/images"))["images"] == []  # nothing kept
    good = tmp_path / "good.img"
    good.write_bytes(data)
    code, out, err = await swarmcache(
        "--daemon", seeder.url, "seed", "--file", str(good), "--image-id", "img"
    )
    assert code == 0, err
    assert out.strip().endswith(f"signed by key {kid}")
    assert origin.stats.bytes_by_path["img"] == 0  # the bytes came from the file
    code, _, err = await swarmcache(
        "--daemon", host.url, "seed", "--file", str(good), "--image-id", "img"
    )
    assert code == 1
    assert "not a seeder" in err
    async with aiohttp.ClientSession() as s:
        async with s.get(host.url + "/v1/images/img") as resp:
            assert sha256(await resp.read()) == sha256(data)
        assert (await _json(s, host.url + "/v1/images/img/status"))["signed_by"] == kid
    assert origin.stats.bytes_by_path["img"] == 0  # nor the host's


async def test_a_host_that_trusts_signatures_confirms_an_unsigned_manifest_at_the_origin(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """A peer's unsigned manifest names a version the origin no longer has (here: a
    peer holding a stale copy; a lying peer looks the same). A host with trusted keys
    asks the origin before it calls the image complete, refuses it, and fetches the
    origin's version on the next read."""
    images.add("img", 2 * MIB + 1, seed=1)
    stale = await start_daemon_process(tmp_path, origin.url, name="stale")
    daemon_processes.append(stale)
    async with aiohttp.ClientSession() as s, s.get(stale.url + "/v1/images/img") as resp:
        assert resp.status == 200
        await resp.read()
    data = images.add("img", 2 * MIB + 1, seed=2)  # the origin's image changes
    _, public = _keys(tmp_path)
    host = await trusting_host(tmp_path, origin, daemon_processes, stale, public)
    async with aiohttp.ClientSession() as s:
        async with s.post(host.url + "/v1/images/img/fetch?wait=30") as resp:
            first = await resp.json()
        assert resp.status == 502, first
        assert first["error"] == "verification failed"
        assert "the manifest from peers names" in first["detail"]
        async with s.get(host.url + "/v1/images/img") as resp:
            assert sha256(await resp.read()) == sha256(data)  # the origin's version now
        text = await (await s.get(host.url + "/metrics")).text()
    assert metric(text, "swarmcache_verification_failures_total", kind="manifest") == 1


async def test_an_image_without_the_origins_checksum_is_never_signed(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """Nothing to check the bytes against (no sidecar): the seeder keeps the image but
    does not sign it, and says why."""
    images.add("img", MIB + 1, sidecar=False)
    seeder, _ = await start_seeder(tmp_path, origin, daemon_processes)
    code, out, _ = await swarmcache("--daemon", seeder.url, "seed", "img")
    assert code == 1
    assert "img: FAILED: cannot sign" in out
    async with aiohttp.ClientSession() as s:
        status = await _json(s, seeder.url + "/v1/images/img/status")
    assert (status["state"], status["signed_by"]) == ("complete", None)
    assert "the origin publishes no checksum" in (tmp_path / "seeder.log").read_text()
