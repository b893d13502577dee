"""Shared fixtures: real origin servers on loopback, real cache dirs, in-process daemons."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from swarmcache.config import Config, build_config, load_config
from swarmcache.daemon import build_app
from swarmtools.origin_server import FAULTS, STATS, Faults, OriginStats, make_origin_app
from swarmtools.testbed import daemon_env

CHUNK = 64 * 1024


@dataclass
class ImageDir:
    """A directory of origin images made by the test."""

    root: Path

    def add(
        self,
        name: str,
        size: int,
        *,
        sidecar: bool = True,
        seed: int = 0,
        wrong_sidecar: bool = False,
    ) -> bytes:
        """Write an image of `size` random bytes (and its .sha256); return its bytes."""
        data = random.Random(f"{name}-{seed}").randbytes(size)
        (self.root / name).write_bytes(data)
        if sidecar:
            digest = hashlib.sha256(data + (b"x" if wrong_sidecar else b"")).hexdigest()
            (self.root / f"{name}.sha256").write_text(f"{digest}  {name}\n")
        return data


@pytest.fixture
def images(tmp_path: Path) -> ImageDir:
    """An empty origin directory."""
    root = tmp_path / "origin"
    root.mkdir()
    return ImageDir(root)


@dataclass
class Origin:
    """A running HTTP origin server."""

    server: TestServer
    app: web.Application

    @property
    def url(self) -> str:
        """The origin.url template."""
        return (
            str(self.server.make_url("/images/{image_id}")).replace("%7B", "{").replace("%7D", "}")
        )

    @property
    def stats(self) -> OriginStats:
        """Bytes and requests served so far."""
        return self.app[STATS]

    @property
    def faults(self) -> Faults:
        """Fault switches."""
        return self.app[FAULTS]

    def chunk_requests(self, name: str) -> list[int]:
        """Start offsets of the Range GETs for `name`, in order."""
        out = []
        for method, path, rng, *_ in self.stats.requests:
            if method == "GET" and path == name and rng:
                out.append(int(rng.split("=")[1].split("-")[0]))
        return out


@pytest.fixture
async def origin(aiohttp_server: Callable[..., Awaitable[TestServer]], images: ImageDir) -> Origin:
    """A real aiohttp origin on loopback serving `images`."""
    app = make_origin_app(images.root)
    server = await aiohttp_server(app)
    return Origin(server, app)


def refuse_host_mdns(config: Config, what: object) -> None:
    """Fail the test if a daemon on the host's own network would have mDNS on.

    mDNS announces to and browses the machine's real network; tests use it only in
    network namespaces of their own (swarmtools.testbed: test_swarm.py, test_testbed.py).
    """
    if config.discovery.mdns:
        raise AssertionError(
            f"{what}: discovery.mdns is on for a daemon on the host network; "
            "tests use mDNS only inside network namespaces (swarmtools.testbed)"
        )


def make_config(tmp_path: Path, raw: dict[str, Any] | None = None) -> Config:
    """A validated Config for a test (cache in tmp_path, 64 KiB chunks, fast retries, no mDNS)."""
    base: dict[str, dict[str, Any]] = {
        "cache": {"dir": str(tmp_path / "cache"), "chunk_size": CHUNK, "max_size": "1GiB"},
        "discovery": {"mdns": False},  # see refuse_host_mdns
        "origin": {
            "retries": 2,
            "retry_backoff": "10ms",
            "read_timeout": "5s",
            "connect_timeout": "2s",
        },
    }
    for section, values in (raw or {}).items():
        base.setdefault(section, {}).update(values)
    return build_config(base, {}, "test")


DaemonFactory = Callable[..., Awaitable[TestClient]]


async def serve_app(
    aiohttp_client: Callable[..., Awaitable[TestClient]], config: Config
) -> TestClient:
    """An in-process daemon served as `swarmcache serve` does (handlers end when clients go)."""
    refuse_host_mdns(config, "in-process daemon")
    return await aiohttp_client(build_app(config), server_kwargs={"handler_cancellation": True})


@pytest.fixture
def daemon(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path, origin: Origin
) -> DaemonFactory:
    """Start an in-process daemon against `origin`; extra config sections as keywords."""

    async def start(**sections: dict[str, Any]) -> TestClient:
        raw: dict[str, dict[str, Any]] = {"origin": {"kind": "http", "url": origin.url}}
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return await serve_app(aiohttp_client, make_config(tmp_path, raw))

    return start


def free_port() -> int:
    """An ephemeral port on loopback that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI uses urllib, which honours proxy variables; tests talk to loopback only.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    # A developer's exported SWARMCACHE_* must not change what a test does (in-process
    # daemons read SWARMCACHE_TEST_* switches from here); the helpers that start
    # processes also start them without any (daemon_env), whatever a test sets here.
    for var in [v for v in os.environ if v.startswith("SWARMCACHE_")]:
        monkeypatch.delenv(var)


