"""A discrete-event simulator of a swarm, driving the daemon's own exchange code.

Theory of operation. Every simulated host owns a real `swarmcache.exchange.Exchange`
and `OriginLane`, exactly as a daemon's fetch does; the simulator only stands in for
the network, the clock and the disk. A host's link is two FIFO servers, its uplink
and its downlink, each at the host's rate. A block sent from A to B passes A's
uplink, then B's downlink (cut-through: it arrives when the later of the two has
carried it), plus the one-way latency; so no link ever carries more than its rate,
and a host receiving from many neighbours at once is held to its own downlink. The
origin is a host with an uplink of its own; an origin read of a run of blocks is
its blocks one after another. Requests, Have batches and states travel with the
latency and cost no bandwidth (they are counted as control messages).

Hosts join at given times: each asks for `degree` random neighbours among the hosts
already fetching (what the image's readers answer a joining host, see the daemon),
links are both ways, and a host takes at most `2 * degree` links. A host below
`degree` asks again now and then. A host can be slow (its rates scaled), can leave
(others notice at once) or die (others notice after `detect` seconds; what it was
sending never arrives). What comes out: when each host held every block, what the
origin sent, control messages and links per host.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarmcache.config import PeersConfig
from swarmcache.exchange import (
    BLOCK_SIZE,
    GATHER,
    LAZY_HAVE,
    MAX_INFLIGHT,
    PIPELINE,
    ROTATE,
    UPLOAD_SLOTS,
    ActiveSet,
    Exchange,
    Geometry,
    OriginLane,
)

MiB = 1024 * 1024
ORIGIN = "origin"


@dataclass
class SimConfig:
    """One simulated storm."""

    hosts: int
    size: int  # image bytes
    rate: float  # bytes/s of every host link, each direction
    chunk_size: int = 4 * MiB
    block_size: int = BLOCK_SIZE
    origin_rate: float | None = None  # bytes/s of the origin's uplink (None: `rate`)
    latency: float = 0.0002  # one-way seconds between any two hosts
    degree: int = PeersConfig().degree  # neighbours a host looks for (ActiveSet)
    concurrency: int = 4  # origin streams in all (origin.concurrency)
    slots: int = PeersConfig().concurrency  # Exchange: requests in flight per neighbour
    max_inflight: int = MAX_INFLIGHT  # Exchange: requests in flight per host
    upload_slots: int = UPLOAD_SLOTS  # Exchange: neighbours a host uploads to at once
    pipeline: int = PIPELINE  # Exchange: requests in flight at least over all neighbours
    # seconds a host gathers Have entries before sending; None: as the daemon does
    # (Exchange.have_batch: about 4 blocks' landing time, 1-20 ms)
    have_batch: float | None = None
    refresh: float = 1.0  # seconds between looks for more neighbours
    stall: float = 30.0  # OriginLane.stall
    detect: float = 2.0  # seconds before others notice a dead host
    join: dict[int, float] = field(default_factory=dict)  # host -> join time (default 0)
    slow: dict[int, float] = field(default_factory=dict)  # host -> rate factor
    dies: dict[int, float] = field(default_factory=dict)  # host -> time it dies
    leaves: dict[int, float] = field(default_factory=dict)  # host -> time it leaves
    seed: int = 1
    until: float = 3600.0  # simulated seconds at most


@dataclass
class HostResult:
    """What one host saw."""

    name: str
    joined: float
    done: float | None
    messages: int  # control messages sent
    max_links: int
    bytes_in: int
    bytes_out: int
    origin_bytes: int


@dataclass
class SimResult:
    """What a run produced."""

    config: SimConfig
    hosts: list[HostResult]
    origin_bytes: int
    origin_end: float  # when the origin sent its last byte
    in_flight: int  # bytes sent (by the origin or a host) that had not arrived at the end
    events: int
    end: float

    @property
    def limit(self) -> float:
        """The physical limit: image size over link rate."""
        return self.config.size / self.config.rate

    @property
    def finishers(self) -> list[HostResult]:
        """Hosts that neither died nor left."""
        gone = set(self.config.dies) | set(self.config.leaves)
        return [h for i, h in enumerate(self.hosts) if i not in gone]

    @property
    def last(self) -> float:
        """Time from the first join to the last host holding the image (inf if one never did)."""
        done = [h.done for h in self.finishers]
        if any(d is None for d in done):
            return float("inf")
        return max(d for d in done if d is not None)


class _Host:
    def __init__(self, sim: Simulator, index: int) -> None:
        cfg = sim.cfg
        self.sim = sim
        self.index = index
        self.name = f"h{index:04d}"
        factor = cfg.slow.get(index, 1.0)
        self.up_rate = cfg.rate * factor
        self.down_rate = cfg.rate * factor
        self.up_free = 0.0
        self.down_free = 0.0
        self.joined = cfg.join.get(index, 0.0)
        self.alive = False
        self.gone_at: float | None = None
        self.done: float | None = None
        self.links: ActiveSet | None = None
        self.max_links = 0
        self.messages = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.origin_bytes = 0
        self.pending_have: dict[str, list[int]] = {}  # link -> blocks it lacks, to tell
        self.lazy_have: dict[str, list[int]] = {}  # link -> blocks it holds, to tell later
        self.lazy_due = False
        self.reads: dict[int, int] = {}
        self.awaiting: set[str] = set()  # origin reads in flight: first block -> end
        self.flush_due = False
        self.exchange: Exchange | None = None
        self.lane: OriginLane | None = None


class Simulator:
    """Runs one SimConfig (see the module docstring)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.geo = Geometry(cfg.size, cfg.chunk_size, cfg.block_size)
        self.now = 0.0
        self.events = 0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.hosts = [_Host(self, i) for i in range(cfg.hosts)]
        self.by_name = {h.name: h for h in self.hosts}
        self.joined: list[_Host] = []
        self.origin_up_free = 0.0
        self.origin_rate = cfg.origin_rate or cfg.rate
        self.origin_bytes = 0
        self.in_flight = 0  # bytes sent, not arrived (or dropped) yet
        self.members = [h.name for h in self.hosts]  # the member table every host shares
        self._noticed_gone: set[str] = set()

    # -- the event loop -------------------------------------------------------------

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) at simulated time `when`."""
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, fn, args))

    def run(self) -> SimResult:
        """Simulate until every live host holds the image (or `until`)."""
        for h in self.hosts:
            self.at(h.joined, self._join, h)
        for i, t in self.cfg.dies.items():
            self.at(t, self._die, self.hosts[i], False)
        for i, t in self.cfg.leaves.items():
            self.at(t, self._die, self.hosts[i], True)
        while self._queue:
            when, _, fn, args = heapq.heappop(self._queue)
            if when > self.cfg.until:
                break
            self.now = when
            self.events += 1
            fn(*args)
            if self._all_done():
                break
        return SimResult(
            self.cfg,
            [
                HostResult(
                    h.name,
                    h.joined,
                    h.done,
                    h.messages,
                    h.max_links,
                    h.bytes_in,
                    h.bytes_out,
                    h.origin_bytes,
                )
                for h in self.hosts
            ],
            self.origin_bytes,
            self.origin_up_free,
            self.in_flight,
            self.events,
            self.now,
        )

    def _all_done(self) -> bool:
        return all(h.done is not None or h.gone_at is not None for h in self.hosts) and bool(
            self.joined
        )

    # -- membership -------------------------------------------------------------------

    def _join(self, h: _Host) -> None:
        cfg = self.cfg
        if h.alive or h.joined < self.now:
            return  # nudged earlier than its own start, or the other way round
        h.alive = True
        h.links = ActiveSet(cfg.degree, random.Random(self.rng.random()))
        h.exchange = Exchange(
            self.geo,
            (),
            random.Random(self.rng.random()),
            slots=cfg.slots,
            max_inflight=cfg.max_inflight,
            upload_slots=cfg.upload_slots,
            pipeline=cfg.pipeline,
        )
        h.lane = OriginLane(
            h.exchange,
            h.name,
            "image",
            [m for m in self.members if m != h.name],
            cfg.concurrency,
            cfg.stall,
            self.now,
        )
        for dead in list(self._noticed_gone):
            h.lane.replace(dead)
        self.joined.append(h)
        # a host that starts a fetch tells the image's readers, who fetch it too
        for name in h.lane.readers:
            reader = self.by_name[name]
            if not reader.alive and reader.gone_at is None and reader.joined > self.now:
                reader.joined = self.now + 2 * cfg.latency
                self.at(reader.joined, self._join, reader)
        self._find_neighbours(h)
        h.awaiting = set(_links(h))  # states to hear before the origin lane starts
        if not h.awaiting:
            h.lane.heard_all(self.now)
        else:
            self.at(self.now + GATHER, self._pump, h)
        self.at(self.now + cfg.refresh, self._refresh, h)
        self.at(self.now + ROTATE, self._tick, h)  # no block landed yet: the shortest
        self._pump(h)

    def _find_neighbours(self, h: _Host) -> None:
        assert h.links is not None
        if not h.links.wanted():
            return
        # what the image's readers answer: hosts fetching it, that take more links
        offered = [
            o.name
            for o in self.joined
            if o is not h and o.alive and o.links is not None and o.links.accept(h.name)
        ]
        if len(self.hosts) > 1:
            h.messages += 1  # asks the image's readers, who answer with hosts fetching it
        chosen = h.links.choose(offered)
        assert h.lane is not None
        if h.lane.is_reader():  # readers link to each other (as the daemon does)
            chosen += [
                r
                for r in h.lane.readers
                if r != h.name
                and r not in chosen
                and r not in h.links.links
                and self.by_name[r].alive
            ]
        for name in chosen:
            self._link(h, self.by_name[name])

    def _link(self, a: _Host, b: _Host) -> None:
        assert a.links is not None
        assert b.links is not None
        a.links.add(b.name)
        b.links.add(a.name)
        a.max_links = max(a.max_links, len(a.links.links))
        b.max_links = max(b.max_links, len(b.links.links))
        # each side sends its state (bitmap) over the new link
        for src, dst in ((a, b), (b, a)):
            src.messages += 1
            assert src.exchange is not None
            bits = bytes(_bitmap(src.exchange))
            self.at(self.now + self.cfg.latency, self._state, dst, src.name, bits)

    def _refresh(self, h: _Host) -> None:
        if not h.alive or h.done is not None:
            return  # a host done keeps its links and serves; it looks for no more
        self._find_neighbours(h)
        self.at(self.now + self.cfg.refresh, self._refresh, h)
        self._pump(h)

    def _die(self, h: _Host, graceful: bool) -> None:
        h.alive = False
        h.gone_at = self.now
        delay = 0.0 if graceful else self.cfg.detect
        self.at(self.now + delay, self._notice_gone, h)

    def _notice_gone(self, h: _Host) -> None:
        self._noticed_gone.add(h.name)
        for o in self.joined:
            if o is h or not o.alive:
                continue
            assert o.exchange is not None
            assert o.lane is not None
            assert o.links is not None
            if h.name in o.links.links:
                o.links.drop(h.name)
                o.exchange.drop_neighbour(h.name)
            o.lane.replace(h.name)
            self._pump(o)

    # -- messages -----------------------------------------------------------------------

    def _state(self, h: _Host, node: str, bits: bytes) -> None:
        if not h.alive or node not in _links(h):
            return
        assert h.exchange is not None
        assert h.lane is not None
        h.exchange.add_neighbour(node, bits)
        h.awaiting.discard(node)
        if not h.awaiting:
            h.lane.heard_all(self.now)
        self._pump(h)

    def _have(self, h: _Host, node: str, blocks: list[int]) -> None:
        if not h.alive or node not in _links(h):
            return
        assert h.exchange is not None
        h.exchange.neighbour_has(node, blocks)
        self._pump(h)

    def _flush(self, h: _Host, lazy: bool = False) -> None:
        """Haves go out: to each neighbour the blocks it lacks, with the ones it holds
        riding along (those alone wait for the lazy flush, LAZY_HAVE)."""
        if lazy:
            h.lazy_due = False
        else:
            h.flush_due = False
        if not h.alive:
            return
        links = _links(h)
        for name in sorted(set(h.pending_have) | (set(h.lazy_have) if lazy else set())):
            blocks = h.pending_have.pop(name, []) + h.lazy_have.pop(name, [])
            if name not in links or not blocks:
                continue
            h.messages += 1
            self.at(self.now + self.cfg.latency, self._have, self.by_name[name], h.name, blocks)
        if h.lazy_have and not h.lazy_due:
            h.lazy_due = True
            self.at(self.now + LAZY_HAVE, self._flush, h, True)

    # -- data ---------------------------------------------------------------------------

    def _pump(self, h: _Host) -> None:
        """Let the host's exchange and origin lane ask for what they want now, and
        hand out its upload slots (a host that holds the image keeps serving)."""
        if not h.alive:
            return
        ex, lane = h.exchange, h.lane
        assert ex is not None
        assert lane is not None
        for node, serves in ex.rotate(self.now):
            h.messages += 1
            self.at(self.now + self.cfg.latency, self._served, self.by_name[node], h.name, serves)
        if h.done is not None:
            return
        for node, block in ex.next_requests(self.now):
            h.messages += 1
            self._send(self.by_name[node], h, block)
        while True:
            run = lane.next_read(self.now)
            if run is None:
                break
            h.messages += 1
            self._origin_read(h, *run)

    def _served(self, h: _Host, node: str, serves: bool) -> None:
        if not h.alive or node not in _links(h):
            return
        assert h.exchange is not None
        h.exchange.served_by(node, serves)
        self._pump(h)

    def _tick(self, h: _Host) -> None:
        """Upload slots turn as the daemon turns them (Exchange.rotate_every)."""
        if not h.alive:
            return
        self._pump(h)
        assert h.exchange is not None
        self.at(self.now + h.exchange.rotate_every(), self._tick, h)

    def _send(self, src: _Host, dst: _Host, block: int) -> None:
        """dst asked src for a block: through src's uplink, then dst's downlink."""
        _, length = self.geo.block_span(block)
        arrival = self.now + self.cfg.latency
        assert src.exchange is not None
        if not src.exchange.may_serve(dst.name, self.now):  # choked meanwhile: try later
            src.messages += 1
            until = arrival + self.cfg.latency
            self.at(until, self._refused, dst, src.name, block, until)
            return
        start = max(arrival, src.up_free)
        src.up_free = start + length / src.up_rate
        src.bytes_out += length
        self.in_flight += length
        self.at(start, self._downlink, dst, src.name, block, length, src.up_free)
        self.at(src.up_free, self._sent, src, dst.name)

    def _sent(self, h: _Host, node: str) -> None:
        if h.alive and h.exchange is not None:
            h.exchange.sent(node, self.now)

    def _refused(self, h: _Host, node: str, block: int, until: float) -> None:
        if not h.alive or node not in _links(h):
            return
        assert h.exchange is not None
        h.exchange.refused(block, node, self.now, until)
        peer = h.exchange.neighbours.get(node)
        if peer is not None:
            self.at(peer.busy_until, self._pump, h)
        self._pump(h)

    def _downlink(self, h: _Host, node: str, block: int, length: int, sent: float) -> None:
        """A block starts to reach h's downlink (in the order blocks start, so the
        downlink never idles while one waits): it is charged its share of the link
        and arrives once both links have carried it."""
        start = max(self.now, h.down_free)
        h.down_free = start + length / h.down_rate
        arrive = max(h.down_free, sent) + self.cfg.latency
        if node == ORIGIN:
            self.at(arrive, self._origin_block, h, block, length)
        else:
            self.at(arrive, self._arrive, h, node, block, length, sent)

    def _arrive(self, h: _Host, node: str, block: int, length: int, sent: float) -> None:
        self.in_flight -= length
        src = self.by_name[node]
        if src.gone_at is not None and src.gone_at < sent:
            return  # it died before sending it: the request is lost (noticed later)
        if not h.alive:
            return
        assert h.exchange is not None
        if node not in _links(h):
            return  # dropped meanwhile: drop_neighbour already put it back
        h.bytes_in += length
        self._landed(h, block, node)

    def _origin_read(self, h: _Host, first: int, end: int) -> None:
        t = self.now + self.cfg.latency  # the request reaches the origin
        h.reads[first] = end
        for block in range(first, end):
            _, length = self.geo.block_span(block)
            start = max(t, self.origin_up_free)
            self.origin_up_free = start + length / self.origin_rate
            self.origin_bytes += length
            self.in_flight += length
            h.origin_bytes += length
            self.at(start, self._downlink, h, ORIGIN, block, length, self.origin_up_free)

    def _origin_block(self, h: _Host, block: int, length: int) -> None:
        self.in_flight -= length
        if not h.alive:
            return
        assert h.lane is not None
        h.bytes_in += length
        self._landed(h, block, None)
        for first, end in list(h.reads.items()):
            if block == end - 1:
                del h.reads[first]
                h.lane.read_done(first)
                self._pump(h)

    def _landed(self, h: _Host, block: int, node: str | None) -> None:
        ex, lane = h.exchange, h.lane
        assert ex is not None
        assert lane is not None
        was = ex.has(block)
        ex.landed(block, node, self.now)
        lane.landed(self.now)
        if not was:
            for name in sorted(_links(h)):
                told = h.lazy_have if ex.neighbour_holds(name, block) else h.pending_have
                told.setdefault(name, []).append(block)
            if not h.flush_due and h.pending_have:
                h.flush_due = True
                batch = self.cfg.have_batch
                self.at(self.now + (ex.have_batch() if batch is None else batch), self._flush, h)
        if ex.finished and h.done is None:
            h.done = self.now
            self._flush(h, lazy=True)  # the last Haves go out now
            return
        self._pump(h)


def _links(h: _Host) -> set[str]:
    return h.links.links if h.links is not None else set()


def _bitmap(ex: Exchange) -> bytearray:
    bits = bytearray((ex.geometry.blocks + 7) // 8)
    for b in range(ex.geometry.blocks):
        if ex.has(b):
            bits[b >> 3] |= 1 << (b & 7)
    return bits


def simulate(cfg: SimConfig) -> SimResult:
    """Run one simulated storm."""
    return Simulator(cfg).run()


def _rate(text: str) -> float:
    """'1gbit', '200mbit', '10gbit' -> bytes/s."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * scale / 8
    return float(text)


