"""Pure peer table: who is out there, how they behave, whom to ask.

Peers come from mDNS, from `discovery.static_peers` and from peers that connect to
us (their Hello says where to reach them). Each has a state:

- ok: usable;
- down: it failed `DOWN_AFTER` requests in a row; tried again after a backoff that
  doubles up to MAX_BACKOFF;
- quarantined: it sent bytes that failed their digest; not used until the
  quarantine (peers.quarantine) ends.

The measured rate (an EWMA of bytes per second over chunk transfers) ranks peers
that hold the same chunk. No I/O and no clock: `now` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DOWN_AFTER = 3
MAX_BACKOFF = 60.0
RATE_WEIGHT = 0.3  # weight of the newest transfer in the rate EWMA
FORGET_AFTER = 600.0  # a peer unseen for this long (and not static) is dropped


@dataclass
class Peer:
    """One other daemon."""

    node_id: str
    host: str
    port: int
    source: str  # mdns | static | inbound
    last_seen: float
    generation: int = 0
    images: int = 0  # images and chunks it says it holds (mDNS TXT or hello)
    chunks: int = 0
    errors: int = 0  # consecutive failures
    down_until: float = 0.0
    quarantined_until: float = 0.0
    quarantines: int = 0
    rate: float = 0.0  # bytes/s, 0 = not measured yet
    inflight: int = 0
    bytes_received: int = 0
    gone: bool = False  # said goodbye (mDNS) or vanished; kept for the table until forgotten
    seeder: bool = False  # daemon.role = "seeder": it reads the origin for everyone

    @property
    def address(self) -> str:
        """host:port (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def state(self, now: float) -> str:
        """ok | down | quarantined | gone."""
        if self.quarantined_until > now:
            return "quarantined"
        if self.gone:
            return "gone"
        if self.down_until > now:
            return "down"
        return "ok"

    def usable(self, now: float) -> bool:
        """May chunks be asked of this peer now."""
        return self.state(now) == "ok"

    def describe(self, now: float) -> dict[str, Any]:
        """The JSON form for `GET /v1/peers` and `swarmcache peers`."""
        return {
            "node_id": self.node_id,
            "address": self.address,
            "source": self.source,
            "role": "seeder" if self.seeder else "host",
            "state": self.state(now),
            "last_seen_s": round(max(0.0, now - self.last_seen), 1),
            "generation": self.generation,
            "images": self.images,
            "chunks": self.chunks,
            "rate_bytes_per_s": round(self.rate),
            "bytes_received": self.bytes_received,
            "errors": self.errors,
            "quarantines": self.quarantines,
            "inflight": self.inflight,
        }


@dataclass
class PeerTable:
    """Every known peer by node id."""

    self_id: str
    peers: dict[str, Peer] = field(default_factory=dict)

    def seen(
        self,
        node_id: str,
        host: str,
        port: int,
        source: str,
        now: float,
        generation: int | None = None,
        inventory: tuple[int, int] | None = None,
        seeder: bool | None = None,
    ) -> Peer | None:
        """Add or refresh a peer (None for ourselves); returns the entry."""
        if node_id == self.self_id:
            return None
        peer = self.peers.get(node_id)
        if peer is None:
            peer = self.peers[node_id] = Peer(node_id, host, port, source, now)
        elif source == "inbound" and peer.source != "inbound":
            # a Hello must not move a peer we found ourselves (mDNS, static) elsewhere
            peer.last_seen = now
        else:
            peer.host, peer.port, peer.last_seen = host, port, now
            peer.source = source
        peer.gone = False
        if generation is not None:
            peer.generation = generation
        if inventory is not None:
            peer.images, peer.chunks = inventory
        if seeder is not None:
            peer.seeder = seeder
        return peer

    def gone(self, node_id: str) -> None:
        """The peer said goodbye or its record expired."""
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.gone = True

    def get(self, node_id: str) -> Peer | None:
        """The peer, if known."""
        return self.peers.get(node_id)

    def usable(self, now: float) -> list[Peer]:
        """Peers chunks may be asked of now."""
        return [p for p in self.peers.values() if p.usable(now)]

    def succeeded(self, node_id: str, nbytes: int, seconds: float, now: float) -> None:
        """A transfer from the peer worked: clear its errors, update its rate."""
        peer = self.peers.get(node_id)
        if peer is None:
            return
        peer.errors = 0
        peer.down_until = 0.0
        peer.last_seen = now
        peer.bytes_received += nbytes
        if seconds > 0 and nbytes > 0:
            sample = nbytes / seconds
            peer.rate = (
                sample if peer.rate == 0 else (1 - RATE_WEIGHT) * peer.rate + (RATE_WEIGHT * sample)
            )

    def failed(self, node_id: str, now: float) -> bool:
        """A request to the peer failed; True if it is now marked down."""
        peer = self.peers.get(node_id)
        if peer is None:
            return False
        peer.errors += 1
        if peer.errors >= DOWN_AFTER:
            peer.down_until = now + min(MAX_BACKOFF, 2.0 ** (peer.errors - DOWN_AFTER))
            return True
        return False

    def quarantine(self, node_id: str, now: float, seconds: float) -> None:
        """The peer sent bytes that failed verification: stop using it for a while."""
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.quarantined_until = now + seconds
            peer.quarantines += 1

    def expire(self, now: float) -> list[str]:
        """Forget peers gone or down and not seen for FORGET_AFTER; returns their ids.

        Static peers stay; a live peer that is merely quiet (mDNS does not report
        unchanged records) is never forgotten.
        """
        old = [
            n
            for n, p in self.peers.items()
            if p.source != "static"
            and (p.gone or p.down_until > 0)
            and now - p.last_seen > FORGET_AFTER
            and p.inflight == 0
        ]
        for node_id in old:
            del self.peers[node_id]
        return old

    def rank(self, node_ids: list[str], now: float, limit: int) -> str | None:
        """Of these holders, the usable one to ask next: free slots, then fastest."""
        best: tuple[float, str] | None = None
        for node_id in node_ids:
            peer = self.peers.get(node_id)
            if peer is None or not peer.usable(now) or peer.inflight >= limit:
                continue
            # expected wait: queued transfers over the measured rate (unmeasured peers
            # are tried at a rate that ranks them above slow ones, below fast ones)
            rate = peer.rate or 10 * 1024**2
            score = (peer.inflight + 1) / rate
            if best is None or score < best[0]:
                best = (score, node_id)
        return best[1] if best else None
