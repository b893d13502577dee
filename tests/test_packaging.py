"""What operators install: the systemd unit and the compute-host config.

config/swarmcache.service must be a unit systemd accepts without a warning, whose
settings match what the daemon does (Type=notify: READY=1 once it listens, STOPPING=1
on SIGTERM, both checked here with a real daemon and a notify socket of the test's
own), and whose state directory and credentials match config/compute-host.toml.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import aiohttp
import pytest

from conftest import CHUNK, free_port, refuse_host_mdns
from swarmcache.cli import build_parser
from swarmcache.config import load_config
from swarmtools.testbed import daemon_env

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "config" / "swarmcache.service"
COMPUTE_CONFIG = ROOT / "config" / "compute-host.toml"
SHIPPED_BINARY = "/opt/swarmcache/bin/swarmcache"
NOTIFY_WAIT = 20.0  # seconds for READY=1 / STOPPING=1 / the exit


def unit() -> configparser.ConfigParser:
    """The shipped unit, parsed (a repeated key keeps its last value: see unit_values)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]  # keys keep their case
    parser.read_string(UNIT.read_text())
    return parser


def unit_values(section: str, key: str) -> list[str]:
    """Every value of a key that may be repeated (LoadCredential=), in order."""
    values: list[str] = []
    current = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and not line.startswith(("#", ";")) and "=" in line:
            name, _, value = line.partition("=")
            if name.strip() == key:
                values.append(value.strip())
    return values


# -- systemd-analyze verify ----------------------------------------------------------


