"""Property tests (hypothesis) of every decoder of untrusted input: peers' wire
messages and manifests, the chunk log and bitmaps read back from disk, Range headers
from clients (ours and the Glance-compatible endpoint's), checksums and sizes.

Two properties throughout: whatever the bytes, only our own error type escapes (a
peer or client can never crash a handler with a KeyError or an OverflowError); and
what we encode decodes to the same value.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import string

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmcache.config import parse_duration, parse_size
from swarmcache.errors import BadRequest, IntegrityError, RangeNotSatisfiable
from swarmcache.glance_api import _glance_range
from swarmcache.manifest import (
    DIGEST_SIZE,
    HASH_ALGORITHMS,
    LOG_RECORD_SIZE,
    Checksum,
    Manifest,
    bitmap_count,
    bitmap_get,
    bitmap_new,
    bitmap_set,
    decode_log,
    encode_log_record,
)
from swarmcache.ranges import parse_range
from swarmcache.signing import (
    Signer,
    Trust,
    decode_key,
    encode_key,
    new_private_key,
    signed_bytes,
)
from swarmcache.wire import (
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

# CI: 300 examples a property (a few seconds); HYPOTHESIS_PROFILE=deep for a long hunt
for _name, _examples in (("swarmcache", 300), ("deep", 20000)):
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "swarmcache"))

IMAGE_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)
NODES = st.text(string.hexdigits.lower(), min_size=1, max_size=64)
HOSTS = st.text(string.ascii_letters + string.digits + ".:-", max_size=64)
PORTS = st.integers(1, 65535)
DIGESTS = st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)


@st.composite
def checksums(draw: st.DrawFn) -> Checksum:
    """A valid Checksum of any known algorithm."""
    algo = draw(st.sampled_from(sorted(HASH_ALGORITHMS)))
    width = hashlib.new(algo).digest_size
    return Checksum(algo, draw(st.binary(min_size=width, max_size=width)).hex())


@st.composite
def manifests(draw: st.DrawFn, image_id: str | None = None) -> Manifest:
    """A manifest cut into blocks, some chunk and block digests known."""
    block = draw(st.sampled_from([16 * 1024, 64 * 1024]))
    chunk = block * draw(st.integers(1, 4))
    size = draw(st.integers(0, 20 * chunk))
    m = Manifest(
        image_id or draw(IMAGE_IDS),
        size=size,
        chunk_size=chunk,
        origin_hash=draw(st.none() | checksums()),
        origin_validator=draw(st.text(max_size=40)),
        block_size=block,
    )
    for i in draw(st.sets(st.integers(0, max(0, m.chunks - 1)), max_size=5)) if m.chunks else ():
        m.set_digest(i, draw(DIGESTS))
    for b in draw(st.sets(st.integers(0, max(0, m.blocks - 1)), max_size=5)) if m.blocks else ():
        m.set_block_digest(b, draw(DIGESTS))
    if draw(st.booleans()) and m.origin_hash is not None:
        m.image_hash, m.complete = m.origin_hash, True
    return m


@st.composite
def messages(draw: st.DrawFn) -> object:
    """Any wire message, valid by construction."""
    image = draw(IMAGE_IDS)
    kind = draw(
        st.sampled_from(
            ["hello", "sub", "unsub", "state", "have", "slot", "status", "join", "peers"]
        )
    )
    if kind == "hello":
        return Hello(draw(NODES), draw(HOSTS), draw(PORTS))
    if kind == "sub":
        return Subscribe(image, draw(st.booleans()))
    if kind == "unsub":
        return Unsubscribe(image)
    if kind == "state":
        m = draw(st.none() | manifests(image))
        have = (
            b""
            if m is None
            else draw(st.binary(min_size=(m.blocks + 7) // 8, max_size=(m.blocks + 7) // 8))
        )
        return State(image, m, have, draw(st.booleans()))
    if kind == "have":
        blocks = draw(st.lists(st.tuples(st.integers(0, 2**31), DIGESTS), max_size=20))
        return Have(image, tuple(blocks))
    if kind == "slot":
        return Slot(image, draw(st.booleans()))
    if kind == "status":
        return Status(image, draw(st.booleans()), draw(st.booleans()))
    if kind == "join":
        return Join(image, draw(NODES), draw(HOSTS), draw(PORTS), draw(st.booleans()))
    peers = draw(st.lists(st.tuples(NODES, HOSTS, PORTS), max_size=8))
    return Peers(image, draw(st.none() | manifests(image)), tuple(peers))


@given(messages())
def test_wire_messages_round_trip(msg: object) -> None:
    assert decode(encode(msg)) == msg  # type: ignore[arg-type]


@given(st.binary(max_size=4096))
def test_wire_decode_of_any_bytes_raises_only_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireError):  # anything else fails the test
        decode(data)


# msgpack values a hostile peer might put anywhere in a message
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40)
)


def _containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    # a named function: hypothesis 6.170 misreads a multi-line lambda as not recursing
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


_ANY = st.recursive(_SCALARS, _containers, max_leaves=12)


@given(messages(), st.text(max_size=12), _ANY)
def test_wire_decode_of_a_tampered_message_raises_only_wire_errors(
    msg: object, key: str, value: object
) -> None:
    """A valid message with one field replaced (or added) by anything msgpack holds."""
    obj = msgpack.unpackb(encode(msg), raw=False)  # type: ignore[arg-type]
    obj[key if key and key not in obj else next(iter(obj))] = value
    try:
        decoded = decode(msgpack.packb(obj, use_bin_type=True))
    except WireError:
        return
    assert decode(encode(decoded)) == decoded  # what was accepted is a whole message


@given(manifests())
def test_manifests_round_trip(m: Manifest) -> None:
    back = Manifest.decode(m.encode())
    assert back == m
    assert back.etag == m.etag
    assert back.same_source(m)


@given(st.binary(max_size=2048))
def test_manifest_decode_of_any_bytes_raises_only_integrity_errors(data: bytes) -> None:
    with contextlib.suppress(IntegrityError):  # anything else fails the test
        Manifest.decode(data)


MANIFEST_KEYS = ["v", "id", "size", "chunk_size", "origin_sha256", "sha256", "origin_hash",
                 "image_hash", "digests", "block_size", "block_digests", "complete"]  # fmt: skip


@given(manifests(), st.sampled_from(MANIFEST_KEYS), _ANY)
def test_manifest_decode_of_a_tampered_manifest_raises_only_integrity_errors(
    m: Manifest, key: str, value: object
) -> None:
    obj = msgpack.unpackb(m.encode(), raw=False)
    obj[key] = value
    try:
        back = Manifest.decode(msgpack.packb(obj, use_bin_type=True))
    except IntegrityError:
        return
    # what decodes is self-consistent: digest lists match the geometry
    assert len(back.digests) == DIGEST_SIZE * back.chunks
    assert len(back.block_digests) == DIGEST_SIZE * back.blocks


@given(st.binary(max_size=LOG_RECORD_SIZE * 20), st.integers(0, 50))
def test_chunk_log_of_any_bytes_yields_only_valid_records(data: bytes, chunks: int) -> None:
    for index, digest in decode_log(data, chunks):
        assert 0 <= index < chunks
        assert len(digest) == DIGEST_SIZE


@given(st.lists(st.tuples(st.integers(0, 99), DIGESTS), max_size=30), st.binary(max_size=19))
def test_chunk_log_round_trips_and_a_torn_tail_is_dropped(
    records: list[tuple[int, bytes]], tail: bytes
) -> None:
    data = b"".join(encode_log_record(i, d) for i, d in records) + tail
    assert list(decode_log(data, 100)) == records


@given(st.integers(0, 300), st.sets(st.integers(0, 299)))
def test_bitmaps_hold_exactly_what_was_set(n: int, marks: set[int]) -> None:
    bits = bitmap_new(n)
    marks = {i for i in marks if i < n}
    for i in marks:
        bitmap_set(bits, i)
    assert [i for i in range(n) if bitmap_get(bits, i)] == sorted(marks)
    assert bitmap_count(bits) == len(marks)


RANGE_TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda unit, a, b: f"{unit}={a}-{b}",
        st.sampled_from(["bytes", "BYTES", " bytes ", "items"]),
        st.one_of(st.just(""), st.integers(0, 10**25).map(str)),
        st.one_of(st.just(""), st.integers(0, 10**25).map(str)),
    ),
)


@given(RANGE_TEXT, st.integers(0, 10**12))
def test_range_headers_give_a_range_inside_the_image_or_our_errors(header: str, size: int) -> None:
    for parse in (parse_range, lambda h, n: _glance_range([h], n)):
        try:
            got = parse(header, size)
        except (RangeNotSatisfiable, BadRequest):
            continue
        if got is not None:
            start, end = got
            assert 0 <= start <= end < size


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 10**6))
def test_a_well_formed_range_is_what_it_says(a: int, b: int, size: int) -> None:
    start, end = min(a, b), max(a, b)
    if start >= size:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(f"bytes={start}-{end}", size)
    else:
        assert parse_range(f"bytes={start}-{end}", size) == (start, min(end, size - 1))


@given(st.text(max_size=200))
def test_checksum_text_is_a_checksum_or_a_value_error(text: str) -> None:
    try:
        c = Checksum.parse(text)
    except ValueError:
        return
    assert str(c) == text


@given(checksums())
def test_checksums_round_trip(c: Checksum) -> None:
    assert Checksum.parse(str(c)) == c


@given(
    st.one_of(st.text(max_size=30), st.integers(-5, 10**15), st.floats(), st.booleans(), st.none())
)
def test_sizes_and_durations_parse_to_non_negative_numbers_or_value_errors(value: object) -> None:
    for parse in (parse_size, parse_duration):
        try:
            got = parse(value)
        except ValueError:
            continue
        assert got >= 0


# -- signatures (signing.py) -------------------------------------------------------------

_PRIVATE = new_private_key()
_SIGNER = Signer(_PRIVATE)
_TRUST = Trust([_SIGNER.public])
SIGNED_KEYS = [*MANIFEST_KEYS, "digest", "signer", "sig"]


@st.composite
def signed_manifests(draw: st.DrawFn) -> Manifest:
    """A complete manifest with every digest, signed by _SIGNER."""
    m = draw(manifests())
    m.origin_hash = m.image_hash = draw(checksums())
    m.complete = True
    # every digest known (nonzero: zero means "not known"), drawn at once
    m.digests[:] = draw(st.binary(min_size=len(m.digests), max_size=len(m.digests)))
    m.block_digests[:] = draw(
        st.binary(min_size=len(m.block_digests), max_size=len(m.block_digests))
    )
    _SIGNER.sign(m)
    return m


@given(signed_manifests())
def test_signed_manifests_round_trip_and_check(m: Manifest) -> None:
    back = Manifest.decode(m.encode())
    assert (back.signer, back.signature) == (m.signer, m.signature)
    assert not back.trusted  # nothing decoded is trusted before it is checked
    assert _TRUST.check(back)
    assert back.trusted


@given(signed_manifests(), st.sampled_from(SIGNED_KEYS), _ANY)
def test_a_tampered_signed_manifest_is_never_trusted(m: Manifest, key: str, value: object) -> None:
    """Any field of a signed manifest replaced by anything: decoding raises our error,
    or the check refuses it (IntegrityError, or False for an unknown signer), or what
    it trusts is exactly what was signed."""
    obj = msgpack.unpackb(m.encode(), raw=False)
    obj[key] = value
    try:
        back = Manifest.decode(msgpack.packb(obj, use_bin_type=True))
        trusted = _TRUST.check(back)
    except IntegrityError:
        return
    if trusted:
        assert signed_bytes(back) == signed_bytes(m)
        assert (back.signer, back.signature) == (m.signer, m.signature)


@given(signed_manifests(), st.integers(0, 2**16), st.integers(1, 255))
def test_a_flipped_bit_of_a_signature_or_digest_is_refused(
    m: Manifest, where: int, mask: int
) -> None:
    target = [m.signature, m.digests, m.block_digests][where % 3]
    if not target:
        return
    changed = bytearray(target)
    changed[where % len(changed)] ^= mask
    if target is m.signature:
        m.signature = bytes(changed)
    elif target is m.digests:
        m.digests = changed
    else:
        m.block_digests = changed
    with pytest.raises(IntegrityError):
        _TRUST.check(Manifest.decode(m.encode()))


@given(st.text(max_size=80) | st.binary(max_size=48).map(lambda b: b.decode("latin-1")))
def test_key_text_is_a_key_or_a_value_error(text: str) -> None:
    try:
        raw = decode_key(text)
    except ValueError:
        return
    assert len(raw) == 32
    assert decode_key(encode_key(raw)) == raw
