"""The swarm: links to other daemons, subscriptions, pushes to subscribers, chunk reads.

Client side: a running fetch joins the swarm (`join`): it subscribes to the image
on every usable peer over one WebSocket per peer (PeerLink) and feeds what comes
back (State, Have, Taking, Status; see wire.py) into its SwarmPlan. Chunks are read
with a plain GET and checked against the digest the holder announced; a mismatch
quarantines the holder.

Server side: peers subscribe to our images over `/v1/peer/ws` (Subscriber); the
fetcher's announcements (a chunk became readable, a chunk is being taken from the
origin, a fetch started or stopped) are queued per subscriber and written by one
task per socket, so a slow peer never blocks a fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from ..config import PeersConfig
from ..errors import PeerError, PeerGone, StreamRefused
from ..httpfile import RCVLOWAT, read_pieces
from ..manifest import DIGEST_SIZE, Manifest, bitmap_new, bitmap_set
from ..metrics import Metrics
from ..planner import HANDOVER, SwarmPlan
from ..wire import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    Have,
    Hello,
    Message,
    State,
    Status,
    Subscribe,
    Taking,
    Unsubscribe,
    WireError,
    decode,
    encode,
)
from .table import PeerTable

if TYPE_CHECKING:
    from ..fetcher import FetchJob
    from ..store import Store

log = logging.getLogger(__name__)
GATHER_TIMEOUT = 1.0  # a fetch waits this long at most for peers' states before the origin
HEARTBEAT = 5.0  # WebSocket ping interval; a peer silent for twice this is dead
MAX_QUEUE = 10_000  # messages waiting for one subscriber before it is cut off
STATIC_EVERY = 10.0  # seconds between hellos to static peers
STREAM_HEADER = "X-Swarmcache-Stream"  # ask for a chunk + digest trailer, in flight or not
RELAY_HEADER = "X-Swarmcache-Relay"  # ... to pass on: only from the origin read itself
MAX_REQUEST = 64 * 1024  # largest message a subscriber may send us
MAINTENANCE_EVERY = 60.0  # seconds between sweeps of the peer table
# A change of the fetchers reaches every host within about one answer to a subscription:
# the handover (SwarmPlan) lasts HANDOVER_ANSWERS times the slowest recent answer
HANDOVER_ANSWERS = 3
HANDOVER_MIN = 0.02
HANDOVER_MAX = 0.5


class _Read:
    """A chunk read from a peer that `Swarm._drop` can end at once (the peer is gone)."""

    def __init__(self, deadline: asyncio.Timeout) -> None:
        self.deadline = deadline
        self.ended = False

    def end(self) -> None:
        """Make the read's deadline pass now: it fails with TimeoutError."""
        self.ended = True
        if not self.deadline.expired():
            self.deadline.reschedule(asyncio.get_running_loop().time())


class PeerLink:
    """Our WebSocket to one peer, carrying our subscriptions to its images."""

    def __init__(self, swarm: Swarm, node_id: str) -> None:
        self.swarm = swarm
        self.node_id = node_id
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.images: set[str] = set()
        self.answered: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()

    @property
    def open(self) -> bool:
        """The socket is up."""
        return self.ws is not None and not self.ws.closed

    async def subscribe(self, image_id: str, fetching: bool) -> asyncio.Event:
        """Subscribe to an image; the event is set when the peer's State arrived."""
        async with self._lock:
            await self._connect()
            event = self.answered.setdefault(image_id, asyncio.Event())
            self.images.add(image_id)
            assert self.ws is not None
            await self.ws.send_bytes(encode(Subscribe(image_id, fetching)))
            return event

    async def unsubscribe(self, image_id: str) -> None:
        """Stop following an image (and tell the peer we no longer fetch it)."""
        self.images.discard(image_id)
        self.answered.pop(image_id, None)
        if self.open:
            assert self.ws is not None
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await self.ws.send_bytes(encode(Unsubscribe(image_id)))

    async def _connect(self) -> None:
        if self.open:
            return
        peer = self.swarm.table.get(self.node_id)
        if peer is None:
            raise PeerError(f"peer {self.node_id} is not known")
        url = f"http://{peer.address}/v1/peer/ws"
        try:
            async with asyncio.timeout(self.swarm.config.timeout):  # a hung peer costs this
                ws = await self.swarm.session.ws_connect(
                    url,
                    heartbeat=HEARTBEAT,
                    max_msg_size=MAX_MESSAGE,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                )
                await ws.send_bytes(encode(self.swarm.hello()))
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            raise PeerError(f"cannot connect to peer {self.node_id} at {url}: {err!r}") from err
        self.ws = ws
        self.reader = asyncio.create_task(self._read(ws), name=f"peer-link-{self.node_id}")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.ERROR:  # e.g. no pong: a hung peer
                    raise ConnectionError(f"{ws.exception()!r}")
                if frame.type != aiohttp.WSMsgType.BINARY:
                    raise WireError(f"unexpected {frame.type.name} frame")
                msg = decode(frame.data)
                if isinstance(msg, Hello):
                    if msg.node != self.node_id:
                        raise WireError(f"expected node {self.node_id}, it says {msg.node}")
                    continue
                self.swarm.on_message(self.node_id, msg)
                if isinstance(msg, State) and msg.image_id in self.answered:
                    self.answered[msg.image_id].set()
        except WireError as err:
            log.warning("peer %s sent a bad message, closing its link: %s", self.node_id, err)
            self.swarm.metrics.peer_errors.inc()
        except (aiohttp.ClientError, ConnectionError) as err:
            log.info("link to peer %s lost: %s", self.node_id, err)
            self.swarm.metrics.peer_errors.inc()
        finally:
            await ws.close()
            self.swarm.on_link_closed(self)

    async def close(self) -> None:
        """Close the socket and wait for the reader."""
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


