"""Signed manifests: Ed25519 signatures over an image's chunk and block digests.

Theory of operation. A seeder (`[daemon] role = "seeder"`) holds a private key
(`[security] manifest_key_file`). Once it has an image whole and checked against
the origin's checksum, it signs the image's manifest: the signature covers what
makes the bytes what they are (id, size, chunk and block size, digest algorithm,
the origin's checksum and validator, every chunk digest and every block digest),
not what differs from host to host (complete or not). A signed manifest therefore
carries all digests, whoever holds it and however little of the image they have.

Hosts list the public keys they trust (`[security] trusted_manifest_keys`). A
manifest from anywhere (a peer's State, a Join's answer, the cache dir after a
restart) is `trusted` only once its signature checks out against one of them
(`Trust.check`); from then on every block from any peer is checked against the
signed digest before a byte of it is written, served or announced, so a Range
reader of a partial image never gets a forged byte, even from a peer that holds
the cluster secret. The digests must be cryptographic (blake3 or sha256): xxh3
manifests are never signed nor trusted.

Keys on disk and in the config are base64 of the raw 32 bytes (a private key file
holds its seed on the first line, like every other secret file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import IntegrityError
from .manifest import Manifest

KEY_BYTES = 32
SIGNATURE_BYTES = 64
_CONTEXT = b"swarmcache manifest v1\n"  # a signature for this and nothing else


def encode_key(raw: bytes) -> str:
    """The text form of a raw 32-byte key."""
    return base64.b64encode(raw).decode()


def decode_key(text: str) -> bytes:
    """The raw 32 bytes of a key in text form (ValueError if it is not one)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not a base64 key: {err}") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"a key is {KEY_BYTES} bytes, this one {len(raw)}")
    return raw


def key_id(public: bytes) -> str:
    """A short name of a public key for logs and metrics (16 hex digits)."""
    return hashlib.sha256(public).hexdigest()[:16]


def new_private_key() -> bytes:
    """A fresh Ed25519 private key (its 32-byte seed)."""
    from cryptography.hazmat.primitives import serialization

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_key(private: bytes) -> bytes:
    """The raw public key of a private key's seed."""
    from cryptography.hazmat.primitives import serialization

    return (
        Ed25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def signed_bytes(m: Manifest) -> bytes:
    """What a manifest's signature covers (see the module's docstring)."""
    return _CONTEXT + msgpack.packb(
        [
            m.image_id,
            m.size,
            m.chunk_size,
            m.block_size,
            m.digest_algo,
            str(m.origin_hash) if m.origin_hash else "",
            m.origin_validator,
            bytes(m.digests),
            bytes(m.block_digests),
        ],
        use_bin_type=True,
    )


class Signer:
    """A seeder's private key: signs whole, checked manifests."""

    def __init__(self, private: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(private)
        self.public = public_key(private)
        self.key_id = key_id(self.public)

    def sign(self, m: Manifest) -> None:
        """Sign `m` in place (it must hold every digest, cryptographic ones)."""
        if m.digest_algo == "xxh3":
            raise ValueError("xxh3 digests are not cryptographic: such a manifest is not signed")
        if not m.block_size or not m.complete:
            raise ValueError("only a complete manifest with blocks is signed")
        if m.origin_hash is None or m.image_hash != m.origin_hash:
            raise ValueError("only an image that matched the origin's checksum is signed")
        m.signer = self.public
        m.signature = self._key.sign(signed_bytes(m))
        m.trusted = True


class Trust:
    """The public keys a host trusts; checks manifests from anywhere."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = {bytes(k): Ed25519PublicKey.from_public_bytes(k) for k in keys}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, m: Manifest) -> bool:
        """Mark `m` trusted if its signature is good and by a key we trust: True then.
        A manifest signed by a key we do not know is treated as unsigned (False); a
        bad signature by a key we trust is an IntegrityError (its sender lies)."""
        m.trusted = False
        if not m.signature:
            return False
        key = self.keys.get(bytes(m.signer))
        if key is None:
            return False
        if m.digest_algo == "xxh3" or not m.block_size:
            raise IntegrityError(f"a signed manifest of {m.image_id} with {m.digest_algo} digests")
        try:
            key.verify(bytes(m.signature), signed_bytes(m))
        except InvalidSignature:
            raise IntegrityError(
                f"the manifest of {m.image_id} does not match its signature by key "
                f"{key_id(m.signer)}"
            ) from None
        m.trusted = True
        return True
