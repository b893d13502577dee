"""Pure parts of the swarm: wire messages, the peer table, the two-lane SwarmPlan."""

from __future__ import annotations

import msgpack
import pytest

from swarmcache.manifest import Manifest
from swarmcache.peers.table import DOWN_AFTER, PeerTable
from swarmcache.planner import DONE, HANDOVER, INFLIGHT, SwarmPlan
from swarmcache.wire import (
    MAX_MESSAGE,
    Have,
    Hello,
    State,
    Status,
    Subscribe,
    Taking,
    Unsubscribe,
    WireError,
    decode,
    encode,
)

# -- wire ---------------------------------------------------------------------------


def _manifest() -> Manifest:
    m = Manifest("img", size=10 * 1024, chunk_size=1024, origin_sha256="a" * 64)
    m.set_digest(3, b"\x07" * 16)
    return m


@pytest.mark.parametrize(
    "msg",
    [
        Hello("n1", "10.0.0.1", 7480),
        Subscribe("img", True),
        Unsubscribe("img"),
        State("img", _manifest(), b"\x08\x00", (1, 2), True),
        State("img", None, b"", (), False),
        Have("img", ((3, b"\x07" * 16), (4, b"\x01" * 16))),
        Taking("img", (5, 6)),
        Status("img", False, gone=True),
    ],
)
def test_wire_round_trip(msg: object) -> None:
    assert decode(encode(msg)) == msg  # type: ignore[arg-type]