# The sample names each family type has in the text format, as suffixes of its name.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition.

    A family that is declared but has no sample with these labels (a labelled counter
    never incremented is not printed) counts as 0; a sample name no family declares,
    or label names the family's samples do not have, fail the test.
    """
    from prometheus_client.parser import text_string_to_metric_families

    declared = False
    label_names: set[frozenset[str]] = set()
    for family in text_string_to_metric_families(text):
        suffixes = _SAMPLE_SUFFIXES.get(family.type, ("",))
        if name not in {family.name + suffix for suffix in suffixes}:
            continue
        declared = True
        for sample in family.samples:
            if sample.name == name:
                if sample.labels == labels:
                    return float(sample.value)
                label_names.add(frozenset(sample.labels))
    if not declared:
        raise AssertionError(f"metric {name} is not in the exposition")
    if label_names and frozenset(labels) not in label_names:
        have = " or ".join(sorted(str(sorted(n)) for n in label_names))
        raise AssertionError(f"metric {name} has labels {have}, not {sorted(labels)}")
    return 0.0


@dataclass
class DaemonProcess:
    """A real `swarmcache serve` subprocess."""

    proc: Any
    url: str
    config_path: Path
    cache_dir: Path

    async def kill9(self) -> None:
        """SIGKILL, as a crash would."""
        import signal

        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


async def start_daemon_process(
    tmp_path: Path,
    origin_url: str,
    *,
    name: str = "d",
    extra: str = "",
    daemon_extra: str = "",
    env: dict[str, str] | None = None,
    port: int | None = None,
    tls: Any = None,
) -> DaemonProcess:
    """Write a config file and start `python -m swarmcache serve`; wait for /healthz.

    `tls`: an ssl.SSLContext to reach a daemon whose config sets [security] tls_*
    (its url is then https://).

    The daemon's environment has no SWARMCACHE_* variable but those in `env`; its
    discovery.mdns is off unless `extra` sets it, and on it is refused (refuse_host_mdns).
    """
    import asyncio
    import sys

    import aiohttp

    port = port or free_port()
    cache_dir = tmp_path / f"{name}-cache"
    config_path = tmp_path / f"{name}.toml"
    if "[discovery]" not in extra:
        extra += "[discovery]\n"
    if "mdns" not in extra:  # off unless the test says so (and then refused below)
        extra = extra.replace("[discovery]\n", "[discovery]\nmdns = false\n", 1)
    config_path.write_text(
        f'[daemon]\nlisten = "127.0.0.1:{port}"\n{daemon_extra}'
        f'[cache]\ndir = "{cache_dir}"\nchunk_size = "{CHUNK}"\nmax_size = "1GiB"\n'
        f'[origin]\nkind = "http"\nurl = "{origin_url}"\nretries = 2\nretry_backoff = "10ms"\n'
        + extra
    )
    proc_env = daemon_env(env)
    refuse_host_mdns(load_config(config_path, proc_env), config_path)
    log = open(tmp_path / f"{name}.log", "ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarmcache",
        "--config",
        str(config_path),
        "serve",
        stdout=log,
        stderr=log,
        env=proc_env,
    )
    log.close()
    url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(200):
            try:
                async with session.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return DaemonProcess(proc, url, config_path, cache_dir)
            except aiohttp.ClientError:
                pass
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    raise AssertionError(f"daemon did not start: {(tmp_path / f'{name}.log').read_text()}")


@pytest.fixture
async def daemon_processes() -> Any:
    """Collects started daemon processes and stops every one still running (by its PID)."""
    procs: list[DaemonProcess] = []
    yield procs
    for d in procs:
        if d.proc.returncode is None:
            d.proc.terminate()
            try:
                import asyncio

                await asyncio.wait_for(d.proc.wait(), 10)
            except TimeoutError:
                d.proc.kill()
                await d.proc.wait()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    """A 512 KiB tmpfs (root only): a disk that fills up."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: the full-disk test must run there")
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def need_testbed() -> None:
    """Skip a test that needs the network test bed where this machine cannot build one;
    fail instead under CI, which must run the multi-host tests."""
    from swarmtools.testbed import testbed_unavailable

    reason = testbed_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the multi-host tests: {reason}")
    pytest.skip(reason)


async def wait_peers(session: Any, url: str, n: int = 1) -> list[dict[str, Any]]:
    """The daemon at `url`'s peer table once it lists `n` usable peers (10 s at most)."""
    import asyncio

    peers: list[dict[str, Any]] = []
    for _ in range(100):
        async with session.get(url + "/v1/peers") as resp:
            peers = (await resp.json())["peers"]
        if len([p for p in peers if p["state"] == "ok"]) >= n:
            return list(peers)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} knows {peers}, wanted {n} usable peers")


async def wait_log(path: Path, text: str, seconds: float = 5.0) -> bool:
    """Whether `text` appears in the log file at `path` within `seconds`."""
    import asyncio

    for _ in range(max(1, int(seconds / 0.1))):
        if text in path.read_text():
            return True
        await asyncio.sleep(0.1)
    return False