class Subscriber:
    """A peer's WebSocket to us: what it follows and what we still have to tell it."""

    def __init__(self, node_id: str, ws: web.WebSocketResponse) -> None:
        self.node_id = node_id
        self.ws = ws
        self.images: set[str] = set()
        self.queue: deque[Message] = deque()
        self.wake = asyncio.Event()
        self.overflow = False

    def push(self, msg: Message) -> None:
        """Queue a message (cut the subscriber off if it cannot keep up)."""
        if len(self.queue) >= MAX_QUEUE:
            self.overflow = True
        else:
            self.queue.append(msg)
        self.wake.set()

    async def writer(self) -> None:
        """Send queued messages, merging runs of Have for the same image."""
        while not self.ws.closed:
            await self.wake.wait()
            self.wake.clear()
            if self.overflow:
                log.warning("peer %s cannot keep up with our updates; closing", self.node_id)
                await self.ws.close()
                return
            while self.queue:
                msg = self.queue.popleft()
                if isinstance(msg, Have):
                    chunks = list(msg.chunks)
                    while self.queue and isinstance(self.queue[0], Have):
                        nxt = self.queue[0]
                        assert isinstance(nxt, Have)
                        if nxt.image_id != msg.image_id:
                            break
                        chunks.extend(nxt.chunks)
                        self.queue.popleft()
                    msg = Have(msg.image_id, tuple(chunks))
                await self.ws.send_bytes(encode(msg))