def report(res: SimResult) -> str:
    """One line of figures for a run."""
    cfg = res.config
    done = [h.done for h in res.finishers if h.done is not None]
    msgs = [h.messages for h in res.hosts]
    links = [h.max_links for h in res.hosts]
    return (
        f"hosts={cfg.hosts} size={cfg.size // MiB}MiB rate={cfg.rate * 8 / 1e6:g}Mbit/s "
        f"limit={res.limit:.2f}s last={res.last:.2f}s ({res.last / res.limit:.3f}x) "
        f"median={statistics.median(done) if done else float('nan'):.2f}s "
        f"origin={res.origin_bytes / cfg.size:.3f}x (done {res.origin_end:.2f}s) "
        f"msgs/host mean={statistics.mean(msgs):.0f} max={max(msgs)} "
        f"links/host max={max(links)} events={res.events}"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m swarmtools.sim`: one run, figures on stdout."""
    p = argparse.ArgumentParser(prog="swarmtools.sim", description=__doc__)
    p.add_argument("--hosts", type=int, default=100)
    p.add_argument("--size", type=int, default=1024, help="image MiB")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--origin-rate", default=None)
    p.add_argument("--latency", type=float, default=0.0002)
    p.add_argument("--degree", type=int, default=PeersConfig().degree)
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE // 1024, help="KiB")
    p.add_argument("--chunk-size", type=int, default=4, help="MiB")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    cfg = SimConfig(
        hosts=a.hosts,
        size=a.size * MiB,
        rate=_rate(a.rate),
        origin_rate=_rate(a.origin_rate) if a.origin_rate else None,
        latency=a.latency,
        degree=a.degree,
        block_size=a.block_size * 1024,
        chunk_size=a.chunk_size * MiB,
        seed=a.seed,
    )
    print(report(simulate(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
