"""Pure block exchange: what one host asks of which neighbour, and what of the origin.

Theory of operation. An image is cut into chunks, the unit of verification and
durability (one digest each in the manifest, one record in the chunk log), and each
chunk into blocks, the unit of transfer (`BLOCK_SIZE` by default). Hosts trade
blocks, so that from the first seconds of a boot storm every host has something to
give the others, however many hosts there are and however few chunks.

Each host talks to a bounded set of neighbours per image (see `ActiveSet`), never to
the whole cluster. A neighbour tells us which blocks it holds (a bitmap, then Have
batches); `Exchange.next_requests` fills each neighbour's request slots with the
blocks we lack that it holds: blocks a client waits for first, then the rarest
among our neighbours (ties broken at random), preferring chunks already begun so
they complete, verify and become durable early. With nothing left to ask for, the
blocks still in flight may be asked of a second holder (endgame); the first copy to
land wins.

The origin is read by a few *readers* only (`readers`): the hosts that rank first
for the image by rendezvous hashing over the cluster's members, as many as the
origin should serve streams at once (origin.concurrency). Every host with the same
member table computes the same readers, so no tracker decides and the origin sends
each chunk about once, whether 4 or 1,000 hosts fetch: a reader reads its share of
chunks in order, announcing each block as it lands, and everyone else gets the
blocks from neighbours. A reader skips a chunk some neighbour already holds (a late
joiner reads nothing the swarm has). When a reader dies, the next host in rank takes
its place (`OriginLane.replace`). A host that is not a reader still reads a block from
the origin when a client waits for it far ahead of the fetch and no neighbour has
it, or when the swarm has brought it nothing for `stall` seconds (the readers are
gone and nobody noticed yet).

No I/O, no clock, no randomness of its own: `now` and `rng` are passed in, so the
daemon and the simulator (swarmtools.sim) drive the same code.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import xxhash

BLOCK_SIZE = 256 * 1024  # default unit of transfer between hosts
SLOTS = 1  # requests in flight to one neighbour (peers.concurrency; see Exchange.per_neighbour)
PIPELINE = 2  # requests in flight we keep at least, over all neighbours serving us
MAX_INFLIGHT = 32  # requests in flight from one host in all
CANDIDATES = 64  # blocks looked at per pick (the rarest of them goes)
FAR_AHEAD = 4  # chunks past the first missing one: "far ahead" for a waiting client
QUIET = 2.0  # seconds without a block from anywhere: a half-spread chunk is read
QUIET_MAX = 10.0  # ... or longer where blocks land slowly (see Exchange.quiet_after)
QUIET_BLOCKS = 32  # ... about this many blocks' landing time here
ALONE = 10.0  # seconds without a block and without a neighbour: read what we lack
URGENT_WAIT = 10.0  # seconds a client waits for a block before we read it anyway
BACKLOG = 1  # untouched chunks a reader keeps before others help with its share
GATHER = 1.0  # seconds a fetch waits for its neighbours' states before reading the origin
ENDGAME_COPIES = 2  # sources a block may be asked of at once, near the end
ENDGAME_SLOW = 2.0  # ... once it has been in flight this many times as long as usual
BACKOFF_DOUBLINGS = 3  # a busy neighbour's hint is doubled per refusal in a row, this often

HAVE_BATCH = 0.02  # longest a Have waits for more before it goes out (seconds)
HAVE_BATCH_MIN = 0.001  # shortest
HAVE_BATCH_BLOCKS = 4  # a Have waits for about this many blocks to land after it
LAZY_HAVE = 1.0  # a Have of a block the neighbour holds already waits up to this long

UPLOAD_SLOTS = 8  # neighbours a host uploads to at once (unchoked)
ROTATE = 0.05  # time between turns of the upload slots before blocks land (seconds)
ROTATE_MIN = 0.005  # shortest
ROTATE_MAX = 2.0  # longest
ROTATE_BLOCKS = 8  # a slot turns about every this many blocks' landing time here

MISSING, INFLIGHT, HAVE = 0, 1, 2


@dataclass(frozen=True)
class Geometry:
    """How an image is cut: chunks (verified, durable) of blocks (traded)."""

    size: int
    chunk_size: int
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.chunk_size % self.block_size:
            raise ValueError("chunk_size must be a multiple of block_size")

    @property
    def chunks(self) -> int:
        """Number of chunks."""
        return -(-self.size // self.chunk_size)

    @property
    def blocks(self) -> int:
        """Number of blocks."""
        return -(-self.size // self.block_size)

    @property
    def per_chunk(self) -> int:
        """Blocks in a full chunk."""
        return self.chunk_size // self.block_size

    def chunk_of(self, block: int) -> int:
        """The chunk block `block` belongs to."""
        return block // self.per_chunk

    def blocks_of(self, chunk: int) -> range:
        """The blocks of chunk `chunk`."""
        first = chunk * self.per_chunk
        return range(first, min(first + self.per_chunk, self.blocks))

    def block_span(self, block: int) -> tuple[int, int]:
        """(offset, length) of block `block`."""
        offset = block * self.block_size
        if block < 0 or offset >= self.size:
            raise IndexError(f"block {block} is outside an image of {self.size} bytes")
        return offset, min(self.block_size, self.size - offset)


def rank(image_key: str, nodes: Iterable[str]) -> list[str]:
    """Nodes in rendezvous order for an image: the same on every host, and a node
    joining or leaving moves only the places after its own."""
    return sorted(nodes, key=lambda n: (-xxhash.xxh64_intdigest(f"{image_key}\0{n}".encode()), n))


def _top(key: str, nodes: Iterable[str]) -> str:
    """The node that ranks first for `key` (rendezvous hashing)."""
    return max(nodes, key=lambda n: (xxhash.xxh64_intdigest(f"{key}\0{n}".encode()), n))


def readers(
    image_key: str, members: Iterable[str], concurrency: int, seeders: Collection[str] = ()
) -> list[str]:
    """The hosts that read an image from the origin: the first `concurrency` in rank,
    of the seeders among the members if there are any (a seeder sits beside the origin
    and signs what it read: the others then read nothing from the origin)."""
    members = list(members)
    pool = [m for m in members if m in seeders] or members
    return rank(image_key, pool)[: max(1, concurrency)]


@dataclass
class _Neighbour:
    """What one neighbour holds of the image and what we asked of it."""

    bitmap: bytearray
    inflight: int = 0
    busy_until: float = float("-inf")  # it refused a request: ask again from then on
    refusals: int = 0  # in a row: each waits twice as long as the last
    serves_us: bool = False  # it gave us one of its upload slots (it unchoked us)
    offer: int = 0  # blocks we hold that it lacks: it wants one of our upload slots
    served_at: float = float("-inf")  # when we last gave it an upload slot
    asked_at: float = float("-inf")  # when it last asked us for a block
    sent_at: float = float("-inf")  # when a block we served it last left
    uploads: int = 0  # its requests we are serving now (see Exchange.sent)
    useful: dict[int, None] = field(default_factory=dict)  # held there, missing here


class Exchange:
    """One host's view of one image's blocks: which block to ask of which neighbour."""

    def __init__(
        self,
        geometry: Geometry,
        have: Iterable[int],
        rng: random.Random,
        slots: int = SLOTS,
        max_inflight: int = MAX_INFLIGHT,
        upload_slots: int = UPLOAD_SLOTS,
        pipeline: int = PIPELINE,
    ) -> None:
        self.geometry = geometry
        n = geometry.blocks
        self.state = bytearray(n)
        for b in have:
            self.state[b] = HAVE
        self.missing = self.state.count(MISSING)  # MISSING or INFLIGHT
        self.rng = rng
        self.slots = slots
        self.pipeline = pipeline
        self.max_inflight = max_inflight
        self.count = [0] * n  # neighbours holding each block
        self.seen = [0] * geometry.chunks  # blocks of each chunk some neighbour holds
        self.neighbours: dict[str, _Neighbour] = {}
        self.sources: dict[int, set[str]] = {}  # block in flight -> neighbours asked
        self.asked_at: dict[int, float] = {}  # block in flight -> when first asked
        self.usual = 0.0  # seconds a block request usually takes (EWMA)
        self.gap = 0.0  # seconds between two blocks landing here, usually (EWMA)
        self._landed_at: float | None = None
        self.inflight = 0  # requests to neighbours in flight
        # blocks of each chunk we hold: chunks begun are finished first
        self.chunk_have = [0] * geometry.chunks
        for b in range(n):
            if self.state[b] == HAVE:
                self.chunk_have[geometry.chunk_of(b)] += 1
        self._urgent: deque[int] = deque()
        self._urgent_set: set[int] = set()
        self._turn = 0
        self.upload_slots = upload_slots
        self.serving: set[str] = set()  # neighbours we upload to (unchoked)
        self._rotate_at = float("-inf")

    @property
    def finished(self) -> bool:
        """Every block is here."""
        return self.missing == 0

    def has(self, block: int) -> bool:
        """Block `block` is here."""
        return self.state[block] == HAVE

    # -- what neighbours tell us ----------------------------------------------------

    def add_neighbour(self, node: str, bitmap: bytes | None = None) -> None:
        """A neighbour's full state (it holds the blocks set in `bitmap`)."""
        self.drop_neighbour(node)
        size = (self.geometry.blocks + 7) // 8
        bits = bytearray(bitmap) if bitmap is not None and len(bitmap) == size else bytearray(size)
        peer = self.neighbours[node] = _Neighbour(bytearray(size))
        peer.offer = self.holding()
        self._add_bits(node, peer, bits)

    def neighbour_holds(self, node: str, block: int) -> bool:
        """`node` told us it holds `block`. A Have of that block is news to it only for
        its bookkeeping of what we lack (our interest in its upload slots), not for its
        requests: such Haves wait up to LAZY_HAVE and ride along with the next Have
        it needs (about half of all Haves at 32 hosts; the simulator's 32 hosts x 64
        MiB at 10 Mbit/s sent 4,928 Have messages per host, 2,486 of them news to
        nobody's requests)."""
        peer = self.neighbours.get(node)
        return peer is not None and bool(peer.bitmap[block >> 3] & (1 << (block & 7)))

    def holding(self) -> int:
        """Blocks here."""
        return self.geometry.blocks - self.missing

    def neighbour_has(self, node: str, blocks: Iterable[int]) -> None:
        """Blocks that became readable at a neighbour."""
        peer = self.neighbours.get(node)
        if peer is None:
            return
        n, per_chunk = self.geometry.blocks, self.geometry.per_chunk
        for b in blocks:
            if 0 <= b < n and not peer.bitmap[b >> 3] & (1 << (b & 7)):
                peer.bitmap[b >> 3] |= 1 << (b & 7)
                self.count[b] += 1
                if self.count[b] == 1:
                    self.seen[b // per_chunk] += 1
                if self.state[b] != HAVE:
                    peer.useful[b] = None
                else:
                    peer.offer -= 1

    def drop_neighbour(self, node: str) -> list[int]:
        """A neighbour left (or is no longer trusted): forget what it holds. Returns the
        blocks that were in flight from it; they are missing again unless another
        neighbour is sending them."""
        peer = self.neighbours.pop(node, None)
        if peer is None:
            return []
        bits, per_chunk = peer.bitmap, self.geometry.per_chunk
        for i, byte in enumerate(bits):
            while byte:
                low = byte & -byte
                b = (i << 3) + low.bit_length() - 1
                self.count[b] -= 1
                if not self.count[b]:
                    self.seen[b // per_chunk] -= 1
                byte ^= low
        self.serving.discard(node)
        lost = [b for b, nodes in self.sources.items() if node in nodes]
        for b in lost:
            self._settle(b, node)
        return lost

    def _add_bits(self, node: str, peer: _Neighbour, bits: bytearray) -> None:
        blocks = []
        for i, byte in enumerate(bits):
            while byte:
                low = byte & -byte
                blocks.append((i << 3) + low.bit_length() - 1)
                byte ^= low
        self.neighbour_has(node, blocks)

    def served(self, block: int) -> bool:
        """A neighbour that gives us an upload slot, and did not refuse us since,
        holds block `block`. (One that keeps refusing, its trade with us ended or it
        distrusts us, must not look like a source: the origin lane reads what only it
        holds.)"""
        bit, byte = 1 << (block & 7), block >> 3
        return any(
            p.serves_us and not p.refusals and p.bitmap[byte] & bit
            for p in self.neighbours.values()
        )

    def holders(self, block: int) -> list[str]:
        """Neighbours that hold block `block`."""
        return [n for n, p in self.neighbours.items() if p.bitmap[block >> 3] & (1 << (block & 7))]

    # -- what we ask for --------------------------------------------------------------

    def want(self, blocks: Iterable[int]) -> None:
        """A client waits for these blocks: ask for them before anything else (each
        is queued once, however often readers ask)."""
        for b in blocks:
            if self.state[b] != HAVE and b not in self._urgent_set:
                self._urgent.append(b)
                self._urgent_set.add(b)

    def urgent(self) -> list[int]:
        """Blocks a client waits for that are still missing, in the order asked."""
        live = [b for b in self._urgent if self.state[b] != HAVE]
        if len(live) != len(self._urgent):  # drop the ones that landed
            self._urgent = deque(live)
            self._urgent_set = set(live)
        return live

    def next_requests(self, now: float, limit: int | None = None) -> list[tuple[str, int]]:
        """Fill free request slots: (neighbour, block) pairs, now in flight. `limit`
        lowers the requests in flight in all (see OriginLane.peer_limit)."""
        out: list[tuple[str, int]] = []
        cap = self.max_inflight if limit is None else min(limit, self.max_inflight)
        if self.missing == 0 or self.inflight >= cap:
            return out
        urgent = self.urgent()
        serving = sum(1 for p in self.neighbours.values() if p.serves_us)
        per = self._per_neighbour(serving)
        order = [
            (n, p)
            for n, p in self.neighbours.items()
            if p.serves_us and p.busy_until <= now and p.inflight < per and p.useful
        ]
        if len(order) > 1:  # no neighbour always first in line
            turn = self._turn % len(order)
            order = order[turn:] + order[:turn]
            self._turn += 1
        # neighbours already sending us a block a client waits for
        urgent_busy = {
            n for b in urgent if self.state[b] == INFLIGHT for n in self.sources.get(b, ())
        }
        # a client's blocks take at most half of our request slots (one per neighbour
        # at most), not all of them: when every host streams the image from its start
        # (a boot storm of streaming GETs), urgency alone would send every request
        # after the same few blocks; the other slots keep rarest-first spreading the rest
        urgent_room = max(1, (serving * per + 1) // 2) - sum(
            len(self.sources.get(b, ())) for b in urgent if self.state[b] == INFLIGHT
        )
        while order and self.inflight < cap:
            still = []
            for node, peer in order:
                if self.inflight >= cap:
                    break
                asks_urgent = urgent_room > 0 and node not in urgent_busy
                block = self._pick(peer, urgent if asks_urgent else [])
                if block is None:
                    continue
                if block in self._urgent_set:
                    urgent_busy.add(node)
                    urgent_room -= 1
                self._ask(node, peer, block, now)
                out.append((node, block))
                if peer.inflight < per:
                    still.append((node, peer))
            order = still
        if self.inflight < cap and not self._requestable(now):
            out += self._endgame(now)
        return out

    def per_neighbour(self) -> int:
        """Requests in flight to one neighbour: `slots` (peers.concurrency, 1 by
        default), more while fewer than `pipeline` neighbours serve us (one alone gets
        2, so our link does not idle a round trip per block).

        Why one: a neighbour's uplink serves its upload slots' requests in turn, and
        every request queued there is a block's time of delay for each block passing
        through it, at every hop. With 2 per neighbour a host uploading to 8 had up to
        16 blocks queued; blocks fresh from the origin then crossed the swarm slowly
        and hosts trailed the origin by 60-100 blocks, which a small image cannot hide.
        Simulator, last host against the limit, 2 per neighbour -> this rule: 32 hosts
        x 64 MiB at 50 Mbit/s 1.54x -> 1.19x, 64 hosts 1.93x -> 1.31x, 16 hosts at 200
        Mbit/s 1.76x -> 1.52x; 100 hosts x 1 GiB 1.08x -> 1.09x at 1 Gbit/s and 1.23x
        -> 1.27x at 10 Gbit/s (a round trip is a block's time there)."""
        return self._per_neighbour(sum(1 for p in self.neighbours.values() if p.serves_us))

    def _per_neighbour(self, serving: int) -> int:
        return max(self.slots, -(-self.pipeline // max(serving, 1)))

    def _pick(self, peer: _Neighbour, urgent: list[int]) -> int | None:
        bits = peer.bitmap
        for b in urgent:
            if self.state[b] == MISSING and bits[b >> 3] & (1 << (b & 7)):
                return b
        best: int | None = None
        best_key = (0, 0)
        ties = 0
        looked = 0
        stale = []
        state, count, chunk_have = self.state, self.count, self.chunk_have
        per_chunk = self.geometry.per_chunk
        # newest first: what a neighbour got last is what few others hold yet (a block
        # fresh from the origin), and CANDIDATES cuts the look short; oldest first, a
        # host trailing the origin by more than CANDIDATES blocks never saw the fresh
        # ones (simulator, 32 hosts x 64 MiB at 10 Mbit/s: 1.707x -> 1.645x the limit)
        for b in reversed(peer.useful):
            st = state[b]
            if st != MISSING:
                if st == HAVE:
                    stale.append(b)
                continue
            # rarest first; of equally rare, a chunk begun; then at random
            key = (count[b], -chunk_have[b // per_chunk])
            if best is None or key < best_key:
                best, best_key, ties = b, key, 1
            elif key == best_key:
                ties += 1
                if self.rng.random() * ties < 1:
                    best = b
            looked += 1
            if looked >= CANDIDATES:
                break
        for b in stale:
            del peer.useful[b]
        return best

    def _requestable(self, now: float) -> bool:
        """Some missing block not in flight is held by a neighbour with a free slot."""
        per = self.per_neighbour()
        for peer in self.neighbours.values():
            if not peer.serves_us or peer.busy_until > now:
                continue
            if peer.inflight < per and any(self.state[b] == MISSING for b in peer.useful):
                return True
        return False

    def _endgame(self, now: float) -> list[tuple[str, int]]:
        """Nothing new to ask for: ask a second holder for blocks still in flight."""
        out: list[tuple[str, int]] = []
        if self.missing > len(self.sources) or not self.sources:
            return out  # blocks nobody holds yet: the swarm will bring them
        slow = now - ENDGAME_SLOW * self.usual
        per = self.per_neighbour()
        for b, nodes in list(self.sources.items()):
            if len(nodes) >= ENDGAME_COPIES or self.inflight >= self.max_inflight:
                continue
            if self.asked_at.get(b, now) > slow:
                continue  # it may well come in time: a copy would only split our link
            for node in self.holders(b):
                peer = self.neighbours[node]
                if (
                    node not in nodes
                    and peer.serves_us
                    and peer.inflight < per
                    and peer.busy_until <= now
                ):
                    self._ask(node, peer, b, now)
                    out.append((node, b))
                    break
        return out

    def _ask(self, node: str, peer: _Neighbour, block: int, now: float) -> None:
        self.asked_at.setdefault(block, now)
        self.state[block] = INFLIGHT
        self.sources.setdefault(block, set()).add(node)
        peer.inflight += 1
        self.inflight += 1

    def rotate_every(self) -> float:
        """How often an upload slot turns: about ROTATE_BLOCKS blocks' landing time
        here, between ROTATE_MIN and ROTATE_MAX (ROTATE before two blocks landed). At
        10 Gbit/s every 5 ms, at 1 Gbit/s every 17 ms, at 50 Mbit/s (a block lands
        every 40 ms or so) every 0.32 s: a slot turning faster than a served block can
        cross the link only costs messages and wake-ups (measured: with 32 daemons on
        2 cores at 50 Mbit/s, CPU was the limit). At most every 2 s: 64 daemons on 2
        cores land a block every 0.3 s or so, and with a 0.5 s cap they sent 1,772
        Slot messages each for a 64 MiB image (simulator, 32 hosts at 10 Mbit/s: 516
        -> 206 slots handed out per host with 2 s, the same times).

        Why not a 50 ms floor at fast links (until 2026-12-03): a timeline of the
        simulator (100 hosts x 256 MiB at 10 Gbit/s) showed the last hosts served by
        2-4 neighbours at 0.4-0.6 of their link while the median host had 7-14, all of
        them holding 50-200 blocks the slow host lacked: each host hands out 8 slots
        among 16-24 neighbours wanting one, and the slots given in the first
        milliseconds held for 50 ms, a quarter of the whole fetch. A host behind then
        stays behind, since its link is full from then on. Simulator, last host
        against the limit, mean of seeds 1-3, 50 ms -> this rule (with the first Haves
        at once, see `have_batch`): 100 hosts x 256 MiB at 10 Gbit/s 1.826x -> 1.233x,
        at 1 Gbit/s 1.172x -> 1.119x; 300 hosts at 1 Gbit/s 1.236x -> 1.19x; cells at
        50-200 Mbit/s unchanged within 1.5%."""
        turn = self._landing_time(ROTATE_BLOCKS, ROTATE_MIN, ROTATE_MAX, ROTATE)
        return turn if self.missing else max(turn, ROTATE)  # seeding: no need to hurry

    def have_batch(self) -> float:
        """How long a Have of ours may wait for more before it goes out: about the time
        HAVE_BATCH_BLOCKS more blocks take to land here, between HAVE_BATCH_MIN and
        HAVE_BATCH. At 200 Mbit/s (a block lands every 10 ms or so) Haves go out every
        20 ms, few messages for the CPU; at 10 Gbit/s (every 0.2 ms) within about a
        millisecond, so a block moves on by a hop in about its own transfer time
        instead of waiting a fixed 20 ms at every hop. (A 50 ms cap halved the Haves
        where blocks land slowly but slowed the start of every fetch, when nothing has
        landed yet: simulator, 300 hosts x 256 MiB at 1 Gbit/s 1.299x -> 1.421x the
        limit; and on real daemons fewer messages did not save CPU.) Before two blocks
        have landed, the shortest: the news of the first blocks is what the swarm waits
        for (with the longest, 20 ms per hop, the simulator's 100 hosts x 256 MiB at
        10 Gbit/s had uplinks idle for the first 50 ms: median host 0.28 s -> 0.23 s)."""
        return self._landing_time(HAVE_BATCH_BLOCKS, HAVE_BATCH_MIN, HAVE_BATCH, HAVE_BATCH_MIN)

    def quiet_after(self) -> float:
        """How long without a block from anywhere before the swarm counts as quiet
        (a half-spread chunk, a waiting client's block, a slow reader's share are then
        read from the origin): QUIET_BLOCKS blocks' usual landing time here, between
        QUIET and QUIET_MAX. On a fast link 2 s; where blocks land slowly (a slow
        link, or 64 daemons sharing 2 cores, where one landed every 0.2 s or so) a
        pause of a few seconds is the swarm being slow, not gone, and reading the
        origin then only takes its link from the readers (measured: 64 hosts x 64
        MiB at 50 Mbit/s read 1.22-1.29 copies from the origin with a fixed 2 s)."""
        return self._landing_time(QUIET_BLOCKS, QUIET, QUIET_MAX, QUIET)

    def _landing_time(self, blocks: int, low: float, high: float, unknown: float) -> float:
        """The time `blocks` blocks usually take to land here, within [low, high];
        `unknown` before two have landed."""
        if not self.gap:
            return unknown
        return min(high, max(low, blocks * self.gap))

    # -- what came of it ----------------------------------------------------------------

    def landed(self, block: int, node: str | None = None, now: float | None = None) -> list[str]:
        """Block `block` arrived (checked) from `node` (None: the origin, or a restart)
        at `now`. Returns the other neighbours still sending it (their requests can be
        cancelled)."""
        asked = self.asked_at.pop(block, None)
        if asked is not None and now is not None:
            took = now - asked
            self.usual = took if not self.usual else 0.8 * self.usual + 0.2 * took
        if now is not None and self.state[block] != HAVE:
            if self._landed_at is not None:
                gap = now - self._landed_at
                self.gap = gap if not self.gap else 0.9 * self.gap + 0.1 * gap
            self._landed_at = now
        if node is not None:
            self._settle(block, node)
            peer = self.neighbours.get(node)
            if peer is not None:
                peer.refusals = 0
        others = sorted(self.sources.pop(block, ()))
        for other in others:
            peer = self.neighbours.get(other)
            if peer is not None:
                peer.inflight -= 1
            self.inflight -= 1
        if self.state[block] != HAVE:
            self.state[block] = HAVE
            self.missing -= 1
            self.chunk_have[self.geometry.chunk_of(block)] += 1
            bit, byte = 1 << (block & 7), block >> 3
            for peer in self.neighbours.values():
                peer.useful.pop(block, None)
                if not peer.bitmap[byte] & bit:
                    peer.offer += 1
        return others

    def failed(self, block: int, node: str) -> None:
        """A request for `block` from `node` failed or was cancelled."""
        self._settle(block, node)

    def refused(self, block: int, node: str, now: float, until: float) -> None:
        """`node` refused us (no upload slot for us now): ask it nothing before
        `until`, longer each time in a row; until it serves us a block or opens a
        slot again it does not count as serving us (`served`)."""
        self._settle(block, node)
        peer = self.neighbours.get(node)
        if peer is not None:
            wait = max(0.0, until - now) * (1 << min(peer.refusals, BACKOFF_DOUBLINGS))
            peer.busy_until = max(peer.busy_until, now + wait)
            peer.refusals += 1

    def hold(self, blocks: Iterable[int]) -> None:
        """Keep requests off these missing blocks: something else settles them
        (landed, or released: a chunk being checked again after a restart)."""
        for b in blocks:
            if self.state[b] == MISSING:
                self.state[b] = INFLIGHT

    def release(self, blocks: Iterable[int]) -> None:
        """Held blocks that did not land are missing again."""
        for b in blocks:
            if self.state[b] == INFLIGHT and b not in self.sources:
                self.state[b] = MISSING

    def lost(self, blocks: Iterable[int]) -> None:
        """Blocks we had turned out bad (their chunk failed its check): missing again."""
        for b in blocks:
            if self.state[b] == HAVE:
                self.state[b] = MISSING
                self.missing += 1
                self.chunk_have[self.geometry.chunk_of(b)] -= 1
                for peer in self.neighbours.values():
                    if peer.bitmap[b >> 3] & (1 << (b & 7)):
                        peer.useful[b] = None

    def _settle(self, block: int, node: str) -> None:
        nodes = self.sources.get(block)
        if nodes is None or node not in nodes:
            return
        nodes.discard(node)
        peer = self.neighbours.get(node)
        if peer is not None:
            peer.inflight -= 1
        self.inflight -= 1
        if not nodes:
            del self.sources[block]
            self.asked_at.pop(block, None)
            if self.state[block] == INFLIGHT:
                self.state[block] = MISSING

    # -- our upload slots -----------------------------------------------------------------

    def served_by(self, node: str, serves: bool) -> None:
        """`node` gave us an upload slot (unchoked us), or took it back."""
        peer = self.neighbours.get(node)
        if peer is not None:
            peer.serves_us = serves
            if serves:
                peer.busy_until = float("-inf")
                peer.refusals = 0

    def may_serve(self, node: str, now: float | None = None) -> bool:
        """`node` holds one of our upload slots: its requests are served. `now`: it
        asks for a block at this moment (a slot it does not use goes to another); if
        served, `sent` must follow once the block has left."""
        serves = node in self.serving
        if now is not None:
            peer = self.neighbours.get(node)
            if peer is not None:
                peer.asked_at = now
                if serves:
                    peer.uploads += 1
        return serves

    def fetched_from_since(self, since: float) -> bool:
        """A neighbour that lacks blocks held here got one from us at `since` or later:
        it is fetching the image from us now. (Asking is not enough: anyone may ask.)"""
        return any(p.offer > 0 and p.sent_at >= since for p in self.neighbours.values())

    def sent(self, node: str, now: float) -> None:
        """A block we served `node` (after `may_serve`) has left, or failed to: it used
        its slot until `now`. A request waits at our uplink behind the other slots'
        (about a block's time each), so a neighbour with one request in flight asks
        only every so often while using its slot all along; one being served is never
        idle (before this, at 10 Mbit/s, most slots turned at every turn)."""
        peer = self.neighbours.get(node)
        if peer is not None:
            peer.asked_at = max(peer.asked_at, now)
            peer.sent_at = max(peer.sent_at, now)
            peer.uploads = max(0, peer.uploads - 1)

    def rotate(self, now: float) -> list[tuple[str, bool]]:
        """Hand out our upload slots: (neighbour, True) to unchoke, (neighbour, False)
        to choke. Slots go to neighbours that lack something we hold, longest waiting
        first; every `rotate_every` seconds the slot held longest goes to the next in line, so
        each interested neighbour is served in turn and fresh blocks spread through
        different neighbours. A neighbour with nothing left to get from us frees its
        slot at once; so does one that has not asked us for a block for a turn while
        others wait (what it lacks of ours is coming from elsewhere: measured in the
        simulator, most slots of 300 hosts at 1 Gbit/s sat with neighbours that had
        nothing to ask of them, while blocks spread one slot turn per hop)."""
        changes: list[tuple[str, bool]] = []
        waiting = sorted(
            (p.served_at, self.rng.random(), n)
            for n, p in self.neighbours.items()
            if n not in self.serving and p.offer > 0
        )
        for node in sorted(self.serving):
            peer = self.neighbours.get(node)
            if peer is None or peer.offer <= 0:
                self.serving.discard(node)
                if peer is not None:
                    changes.append((node, False))
        short = len(waiting) - max(0, self.upload_slots - len(self.serving))
        if short > 0:  # the idlest make room, as many as wait for one
            idle_since = now - self.rotate_every()
            last = {
                n: max(p.served_at, p.asked_at)
                for n in self.serving
                if not (p := self.neighbours[n]).uploads
            }
            for node in sorted(
                (n for n in last if last[n] < idle_since), key=lambda n: (last[n], n)
            )[:short]:
                self.serving.discard(node)
                changes.append((node, False))
        if waiting and now >= self._rotate_at and len(self.serving) >= self.upload_slots:
            oldest = min(sorted(self.serving), key=lambda n: self.neighbours[n].served_at)
            self.serving.discard(oldest)
            changes.append((oldest, False))
        if now >= self._rotate_at:
            self._rotate_at = now + self.rotate_every()
        for _, _, node in waiting[: self.upload_slots - len(self.serving)]:
            self.serving.add(node)
            self.neighbours[node].served_at = now
            changes.append((node, True))
        return changes

    @property
    def rotate_at(self) -> float:
        """When `rotate` next hands a slot on."""
        return self._rotate_at


def shortest_have_batch(exchanges: Iterable[Exchange]) -> float:
    """How long a Have waits for more on a host with these fetches: the shortest any
    of them asks for (`Exchange.have_batch`), HAVE_BATCH with none. A fetch that has
    not landed two blocks yet asks for the shortest of all; it counts only when no
    fetch knows its landing rate, so one fetch starting (or stalled) does not hurry
    every image's Haves."""
    fetching = list(exchanges)
    known = [ex for ex in fetching if ex.gap] or fetching
    return min((ex.have_batch() for ex in known), default=HAVE_BATCH)


class ActiveSet:
    """The neighbours one host keeps for one image: `degree` it looks for, and no more
    than twice that in all (others' links to it count), so links, messages and memory
    per host grow with `degree`, never with the cluster."""

    def __init__(self, degree: int, rng: random.Random) -> None:
        self.degree = degree
        self.rng = rng
        self.links: set[str] = set()

    @property
    def limit(self) -> int:
        """Links at most, ours and others' to us."""
        return 2 * self.degree

    def wanted(self) -> int:
        """How many more neighbours to look for."""
        return max(0, self.degree - len(self.links))

    def choose(self, offered: Iterable[str]) -> list[str]:
        """Of the hosts offered (fetching or holding the image), the ones to link to:
        a random sample, so the hosts form a random graph (few hops between any two)."""
        fresh = sorted(set(offered) - self.links)
        return self.rng.sample(fresh, min(self.wanted(), len(fresh)))

    def accept(self, node: str) -> bool:
        """May `node` link to us (and we to it)?"""
        return node in self.links or len(self.links) < self.limit

    def add(self, node: str) -> None:
        """A link is up."""
        self.links.add(node)

    def drop(self, node: str) -> None:
        """A link is gone."""
        self.links.discard(node)


class OriginLane:
    """Which blocks this host reads from the origin, and when.

    The readers (`readers`, in rank order) take the chunks in turn (see `owner`), so
    each reads the same number of chunks (give or take one) and a client streaming
    from the start finds neighbouring chunks read in parallel. A reader reads, in
    ascending order, the chunks of its share that no
    neighbour holds any block of and that are not in flight here; of a chunk some of
    whose blocks are around (a reader died mid-chunk, or a client's far-ahead read),
    it reads the missing blocks only.
    """

    def __init__(
        self,
        exchange: Exchange,
        self_id: str,
        image_key: str,
        members: Iterable[str],
        concurrency: int,
        stall: float,
        now: float,
        gather: float = GATHER,
        seeders: Collection[str] = (),
    ) -> None:
        self.exchange = exchange
        self.self_id = self_id
        # what neighbours hold decides what we read: not before their states are in
        self.ready_at = now + gather
        self.image_key = image_key
        self.concurrency = max(1, concurrency)
        self.stall = stall
        self.excluded: set[str] = set()  # hosts with another version (see exclude)
        self.members = {*members, self_id}
        self.seeders = frozenset(seeders)
        self.readers = readers(image_key, self.members, self.concurrency, self.seeders)
        self._share = self._my_share()
        self.progress_at = now  # when a block last arrived from anywhere
        self.stalled = False  # the swarm once brought nothing for `stall` seconds
        self._finishing: set[int] = set()  # half-spread chunks of our share we finish
        self._urgent_since: dict[int, float] = {}  # block a client waits for -> since when
        self.reading: dict[int, int] = {}  # first block of a read in flight -> its end
        self._cursor = 0  # chunks before it are settled for this lane

    @property
    def streams(self) -> int:
        """Origin reads this host keeps in flight: origin.concurrency shared by the readers."""
        return -(-self.concurrency // len(self.readers))

    def is_reader(self) -> bool:
        """This host reads its share from the origin."""
        return self.self_id in self.readers

    def replace(self, gone: str) -> bool:
        """A member is gone (left, down): if it was a reader, the next in rank takes its
        place (every host that sees it go picks the same one). True if the readers changed."""
        return self.set_members(self.members - {gone}, self.seeders)

    def exclude(self, node: str) -> bool:
        """`node` holds another version of this image: it reads nothing of ours for the
        rest of this fetch (the member table may name it again: it stays out). True if
        the readers changed."""
        self.excluded.add(node)
        return self.set_members(self.members, self.seeders)

    def set_members(self, members: Iterable[str], seeders: Collection[str] = ()) -> bool:
        """The member table changed (a host discovered or gone): the readers follow it,
        so hosts whose tables differed for a moment agree again once they do (a chunk
        that was nobody's in the meantime becomes its reader's). True if they changed."""
        self.members = {*members, self.self_id} - self.excluded
        self.seeders = frozenset(seeders)
        new = readers(self.image_key, self.members, self.concurrency, self.seeders)
        if new == self.readers:
            return False
        gone = [r for r in self.readers if r not in self.members]
        old_share = set(self._share)
        self.readers = new
        self._share = self._my_share()
        if gone:  # what a reader that went away left half spread is ours to finish now
            self._finishing.update(c for c in self._share if c not in old_share)
        return True

    def _my_share(self) -> list[int]:
        if self.self_id not in self.readers:
            return []
        return [c for c in range(self.exchange.geometry.chunks) if self.owner(c) == self.self_id]

    def owner(self, chunk: int) -> str:
        """The reader whose share chunk `chunk` is: the readers in rank order take the
        chunks in turn. Equal shares matter: the origin's link is full only while every
        reader still reads, and a reader also receives from peers on its one downlink,
        so one left with more than the others reads the last chunks alone and slowly
        (per-chunk rendezvous hashing gave 16 chunks to 4 readers as 6/5/4/1, and the
        swarm waited on the reader of 6). Hosts whose tables differ for a moment (a
        reader not yet discovered) may read a chunk twice or leave one to nobody until
        their tables agree again (`set_members`); the stall rule reads what is left."""
        return self.readers[chunk % len(self.readers)]

    def landed(self, now: float) -> None:
        """A block arrived: the swarm is alive."""
        self.progress_at = now

    def heard_all(self, now: float) -> None:
        """Every neighbour's state is in (or there is none): the lane may start."""
        self.ready_at = min(self.ready_at, now)

    def next_read(self, now: float) -> tuple[int, int] | None:
        """A run of blocks [first, end) to read from the origin now (marked in flight
        in the exchange), or None."""
        if len(self.reading) >= self.streams or now < self.ready_at:
            return None
        ex = self.exchange
        quiet = now - self.progress_at
        hushed = quiet > ex.quiet_after()
        if (
            not self._share
            and not ex._urgent
            and not self.stalled
            and quiet <= self.stall
            and (ex.neighbours or quiet <= ALONE)
        ):
            return None  # not a reader, nobody waits, the swarm is alive
        geo = ex.geometry
        # a client waits for it, far ahead, and no neighbour has it: at once
        first_missing = self._first_missing()
        if first_missing is None:
            return None
        far = geo.chunk_of(first_missing) + FAR_AHEAD
        for b in ex.urgent():
            if ex.state[b] != MISSING:
                continue
            chunk = geo.chunk_of(b)
            # a client has waited URGENT_WAIT for it, no neighbour that serves us holds
            # it (its reader refuses us), and the swarm has gone quiet: read it, held
            # elsewhere or not. While blocks keep coming the swarm is working, only
            # slowly (a slow link, many hosts): every waiting host reading the same
            # blocks from the origin would take the origin's link from the readers
            since = self._urgent_since.setdefault(b, now)
            late = now - since > URGENT_WAIT and not ex.served(b) and hushed
            if late or (not ex.count[b] and (chunk >= far or self._mine(chunk))):
                return self._take(chunk, b, anyway=late)
        # once the swarm left us without a block for `stall`, we do not wait again:
        # the rest is read wherever no neighbour serves it (a reader that refuses us,
        # a neighbour that never gives us a slot)
        # (alone, with no neighbour at all for ALONE: nobody will bring anything)
        alone = not ex.neighbours and quiet > ALONE
        self.stalled = stalled = self.stalled or quiet > self.stall or alone
        start = geo.chunk_of(first_missing)
        # Our share; once the swarm has brought nothing for `stall`, everything. Of a
        # chunk some of whose blocks are around, only once the swarm is quiet: someone
        # is reading it (a helper), or a reader that died left it half spread; then
        # we read what nobody holds, not what is around.
        share = self._share
        for chunk in range(start, geo.chunks) if stalled else share[bisect_left(share, start) :]:
            if ex.seen[chunk] and chunk not in self._finishing:
                if not hushed:
                    continue
                # quiet: every half-spread chunk of our share is ours to finish now,
                # each in as many reads as it has gaps, without waiting again
                self._finishing.update(c for c in share if ex.seen[c])
            for b in geo.blocks_of(chunk):
                unserved = not ex.served(b) if stalled else not ex.count[b]
                if ex.state[b] == MISSING and unserved:
                    return self._take(chunk, b, stalled)
        # helping only once the swarm is quiet: a reader that is merely busy would
        # read what we take at the same moment
        return None if stalled or not hushed else self._help(start)

    def _help(self, start: int) -> tuple[int, int] | None:
        """Our share is read: take an untouched chunk of the reader with the most left
        (a slow host, or one that started late), from the top of its share, since it
        reads from the bottom; never its next BACKLOG ones, nor as many as it may have
        in flight. Only a reader we are linked to (readers link to each other), whose
        holdings we see. Each of its chunks may be taken by one helper only (by the
        chunk's place, round the other readers), so readers done at the same moment
        never pick the same chunk."""
        count = len(self.readers)
        if count < 2 or not self.is_reader():
            return None
        ex, geo = self.exchange, self.exchange.geometry
        backlog: dict[str, list[int]] = {r: [] for r in self.readers}
        for chunk in range(start, geo.chunks):
            blocks = geo.blocks_of(chunk)
            if not ex.seen[chunk] and all(ex.state[b] == MISSING for b in blocks):
                backlog[self.owner(chunk)].append(chunk)
        keep = BACKLOG + self.streams  # its next chunk, and the ones it may be reading
        for owner in sorted(backlog, key=lambda o: -len(backlog[o])):
            if owner == self.self_id or len(backlog[owner]) <= keep:
                continue
            if owner not in ex.neighbours:
                continue  # we cannot see what it has read: helping would read it twice
            helpers = [r for r in self.readers if r != owner]
            for chunk in reversed(backlog[owner][keep:]):
                if _top(f"{self.image_key}\0{chunk}\0help", helpers) == self.self_id:
                    return self._take(chunk, geo.blocks_of(chunk)[0])
        return None

    def _mine(self, chunk: int) -> bool:
        return self.owner(chunk) == self.self_id

    def _first_missing(self) -> int | None:
        state = self.exchange.state
        n = len(state)
        while self._cursor < n and state[self._cursor] == HAVE:
            self._cursor += 1
        return self._cursor if self._cursor < n else None

    def _take(self, chunk: int, first: int, anyway: bool = False) -> tuple[int, int]:
        """Read from `first` to the end of the run of missing blocks no neighbour holds
        (`anyway`: that no neighbour serving us holds)."""
        ex = self.exchange
        end = first
        for b in ex.geometry.blocks_of(chunk):
            if b < first:
                continue
            if ex.state[b] != MISSING or (ex.served(b) if anyway else ex.count[b]):
                break
            end = b + 1
        for b in range(first, end):
            ex.state[b] = INFLIGHT
        self.reading[first] = end
        return first, end

    def read_done(self, first: int, failed_from: int | None = None) -> None:
        """The origin read that began at `first` ended; blocks from `failed_from` on
        did not arrive (None: all did, each reported to the exchange as landed)."""
        end = self.reading.pop(first)
        if failed_from is None:
            return
        ex = self.exchange
        for b in range(failed_from, end):
            if ex.state[b] == INFLIGHT and b not in ex.sources:
                ex.state[b] = MISSING