class Swarm:
    """Peers, our links to them, their subscriptions to us."""

    def __init__(
        self,
        node_id: str,
        advertise: tuple[str, int],
        config: PeersConfig,
        origin_deadline: float,
        metrics: Metrics,
        static_peers: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.advertise = advertise
        self.config = config
        self.origin_deadline = origin_deadline  # longest legal origin read of one chunk
        self.metrics = metrics
        self.static_peers = static_peers
        self.clock = clock
        self.table = PeerTable(node_id)
        self.links: dict[str, PeerLink] = {}
        self.subscribers: dict[str, set[Subscriber]] = {}
        self._sockets: set[web.WebSocketResponse] = set()  # peers' sockets to us
        self.jobs: dict[str, FetchJob] = {}
        self.store: Store | None = None
        self.digests: dict[tuple[str, str], bytearray] = {}  # (image, node) -> digests
        self.generation = 0  # moves whenever what we hold changes (announced over mDNS)
        self.answer_times: deque[float] = deque(maxlen=16)  # seconds, subscribe -> state
        self._reading: dict[str, set[_Read]] = {}  # our chunk reads running, by peer
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- lifetime ------------------------------------------------------------------

    async def __aenter__(self) -> Swarm:
        self._session = aiohttp.ClientSession(
            # no sock_read timeout: aiohttp re-arms it on every packet received, which
            # costs more CPU than anything else per chunk; read_chunk bounds each read
            # with peers.timeout as a whole instead
            timeout=aiohttp.ClientTimeout(total=None, connect=min(5.0, self.config.timeout)),
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            # bodies as sent (read_pieces counts body bytes against SO_RCVLOWAT)
            auto_decompress=False,
            # room for what one SO_RCVLOWAT wake-up brings, so reading is not paused
            read_bufsize=RCVLOWAT,
        )
        if self.static_peers:
            self.spawn(self._static_loop(), "static-peers")
        self.spawn(self._maintenance(), "peer-table")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every link and socket; stop background tasks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in self.links.values()))
        for ws in list(self._sockets):
            await ws.close()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP client session used for every peer."""
        assert self._session is not None, "Swarm used outside 'async with'"
        return self._session

    def spawn(self, coro: Any, name: str) -> None:
        """Run a background task owned by the swarm (cancelled at close)."""
        if self._closed:
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("swarm task %s failed: %r", task.get_name(), task.exception())

    def hello(self) -> Hello:
        """Our Hello."""
        return Hello(self.node_id, self.advertise[0], self.advertise[1])

    # -- discovery feeds -------------------------------------------------------------

    def seen(
        self,
        node_id: str,
        host: str,
        port: int,
        source: str,
        generation: int | None = None,
        inventory: tuple[int, int] | None = None,
    ) -> None:
        """A peer was discovered or refreshed; running fetches subscribe to it."""
        known = node_id in self.table.peers and not self.table.peers[node_id].gone
        now = self.clock()
        if self.table.seen(node_id, host, port, source, now, generation, inventory) is None:
            return
        if not known:
            log.info("peer %s at %s:%d (%s)", node_id, host, port, source)
            for job in list(self.jobs.values()):
                self.spawn(self._subscribe(job, node_id), f"sub-{node_id}")

    def gone(self, node_id: str) -> None:
        """A peer said goodbye: nothing of it counts any more."""
        if node_id in self.table.peers:
            log.info("peer %s left", node_id)
        self.table.gone(node_id)
        self.gone_for_now(node_id)

    async def _maintenance(self) -> None:
        """Forget peers long gone, and close our sockets to peers that left."""
        while True:
            await asyncio.sleep(MAINTENANCE_EVERY)
            for node_id in self.table.expire(self.clock()):
                log.info("peer %s forgotten (not seen for a long time)", node_id)
            for node_id, link in list(self.links.items()):
                peer = self.table.get(node_id)
                if peer is None or peer.gone:
                    del self.links[node_id]
                    await link.close()

    async def _static_loop(self) -> None:
        """Say hello to every static peer now and then (they have no mDNS to find them).

        One that does not answer is asked again after 1 s, then less and less often.
        """
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

    async def _hello_static(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            async with self.session.get(
                f"http://{address}/v1/peer/hello", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                info = await resp.json()
            if not isinstance(info, dict):
                raise ValueError("hello is not a JSON object")
            node = info["node"]
            if info.get("version") != PROTOCOL_VERSION or not isinstance(node, str):
                log.warning("static peer %s speaks protocol %r", address, info.get("version"))
                return False
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError) as err:
            log.debug("static peer %s does not answer: %r", address, err)
            return False
        images, chunks, gen = info.get("images"), info.get("chunks"), info.get("generation")
        inventory = (
            (images, chunks) if isinstance(images, int) and isinstance(chunks, int) else None
        )
        self.seen(node, host, int(port), "static", gen if isinstance(gen, int) else None, inventory)
        return True

    # -- client side: our fetches ----------------------------------------------------

    def new_plan(self, manifest: Manifest, present: list[int]) -> SwarmPlan:
        """The plan for a new fetch of `manifest`'s image."""
        return SwarmPlan(
            manifest.chunks,
            present,
            self.node_id,
            f"{manifest.image_id}:{manifest.etag}",
            stall=3 * self.config.timeout,
            handover=self.handover(),
        )

    def handover(self) -> float:
        """How long hosts may disagree on who fetches an image: a few recent answer
        times (peers' loops and the network as they are now); HANDOVER before any."""
        if not self.answer_times:
            return HANDOVER
        slowest = max(self.answer_times)
        return min(HANDOVER_MAX, max(HANDOVER_MIN, HANDOVER_ANSWERS * slowest))

    async def join(self, job: FetchJob) -> None:
        """Subscribe to the image on every usable peer; return once they answered (or 1 s).

        Peers that answer late are still followed: their subscriptions go on in the
        background.
        """
        self.jobs[job.image_id] = job
        self.push_all(job.image_id, Status(job.image_id, True))
        tasks = [
            asyncio.create_task(self._subscribe_and_wait(job, p.node_id))
            for p in self.table.usable(self.clock())
        ]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=GATHER_TIMEOUT)
        for task in pending:  # keep them, owned by the swarm
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        # a peer that has not answered yet may learn of us that late
        job.plan.handover = HANDOVER_MAX if pending else self.handover()

    async def _subscribe_and_wait(self, job: FetchJob, node_id: str) -> None:
        started = self.clock()
        event = await self._subscribe(job, node_id)
        if event is not None:
            await event.wait()
            link = self.links.get(node_id)
            if link is not None and link.open:  # a State came (not: the link closed)
                self.answer_times.append(self.clock() - started)

    async def _subscribe(self, job: FetchJob, node_id: str) -> asyncio.Event | None:
        link = self.links.get(node_id)
        if link is None:
            link = self.links[node_id] = PeerLink(self, node_id)
        if job.image_id in link.images and link.open:
            return link.answered.get(job.image_id)
        try:
            event = await link.subscribe(job.image_id, fetching=True)
        except (PeerError, ConnectionError, RuntimeError, aiohttp.ClientError) as err:
            log.info("cannot subscribe to %s on peer %s: %s", job.image_id, node_id, err)
            self.metrics.peer_errors.inc()
            self.table.failed(node_id, self.clock())
            return None
        if self.jobs.get(job.image_id) is not job:  # the fetch ended meanwhile
            await link.unsubscribe(job.image_id)
            return None
        return event

    async def refresh(self, job: FetchJob) -> None:
        """Subscribe to peers that came up since the fetch joined (called now and then)."""
        now = self.clock()
        todo = []
        for peer in self.table.usable(now):
            link = self.links.get(peer.node_id)
            if link is None or not link.open or job.image_id not in link.images:
                todo.append(self._subscribe(job, peer.node_id))
        await asyncio.gather(*todo)

    def leave(self, job: FetchJob) -> None:
        """The fetch ended: tell subscribers, unsubscribe everywhere (in the background)."""
        if self.jobs.get(job.image_id) is job:
            del self.jobs[job.image_id]
        self.push_all(job.image_id, Status(job.image_id, False))
        for link in list(self.links.values()):
            if job.image_id in link.images:
                self.spawn(link.unsubscribe(job.image_id), f"unsub-{link.node_id}")
        for key in [k for k in self.digests if k[0] == job.image_id]:
            del self.digests[key]

    def on_message(self, node_id: str, msg: Message) -> None:
        """A message from a peer we subscribed to."""
        now = self.clock()
        peer = self.table.get(node_id)
        if peer is None or not peer.usable(now):
            return  # quarantined, down or gone: what it says does not count
        peer.last_seen = now
        job = self.jobs.get(getattr(msg, "image_id", ""))
        if job is None:
            return
        plan = job.plan
        if isinstance(msg, State):
            if msg.manifest is not None and not msg.manifest.same_source(job.image.manifest):
                log.info("peer %s holds another version of %s; ignored", node_id, msg.image_id)
                plan.drop_peer(node_id, now)
            else:
                if msg.manifest is not None:
                    self.digests[(msg.image_id, node_id)] = msg.manifest.digests
                have = msg.have if msg.manifest is not None else b""
                plan.peer_state(
                    node_id, have, msg.taking, msg.fetching, now, now + self.origin_deadline
                )
        elif isinstance(msg, Have):
            digests = self.digests.get((msg.image_id, node_id))
            if digests is None:
                digests = self.digests[(msg.image_id, node_id)] = bytearray(
                    DIGEST_SIZE * job.image.manifest.chunks
                )
            good = []
            for index, digest in msg.chunks:
                if index < job.image.manifest.chunks:
                    digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest
                    good.append(index)
            plan.peer_has(node_id, good, now)
        elif isinstance(msg, Taking):
            plan.peer_taking(node_id, msg.chunks, now, now + self.origin_deadline)
        elif isinstance(msg, Status):
            if msg.gone:
                plan.drop_peer(node_id, now)
            else:
                plan.peer_fetching(node_id, msg.fetching, now)
        job.poke()

    def on_link_closed(self, link: PeerLink) -> None:
        """Our socket to a peer closed: forget what it told us."""
        link.images.clear()
        for event in link.answered.values():
            event.set()  # nobody waits for a State that will not come
        link.answered.clear()
        self._drop(link.node_id)

    def quarantine(self, node_id: str) -> None:
        """The peer sent bad bytes: use it for nothing until peers.quarantine has passed."""
        peer = self.table.get(node_id)
        if peer is None or peer.state(self.clock()) == "quarantined":
            return  # other chunks in flight from it failed too: one quarantine
        self.table.quarantine(node_id, self.clock(), self.config.quarantine)
        self.metrics.peer_quarantines.inc()
        log.warning("peer %s quarantined for %.0fs", node_id, self.config.quarantine)
        self.gone_for_now(node_id)

    def gone_for_now(self, node_id: str) -> None:
        """The peer is down: forget what it told us (it is asked again once back up)."""
        self._drop(node_id)
        link = self.links.get(node_id)
        if link is not None:
            self.spawn(link.close(), f"close-{node_id}")

    def _drop(self, node_id: str) -> None:
        now = self.clock()
        for job in self.jobs.values():
            job.plan.drop_peer(node_id, now)
            job.poke()
        # a hung peer (stopped, or cut off without a reset) would hold these until their
        # timeouts (a streamed one: the origin's deadline): end them, they go elsewhere
        reads = self._reading.pop(node_id, set())
        if reads:
            log.info("peer %s is gone: ending %d chunk reads from it", node_id, len(reads))
        for read in reads:
            read.end()

    def _chunk_url(self, node_id: str, manifest: Manifest, index: int) -> str:
        """Where to read a chunk from a usable peer (PeerError / PeerGone if none)."""
        peer = self.table.get(node_id)
        if peer is None:
            raise PeerError(f"peer {node_id} is not known")
        if not peer.usable(self.clock()):  # it went away before this read began
            raise PeerGone(f"peer {node_id} is {peer.state(self.clock())}")
        return f"http://{peer.address}/v1/peer/images/{manifest.image_id}/chunks/{index}"

    @contextlib.asynccontextmanager
    async def _chunk_read(self, node_id: str, what: str, seconds: float) -> AsyncIterator[None]:
        """Bound a chunk read from a peer by `seconds`, keep it where `_drop` can end it,
        and turn what can go wrong into PeerError (PeerGone if `_drop` ended it)."""
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
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as err:
            raise PeerError(f"{what}: {err!r}") from err

    def digest(self, image_id: str, node_id: str, index: int) -> bytes | None:
        """The digest a peer announced for one of its chunks."""
        digests = self.digests.get((image_id, node_id))
        if digests is None:
            return None
        d = bytes(digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])
        return d if any(d) else None

    async def read_chunk(self, node_id: str, manifest: Manifest, index: int) -> list[bytes]:
        """Chunk `index` from a peer, in pieces (unverified); PeerError on any failure."""
        url = self._chunk_url(node_id, manifest, index)
        _, length = manifest.span(index)
        async with (
            self._chunk_read(node_id, f"peer {node_id}: chunk {index}", self.config.timeout),
            self.session.get(url, headers={"If-Match": manifest.etag}) as resp,
        ):
            if resp.status != 200:
                raise PeerError(f"peer {node_id}: HTTP {resp.status} for chunk {index}")
            if resp.content_length is not None and resp.content_length != length:
                raise PeerError(f"peer {node_id}: chunk {index} has the wrong length")
            return await read_pieces(resp, length)

    async def read_chunk_streamed(
        self,
        node_id: str,
        manifest: Manifest,
        index: int,
        feed: Callable[[bytes], None] | None = None,
        to_relay: bool = False,
    ) -> tuple[list[bytes], bytes]:
        """Chunk `index` from a peer that may still be reading it from the origin.

        The answer is the chunk followed by its 16-byte digest (known to the peer only
        once the chunk is in); (pieces, digest), unverified. The wait is bounded by how
        long the peer's own origin read may take, plus peers.timeout. `feed` gets the
        bytes as they arrive (we relay them); `to_relay` asks for bytes straight from the
        peer's origin read (relays pass on nothing relayed: no cycles). StreamRefused if
        the peer has nothing of it.
        """
        url = self._chunk_url(node_id, manifest, index)
        _, length = manifest.span(index)
        headers = {"If-Match": manifest.etag, STREAM_HEADER: "1"}
        if to_relay:
            headers[RELAY_HEADER] = "1"
        what = f"peer {node_id}: chunk {index} (streamed)"
        async with (
            self._chunk_read(node_id, what, self.origin_deadline + self.config.timeout),
            self.session.get(url, headers=headers) as resp,
        ):
            if resp.status == 404:
                raise StreamRefused(f"peer {node_id} has no chunk {index} to stream")
            if resp.status != 200:
                raise PeerError(f"peer {node_id}: HTTP {resp.status} for chunk {index}")
            if resp.content_length not in (None, length + DIGEST_SIZE):
                raise PeerError(f"peer {node_id}: chunk {index} has the wrong length")
            data = await read_pieces(resp, length, feed, then=DIGEST_SIZE)
            digest = await resp.content.readexactly(DIGEST_SIZE)
        return data, digest

    # -- server side: peers following our images -------------------------------------

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        """The `/v1/peer/ws` handler: one peer's subscriptions to our images."""
        # subscribers send only Hello/Subscribe/Unsubscribe: tiny messages
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_REQUEST)
        if self._closed:
            raise web.HTTPServiceUnavailable(text="the daemon is stopping")
        await ws.prepare(request)
        self._sockets.add(ws)
        sub: Subscriber | None = None
        writer: asyncio.Task[None] | None = None
        try:
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.BINARY:
                    raise WireError(f"unexpected {frame.type.name} frame")
                msg = decode(frame.data)
                if sub is None:
                    if not isinstance(msg, Hello):
                        raise WireError("the first message must be a hello")
                    if msg.node == self.node_id:
                        raise WireError("a peer uses our own node id (a copied cache dir?)")
                    host = msg.host or (request.remote or "")
                    self.seen(msg.node, host, msg.port, "inbound")
                    sub = Subscriber(msg.node, ws)
                    await ws.send_bytes(encode(self.hello()))
                    writer = asyncio.create_task(sub.writer(), name=f"peer-sub-{msg.node}")
                elif isinstance(msg, Subscribe):
                    sub.images.add(msg.image_id)
                    self.subscribers.setdefault(msg.image_id, set()).add(sub)
                    sub.push(self._state(msg.image_id))
                    job = self.jobs.get(msg.image_id)
                    if job is not None and msg.fetching:
                        # it fetches what we fetch: share the work, and follow its chunks
                        job.plan.peer_fetching(sub.node_id, True, self.clock())
                        job.poke()
                        self.spawn(self._subscribe(job, sub.node_id), f"sub-{sub.node_id}")
                elif isinstance(msg, Unsubscribe):
                    self._unsubscribe(sub, msg.image_id)
                else:
                    raise WireError(f"unexpected {type(msg).__name__} from a subscriber")
        except WireError as err:
            log.warning("peer %s sent a bad message, closing: %s", request.remote, err)
            self.metrics.peer_errors.inc()
        finally:
            self._sockets.discard(ws)
            if sub is not None:
                for image_id in list(sub.images):
                    self._unsubscribe(sub, image_id)
            await ws.close()
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        return ws

    def _unsubscribe(self, sub: Subscriber, image_id: str) -> None:
        sub.images.discard(image_id)
        subs = self.subscribers.get(image_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subscribers[image_id]
        job = self.jobs.get(image_id)
        if job is not None:
            job.plan.peer_fetching(sub.node_id, False, self.clock())
            job.poke()

    def _state(self, image_id: str) -> State:
        image = self.store.get(image_id) if self.store is not None else None
        job = self.jobs.get(image_id)
        if image is None or image.removed:
            return State(image_id, None, b"", (), job is not None)
        m = image.manifest
        if m.complete:
            have = bytes(bytearray(b"\xff" * ((m.chunks + 7) // 8)))
        else:
            bits = bitmap_new(m.chunks)
            for i in range(m.chunks):
                if image.has(i):
                    bitmap_set(bits, i)
            have = bytes(bits)
        taking = tuple(job.taking) if job is not None else ()
        return State(image_id, m, have, taking, job is not None)

    def push_all(self, image_id: str, msg: Message) -> None:
        """Queue a message for every subscriber of the image."""
        for sub in self.subscribers.get(image_id, ()):
            sub.push(msg)

    def announce_have(self, image_id: str, index: int, digest: bytes) -> None:
        """A chunk became readable here."""
        self.generation += 1
        self.push_all(image_id, Have(image_id, ((index, digest),)))

    def announce_taking(self, image_id: str, index: int) -> None:
        """We started reading a chunk from the origin."""
        self.push_all(image_id, Taking(image_id, (index,)))

    def announce_gone(self, image_id: str) -> None:
        """We dropped the image (evicted, deleted, discarded)."""
        self.generation += 1
        self.push_all(image_id, Status(image_id, False, gone=True))

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
