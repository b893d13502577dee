"""The Glance test fixture is a real, working Glance (swarmtools.glance.GlanceServer).

These tests pin what Glance 33's GET /v2/images/{id}/file does, as a client of it must
expect: 200 with Content-MD5 (hex, of the whole image) and no Accept-Ranges; 206 for
one range, with the whole image's Content-MD5 still; 400 for two ranges; 416 (without
Content-Range) past the end; 405 for HEAD; 204 for an image without data.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarmtools.glance import GlanceError, GlanceServer
from swarmtools.testbed import Testbed, http_request, testbed_unavailable

# The first test pays for the server's start (about 3 s) and, on a fresh machine, for
# scripts/setup-glance (about 30 s).
pytestmark = pytest.mark.timeout(300)

SIZE = 5 * 1024 * 1024


def fetch(
    base_url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    parts = urllib.parse.urlsplit(base_url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def glance() -> Iterator[GlanceServer]:
    """One Glance for the module (noauth: every request is an admin)."""
    with GlanceServer() as server:
        yield server


@pytest.fixture(scope="module")
def image(glance: GlanceServer) -> tuple[dict[str, Any], bytes]:
    """A 5 MiB random raw image in `glance`: (its record, its bytes)."""
    data = random.Random("glance-image").randbytes(SIZE)
    return glance.create_image(data, name="five-mib"), data


def test_image_record(glance: GlanceServer, image: tuple[dict[str, Any], bytes]) -> None:
    record, data = image
    assert record["status"] == "active"
    assert record["size"] == SIZE
    assert record["checksum"] == hashlib.md5(data).hexdigest()
    assert record["os_hash_algo"] == "sha512"
    assert record["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert record["visibility"] == "public"
    assert glance.image(record["id"]) == record
    assert glance.image_file_path(record["id"]).read_bytes() == data
    assert glance.url.startswith("http://127.0.0.1:")
    assert glance.startup_s is not None


def test_whole_download(glance: GlanceServer, image: tuple[dict[str, Any], bytes]) -> None:
    record, data = image
    status, headers, body = fetch(glance.url, f"/v2/images/{record['id']}/file")
    assert status == 200
    assert body == data
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == str(SIZE)
    # Hex, not the base64 of RFC 1864.
    assert headers["Content-MD5"] == hashlib.md5(data).hexdigest()
    # Glance never says it takes ranges, though it does: a client must not wait for it.
    assert "Accept-Ranges" not in headers
    assert "ETag" not in headers
    assert "Last-Modified" not in headers
    assert headers["Connection"] == "close"


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=100-199", 100, 199),
        ("bytes=0-0", 0, 0),
        (f"bytes={SIZE - 880}-", SIZE - 880, SIZE - 1),
        ("bytes=-100", SIZE - 100, SIZE - 1),
        (f"bytes={SIZE - 10}-{SIZE + 1000}", SIZE - 10, SIZE - 1),  # the end is clamped
    ],
)
def test_single_range(
    glance: GlanceServer,
    image: tuple[dict[str, Any], bytes],
    range_header: str,
    start: int,
    end: int,
) -> None:
    record, data = image
    status, headers, body = fetch(
        glance.url, f"/v2/images/{record['id']}/file", headers={"Range": range_header}
    )
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert headers["Content-Length"] == str(end - start + 1)
    assert headers["Content-Type"] == "application/octet-stream"
    # The whole image's MD5, not the part's.
    assert headers["Content-MD5"] == hashlib.md5(data).hexdigest()
    assert body == data[start : end + 1]


def test_two_ranges_are_refused(glance: GlanceServer, image: tuple[dict[str, Any], bytes]) -> None:
    record, _ = image
    status, _, body = fetch(
        glance.url, f"/v2/images/{record['id']}/file", headers={"Range": "bytes=0-9,20-29"}
    )
    assert status == 400
    assert b"multiple ranges are not supported" in body


@pytest.mark.parametrize("range_header", [f"bytes={SIZE}-{SIZE + 10}", "bytes=9-0", "items=0-9"])
def test_unsatisfiable_range(
    glance: GlanceServer, image: tuple[dict[str, Any], bytes], range_header: str
) -> None:
    record, _ = image
    status, headers, _ = fetch(
        glance.url, f"/v2/images/{record['id']}/file", headers={"Range": range_header}
    )
    assert status == 416
    assert "Content-Range" not in headers  # no "bytes */size" to learn the size from


def test_head_is_not_allowed(glance: GlanceServer, image: tuple[dict[str, Any], bytes]) -> None:
    record, _ = image
    status, headers, _ = fetch(glance.url, f"/v2/images/{record['id']}/file", method="HEAD")
    assert status == 405
    assert headers["Allow"] == "GET, PUT"


def test_image_without_data_is_204(glance: GlanceServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", glance.port, timeout=30)
    try:
        meta = {"name": "empty", "disk_format": "raw", "container_format": "bare"}
        conn.request("POST", "/v2/images", json.dumps(meta), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        queued = json.loads(resp.read())
    finally:
        conn.close()
    assert queued["status"] == "queued"
    status, _, body = fetch(glance.url, f"/v2/images/{queued['id']}/file")
    assert (status, body) == (204, b"")
    glance.delete(queued["id"])


def test_missing_and_deleted_images_are_404(glance: GlanceServer) -> None:
    record = glance.create_image(b"short-lived" * 100, name="deleted")
    glance.delete(record["id"])
    assert not glance.image_file_path(record["id"]).exists()
    for image_id in (record["id"], "00000000-0000-0000-0000-000000000000"):
        status, _, _ = fetch(glance.url, f"/v2/images/{image_id}/file")
        assert status == 404
    with pytest.raises(GlanceError, match="404"):
        glance.image(record["id"])


def test_noauth_admin_downloads_a_deactivated_image(glance: GlanceServer) -> None:
    data = os.urandom(4096)
    record = glance.create_image(data, name="deactivated")
    glance.deactivate(record["id"])
    assert glance.image(record["id"])["status"] == "deactivated"
    # Every noauth request is an admin, and Glance refuses only non-admins.
    status, _, body = fetch(glance.url, f"/v2/images/{record['id']}/file")
    assert (status, body) == (200, data)
    glance.reactivate(record["id"])
    assert glance.image(record["id"])["status"] == "active"


def test_corrupted_store_is_served_as_is(glance: GlanceServer) -> None:
    data = random.Random("corrupt").randbytes(64 * 1024)
    record = glance.create_image(data, name="corrupt")
    path = glance.image_file_path(record["id"])
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(bytes([data[1000] ^ 0xFF]))
    status, headers, body = fetch(glance.url, f"/v2/images/{record['id']}/file")
    # Glance does not check on the way out: the recorded MD5 goes with the bad bytes.
    assert status == 200
    assert body != data
    assert len(body) == len(data)
    assert headers["Content-MD5"] == hashlib.md5(data).hexdigest() != hashlib.md5(body).hexdigest()


def test_create_from_file_streams(glance: GlanceServer, tmp_path: Path) -> None:
    path = tmp_path / "img.raw"
    h = hashlib.sha512()
    with open(path, "wb") as f:
        for i in range(3):
            block = random.Random(i).randbytes(1024 * 1024)
            h.update(block)
            f.write(block)
        f.write(b"x")  # not a whole number of blocks
        h.update(b"x")
    record = glance.create_image_from_file(path, name="from-file", os_distro="testos")
    assert record["status"] == "active"
    assert record["size"] == 3 * 1024 * 1024 + 1
    assert record["os_hash_value"] == h.hexdigest()
    assert record["os_distro"] == "testos"


def test_concurrent_downloads_and_an_upload(
    glance: GlanceServer, image: tuple[dict[str, Any], bytes]
) -> None:
    record, data = image
    path = f"/v2/images/{record['id']}/file"
    upload = os.urandom(2 * 1024 * 1024)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        downloads = [pool.submit(fetch, glance.url, path) for _ in range(3)]
        ranged = pool.submit(fetch, glance.url, path, "GET", {"Range": "bytes=1000-2999999"})
        created = pool.submit(glance.create_image, upload, "concurrent")
        for fut in downloads:
            assert fut.result()[0] == 200
            assert fut.result()[2] == data
        assert ranged.result()[0] == 206
        assert ranged.result()[2] == data[1000:3000000]
        assert created.result()["os_hash_value"] == hashlib.sha512(upload).hexdigest()


def test_cli_talks_to_glance(glance: GlanceServer, tmp_path: Path) -> None:
    path = tmp_path / "cli.raw"
    path.write_bytes(b"cli-image" * 1000)
    cli = [sys.executable, "-m", "swarmtools.glance"]

    def run(*args: str) -> str:
        done = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    record = json.loads(run("upload", "--url", glance.url, "--file", str(path), "--name", "cli"))
    assert record["status"] == "active"
    assert record["os_hash_value"] == hashlib.sha512(path.read_bytes()).hexdigest()
    assert json.loads(run("show", "--url", glance.url, record["id"])) == record
    run("delete", "--url", glance.url, record["id"])
    with pytest.raises(subprocess.CalledProcessError):
        run("show", "--url", glance.url, record["id"])


def test_headers_auth_anonymous_reader_is_not_admin(tmp_path: Path) -> None:
    with GlanceServer(auth="headers", workdir=tmp_path / "glance") as server:
        data = os.urandom(8192)
        public = server.create_image(data, name="public")
        private = server.create_image(b"p" * 100, name="private", visibility="private")
        assert public["owner"] == "swarmtools"
        path = f"/v2/images/{public['id']}/file"
        status, _, body = fetch(server.url, path)  # anonymous: no identity headers
        assert (status, body) == (200, data)
        assert fetch(server.url, f"/v2/images/{private['id']}/file")[0] == 404
        server.deactivate(public["id"])
        status, _, body = fetch(server.url, path)
        assert status == 403
        assert b"deactivated" in body
        server.reactivate(public["id"])
        assert fetch(server.url, path)[0] == 200
        # while it serves: a uWSGI worker still loading Glance when the server stops
        # dies with a KeyboardInterrupt traceback, which says nothing about requests
        assert not (tmp_path / "glance" / "glance.log").read_text().count("Traceback")


def test_start_failure_says_why() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = GlanceServer(port=taken.getsockname()[1], startup_timeout=30)
        with pytest.raises(GlanceError, match=r"(?s)exited with .*Address already in use"):
            server.start()
    assert not server.alive()
    assert not server.workdir.exists()


def test_serve_stops_on_sigterm(tmp_path: Path) -> None:
    """`serve` as a background job of a shell (SIGINT and SIGQUIT ignored, and inherited)
    still stops at once on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path / "serve"
    serve = f"exec {sys.executable} -m swarmtools.glance serve --port {port} --workdir {work}"
    proc = subprocess.Popen(
        ["bash", "-c", f"trap '' INT QUIT; {serve}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"glance-api at http://127.0.0.1:")
        assert fetch(f"http://127.0.0.1:{port}", "/versions")[0] == 200
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 5  # not the 10 s grace and a SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.communicate()
    assert "goodbye to uWSGI" in (work / "glance.log").read_text()
    with pytest.raises(ConnectionRefusedError):
        fetch(f"http://127.0.0.1:{port}", "/versions")


@pytest.mark.skipif(testbed_unavailable() is not None, reason=str(testbed_unavailable()))
def test_in_a_namespace() -> None:
    with Testbed(1) as bed, GlanceServer(bed.origin.addr, netns=bed.origin.ns) as server:
        assert server.url.startswith(f"http://{bed.origin.addr}:")
        data = random.Random("netns").randbytes(256 * 1024)
        record = server.create_image(data, name="in-netns")  # through the CLI, in the namespace
        assert record["os_hash_value"] == hashlib.sha512(data).hexdigest()
        assert server.image(record["id"]) == record
        url = f"{server.url}/v2/images/{record['id']}/file"
        assert http_request(bed, bed.hosts[0], url) == data
        server.delete(record["id"])
        assert not server.image_file_path(record["id"]).exists()
