"""Table-driven tests of the pure modules: sizes, config, manifest, ranges, eviction, plan."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import msgpack
import pytest
import xxhash

from swarmcache.config import build_config, parse_duration, parse_size
from swarmcache.errors import ConfigError, IntegrityError, InvalidImageId, RangeNotSatisfiable
from swarmcache.eviction import Candidate, plan_eviction
from swarmcache.manifest import (
    DIGEST_ALGOS,
    LOG_RECORD_SIZE,
    Checksum,
    Manifest,
    bitmap_count,
    bitmap_get,
    bitmap_new,
    bitmap_set,
    block_digest,
    chunk_count,
    chunk_span,
    decode_log,
    digest_blocks,
    encode_log_record,
    pieces_size,
    validate_image_id,
)
from swarmcache.origin import backoff_delay, parse_sha256_sidecar
from swarmcache.ranges import parse_range


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4MiB", 4 * 1024**2),
        ("50GiB", 50 * 1024**3),
        ("1TiB", 1024**4),
        ("512K", 512 * 1024),
        ("10 GB", 10 * 1024**3),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("123", 123),
        (4096, 4096),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "4 XB", "-1", "4MiBs", True, 1.5, None])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), (3, 3.0), ("1.5", 1.5)],
)
def test_parse_duration(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


def test_config_defaults_are_the_documented_ones() -> None:
    cfg = build_config({}, {}, "x")
    # peers on the LAN must reach the daemon (issue 3): every address by default
    assert cfg.daemon.listen == "0.0.0.0:7480"
    assert cfg.daemon.advertise == ""
    assert (cfg.discovery.mdns, cfg.discovery.interfaces, cfg.discovery.static_peers) == (
        True,
        (),
        (),
    )
    assert str(cfg.cache.dir) == "/var/lib/swarmcache"
    assert cfg.cache.max_size == 50 * 1024**3
    assert cfg.cache.chunk_size == 4 * 1024**2
    assert cfg.origin.kind == "http"
    assert (cfg.daemon.host, cfg.daemon.port) == ("0.0.0.0", 7480)


def test_config_env_overrides_file() -> None:
    raw = {"cache": {"dir": "/a", "max_size": "1GiB"}}
    env = {
        "SWARMCACHE_CACHE_DIR": "/b",
        "SWARMCACHE_ORIGIN_KIND": "directory",
        "SWARMCACHE_ORIGIN_RETRIES": "7",
        "SWARMCACHE_ORIGIN_CHECKSUM_SIDECAR": "false",
        "SWARMCACHE_CONFIG": "/ignored",
        "OTHER": "x",
    }
    cfg = build_config(raw, env, "f.toml")
    assert str(cfg.cache.dir) == "/b"
    assert cfg.cache.max_size == 1024**3
    assert cfg.origin.kind == "directory"
    assert cfg.origin.retries == 7
    assert cfg.origin.checksum_sidecar is False


@pytest.mark.parametrize(
    ("raw", "env", "message"),
    [
        ({"cache": {"colour": 1}}, {}, "f.toml: cache.colour: unknown key"),
        ({"nope": {}}, {}, "f.toml: nope: unknown section [nope]"),
        ({"cache": {"max_size": "lots"}}, {}, "f.toml: cache.max_size: cannot parse size 'lots'"),
        ({"cache": {"dir": 5}}, {}, "f.toml: cache.dir: expected a string, got 5"),
        ({"origin": {"kind": "ftp"}}, {}, "f.toml: origin.kind: expected one of http, directory"),
        ({"daemon": {"listen": "nohost"}}, {}, "f.toml: daemon.listen: expected host:port"),
        (
            {"discovery": {"static_peers": ["10.0.0.1"]}},
            {},
            "f.toml: discovery.static_peers: expected host:port, got '10.0.0.1'",
        ),
        (
            {"discovery": {"interfaces": "eth0"}},
            {"SWARMCACHE_DISCOVERY_MDNS": "maybe"},
            "environment SWARMCACHE_DISCOVERY_MDNS: discovery.mdns: expected true or false",
        ),
        ({"origin": {"url": "http://x/"}}, {}, "f.toml: origin.url: must contain {image_id}"),
        ({"cache": {"chunk_size": "1KiB"}}, {}, "cache.chunk_size: must be between"),
        ({}, {"SWARMCACHE_CACHE_MAXSIZE": "1"}, "environment SWARMCACHE_CACHE_MAXSIZE: no such"),
        ({}, {"SWARMCACHE_ORIGIN_RETRIES": "many"}, "origin.retries: expected an integer"),
    ],
)
def test_config_errors_name_source_key_and_problem(raw: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config(raw, env, "f.toml")
    assert message in exc.value.detail


@pytest.mark.parametrize(
    "good", ["a", "cirros-0.6.2", "A.b_c-d", "9" * 128, "3f1c2a4e-1b2c-4d5e-8f90-123456789abc"]
)
def test_valid_image_ids(good: str) -> None:
    assert validate_image_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "../etc/passwd", ".hidden", "-x", "a/b", "a b", "x" * 129, "é", "a\x00"]
)
def test_invalid_image_ids(bad: str) -> None:
    with pytest.raises(InvalidImageId):
        validate_image_id(bad)


@pytest.mark.parametrize(
    ("size", "chunk", "count", "last"),
    [(0, 4, 0, None), (1, 4, 1, (0, 1)), (4, 4, 1, (0, 4)), (9, 4, 3, (8, 1)), (12, 4, 3, (8, 4))],
)
def test_chunk_geometry(size: int, chunk: int, count: int, last: tuple | None) -> None:
    assert chunk_count(size, chunk) == count
    if last is not None:
        assert chunk_span(count - 1, size, chunk) == last
    with pytest.raises(IndexError):
        chunk_span(count, size, chunk)


def test_manifest_roundtrip_and_etag() -> None:
    m = Manifest(
        "img",
        size=10,
        chunk_size=4,
        origin_hash=Checksum("sha256", "a" * 64),
        origin_validator="v1",
    )
    assert m.digest(1) is None
    m.set_digest(1, block_digest([b"abcd"]))
    back = Manifest.decode(m.encode())
    assert back == m
    assert back.digest(1) == block_digest([b"abcd"])
    assert m.etag == back.etag
    assert m.same_source(back)
    other = Manifest(
        "img",
        size=10,
        chunk_size=4,
        origin_hash=Checksum("sha256", "b" * 64),
        origin_validator="v1",
    )
    assert m.etag != other.etag
    assert not m.same_source(other)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        Manifest("img", 10, 4).encode()[:-3],
        Manifest("img", 10, 4).encode() + b"x",
    ],
)
def test_manifest_decode_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(IntegrityError):
        Manifest.decode(blob)


def test_manifest_decode_rejects_wrong_digest_count_and_bad_id() -> None:
    good = msgpack.unpackb(Manifest("img", 10, 4).encode())
    for change in (
        {"digests": b"\0" * 16},
        {"id": "../x"},
        {"v": 99},
        {"size": -1},
        {"origin_hash": "sha256:zz"},
        {"digest": "crc32"},
    ):
        with pytest.raises(IntegrityError):
            Manifest.decode(msgpack.packb({**good, **change}))


@pytest.mark.parametrize("cuts", [[], [0], [1], [7, 8, 9], [100, 4095], [5000]])
def test_a_digest_of_pieces_is_the_digest_of_the_joined_bytes(cuts: list[int]) -> None:
    data = bytes(range(256)) * 20
    bounds = [0, *cuts, len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert pieces_size(pieces) == len(data)
    for algo in DIGEST_ALGOS:
        assert block_digest(pieces, algo) == block_digest([data], algo)
        assert block_digest([memoryview(p) for p in pieces], algo) == block_digest([data], algo)


def test_chunk_log_stops_at_torn_or_corrupt_record() -> None:
    records = b"".join(encode_log_record(i, block_digest([bytes([i])])) for i in range(3))
    assert [i for i, _ in decode_log(records, 3)] == [0, 1, 2]
    assert [i for i, _ in decode_log(records[:-5], 3)] == [0, 1]
    corrupt = bytearray(records)
    corrupt[LOG_RECORD_SIZE + 2] ^= 0xFF
    assert [i for i, _ in decode_log(bytes(corrupt), 3)] == [0]
    assert [i for i, _ in decode_log(records, 2)] == [0, 1]  # index out of range


def test_bitmap() -> None:
    bm = bitmap_new(20)
    assert len(bm) == 3
    for i in (0, 7, 8, 19):
        bitmap_set(bm, i)
    assert [i for i in range(20) if bitmap_get(bm, i)] == [0, 7, 8, 19]
    assert bitmap_count(bm) == 4


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-", 100, (90, 99)),
        ("bytes=90-500", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),
        ("bytes = 5 - 6", 100, (5, 6)),
        ("items=0-9", 100, None),
        ("bytes=0-1,5-6", 100, None),
        ("bytes=9-0", 100, None),
        ("bytes=x-y", 100, None),
        ("bytes=-", 100, None),
        ("garbage", 100, None),
        # numbers longer than int() takes (4,300 digits) or than any image
        ("bytes=0-" + "9" * 5000, 100, (0, 99)),
        ("bytes=-" + "9" * 5000, 100, (0, 99)),
        ("bytes=" + "0" * 5000 + "5-9", 100, (5, 9)),
        ("bytes=5-" + "0" * 5000 + "9", 100, (5, 9)),
        ("bytes=" + "9" * 25 + "-" + "1" * 20, 100, None),  # end before start
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-", 100),
        ("bytes=500-600", 100),
        ("bytes=-0", 100),
        ("bytes=-5", 0),
        ("bytes=" + "9" * 5000 + "-", 100),
        ("bytes=" + "1" * 20 + "-" + "9" * 30, 100),
    ],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


def C(i: str, b: int, t: float, complete: bool = True, **kw: bool) -> Candidate:
    return Candidate(image_id=i, bytes=b, last_access=t, complete=complete, **kw)


@pytest.mark.parametrize(
    ("entries", "max_size", "incoming", "expected"),
    [
        ([C("a", 10, 1), C("b", 10, 2)], 20, 0, []),
        ([C("a", 10, 1), C("b", 10, 2)], 15, 0, ["a"]),
        ([C("a", 10, 3), C("b", 10, 2)], 15, 0, ["b"]),
        ([C("a", 10, 1), C("b", 10, 2)], 20, 5, ["a"]),
        ([C("a", 10, 1, pinned=True), C("b", 10, 2)], 15, 0, ["b"]),
        ([C("a", 10, 1, in_use=True), C("b", 10, 2)], 15, 0, ["b"]),
        ([C("p", 10, 0, complete=False), C("a", 10, 5)], 15, 0, ["a"]),
        ([C("p", 10, 0, complete=False), C("a", 10, 5)], 5, 0, ["a", "p"]),
        ([C("a", 10, 1, pinned=True), C("b", 10, 2, in_use=True)], 5, 0, []),
        ([C("a", 1, 1), C("b", 1, 2), C("c", 30, 3)], 20, 0, ["a", "b", "c"]),
    ],
)
def test_plan_eviction(entries: list, max_size: int, incoming: int, expected: list) -> None:
    assert plan_eviction(entries, max_size, incoming) == expected


@pytest.mark.parametrize(
    ("entries", "max_size", "expected"),
    [
        # the LRU image is in use: nothing younger goes in its stead (it goes later)
        ([C("a", 10, 1, in_use=True), C("b", 10, 2)], 15, []),
        # ... but what is older than it, or needed beyond it, does
        ([C("o", 5, 0), C("a", 10, 1, in_use=True), C("b", 10, 2)], 15, ["o"]),
        ([C("a", 10, 1, in_use=True), C("b", 10, 2), C("c", 10, 3)], 15, ["b"]),
        # pinned images are out of the order altogether, as without waiting
        ([C("a", 10, 1, pinned=True), C("b", 10, 2)], 15, ["b"]),
        ([C("a", 10, 1), C("b", 10, 2)], 15, ["a"]),
    ],
)
def test_plan_eviction_waiting_for_images_in_use(
    entries: list, max_size: int, expected: list
) -> None:
    assert plan_eviction(entries, max_size, wait=True) == expected


def test_backoff_is_bounded_and_jittered() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 4.0, rng) for a in range(8)]
    assert all(0 <= d <= min(4.0, 0.5 * 2**a) for a, d in enumerate(delays))
    assert len(set(delays)) == len(delays)


def test_sha256_sidecar_formats() -> None:
    h = "AB" * 32
    assert parse_sha256_sidecar(f"{h}  img.raw\n".encode()) == h.lower()
    assert parse_sha256_sidecar(f"{h}\n".encode()) == h.lower()
    for bad in (b"", b"xyz  img", b"ab" * 31 + b"  img", b"ab" * 33):
        with pytest.raises(ValueError, match="sha256sum"):
            parse_sha256_sidecar(bad)


def test_shipped_config_documents_every_key_with_its_default() -> None:
    from dataclasses import replace
    from pathlib import Path

    from swarmcache.config import SCHEMA, load_config

    path = Path(__file__).parent.parent / "config" / "swarmcache.toml"
    shipped = load_config(path, env={})
    assert replace(shipped, source="x") == replace(build_config({}, {}, "x"), source="x")
    import tomllib

    raw = tomllib.loads(path.read_text())
    assert {s: set(keys) for s, keys in raw.items()} == {s: set(k) for s, k in SCHEMA.items()}


def test_origin_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="must start with http:// or https://"):
        build_config({"origin": {"url": "ftp://x/{image_id}"}}, {}, "f.toml")


def test_manifest_with_blocks_round_trips_and_version_1_still_loads() -> None:
    m = Manifest("img", size=10 * 1024 + 1, chunk_size=4096, block_size=1024)
    assert (m.chunks, m.blocks, list(m.blocks_of(2))) == (3, 11, [8, 9, 10])
    m.set_block_digest(10, b"\x05" * 16)
    back = Manifest.decode(m.encode())
    assert back == m
    assert back.block_digest(10) == b"\x05" * 16
    assert back.block_digest(9) is None
    v1 = msgpack.packb(
        {
            "v": 1,
            "id": "old",
            "size": 8192,
            "chunk_size": 4096,
            "origin_sha256": None,
            "origin_validator": "",
            "sha256": None,
            "complete": False,
            "digests": bytes(32),
        },
        use_bin_type=True,
    )
    old = Manifest.decode(v1)
    assert (old.block_size, old.blocks, list(old.blocks_of(0))) == (0, 0, [])


def test_xxh3_manifests_with_sha256_stay_version_2_and_others_are_version_3() -> None:
    """An xxh3 manifest (what versions before 4 wrote) with sha256 hashes is written as
    before ("v": 2, hex digests), so a daemon of that version reads it from disk after a
    rollback and from a peer during a rolling upgrade, and its ETag is the one it always
    had; another algorithm needs version 3 ("algo:hex")."""
    sha = Manifest(
        "img",
        size=10,
        chunk_size=4,
        origin_hash=Checksum("sha256", "a" * 64),
        complete=True,
        digest_algo="xxh3",
    )
    sha.image_hash = Checksum("sha256", "a" * 64)
    obj = msgpack.unpackb(sha.encode())
    assert (obj["v"], obj["origin_sha256"], obj["sha256"]) == (2, "a" * 64, "a" * 64)
    assert "origin_hash" not in obj
    assert Manifest.decode(sha.encode()) == sha
    # the ETag of the versions before (pinned: peers send it as If-Match), whatever the digest
    assert (
        sha.etag
        == dataclasses.replace(sha, digest_algo="blake3").etag
        == '"' + xxhash.xxh3_64_hexdigest(b"img\0" + b"a" * 64) + '"'
    )
    sha512 = Manifest(
        "img", size=10, chunk_size=4, origin_hash=Checksum("sha512", "b" * 128), digest_algo="xxh3"
    )
    obj = msgpack.unpackb(sha512.encode())
    assert (obj["v"], obj["origin_hash"], obj["image_hash"]) == (3, "sha512:" + "b" * 128, None)
    assert Manifest.decode(sha512.encode()) == sha512


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("sha512:" + "ab" * 64, None),
        ("md5:" + "0" * 32, None),
        ("sha256:" + "A" * 64, "not a sha256 hex digest"),  # Glance and sha256sum write lower case
        ("sha512:" + "ab" * 32, "not a sha512 hex digest"),
        ("crc32:00000000", "unsupported hash algorithm"),
        ("ab" * 32, "expected 'algo:hex'"),
        ("sha256:", "not a sha256 hex digest"),
    ],
)
def test_checksum_text_form(text: str, problem: str | None) -> None:
    if problem is None:
        assert str(Checksum.parse(text)) == text
    else:
        with pytest.raises(ValueError, match=problem):
            Checksum.parse(text)


def test_manifest_from_a_peer_with_a_bad_checksum_is_an_integrity_error() -> None:
    m = Manifest("img", size=8192, chunk_size=4096, origin_hash=Checksum("md5", "0" * 32))
    obj = msgpack.unpackb(m.encode())
    obj["origin_hash"] = "sha512:" + "zz" * 64
    with pytest.raises(IntegrityError, match="sha512 hex digest"):
        Manifest.decode(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    ("block_size", "digests", "problem"),
    [
        (1000, b"", "multiple"),
        (1024, b"\x00" * 16, "block digest list"),
        (-1, b"", "block_size"),
    ],
)
def test_manifest_refuses_bad_blocks(block_size: int, digests: bytes, problem: str) -> None:
    obj = msgpack.unpackb(Manifest("img", size=8192, chunk_size=4096).encode())
    obj.update(block_size=block_size, block_digests=digests)
    with pytest.raises(IntegrityError, match=problem):
        Manifest.decode(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize("algo", DIGEST_ALGOS)
def test_digest_blocks_in_one_pass_over_uneven_pieces(algo: str) -> None:
    data = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: 10 full blocks and a short one
    pieces = [data[:1], data[1:3000], data[3000:3000], data[3000:]]
    chunk, blocks = digest_blocks(pieces, 1024, algo)
    assert blocks == [block_digest([data[i : i + 1024]], algo) for i in range(0, len(data), 1024)]
    if algo == "xxh3":  # not a hash tree: the chunk's digest is that of its bytes
        assert chunk == block_digest([data], algo)
    else:  # the hash of its block digests: the data is hashed once
        assert chunk == block_digest(blocks, algo)
    assert digest_blocks(pieces, 0, algo) == (block_digest([data], algo), [])


def test_digests_are_the_named_algorithms_at_128_bits() -> None:
    import blake3

    data = b"swarmcache" * 1000
    assert block_digest([data], "blake3") == blake3.blake3(data).digest()[:16]
    assert block_digest([data], "sha256") == hashlib.sha256(data).digest()[:16]
    assert block_digest([data], "xxh3") == xxhash.xxh3_128_digest(data)
    assert block_digest([data]) == block_digest([data], "blake3")  # the default


def test_blake3_manifests_are_version_4_and_name_their_digest() -> None:
    m = Manifest("img", size=8192, chunk_size=4096, block_size=1024, digest_algo="sha256")
    obj = msgpack.unpackb(m.encode())
    assert (obj["v"], obj["digest"]) == (4, "sha256")
    assert Manifest.decode(m.encode()) == m
    old = Manifest("img", size=8192, chunk_size=4096, block_size=1024, digest_algo="xxh3")
    assert msgpack.unpackb(old.encode())["v"] == 2  # what daemons before version 4 read
    assert Manifest.decode(old.encode()).digest_algo == "xxh3"
    assert not m.same_source(old)  # digests of one cannot check blocks of the other
    obj["digest"] = "md5"
    with pytest.raises(IntegrityError, match="digest algorithm"):
        Manifest.decode(msgpack.packb(obj, use_bin_type=True))
