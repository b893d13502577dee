"""The swarm: joins at an image's readers, links to a bounded set of peers, block reads.

Theory of operation. When a fetch starts, the swarm Joins the image at its readers
(the hosts that rank first for the image, see exchange.readers): each answers with
its manifest and a sample of the hosts fetching or holding the image, and starts
fetching the image itself if it was not (it reads its share from the origin). The
swarm then links to `peers.degree` of those hosts (`ActiveSet`): one WebSocket per
peer (`Link`), whichever side opened it, carrying every image the two trade. On a
link both sides send their State of the image, then Have, Slot and Status messages
(see wire.py) that feed each side's `Exchange` for the image (a `Trade`). A host
that holds an image it is not fetching keeps a Trade for it too while peers are
linked to it for that image, so it hands out upload slots and serves blocks.

Blocks are read with a plain GET (`read_block`, through the lean client in
blocks.py), bounded by peers.timeout, and checked by the caller against the digest
the sender announced. A peer that is
gone (link lost, down, quarantined) has its reads ended at once and is dropped
from every Trade; its blocks are asked of others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from ..config import PeersConfig
from ..errors import IntegrityError, PeerError, PeerGone, PeerLacks, SwarmcacheError
from ..exchange import (
    LAZY_HAVE,
    ROTATE,
    ActiveSet,
    Exchange,
    Geometry,
    OriginLane,
    readers,
    shortest_have_batch,
)
from ..httpfile import read_small
from ..manifest import DIGEST_SIZE, Manifest, bitmap_new, bitmap_set
from ..metrics import Metrics
from ..peerauth import EMPTY_SHA256, REPLY_HEADER, AuthError, check_reply, sign_request
from ..peerauth import HEADER as AUTH_HEADER
from ..signing import Trust
from ..wire import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    Have,
    Hello,
    Join,
    Message,
    Peers,
    Slot,
    State,
    Status,
    Subscribe,
    Unsubscribe,
    WireError,
    decode,
    encode,
)
from .blocks import BlockClient
from .table import PeerTable

log = logging.getLogger(__name__)
HEARTBEAT = 5.0  # WebSocket ping interval; a peer silent for twice this is dead
MAX_QUEUE = 10_000  # messages waiting for one link before it is cut off
STATIC_EVERY = 10.0  # seconds between hellos to static peers
MAX_REQUEST = 1024 * 1024  # largest message a peer's socket may send us (a State)
MAINTENANCE_EVERY = 60.0  # seconds between sweeps of the peer table
REFRESH_EVERY = 2.0  # seconds between looks for more neighbours while short of them
JOIN_TIMEOUT = 5.0  # seconds a Join at a reader may take at least (else peers.timeout)
REJOIN_TRIES = 3  # joins of a reader that dropped the image (busy or silent: again)
REJOIN_WAIT = 0.5  # seconds before the second of them (doubling)
MEMBERS_KEPT = 4096  # hosts a reader remembers per image (the oldest go first)
MEMBER_TTL = 600.0  # seconds a reader remembers a host that joined an image
NODE_HEADER = "X-Swarmcache-Node"  # who asks for a block (upload slots are per peer)
DIGEST_HEADER = "X-Block-Digest"


class Fetching(Protocol):
    """What the swarm sees of a running fetch."""

    exchange: Exchange
    lane: OriginLane

    @property
    def image_id(self) -> str:
        """The image fetched."""
        ...

    @property
    def manifest(self) -> Manifest:
        """The manifest being filled."""
        ...

    def poke(self) -> None:
        """Something changed: look at the exchange again."""


class PeerBusy(PeerError):
    """A peer has no upload slot for us now; ask again after `retry_after` seconds."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


@dataclass
class Trade:
    """One image traded with neighbours: its exchange and who is linked for it."""

    image_id: str
    manifest: Manifest
    exchange: Exchange
    active: ActiveSet
    job: Fetching | None = None
    digests: dict[str, bytearray] = field(default_factory=dict)  # node -> block digests
    waiting: set[str] = field(default_factory=set)  # linked, their State not in yet
    heard: asyncio.Event = field(default_factory=asyncio.Event)  # every first State is in
    rotating: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    lacked: dict[str, float] = field(default_factory=dict)  # readers joined again: when
    # the run of uploads of the image going on: since when, and the last block sent
    # (a pause longer than peers.timeout starts a new run; see Swarm.uploading)
    uploads_since: float = float("-inf")
    uploaded_at: float = float("-inf")

    def digest(self, node: str, block: int) -> bytes | None:
        """The digest a block from `node` must have: the signed one when our manifest
        is trusted (whatever the peer announced), else the one `node` announced."""
        if self.manifest.trusted:
            return self.manifest.block_digest(block)
        digests = self.digests.get(node)
        if digests is None:
            return None
        d = bytes(digests[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE])
        return d if any(d) else None


class _Read:
    """A block read from a peer that `Swarm._drop` can end at once (the peer is gone)."""

    def __init__(self, deadline: asyncio.Timeout) -> None:
        self.deadline = deadline
        self.ended = False

    def end(self) -> None:
        """Make the read's deadline pass now: it fails with TimeoutError."""
        self.ended = True
        if not self.deadline.expired():
            self.deadline.reschedule(asyncio.get_running_loop().time())


