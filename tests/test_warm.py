"""Pre-warming: POST /v1/warm, GET /v1/warm/{job}, and `swarmcache warm`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from conftest import (
    DaemonFactory,
    ImageDir,
    Origin,
    free_port,
    sha256,
    start_daemon_process,
)

MIB = 1024 * 1024


async def _job_end(client: Any, job: str) -> dict[str, Any]:
    for _ in range(200):  # 20 s at most
        resp = await client.get(f"/v1/warm/{job}")
        body = await resp.json()
        if body["state"] != "running":
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"warm job {job} still running: {body}")


async def test_warm_this_host_and_the_job_it_reports(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    data = images.add("img", MIB + 5)
    client = await daemon()
    resp = await client.post("/v1/warm", json={"images": ["img", "img", "nosuch"]})
    assert resp.status == 202
    job = await resp.json()
    assert resp.headers["Location"] == f"/v1/warm/{job['job']}"
    assert job["images"] == ["img", "nosuch"]  # duplicates once
    (me,) = job["hosts"]
    end = await _job_end(client, job["job"])
    assert end["state"] == "failed"
    assert end["counts"] == {"queued": 0, "fetching": 0, "cached": 1, "failed": 1}
    assert end["hosts"][me]["img"] == {"state": "cached", "bytes": len(data), "size": len(data)}
    failed = end["hosts"][me]["nosuch"]
    assert failed["state"] == "failed"
    assert "not found" in failed["reason"]
    status = await (await client.get("/v1/images/img/status")).json()
    assert (status["state"], status["sha256"]) == ("complete", sha256(data))


async def test_warm_refuses_bad_requests_clearly(daemon: DaemonFactory) -> None:
    client = await daemon()
    for body in (
        b"not json",
        b"[]",
        b"{}",
        json.dumps({"images": []}).encode(),
        json.dumps({"images": ["../etc"]}).encode(),
        json.dumps({"images": ["a"], "hosts": "some"}).encode(),
        json.dumps({"images": ["a"], "hosts": ["nohostport"]}).encode(),
        json.dumps({"images": ["a"], "hosts": []}).encode(),
        # only host:port: nothing that would make the daemon ask another URL
        json.dumps({"images": ["a"], "hosts": ["169.254.169.254/x#:80"]}).encode(),
        json.dumps({"images": ["a"], "hosts": ["user@host:80"]}).encode(),
        json.dumps({"images": ["a"], "hosts": ["h:\u0668\u0660"]}).encode(),  # Arabic-Indic 80
    ):
        resp = await client.post("/v1/warm", data=body)
        assert resp.status == 400, body
        assert (await resp.json())["error"] in ("bad request", "invalid image id")
    resp = await client.get("/v1/warm/nosuchjob")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not found"


async def test_an_unreachable_host_fails_with_its_reason_and_the_rest_go_on(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    images.add("img", 200_000)
    client = await daemon()
    dead = f"127.0.0.1:{free_port()}"
    first = await (await client.post("/v1/warm", json={"images": ["img"]})).json()
    (me,) = first["hosts"]  # without hosts: this host alone, by its address
    resp = await client.post("/v1/warm", json={"images": ["img"], "hosts": [me, dead]})
    end = await _job_end(client, (await resp.json())["job"])
    assert end["hosts"][me]["img"]["state"] == "cached"
    assert end["hosts"][dead]["img"]["state"] == "failed"
    assert f"cannot reach {dead}" in end["hosts"][dead]["img"]["reason"]


async def test_warm_all_hosts_from_one_cli_call_costs_the_origin_one_copy(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """Three daemons; `swarmcache warm --hosts all --wait` on one of them warms every
    host, the origin sends each image about once, and a missing image fails the call
    (exit status 1) with the reason shown per host."""
    one = images.add("one", 3 * MIB + 7)
    two = images.add("two", 2 * MIB)
    ports = {name: free_port() for name in "abc"}
    for name in "abc":  # each knows the others (as mDNS would tell them)
        others = ", ".join(f'"127.0.0.1:{p}"' for n, p in ports.items() if n != name)
        daemon_processes.append(
            await start_daemon_process(
                tmp_path,
                origin.url,
                name=name,
                port=ports[name],
                extra=f"[discovery]\nmdns = false\nstatic_peers = [{others}]\n",
            )
        )
    a = daemon_processes[0]
    async with aiohttp.ClientSession() as s:
        for _ in range(100):  # a hears of b and c when they say hello
            async with s.get(a.url + "/v1/peers") as resp:
                peers = (await resp.json())["peers"]
            if len(peers) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(peers) == 2, peers
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarmcache",
        "--daemon",
        a.url,
        "warm",
        "one",
        "two",
        "nosuch",
        "--hosts",
        "all",
        "--wait",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 1, (text, err.decode())
    assert "3/9 cached" not in text
    assert "6/9 cached" in text
    assert text.count("image not found") >= 3  # the reason, on every host's row
    async with aiohttp.ClientSession() as s:
        for d in daemon_processes:
            for name, data in (("one", one), ("two", two)):
                async with s.get(f"{d.url}/v1/images/{name}/status") as resp:
                    st = await resp.json()
                assert (st["state"], st["sha256"]) == ("complete", sha256(data)), d.url
    for name, data in (("one", one), ("two", two)):
        assert origin.stats.bytes_by_path[name] <= 1.05 * len(data)


async def test_warm_concurrency_bounds_the_images_warming_at_once(
    daemon: DaemonFactory, images: ImageDir, origin: Origin
) -> None:
    images.add("a", 100_000)
    images.add("b", 100_000)
    origin.faults.delay = 0.5  # every origin answer: a fetch takes a second or more
    client = await daemon(warm={"concurrency": 1})
    job = await (await client.post("/v1/warm", json={"images": ["a", "b"]})).json()
    (me,) = job["hosts"]
    await asyncio.sleep(0.3)
    now = await (await client.get(f"/v1/warm/{job['job']}")).json()
    assert (now["hosts"][me]["a"]["state"], now["hosts"][me]["b"]["state"]) == (
        "fetching",
        "queued",
    )
    origin.faults.delay = 0
    end = await _job_end(client, job["job"])
    assert end["counts"]["cached"] == 2


async def test_warm_never_hands_the_api_token_to_the_hosts_it_drives(
    daemon: DaemonFactory, tmp_path: Path, aiohttp_server: Any
) -> None:
    """A caller on this host names the hosts: whoever answers there must not get the
    token that opens every host's API. The request is signed with the cluster secret
    instead (good for one path, once)."""
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"error": "image not found", "detail": "no"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app)
    (tmp_path / "token").write_text("the operators' API token, 16+\n")
    (tmp_path / "secret").write_text("correct horse battery staple, 32\n")
    client = await daemon(
        security={
            "api_token_file": str(tmp_path / "token"),
            "cluster_secret_file": str(tmp_path / "secret"),
        }
    )
    resp = await client.post(
        "/v1/warm", json={"images": ["img"], "hosts": [f"127.0.0.1:{server.port}"]}
    )
    assert resp.status == 202
    end = await _job_end(client, (await resp.json())["job"])
    assert end["state"] == "failed"
    assert seen, "the host was asked"
    assert all("Authorization" not in h for h in seen)
    assert all("X-Swarmcache-Auth" in h for h in seen)
