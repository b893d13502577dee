"""Pure fetch planning: which missing chunk a free worker takes next.

Theory of operation. Every chunk of the image being fetched is in one of three
states: MISSING, INFLIGHT (a worker is fetching it) or DONE (durable and verified).
A free worker asks `next()`. Chunks a client is waiting for right now (a Range
read or a stream that caught up with the fetch) were passed to `want()` and go
first, in the order asked; otherwise the lowest-numbered missing chunk goes, so a
hypervisor streaming the image from the start rarely waits. A chunk whose fetch
failed goes back to MISSING (and to the front, if it was wanted) for another try,
from another source once there are several.

No I/O and no clock: the async executor (fetcher.py) drives it, tests drive it
directly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import xxhash

MISSING, INFLIGHT, DONE = 0, 1, 2


class ChunkPlan:
    """The chunk-by-chunk state of one image fetch."""

    def __init__(self, chunks: int, present: Iterable[int] = ()) -> None:
        self.state = bytearray(chunks)
        for i in present:
            self.state[i] = DONE
        self.remaining = self.state.count(MISSING)
        self._cursor = 0
        self._urgent: deque[int] = deque()
        self._urgent_set: set[int] = set()

    @property
    def finished(self) -> bool:
        """Every chunk is DONE."""
        return self.remaining == 0

    def want(self, indices: Iterable[int]) -> None:
        """A client waits for these chunks: fetch them before anything else."""
        for i in indices:
            if self.state[i] == MISSING and i not in self._urgent_set:
                self._urgent.append(i)
                self._urgent_set.add(i)

    def next(self) -> int | None:
        """The chunk to fetch next (now INFLIGHT), or None if none is MISSING."""
        while self._urgent:
            i = self._urgent.popleft()
            self._urgent_set.discard(i)
            if self.state[i] == MISSING:
                self.state[i] = INFLIGHT
                return i
        n = len(self.state)
        while self._cursor < n and self.state[self._cursor] != MISSING:
            self._cursor += 1
        if self._cursor == n:
            return None
        i = self._cursor
        self.state[i] = INFLIGHT
        return i

    def done(self, index: int) -> None:
        """Chunk `index` is durable and verified."""
        if self.state[index] != DONE:
            self.state[index] = DONE
            self.remaining -= 1
        self._landed_chunk(index)

    def _landed_chunk(self, index: int) -> None:
        """Hook for subclasses: chunk `index` is done."""

    def hold(self, index: int) -> None:
        """Keep workers off a MISSING chunk that something else settles (done or failed)."""
        if self.state[index] == MISSING:
            self.state[index] = INFLIGHT

    def failed(self, index: int) -> None:
        """The fetch of chunk `index` failed: it is MISSING again."""
        if self.state[index] == INFLIGHT:
            self.state[index] = MISSING
            self._cursor = min(self._cursor, index)


ORIGIN = ""  # the source id of the origin in SwarmPlan's answers
FAR_AHEAD = 4  # chunks per fetcher past the first missing one: "far ahead" for a reader
STEAL_BACKLOG = 2  # chunks another fetcher must have left before we take one of its
TAKES_KEPT = 64  # a peer's latest origin reads remembered (how fast it takes chunks)
CANDIDATES = 64  # chunks looked at per peer assignment (rarest of these first)
RELAY_FANOUT = 2  # peers that stream a chunk from its reader (see stream_source)
HANDOVER = 0.25  # seconds before a chunk newly ours (the fetchers changed) is read


def _point(key: str) -> int:
    return xxhash.xxh64_intdigest(key.encode())


def _bit(bitmap: bytearray | bytes, index: int) -> bool:
    return bool(bitmap[index >> 3] & (1 << (index & 7)))


class SwarmPlan(ChunkPlan):
    """ChunkPlan for a fetch that can use peers: which chunk, and from whom.

    Two lanes ask it for work. The peer lane (`next_peer`) takes missing chunks that
    some peer holds, wanted ones first, then the rarest of the lowest missing ones,
    from the holder `pick` prefers (free slots, measured speed). The origin lane
    (`next_origin`) takes only chunks no peer holds, and of those only the ones this
    host owns: the hosts fetching the image (sorted by node id) own the chunks in
    turn, so hosts that start together split the image evenly without a tracker and
    the origin sends each chunk about once. When the fetchers change, the hosts
    learn it a few milliseconds apart and for that moment disagree on who owns what:
    a chunk that became ours is read only `handover` seconds later (by then its old
    owner has either announced that it is taking it or stopped wanting it). A peer
    that announced it is taking a chunk from the origin is waited for until that
    chunk's deadline; a fetcher that shows no progress for `stall` seconds is taken
    off the rota. With no peers at all this is ChunkPlan: everything from the origin,
    in order.
    """

    def __init__(
        self,
        chunks: int,
        present: Iterable[int],
        self_id: str,
        image_key: str,
        stall: float,
        handover: float = HANDOVER,
    ) -> None:
        super().__init__(chunks, present)
        self.self_id = self_id
        self.image_key = image_key
        self.stall = stall
        self.holders: dict[str, bytearray] = {}
        self.count = [0] * chunks  # holders per chunk
        self.fetchers: dict[str, float] = {}  # peer fetching this image -> last progress
        self.taken: dict[int, tuple[str, float]] = {}  # chunk -> (peer, deadline)
        self.mine = bytearray(b"\x01" * chunks)  # 1: this host reads the chunk from the origin
        self.handover = handover  # seconds: how long hosts may disagree on the fetchers
        # when each chunk became ours (-inf: from the start); read from handover on
        self.became = [float("-inf")] * chunks
        self._changes: list[float] = []  # times chunks became ours, handover not over
        self._changed_at = float("-inf")  # the last of those
        self._known = False  # others may know our share (we placed it, or read from it)
        self._steal_retry: float | None = None  # when a helper may take more (see _steal)
        self._takes: dict[str, deque[float]] = {}  # peer -> when it took its last chunks
        self.no_relay: set[int] = set()  # chunks our relay could not stream: ask the taker

    # -- what peers tell us ------------------------------------------------------

    def peer_state(
        self,
        node: str,
        have: bytes,
        taking: Iterable[int],
        fetching: bool,
        now: float,
        deadline: float,
    ) -> None:
        """A peer's full state (answer to our subscription): replaces what we knew."""
        self._forget_holdings(node)
        bitmap = bytearray(have)
        if len(bitmap) != (len(self.state) + 7) // 8:
            bitmap = bytearray((len(self.state) + 7) // 8)
        self.holders[node] = bitmap
        for i in range(len(self.state)):
            if _bit(bitmap, i):
                self.count[i] += 1
        self.peer_taking(node, taking, now, deadline, recent=False)
        self.peer_fetching(node, fetching, now)

    def peer_has(self, node: str, indices: Iterable[int], now: float) -> None:
        """Chunks that became readable at a peer."""
        bitmap = self.holders.get(node)
        if bitmap is None:
            bitmap = self.holders[node] = bytearray((len(self.state) + 7) // 8)
        n = len(self.state)
        for i in indices:
            if 0 <= i < n and not _bit(bitmap, i):
                bitmap[i >> 3] |= 1 << (i & 7)
                self.count[i] += 1
            if self.taken.get(i, ("", 0.0))[0] == node:
                del self.taken[i]
        if node in self.fetchers:
            self.fetchers[node] = now

    def peer_taking(
        self, node: str, indices: Iterable[int], now: float, deadline: float, recent: bool = True
    ) -> None:
        """Chunks a peer started to read from the origin: wait for them until `deadline`.
        (`recent`: it started them just now, not at some time before.)"""
        n = len(self.state)
        takes = self._takes.setdefault(node, deque(maxlen=TAKES_KEPT))
        for i in indices:
            if 0 <= i < n and self.state[i] != DONE:
                self.taken[i] = (node, deadline)
                if recent:
                    takes.append(now)
        if node in self.fetchers:
            self.fetchers[node] = now

    def peer_fetching(self, node: str, fetching: bool, now: float) -> None:
        """A peer started or stopped fetching this image (it joins or leaves the rota)."""
        if fetching and node not in self.fetchers:
            self.fetchers[node] = now
            self._place(now)
        elif not fetching:
            # what it was taking will not come
            self.taken = {i: t for i, t in self.taken.items() if t[0] != node}
            if node in self.fetchers:
                del self.fetchers[node]
                self._place(now)

    def drop_peer(self, node: str, now: float) -> None:
        """The peer is gone, down or quarantined: nothing of it counts any more."""
        self._forget_holdings(node)
        self.taken = {i: t for i, t in self.taken.items() if t[0] != node}
        if self.fetchers.pop(node, None) is not None:
            self._place(now)

    def _landed_chunk(self, index: int) -> None:
        self.taken.pop(index, None)

    def holders_of(self, index: int) -> list[str]:
        """Peers that hold chunk `index`."""
        return [n for n, b in self.holders.items() if _bit(b, index)]

    def _forget_holdings(self, node: str) -> None:
        bitmap = self.holders.pop(node, None)
        if bitmap is None:
            return
        for i in range(len(self.state)):
            if _bit(bitmap, i):
                self.count[i] -= 1

    def _place(self, now: float) -> None:
        """Recompute which chunks this host reads from the origin.

        The hosts fetching the image, sorted by node id, take the chunks in turn from
        an offset given by the image: an even split (within one chunk) that every
        host with the same view computes alike, and neighbouring chunks come from
        different hosts, so a reader streaming from the start finds them in parallel.
        A chunk that was not ours before is read only once the handover has passed
        from now; chunks that stay ours keep their time. Until we first placed our
        share or read from the origin, nothing was ours (others did not know of us).
        """
        n = len(self.state)
        if not self.fetchers:
            mine = bytearray(b"\x01" * n)
        else:
            hosts = sorted((self.self_id, *self.fetchers))
            me, count = hosts.index(self.self_id), len(hosts)
            base = _point(self.image_key) % count
            mine = bytearray((i + base) % count == me for i in range(n))
        old = self.mine if self._known else bytearray(n)
        new = [i for i in range(n) if mine[i] and not old[i]]
        for i in new:
            self.became[i] = now
        if new:
            self._changes.append(now)
            self._changed_at = now
        self.mine = mine
        self._known = True

    @property
    def handover_at(self) -> float:
        """When the chunks that became ours at the last change of fetchers may be read."""
        return self._changed_at + self.handover

    def owner(self, index: int) -> str:
        """The fetcher that reads chunk `index` from the origin (for tests and logs)."""
        hosts = sorted((self.self_id, *self.fetchers))
        return hosts[(index + _point(self.image_key) % len(hosts)) % len(hosts)]

    # -- the two lanes -------------------------------------------------------------

    def next_peer(
        self, pick: Callable[[list[str]], str | None], now: float, streams: bool = False
    ) -> tuple[int, str, bool] | None:
        """A missing chunk to read from a peer (now INFLIGHT): (index, peer, streamed).

        Without `streams`: a chunk some peer holds, wanted ones first, then the rarest
        of the lowest missing ones. With `streams`: a chunk no peer holds yet but a peer
        is reading from the origin and streams on as it arrives (cut-through), so it
        reaches every host at about the time it reaches the first.
        """
        for i in self._urgent_missing():
            task = self._peer_task(i, pick, now, streams)
            if task is not None:
                return task
        candidates: list[int] = []
        n = len(self.state)
        i = self._cursor
        while i < n and len(candidates) < CANDIDATES:
            if self.state[i] == MISSING and (
                self._streamable(i, now) if streams else self.count[i]
            ):
                candidates.append(i)
            i += 1
        if not streams:
            candidates.sort(key=lambda c: self.count[c])  # rarest first (stable: lowest next)
        for i in candidates:
            task = self._peer_task(i, pick, now, streams)
            if task is not None:
                return task
        return None

    def _peer_task(
        self, index: int, pick: Callable[[list[str]], str | None], now: float, streams: bool
    ) -> tuple[int, str, bool] | None:
        if streams:
            if self.count[index] or not self._streamable(index, now):
                return None
            node = pick([self.stream_source(index)])
        elif self.count[index]:
            node = pick(self.holders_of(index))
        else:
            return None
        if node is None:
            return None
        self.state[index] = INFLIGHT
        return index, node, streams

    def stream_source(self, index: int) -> str:
        """Whom to stream chunk `index` from while a peer reads it from the origin.

        Not always the peer reading it: then its uplink would carry the chunk once per
        other fetcher, which near the end (when origin reads speed up) takes seconds.
        The other fetchers, in ring order after the reader: the first RELAY_FANOUT
        stream it from the reader and pass it on as it arrives to the rest, in turn
        (cut-through at both hops). Every host with the same view computes the same
        tree; a relay serves only what it streams from the reader itself (no chains,
        so differing views cannot make a cycle), and one that cannot serve it
        (`relay_failed`) sends us to the reader.
        """
        taker = self.taken[index][0]
        hosts = sorted({self.self_id, *self.fetchers})
        if index in self.no_relay or taker not in hosts:
            return taker
        at = hosts.index(taker)
        ring = [hosts[(at + j) % len(hosts)] for j in range(1, len(hosts))]
        place = ring.index(self.self_id)
        return taker if place < RELAY_FANOUT else ring[(place - RELAY_FANOUT) % RELAY_FANOUT]

    def not_taking(self, node: str, index: int) -> None:
        """`node` says it is not reading chunk `index` (it refused to stream it)."""
        if self.taken.get(index, ("", 0.0))[0] == node:
            del self.taken[index]

    def relay_failed(self, index: int) -> None:
        """Our relay for chunk `index` could not stream it: use its reader."""
        self.no_relay.add(index)

    def _streamable(self, index: int, now: float) -> bool:
        taken = self.taken.get(index)
        return taken is not None and taken[1] > now

    def next_origin(self, now: float) -> int | None:
        """A missing chunk to read from the origin (now INFLIGHT), or None for now."""
        self._drop_stalled(now)
        # A client waits for these. Its owner gets to a chunk near the front of the
        # image soon (in a boot storm every reader wants those: no extra origin reads);
        # one far ahead (a VM reading its disk's last sector first) is read now unless
        # a peer holds it or is taking it.
        far = self._cursor + FAR_AHEAD * (1 + len(self.fetchers))
        for i in self._urgent_missing():
            taken = self.taken.get(i)
            if self._origin_ok(i, now) or (
                i >= far and not self.count[i] and (taken is None or taken[1] <= now)
            ):
                return self._reading(i)
        n = len(self.state)
        while self._cursor < n and self.state[self._cursor] != MISSING:
            self._cursor += 1
        for i in range(self._cursor, n):
            if self.state[i] == MISSING and self._origin_ok(i, now):
                return self._reading(i)
        stolen = self._steal(now)
        return None if stolen is None else self._reading(stolen)

    def _reading(self, index: int) -> int:
        self.state[index] = INFLIGHT
        self._known = True
        return index

    def _steal(self, now: float) -> int | None:
        """Our share is done: help the fetchers with the most chunks left untaken.

        A fetcher reads its chunks in ascending order, so helpers take them from the
        top, never its next STEAL_BACKLOG - 1, nor as many more as it took in the last
        two handovers (it may have taken those already and we have not heard yet).
        Several hosts finish their shares at about the same moment and would all go
        for the same chunk; so each of the fetcher's chunks may be taken by one helper
        only (its ordinal in that share, round the other fetchers in sorted order):
        with the same view of who fetches, two helpers never read the same chunk,
        however late they hear of each other.
        """
        self._steal_retry = None
        if not self.fetchers or now < self.handover_at:
            return None  # the fetchers just changed: the shares are being handed over
        hosts = sorted((self.self_id, *self.fetchers))
        count = len(hosts)
        base = _point(self.image_key) % count
        backlog: list[list[int]] = [[] for _ in range(count)]
        for i in range(self._cursor, len(self.state)):
            if self.state[i] == MISSING and not self.count[i] and i not in self.taken:
                backlog[(i + base) % count].append(i)
        me = hosts.index(self.self_id)
        window = 2 * self.handover
        for owner in sorted(range(count), key=lambda o: -len(backlog[o])):
            if owner == me or len(backlog[owner]) < STEAL_BACKLOG:
                continue
            recent = [t for t in self._takes.get(hosts[owner], ()) if t > now - window]
            keep = STEAL_BACKLOG - 1 + len(recent)
            helpers = [h for h in range(count) if h != owner]
            for i in reversed(backlog[owner][keep:]):
                if helpers[(i // count) % len(helpers)] == me:
                    return i
            if recent:  # more of its chunks may be ours to take once its takes are older
                retry = recent[0] + window
                self._steal_retry = min(self._steal_retry or retry, retry)
        return None

    def next_deadline(self, now: float) -> float | None:
        """When to look again: the earliest deadline still ahead of a chunk a peer is
        taking, or the end of a handover."""
        deadlines = [d for _, d in self.taken.values() if d > now]
        self._changes = [t for t in self._changes if t + self.handover > now]
        deadlines += [t + self.handover for t in self._changes]
        if self._steal_retry is not None and self._steal_retry > now:
            deadlines.append(self._steal_retry)
        return min(deadlines, default=None)

    def _origin_ok(self, index: int, now: float) -> bool:
        if self.count[index]:
            return False  # a peer has it: the peer lane takes it
        taken = self.taken.get(index)
        if taken is not None:
            return taken[1] <= now
        return bool(self.mine[index]) and now >= self.became[index] + self.handover

    def _urgent_missing(self) -> list[int]:
        while self._urgent and self.state[self._urgent[0]] != MISSING:
            self._urgent_set.discard(self._urgent.popleft())
        return [i for i in self._urgent if self.state[i] == MISSING]

    def _drop_stalled(self, now: float) -> None:
        stalled = [n for n, t in self.fetchers.items() if now - t > self.stall]
        for node in stalled:
            del self.fetchers[node]
        if stalled:
            # what they were taking will not come: their owners (after a handover) read
            # it, not every host whose deadline for it passes
            self.taken = {i: t for i, t in self.taken.items() if t[0] not in stalled}
            self._place(now)