class Link:
    """One WebSocket to a peer (opened by us or by it): messages both ways."""

    def __init__(self, swarm: Swarm, node_id: str, ws: Any) -> None:
        self.swarm = swarm
        self.node_id = node_id
        self.ws = ws
        self.images: set[str] = set()
        self.queue: deque[Message] = deque()
        self.lazy: list[Have] = []  # Haves of blocks the peer holds: they ride along
        self._lazy_timer: asyncio.TimerHandle | None = None
        self.wake = asyncio.Event()
        self.overflow = False
        self.writer: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        """The socket is up."""
        return not self.ws.closed

    def send(self, msg: Message) -> None:
        """Queue a message (the link is cut if the peer cannot keep up)."""
        if len(self.queue) >= MAX_QUEUE:
            self.overflow = True
        else:
            self.queue.append(msg)
        self.wake.set()

    def send_lazy(self, msg: Have) -> None:
        """Queue a Have the peer needs only for its bookkeeping (it holds the blocks):
        it goes out with the next message, or after LAZY_HAVE."""
        if len(self.lazy) >= MAX_QUEUE:
            self.overflow = True
            self.wake.set()
            return
        self.lazy.append(msg)
        if self._lazy_timer is None:
            self._lazy_timer = asyncio.get_running_loop().call_later(LAZY_HAVE, self.wake.set)

    def start(self) -> None:
        """Start the writer task."""
        self.writer = asyncio.create_task(self._write(), name=f"link-out-{self.node_id}")

    async def _write(self) -> None:
        """Send queued messages. Have messages wait a little for more (see
        Exchange.have_batch: up to 20 ms) and go out as one per image: at 200 Mbit/s a
        host lands about 100 blocks a second, and one message each to every neighbour
        would cost more CPU than the data."""
        while not self.ws.closed:
            await self.wake.wait()
            self.wake.clear()
            if self.overflow:
                log.warning("peer %s cannot keep up with our messages; closing", self.node_id)
                await self.ws.close()
                return
            if any(isinstance(m, Have) for m in self.queue):
                await asyncio.sleep(self.swarm.have_batch())
            batch = [*self.queue, *self.lazy]
            self.queue.clear()
            self.lazy.clear()
            if self._lazy_timer is not None:
                self._lazy_timer.cancel()
                self._lazy_timer = None
            counts = self.swarm.messages
            for msg in _merge_haves(batch):
                counts["sent", type(msg).__name__] += 1
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.send_bytes(encode(msg))

    async def read(self) -> None:
        """Dispatch incoming messages until the socket closes."""
        try:
            async for frame in self.ws:
                if frame.type == aiohttp.WSMsgType.ERROR:  # e.g. no pong: a hung peer
                    raise ConnectionError(f"{self.ws.exception()!r}")
                if frame.type != aiohttp.WSMsgType.BINARY:
                    raise WireError(f"unexpected {frame.type.name} frame")
                msg = decode(frame.data)
                self.swarm.messages["received", type(msg).__name__] += 1
                if isinstance(msg, Hello):
                    continue
                self.swarm.on_message(self, msg)
        except WireError as err:
            # peers of another protocol version never link (hello): this one breaks ours
            log.warning("peer %s sent a bad message, closing its link: %s", self.node_id, err)
            self.swarm.metrics.peer_errors.inc()
            self.swarm.quarantine(self.node_id)
        except (aiohttp.ClientError, ConnectionError) as err:
            log.info("link to peer %s lost: %s", self.node_id, err)
            self.swarm.metrics.peer_errors.inc()

    async def close(self) -> None:
        """Close the socket and stop the writer."""
        await self.ws.close()
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
        if self.writer is not None:
            self.writer.cancel()
            await asyncio.gather(self.writer, return_exceptions=True)


def _merge_haves(batch: list[Message]) -> list[Message]:
    """The messages in order, every image's Have merged into its first one."""
    out: list[Message] = []
    merged: dict[str, int] = {}  # image -> index of its Have in out
    for msg in batch:
        if isinstance(msg, Have):
            at = merged.get(msg.image_id)
            if at is not None:
                first = out[at]
                assert isinstance(first, Have)
                out[at] = Have(msg.image_id, first.blocks + msg.blocks)
                continue
            merged[msg.image_id] = len(out)
        out.append(msg)
    return out


