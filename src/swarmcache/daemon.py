"""Composition root: config -> store -> origin -> fetcher -> API, each with its teardown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Iterable

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric

from . import peer_api, seeding, tls, warm
from .access import API_TOKEN, api_access_middleware
from .api import (
    FETCHER,
    METRICS,
    STORE,
    SWARM,
    AccessLog,
    add_routes,
    error_middleware,
    image_state,
)
from .config import Config, read_secret
from .discovery import Discovery, interface_addresses
from .errors import ConfigError, StartupError
from .fetch import Fetcher
from .glance_api import build_glance_app
from .httpserver import Runner
from .limits import Limits
from .metrics import Metrics, gauge
from .origin import make_origin
from .peerauth import MIN_SECRET, Verifier
from .peers.swarm import Swarm
from .signing import Signer, Trust, decode_key
from .store import Store

log = logging.getLogger(__name__)
CONFIG = web.AppKey("config", Config)
# host:port the Glance-compatible endpoint listens on (its port, when listen asked for 0)
GLANCE_ADDRESS = web.AppKey("glance_address", str)
TRUST: web.AppKey[Trust | None] = web.AppKey("trust")  # manifest keys we trust
SIGNER: web.AppKey[Signer | None] = web.AppKey("signer")  # a seeder's own key


def build_app(config: Config) -> web.Application:
    """The daemon as an aiohttp application (tests run it in-process)."""
    app = web.Application(
        middlewares=[  # outermost first: a peer request counts once it proved the secret
            error_middleware,
            api_access_middleware,
            peer_api.peer_auth_middleware,
            peer_api.peer_limit_middleware,
        ],
        client_max_size=1024**2,
    )
    app[CONFIG] = config
    certs = tls.load(config.security)
    if certs is not None:
        app[tls.TLS] = certs
    secret = cluster_secret(config, certs is not None)
    if secret is not None:
        app[peer_api.PEER_AUTH] = Verifier(secret)
        app.on_response_prepare.append(peer_api.sign_answer)
    app[TRUST], app[SIGNER] = manifest_keys(config)
    app[peer_api.LIMITS] = Limits.from_config(config.limits)
    if config.security.api_token_file:
        key = "security.api_token_file"
        app[API_TOKEN] = read_secret(config.security.api_token_file, key, MIN_SECRET)
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_swarm_ctx)
    app.cleanup_ctx.append(_fetcher_ctx)
    app.cleanup_ctx.append(_discovery_ctx)
    app.cleanup_ctx.append(_warmer_ctx)
    app.cleanup_ctx.append(_glance_api_ctx)
    app.on_shutdown.append(_stop_fetches)
    add_routes(app)
    peer_api.add_routes(app)
    warm.add_routes(app)
    seeding.add_routes(app)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG].cache
    store = Store(cfg.dir, cfg.max_size, app[TRUST])
    await asyncio.to_thread(store.open)
    app[STORE] = store
    yield
    await asyncio.to_thread(store.close)


def cluster_secret(config: Config, tls_set: bool = False) -> bytes | None:
    """The cluster secret from [security] cluster_secret_file (None: not configured).
    ConfigError if the file is unreadable or shorter than MIN_SECRET bytes. With
    neither it nor mutual TLS (`tls_set`), says loudly that peers are not checked."""
    path = config.security.cluster_secret_file
    if not path:
        if not tls_set:
            log.warning(
                "peer authentication is OFF ([security] cluster_secret_file and tls_cert "
                "are empty): anyone who reaches %s can act as a peer; set a cluster secret "
                "or mutual TLS on every host",
                config.daemon.listen,
            )
        return None
    return read_secret(path, "security.cluster_secret_file", MIN_SECRET).encode()


def manifest_keys(config: Config) -> tuple[Trust | None, Signer | None]:
    """The manifest keys this daemon trusts (a seeder trusts its own too) and, on a
    seeder, the key it signs with. ConfigError if the key file is unusable."""
    sec = config.security
    signer = None
    if sec.manifest_key_file:
        text = read_secret(sec.manifest_key_file, "security.manifest_key_file", 44)
        try:
            signer = Signer(decode_key(text))
        except ValueError as err:
            raise ConfigError(
                sec.manifest_key_file, "security.manifest_key_file", str(err)
            ) from None
        log.info("seeder: signing manifests with key %s", signer.key_id)
    keys = [decode_key(k) for k in sec.trusted_manifest_keys]
    if signer is not None:
        keys.append(signer.public)
    if not keys:
        log.warning(
            "no trusted manifest keys ([security] trusted_manifest_keys is empty): blocks "
            "from peers are checked against the digests those peers announce, and only "
            "the whole image against the origin's checksum"
        )
        return None, None
    return Trust(keys), signer


def _node_id(store: Store) -> str:
    """This daemon's id: random, kept in the cache dir so it survives restarts."""
    path = store.root / "node_id"
    try:
        node = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{16}", node):
            return node
    except FileNotFoundError:
        pass
    node = secrets.token_hex(8)
    path.write_text(node + "\n")
    return node


