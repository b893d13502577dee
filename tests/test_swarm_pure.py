"""Pure parts of the swarm: wire messages and the peer table (the exchange itself is
tested in test_exchange.py)."""

from __future__ import annotations

import msgpack
import pytest

from swarmcache.manifest import Checksum, Manifest
from swarmcache.peers.table import DOWN_AFTER, PeerTable
from swarmcache.wire import (
    MAX_MESSAGE,
    MAX_PEERS,
    Have,
    Hello,
    Join,
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

# -- wire ---------------------------------------------------------------------------


def _manifest() -> Manifest:
    m = Manifest(
        "img",
        size=10 * 1024,
        chunk_size=2048,
        origin_hash=Checksum("sha256", "a" * 64),
        block_size=1024,
    )
    m.set_digest(3, b"\x07" * 16)
    m.set_block_digest(7, b"\x09" * 16)
    return m


@pytest.mark.parametrize(
    "msg",
    [
        Hello("n1", "10.0.0.1", 7480),
        Hello("n1", "10.0.0.1", 7480, seeder=True),
        Subscribe("img", True),
        Unsubscribe("img"),
        State("img", _manifest(), b"\x80\x00", True),
        State("img", None, b"", False),
        Have("img", ((3, b"\x07" * 16), (4, b"\x01" * 16))),
        Slot("img", True),
        Status("img", False, gone=True),
        Join("img", "n1", "10.0.0.1", 7480, True),
        Peers("img", _manifest(), (("n2", "10.0.0.2", 7480),)),
        Peers("img", None, ()),
    ],
)
def test_wire_round_trip(msg: object) -> None:
    assert decode(encode(msg)) == msg  # type: ignore[arg-type]


def _raw(**body: object) -> bytes:
    return msgpack.packb({"v": 2, **body}, use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"v": 1, "t": "hello"}), "unsupported protocol version 1"),
        (_raw(t="nope", image="img"), "unknown message type"),
        (_raw(t="sub", image="../etc", fetching=True), "malformed"),
        (_raw(t="sub", image="img", fetching=1), "malformed"),
        (_raw(t="have", image="img", blocks=[[1, b"short"]]), "malformed"),
        (_raw(t="have", image="img", blocks=[[-1, b"x" * 16]]), "malformed"),
        (_raw(t="slot", image="img", open="yes"), "malformed"),
        (_raw(t="peers", image="img", manifest=None, peers=[["n", "h", 0]]), "malformed"),
        (
            _raw(t="peers", image="img", manifest=None, peers=[["n", "h", 1]] * (MAX_PEERS + 1)),
            "malformed",
        ),
        (_raw(t="join", image="img", node="n", host="h", port=1, fetching="x"), "malformed"),
        (_raw(t="hello", node="", host="h", port=1), "malformed"),
        (_raw(t="hello", node="n", host="h", port=70000), "malformed"),
        (
            _raw(t="state", image="img", manifest=b"junk", have=b"", fetching=False),
            "malformed",
        ),
        (
            _raw(
                t="state",
                image="img",
                manifest=_manifest().encode(),
                have=b"\x00",  # 10 blocks need 2 bytes
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


def test_wire_refuses_a_state_without_blocks_or_of_another_image() -> None:
    old = Manifest("img", size=4096, chunk_size=1024)  # no block_size: a version 1 daemon
    with pytest.raises(WireError, match="without blocks"):
        decode(_raw(t="state", image="img", manifest=old.encode(), have=b"", fetching=False))
    other = Manifest("other", size=4096, chunk_size=1024, block_size=1024)
    with pytest.raises(WireError, match="another image"):
        decode(_raw(t="state", image="img", manifest=other.encode(), have=b"\x00", fetching=False))


def test_haves_of_an_image_go_out_as_one_message_in_place() -> None:
    from swarmcache.peers.swarm import _merge_haves

    d = b"\x01" * 16
    batch = [
        Have("a", ((1, d),)),
        Slot("a", True),
        Have("b", ((7, d),)),
        Have("a", ((2, d), (3, d))),
        Status("a", False),
    ]
    assert _merge_haves(batch) == [
        Have("a", ((1, d), (2, d), (3, d))),
        Slot("a", True),
        Have("b", ((7, d),)),
        Status("a", False),
    ]


async def test_mdns_re_announces_at_once_for_images_and_once_a_minute_for_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every host hears every TXT update: a block landing does not cause one each few
    seconds (the counter moves with every block), an image held or dropped does."""
    import asyncio

    from swarmcache import discovery

    monkeypatch.setattr(discovery, "GEN_UPDATE_EVERY", 0.01)
    monkeypatch.setattr(discovery, "GEN_BLOCKS_EVERY", 0.5)
    held = {"gen": 0, "images": 1}
    updates: list[tuple[str, str]] = []

    class _Zc:
        async def async_update_service(self, info: object) -> None:
            props = info.properties  # type: ignore[attr-defined]
            updates.append((props[b"gen"].decode(), props[b"images"].decode()))

    d = discovery.Discovery(
        "n" * 16,
        7480,
        ["127.0.0.1"],
        lambda *a: None,
        lambda n: None,
        generation=lambda: held["gen"],
        inventory=lambda: (held["images"], 0),
    )
    d._info = d._service_info()
    d._zc = _Zc()  # type: ignore[assignment]
    task = asyncio.create_task(d._generation_loop())
    try:
        for _ in range(10):  # blocks land: no update for now
            held["gen"] += 1
            await asyncio.sleep(0.02)
        assert updates == []
        held["images"] = 2  # an image more: at once
        await asyncio.sleep(0.1)
        assert updates == [("10", "2")]
        held["gen"] += 5  # only blocks again: after GEN_BLOCKS_EVERY
        await asyncio.sleep(0.2)
        assert len(updates) == 1
        async with asyncio.timeout(2):
            while len(updates) < 2:
                await asyncio.sleep(0.02)
        assert updates[1] == ("15", "2")
    finally:
        task.cancel()


def test_uploading_is_a_run_of_blocks_sent_to_a_peer_that_lacks_some() -> None:
    """Swarm.uploading: an image counts while a neighbour that lacks blocks we hold got
    one within peers.timeout, for `within` seconds of a run of uploads at most; a
    pause longer than peers.timeout starts a new run. Asking is not enough."""
    import random

    from swarmcache.config import PeersConfig
    from swarmcache.exchange import ActiveSet, Exchange, Geometry
    from swarmcache.metrics import Metrics
    from swarmcache.peers.swarm import Swarm, Trade

    now = [100.0]
    swarm = Swarm("a" * 16, ("127.0.0.1", 1), PeersConfig(timeout=5.0), 4, Metrics(),
                  clock=lambda: now[0])  # fmt: skip
    m = Manifest("img", size=4 * 1024, chunk_size=1024, block_size=1024)
    ex = Exchange(Geometry(m.size, 1024, 1024), range(4), random.Random(1))
    swarm.trades["img"] = Trade("img", m, ex, ActiveSet(12, random.Random(1)))
    ex.add_neighbour("b", bytes([0b0001]))  # b lacks 3 blocks we hold
    ex.may_serve("b", now[0])  # it asks: not yet a reason to keep the image
    assert swarm.uploading(60) == set()
    for _ in range(15):  # a block every 4 s (< timeout): one run, 0 to 56 s
        swarm.sent("img", "b")
        assert swarm.uploading(60) == {"img"}
        now[0] += 4
    swarm.sent("img", "b")  # 60 s into the run: the grace is over, though it still reads
    assert swarm.uploading(60) == set()
    now[0] += 6  # a pause longer than the timeout...
    assert swarm.uploading(60) == set()
    swarm.sent("img", "b")  # ... then a new run
    assert swarm.uploading(60) == {"img"}
    ex.neighbour_has("b", [1, 2, 3])  # b has it all: nothing to keep it for
    assert swarm.uploading(60) == set()
