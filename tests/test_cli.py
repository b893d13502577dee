"""The `swarmcache` command, run as a real process against a real daemon process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    DaemonFactory,
    ImageDir,
    Origin,
    free_port,
    refuse_host_mdns,
    sha256,
    start_daemon_process,
)
from swarmtools.testbed import daemon_env


async def swarmcache(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the command; its environment has no SWARMCACHE_* variable but those in `env`.

    A `serve` whose config would have discovery.mdns on is refused (refuse_host_mdns).
    """
    proc_env = daemon_env(env)
    if "serve" in args:
        _refuse_serve_with_mdns(args, proc_env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarmcache",
        *args,
        env=proc_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _refuse_serve_with_mdns(args: tuple[str, ...], env: dict[str, str]) -> None:
    """Load the config `swarmcache serve` would load, as it would; refuse mDNS on."""
    from swarmcache.cli import build_parser
    from swarmcache.config import config_path_from, load_config
    from swarmcache.errors import ConfigError

    if {"-h", "--help", "--version"} & set(args):
        return
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        return  # bad usage: the command stops before the daemon starts
    if parsed.command != "serve":
        return
    try:
        config = load_config(config_path_from(parsed.config, env), env)
    except ConfigError:
        return  # the daemon refuses this config too
    refuse_host_mdns(config, f"swarmcache {' '.join(args)}")


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
    code, _, err = await swarmcache("serve", env={"SWARMCACHE_CACHE_CHUNK_SIZE": "tiny"})
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
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            "SWARMCACHE_DAEMON_LISTEN": f"127.0.0.1:{port}",
            "SWARMCACHE_CACHE_DIR": str(tmp_path / "cache"),
            # the daemon starts discovery before it listens: off, not on the host network
            "SWARMCACHE_DISCOVERY_MDNS": "false",
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


async def test_global_options_after_the_command(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list
) -> None:
    data = images.add("img", 100_000)
    d = await start_daemon_process(tmp_path, origin.url)
    daemon_processes.append(d)
    out_file = tmp_path / "img.out"
    code, _, err = await swarmcache("fetch", "img", "-o", str(out_file), "--daemon", d.url)
    assert (code, err) == (0, "")
    assert out_file.read_bytes() == data
    code, out, err = await swarmcache("status", "img", "--daemon", d.url)
    assert (code, err) == (0, "")
    assert "complete" in out
    code, out, _ = await swarmcache("ls", "--json", "--config", str(d.config_path))
    assert code == 0
    assert [i["id"] for i in json.loads(out)["images"]] == ["img"]
    code, out, _ = await swarmcache("status", "img", "-c", str(d.config_path))
    assert (code, "complete" in out) == (0, True)
    # a value given before the command is not reset by the command's own options
    code, out, _ = await swarmcache("--daemon", d.url, "status", "img", "--json")
    assert (code, json.loads(out)["sha256"]) == (0, sha256(data))
    code, out, _ = await swarmcache("--config", str(d.config_path), "ls")
    assert (code, out.splitlines()[1].split()[0]) == (0, "img")
    # given both before and after, the later one counts
    code, _, err = await swarmcache("--daemon", "notaurl", "status", "img", "--daemon", d.url)
    assert (code, err) == (0, "")
    # still usage errors, after the command too
    code, _, err = await swarmcache("ls", "--daemon", "notaurl")
    assert code == 2
    assert err.startswith("swarmcache: --daemon ")
    code, _, err = await swarmcache("ls", "--daemon")
    assert code == 2
    assert "expected one argument" in err
    code, _, err = await swarmcache("serve", "--config", str(tmp_path / "missing.toml"))
    assert code == 2
    assert err == f"swarmcache: config error: {tmp_path / 'missing.toml'}: file not found\n"


async def test_host_network_daemons_refuse_mdns(
    tmp_path: Path, origin: Origin, aiohttp_client, daemon_processes: list
) -> None:
    import socket

    from conftest import make_config, serve_app
    from swarmcache.config import load_config

    with pytest.raises(AssertionError, match=r"discovery\.mdns"):
        daemon_processes.append(
            await start_daemon_process(tmp_path, origin.url, extra="[discovery]\nmdns = true\n")
        )
    with pytest.raises(AssertionError, match=r"discovery\.mdns"):
        daemon_processes.append(
            await start_daemon_process(
                tmp_path, origin.url, name="e", env={"SWARMCACHE_DISCOVERY_MDNS": "true"}
            )
        )
    with pytest.raises(AssertionError, match=r"discovery\.mdns"):
        await serve_app(aiohttp_client, make_config(tmp_path, {"discovery": {"mdns": True}}))
    with socket.socket() as busy:  # were the guard missing, serve would end at once
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(AssertionError, match=r"discovery\.mdns"):
            await swarmcache(
                "serve",
                env={
                    "SWARMCACHE_DAEMON_LISTEN": f"127.0.0.1:{busy.getsockname()[1]}",
                    "SWARMCACHE_CACHE_DIR": str(tmp_path / "cli-cache"),
                },
            )
    # a [discovery] section that does not mention mdns gets it off, not the built-in on
    d = await start_daemon_process(
        tmp_path, origin.url, name="f", extra="[discovery]\nstatic_peers = []\n"
    )
    daemon_processes.append(d)
    assert load_config(d.config_path, {}).discovery.mdns is False
    d.proc.terminate()
    await d.proc.wait()
    log = (tmp_path / "f.log").read_text()
    assert "swarmcache listening on" in log
    assert "mDNS" not in log


async def test_runner_swarmcache_env_does_not_reach_test_daemons(
    tmp_path: Path,
    images: ImageDir,
    origin: Origin,
    daemon_processes: list,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    wrong_dir = tmp_path / "not-this-cache"
    # each of these would change what the daemons and commands below do
    monkeypatch.setenv("SWARMCACHE_BOGUS", "1")  # no such key: exit 2
    monkeypatch.setenv("SWARMCACHE_CACHE_MAX_SIZE", "1B")  # every image too large
    monkeypatch.setenv("SWARMCACHE_CACHE_DIR", str(wrong_dir))
    monkeypatch.setenv("SWARMCACHE_DAEMON_LISTEN", "127.0.0.1:1")
    data = images.add("img", 100_000)
    d = await start_daemon_process(tmp_path, origin.url)
    daemon_processes.append(d)
    code, _, err = await swarmcache("--config", str(d.config_path), "fetch", "img")
    assert (code, err) == (0, "")
    code, out, _ = await swarmcache("--daemon", d.url, "status", "img", "--json")
    assert (code, json.loads(out)["sha256"]) == (0, sha256(data))
    assert any(d.cache_dir.iterdir())
    assert not wrong_dir.exists()
    # `serve` run by the command helper: only what the test gives it
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = await swarmcache(
            "serve",
            env={
                "SWARMCACHE_DAEMON_LISTEN": f"127.0.0.1:{port}",
                "SWARMCACHE_CACHE_DIR": str(tmp_path / "serve-cache"),
                "SWARMCACHE_DISCOVERY_MDNS": "false",
            },
        )
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port} (daemon.listen)" in err
    assert not wrong_dir.exists()


async def test_metric_helper_reads_a_real_daemons_metrics(
    daemon: DaemonFactory, images: ImageDir
) -> None:
    from conftest import metric

    data = images.add("img", 100_000)
    client = await daemon()
    assert await (await client.get("/v1/images/img")).read() == data
    for _ in range(500):  # the reader has its bytes; verification may still be running
        if (await (await client.get("/v1/images/img/status")).json())["state"] == "complete":
            break
        await asyncio.sleep(0.01)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "swarmcache_cache_misses_total") == 1
    assert metric(text, "swarmcache_fetched_bytes_total", source="origin") == len(data)
    assert metric(text, "swarmcache_images", state="complete") == 1
    assert metric(text, "swarmcache_fetch_duration_seconds_count") == 1
    # declared, no sample for these labels yet: 0
    assert metric(text, "swarmcache_fetched_bytes_total", source="peer") == 0
    assert metric(text, "swarmcache_verification_failures_total", kind="chunk") == 0
    assert metric(text, "swarmcache_peer_quarantines_total") == 0
    # not declared at all, or asked with labels the family does not have: an error
    for name, labels in [
        ("swarmcache_no_such_thing_total", {}),
        ("swarmcache_cache_miss_total", {}),  # a renamed metric
        ("swarmcache_cache_misses", {}),  # the family, not a sample of it
        ("swarmcache_fetched_bytes_total", {"src": "origin"}),
    ]:
        with pytest.raises(AssertionError, match=name):
            metric(text, name, **labels)