def advertised(config: Config) -> tuple[str, int]:
    """The address peers should use: daemon.advertise, the listen address or an interface's."""
    host, port = config.daemon.host, config.daemon.port
    if config.daemon.advertise:
        return config.daemon.advertise, port
    if host not in ("0.0.0.0", "::", ""):
        return host, port
    addresses = interface_addresses(config.discovery.interfaces)
    return (addresses[0] if addresses else ""), port


async def _swarm_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    verifier = app.get(peer_api.PEER_AUTH)
    node = await asyncio.to_thread(_node_id, app[STORE])
    async with Swarm(
        node,
        advertised(config),
        config.peers,
        config.origin.concurrency,
        app[METRICS],
        config.discovery.static_peers,
        secret=verifier.secret if verifier is not None else None,
        tls=app[tls.TLS].client if tls.TLS in app else None,
        trust=app[TRUST],
        seeder=config.daemon.role == "seeder",
    ) as swarm:
        swarm.store = app[STORE]
        app[SWARM] = swarm
        app[METRICS].add_state_collector(lambda: _peer_metrics(swarm))
        yield


async def _discovery_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    swarm = app[SWARM]
    if not config.discovery.mdns:
        yield
        return
    host, port = swarm.advertise
    addresses = interface_addresses(config.discovery.interfaces)
    if host and host not in addresses:
        addresses = [host, *addresses]
    if not addresses:
        log.warning("mDNS: no network interface to announce on; discovery is off")
        yield
        return
    async with Discovery(
        swarm.node_id,
        port,
        addresses,
        lambda node, h, p, gen, inventory, seeder: swarm.seen(
            node, h, p, "mdns", gen, inventory, seeder
        ),
        swarm.gone,
        lambda: swarm.generation,
        swarm.inventory,
        config.daemon.role,
    ):
        yield


def _peer_metrics(swarm: Swarm) -> Iterable[Metric]:
    now = swarm.clock()
    states: dict[str, float] = dict.fromkeys(("ok", "down", "quarantined", "gone"), 0.0)
    for peer in swarm.table.peers.values():
        states[peer.state(now)] += 1
    yield gauge("swarmcache_peers", "Known peers by state", labelled=states, label="state")
    messages = CounterMetricFamily(
        "swarmcache_peer_messages",
        "Control messages over peer links, by direction (sent, received) and type",
        labels=["direction", "type"],
    )
    for (direction, kind), n in sorted(swarm.messages.items()):
        messages.add_metric([direction, kind.lower()], n)
    yield messages


async def _fetcher_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    async with make_origin(config.origin) as origin:
        fetcher = Fetcher(
            app[STORE],
            origin,
            metrics,
            config.origin.concurrency,
            config.cache.chunk_size,
            app[SWARM],
            config.peers.block_size,
            config.security.chunk_digest,
            app[SIGNER],
            app[peer_api.LIMITS],
        )
        app[FETCHER] = fetcher
        app[SWARM].ride_along = fetcher.ride_along
        app[SWARM].uploads_ended = fetcher.settle_cache
        metrics.add_state_collector(lambda: _state_metrics(fetcher))
        fetcher.evict_now()  # max_size may have shrunk since the last run
        resume = asyncio.create_task(fetcher.resume_partial(), name="resume-partial")
        try:
            yield
        finally:
            resume.cancel()
            await asyncio.gather(resume, return_exceptions=True)
            await fetcher.close()


