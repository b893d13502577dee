"""[security] tls_cert, tls_key, tls_ca: mutual TLS between daemons (tls.py). Daemons
with certificates of the cluster CA trade blocks over HTTPS; a client without a
certificate is refused on peer routes (401) but served on the local API; a client or
a server with a certificate of another CA fails the handshake and is never a source."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import (
    ImageDir,
    Origin,
    metric,
    sha256,
    start_daemon_process,
    wait_log,
    wait_peers,
)
from swarmcache import tls
from swarmcache.config import SecurityConfig
from swarmcache.errors import ConfigError
from swarmtools.certs import HostFiles, make_ca, write_ca, write_host

MIB = 1024 * 1024


def _cluster(folder: Path, *names: str, ca_name: str = "ca") -> list[HostFiles]:
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca(f"{ca_name} CA")
    ca_path = write_ca(ca, folder / f"{ca_name}.pem")
    return [write_host(ca, ca_path, folder, name, ("127.0.0.1",)) for name in names]


def _context(files: HostFiles | None, ca: Path) -> ssl.SSLContext:
    """A client context trusting `ca`, presenting `files`' certificate (None: none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca))
    if files is not None:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def _security(files: HostFiles) -> str:
    return (
        f'[security]\ntls_cert = "{files.cert}"\ntls_key = "{files.key}"\ntls_ca = "{files.ca}"\n'
    )


def test_the_three_keys_go_together_and_bad_files_name_their_key(tmp_path: Path) -> None:
    (a,) = _cluster(tmp_path, "a")
    (other,) = _cluster(tmp_path / "other", "x", ca_name="other")
    assert tls.load(SecurityConfig()) is None
    with pytest.raises(ConfigError) as info:
        tls.load(SecurityConfig(tls_cert=str(a.cert), tls_key=str(a.key)))
    assert info.value.key == "security.tls_ca"
    with pytest.raises(ConfigError) as info:
        tls.load(SecurityConfig(tls_cert=str(a.cert), tls_key=str(a.key), tls_ca="/nonexistent"))
    assert info.value.key == "security.tls_ca"
    with pytest.raises(ConfigError) as info:  # a key that is not the certificate's
        tls.load(SecurityConfig(tls_cert=str(a.cert), tls_key=str(other.key), tls_ca=str(a.ca)))
    assert info.value.key == "security.tls_cert"
    with pytest.raises(ConfigError) as info:
        tls.load(SecurityConfig(tls_cert=str(a.cert), tls_key="/nonexistent", tls_ca=str(a.ca)))
    assert info.value.key == "security.tls_key"
    with pytest.raises(ConfigError) as info:  # a key is not a CA certificate
        tls.load(SecurityConfig(tls_cert=str(a.cert), tls_key=str(a.key), tls_ca=str(a.key)))
    assert info.value.key == "security.tls_ca"
    loaded = tls.load(SecurityConfig(tls_cert=str(a.cert), tls_key=str(a.key), tls_ca=str(a.ca)))
    assert loaded is not None
    assert loaded.client.verify_mode == ssl.CERT_REQUIRED


