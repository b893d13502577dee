"""The Glance origin's credentials: a token file, Keystone v3 password and application
credential (keystoneauth1), a token renewed once on a 401, secrets only from files.

Glance here is real (swarmtools.glance); Keystone is a small stand-in on loopback that
speaks the one call keystoneauth1 makes (`POST /v3/auth/tokens`), and a gate in front
of Glance refuses, with 401, any token Keystone did not issue or has revoked, as
keystonemiddleware does in front of a real Glance.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from conftest import make_config, serve_app
from swarmcache.errors import ConfigError
from swarmtools.glance import GlanceServer

pytestmark = pytest.mark.timeout(300)
MIB = 1024 * 1024
PASSWORD = "correct horse battery staple"


class Keystone:
    """Issues tokens for one user's password or one application credential."""

    def __init__(self) -> None:
        self.valid: set[str] = set()
        self.requests: list[dict[str, Any]] = []
        self.lifetime = 3600.0  # seconds a token is valid

    async def tokens(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        ident = body["auth"]["identity"]
        ok = (
            ident["methods"] == ["password"] and ident["password"]["user"]["password"] == PASSWORD
        ) or (
            ident["methods"] == ["application_credential"]
            and ident["application_credential"]["secret"] == PASSWORD
        )
        if not ok:
            return web.json_response({"error": {"code": 401}}, status=401)
        token = secrets.token_hex(16)
        self.valid.add(token)
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.lifetime)
        return web.json_response(
            {
                "token": {
                    "methods": ident["methods"],
                    "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
                    "user": {"id": "u1", "name": "swarmcache", "domain": {"id": "default"}},
                    "project": {"id": "p1", "name": "service", "domain": {"id": "default"}},
                    "roles": [{"id": "r1", "name": "reader"}],
                    "catalog": [],
                }
            },
            status=201,
            headers={"X-Subject-Token": token},
        )


SEEN = web.AppKey("seen", list)


def gate(keystone: Keystone, glance_url: str) -> web.Application:
    """Glance behind a token check (401 for a token Keystone does not vouch for)."""
    seen: list[str | None] = []

    async def forward(request: web.Request) -> web.StreamResponse:
        token = request.headers.get("X-Auth-Token")
        seen.append(token)
        if token not in keystone.valid:
            return web.json_response({"error": "unauthorized"}, status=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("range", "accept")}
        async with (
            aiohttp.ClientSession() as s,
            s.get(glance_url + request.raw_path, headers=headers) as up,
        ):
            resp = web.StreamResponse(status=up.status)
            for name in ("Content-Type", "Content-Range", "Content-MD5"):
                if name in up.headers:
                    resp.headers[name] = up.headers[name]
            await resp.prepare(request)
            async for data in up.content.iter_chunked(MIB):
                await resp.write(data)
            await resp.write_eof()
            return resp

    app = web.Application()
    app[SEEN] = seen
    app.router.add_get("/{tail:.*}", forward)
    return app


@pytest.fixture(scope="module")
def glance() -> Iterator[GlanceServer]:
    """A real Glance for the module."""
    with GlanceServer() as server:
        yield server


async def _image(glance: GlanceServer, seed: int) -> tuple[dict[str, Any], bytes]:
    data = random.Random(seed).randbytes(2 * MIB + seed)
    meta: dict[str, Any] = await asyncio.to_thread(glance.create_image, data)
    return meta, data


Servers = tuple[Keystone, TestServer, TestServer]


@pytest.fixture
async def servers(
    aiohttp_server: Callable[..., Awaitable[TestServer]], glance: GlanceServer
) -> Servers:
    """(Keystone, its server, the gate in front of Glance)."""
    keystone = Keystone()
    app = web.Application()
    app.router.add_post("/v3/auth/tokens", keystone.tokens)
    ks = await aiohttp_server(app)
    return keystone, ks, await aiohttp_server(gate(keystone, glance.url))


async def _daemon(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path, **origin: Any
) -> TestClient:
    config = make_config(
        tmp_path, {"origin": {"kind": "glance", **origin}, "cache": {"chunk_size": "1MiB"}}
    )
    return await serve_app(aiohttp_client, config)


