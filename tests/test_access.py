"""The client API answers this host; callers on other hosts need the API token or a
request signed with the cluster secret (access.py). Two hosts in network namespaces:
each daemon is reached from its own host (loopback and its own address) and from the
other host, as on a LAN."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import metric, need_testbed
from swarmcache.peerauth import EMPTY_SHA256, HEADER, sign_request
from swarmtools.testbed import (
    DAEMON_PORT,
    Host,
    Testbed,
    host_config,
    http_status,
    make_image,
    origin_url,
    start_daemon,
    start_origin,
    write_toml,
)

SECRET = b"correct horse battery staple, 32"
TOKEN = "the operators' API token, at least 16 bytes"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, Path]]:
    need_testbed()
    work = tmp_path_factory.mktemp("access")
    (work / "images").mkdir()
    make_image(work / "images" / "img", 1)
    with Testbed(2) as tb:
        start_origin(tb, work / "images", log=work / "origin.log")
        yield tb, work


def _daemon(
    bed: Testbed, work: Path, host: Host, security: dict[str, str]
) -> subprocess.Popen[bytes]:
    config = write_toml(
        work / f"{host.name}.toml",
        host_config(
            host,
            work / host.name,
            origin_url(bed),
            extra={"discovery": {"mdns": False}, "security": security},
        ),
    )
    return start_daemon(bed, host, config, log=work / f"{host.name}.log")


def test_other_hosts_need_the_token_or_the_cluster_secret(bed: tuple[Testbed, Path]) -> None:
    tb, work = bed
    (work / "token").write_text(TOKEN + "\n")
    (work / "secret").write_bytes(SECRET + b"\n")
    a, b = tb.hosts
    proc = _daemon(
        tb,
        work,
        a,
        {"api_token_file": str(work / "token"), "cluster_secret_file": str(work / "secret")},
    )
    try:
        url = f"http://{a.addr}:{DAEMON_PORT}"
        # this host: loopback and its own address, no credential
        assert http_status(tb, a, f"http://127.0.0.1:{DAEMON_PORT}/v1/images")[0] == 200
        assert http_status(tb, a, url + "/v1/images/img")[0] == 200
        # the other host
        status, body = http_status(tb, b, url + "/v1/images")
        assert status == 401
        assert "token" in json.loads(body)["detail"]
        assert http_status(tb, b, url + "/v1/images/img")[0] == 401  # image bytes too
        assert http_status(tb, b, url + "/metrics")[0] == 401
        assert http_status(tb, b, url + "/healthz")[0] == 200  # says nothing but "up"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert http_status(tb, b, url + "/v1/images", headers=bearer)[0] == 200
        wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
        assert http_status(tb, b, url + "/v1/images", headers=wrong)[0] == 401
        signed = sign_request(SECRET, "POST", "/v1/images/img/fetch", EMPTY_SHA256, time.time())
        assert (
            http_status(tb, b, url + "/v1/images/img/fetch", "POST", {HEADER: signed.header})[0]
            == 202
        )
        replay = {HEADER: signed.header}
        assert http_status(tb, b, url + "/v1/images/img/fetch", "POST", replay)[0] == 401
        other = sign_request(b"y" * 32, "GET", "/v1/images", EMPTY_SHA256, time.time())
        assert http_status(tb, b, url + "/v1/images", headers={HEADER: other.header})[0] == 401
        text = http_status(tb, a, f"http://127.0.0.1:{DAEMON_PORT}/metrics")[1].decode()
        assert metric(text, "swarmcache_api_auth_failures_total") == 6
    finally:
        tb.stop(proc, signal.SIGTERM, 10)


def test_without_a_credential_configured_the_api_answers_its_host_only(
    bed: tuple[Testbed, Path],
) -> None:
    tb, work = bed
    a, b = tb.hosts
    proc = _daemon(tb, work, a, {})
    try:
        url = f"http://{a.addr}:{DAEMON_PORT}"
        assert http_status(tb, a, url + "/v1/images")[0] == 200
        status, body = http_status(tb, b, url + "/v1/images")
        assert status == 403
        assert "answers this host only" in json.loads(body)["detail"]
        bearer = {"Authorization": f"Bearer {TOKEN}"}  # no token configured: none opens it
        assert http_status(tb, b, url + "/v1/images", headers=bearer)[0] == 403
    finally:
        tb.stop(proc, signal.SIGTERM, 10)
