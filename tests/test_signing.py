"""Signed manifests: keys, signatures, what is trusted and what is not (real files, no stubs)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import msgpack
import pytest

from swarmcache.config import build_config
from swarmcache.daemon import manifest_keys
from swarmcache.errors import ConfigError, IntegrityError
from swarmcache.manifest import Checksum, Manifest
from swarmcache.signing import (
    Signer,
    Trust,
    decode_key,
    encode_key,
    key_id,
    new_private_key,
    public_key,
)
from swarmcache.store import Store
from swarmtools.hostile_peer import digest_all

CHUNK, BLOCK = 64 * 1024, 16 * 1024


def _complete(data: bytes, algo: str = "blake3") -> Manifest:
    m = Manifest(
        "img",
        size=len(data),
        chunk_size=CHUNK,
        block_size=BLOCK,
        origin_hash=Checksum("sha256", "a" * 64),
        origin_validator="v1",
        digest_algo=algo,
    )
    digest_all(m, data)
    m.complete = True
    m.image_hash = m.origin_hash  # it matched the origin's checksum
    return m


def _signed(data: bytes) -> tuple[Manifest, Signer]:
    signer = Signer(new_private_key())
    m = _complete(data)
    signer.sign(m)
    return m, signer


def test_a_signed_manifest_travels_and_is_trusted_only_with_its_key() -> None:
    m, signer = _signed(os.urandom(3 * CHUNK + 100))
    back = Manifest.decode(m.encode())
    assert not back.trusted  # bytes from anywhere are not trusted by themselves
    assert back.signer == signer.public
    assert len(back.signature) == 64
    assert Trust([signer.public]).check(back)
    assert back.trusted
    other = Manifest.decode(m.encode())
    assert not Trust([public_key(new_private_key())]).check(other)  # a key we do not know
    assert not other.trusted


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.set_block_digest(5, bytes(16)),
        lambda m: m.set_digest(1, b"\x01" * 16),
        lambda m: setattr(m, "size", m.size - 1),
        lambda m: setattr(m, "origin_hash", Checksum("sha256", "b" * 64)),
        lambda m: setattr(m, "origin_validator", "v2"),
        lambda m: setattr(m, "image_id", "other"),
        lambda m: setattr(m, "digest_algo", "sha256"),
    ],
)
def test_any_change_to_what_is_signed_is_an_integrity_error(tamper) -> None:  # type: ignore[no-untyped-def]
    m, signer = _signed(os.urandom(2 * CHUNK))
    forged = Manifest.decode(m.encode())
    tamper(forged)
    forged = Manifest.decode(forged.encode())  # as it would arrive
    with pytest.raises(IntegrityError, match="does not match its signature"):
        Trust([signer.public]).check(forged)
    assert not forged.trusted


def test_what_differs_between_hosts_is_not_signed() -> None:
    m, signer = _signed(os.urandom(CHUNK))
    partial = Manifest.decode(dataclasses.replace(m, complete=False, image_hash=None).encode())
    assert Trust([signer.public]).check(partial)


def test_a_restarted_manifest_keeps_signed_digests_only_when_trusted() -> None:
    m, signer = _signed(os.urandom(2 * CHUNK))
    trusted = Manifest.decode(m.encode())
    Trust([signer.public]).check(trusted)
    fresh = trusted.restarted()
    assert (fresh.complete, fresh.trusted) == (False, True)
    assert (fresh.block_digests, fresh.signature) == (m.block_digests, m.signature)
    untrusted = Manifest.decode(m.encode()).restarted()
    assert (untrusted.block_digest(0), untrusted.signature) == (None, b"")


def test_only_an_image_that_matched_the_origins_checksum_is_signed() -> None:
    signer = Signer(new_private_key())
    m = _complete(os.urandom(CHUNK))
    for unchecked in (
        dataclasses.replace(m, origin_hash=None),  # the origin publishes none
        dataclasses.replace(m, image_hash=None),
        dataclasses.replace(m, image_hash=Checksum("sha256", "b" * 64)),
    ):
        with pytest.raises(ValueError, match="matched the origin's checksum"):
            signer.sign(unchecked)


def test_xxh3_manifests_are_never_signed_nor_trusted() -> None:
    signer = Signer(new_private_key())
    m = _complete(os.urandom(CHUNK), algo="xxh3")
    with pytest.raises(ValueError, match="not cryptographic"):
        signer.sign(m)
    # a forged xxh3 manifest carrying a signature field cannot even be written as v2/3
    obj = msgpack.unpackb(_signed(os.urandom(CHUNK))[0].encode())
    obj["digest"] = "xxh3"
    m = Manifest.decode(msgpack.packb(obj, use_bin_type=True))
    with pytest.raises(IntegrityError, match="xxh3"):
        Trust([decode_key(encode_key(obj["signer"]))]).check(m)


@pytest.mark.parametrize(
    ("change", "problem"),
    [({"signer": b"x" * 31}, "signer or signature"), ({"sig": b"x" * 63}, "signer or signature")],
)
def test_malformed_signature_fields_are_refused(change: dict[str, bytes], problem: str) -> None:
    obj = msgpack.unpackb(_signed(os.urandom(CHUNK))[0].encode())
    obj.update(change)
    with pytest.raises(IntegrityError, match=problem):
        Manifest.decode(msgpack.packb(obj, use_bin_type=True))


def test_keys_in_text_form() -> None:
    private = new_private_key()
    assert decode_key(encode_key(private)) == private
    assert len(key_id(public_key(private))) == 16
    for bad in ("not base64!", encode_key(b"short"), ""):
        with pytest.raises(ValueError):
            decode_key(bad)


def _config(tmp_path: Path, **security: object) -> dict[str, object]:
    return {"cache": {"dir": str(tmp_path)}, "security": security}


def test_config_of_seeders_and_trusted_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "manifest.key"
    private = new_private_key()
    key_file.write_text(encode_key(private) + "\n")
    pub = encode_key(public_key(private))
    cfg = build_config(
        {"daemon": {"role": "seeder"}, **_config(tmp_path, manifest_key_file=str(key_file))},
        {},
        "t",
    )
    trust, signer = manifest_keys(cfg)
    assert signer is not None
    assert signer.public == public_key(private)
    assert trust is not None
    assert signer.public in trust.keys  # a seeder trusts itself
    cfg = build_config(_config(tmp_path, trusted_manifest_keys=[pub]), {}, "t")
    trust, signer = manifest_keys(cfg)
    assert signer is None
    assert trust is not None
    assert list(trust.keys) == [public_key(private)]
    assert manifest_keys(build_config({}, {}, "t")) == (None, None)
    for raw, key in [
        ({"daemon": {"role": "seeder"}}, "security.manifest_key_file"),
        (_config(tmp_path, manifest_key_file=str(key_file)), "security.manifest_key_file"),
        (_config(tmp_path, trusted_manifest_keys=["AAAA"]), "security.trusted_manifest_keys"),
        (_config(tmp_path, trusted_manifest_keys=[pub], chunk_digest="xxh3"), "chunk_digest"),
    ]:
        with pytest.raises(ConfigError) as err:
            build_config(raw, {}, "t")
        assert key in err.value.detail or key in str(err.value)
    key_file.write_text("too short\n")
    seeder = build_config(
        {"daemon": {"role": "seeder"}, **_config(tmp_path, manifest_key_file=str(key_file))},
        {},
        "t",
    )
    with pytest.raises(ConfigError, match="manifest_key_file"):
        manifest_keys(seeder)


def test_the_store_trusts_a_signed_manifest_again_and_drops_a_forged_one(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    m, signer = _signed(data)
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = store.make_entry(dataclasses.replace(m, complete=False, image_hash=None))
    store.add(image)
    image.write_chunk(0, data[:CHUNK], m.digest(0) or b"")
    image.sync_chunks([0])
    store.close()
    store = Store(tmp_path, 1 << 30, Trust([signer.public]))
    store.open()
    assert store.images["img"].manifest.trusted
    assert store.images["img"].check_present() == []
    store.close()
    # the manifest on disk changed by hand: its signature no longer matches
    path = tmp_path / "images" / "img" / "manifest"
    forged = Manifest.decode(path.read_bytes())
    forged.set_block_digest(7, b"\x02" * 16)
    path.write_bytes(forged.encode())
    store = Store(tmp_path, 1 << 30, Trust([signer.public]))
    store.open()
    assert "img" not in store.images  # discarded as unreadable, fetched again when asked
    store.close()


def test_a_partial_copy_adopts_a_signed_manifest_only_if_what_it_holds_agrees(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 * CHUNK)
    signed, signer = _signed(data)
    signed = Manifest.decode(signed.encode())
    assert Trust([signer.public]).check(signed)
    store = Store(tmp_path, 1 << 30)
    store.open()

    def unsigned(image_id: str) -> Manifest:  # the same version, digests unknown yet
        m = Manifest.decode(dataclasses.replace(signed, image_id=image_id).encode())
        return dataclasses.replace(
            m, signer=b"", signature=b"", digests=bytearray(), block_digests=bytearray()
        )

    good = store.make_entry(unsigned("img"))
    store.add(good)
    good.write_chunk(0, data[:CHUNK], signed.digest(0) or b"")
    assert good.adopt(signed)
    assert good.manifest.trusted
    assert good.manifest.block_digest(9) == signed.block_digest(9)  # all of them now
    assert Manifest.decode((good.path / "manifest").read_bytes()).signature == signed.signature
    bad = store.make_entry(unsigned("other"))
    store.add(bad)
    forged = bytes(b ^ 1 for b in data[:CHUNK])
    bad.write_chunk(0, forged, bad.manifest.hash_chunk([forged])[0])
    signed_other = dataclasses.replace(signed, image_id="other")
    assert not bad.adopt(signed_other)  # a held chunk disagrees: nothing changes
    assert not bad.manifest.trusted
    store.close()