class Swarm:
    """Peers, links to them, the images traded with them."""

    def __init__(
        self,
        node_id: str,
        advertise: tuple[str, int],
        config: PeersConfig,
        concurrency: int,
        metrics: Metrics,
        static_peers: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        secret: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        trust: Trust | None = None,
        seeder: bool = False,
    ) -> None:
        self.node_id = node_id
        self.secret = secret  # the cluster secret: every peer request is signed with it
        # mutual TLS (tls.py): peers are reached over HTTPS with our certificate, and
        # theirs must be the cluster CA's
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.trust = trust  # the manifest keys we trust (signed manifests)
        self.seeder = seeder  # our role: a seeder reads every image it is asked for whole
        self.advertise = advertise
        self.config = config
        self.concurrency = concurrency  # origin.concurrency: how many readers an image has
        self.metrics = metrics
        self.static_peers = static_peers
        self.clock = clock
        self.rng = rng or random.Random()
        self.table = PeerTable(node_id)
        self.links: dict[str, Link] = {}
        self.messages: Counter[tuple[str, str]] = Counter()  # (sent|received, type) -> n
        # every open link per peer: two may be open for a moment (both sides opened
        # one at once); `links` holds the one we send on
        self._open: dict[str, set[Link]] = {}
        self.trades: dict[str, Trade] = {}
        self.store: Any = None  # the Store (set by the daemon)
        # a reader's answer to a Join for an image it may not fetch yet: our manifest
        # once we fetch it too (set by the daemon: the fetcher)
        self.ride_along: Callable[[str], Awaitable[Manifest | None]] | None = None
        # peers stopped fetching an image from us (see `uploading`): eviction may take
        # it now (set by the daemon: the fetcher)
        self.uploads_ended: Callable[[], None] | None = None
        self._evict_soon = False
        self.members: dict[str, dict[str, tuple[str, int, float]]] = {}  # image -> joiners
        self.generation = 0  # moves whenever what we hold changes (announced over mDNS)
        self._connecting: dict[str, asyncio.Task[Link | None]] = {}
        self._reading: dict[str, set[_Read]] = {}  # our block reads running, by peer
        self._session: aiohttp.ClientSession | None = None
        self.blocks = BlockClient(min(5.0, config.timeout), tls)  # block GETs
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- lifetime ------------------------------------------------------------------

    async def __aenter__(self) -> Swarm:
        self._session = aiohttp.ClientSession(
            # joins, hellos and links (blocks: `blocks`); each call is bounded by its caller
            timeout=aiohttp.ClientTimeout(total=None, connect=min(5.0, self.config.timeout)),
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=0, ssl=self.tls if self.tls is not None else True
            ),
            auto_decompress=False,
        )
        if self.static_peers:
            self.spawn(self._static_loop(), "static-peers")
        self.spawn(self._maintenance(), "peer-table")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every link; stop background tasks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for trade in self.trades.values():
            for task in trade.tasks:
                task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in list(self.links.values())))
        self.blocks.close()
        if self._session is not None:
            await self._session.close()

    def sign(self, method: str, path: str, body: bytes = b"") -> tuple[dict[str, str], str]:
        """(auth header of a peer request, its nonce, for checking the answer)."""
        if self.secret is None:
            return {}, ""
        digest = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        signed = sign_request(self.secret, method, path, digest, time.time())
        return {AUTH_HEADER: signed.header}, signed.nonce

    def check_answer(
        self, nonce: str, status: int, binding: str, headers: Mapping[str, str]
    ) -> None:
        """PeerError unless the answer proves the cluster secret (no secret: no check).
        `binding`: the block digest header of a block, else the body's sha256."""
        if self.secret is None:
            return
        try:
            check_reply(
                self.secret,
                nonce,
                status,
                binding,
                headers.get(REPLY_HEADER.lower()),  # lower-case names or a CIMultiDict
            )
        except AuthError as err:
            raise PeerError(f"answer refused: {err}") from None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP client session used for every peer."""
        assert self._session is not None, "Swarm used outside 'async with'"
        return self._session

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any] | None:
        """Run a background task owned by the swarm (cancelled at close)."""
        if self._closed:
            coro.close()
            return None
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("swarm task %s failed: %r", task.get_name(), task.exception())

    def hello(self) -> Hello:
        """Our Hello."""
        return Hello(self.node_id, self.advertise[0], self.advertise[1], self.seeder)

    # -- discovery feeds -------------------------------------------------------------

    def seen(
        self,
        node_id: str,
        host: str,
        port: int,
        source: str,
        generation: int | None = None,
        inventory: tuple[int, int] | None = None,
        seeder: bool | None = None,
        role_proven: bool = False,
    ) -> None:
        """A peer was discovered or refreshed (`seeder`: its role, when the source says).
        A seeder reads every image for everyone: with a cluster secret or mutual TLS,
        an mDNS announcement of the role is believed only once an authenticated hello
        confirms it."""
        authenticated = self.secret is not None or self.tls is not None
        if seeder and source == "mdns" and authenticated and not role_proven:
            known_peer = self.table.peers.get(node_id)
            if known_peer is None or not known_peer.seeder:
                address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                self.spawn(self._hello_static(address, "mdns"), f"role-{node_id}")
            seeder = None
        before = self.table.peers.get(node_id)
        known = before is not None and not before.gone
        was_seeder = before is not None and before.seeder
        peer = self.table.seen(
            node_id, host, port, source, self.clock(), generation, inventory, seeder
        )
        if peer is not None and (not known or peer.seeder != was_seeder):
            log.info(
                "peer %s at %s:%d (%s)%s",
                node_id,
                host,
                port,
                source,
                ", a seeder" if peer.seeder else "",
            )
            members, seeders = self.members_now(), self.seeders_now()
            for trade in self.trades.values():  # the readers follow the member table
                if trade.job is not None and trade.job.lane.set_members(members, seeders):
                    log.info(
                        "%s: readers now %s", trade.image_id, ", ".join(trade.job.lane.readers)
                    )
                    trade.job.poke()

    def gone(self, node_id: str) -> None:
        """A peer said goodbye: nothing of it counts any more."""
        if node_id in self.table.peers:
            log.info("peer %s left", node_id)
        self.table.gone(node_id)
        self.gone_for_now(node_id)

    async def _maintenance(self) -> None:
        """Forget peers long gone, joiners readers no longer need to remember, and
        idle block connections."""
        while True:
            await asyncio.sleep(MAINTENANCE_EVERY)
            self.blocks.sweep()  # block connections idle too long
            now = self.clock()
            for node_id in self.table.expire(now):
                log.info("peer %s forgotten (not seen for a long time)", node_id)
            for image_id, members in list(self.members.items()):
                for node, (_, _, t) in list(members.items()):
                    if now - t > MEMBER_TTL:
                        del members[node]
                if not members:
                    del self.members[image_id]

    async def _static_loop(self) -> None:
        """Say hello to every static peer now and then (they have no mDNS to find them)."""
        retry = dict.fromkeys(self.static_peers, 0.0)  # address -> when to ask next
        backoff = dict.fromkeys(self.static_peers, 1.0)
        while True:
            now = self.clock()
            due = [a for a, t in retry.items() if t <= now]
            answers = await asyncio.gather(*(self._hello_static(a) for a in due))
            now = self.clock()
            for address, ok in zip(due, answers, strict=True):
                if ok:
                    backoff[address] = 1.0
                    retry[address] = now + STATIC_EVERY
                else:
                    retry[address] = now + backoff[address]
                    backoff[address] = min(STATIC_EVERY, backoff[address] * 2)
            await asyncio.sleep(max(0.1, min(retry.values()) - self.clock()))

    async def _hello_static(self, address: str, source: str = "static") -> bool:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            headers, nonce = self.sign("GET", "/v1/peer/hello")
            async with self.session.get(
                f"{self.scheme}://{address}/v1/peer/hello",
                timeout=aiohttp.ClientTimeout(total=5),
                headers=headers,
            ) as resp:
                raw = await resp.read()
                self.check_answer(nonce, resp.status, _sha256(raw), resp.headers)
                info = json.loads(raw)
            if not isinstance(info, dict):
                raise ValueError("hello is not a JSON object")
            node = info["node"]
            if info.get("version") != PROTOCOL_VERSION or not isinstance(node, str):
                log.warning("static peer %s speaks protocol %r", address, info.get("version"))
                return False
        except PeerError as err:
            log.warning("static peer %s refused: %s", address, err.detail)
            return False
        except aiohttp.ClientSSLError as err:  # e.g. a certificate the CA did not sign
            log.warning("static peer %s refused: TLS: %s", address, err)
            return False
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError) as err:
            if self.tls is not None and isinstance(err, aiohttp.ServerDisconnectedError):
                # TLS 1.3: a server refusing our certificate hangs up after the handshake
                log.warning(
                    "static peer %s closed the connection: does it trust our certificate's "
                    "CA (security.tls_ca there)? (%r)",
                    address,
                    err,
                )
            else:
                log.debug("static peer %s does not answer: %r", address, err)
            return False
        images, chunks, gen = info.get("images"), info.get("chunks"), info.get("generation")
        inventory = (
            (images, chunks) if isinstance(images, int) and isinstance(chunks, int) else None
        )
        self.seen(
            node,
            host,
            int(port),
            source,
            gen if isinstance(gen, int) else None,
            inventory,
            info.get("role") == "seeder",
            role_proven=True,  # the answer was authenticated (cluster secret, TLS)
        )
        return True

    # -- joins: finding the others ----------------------------------------------------

    def members_now(self) -> list[str]:
        """The cluster as this host sees it: usable peers and itself."""
        return [p.node_id for p in self.table.usable(self.clock())] + [self.node_id]

    def seeders_now(self) -> frozenset[str]:
        """The seeders among members_now (they read the origin for everyone)."""
        now = self.clock()
        found = {p.node_id for p in self.table.usable(now) if p.seeder}
        return frozenset(found | ({self.node_id} if self.seeder else set()))

    def have_batch(self) -> float:
        """How long a Have waits for more (see exchange.shortest_have_batch)."""
        return shortest_have_batch(t.exchange for t in self.trades.values() if t.job is not None)

    def readers_of(self, image_id: str) -> list[str]:
        """The hosts that read `image_id` from the origin (and answer Joins for it)."""
        return readers(image_id, self.members_now(), self.concurrency, self.seeders_now())

    async def join(self, image_id: str, fetching: bool = True) -> tuple[Manifest | None, set[str]]:
        """Join the image at its readers: (a manifest one of them has, the hosts they
        know that fetch or hold it). Readers that do not answer are skipped."""
        asks = [n for n in self.readers_of(image_id) if n != self.node_id]
        answers = await asyncio.gather(*(self._join_at(n, image_id, fetching) for n in asks))
        manifest: Manifest | None = None
        hosts: set[str] = set()
        for reader, answer in zip(asks, answers, strict=True):
            if answer is None:
                continue
            found = answer.manifest
            if (
                found is not None
                and self.checked(reader, found)
                and (manifest is None or (found.trusted and not manifest.trusted))
            ):
                manifest = found  # the first, or a signed one we trust
            for node, host, port in answer.peers:
                if node != self.node_id:
                    self.seen(node, host, port, "inbound")
                    hosts.add(node)
        hosts |= {n for n in asks if answers[asks.index(n)] is not None}
        if self.node_id in self.readers_of(image_id):  # we are a reader: our joiners too
            self._remember(image_id, self.node_id, *self.advertise)
            hosts |= set(self.members.get(image_id, {})) - {self.node_id}
        return manifest, hosts

    async def _join_at(self, node_id: str, image_id: str, fetching: bool) -> Peers | None:
        peer = self.table.get(node_id)
        if peer is None:
            return None
        host, port = self.advertise
        body = encode(Join(image_id, self.node_id, host, port, fetching))
        path = f"/v1/peer/images/{image_id}/join"
        url = f"{self.scheme}://{peer.address}{path}"
        headers, nonce = self.sign("POST", path, body)
        try:
            async with (
                asyncio.timeout(max(JOIN_TIMEOUT, self.config.timeout)),
                self.session.post(url, data=body, headers=headers) as resp,
            ):
                if resp.status == 503:  # busy (max_peer_connections): not a failure
                    raise PeerBusy("HTTP 503", ROTATE)
                if resp.status != 200:
                    raise PeerError(f"HTTP {resp.status}")
                data = await read_small(resp.content, MAX_MESSAGE)
                if data is None:
                    raise PeerError("the answer to a join is too large")
                self.check_answer(nonce, resp.status, _sha256(data), resp.headers)
            msg = decode(data)
            if not isinstance(msg, Peers) or msg.image_id != image_id:
                raise WireError("the answer to a join is not Peers for that image")
        except (TimeoutError, aiohttp.ClientError, OSError, PeerError) as err:
            log.info("join of %s at reader %s failed: %r", image_id, node_id, err)
            self.metrics.peer_errors.inc()
            if isinstance(err, WireError):  # not an answer of our protocol at all
                self.quarantine(node_id)
            elif not isinstance(err, PeerBusy):
                self._failed(node_id)
            return None
        return msg

    async def answer_join(self, msg: Join, remote: str | None) -> Peers:
        """A host joins an image we read (the `/join` handler): remember it, fetch the
        image too if we do not yet, answer with our manifest and some of its hosts."""
        self.seen(msg.node, msg.host or (remote or ""), msg.port, "inbound")
        self._remember(msg.image_id, msg.node, msg.host or (remote or ""), msg.port)
        manifest = None
        if self.ride_along is not None:
            try:
                manifest = await self.ride_along(msg.image_id)
            except SwarmcacheError as err:
                log.info("cannot fetch %s for a joiner: %s", msg.image_id, err.detail)
        members = self.members.get(msg.image_id, {})
        others = [n for n in members if n != msg.node]
        sample = self.rng.sample(others, min(len(others), 2 * self.config.degree))
        peers = [(n, *members[n][:2]) for n in sample]
        if manifest is not None or self._trade_manifest(msg.image_id) is not None:
            peers.append((self.node_id, *self.advertise))
        return Peers(msg.image_id, manifest or self._trade_manifest(msg.image_id), tuple(peers))

    def _remember(self, image_id: str, node: str, host: str, port: int) -> None:
        members = self.members.setdefault(image_id, {})
        members.pop(node, None)
        members[node] = (host, port, self.clock())
        while len(members) > MEMBERS_KEPT:
            del members[next(iter(members))]

    def _trade_manifest(self, image_id: str) -> Manifest | None:
        trade = self.trades.get(image_id)
        if trade is not None:
            return trade.manifest
        image = self.store.get(image_id) if self.store is not None else None
        return image.manifest if image is not None and image.manifest.block_size else None

    # -- trades: our fetches --------------------------------------------------------------

    async def start(self, job: Fetching, hosts: Iterable[str]) -> None:
        """A fetch begins: trade its image with some of `hosts` (from the join); return
        once their States are in (or GATHER)."""
        trade = self.trades.get(job.image_id)
        if trade is None:
            trade = Trade(
                job.image_id,
                job.manifest,
                job.exchange,
                ActiveSet(self.config.degree, random.Random(self.rng.random())),
            )
            self.trades[job.image_id] = trade
        else:  # we served it before we fetched it: the job's exchange takes over,
            # and asks the neighbours for their states again
            trade.exchange = job.exchange
            trade.manifest = job.manifest
            for link in self._links_for(trade):
                trade.waiting.add(link.node_id)
                trade.heard.clear()
                link.send(Subscribe(job.image_id, True))
                self._send_state(link, trade)
        trade.job = job
        trade.lacked.clear()  # a new fetch: every reader may be joined again once
        self._tick(trade)
        await self._link_more(trade, hosts)
        if trade.waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(job.lane.ready_at - self.clock()):
                    await trade.heard.wait()
        job.lane.heard_all(self.clock())
        self._spawn_for(trade, self._refresher(trade), f"refresh-{job.image_id}")

    def stop(self, job: Fetching) -> None:
        """The fetch ended: keep serving what we hold to the neighbours we have."""
        trade = self.trades.get(job.image_id)
        if trade is None or trade.job is not job:
            return
        trade.job = None
        for link in self._links_for(trade):
            link.send(Status(job.image_id, False))
        # a peer linked for the image whose State is not in yet wants blocks too: ending
        # the trade would unsubscribe it, and a host whose one source we are (a seeder
        # done first) would wait for URGENT_WAIT and read the rest from the origin
        image = self.store.get(job.image_id) if self.store is not None else None
        if image is None or not trade.active.links:
            self._end_trade(trade)

    async def _link_more(self, trade: Trade, hosts: Iterable[str]) -> None:
        usable = {p.node_id for p in self.table.usable(self.clock())}
        candidates = [n for n in hosts if n in usable and n != self.node_id]
        chosen = trade.active.choose(candidates)
        job = trade.job
        if job is not None and job.lane.is_reader():
            # readers link to each other: a reader helping another sees what it read
            chosen += [
                n
                for n in job.lane.readers
                if n != self.node_id
                and n in usable
                and n not in trade.active.links
                and n not in chosen
            ]
        await asyncio.gather(*(self._subscribe(trade, node) for node in chosen))

    async def _subscribe(self, trade: Trade, node: str) -> None:
        trade.active.add(node)
        trade.waiting.add(node)
        trade.heard.clear()
        link = await self._link_to(node)
        if link is None or trade.image_id not in self.trades:
            self._unlink(trade, node)
            return
        link.images.add(trade.image_id)
        link.send(Subscribe(trade.image_id, trade.job is not None))
        self._send_state(link, trade)

    def _send_state(self, link: Link, trade: Trade) -> None:
        manifest = trade.manifest
        bits = bitmap_new(manifest.blocks)
        for b in range(manifest.blocks):
            if trade.exchange.has(b):
                bitmap_set(bits, b)
        link.send(State(trade.image_id, manifest, bytes(bits), trade.job is not None))

    def _unlink(self, trade: Trade, node: str) -> None:
        trade.active.drop(node)
        trade.digests.pop(node, None)
        self._heard(trade, node)
        peer = trade.exchange.neighbours.get(node)
        lacked = peer is not None and peer.offer > 0
        for block in trade.exchange.drop_neighbour(node):
            log.debug("%s: block %d from %s goes elsewhere", trade.image_id, block, node)
        if trade.job is not None:
            trade.job.poke()
            return
        self._maybe_end(trade)  # no fetch here and nobody left: the trade ends
        if lacked:
            self._upload_may_have_ended()

    def _heard(self, trade: Trade, node: str) -> None:
        trade.waiting.discard(node)
        if not trade.waiting:
            trade.heard.set()

    async def _refresher(self, trade: Trade) -> None:
        """While short of neighbours, ask the readers for more now and then."""
        while trade.job is not None:
            await asyncio.sleep(REFRESH_EVERY)
            if trade.active.wanted() and trade.job is not None:
                _, hosts = await self.join(trade.image_id, fetching=True)
                await self._link_more(trade, hosts)

    def _tick(self, trade: Trade) -> None:
        """Hand out upload slots now and every so often (Exchange.rotate_every) while
        the trade lasts."""
        if not trade.rotating:
            trade.rotating = True
            self._spawn_for(trade, self._rotator(trade), f"slots-{trade.image_id}")

    async def _rotator(self, trade: Trade) -> None:
        while True:
            self._rotate(trade)
            await asyncio.sleep(trade.exchange.rotate_every())

    def _rotate(self, trade: Trade) -> None:
        for node, opened in trade.exchange.rotate(self.clock()):
            link = self.links.get(node)
            if link is not None and link.open:
                link.send(Slot(trade.image_id, opened))

    def _spawn_for(self, trade: Trade, coro: Any, name: str) -> None:
        task = self.spawn(coro, name)
        if task is not None:
            trade.tasks.add(task)
            task.add_done_callback(trade.tasks.discard)

    def _end_trade(self, trade: Trade) -> None:
        if self.trades.get(trade.image_id) is trade:
            del self.trades[trade.image_id]
        for task in trade.tasks:
            task.cancel()
        for link in self._links_for(trade):
            link.images.discard(trade.image_id)
            link.send(Unsubscribe(trade.image_id))

    def _links_for(self, trade: Trade) -> list[Link]:
        return [
            link
            for node in trade.active.links
            if (link := self.links.get(node)) is not None and link.open
        ]

    # -- links ------------------------------------------------------------------------------

    async def _link_to(self, node: str) -> Link | None:
        link = self.links.get(node)
        if link is not None and link.open:
            return link
        task = self._connecting.get(node)
        if task is None:
            task = asyncio.create_task(self._connect(node), name=f"connect-{node}")
            self._connecting[node] = task
            task.add_done_callback(lambda _: self._connecting.pop(node, None))
        return await asyncio.shield(task)

    async def _connect(self, node: str) -> Link | None:
        peer = self.table.get(node)
        if peer is None or not peer.usable(self.clock()):
            return None
        url = f"{self.scheme}://{peer.address}/v1/peer/ws"
        headers, nonce = self.sign("GET", "/v1/peer/ws")
        try:
            async with asyncio.timeout(self.config.timeout):  # a hung peer costs this
                ws = await self.session.ws_connect(
                    url,
                    headers=headers,
                    heartbeat=HEARTBEAT,
                    max_msg_size=MAX_MESSAGE,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                )
                try:  # the upgrade's answer (101) proves the cluster secret too
                    upgrade = getattr(ws, "_response", None)  # aiohttp keeps it there
                    self.check_answer(nonce, 101, "", upgrade.headers if upgrade else {})
                except PeerError as err:
                    await ws.close()
                    log.warning("peer %s: link refused: %s", node, err.detail)
                    self.metrics.peer_errors.inc()
                    self._failed(node)
                    return None
                await ws.send_bytes(encode(self.hello()))
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            log.info("cannot link to peer %s at %s: %r", node, url, err)
            self.metrics.peer_errors.inc()
            if getattr(err, "status", None) != 503:  # a busy peer is not a failing one
                self._failed(node)
            return None
        link = Link(self, node, ws)
        self._adopt(link)
        self.spawn(self._run_link(link), f"link-{node}")
        return link

    def _adopt(self, link: Link) -> None:
        old = self.links.get(link.node_id)
        self.links[link.node_id] = link
        self._open.setdefault(link.node_id, set()).add(link)
        link.start()
        if old is not None and old is not link:
            link.images |= old.images  # both opened one at once: either carries them

    async def _run_link(self, link: Link) -> None:
        try:
            await link.read()
        finally:
            await link.close()
            others = self._open.get(link.node_id, set())
            others.discard(link)
            if not others:
                self._open.pop(link.node_id, None)
            self._link_closed(link)

    def _link_closed(self, link: Link) -> None:
        if self.links.get(link.node_id) is not link:
            return  # another link to the same peer took over
        del self.links[link.node_id]
        self._drop(link.node_id)

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        """The `/v1/peer/ws` handler: a peer links to us."""
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_REQUEST)
        if self._closed:
            raise web.HTTPServiceUnavailable(text="the daemon is stopping")
        await ws.prepare(request)
        try:
            async with asyncio.timeout(self.config.timeout):
                frame = await ws.receive()
            if frame.type != aiohttp.WSMsgType.BINARY:
                raise WireError("the first message must be a hello")
            hello = decode(frame.data)
            if not isinstance(hello, Hello):
                raise WireError("the first message must be a hello")
            if hello.node == self.node_id:
                raise WireError("a peer uses our own node id (a copied cache dir?)")
        except (WireError, TimeoutError) as err:
            log.warning("peer %s: %s", request.remote, err)
            self.metrics.peer_errors.inc()
            await ws.close()
            return ws
        self.seen(
            hello.node,
            hello.host or (request.remote or ""),
            hello.port,
            "inbound",
            seeder=hello.seeder,
        )
        peer = self.table.get(hello.node)
        if peer is not None and peer.state(self.clock()) == "quarantined":
            # it sent us bad bytes: no link (it learns at once, and stops waiting on us)
            log.info("peer %s is quarantined: its link is refused", hello.node)
            await ws.close()
            return ws
        link = Link(self, hello.node, ws)
        self._adopt(link)
        link.send(self.hello())
        await self._run_link(link)
        return ws

    # -- messages ---------------------------------------------------------------------------

    def on_message(self, link: Link, msg: Message) -> None:
        """A message from a linked peer."""
        node = link.node_id
        now = self.clock()
        peer = self.table.get(node)
        if peer is None or not peer.usable(now):
            return  # quarantined, down or gone: what it says does not count
        peer.last_seen = now
        if isinstance(msg, Join | Peers | Hello):
            raise WireError(f"{type(msg).__name__} is not for a link")
        image_id = msg.image_id
        if isinstance(msg, Subscribe):
            self._subscribed(link, image_id)
            return
        trade = self.trades.get(image_id)
        if trade is None or node not in trade.active.links:
            return
        if isinstance(msg, Unsubscribe):
            link.images.discard(image_id)
            self._unlink(trade, node)
        elif isinstance(msg, State):
            self._state(trade, node, msg)
        elif isinstance(msg, Have):
            self._have(trade, node, msg)
        elif isinstance(msg, Slot):
            trade.exchange.served_by(node, msg.open)
            if trade.job is not None:
                trade.job.poke()
        elif isinstance(msg, Status) and msg.gone:
            self._unlink(trade, node)
            self._reader_left(trade, node)

    def _subscribed(self, link: Link, image_id: str) -> None:
        """A peer wants to trade an image with us."""
        node = link.node_id
        trade = self.trades.get(image_id) or self._serving(image_id)
        if trade is None or not trade.active.accept(node):
            link.send(Unsubscribe(image_id))  # nothing of it here, or no room
            return
        link.images.add(image_id)
        if node not in trade.active.links:
            trade.active.add(node)
            trade.waiting.add(node)
        self._send_state(link, trade)  # a Subscribe on a link: "send me your state again"

    def _serving(self, image_id: str) -> Trade | None:
        """A Trade for an image we hold but do not fetch (created on demand)."""
        image = self.store.get(image_id) if self.store is not None else None
        if image is None or image.removed or not image.manifest.block_size:
            return None
        m = image.manifest
        geo = Geometry(m.size, m.chunk_size, m.block_size)
        have = [b for b in range(m.blocks) if image.has_block(b)]
        trade = Trade(
            image_id,
            m,
            Exchange(geo, have, random.Random(self.rng.random())),
            ActiveSet(self.config.degree, random.Random(self.rng.random())),
        )
        self.trades[image_id] = trade
        self._tick(trade)
        return trade

    def _state(self, trade: Trade, node: str, msg: State) -> None:
        ours = trade.manifest
        if msg.manifest is not None and not self.checked(node, msg.manifest):
            self._unlink(trade, node)
            return
        if msg.manifest is None:
            log.debug("peer %s has nothing of %s", node, trade.image_id)
            self._unlink(trade, node)
            return
        if not msg.manifest.same_source(ours) or msg.manifest.block_size != ours.block_size:
            job = trade.job
            if job is not None and node not in job.lane.excluded:
                log.info("peer %s holds another version of %s; ignored", node, trade.image_id)
                self._not_a_reader(trade, node, job)  # it will not read its share for us
            self._unlink(trade, node)
            return
        trade.digests[node] = bytearray(msg.manifest.block_digests)
        trade.exchange.add_neighbour(node, msg.have)
        self._heard(trade, node)
        self._rotate(trade)
        if trade.job is not None:
            trade.job.poke()

    def _have(self, trade: Trade, node: str, msg: Have) -> None:
        digests = trade.digests.get(node)
        peer = trade.exchange.neighbours.get(node)
        if digests is None or peer is None:
            return
        lacked = peer.offer > 0
        n = trade.manifest.blocks
        good = []
        for block, digest in msg.blocks:
            if block < n:
                digests[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE] = digest
                good.append(block)
        trade.exchange.neighbour_has(node, good)
        if trade.job is not None:
            trade.job.poke()
        elif lacked and not peer.offer:
            self._upload_may_have_ended()
        self._rotate(trade)

    def uploading(self, within: float) -> set[str]:
        """Images peers are fetching from us, in a run of uploads that began less than
        `within` seconds ago: a neighbour that lacks blocks we hold got one from us
        within peers.timeout. Eviction leaves them be for that long: dropping an image
        a swarm reads from us sends every reader a 404 and makes the swarm's readers
        fetch it again (a churn that outlived its clients by many seconds under a
        soak); `within` keeps a peer that never finishes from holding it for good."""
        now = self.clock()
        since = now - self.config.timeout
        return {
            i
            for i, t in self.trades.items()
            if now - t.uploads_since < within and t.exchange.fetched_from_since(since)
        }

    def _upload_may_have_ended(self) -> None:
        """A neighbour that lacked blocks of an image we only serve has them all now, or
        left: eviction may take the image. Run soon, not now: an eviction ends trades,
        and our callers may be walking them."""
        if not self._evict_soon:
            self._evict_soon = True
            asyncio.get_running_loop().call_soon(self._uploads_ended)

    def _uploads_ended(self) -> None:
        self._evict_soon = False
        if self.uploads_ended is not None:
            self.uploads_ended()

    def _maybe_end(self, trade: Trade) -> None:
        if trade.job is None and not trade.active.links:
            self._end_trade(trade)

    # -- what we tell the others ------------------------------------------------------------

    def announce_have(self, image_id: str, block: int, digest: bytes) -> None:
        """A block became readable here (it was checked)."""
        self.generation += 1
        trade = self.trades.get(image_id)
        if trade is None:
            return
        have = Have(image_id, ((block, digest),))
        holds = trade.exchange.neighbour_holds
        for link in self._links_for(trade):
            if holds(link.node_id, block):
                link.send_lazy(have)
            else:
                link.send(have)
        self._rotate(trade)

    def announce_gone(self, image_id: str) -> None:
        """We dropped the image (evicted, deleted, discarded)."""
        self.generation += 1
        trade = self.trades.get(image_id)
        if trade is None:
            return
        for link in self._links_for(trade):
            link.send(Status(image_id, False, gone=True))
        if trade.job is None:
            self._end_trade(trade)

    def may_serve(self, image_id: str, node: str | None) -> float | None:
        """None if `node` may read a block of the image now, else seconds to wait."""
        trade = self.trades.get(image_id)
        if trade is None or node is None:
            return ROTATE  # not linked for it: no slot
        return None if trade.exchange.may_serve(node, self.clock()) else ROTATE

    def sent(self, image_id: str, node: str) -> None:
        """A block `may_serve` let `node` read has left (or failed to)."""
        trade = self.trades.get(image_id)
        if trade is not None:
            now = self.clock()
            if now - trade.uploaded_at > self.config.timeout:
                trade.uploads_since = now  # a new run of uploads (Swarm.uploading)
            trade.uploaded_at = now
            trade.exchange.sent(node, now)

    # -- peers that go away -------------------------------------------------------------------

    def _failed(self, node_id: str) -> None:
        """A join or a link to the peer failed: after a few in a row it is down, and no
        longer anyone's reader (the next in rank reads its share)."""
        if self.table.failed(node_id, self.clock()):
            log.warning("peer %s is down after repeated failures", node_id)
            self.gone_for_now(node_id)

    def lacks(self, image_id: str, node_id: str) -> None:
        """A peer answered 404 for a block of the image it announced (it dropped the
        image since): it is no source of this image (no neighbour for it) until it
        tells us its state again, as after its Status gone. It stays one of the image's
        readers: every host must compute the same readers, and which host happened to
        ask it for a block just then is not the same everywhere (hosts whose readers
        differ each leave some chunk to another: nobody reads it, and its clients wait
        for URGENT_WAIT). A reader that dropped the image is joined again instead, so
        it rides along and reads its share (most often it fetches the image again
        already). One that lacks what it announced again in this fetch (later than a
        read in flight at the first 404 could answer), or answers that it will not
        take the image, is no reader of it for us any more."""
        trade = self.trades.get(image_id)
        if trade is None or node_id not in trade.active.links:
            return  # unlinked already (another read of it answered 404 first)
        self._unlink(trade, node_id)
        job = trade.job
        if job is None or node_id not in job.lane.readers:
            return
        first = trade.lacked.get(node_id)
        if first is None:
            self._reader_left(trade, node_id)
        elif self.clock() - first > self.config.timeout:  # not a read from before
            self._not_a_reader(trade, node_id, job)

    def _reader_left(self, trade: Trade, node_id: str) -> None:
        """One of the image's readers dropped it (a 404 for what it announced, or its
        Status gone): join it again once in this fetch, so that it reads its share."""
        job = trade.job
        if job is None or node_id not in job.lane.readers or node_id in trade.lacked:
            return
        trade.lacked[node_id] = self.clock()
        name = f"rejoin-{trade.image_id}-{node_id}"
        self._spawn_for(trade, self._rejoin(trade, node_id, job), name)

    async def _rejoin(self, trade: Trade, node_id: str, job: Fetching) -> None:
        """Join a reader that dropped the image again (see lacks). Only an answer
        without the image makes it no reader here; one that is busy or does not answer
        is asked again a few times and then left to the fetch's own fallbacks (the
        hosts that got through to it keep it too: the readers must stay the same)."""
        for attempt in range(REJOIN_TRIES):
            if trade.job is not job:
                return  # that fetch ended
            answer = await self._join_at(node_id, trade.image_id, True)
            if answer is not None:
                if answer.manifest is None:  # it will not read the image now
                    self._not_a_reader(trade, node_id, job)
                return
            if attempt + 1 < REJOIN_TRIES:
                await asyncio.sleep(REJOIN_WAIT * 2**attempt)

    def _not_a_reader(self, trade: Trade, node_id: str, job: Fetching) -> None:
        if trade.job is job and job.lane.exclude(node_id):
            log.info("%s: readers now %s", trade.image_id, ", ".join(job.lane.readers))
            job.poke()

    def checked(self, node_id: str, manifest: Manifest) -> bool:
        """Check the signature of a manifest a peer sent (marking it trusted if it is
        good and by a key we trust); False if it is bad: the peer is quarantined."""
        if self.trust is None:
            manifest.trusted = False
            return True
        try:
            self.trust.check(manifest)
        except IntegrityError as err:
            log.warning("peer %s sent a forged manifest: %s", node_id, err.detail)
            self.metrics.verification_failures.labels("manifest").inc()
            self.quarantine(node_id)
            return False
        return True

    def quarantine(self, node_id: str) -> None:
        """The peer sent bad bytes: use it for nothing until peers.quarantine has passed."""
        peer = self.table.get(node_id)
        if peer is None or peer.state(self.clock()) == "quarantined":
            return
        self.table.quarantine(node_id, self.clock(), self.config.quarantine)
        self.metrics.peer_quarantines.inc()
        log.warning("peer %s quarantined for %.0fs", node_id, self.config.quarantine)
        self.gone_for_now(node_id)

    def gone_for_now(self, node_id: str) -> None:
        """The peer is down: forget what it told us and close every link to it (so
        it learns we are done with it, and drops us in turn)."""
        self._drop(node_id)
        for link in list(self._open.get(node_id, ())):  # `links` holds one of these
            self.spawn(link.close(), f"close-{node_id}")
        peer = self.table.get(node_id)
        if peer is not None:
            self.blocks.forget(peer.host, peer.port)

    def _drop(self, node_id: str) -> None:
        for trade in list(self.trades.values()):
            if node_id in trade.active.links:
                self._unlink(trade, node_id)
        peer = self.table.get(node_id)
        if peer is not None and peer.usable(self.clock()):
            self._end_reads(node_id)  # a link lost, the peer still a member
            return
        for trade in self.trades.values():  # readers change when a member goes
            if trade.job is not None and trade.job.lane.replace(node_id):
                log.info(
                    "%s: reader %s is gone: readers now %s",
                    trade.image_id,
                    node_id,
                    ", ".join(trade.job.lane.readers),
                )
                trade.job.poke()
        self._end_reads(node_id)

    def _end_reads(self, node_id: str) -> None:
        reads = self._reading.pop(node_id, set())
        if reads:
            log.info("peer %s is gone: ending %d block reads from it", node_id, len(reads))
        for read in reads:
            read.end()

    # -- block reads ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _block_read(self, node_id: str, what: str, seconds: float) -> AsyncIterator[None]:
        """Bound a read from a peer by `seconds`, keep it where `_drop` can end it, and
        turn what can go wrong into PeerError (PeerGone if `_drop` ended it)."""
        read = None
        try:
            async with asyncio.timeout(seconds) as deadline:
                read = _Read(deadline)
                reads = self._reading.setdefault(node_id, set())
                reads.add(read)
                try:
                    yield
                finally:
                    reads.discard(read)
                    if not reads and self._reading.get(node_id) is reads:
                        del self._reading[node_id]
        except TimeoutError as err:  # an OSError: first
            if read is not None and read.ended:
                raise PeerGone(f"{what} ended: the peer is gone") from err
            raise PeerError(f"{what} timed out") from err
        except OSError as err:  # the block client's errors are ConnectionErrors
            raise PeerError(f"{what}: {err!r}") from err

    async def read_block(self, node_id: str, manifest: Manifest, block: int) -> bytearray:
        """Block `block` from a peer (unverified: the caller checks it against the
        digest the peer announced), through `blocks` (see peers/blocks.py). PeerBusy if
        it has no upload slot for us now, PeerError on any failure."""
        peer = self.table.get(node_id)
        if peer is None:
            raise PeerError(f"peer {node_id} is not known")
        if not peer.usable(self.clock()):  # it went away before this read began
            raise PeerGone(f"peer {node_id} is {peer.state(self.clock())}")
        path = f"/v1/peer/images/{manifest.image_id}/blocks/{block}"
        _, length = manifest.block_span(block)
        headers = {"If-Match": manifest.etag, NODE_HEADER: self.node_id}
        auth, nonce = self.sign("GET", path)
        headers.update(auth)
        what = f"peer {node_id}: block {block}"
        async with self._block_read(node_id, what, self.config.timeout):
            resp = await self.blocks.get(peer.host, peer.port, path, headers, length)
        if resp.status == 503:
            try:
                wait = float(resp.headers.get("retry-after", ROTATE))
            except ValueError:
                wait = ROTATE
            if not math.isfinite(wait):  # "nan" would leave the peer never asked again
                wait = ROTATE
            raise PeerBusy(f"peer {node_id} has no upload slot for us", min(max(wait, 0.0), 60.0))
        if resp.status == 404:  # it dropped the image (evicted) since it said it held it
            raise PeerLacks(f"peer {node_id} does not hold block {block} (any more)")
        if resp.status != 200:
            raise PeerError(f"peer {node_id}: HTTP {resp.status} for block {block}")
        # a host without the cluster secret never counts as a source
        self.check_answer(nonce, 200, resp.headers.get(DIGEST_HEADER.lower(), ""), resp.headers)
        return resp.body

    def trading(self, image_id: str, node_id: str) -> bool:
        """A peer is linked to us for an image and has told us what it holds."""
        trade = self.trades.get(image_id)
        return trade is not None and node_id in trade.digests

    def digest(self, image_id: str, node_id: str, block: int) -> bytes | None:
        """The digest a peer announced for one of its blocks."""
        trade = self.trades.get(image_id)
        return trade.digest(node_id, block) if trade is not None else None

    # -- for the API -----------------------------------------------------------------------------

    def inventory(self) -> tuple[int, int]:
        """(images, chunks) this daemon holds, for mDNS and hello."""
        if self.store is None:
            return 0, 0
        images = list(self.store.images.values())
        return len(images), sum(
            i.manifest.chunks if i.complete else i.present_chunks for i in images
        )

    def peers_json(self) -> list[dict[str, Any]]:
        """The peer table for the API."""
        now = self.clock()
        return [p.describe(now) for p in sorted(self.table.peers.values(), key=lambda p: p.node_id)]


def _sha256(data: bytes) -> str:
    """Hex sha256 (the binding of a small answer's signature)."""
    return hashlib.sha256(data).hexdigest() if data else EMPTY_SHA256