def systemd_analyze() -> str:
    """The systemd-analyze binary (CI must have it; elsewhere the test is skipped)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"CI must verify the systemd unit: {reason}")
        pytest.skip(reason)
    return path


def verify(unit_text: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run `systemd-analyze verify` on the unit text as tmp_path/swarmcache.service.

    Returns the run and its stderr lines about the unit: systemd-analyze prints a
    warning (unknown key, unparsable value, missing binary) as
    "<path>:<line>: ..." or "swarmcache.service: ...", and still exits 0 for most.
    """
    path = tmp_path / "swarmcache.service"
    path.write_text(unit_text)
    run = subprocess.run(
        [systemd_analyze(), "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    about_unit = [line for line in run.stderr.splitlines() if path.name in line]
    return run, about_unit


def unit_with_real_binary() -> str:
    """The shipped unit, with ExecStart's binary the venv's own (verify wants it to exist)."""
    binary = Path(sys.executable).with_name("swarmcache")
    assert binary.is_file(), f"{binary}: the console script of this venv is missing"
    text = UNIT.read_text()
    shipped = f"ExecStart={SHIPPED_BINARY} "
    assert text.count(shipped) == 1, f"the unit's ExecStart does not run {SHIPPED_BINARY}"
    return text.replace(shipped, f"ExecStart={binary} ")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    run, about_unit = verify(unit_with_real_binary(), tmp_path)
    assert run.returncode == 0, f"systemd-analyze verify failed:\n{run.stdout}{run.stderr}"
    assert about_unit == [], "systemd-analyze verify warned about the unit:\n" + "\n".join(
        about_unit
    )


def test_verify_check_sees_warnings(tmp_path: Path) -> None:
    """The check above is not blind: a misplaced key and a bad value are reported."""
    text = unit_with_real_binary().replace(
        "[Service]\n", "[Service]\nStartLimitBurstt=5\nProtectSystem=bogus\n", 1
    )
    run, about_unit = verify(text, tmp_path)
    assert run.returncode == 0  # warnings only: the exit status alone would miss them
    assert any("StartLimitBurstt" in line for line in about_unit), run.stderr
    assert any("bogus" in line for line in about_unit), run.stderr


# -- the unit's settings against the daemon and the compute config -------------------


def test_unit_runs_the_daemon_as_it_needs() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == SHIPPED_BINARY
    # the command line means what it should to the CLI itself
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == "/etc/swarmcache/swarmcache.toml"
    assert PurePosixPath(args.config).parent == PurePosixPath(
        "/etc", service["ConfigurationDirectory"]
    )
    assert service["Restart"] == "on-failure"
    # a config error (exit 2) is not retried
    assert "2" in service["RestartPreventExitStatus"].split()
    # mDNS and name lookups list interfaces over netlink (ifaddr, getaddrinfo)
    families = service["RestrictAddressFamilies"].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    before = unit()["Unit"]["Before"].split()
    assert {"nova-compute.service", "openstack-nova-compute.service"} <= set(before)
    assert "network-online.target" in unit()["Unit"]["After"].split()
    assert "network-online.target" in unit()["Unit"]["Wants"].split()


def test_unit_matches_the_compute_config() -> None:
    service = unit()["Service"]
    config = load_config(COMPUTE_CONFIG, {})
    assert PurePosixPath("/var/lib", service["StateDirectory"]) == PurePosixPath(config.cache.dir)
    credentials = unit_values("Service", "LoadCredential")
    assert credentials, "the unit loads no credential"
    names = {value.partition(":")[0] for value in credentials}
    for value in credentials:
        source = value.partition(":")[2]
        assert PurePosixPath(source).is_absolute(), value
        assert not source.startswith("/run/credentials/"), value
    secret_files = {
        f"{section}.{key}": value
        for section in (config.origin, config.security)
        for key, value in asdict(section).items()
        if key.endswith("_file") and value
    }
    assert secret_files, "the compute config reads no secret file"
    credentials_dir = PurePosixPath("/run/credentials", UNIT.name)
    for key, path in secret_files.items():
        assert PurePosixPath(path).parent == credentials_dir, f"{key} = {path}"
    assert {PurePosixPath(p).name for p in secret_files.values()} == names


def test_compute_config_loads() -> None:
    config = load_config(COMPUTE_CONFIG, {})
    assert config.source == str(COMPUTE_CONFIG)
    assert config.origin.kind == "glance"
    assert config.security.cluster_secret_file  # peers authenticated on compute hosts
    assert config.glance_api.listen == "127.0.0.1:9292"
    assert str(config.cache.dir) == "/var/lib/swarmcache"
    assert config.discovery.mdns is True
    assert config.daemon.listen == "0.0.0.0:7480"


# -- Type=notify for real --------------------------------------------------------------


class NotifySocket:
    """The datagram socket systemd would listen on for a Type=notify service."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # what NOTIFY_SOCKET is set to
        self.messages: list[list[str]] = []

    async def wait_for(self, assignment: str, timeout: float = NOTIFY_WAIT) -> list[str]:
        """The first datagram (its lines) with `assignment`, e.g. READY=1."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                data = await loop.sock_recv(self.sock, 4096)
                lines = data.decode().split("\n")
                self.messages.append(lines)
                if assignment in lines:
                    return lines

    def pending(self) -> list[list[str]]:
        """Datagrams that arrived and were not read yet."""
        out: list[list[str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(data.decode().split("\n"))


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    """NOTIFY_SOCKET as a file system path, and once as an abstract socket ("@name")."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if request.param == "path":
            path = tmp_path / "notify"
            assert len(os.fsencode(path)) < 100, path  # sun_path is 108 bytes
            sock.bind(str(path))
            env_value = str(path)
        else:
            name = f"swarmcache-test-notify-{secrets.token_hex(8)}"
            sock.bind("\0" + name)
            env_value = "@" + name
        sock.setblocking(False)
        yield NotifySocket(sock, env_value)
    finally:
        sock.close()


def write_config(tmp_path: Path, port: int) -> Path:
    """A loopback daemon's config, as conftest.start_daemon_process writes it."""
    path = tmp_path / "notify.toml"
    path.write_text(
        f'[daemon]\nlisten = "127.0.0.1:{port}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\nchunk_size = "{CHUNK}"\nmax_size = "1GiB"\n'
        # nothing listens there: the daemon never asks the origin without a request
        f'[origin]\nkind = "http"\nurl = "http://127.0.0.1:{free_port()}/images/{{image_id}}"\n'
        "[discovery]\nmdns = false\n"
    )
    refuse_host_mdns(load_config(path, {}), path)
    return path


async def start_serve(
    tmp_path: Path, config: Path, notify: NotifySocket
) -> asyncio.subprocess.Process:
    """`python -m swarmcache --config CONFIG serve` with NOTIFY_SOCKET set."""
    with open(tmp_path / "daemon.log", "ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "swarmcache",
            "--config",
            str(config),
            "serve",
            stdout=log,
            stderr=log,
            env=daemon_env({"NOTIFY_SOCKET": notify.env_value}),
        )


async def stop(proc: asyncio.subprocess.Process) -> None:
    """Kill the daemon (by its PID) if it still runs; always reap it."""
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


async def test_notify_ready_once_listening_and_stopping_on_sigterm(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    port = free_port()
    proc = await start_serve(tmp_path, write_config(tmp_path, port), notify_socket)
    log = tmp_path / "daemon.log"
    try:
        try:
            ready = await notify_socket.wait_for("READY=1")
        except TimeoutError:
            raise AssertionError(
                f"no READY=1 in {NOTIFY_WAIT}s (exit {proc.returncode}):\n{log.read_text()}"
            ) from None
        assert proc.returncode is None
        # Type=notify means "serving" once READY=1 is in: no retry here
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        assert f"STATUS=listening on 127.0.0.1:{port}" in ready

        proc.send_signal(signal.SIGTERM)
        try:
            await notify_socket.wait_for("STOPPING=1")
        except TimeoutError:
            raise AssertionError(f"no STOPPING=1 after SIGTERM:\n{log.read_text()}") from None
        async with asyncio.timeout(NOTIFY_WAIT):
            status = await proc.wait()
        assert status == 0, log.read_text()
        ready_count = sum("READY=1" in m for m in notify_socket.messages + notify_socket.pending())
        assert ready_count == 1, notify_socket.messages
    finally:
        await stop(proc)


async def test_no_ready_when_the_daemon_cannot_listen(tmp_path: Path) -> None:
    """A daemon that fails to start never says READY=1 (systemd sees the start fail)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = tmp_path / "notify"
        sock.bind(str(path))
        sock.setblocking(False)
        notify = NotifySocket(sock, str(path))
        config = write_config(tmp_path, taken.getsockname()[1])
        proc = await start_serve(tmp_path, config, notify)
        try:
            async with asyncio.timeout(NOTIFY_WAIT):
                status = await proc.wait()
        finally:
            await stop(proc)
        log = (tmp_path / "daemon.log").read_text()
        assert status == 1, log
        assert "daemon.listen" in log
        assert not any("READY=1" in m for m in notify.pending())