async def _with_static_peer(
    tmp_path: Path, origin: Origin, name: str, files: HostFiles, peer: str, ctx: ssl.SSLContext
) -> Any:
    """A daemon with mutual TLS whose one static peer is `peer` (host:port)."""
    return await start_daemon_process(
        tmp_path,
        origin.url,
        name=name,
        extra=f'[discovery]\nmdns = false\nstatic_peers = ["{peer}"]\n' + _security(files),
        tls=ctx,
    )


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def test_members_trade_over_tls_and_strangers_are_refused(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    data = images.add("img", 3 * MIB + 5)
    a_files, b_files = _cluster(tmp_path / "certs", "a", "b")
    (stranger,) = _cluster(tmp_path / "other", "stranger", ca_name="other")
    member = _context(a_files, a_files.ca)
    a = await start_daemon_process(
        tmp_path, origin.url, name="a", extra=_security(a_files), tls=member
    )
    daemon_processes.append(a)
    a_addr = a.url.removeprefix("https://")
    b = await _with_static_peer(tmp_path, origin, "b", b_files, a_addr, member)
    daemon_processes.append(b)
    conn = aiohttp.TCPConnector(ssl=member)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(a.url + "/v1/images/img") as resp:
            assert resp.status == 200
            assert await resp.read() == data
        sent = origin.stats.bytes_by_path["img"]
        await wait_peers(s, b.url)  # b said hello to a over TLS
        async with s.get(b.url + "/v1/images/img") as resp:
            assert sha256(await resp.read()) == sha256(data)
        assert origin.stats.bytes_by_path["img"] == sent  # every byte of b's from a
        async with s.get(b.url + "/metrics") as resp:
            b_metrics = await resp.text()
    assert metric(b_metrics, "swarmcache_fetched_bytes_total", source="peer") == len(data)

    # a client of this host without a certificate: the client API yes, peer routes no
    anon = aiohttp.TCPConnector(ssl=_context(None, a_files.ca))
    async with aiohttp.ClientSession(connector=anon) as s:
        assert await _status(s, a.url + "/v1/images") == 200
        async with s.get(a.url + "/v1/peer/hello") as resp:
            assert resp.status == 401
            assert "client certificate" in (await resp.json())["detail"]
    # a certificate of another CA: no handshake (for a peer route or any other)
    foreign = aiohttp.TCPConnector(ssl=_context(stranger, a_files.ca))
    async with aiohttp.ClientSession(connector=foreign) as s:
        for path in ("/v1/peer/hello", "/v1/images"):
            with pytest.raises(aiohttp.ClientError):
                await _status(s, a.url + path)
    # plain HTTP to the HTTPS port
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            await _status(s, "http://" + a_addr + "/v1/peer/hello")
    connector = aiohttp.TCPConnector(ssl=member)
    async with aiohttp.ClientSession(connector=connector) as s, s.get(a.url + "/metrics") as resp:
        assert metric(await resp.text(), "swarmcache_peer_auth_failures_total") >= 1

    # the CLI on this host reaches its daemon over https with the config's CA
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "swarmcache", "--config", str(b.config_path), "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "img" in done.stdout


async def test_a_server_without_a_cluster_certificate_is_never_a_source(
    tmp_path: Path, images: ImageDir, origin: Origin, daemon_processes: list[Any]
) -> None:
    """A daemon holding the image under a certificate of another CA, named as a static
    peer: its handshake fails, it is never listed as a peer, and the image comes from
    the origin."""
    data = images.add("img", 2 * MIB + 3)
    (impostor,) = _cluster(tmp_path / "other", "impostor", ca_name="other")
    (d_files,) = _cluster(tmp_path / "certs", "d")
    other = _context(impostor, impostor.ca)
    imp = await start_daemon_process(
        tmp_path, origin.url, name="impostor", extra=_security(impostor), tls=other
    )
    daemon_processes.append(imp)
    connector = aiohttp.TCPConnector(ssl=other)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.get(imp.url + "/v1/images/img") as resp,
    ):
        assert await resp.read() == data
    sent = origin.stats.bytes_by_path["img"]
    member = _context(d_files, d_files.ca)
    d = await _with_static_peer(
        tmp_path, origin, "d", d_files, imp.url.removeprefix("https://"), member
    )
    daemon_processes.append(d)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=member)) as s:
        # the static loop asks the impostor within its first turns
        assert await wait_log(tmp_path / "d.log", "certificate verify failed")
        async with s.get(d.url + "/v1/peers") as resp:
            assert (await resp.json())["peers"] == []
        async with s.get(d.url + "/v1/images/img") as resp:
            assert await resp.read() == data
        async with s.get(d.url + "/metrics") as resp:
            text = await resp.text()
    assert metric(text, "swarmcache_fetched_bytes_total", source="peer") == 0
    assert origin.stats.bytes_by_path["img"] == sent + len(data)
    assert "certificate verify failed" in (tmp_path / "d.log").read_text()
