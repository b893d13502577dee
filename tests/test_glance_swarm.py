"""A real Glance as the swarm's origin: hosts in network namespaces, Glance in the
origin's namespace, mDNS between the hosts as on a LAN.

How much Glance sent is read from its own request log (the bytes each
`GET /v2/images/{id}/file` generated), so headers and TCP do not count.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import need_testbed
from swarmtools.glance import GlanceServer
from swarmtools.testbed import Testbed, http_request, python_argv
from test_swarm import API, Swarm, fetch_all, ok_peers, wait_for

pytestmark = pytest.mark.timeout(300)
HOSTS = 5
MIB = 1024 * 1024
MISSING = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def glance_bed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Testbed, GlanceServer, Path]]:
    """Five hosts, and a real Glance in the origin's namespace."""
    need_testbed()
    work = tmp_path_factory.mktemp("glance-swarm")
    with Testbed(HOSTS) as bed:
        server = GlanceServer(
            host=bed.origin.addr, port=9292, netns=bed.origin.ns, workdir=work / "glance"
        )
        with server:
            yield bed, server, work


@pytest.fixture
def swarm(
    glance_bed: tuple[Testbed, GlanceServer, Path], request: pytest.FixtureRequest
) -> Iterator[Swarm]:
    """Daemons for one test."""
    bed, _, work = glance_bed
    s = Swarm(bed, work, request.node.name)
    try:
        yield s
    finally:
        s.close()


def _upload(glance: GlanceServer, work: Path, name: str, size: int) -> tuple[dict[str, Any], Path]:
    path = work / name
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    meta = glance.create_image_from_file(path, name=name)
    assert meta["status"] == "active"
    assert meta["os_hash_algo"] == "sha512"
    return meta, path


def _start(swarm: Swarm, glance: GlanceServer, hosts: list[Any]) -> None:
    """Daemons as on compute hosts: a Glance origin, a cluster secret (which also lets
    one host's warm job drive the others' APIs)."""
    secret = swarm.work / "cluster-secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("the compute hosts' cluster secret\n")
    for h in hosts:
        swarm.start(
            h,
            origin={"kind": "glance", "url": glance.url},
            cache={"chunk_size": "1MiB"},
            security={"cluster_secret_file": str(secret)},
        )
    for h in hosts:
        want = {f"{o.addr}:7480" for o in hosts if o is not h}
        wait_for(f"{h.name} discovers the others", lambda h=h, w=want: ok_peers(swarm, h) >= w)


def _status(swarm: Swarm, host: Any, image_id: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        http_request(swarm.bed, host, f"{API}/v1/images/{image_id}/status")
    )
    return body


def _assert_verified(swarm: Swarm, host: Any, meta: dict[str, Any]) -> None:
    """The daemon of `host` holds the image complete, matching Glance's sha512."""
    st = _status(swarm, host, meta["id"])
    assert (st["state"], st["hash"]) == ("complete", f"sha512:{meta['os_hash_value']}"), host.name


def _sent_once(glance: GlanceServer, meta: dict[str, Any], size: int) -> None:
    """Glance sent the image about once (its request log); printed for -s."""
    sent = glance.data_bytes_sent(meta["id"])
    print(f"Glance sent {sent} bytes of {meta['id']} ({sent / size:.4f} copies)")
    assert size <= sent <= 1.05 * size, f"Glance sent {sent / size:.3f} copies"


def test_five_hosts_fetch_a_glance_image_at_once_and_glance_sends_it_once(
    swarm: Swarm, glance_bed: tuple[Testbed, GlanceServer, Path]
) -> None:
    bed, glance, work = glance_bed
    size = 48 * MIB + 12345
    meta, path = _upload(glance, work, "storm", size)
    hosts = bed.hosts[:HOSTS]
    _start(swarm, glance, hosts)
    fetch_all(swarm, hosts, meta["id"])
    for h in hosts:
        out = swarm.work / h.name / meta["id"]
        assert hashlib.sha512(out.read_bytes()).hexdigest() == meta["os_hash_value"], h.name
        _assert_verified(swarm, h, meta)
    _sent_once(glance, meta, size)
    path.unlink()


def test_warm_three_hosts_from_one_cli_call(
    swarm: Swarm, glance_bed: tuple[Testbed, GlanceServer, Path]
) -> None:
    """`swarmcache warm ID MISSING --hosts h1,h2,h3 --wait` on h1: the image lands on
    the three hosts (Glance sends it about once), the missing one fails on each, with
    its reason on screen, and the command's status is 1."""
    bed, glance, work = glance_bed
    size = 24 * MIB + 7
    meta, path = _upload(glance, work, "warm-me", size)
    hosts = bed.hosts[:HOSTS]
    _start(swarm, glance, hosts)
    targets = hosts[:3]
    argv = python_argv(
        "-m", "swarmcache", "--daemon", API, "warm", meta["id"], MISSING,
        "--hosts", ",".join(f"{h.addr}:7480" for h in targets), "--wait",
    )  # fmt: skip
    proc = bed.popen(targets[0], argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        bed.stop(proc, signal.SIGKILL, 5)
    text = out.decode(errors="replace")
    assert proc.returncode == 1, (text, err.decode(errors="replace"))
    assert "3/6 cached" in text
    rows = [line for line in text.splitlines() if MISSING in line]
    assert len(rows) == 3
    assert all("failed" in r and "not found" in r for r in rows), rows
    for h in targets:
        _assert_verified(swarm, h, meta)
    # (hosts the swarm picked as the image's readers from Glance may hold it too: the
    # cold start reads from the origin through them, whether they were asked or not)
    _sent_once(glance, meta, size)
    path.unlink()