def _raw(**body: object) -> bytes:
    return msgpack.packb({"v": 1, **body}, use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"v": 2, "t": "hello"}), "unsupported protocol version 2"),
        (_raw(t="nope", image="img"), "unknown message type"),
        (_raw(t="sub", image="../etc", fetching=True), "malformed"),
        (_raw(t="sub", image="img", fetching=1), "malformed"),
        (_raw(t="have", image="img", chunks=[[1, b"short"]]), "malformed"),
        (_raw(t="have", image="img", chunks=[[-1, b"x" * 16]]), "malformed"),
        (_raw(t="taking", image="img", chunks=["a"]), "malformed"),
        (_raw(t="hello", node="", host="h", port=1), "malformed"),
        (_raw(t="hello", node="n", host="h", port=70000), "malformed"),
        (
            _raw(t="state", image="img", manifest=b"junk", have=b"", taking=[], fetching=False),
            "malformed",
        ),
        (
            _raw(
                t="state",
                image="img",
                manifest=_manifest().encode(),
                have=b"\x00",  # 10 chunks need 2 bytes
                taking=[],
                fetching=False,
            ),
            "malformed",
        ),
        (b"\x00" * (MAX_MESSAGE + 1), "exceeds"),
    ],
)
def test_wire_rejects_malformed(data: bytes, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        decode(data)


# -- peer table ---------------------------------------------------------------------


def test_table_ignores_self_and_tracks_state() -> None:
    t = PeerTable("me")
    assert t.seen("me", "h", 1, "mdns", 0.0) is None
    p = t.seen("a", "10.0.0.1", 7480, "mdns", 0.0)
    assert p is not None
    assert p.address == "10.0.0.1:7480"
    assert p.state(0.0) == "ok"
    for n in range(DOWN_AFTER - 1):
        assert not t.failed("a", 1.0 + n)
    assert t.failed("a", 5.0)  # the third failure in a row: down for a while
    assert p.state(5.0) == "down"
    assert t.usable(5.0) == []
    assert p.state(5.0 + 1.01) == "ok"  # backoff 1 s after the first down
    t.succeeded("a", 1000, 0.5, 7.0)
    assert p.errors == 0
    assert p.rate == 2000
    t.quarantine("a", 10.0, 300.0)
    assert p.state(11.0) == "quarantined"
    assert p.state(311.0) == "ok"
    t.gone("a")
    assert p.state(400.0) == "gone"
    # a Hello from anyone cannot move a peer found by mDNS elsewhere
    assert t.seen("a", "10.6.6.6", 7480, "inbound", 401.0) is p
    assert p.state(401.0) == "ok"
    assert p.source == "mdns"
    assert p.host == "10.0.0.1"
    t.seen("a", "10.0.0.2", 7480, "mdns", 402.0)  # mDNS says it moved: it moved
    assert p.host == "10.0.0.2"


def test_table_ranks_free_fast_peers_first() -> None:
    t = PeerTable("me")
    for node in ("slow", "fast", "busy"):
        t.seen(node, node, 1, "mdns", 0.0)
    t.succeeded("slow", 1_000_000, 1.0, 0.0)
    t.succeeded("fast", 50_000_000, 1.0, 0.0)
    t.succeeded("busy", 100_000_000, 1.0, 0.0)
    busy = t.get("busy")
    assert busy is not None
    busy.inflight = 4
    assert t.rank(["slow", "fast", "busy"], 0.0, limit=4) == "fast"
    assert t.rank(["busy"], 0.0, limit=4) is None
    assert t.rank(["unknown"], 0.0, limit=4) is None


def test_table_forgets_old_dynamic_peers_but_not_static_ones() -> None:
    t = PeerTable("me")
    t.seen("m", "h", 1, "mdns", 0.0)
    t.seen("quiet", "h", 3, "mdns", 0.0)  # alive, just nothing new to say
    t.seen("s", "h", 2, "static", 0.0)
    t.gone("m")
    t.gone("s")
    assert t.expire(10_000.0) == ["m"]
    assert sorted(t.peers) == ["quiet", "s"]


# -- SwarmPlan ----------------------------------------------------------------------


def _bitmap(chunks: int, held: range | list[int]) -> bytes:
    b = bytearray((chunks + 7) // 8)
    for i in held:
        b[i >> 3] |= 1 << (i & 7)
    return bytes(b)


def first_pick(holders: list[str]) -> str | None:
    return sorted(holders)[0] if holders else None


def test_plan_alone_reads_everything_from_the_origin_in_order() -> None:
    plan = SwarmPlan(4, [1], "me", "img", stall=30)
    assert [plan.next_origin(0.0) for _ in range(4)] == [0, 2, 3, None]
    assert plan.next_peer(first_pick, 0.0) is None


def test_plan_late_joiner_reads_nothing_from_the_origin() -> None:
    plan = SwarmPlan(8, [], "me", "img", stall=30)
    plan.peer_state("a", _bitmap(8, range(8)), (), False, 0.0, 10.0)
    assert plan.next_origin(0.0) is None
    got = [plan.next_peer(first_pick, 0.0) for _ in range(8)]
    assert sorted(t[0] for t in got if t) == list(range(8))
    assert {(t[1], t[2]) for t in got if t} == {("a", False)}


def test_plan_prefers_rarest_chunks_and_wanted_ones_first() -> None:
    plan = SwarmPlan(6, [], "me", "img", stall=30)
    plan.peer_state("a", _bitmap(6, range(6)), (), False, 0.0, 10.0)
    plan.peer_state("b", _bitmap(6, [0, 1, 2, 3]), (), False, 0.0, 10.0)
    assert plan.next_peer(first_pick, 0.0) == (4, "a", False)  # held by one peer only
    plan.want([2])
    assert plan.next_peer(first_pick, 0.0) == (2, "a", False)
    assert plan.next_peer(lambda h: "b" if "b" in h else None, 0.0) == (0, "b", False)


def _fetching_together(hosts: list[str], chunks: int, key: str) -> dict[str, SwarmPlan]:
    """One plan per host, each knowing the others fetch the image too (since 0.0)."""
    plans = {h: SwarmPlan(chunks, [], h, key, stall=30) for h in hosts}
    for h, plan in plans.items():
        for other in hosts:
            if other != h:
                plan.peer_fetching(other, True, 0.0)
    return plans


def test_plan_hosts_starting_together_split_the_origin_reads() -> None:
    hosts = ["h1", "h2", "h3", "h4"]
    plans = _fetching_together(hosts, 400, "img:etag")
    owners: dict[int, list[str]] = {}
    busy = True
    while busy:  # in turns, each host tells the others what it takes (Taking)
        busy = False
        for h, plan in plans.items():
            i = plan.next_origin(HANDOVER)
            if i is None:
                continue
            busy = True
            owners.setdefault(i, []).append(h)
            for other, other_plan in plans.items():
                if other != h:
                    other_plan.peer_taking(h, [i], 0.0, 10.0)
    # every chunk read from the origin by exactly one host, the work spread out
    assert sorted(owners) == list(range(400))
    assert all(len(v) == 1 for v in owners.values())
    shares = [sum(1 for v in owners.values() if v == [h]) for h in hosts]
    assert min(shares) > 40, shares


def test_plan_waits_for_a_chunk_a_peer_is_taking_until_its_deadline() -> None:
    plan = SwarmPlan(2, [], "me", "img", stall=30)
    plan.peer_taking("a", [0, 1], now=0.0, deadline=5.0)
    assert plan.next_origin(1.0) is None
    assert plan.next_deadline(1.0) == 5.0
    assert plan.next_deadline(6.0) is None  # a passed deadline is no reason to wake up
    plan.peer_has("a", [0], now=2.0)
    # chunk 1 is still arriving at a: streamed from a as it arrives, before held ones
    assert plan.next_peer(first_pick, 2.0, streams=True) == (1, "a", True)
    assert plan.next_peer(first_pick, 2.0) == (0, "a", False)
    plan.failed(1)  # the stream broke
    assert plan.next_origin(4.0) is None  # a may still deliver it
    assert plan.next_peer(first_pick, 2.0) is None  # held chunks only
    assert plan.next_peer(first_pick, 5.0, streams=True) is None  # past its deadline
    assert plan.next_origin(5.0) == 1  # a took too long: read it ourselves


def test_plan_dead_fetcher_leaves_the_ring_and_its_chunks_fall_back() -> None:
    plan = SwarmPlan(64, [], "me", "img", stall=30)
    plan.peer_fetching("a", True, 0.0)
    mine = sum(plan.mine)
    assert 0 < mine < 64
    plan.drop_peer("a", 0.0)
    assert sum(plan.mine) == 64
    # and a fetcher that stays silent too long is dropped the same way
    plan.peer_fetching("b", True, 0.0)
    assert sum(plan.mine) < 64
    was_b = {i for i in range(64) if not plan.mine[i]}
    # b falls silent: off the ring; ours are read on, b's become ours after a handover
    now = [plan.next_origin(31.0) for _ in range(64)]
    assert "b" not in plan.fetchers
    assert now[0] is not None
    assert None in now
    assert not {i for i in now if i is not None} & was_b
    later = [plan.next_origin(31.0 + HANDOVER) for _ in range(64)]
    assert {i for i in later if i is not None} == was_b
    assert plan.state.count(INFLIGHT) == 64


def test_plan_dropped_holder_chunks_go_back_to_the_origin_lane() -> None:
    plan = SwarmPlan(3, [], "me", "img", stall=30)
    plan.peer_state("a", _bitmap(3, range(3)), (), False, 0.0, 10.0)
    assert plan.next_origin(0.0) is None
    plan.drop_peer("a", 0.0)
    assert plan.next_origin(0.0) == 0
    plan.done(0)
    assert plan.state[0] == DONE
    assert plan.count == [0, 0, 0]


def test_plan_host_done_with_its_share_takes_the_last_chunk_of_the_busiest() -> None:
    plan = SwarmPlan(40, [], "a", "img", stall=30)
    plan.peer_fetching("b", True, 0.0)
    mine = [i for i in range(40) if plan.mine[i]]
    theirs = [i for i in range(40) if not plan.mine[i]]
    assert len(mine) == len(theirs) == 20
    for i in mine:  # our share is read
        assert plan.next_origin(HANDOVER) == i
        plan.done(i)
    for i in theirs[:12]:  # b got most of its share
        plan.peer_taking("b", [i], 0.0, 100.0)
    plan.peer_taking("b", theirs[12:17], 5.0, 100.0)  # five more just now: it goes fast
    # b has three chunks untaken, but at that pace it may have taken them already
    assert plan.next_origin(5.0) is None
    # a while later with no news of b: we take its last one, then the next from the end
    assert plan.next_origin(10.0) == theirs[-1]
    assert plan.next_origin(10.0) == theirs[-2]
    assert plan.next_origin(10.0) is None  # one left: b is about to read it itself


def test_plan_hosts_done_at_once_never_take_the_same_chunk_of_the_busiest() -> None:
    hosts = ["h1", "h2", "h3", "h4"]
    plans = _fetching_together(hosts, 80, "img")
    slow = plans["h1"].owner(0)
    theirs = [i for i in range(80) if plans[slow].mine[i]]
    for h, plan in plans.items():  # everyone else read its share; slow took its first 10
        if h == slow:
            continue
        for i in range(80):
            if plan.mine[i]:
                plan.done(i)
        for other in hosts:
            if other not in (h, slow):
                plan.peer_has(other, [i for i in range(80) if plans[other].mine[i]], 0.0)
        plan.peer_taking(slow, theirs[:10], 0.0, 10.0)
    # the three helpers pick at the same moment, none hearing of the others' picks
    picks: dict[str, list[int]] = {}
    for h, plan in plans.items():
        if h != slow:
            picks[h] = [i for i in iter(lambda plan=plan: plan.next_origin(1.0), None)]
    taken = [i for p in picks.values() for i in p]
    assert len(taken) == len(set(taken)), picks  # no chunk read twice
    assert all(picks.values()), picks  # each helped
    assert set(taken) == set(theirs[11:])  # all but the owner's next one


def test_plan_fetchers_learning_of_a_joiner_apart_never_read_a_chunk_twice() -> None:
    # a and b are under way; j joins. a hears of j at t=1.0, b only at t=1.1, and what
    # one host takes reaches the other LAG seconds later: for a moment a and b split
    # the image differently, each reading a chunk every 10 ms
    lag = 0.1
    plans = {h: SwarmPlan(300, [], h, "img", stall=30) for h in ("a", "b")}
    plans["a"].peer_fetching("b", True, 0.0)
    plans["b"].peer_fetching("a", True, 0.0)
    pending: list[tuple[float, str, int]] = []  # (arrives at, taker, chunk)
    reads: list[int] = []
    for tick in range(300):
        now = tick / 100
        if now == 1.0:
            plans["a"].peer_fetching("j", True, now)
        if now == 1.1:
            plans["b"].peer_fetching("j", True, now)
        for msg in [m for m in pending if m[0] <= now]:
            pending.remove(msg)
            other = "b" if msg[1] == "a" else "a"
            plans[other].peer_taking(msg[1], [msg[2]], now, now + 10)
        for h, plan in plans.items():
            i = plan.next_origin(now)
            if i is not None:
                reads.append(i)
                pending.append((now + lag, h, i))
    assert len(reads) == len(set(reads)), sorted(i for i in reads if reads.count(i) > 1)
    assert len(reads) > 150  # both read on through the change


def test_plan_reads_on_while_fetchers_keep_joining() -> None:
    # a joiner every 0.2 s, less than the handover apart: each chunk that became ours
    # waits one handover from when it did, not until the joins stop
    plan = SwarmPlan(600, [], "h00", "img", stall=30, handover=0.25)
    plan.peer_fetching("h01", True, 0.0)
    reads = []
    for tick in range(100):  # 5 s, a read every 50 ms if there is one to make
        now = tick * 0.05
        if tick and tick % 4 == 0:
            plan.peer_fetching(f"h{tick // 4 + 1:02d}", True, now)
        i = plan.next_origin(now)
        if i is not None:
            assert now >= plan.became[i] + 0.25
            reads.append(i)
    assert len(reads) > 20


def test_plan_joiner_reads_from_the_origin_only_after_the_handover() -> None:
    plan = SwarmPlan(30, [], "j", "img", stall=30)
    plan.peer_fetching("a", True, 0.0)  # a was under way before we came
    assert plan.next_origin(0.0) is None  # a may not know of us yet
    assert plan.next_deadline(0.0) == HANDOVER  # the workers look again then
    assert plan.next_origin(HANDOVER) is not None


def _our_share_done(chunks: int) -> tuple[SwarmPlan, list[int]]:
    """Plan of host a fetching with b, a's share of origin reads done; b's chunks."""
    plan = SwarmPlan(chunks, [], "a", "img", stall=30, handover=0.25)
    plan.peer_fetching("b", True, 0.0)
    for i in range(chunks):
        if plan.mine[i]:
            plan.done(i)
    return plan, [i for i in range(chunks) if not plan.mine[i]]


def test_plan_helper_looks_again_when_the_busiest_fetchers_takes_age() -> None:
    plan, theirs = _our_share_done(40)
    # b's state: what it was taking when it answered is not news of how fast it goes
    plan.peer_state("b", b"", theirs[:14], True, 5.0, 100.0)
    assert plan.next_origin(5.0) == theirs[-1]
    plan.failed(theirs[-1])
    plan.peer_taking("b", theirs[14:17], 5.1, 100.0)  # three just now: it goes fast
    assert plan.next_origin(5.1) is None  # its last three it may have taken meanwhile
    assert plan.next_deadline(5.1) == 5.1 + 2 * 0.25  # when those takes are old
    assert plan.next_origin(5.6) == theirs[-1]


def test_plan_stalled_fetchers_chunks_go_to_their_new_owner_not_to_everyone() -> None:
    plan, theirs = _our_share_done(8)
    plan.peer_taking("b", theirs, 1.0, 100.0)
    assert plan.next_origin(20.0) is None  # b is reading them
    assert plan.next_origin(31.5) is None  # b fell silent: off the ring, a handover
    assert "b" not in plan.fetchers
    assert sorted(iter(lambda: plan.next_origin(31.5 + 0.25), None)) == theirs  # not at 100


def test_plan_reads_a_wanted_chunk_far_ahead_now_even_if_another_host_owns_it() -> None:
    plan = SwarmPlan(64, [], "a", "img", stall=30)
    plan.peer_fetching("b", True, 0.0)
    theirs = [i for i in range(64) if not plan.mine[i]]
    plan.want([theirs[0]])  # near the front: its owner reads it first anyway
    assert plan.next_origin(0.0) != theirs[0]
    plan.want([theirs[-1]])  # a client reads the end of the image first
    assert plan.next_origin(0.0) == theirs[-1]


def test_plan_forgets_what_a_peer_was_taking_when_it_stops_fetching() -> None:
    plan = SwarmPlan(4, [], "a", "img", stall=30)
    plan.peer_fetching("b", True, 0.0)
    plan.peer_taking("b", [0, 1, 2, 3], 0.0, 50.0)
    assert plan.next_origin(1.0) is None
    plan.peer_fetching("b", False, 1.0)  # its fetch failed or was deleted
    assert plan.next_origin(1.0 + HANDOVER) == 0
    plan.done(0)
    assert 0 not in plan.taken


@pytest.mark.parametrize(
    ("me", "source"),
    [
        # fetchers a..h; c reads chunk 0 from the origin. Ring after c: d e f g h a b.
        ("d", "c"),  # the first two stream it from its reader
        ("e", "c"),
        ("f", "d"),  # the rest from those two, in turn: d relays to f, h, b
        ("g", "e"),  # ... and e to g, a
        ("h", "d"),
        ("a", "e"),
        ("b", "d"),
    ],
)
def test_stream_source_is_a_two_level_tree_below_the_reader(me: str, source: str) -> None:
    plan = SwarmPlan(4, [], me, "img", stall=30)
    for other in "abcdefgh":
        if other != me:
            plan.peer_fetching(other, True, 0.0)
    plan.peer_taking("c", [0], now=0.0, deadline=50.0)
    assert plan.stream_source(0) == source
    assert plan.next_peer(first_pick, 1.0, streams=True) == (0, source, True)


def test_stream_source_falls_back_to_the_reader() -> None:
    plan = SwarmPlan(4, [], "f", "img", stall=30)
    for other in "cde":
        plan.peer_fetching(other, True, 0.0)
    plan.peer_taking("c", [0, 1], now=0.0, deadline=50.0)
    assert plan.stream_source(0) == "d"  # ring after c: d e f -> f streams from d
    plan.relay_failed(0)  # d had nothing of it to stream
    assert plan.stream_source(0) == "c"
    assert plan.stream_source(1) == "d"  # other chunks still go through the relay
    plan.peer_taking("x", [2], now=0.0, deadline=50.0)  # a reader we do not see fetching
    assert plan.stream_source(2) == "x"
