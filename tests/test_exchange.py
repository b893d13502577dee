"""Pure block exchange: geometry, rendezvous readers, request picking, upload slots,
the origin lane and the active set (table-driven where the cases are a table)."""

from __future__ import annotations

import itertools
import random

import pytest

from swarmcache.exchange import (
    ENDGAME_COPIES,
    HAVE,
    HAVE_BATCH,
    HAVE_BATCH_MIN,
    INFLIGHT,
    MISSING,
    QUIET,
    QUIET_MAX,
    ROTATE,
    ROTATE_MAX,
    ROTATE_MIN,
    URGENT_WAIT,
    ActiveSet,
    Exchange,
    Geometry,
    OriginLane,
    rank,
    readers,
    shortest_have_batch,
)

KiB = 1024


def _bits(blocks: int, held: range | list[int]) -> bytes:
    bits = bytearray((blocks + 7) // 8)
    for b in held:
        bits[b >> 3] |= 1 << (b & 7)
    return bytes(bits)


def _exchange(blocks: int = 16, per_chunk: int = 4, have: list[int] | None = None, **kw: int):
    geo = Geometry(blocks * KiB, per_chunk * KiB, KiB)
    kw.setdefault("pipeline", 0)  # exactly `slots` per neighbour (see the pipeline test)
    return Exchange(geo, have or [], random.Random(7), **kw)


# -- geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk", "block", "chunks", "blocks", "last_chunk_blocks", "last_block"),
    [
        (16 * KiB, 4 * KiB, KiB, 4, 16, range(12, 16), (15 * KiB, KiB)),
        (10 * KiB + 1, 4 * KiB, KiB, 3, 11, range(8, 11), (10 * KiB, 1)),
        (KiB, 4 * KiB, KiB, 1, 1, range(0, 1), (0, KiB)),
        (0, 4 * KiB, KiB, 0, 0, range(0, 0), None),
    ],
)
def test_geometry(
    size: int,
    chunk: int,
    block: int,
    chunks: int,
    blocks: int,
    last_chunk_blocks: range,
    last_block: tuple[int, int] | None,
) -> None:
    geo = Geometry(size, chunk, block)
    assert (geo.chunks, geo.blocks, geo.per_chunk) == (chunks, blocks, chunk // block)
    if chunks:
        assert geo.blocks_of(chunks - 1) == last_chunk_blocks
        assert geo.block_span(blocks - 1) == last_block
        assert geo.chunk_of(blocks - 1) == chunks - 1
    with pytest.raises(IndexError):
        geo.block_span(blocks)


def test_geometry_refuses_a_chunk_that_is_not_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple"):
        Geometry(10, 3 * KiB, 2 * KiB)


# -- rendezvous readers --------------------------------------------------------------------


def test_readers_are_the_same_everywhere_and_a_join_moves_only_later_places() -> None:
    nodes = [f"n{i}" for i in range(50)]
    first = rank("img", nodes)
    assert first == rank("img", reversed(nodes))  # order of the table does not matter
    assert rank("other", nodes) != first  # each image has its own readers
    joined = rank("img", [*nodes, "late"])
    at = joined.index("late")
    assert joined[:at] == first[:at]  # places before the joiner's are kept
    assert [n for n in joined if n != "late"] == first
    assert readers("img", nodes, 4) == first[:4]
    assert readers("img", ["solo"], 4) == ["solo"]


def test_seeders_are_the_readers_while_one_is_a_member() -> None:
    nodes = [f"n{i}" for i in range(50)]
    assert readers("img", nodes, 4, seeders={"n7"}) == ["n7"]
    two = readers("img", nodes, 4, seeders={"n7", "n9", "gone"})
    assert sorted(two) == ["n7", "n9"]  # only seeders that are members
    assert readers("img", nodes, 4, seeders={"gone"}) == readers("img", nodes, 4)
    lane = _lane(_exchange(), "n3", [n for n in nodes if n != "n3"])
    assert lane.is_reader() == ("n3" in readers("img", nodes, 4))
    assert lane.set_members(nodes, {"n7"})  # a seeder appeared: it reads, for everyone
    assert (lane.readers, lane.is_reader()) == (["n7"], False)
    assert lane.replace("n7")  # and when it goes the hosts read again
    assert lane.readers == readers("img", [n for n in nodes if n != "n7"], 4)
    lane.set_members(nodes, ())
    first = lane.readers[0]
    assert lane.exclude(first)  # it holds another version: out of this fetch's readers
    assert first not in lane.readers
    lane.set_members(nodes, ())  # the member table names it again: it stays out
    assert first not in lane.readers
    seeder = _lane(_exchange(), "n7", nodes, 4, seeders={"n7"})
    assert (seeder.readers, seeder.streams) == (["n7"], 4)  # every origin stream its own


# -- requests --------------------------------------------------------------------------------


def test_requests_go_only_to_neighbours_that_serve_us_and_respect_slots() -> None:
    ex = _exchange(slots=2, max_inflight=3)
    ex.add_neighbour("a", _bits(16, range(16)))
    ex.add_neighbour("b", _bits(16, range(16)))
    assert ex.next_requests(0.0) == []  # nobody unchoked us yet
    ex.served_by("a", True)
    asked = ex.next_requests(0.0)
    assert [n for n, _ in asked] == ["a", "a"]  # its two slots, no more
    ex.served_by("b", True)
    more = ex.next_requests(0.0)
    assert [n for n, _ in more] == ["b"]  # three in flight in all
    assert len({b for _, b in asked + more}) == 3
    assert all(ex.state[b] == INFLIGHT for _, b in asked + more)
    assert ex.next_requests(0.0) == []


@pytest.mark.parametrize(
    ("slots", "serving", "per_neighbour"),
    [
        (1, 0, 4),  # nobody serves us yet: the first to do so gets the whole pipeline
        (1, 1, 4),  # one neighbour alone: 4 in flight, our link never waits a round trip
        (1, 2, 2),
        (1, 3, 2),
        (1, 4, 1),  # enough neighbours: one request each, short queues at their uplinks
        (1, 20, 1),
        (2, 20, 2),  # peers.concurrency set higher: that many
        (3, 1, 4),
    ],
)
def test_one_request_per_neighbour_but_a_pipeline_of_four_in_all(
    slots: int, serving: int, per_neighbour: int
) -> None:
    ex = _exchange(blocks=64, slots=slots, pipeline=4, max_inflight=64)
    for i in range(serving):
        ex.add_neighbour(f"n{i}", _bits(64, range(64)))
        ex.served_by(f"n{i}", True)
    assert ex.per_neighbour() == per_neighbour
    if serving:
        asked = ex.next_requests(0.0)
        assert len(asked) == serving * per_neighbour
        assert all(sum(1 for n, _ in asked if n == node) == per_neighbour for node, _ in asked)


def test_a_clients_blocks_take_half_the_request_slots_at_one_per_neighbour() -> None:
    ex = _exchange(slots=1, max_inflight=32)
    for node in "abcd":
        ex.add_neighbour(node, _bits(16, range(16)))
        ex.served_by(node, True)
    ex.want([0, 1, 2, 3])
    pairs = ex.next_requests(0.0)
    assert sorted(n for n, _ in pairs) == ["a", "b", "c", "d"]  # one per neighbour
    assert sorted(b for _, b in pairs if b < 4) == [0, 1]  # two of four slots are the client's
    node, block = next((n, b) for n, b in pairs if b == 0)
    ex.landed(block, node, 0.1)  # a client's block landed: that slot goes to the next one
    assert ex.next_requests(0.1) == [(node, 2)]


def test_urgent_blocks_first_then_rarest() -> None:
    ex = _exchange(slots=3, max_inflight=8)
    ex.add_neighbour("a", _bits(16, range(16)))
    ex.add_neighbour("b", _bits(16, range(8)))  # holds the first half, serves nobody
    ex.served_by("a", True)
    ex.want([2])
    asked = [b for _, b in ex.next_requests(0.0)]
    # the wanted block first, though two neighbours hold it; then blocks only a holds
    assert asked[0] == 2
    assert all(b >= 8 for b in asked[1:])
    assert len(asked) == 3


def test_a_clients_blocks_take_one_request_slot_per_neighbour() -> None:
    # every host streams the image from its start: if urgency took every slot, every
    # request in the swarm would chase the same few blocks; the other slots stay
    # rarest-first and keep spreading the rest
    ex = _exchange(slots=2, max_inflight=8)
    ex.add_neighbour("a", _bits(16, range(16)))
    ex.add_neighbour("b", _bits(16, [0, 1, 2, 3, 12]))
    ex.add_neighbour("c", _bits(16, [0, 1, 2, 3, 12]))
    ex.served_by("a", True)
    ex.want([0, 1, 2, 3])
    asked = ex.next_requests(0.0)
    per_node: dict[str, list[int]] = {}
    for node, b in asked:
        per_node.setdefault(node, []).append(b)
    assert per_node == {"a": [0, per_node["a"][1]]}  # one wanted block, then the rarest
    assert per_node["a"][1] not in (0, 1, 2, 3, 12)  # held by a alone: the rarest
    # once the wanted block is in, the next wanted one is asked for, though the
    # other request is still in flight
    ex.landed(0, "a", 0.1)
    assert ex.next_requests(0.1) == [("a", 1)]


def test_a_chunk_begun_is_preferred_among_equally_rare_blocks() -> None:
    ex = _exchange(have=[4, 5], slots=1)  # chunk 1 (blocks 4-7) begun
    ex.add_neighbour("a", _bits(16, [0, 6, 8]))
    ex.served_by("a", True)
    assert ex.next_requests(0.0) == [("a", 6)]


def test_landed_failed_and_a_neighbour_that_leaves() -> None:
    ex = _exchange(slots=4)
    ex.add_neighbour("a", _bits(16, range(8)))
    ex.served_by("a", True)
    asked = [b for _, b in ex.next_requests(0.0)]
    assert len(asked) == 4
    assert ex.landed(asked[0], "a") == []
    assert ex.state[asked[0]] == HAVE
    assert ex.missing == 15
    ex.failed(asked[1], "a")
    assert ex.state[asked[1]] == MISSING
    lost = ex.drop_neighbour("a")
    assert sorted(lost) == sorted(asked[2:])
    assert all(ex.state[b] == MISSING for b in lost)
    assert ex.inflight == 0
    assert sum(ex.count) == 0  # nothing of it counts


def test_endgame_asks_a_second_holder_only_when_nothing_else_is_left() -> None:
    ex = _exchange(blocks=4, per_chunk=4, slots=1)
    ex.add_neighbour("a", _bits(4, range(4)))
    ex.add_neighbour("b", _bits(4, range(4)))
    ex.served_by("a", True)
    first = ex.next_requests(0.0)
    assert len(first) == 1
    ex.served_by("b", True)
    second = ex.next_requests(0.0)
    assert second[0][0] == "b"
    assert second[0][1] != first[0][1]  # other blocks are left: no duplicate yet
    for _, b in first + second:
        ex.landed(b, first[0][0] if (_, b) in first else "b")
    # two blocks left: each of a and b asks one; then nothing new is left to ask
    last = ex.next_requests(0.0)
    assert sorted(b for _, b in last) == sorted(b for b in range(4) if ex.state[b] == INFLIGHT)
    ex.landed(last[0][1], last[0][0])
    dup = ex.next_requests(0.0)  # the freed neighbour doubles the one still in flight
    assert dup == [(last[0][0], last[1][1])]
    assert len(ex.sources[last[1][1]]) == ENDGAME_COPIES
    # the first copy to land wins; the other request is reported for cancelling
    assert ex.landed(last[1][1], last[1][0]) == [last[0][0]]
    assert ex.finished
    assert ex.inflight == 0


def test_a_busy_neighbour_is_left_alone_for_longer_each_time() -> None:
    ex = _exchange(slots=1)
    ex.add_neighbour("a", _bits(16, range(16)))
    ex.served_by("a", True)
    (_, b), *_ = ex.next_requests(0.0)
    ex.refused(b, "a", now=0.0, until=0.1)
    assert ex.state[b] == MISSING
    assert ex.next_requests(0.05) == []
    (_, b), *_ = ex.next_requests(0.1)
    ex.refused(b, "a", now=0.1, until=0.2)
    assert ex.next_requests(0.25) == []  # twice the hint
    assert ex.next_requests(0.31) != []


def test_a_neighbour_that_refuses_us_is_no_source_until_it_serves_again() -> None:
    # a reader that keeps answering 503 (its trade with us ended, or it quarantined us)
    # must not hold our stalled or urgent origin reads back: what only it holds is
    # read from the origin
    ex = _exchange(slots=1)
    ex.add_neighbour("a", _bits(16, range(16)))
    ex.served_by("a", True)
    assert ex.served(0)
    (_, b), *_ = ex.next_requests(0.0)
    ex.refused(b, "a", now=0.0, until=0.1)
    assert not any(ex.served(x) for x in range(16))
    (_, b), *_ = ex.next_requests(1.0)  # still asked now and then
    ex.landed(b, "a", 1.0)  # it served a block: a source again
    assert ex.served(0)
    ex.refused(0, "a", now=1.0, until=1.1)
    ex.served_by("a", True)  # a slot opened for us again
    assert ex.served(0)


# -- upload slots (choking) -------------------------------------------------------------------


def test_upload_slots_go_to_interested_neighbours_in_turn() -> None:
    ex = _exchange(have=list(range(16)), upload_slots=2)
    for n in "abc":
        ex.add_neighbour(n, _bits(16, []))
    ex.add_neighbour("full", _bits(16, range(16)))  # wants nothing of ours
    first = ex.rotate(0.0)
    assert all(up for _, up in first)
    assert len(first) == 2
    assert "full" not in ex.serving
    assert ex.rotate(ROTATE / 2) == []  # not time to turn yet
    turn = ex.rotate(1.0)
    (out,) = [n for n, up in turn if not up]
    (inn,) = [n for n, up in turn if up]
    assert {out, inn} | ex.serving == {"a", "b", "c"}
    assert inn not in {n for n, _ in first}  # the one that waited goes first
    assert ex.may_serve(inn)
    assert not ex.may_serve(out)


def test_a_slot_its_neighbour_does_not_use_goes_to_one_waiting() -> None:
    """A neighbour that has not asked us for a block for a turn (what it lacks of ours
    comes from elsewhere) gives its slot to one that waits, before the next turn;
    one that asks keeps its slot, and with nobody waiting an idle one keeps it too."""
    ex = _exchange(have=list(range(16)), upload_slots=2)
    ex.add_neighbour("a", _bits(16, []))
    ex.add_neighbour("b", _bits(16, []))
    assert {n for n, up in ex.rotate(0.0) if up} == {"a", "b"}
    assert ex.may_serve("a", 0.06)  # a asks for a block
    assert ex.rotate(0.07) == []  # b is idle, but nobody waits
    ex.add_neighbour("c", _bits(16, []))
    changes = ex.rotate(0.08)  # before the next turn is due: only the idle one goes
    assert sorted(changes) == [("b", False), ("c", True)]
    assert ex.serving == {"a", "c"}
    assert ex.may_serve("a", 0.09)
    assert ex.may_serve("c", 0.09)
    ex.add_neighbour("d", _bits(16, []))
    assert ex.rotate(0.1) == []  # both asked within a turn: d waits for the next turn


def test_a_neighbour_whose_request_waits_at_our_uplink_is_not_idle() -> None:
    """With one request in flight per neighbour, a served neighbour asks again only
    once its block has left; while we serve it (or until a turn after) it keeps its
    slot, however long the block waited behind the others."""
    ex = _exchange(have=list(range(16)), upload_slots=1)
    ex.add_neighbour("a", _bits(16, []))
    assert ex.rotate(0.0) == [("a", True)]
    assert ex.may_serve("a", 0.01)  # a asks; the block waits behind others' for 2 s
    ex.add_neighbour("b", _bits(16, []))
    ex._rotate_at = 10.0  # no turn due: only the idle rule could take a's slot
    assert ex.rotate(1.0) == []  # long past a turn (0.05 s), but a is being served
    ex.sent("a", 2.0)  # the block left
    assert ex.rotate(2.01) == []  # it used its slot until 2.0: not idle yet
    assert sorted(ex.rotate(2.2)) == [("a", False), ("b", True)]  # idle for a turn
    ex.sent("b", 2.3)  # a late or stray report changes nothing
    assert ex.neighbours["b"].uploads == 0


def test_a_neighbour_that_got_everything_frees_its_slot() -> None:
    ex = _exchange(have=[0, 1], upload_slots=1)
    ex.add_neighbour("a", _bits(16, []))
    ex.add_neighbour("b", _bits(16, []))
    (n, up), *_ = ex.rotate(0.0)
    assert up
    ex.neighbour_has(n, [0, 1])  # it now holds everything we hold
    changes = dict(ex.rotate(0.01))
    assert changes[n] is False
    other = "b" if n == "a" else "a"
    assert changes[other] is True
    ex.landed(5)  # we got something new: the first one is interested again
    assert ex.neighbours[n].offer == 1


# -- the origin lane ----------------------------------------------------------------------------


def _lane(
    ex: Exchange,
    me: str,
    members: list[str],
    concurrency: int = 4,
    stall: float = 30.0,
    seeders: set[str] | None = None,
):
    return OriginLane(
        ex, me, "img", members, concurrency, stall, now=0.0, gather=0.0, seeders=seeders or ()
    )


def test_a_lone_host_reads_everything_in_order_with_every_stream() -> None:
    ex = _exchange()
    lane = _lane(ex, "me", [])
    assert lane.is_reader()
    assert lane.streams == 4
    runs = [lane.next_read(0.0) for _ in range(5)]
    assert runs == [(0, 4), (4, 8), (8, 12), (12, 16), None]
    assert all(s == INFLIGHT for s in ex.state)


def test_the_origin_waits_for_the_neighbours_states_or_the_gather_time() -> None:
    ex = _exchange()
    lane = OriginLane(ex, "me", "img", [], 4, 30.0, now=10.0, gather=1.0)
    assert lane.next_read(10.5) is None
    assert lane.next_read(11.0) == (0, 4)  # nobody answered in time: read
    ex2 = _exchange()
    lane2 = OriginLane(ex2, "me", "img", [], 4, 30.0, now=10.0, gather=1.0)
    ex2.add_neighbour("n", _bits(16, range(4)))
    lane2.heard_all(10.1)  # it holds chunk 0: the lane starts at chunk 1
    assert lane2.next_read(10.1) == (4, 8)


def test_readers_split_the_chunks_and_others_read_nothing() -> None:
    members = [f"h{i}" for i in range(8)]
    top = readers("img", members, 2)
    lanes = {m: _lane(_exchange(blocks=64), m, [o for o in members if o != m], 2) for m in members}
    for m, lane in lanes.items():  # everyone is everyone's neighbour here
        for o in members:
            if o != m:
                lane.exchange.add_neighbour(o)
    got: dict[str, list[int]] = {}
    for _ in range(16):  # rounds: each host reads what it may, the others hear of it
        for m, lane in lanes.items():
            run = lane.next_read(0.0)
            if run is None:
                continue
            got.setdefault(m, []).append(run[0] // 4)
            lane.read_done(run[0])
            for b in range(*run):
                lane.exchange.landed(b)
            for o, other in lanes.items():
                if o != m:
                    other.exchange.neighbour_has(m, range(*run))
    assert set(got) == set(top)  # only the readers read, both of them
    assert sorted(c for cs in got.values() for c in cs) == list(range(16))  # each chunk once
    assert all(lanes[m].streams == 1 for m in top)


@pytest.mark.parametrize(("chunks", "count"), [(16, 4), (17, 4), (16, 3), (256, 4), (5, 8)])
def test_readers_take_the_chunks_in_turn_in_equal_shares(chunks: int, count: int) -> None:
    """Every chunk is one reader's; shares differ by at most one chunk (the origin's
    link stays full until the end: no reader is left reading alone), and neighbouring
    chunks are different readers' (a client streaming from the start)."""
    members = [f"h{i}" for i in range(12)]
    top = readers("img", members, count)
    lanes = [_lane(_exchange(blocks=chunks * 4), m, members, count) for m in top]
    shares = [lane._share for lane in lanes]
    assert sorted(c for share in shares for c in share) == list(range(chunks))
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    owners = [lanes[0].owner(c) for c in range(chunks)]
    assert all(a != b for a, b in itertools.pairwise(owners)) or len(top) == 1
    assert [lane.owner(c) for lane in lanes for c in range(chunks)] == owners * len(lanes)


def test_readers_that_disagree_on_the_members_agree_again_once_their_tables_do() -> None:
    """A host that has not discovered another yet computes other readers and shares;
    some chunk may be nobody's for that moment. Once it learns of the other, the
    shares are the same everywhere again, and every chunk is somebody's."""
    members = [f"h{i}" for i in range(6)]
    top = readers("img", members, 3)
    blind = next(m for m in members if m not in top)  # not a reader in the full view
    unseen = top[-1]  # ... but one in its own view, where the last reader is missing
    lanes = {m: _lane(_exchange(blocks=256), m, [o for o in members if o != m], 3) for m in members}
    assert lanes[blind].set_members(o for o in members if o not in (blind, unseen))
    assert lanes[blind].is_reader()
    assert not lanes[blind].set_members(o for o in members if o not in (blind, unseen))
    assert lanes[blind].set_members(o for o in members if o != blind)  # it learns of it
    assert not lanes[blind].is_reader()
    assert all(lane.readers == top for lane in lanes.values())
    shares = sorted(c for lane in lanes.values() for c in lane._share)
    assert shares == list(range(64))  # each chunk exactly one reader's


def test_a_reader_done_with_its_share_helps_the_one_with_most_left() -> None:
    members = ["a", "b"]
    ex = _exchange(blocks=64, per_chunk=4)  # 16 chunks, 8 each
    me = readers("img", members, 2)[0]
    lane = _lane(ex, me, [m for m in members if m != me], 2)
    mine = [c for c in range(16) if lane.owner(c) == me]
    theirs = [c for c in range(16) if lane.owner(c) != me]
    for c in mine:
        for b in ex.geometry.blocks_of(c):
            ex.landed(b)
    other = next(m for m in members if m != me)
    ex.add_neighbour("someone", _bits(64, []))  # not alone: a neighbour, not a reader
    assert lane.next_read(5.0) is None  # not linked to the other reader: no help
    ex.add_neighbour(other, _bits(64, ex.geometry.blocks_of(theirs[0])))  # it began
    assert lane.next_read(1.0) is None  # blocks still arrive: it is busy, not slow
    first, _ = lane.next_read(5.0) or (-1, -1)
    assert first // 4 == theirs[-1]  # from the top of its share
    lane.read_done(first)
    # with one helper, it takes all but the owner's next one and the one it may be
    # reading (one stream each), top down
    taken = [first // 4]
    while (run := lane.next_read(5.0)) is not None:
        taken.append(run[0] // 4)
        lane.read_done(run[0])
    assert taken == sorted(theirs[3:], reverse=True)


def test_a_reader_reads_a_half_spread_chunk_only_when_the_swarm_is_quiet() -> None:
    ex = _exchange()
    lane = _lane(ex, "me", [])
    ex.add_neighbour("n", _bits(16, [0, 1, 2, 3, 5]))  # chunk 0 whole, one block of chunk 1
    assert lane.next_read(0.0) == (8, 12)  # chunk 1 is someone's: maybe a helper's
    lane.read_done(8)
    assert lane.next_read(1.0) == (12, 16)
    lane.read_done(12)
    assert lane.next_read(1.5) is None
    # nothing came for a while (a reader that died left chunk 1 half spread): what
    # nobody holds of it is read, not what is around
    assert lane.next_read(2.5) == (4, 5)
    assert lane.next_read(2.5) == (6, 8)
    assert ex.state[5] == MISSING  # the neighbour brings that one


def test_a_client_far_ahead_is_read_at_once_even_by_a_non_reader() -> None:
    members = [f"h{i}" for i in range(8)]
    me = next(m for m in members if m not in readers("img", members, 1))
    geo = Geometry(64 * KiB, 4 * KiB, KiB)
    ex = Exchange(geo, [], random.Random(1))
    lane = OriginLane(ex, me, "img", members, 1, 30.0, now=0.0, gather=0.0)
    assert lane.next_read(0.0) is None
    ex.want([1])  # near the front: its reader will get to it
    assert lane.next_read(0.0) is None
    ex.want([60])  # far ahead (chunk 15)
    assert lane.next_read(0.0) == (60, 64)


def test_a_host_left_without_neighbours_reads_what_it_lacks_after_a_quiet_spell() -> None:
    members = ["a", "b"]
    me = next(m for m in members if m not in readers("img", members, 1))
    ex = _exchange()
    lane = OriginLane(ex, me, "img", [m for m in members if m != me], 1, 30.0, 0.0, gather=0.0)
    assert lane.next_read(5.0) is None  # the reader will bring it
    assert lane.next_read(10.5) == (0, 4)  # nobody linked to us (the reader refused us)
    assert lane.stalled


@pytest.mark.parametrize(
    ("blocks_keep_coming", "reads_it"),
    [
        # a slow swarm (a 50 Mbit/s link, many hosts) still brings blocks: the client
        # waits for the swarm; 15 hosts reading the same blocks from the origin would
        # take the origin's link from its readers (seen: 1.2-2.9 copies at 16-32 hosts)
        (True, False),
        # nothing comes any more (the only holder refuses us): read it from the origin
        (False, True),
    ],
)
def test_a_client_waiting_long_reads_the_origin_only_once_the_swarm_is_quiet(
    blocks_keep_coming: bool, reads_it: bool
) -> None:
    members = [f"h{i}" for i in range(8)]
    me = next(m for m in members if m not in readers("img", members, 1))
    geo = Geometry(64 * KiB, 4 * KiB, KiB)
    ex = Exchange(geo, [], random.Random(1))
    lane = OriginLane(ex, me, "img", members, 1, 30.0, now=0.0, gather=0.0)
    ex.add_neighbour("holder", _bits(64, [0, 1, 2, 3]))  # never gives us a slot
    ex.want([0])
    assert lane.next_read(0.0) is None  # a neighbour holds it: wait
    t = 0.0
    while t < URGENT_WAIT + QUIET + 1:
        t += 0.5
        if blocks_keep_coming:
            lane.landed(t)  # other blocks arrive from other neighbours
        got = lane.next_read(t)
        if got is not None:
            break
    assert (got is not None) == reads_it
    if reads_it:
        assert got == (0, 4)  # from the block waited for, what nobody serving us holds
        assert t > URGENT_WAIT


def test_a_dead_reader_is_replaced_by_the_next_in_rank_on_every_host() -> None:
    members = [f"h{i}" for i in range(6)]
    order = rank("img", members)
    lanes = [_lane(_exchange(), m, [o for o in members if o != m], 2) for m in members]
    assert all(lane.readers == order[:2] for lane in lanes)
    for lane in lanes:
        if lane.self_id != order[0]:
            assert lane.replace(order[0])
            assert lane.replace("not-a-reader") is False
    survivors = [lane for lane in lanes if lane.self_id != order[0]]
    assert all(lane.readers == order[1:3] for lane in survivors)
    assert next(lane for lane in survivors if lane.self_id == order[2]).is_reader()


def test_a_failed_origin_read_gives_its_blocks_back() -> None:
    ex = _exchange()
    lane = _lane(ex, "me", [], concurrency=1)
    first, end = lane.next_read(0.0) or (0, 0)
    ex.landed(first)
    ex.landed(first + 1)
    lane.read_done(first, failed_from=first + 2)
    assert [ex.state[b] for b in range(first, end)] == [HAVE, HAVE, MISSING, MISSING]
    assert lane.next_read(0.0) == (first + 2, end)


# -- the active set -----------------------------------------------------------------------------


def test_active_set_looks_for_degree_and_takes_at_most_twice_that() -> None:
    links = ActiveSet(3, random.Random(1))
    chosen = links.choose([f"n{i}" for i in range(10)])
    assert len(chosen) == 3
    for n in chosen:
        links.add(n)
    assert links.wanted() == 0
    assert links.choose(["x", "y"]) == []
    for i in range(3):
        assert links.accept(f"in{i}")
        links.add(f"in{i}")
    assert not links.accept("one-too-many")
    assert links.accept(chosen[0])  # a link we have is fine
    links.drop(chosen[0])
    assert links.accept("one-too-many")


def test_the_successor_of_a_dead_reader_finishes_its_half_spread_chunks_at_once() -> None:
    members = [f"h{i}" for i in range(4)]
    top = readers("img", members, 1)
    heir = rank("img", members)[1]
    ex = _exchange()
    lane = _lane(ex, heir, [m for m in members if m != heir], 1)
    assert not lane.is_reader()
    ex.add_neighbour(top[0], _bits(16, [0, 1, 5]))  # it read chunk 0's first blocks, one of 1
    assert lane.next_read(0.5) is None  # the reader is alive: its share is its own
    assert lane.replace(top[0])  # it died
    ex.drop_neighbour(top[0])
    ex.add_neighbour("n", _bits(16, [0, 1, 5]))  # a neighbour got those blocks before
    assert lane.is_reader()
    # blocks still arrive from elsewhere (the swarm is not quiet), yet the chunks it
    # left half spread are read now, what nobody holds of them only
    for run in ((2, 4), (4, 5), (6, 8)):
        assert lane.next_read(0.6) == run
        lane.read_done(run[0])


def test_a_block_a_client_waits_for_is_read_anyway_when_nobody_serves_it_in_time() -> None:
    members = ["a", "b"]
    me = next(m for m in members if m not in readers("img", members, 1))
    ex = _exchange()
    lane = OriginLane(ex, me, "img", [m for m in members if m != me], 1, 30.0, 0.0, gather=0.0)
    other = next(m for m in members if m != me)
    ex.add_neighbour(other, _bits(16, range(16)))  # the reader holds it all, serves us not
    ex.add_neighbour("c", _bits(16, []))
    ex.want([1])
    assert lane.next_read(1.0) is None  # near the front: its reader will bring it
    assert lane.next_read(5.0) is None
    assert lane.next_read(11.5) == (1, 4)  # the client waited long enough


def _landing_every(gap: float | None) -> Exchange:
    """An exchange where blocks landed steadily every `gap` seconds (None: none yet),
    so its landing-time EWMA is `gap`."""
    ex = _exchange(blocks=64, per_chunk=4)
    if gap is not None:
        for n in range(20):
            ex.landed(n, None, n * gap)
        ex.landed(3, None, 1e6)  # a duplicate landing does not count as a gap
    return ex


@pytest.mark.parametrize(
    ("gap", "expected"),
    [
        (None, 0.001),  # nothing landed yet: the first blocks' news goes out at once
        (0.0105, 0.02),  # 200 Mbit/s, a 256 KiB block every 10.5 ms: capped
        (0.0021, 0.0084),  # 1 Gbit/s: four blocks' time
        (0.0002, 0.001),  # 10 Gbit/s: floored
    ],
)
def test_haves_wait_about_four_blocks_landing_time(gap: float | None, expected: float) -> None:
    assert _landing_every(gap).have_batch() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("gap", "expected"),
    [
        (None, ROTATE),  # nothing landed yet
        (0.042, 0.336),  # 50 Mbit/s, a 256 KiB block every 42 ms: eight blocks' time
        (0.0021, 0.0168),  # 1 Gbit/s
        (0.0002, ROTATE_MIN),  # 10 Gbit/s: floored
        (0.5, ROTATE_MAX),  # capped
    ],
)
def test_upload_slots_turn_about_every_eight_blocks_landing_time(
    gap: float | None, expected: float
) -> None:
    assert _landing_every(gap).rotate_every() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("gap", "expected"),
    [
        (None, QUIET),  # nothing landed yet
        (0.0105, QUIET),  # 200 Mbit/s, a block every 10.5 ms: 32 blocks' time is less
        (0.2, 6.4),  # blocks land every 0.2 s (64 daemons on 2 cores): 32 blocks' time
        (2.0, QUIET_MAX),  # capped
    ],
)
def test_the_swarm_counts_as_quiet_after_about_32_blocks_landing_time(
    gap: float | None, expected: float
) -> None:
    assert _landing_every(gap).quiet_after() == pytest.approx(expected)


def test_in_a_slow_swarm_a_reader_waits_longer_before_a_half_spread_chunk() -> None:
    """As in the test above, but blocks landed every 0.2 s: a pause of 3 s is the
    swarm being slow, not quiet; the half-spread chunk is read once the pause passes
    32 blocks' landing time (6.4 s)."""
    ex = _exchange()
    lane = _lane(ex, "me", [])
    ex.add_neighbour("n", _bits(16, [0, 1, 2, 3, 5]))
    assert lane.next_read(0.0) == (8, 12)
    lane.read_done(8)
    for n, block in enumerate(range(8, 12)):  # the run lands, a block every 0.2 s
        ex.landed(block, None, n * 0.2)
        lane.landed(n * 0.2)
    ex.landed(0, "n", 0.8)
    lane.landed(0.8)
    assert lane.next_read(0.8) == (12, 16)
    lane.read_done(12)
    for n, block in enumerate(range(12, 16)):
        ex.landed(block, None, 1.0 + n * 0.2)
        lane.landed(1.0 + n * 0.2)
    last = 1.6
    assert 6.0 < ex.quiet_after() < 7.0
    assert lane.next_read(last + QUIET + 1) is None  # would be quiet on a fast link
    assert lane.next_read(last + 5.0) is None
    assert lane.next_read(last + 7.0) == (4, 5)


def test_neighbour_holds_what_it_told_us() -> None:
    ex = _exchange()
    ex.add_neighbour("a", _bits(16, [1, 2]))
    ex.neighbour_has("a", [9])
    assert [b for b in range(16) if ex.neighbour_holds("a", b)] == [1, 2, 9]
    assert not ex.neighbour_holds("nobody", 1)
    ex.drop_neighbour("a")
    assert not ex.neighbour_holds("a", 1)


@pytest.mark.parametrize("seed", range(5))
def test_the_blocks_seen_per_chunk_follow_neighbours_coming_growing_and_going(seed: int) -> None:
    """`seen[c]`: how many blocks of chunk c some neighbour holds (the origin lane
    skips such chunks without looking at every block)."""
    rng = random.Random(seed)
    ex = _exchange(blocks=61, per_chunk=8)  # a short last chunk
    nodes = [f"n{i}" for i in range(4)]
    for _ in range(200):
        node, op = rng.choice(nodes), rng.random()
        if op < 0.2:
            ex.add_neighbour(node, _bits(61, rng.sample(range(61), rng.randrange(20))))
        elif op < 0.3:
            ex.drop_neighbour(node)
        else:
            ex.neighbour_has(node, rng.sample(range(-2, 64), 3))  # out of range ignored
        assert ex.seen == [
            sum(1 for b in ex.geometry.blocks_of(c) if ex.count[b]) for c in range(8)
        ]


def test_a_fetch_that_has_not_landed_two_blocks_does_not_hurry_the_others_haves() -> None:
    fast, new = _landing_every(0.0021), _landing_every(None)  # 1 Gbit/s; just started
    assert new.have_batch() == pytest.approx(HAVE_BATCH_MIN)
    assert shortest_have_batch([fast, new]) == pytest.approx(0.0084)  # the known rate's
    assert shortest_have_batch([new]) == pytest.approx(HAVE_BATCH_MIN)  # alone, its own
    assert shortest_have_batch([]) == HAVE_BATCH


def test_a_host_holding_the_whole_image_turns_its_slots_unhurried() -> None:
    ex = _exchange(blocks=64, per_chunk=4)
    for n in range(64):  # the whole image at 10 Gbit/s
        ex.landed(n, None, n * 0.0002)
    assert ex.finished
    assert ex.rotate_every() == pytest.approx(ROTATE)  # seeding: not every 5 ms
