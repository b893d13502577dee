"""The swarm simulator's own accounting, on cases small enough to work out by hand,
and its guarantees on a few storms (every live host done, origin about once, links
bounded). Performance figures come from scripts/bench-sim, not from here."""

from __future__ import annotations

import pytest

from swarmcache.exchange import readers
from swarmtools.sim import MiB, SimConfig, simulate

RATE = 8 * MiB  # bytes/s: a 256 KiB block takes 1/32 s, far above the latency
LAT = 0.001


def test_one_host_reads_the_image_once_at_the_origins_pace() -> None:
    # 16 chunks over one origin link: the first request reaches the origin after LAT,
    # the link then never idles (4 reads in flight, the next asked long before the
    # link frees), and the last block arrives LAT after it left: size / rate + 2 LAT.
    res = simulate(SimConfig(hosts=1, size=16 * MiB, rate=RATE, latency=LAT))
    (host,) = res.hosts
    assert host.done == pytest.approx(16 * MiB / RATE + 2 * LAT)
    assert res.origin_bytes == 16 * MiB
    assert host.origin_bytes == host.bytes_in == 16 * MiB
    assert host.bytes_out == 0
    assert host.messages == 4  # one origin read per 4 MiB chunk, nobody to tell
    assert res.last / res.limit == pytest.approx(1 + 2 * LAT * RATE / (16 * MiB))


def test_a_late_joiner_reads_nothing_from_the_origin() -> None:
    # the reader fetches 4 MiB alone (done at 0.5 s + 2 LAT); the other joins at 10 s. Its link's
    # states cross (LAT), h0 gives it an upload slot (LAT), h1's first requests
    # reach h0 (LAT), h0's uplink then sends the image without a gap (2 requests in
    # flight, each block 1/32 s against 2 LAT of round trip), and the last block
    # arrives LAT after it left: 10 + 4 LAT + size / rate.
    size = 4 * MiB
    reader = readers("image", ["h0000", "h0001"], 1)[0]
    other = 1 - int(reader[1:])
    res = simulate(
        SimConfig(hosts=2, size=size, rate=RATE, latency=LAT, join={other: 10.0}, concurrency=1)
    )
    first, late = res.hosts[1 - other], res.hosts[other]
    assert first.done == pytest.approx(size / RATE + 2 * LAT)
    assert late.done == pytest.approx(10.0 + 4 * LAT + size / RATE)
    assert late.origin_bytes == 0
    assert res.origin_bytes == size
    assert late.bytes_in == first.bytes_out == size


def test_hosts_starting_together_split_the_origin_reads() -> None:
    res = simulate(SimConfig(hosts=12, size=32 * MiB, rate=RATE, latency=LAT, degree=4))
    assert res.origin_bytes == 32 * MiB  # every block read once
    readers = [h for h in res.hosts if h.origin_bytes]
    assert 1 <= len(readers) <= 4  # origin.concurrency of them (8 chunks, shares by hash)
    assert all(h.done is not None for h in res.hosts)
    # bytes are conserved: all a host received came from the origin or a neighbour;
    # a copy beyond one per host is an endgame duplicate: a few blocks at the end, of
    # which some may still be on their way when the last host is done
    received = sum(h.bytes_in for h in res.hosts)
    assert received + res.in_flight == res.origin_bytes + sum(h.bytes_out for h in res.hosts)
    assert 12 * 32 * MiB <= received <= 1.01 * 12 * 32 * MiB
    assert max(h.max_links for h in res.hosts) <= 8  # twice the degree at most
    assert res.last >= res.limit  # nobody beats physics


def test_a_slow_host_is_held_to_its_own_link_and_holds_nobody_else_up() -> None:
    names = [f"h{i:04d}" for i in range(6)]
    top = readers("image", names, 4)
    slow = next(i for i, n in enumerate(names) if n not in top)  # not a reader
    res = simulate(SimConfig(hosts=6, size=64 * MiB, rate=RATE, latency=LAT, slow={slow: 0.25}))
    late = res.hosts[slow]
    assert late.done is not None
    assert late.done >= 64 * MiB / (RATE * 0.25)
    others = [h.done for i, h in enumerate(res.hosts) if i != slow]
    assert all(d is not None and d <= 1.25 * res.limit for d in others)
    assert res.origin_bytes == 64 * MiB


def test_a_slow_reader_delays_the_others_but_the_origin_still_sends_the_image_once() -> None:
    # A known weakness, measured here so a fix shows: a reader at a quarter of the
    # link rate gets its share at its own pace, and the others wait for it.
    names = [f"h{i:04d}" for i in range(6)]
    slow = names.index(readers("image", names, 4)[0])
    cfg = SimConfig(hosts=6, size=64 * MiB, rate=RATE, latency=LAT, slow={slow: 0.25})
    res = simulate(cfg)
    assert all(h.done is not None for h in res.hosts)
    assert res.origin_bytes == 64 * MiB
    assert res.hosts[slow].done == res.last


@pytest.mark.parametrize("graceful", [False, True])
def test_a_reader_that_dies_or_leaves_mid_fetch_is_replaced(graceful: bool) -> None:
    base = SimConfig(hosts=8, size=32 * MiB, rate=RATE, latency=LAT, degree=4, detect=0.5)
    first = simulate(base)
    reader = next(i for i, h in enumerate(first.hosts) if h.origin_bytes)
    kind = "leaves" if graceful else "dies"
    cfg = SimConfig(**{**base.__dict__, kind: {reader: 1.0}})
    res = simulate(cfg)
    live = [h for i, h in enumerate(res.hosts) if i != reader]
    assert all(h.done is not None for h in live)
    assert res.last < float("inf")
    # what the reader read before it went is read again at most once by its successor
    assert res.origin_bytes <= 32 * MiB + res.hosts[reader].origin_bytes