@pytest.mark.parametrize("method", ["password", "application_credential"])
async def test_keystone_token_is_used_and_renewed_once_on_a_401(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    glance: GlanceServer,
    servers: Servers,
    method: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keystone, ks, gated = servers
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    auth: dict[str, str] = {"auth_url": str(ks.make_url("/v3"))}
    if method == "password":
        auth.update(username="swarmcache", password_file=str(secret), project_name="service")
    else:
        auth.update(application_credential_id="ac1", application_credential_secret_file=str(secret))
    caplog.set_level(logging.DEBUG)
    client = await _daemon(aiohttp_client, tmp_path, url=str(gated.make_url("")), **auth)
    meta, data = await _image(glance, 1)
    assert await (await client.get(f"/v1/images/{meta['id']}")).read() == data
    assert len(keystone.requests) == 1  # one token for the stat and every chunk
    keystone.valid.clear()  # revoked: the next request gets a 401
    meta2, data2 = await _image(glance, 2)
    assert await (await client.get(f"/v1/images/{meta2['id']}")).read() == data2
    assert len(keystone.requests) == 2
    st = await (await client.get(f"/v1/images/{meta2['id']}/status?wait=10")).json()
    assert st["hash"] == f"sha512:{meta2['os_hash_value']}"
    assert PASSWORD not in caplog.text  # the secret is never logged


async def test_a_token_about_to_expire_is_renewed_before_glance_refuses_it(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    glance: GlanceServer,
    servers: Servers,
) -> None:
    """keystoneauth1 takes a new token when the one it holds expires within 120 s, so
    a daemon never sends Glance a token that runs out during a chunk read."""
    keystone, ks, gated = servers
    keystone.lifetime = 100.0  # every token is "about to expire"
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    client = await _daemon(
        aiohttp_client,
        tmp_path,
        url=str(gated.make_url("")),
        auth_url=str(ks.make_url("/v3")),
        application_credential_id="ac1",
        application_credential_secret_file=str(secret),
    )
    meta, data = await _image(glance, 6)
    assert await (await client.get(f"/v1/images/{meta['id']}")).read() == data
    # one token per request to Glance (a stat and three chunk reads), none refused
    assert len(keystone.requests) >= 4
    assert set(gated.app[SEEN]) <= keystone.valid  # every token Glance saw was good


async def test_refused_credentials_are_a_clear_error(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    glance: GlanceServer,
    servers: Servers,
) -> None:
    _, ks, gated = servers
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    client = await _daemon(
        aiohttp_client,
        tmp_path,
        url=str(gated.make_url("")),
        auth_url=str(ks.make_url("/v3")),
        username="swarmcache",
        password_file=str(secret),
    )
    meta, _ = await _image(glance, 3)
    resp = await client.get(f"/v1/images/{meta['id']}")
    body = await resp.json()
    assert resp.status == 502
    assert body["error"] == "origin refused access"
    assert "Keystone refused" in body["detail"]


async def test_a_token_file_is_read_again_when_it_changes(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    glance: GlanceServer,
    servers: Servers,
) -> None:
    keystone, _, gated = servers
    keystone.valid.add("first-token")
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    client = await _daemon(
        aiohttp_client, tmp_path, url=str(gated.make_url("")), token_file=str(token_file)
    )
    meta, data = await _image(glance, 4)
    assert await (await client.get(f"/v1/images/{meta['id']}")).read() == data
    # another tool rotates the token; the old one stops working
    keystone.valid = {"second-token"}
    token_file.write_text("second-token\n")
    meta2, data2 = await _image(glance, 5)
    assert await (await client.get(f"/v1/images/{meta2['id']}")).read() == data2
    seen = gated.app[SEEN]
    assert set(seen) == {"first-token", "second-token"}
    assert hashlib.sha512(data2).hexdigest() == meta2["os_hash_value"]


@pytest.mark.parametrize(
    ("origin", "key"),
    [
        ({"url": "http://g:9292/images/{image_id}"}, "origin.url"),
        (
            {"url": "http://g:9292", "token_file": "/t", "auth_url": "http://k/v3"},
            "origin.token_file",
        ),
        ({"url": "http://g:9292", "username": "u"}, "origin.username"),
        (
            {"url": "http://g:9292", "auth_url": "http://k/v3", "username": "u"},
            "origin.password_file",
        ),
        (
            {"url": "http://g:9292", "auth_url": "http://k/v3", "application_credential_id": "a"},
            "origin.application_credential_secret_file",
        ),
    ],
)
def test_glance_auth_config_errors_name_the_key(
    tmp_path: Path, origin: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, {"origin": {"kind": "glance", **origin}})
    assert info.value.key == key


def test_glance_api_needs_the_glance_origin(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, {"glance_api": {"listen": "127.0.0.1:9292"}})
    assert info.value.key == "glance_api.listen"