async def test_verify_drops_a_chunk_corrupted_on_disk_and_it_is_fetched_again(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """`swarmcache verify` re-hashes what is on disk: a byte flipped by hand in the
    cache is found, its chunk dropped (exit 1), fetched again by the next read (one
    chunk from the origin), and the image served whole and right."""
    from conftest import CHUNK

    data = images.add("img", 5 * CHUNK + 77)
    images.add("other", 2 * CHUNK)
    d = await start_daemon_process(tmp_path, origin.url)
    daemon_processes.append(d)
    for name in ("img", "other"):
        code, _, err = await swarmcache("--daemon", d.url, "fetch", name, "-q")
        assert code == 0, err
    before = origin.stats.bytes_by_path["img"]
    with open(d.cache_dir / "images" / "img" / "data", "r+b") as f:
        f.seek(3 * CHUNK + 10)
        f.write(bytes([data[3 * CHUNK + 10] ^ 0x01]))
    code, out, _ = await swarmcache("--daemon", d.url, "verify")
    assert code == 1
    assert "img: 1 of 6 chunks BAD, dropped (chunks 3)" in out
    assert "other: 2 chunks ok" in out
    code, out, _ = await swarmcache("--daemon", d.url, "status", "img", "--json")
    assert json.loads(out)["state"] == "partial"
    out_file = tmp_path / "img.out"
    code, _, err = await swarmcache("--daemon", d.url, "fetch", "img", "-q", "-o", str(out_file))
    assert code == 0, err
    assert out_file.read_bytes() == data
    assert origin.stats.bytes_by_path["img"] - before == CHUNK  # the dropped chunk alone
    code, out, _ = await swarmcache("--daemon", d.url, "verify", "img")
    assert (code, out.strip()) == (0, "img: 6 chunks ok")
    status = json.loads((await swarmcache("--daemon", d.url, "status", "img", "--json"))[1])
    assert (status["state"], status["sha256"]) == ("complete", sha256(data))


async def test_keygen_writes_a_private_key_once_and_prints_its_public_half(tmp_path: Path) -> None:
    from swarmcache.signing import decode_key, public_key

    key = tmp_path / "manifest.key"
    code, out, err = await swarmcache("keygen", str(key))
    assert code == 0, err
    assert key.stat().st_mode & 0o777 == 0o600
    assert decode_key(out.strip()) == public_key(decode_key(key.read_text()))
    assert "key id" in err
    before = key.read_text()
    code, _, err = await swarmcache("keygen", str(key))
    assert (code, key.read_text()) == (1, before)  # never overwritten
    assert "not overwritten" in err
    code, again, _ = await swarmcache("keygen", "--public", str(key))
    assert (code, again) == (0, out)
    (tmp_path / "bad.key").write_text("A" * 60 + "\n")
    code, _, err = await swarmcache("keygen", "--public", str(tmp_path / "bad.key"))
    assert code == 2
    assert "32 bytes" in err