async def _warmer_ctx(app: web.Application) -> AsyncIterator[None]:
    async with warm.Warmer(app[FETCHER], app[SWARM], app[CONFIG].warm.concurrency) as warmer:
        app[warm.WARMER] = warmer
        yield


async def _glance_api_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Glance-compatible endpoint on its own address ([glance_api] listen)."""
    config = app[CONFIG]
    if not config.glance_api.listen:
        yield
        return
    runner = _runner(build_glance_app(config, app), config)
    await runner.setup()
    try:
        await _listen(runner, config.glance_api.listen, "glance_api.listen")
        host, port = runner.addresses[0][:2]
        app[GLANCE_ADDRESS] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info(
            "Glance-compatible endpoint on http://%s (Glance at %s)",
            app[GLANCE_ADDRESS],
            config.origin.url,
        )
        yield
    finally:
        await runner.cleanup()


async def _stop_fetches(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for open requests: readers waiting on a
    # fetch are cut short at once instead of holding the stop for shutdown_timeout.
    await app[FETCHER].cancel_all()
    # peers' sockets are long-lived requests: close them, or the stop waits for them
    await app[SWARM].close()


def _state_metrics(fetcher: Fetcher) -> Iterable[Metric]:
    store = fetcher.store
    states = dict.fromkeys(("complete", "partial", "fetching", "failed"), 0.0)
    for image_id in set(store.images) | set(fetcher.failures):
        image = store.get(image_id)
        state = image_state(image, fetcher.jobs.get(image_id), image_id in fetcher.failures)
        states[state] += 1
    yield gauge("swarmcache_cache_bytes", "Bytes held in the cache", store.used_bytes())
    yield gauge("swarmcache_cache_max_bytes", "cache.max_size", store.max_size)
    yield gauge("swarmcache_images", "Images by state", labelled=states, label="state")


def sd_notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Tell systemd (Type=notify) about our state through $NOTIFY_SOCKET, if it is set.

    The protocol is one datagram on a Unix socket (an abstract one when the path
    starts with "@"); small enough to speak without a library. False if not sent.
    """
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as err:
        log.warning("cannot notify systemd at %s: %s", path, err)
        return False
    return True


def run(config: Config) -> None:
    """Serve until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(config))


def _runner(app: web.Application, config: Config) -> Runner:
    # handler_cancellation: a client that hangs up stops its handler, so it no longer
    # counts as a reader (which would block DELETE and eviction) or waits on a fetch.
    return Runner(
        app,
        access_log=logging.getLogger("swarmcache.access") if config.daemon.access_log else None,
        access_log_class=AccessLog,
        shutdown_timeout=5,
        handler_cancellation=True,
    )


async def _listen(
    runner: web.AppRunner, listen: str, key: str, ssl_context: ssl.SSLContext | None = None
) -> None:
    """Start listening on host:port (StartupError naming the config key if we cannot)."""
    host, _, port = listen.rpartition(":")
    try:
        await web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=ssl_context).start()
    except OSError as err:
        raise StartupError(f"cannot listen on {listen} ({key}): {err.strerror or err}") from None


async def serve(config: Config) -> None:
    """Start every part, listen, wait for SIGINT/SIGTERM, then stop in reverse order."""
    app = build_app(config)
    certs = app.get(tls.TLS)
    runner = _runner(app, config)
    await runner.setup()
    try:
        server_ctx = certs.server if certs is not None else None
        await _listen(runner, config.daemon.listen, "daemon.listen", server_ctx)
        log.info(
            "swarmcache listening on %s://%s (cache %s, origin %s)",
            "https" if certs is not None else "http",
            config.daemon.listen,
            config.cache.dir,
            config.origin.kind,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sd_notify("READY=1\nSTATUS=listening on " + config.daemon.listen)
        await stop.wait()
        log.info("swarmcache stopping")
        sd_notify("STOPPING=1")
    finally:
        await runner.cleanup()
