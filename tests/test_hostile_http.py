"""Requests aiohttp's own parser refuses: answered as JSON like every other error,
logged briefly and never faster than the log limit, the daemon serving on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Origin, start_daemon_process
from swarmcache.httpserver import BURST

BAD_REQUESTS = {
    "request line over 8190 bytes": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header over 8190 bytes": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    + b"a" * 9000
    + b"\r\n\r\n",
    "too many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
    + b"\r\n",
    "NUL in the path": b"GET /v1/ima\x00ges HTTP/1.1\r\nHost: x\r\n\r\n",
    "malformed chunked body": b"POST /v1/warm HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n\r\n",
    "invalid method": b"G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
}  # fmt: skip


async def _raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
async def test_a_request_the_parser_refuses_gets_a_json_error(
    tmp_path: Path, origin: Origin, daemon_processes: list[Any], case: str
) -> None:
    d = await start_daemon_process(tmp_path, origin.url)
    daemon_processes.append(d)
    port = int(d.url.rsplit(":", 1)[1])
    status, headers, body = await _raw(port, BAD_REQUESTS[case])
    assert 400 <= status < 500, case
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "bad request"


async def test_a_flood_of_bad_requests_does_not_flood_the_log(
    tmp_path: Path, origin: Origin, daemon_processes: list[Any]
) -> None:
    d = await start_daemon_process(tmp_path, origin.url, name="flood")
    daemon_processes.append(d)
    port = int(d.url.rsplit(":", 1)[1])
    requests = [BAD_REQUESTS[k] for k in sorted(BAD_REQUESTS)] * 10  # 60
    for data in requests:
        status, _, _ = await _raw(port, data)
        assert status >= 400
    # the daemon serves on
    status, _, body = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, json.loads(body)["status"]) == (200, "ok")
    text = (tmp_path / "flood.log").read_text()
    assert 1 <= text.count("bad request from") <= BURST
    assert "Traceback" not in text
