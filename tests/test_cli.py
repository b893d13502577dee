"""The `swarmcache` command, run as a real process against a real daemon process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from conftest import ImageDir, Origin, free_port, sha256, start_daemon_process


async def swarmcache(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarmcache",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_client_commands(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list
) -> None:
    data = images.add("cirros", 300_000)
    d = await start_daemon_process(tmp_path, origin.url)
    daemon_processes.append(d)
    cfg = ["--config", str(d.config_path)]  # --daemon defaults to daemon.listen

    out_file = tmp_path / "out.img"
    code, out, err = await swarmcache(*cfg, "fetch", "cirros", "-o", str(out_file))
    assert (code, err) == (0, "")  # no progress bar when not on a terminal
    assert out_file.read_bytes() == data
    assert not Path(str(out_file) + ".part").exists()

    code, out, _ = await swarmcache(*cfg, "ls")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "SIZE"]
    assert row.split()[:2] == ["cirros", "complete"]

    code, out, _ = await swarmcache(*cfg, "status", "cirros", "--json")
    assert code == 0
    assert json.loads(out)["sha256"] == sha256(data)

    assert (await swarmcache(*cfg, "pin", "cirros"))[:2] == (0, "cirros pinned\n")
    code, out, _ = await swarmcache(*cfg, "ls", "--json")
    assert json.loads(out)["images"][0]["pinned"] is True
    assert (await swarmcache(*cfg, "unpin", "cirros"))[:2] == (0, "cirros unpinned\n")
    assert (await swarmcache(*cfg, "evict", "cirros"))[:2] == (0, "cirros removed\n")

    code, _, err = await swarmcache(*cfg, "status", "cirros")
    assert code == 1
    assert "image not found" in err
    assert "Traceback" not in err

    images.add("other", 200_000)
    code, _, err = await swarmcache("--daemon", d.url, "fetch", "other")  # into the cache
    assert (code, err) == (0, "")
    code, out, _ = await swarmcache(*cfg, "status", "other")
    assert "complete" in out

    code, _, err = await swarmcache(*cfg, "fetch", "nosuchimage", "-o", str(tmp_path / "x"))
    assert code == 1
    assert "image not found at origin" in err
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "x.part").exists()

    code, _, err = await swarmcache(*cfg, "fetch", "../etc/passwd")
    assert code == 1
    assert "invalid image id" in err


async def test_fetch_of_corrupt_image_fails(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list
) -> None:
    images.add("bad", 300_000, wrong_sidecar=True)
    d = await start_daemon_process(tmp_path, origin.url)
    daemon_processes.append(d)
    code, _, err = await swarmcache(
        "--daemon", d.url, "fetch", "bad", "-o", str(tmp_path / "bad.img")
    )
    assert code == 1
    assert "cut short" in err
    assert not (tmp_path / "bad.img").exists()
    code, _, err = await swarmcache("--daemon", d.url, "fetch", "bad")
    assert code == 1
    assert "verification failed" in err


async def test_unreachable_daemon_exits_3() -> None:
    code, _, err = await swarmcache("--daemon", f"http://127.0.0.1:{free_port()}", "ls")
    assert code == 3
    assert "cannot reach the daemon" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[cache]\nmax_size = "huge"\n', "cache.max_size: cannot parse size 'huge'"),
        ("[cache]\ncolour = 1\n", "cache.colour: unknown key"),
        ("[cache\n", "invalid TOML"),
        (None, "file not found"),
    ],
)
async def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_text(content)
    code, out, err = await swarmcache("--config", str(path), "serve")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"swarmcache: config error: {path}: ")
    assert message in err


async def test_bad_env_override_exit_2(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "SWARMCACHE_CACHE_CHUNK_SIZE": "tiny"}
    code, _, err = await swarmcache("serve", env=env)
    assert code == 2
    assert "environment SWARMCACHE_CACHE_CHUNK_SIZE: cache.chunk_size: cannot parse" in err


async def test_help_is_complete() -> None:
    code, out, _ = await swarmcache("--help")
    assert code == 0
    for command in ("serve", "fetch", "ls", "status", "evict", "pin", "unpin"):
        assert command in out
        sub_code, sub_out, _ = await swarmcache(command, "--help")
        assert sub_code == 0
        assert "usage: swarmcache" in sub_out


class _Tty:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_progress_bar_shows_percent_rate_and_eta() -> None:
    from swarmcache.cli import Progress

    tty = _Tty()
    bar = Progress("img", tty, enabled=True)  # type: ignore[arg-type]
    bar.start -= 2.0  # two seconds in
    bar.update(50 * 1024**2, 200 * 1024**2, force=True)
    line = tty.text.split("\r")[-1]
    assert "img" in line
    assert "25.0%" in line
    assert "50.0 MiB/200.0 MiB" in line
    assert "MiB/s" in line
    assert "ETA 5s" in line or "ETA 6s" in line
    bar.finish()
    assert tty.text.endswith("\n")
    quiet = _Tty()
    Progress("img", quiet, enabled=False).update(1, 2, force=True)  # type: ignore[arg-type]
    assert quiet.text == ""


@pytest.mark.parametrize("url", ["notaurl", "http://[::1", "127.0.0.1:7480", "http://x:99999"])
async def test_bad_daemon_url_is_usage_error(url: str) -> None:
    code, _, err = await swarmcache("--daemon", url, "ls")
    assert code == 2
    assert err.startswith("swarmcache: --daemon ")
    assert "Traceback" not in err


async def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    import os
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            **os.environ,
            "SWARMCACHE_DAEMON_LISTEN": f"127.0.0.1:{port}",
            "SWARMCACHE_CACHE_DIR": str(tmp_path / "cache"),
        }
        code, _, err = await swarmcache("serve", env=env)
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port} (daemon.listen)" in err
    assert "Traceback" not in err


async def test_sigterm_during_download_removes_the_part_file(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list
) -> None:
    images.add("slow", 2_000_000)
    d = await start_daemon_process(tmp_path, origin.url)
    daemon_processes.append(d)
    origin.faults.delay = 0.05
    out = tmp_path / "slow.img"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarmcache",
        "--daemon",
        d.url,
        "fetch",
        "slow",
        "-o",
        str(out),
        stderr=asyncio.subprocess.PIPE,
    )
    part = Path(str(out) + ".part")
    for _ in range(500):
        if part.exists():
            break
        await asyncio.sleep(0.01)
    assert part.exists()
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 30) == 130
    assert not part.exists()
    assert not out.exists()


async def test_reader_closing_the_pipe_is_quiet(aiohttp_server) -> None:
    from aiohttp import web

    async def many(request: web.Request) -> web.Response:
        entry = {
            "id": "x",
            "state": "complete",
            "size": 1,
            "chunks_present": 1,
            "chunks_total": 1,
            "hits": 0,
            "pinned": False,
            "last_access": None,
        }
        return web.json_response({"images": [{**entry, "id": f"img{i}"} for i in range(20000)]})

    app = web.Application()
    app.router.add_get("/v1/images", many)
    server = await aiohttp_server(app)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarmcache",
        "--daemon",
        str(server.make_url("")),
        "ls",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    await proc.stdout.readline()  # like `| head -1`
    proc._transport.get_pipe_transport(1).close()  # type: ignore[attr-defined]
    err = await asyncio.wait_for(proc.stderr.read(), 60)
    assert await proc.wait() == 0
    assert err == b""


async def test_access_log_line_per_request(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list
) -> None:
    import re

    images.add("img", 100_000)
    d = await start_daemon_process(tmp_path, origin.url, daemon_extra="access_log = true\n")
    daemon_processes.append(d)
    code, _, _ = await swarmcache("--daemon", d.url, "fetch", "img", "-o", str(tmp_path / "o"))
    assert code == 0
    await swarmcache("--daemon", d.url, "status", "nope")
    d.proc.terminate()
    await d.proc.wait()
    log = (tmp_path / "d.log").read_text()
    assert re.search(r'127\.0\.0\.1 "GET /v1/images/img HTTP/1\.1" 200 100000 [0-9.]+', log), log
    assert '"GET /v1/images/nope/status HTTP/1.1" 404' in log
