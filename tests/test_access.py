"""The client API answers this host; callers on other hosts need the API token, a
request signed with the cluster secret or a client certificate of the cluster CA
(access.py, tls.py). Two hosts in network namespaces:
each daemon is reached from its own host (loopback and its own address) and from the
other host, as on a LAN."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import metric, need_testbed
from swarmcache.peerauth import EMPTY_SHA256, HEADER, sign_request
from swarmtools.certs import make_ca, write_ca, write_host
from swarmtools.testbed import (
    DAEMON_PORT,
    Host,
    Testbed,
    host_config,
    http_status,
    make_image,
    origin_stats,
    origin_url,
    python_argv,
    reset_origin_stats,
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


def test_with_mutual_tls_a_cluster_certificate_opens_peers_and_apis(
    bed: tuple[Testbed, Path],
) -> None:
    """Two hosts with certificates of one cluster CA and no cluster secret: they find
    each other over mDNS and trade over HTTPS; a warm job run on b drives a's API
    with b's certificate; from b without a certificate, a's API and peer routes
    refuse (401)."""
    tb, work = bed
    a, b = tb.hosts
    ca = make_ca()
    ca_path = write_ca(ca, work / "tls-ca.pem")
    files = {h: write_host(ca, ca_path, work, h.name, (h.addr,)) for h in tb.hosts}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for h in (a, b):
            config = write_toml(
                work / f"{h.name}-tls.toml",
                host_config(
                    h,
                    work / f"{h.name}-tls",
                    origin_url(tb),
                    extra={"discovery": {"mdns": True}, "security": files[h].security()},
                ),
            )
            log = work / f"{h.name}-tls.log"
            procs.append(start_daemon(tb, h, config, log=log, scheme="https"))
        url = f"https://{a.addr}:{DAEMON_PORT}"
        member = {"ca": str(ca_path), "cert": str(files[b].cert), "key": str(files[b].key)}
        anonymous = {"ca": str(ca_path)}
        assert http_status(tb, b, url + "/v1/images", tls=member)[0] == 200
        status, body = http_status(tb, b, url + "/v1/images", tls=anonymous)
        assert status == 401
        assert "client certificate" in json.loads(body)["detail"]
        assert http_status(tb, b, url + "/v1/peer/hello", tls=anonymous)[0] == 401
        assert http_status(tb, b, url + "/v1/peer/hello", tls=member)[0] == 200
        # a's own host without a certificate: the client API answers it
        local = f"https://127.0.0.1:{DAEMON_PORT}"
        assert http_status(tb, a, local + "/v1/images", tls=anonymous)[0] == 200

        # b warms a: the image is read once from the origin, by a or by b as a's reader
        # (a joins b over TLS), and whichever did not read it got it from the other
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # they hear of each other over mDNS + TLS
            peers = [
                json.loads(http_status(tb, h, local + "/v1/peers", tls=anonymous)[1])["peers"]
                for h in (a, b)
            ]
            if all(any(p["state"] == "ok" for p in listed) for listed in peers):
                break
            time.sleep(0.2)
        reset_origin_stats(tb)
        warm = tb.communicate(
            b,
            python_argv(
                "-m", "swarmcache", "--config", str(work / f"{b.name}-tls.toml"), "warm", "img",
                "--hosts", f"{a.addr}:{DAEMON_PORT}", "--wait",
            ),
            timeout=120,
        )  # fmt: skip
        assert warm.returncode == 0, warm.stdout.decode() + warm.stderr.decode()
        status, body = http_status(tb, a, local + "/v1/images/img/status", tls=anonymous)
        assert json.loads(body)["state"] == "complete"
        status, body = http_status(tb, b, local + "/v1/images/img", tls=anonymous)
        assert status == 200
        want = (work / "images" / "img.sha256").read_text()[:64]
        assert hashlib.sha256(body).hexdigest() == want
        from_peers = 0.0
        for h in (a, b):
            text = http_status(tb, h, local + "/metrics", tls=anonymous)[1].decode()
            from_peers += metric(text, "swarmcache_fetched_bytes_total", source="peer")
        assert from_peers == len(body)  # one host's copy came over TLS from the other
        assert origin_stats(tb)["bytes_by_path"]["img"] == len(body)  # the origin: once
    finally:
        for proc in procs:
            tb.stop(proc, signal.SIGTERM, 10)
