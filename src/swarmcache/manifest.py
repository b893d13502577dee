"""Pure image model: ids, chunk geometry, manifests and the chunk log records.

A manifest describes one image: its size, how it is cut into chunks (the unit of
verification and durability) and chunks into blocks (the unit of transfer between
hosts), the digest of every chunk and of every block (known once fetched and
checked; see `DIGEST_ALGOS`), the checksum the origin publishes for the whole image (sha256 from a
sidecar, Glance's os_hash_value or md5 checksum) and the same hash of what was
fetched, each written "algo:hex" (see `Checksum`). It travels as msgpack, always
decoded with size limits, because it comes from peers.
A manifest written before blocks existed (version 1) has `block_size` 0 and no
block digests; they are worked out from the data when they are first needed.

The chunk log is the crash-safe record of which chunks are on disk and verified:
fixed-size records appended and fsynced after the chunk's bytes are durable. A torn
or corrupt tail record (a crash mid-append) fails its own checksum and is dropped.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import blake3
import msgpack
import xxhash

from .errors import IntegrityError, InvalidImageId

IMAGE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DIGEST_SIZE = 16  # every chunk and block digest, whatever its algorithm: 128 bits
# 2: block_size and block digests; 3: "algo:hex" whole-image hashes instead of sha256
# hex; 4: the digest algorithm named (versions 1-3 are xxh3 and still read: caches
# survive an upgrade)
MANIFEST_VERSION = 4
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # 4M chunks: a 16 TiB image at 4 MiB chunks
_NO_DIGEST = bytes(DIGEST_SIZE)


def validate_image_id(image_id: str) -> str:
    """Return image_id if it is safe to use in a path and a URL, else raise InvalidImageId."""
    if not isinstance(image_id, str) or not IMAGE_ID_RE.fullmatch(image_id):
        shown = image_id if isinstance(image_id, str) and len(image_id) <= 64 else "<long>"
        raise InvalidImageId(
            f"image id {shown!r} is not valid: 1-128 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return image_id


# Whole-image hash algorithms an origin may name (Glance's os_hash_algo is any of
# hashlib's; these are the ones a host can count on having).
HASH_ALGORITHMS = frozenset(
    ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "sha3_256", "sha3_512", "blake2b")
)
DEFAULT_HASH = "sha256"  # what a fetch computes when the origin publishes no checksum


@dataclass(frozen=True)
class Checksum:
    """A whole-image hash: an algorithm of HASH_ALGORITHMS and its lower-case hex digest."""

    algo: str
    hex: str

    def __post_init__(self) -> None:
        if self.algo not in HASH_ALGORITHMS:
            raise ValueError(f"unsupported hash algorithm {self.algo!r}")
        width = hashlib.new(self.algo).digest_size * 2
        if not re.fullmatch(f"[0-9a-f]{{{width}}}", self.hex):
            raise ValueError(f"not a {self.algo} hex digest: {self.hex[:200]!r}")

    @classmethod
    def parse(cls, text: str) -> Checksum:
        """Read the "algo:hex" form (ValueError if it is not one)."""
        if not isinstance(text, str):
            raise ValueError(f"expected 'algo:hex', got {text!r}")
        algo, sep, hexdigest = text.partition(":")
        if not sep:
            raise ValueError(f"expected 'algo:hex', got {text[:200]!r}")
        return cls(algo, hexdigest)

    def __str__(self) -> str:
        return f"{self.algo}:{self.hex}"


Buffer = bytes | bytearray | memoryview

# A chunk's bytes as they came off the socket, not joined: joining 4 MiB means a copy
# into freshly mapped memory, which cost more CPU than receiving it (profiled: a third
# of a daemon's CPU in an 8-host fan-out went to such joins and slices).
Pieces = Sequence[Buffer]


# Chunk and block digests. "blake3" (the default) and "sha256" are cryptographic: no
# one can make other bytes with a given digest (a second preimage costs 2^128 work at
# 128 bits), so digests from a trusted source (a signed manifest, or this host's own
# reads from the origin) pin the bytes whoever serves them. A chunk's digest is then
# the hash of its blocks' digests (a two-level tree: the data is hashed once). "xxh3"
# (xxh3-128, what manifests before version 4 hold) only catches accidents: disk rot,
# a torn write, a bug; anyone can make bytes that match it.
DIGEST_ALGOS = ("blake3", "sha256", "xxh3")
DEFAULT_DIGEST = "blake3"


class _Hasher:
    """One incremental 128-bit digest of DIGEST_ALGOS (the shape hashlib's objects have)."""

    def __init__(self, algo: str) -> None:
        if algo == "blake3":
            self._h: Any = blake3.blake3()
        elif algo == "sha256":
            self._h = hashlib.sha256()
        elif algo == "xxh3":
            self._h = xxhash.xxh3_128()
        else:
            raise ValueError(f"unknown digest algorithm {algo!r}")

    def update(self, data: Buffer) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return bytes(self._h.digest()[:DIGEST_SIZE])


def block_digest(pieces: Iterable[Buffer], algo: str = DEFAULT_DIGEST) -> bytes:
    """Digest of one block (or of a whole chunk in a manifest without blocks) held in
    pieces: the digest of their concatenation."""
    h = _Hasher(algo)
    for piece in pieces:
        h.update(piece)
    return h.digest()


def digest_blocks(
    pieces: Iterable[Buffer], block_size: int, algo: str = DEFAULT_DIGEST
) -> tuple[bytes, list[bytes]]:
    """(chunk digest, digest of each block) of a chunk held in pieces, in one pass over
    the data. With block_size 0 (a manifest from before blocks) there are no blocks
    and the chunk digest is that of its bytes."""
    if not block_size:
        return block_digest(pieces, algo), []
    tree = algo != "xxh3"
    chunk = None if tree else _Hasher(algo)
    blocks: list[bytes] = []
    block = _Hasher(algo)
    room = block_size
    for piece in pieces:
        view = memoryview(piece)
        if chunk is not None:
            chunk.update(view)
        while view:
            part = view[:room]
            block.update(part)
            room -= len(part)
            view = view[len(part) :]
            if not room:
                blocks.append(block.digest())
                block, room = _Hasher(algo), block_size
    if room != block_size:
        blocks.append(block.digest())
    if chunk is None:
        return block_digest(blocks, algo), blocks
    return chunk.digest(), blocks


def pieces_size(pieces: Iterable[Buffer]) -> int:
    """Total bytes in `pieces`."""
    return sum(len(p) for p in pieces)


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks an image of `size` bytes has (an empty image has none)."""
    return (size + chunk_size - 1) // chunk_size


def chunk_span(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """(offset, length) of chunk `index`."""
    offset = index * chunk_size
    if index < 0 or offset >= size:
        raise IndexError(f"chunk {index} is outside an image of {size} bytes")
    return offset, min(chunk_size, size - offset)


@dataclass
class Manifest:
    """What is known about one image; `digests` holds 16 bytes per chunk (zeros = unknown)."""

    image_id: str
    size: int
    chunk_size: int
    origin_hash: Checksum | None = None  # the origin's checksum of the whole image
    origin_validator: str = ""
    image_hash: Checksum | None = None  # the same hash of the bytes fetched, once complete
    complete: bool = False
    digests: bytearray = field(default_factory=bytearray)
    block_size: int = 0  # 0: not cut into blocks yet (a version 1 manifest)
    block_digests: bytearray = field(default_factory=bytearray)
    digest_algo: str = DEFAULT_DIGEST  # of chunks and blocks: DIGEST_ALGOS
    # a seeder's Ed25519 signature over every digest (see signing.py); `trusted` is
    # set only by signing.Trust.check in this process, never read from bytes
    signer: bytes = b""
    signature: bytes = b""
    trusted: bool = field(default=False, compare=False)
    # this process took it from a peer's word, not the origin's (Fetcher), never read
    # from bytes
    from_peer: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.digest_algo not in DIGEST_ALGOS:
            raise ValueError(f"unknown digest algorithm {self.digest_algo!r}")
        if not self.digests:
            self.digests = bytearray(DIGEST_SIZE * self.chunks)
        if self.block_size and not self.block_digests:
            self.block_digests = bytearray(DIGEST_SIZE * self.blocks)

    def hash_block(self, pieces: Iterable[Buffer]) -> bytes:
        """The digest of one block of this image, held in pieces."""
        return block_digest(pieces, self.digest_algo)

    def hash_chunk(self, pieces: Iterable[Buffer]) -> tuple[bytes, list[bytes]]:
        """(digest, block digests) of one chunk of this image, held in pieces."""
        return digest_blocks(pieces, self.block_size, self.digest_algo)

    @property
    def blocks(self) -> int:
        """Number of blocks (0 while block_size is unknown)."""
        return chunk_count(self.size, self.block_size) if self.block_size else 0

    def block_span(self, block: int) -> tuple[int, int]:
        """(offset, length) of block `block`."""
        return chunk_span(block, self.size, self.block_size)

    def blocks_of(self, index: int) -> range:
        """The blocks of chunk `index` (none while block_size is unknown)."""
        if not self.block_size:
            return range(0)
        per = self.chunk_size // self.block_size
        return range(index * per, min((index + 1) * per, self.blocks))

    def block_digest(self, block: int) -> bytes | None:
        """The known digest of block `block`, or None."""
        d = bytes(self.block_digests[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE])
        return None if d == _NO_DIGEST else d

    def set_block_digest(self, block: int, digest: bytes) -> None:
        """Record the digest of block `block`."""
        if len(digest) != DIGEST_SIZE:
            raise ValueError("digest must be 16 bytes")
        self.block_digests[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE] = digest

    @property
    def chunks(self) -> int:
        """Number of chunks."""
        return chunk_count(self.size, self.chunk_size)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index`."""
        return chunk_span(index, self.size, self.chunk_size)

    def digest(self, index: int) -> bytes | None:
        """The known digest of chunk `index`, or None."""
        d = bytes(self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])
        return None if d == _NO_DIGEST else d

    def set_digest(self, index: int, digest: bytes) -> None:
        """Record the digest of chunk `index`."""
        if len(digest) != DIGEST_SIZE:
            raise ValueError("digest must be 16 bytes")
        self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest

    @property
    def etag(self) -> str:
        """A strong ETag that is the same for partial and complete copies of this image."""
        # the hex alone, as before hashes named their algorithm: ETags survive the upgrade
        basis = self.origin_hash.hex if self.origin_hash else f"{self.size}:{self.origin_validator}"
        return '"' + xxhash.xxh3_64_hexdigest(f"{self.image_id}\0{basis}".encode()) + '"'

    def same_source(self, other: Manifest) -> bool:
        """True if both describe the same origin bytes cut the same way (so chunks can
        be kept, and traded with a peer whose manifest this is)."""
        return (
            self.chunk_size == other.chunk_size
            and self.digest_algo == other.digest_algo
            and self.same_version(other)
        )

    def same_version(self, other: Manifest) -> bool:
        """True if both describe the same bytes at the origin (however they are cut)."""
        return (
            self.size == other.size
            and self.origin_hash == other.origin_hash
            and self.origin_validator == other.origin_validator
        )

    def encode(self) -> bytes:
        """msgpack form, for disk and for peers. Version 2 (sha256 hex) while both hashes
        are sha256 or unknown, so daemons of the version before read it during a rolling
        upgrade (or after a rollback); version 3 ("algo:hex") for any other algorithm;
        version 4 (the digest algorithm named) for digests other than xxh3, which a
        daemon before version 4 must not take for xxh3."""
        fields: dict[str, Any] = {
            "id": self.image_id,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "origin_validator": self.origin_validator,
            "complete": self.complete,
            "digests": bytes(self.digests),
            "block_size": self.block_size,
            "block_digests": bytes(self.block_digests),
        }
        hashes = (self.origin_hash, self.image_hash)
        if self.digest_algo != "xxh3":
            fields.update(
                v=MANIFEST_VERSION,
                digest=self.digest_algo,
                origin_hash=_str_or_none(self.origin_hash),
                image_hash=_str_or_none(self.image_hash),
            )
            if self.signature:
                fields.update(signer=bytes(self.signer), sig=bytes(self.signature))
        elif all(h is None or h.algo == "sha256" for h in hashes):
            fields.update(
                v=2,
                origin_sha256=_hex_or_none(self.origin_hash),
                sha256=_hex_or_none(self.image_hash),
            )
        else:
            fields.update(
                v=3,
                origin_hash=_str_or_none(self.origin_hash),
                image_hash=_str_or_none(self.image_hash),
            )
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Parse and validate msgpack from an untrusted source."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"manifest of {len(data)} bytes exceeds the limit")
        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                max_bin_len=MAX_MANIFEST_BYTES,
                max_str_len=4096,
                max_array_len=64,
                max_map_len=64,
            )
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
            raise IntegrityError(f"manifest is not valid msgpack: {err}") from err
        try:
            return cls._from_obj(obj)
        except (KeyError, TypeError, ValueError) as err:
            raise IntegrityError(f"manifest is malformed: {err!r}") from err

    @classmethod
    def _from_obj(cls, obj: Any) -> Manifest:
        if not isinstance(obj, dict) or obj.get("v") not in (1, 2, 3, MANIFEST_VERSION):
            raise ValueError("unsupported manifest version")
        size, chunk_size = obj["size"], obj["chunk_size"]
        if (
            not (isinstance(size, int) and isinstance(chunk_size, int))
            or size < 0
            or chunk_size <= 0
        ):
            raise ValueError("bad size or chunk_size")
        digests = obj["digests"]
        if not isinstance(digests, bytes) or len(digests) != DIGEST_SIZE * chunk_count(
            size, chunk_size
        ):
            raise ValueError("digest list does not match the chunk count")
        block_size, block_digests = obj.get("block_size", 0), obj.get("block_digests", b"")
        if (
            not isinstance(block_size, int)
            or block_size < 0
            or not isinstance(block_digests, bytes)
        ):
            raise ValueError("bad block_size or block digests")
        if block_size and (chunk_size % block_size or block_size > chunk_size):
            raise ValueError("chunk_size is not a multiple of block_size")
        if len(block_digests) != (DIGEST_SIZE * chunk_count(size, block_size) if block_size else 0):
            raise ValueError("block digest list does not match the block count")
        if obj["v"] < 3:  # sha256 hex digests then
            origin_hash = _sha256_or_none(obj["origin_sha256"])
            image_hash = _sha256_or_none(obj["sha256"])
        else:
            origin_hash = _checksum_or_none(obj["origin_hash"])
            image_hash = _checksum_or_none(obj["image_hash"])
        digest_algo = obj["digest"] if obj["v"] >= 4 else "xxh3"
        if digest_algo not in DIGEST_ALGOS:
            raise ValueError(f"unknown digest algorithm {str(digest_algo)[:40]!r}")
        signer, signature = obj.get("signer", b""), obj.get("sig", b"")
        if not (signer == signature == b"") and not (
            isinstance(signer, bytes)
            and len(signer) == 32
            and isinstance(signature, bytes)
            and len(signature) == 64
        ):
            raise ValueError("bad signer or signature")
        return cls(
            image_id=validate_image_id(obj["id"]),
            size=size,
            chunk_size=chunk_size,
            origin_hash=origin_hash,
            origin_validator=str(obj["origin_validator"]),
            image_hash=image_hash,
            complete=bool(obj["complete"]),
            digests=bytearray(digests),
            block_size=block_size,
            block_digests=bytearray(block_digests),
            digest_algo=digest_algo,
            signer=signer,
            signature=signature,
        )

    def restarted(self) -> Manifest:
        """A copy for a fresh fetch of the same image: no chunk known, unless the
        digests are signed by a key we trust (then they say what every chunk must be)."""
        if self.trusted:
            return replace(self, image_hash=None, complete=False)
        return replace(
            self,
            image_hash=None,
            complete=False,
            digests=bytearray(),
            block_digests=bytearray(),
            signer=b"",
            signature=b"",
        )


def _hex_or_none(value: Checksum | None) -> str | None:
    return None if value is None else value.hex


def _str_or_none(value: Checksum | None) -> str | None:
    return None if value is None else str(value)


def _checksum_or_none(value: Any) -> Checksum | None:
    return None if value is None else Checksum.parse(value)


def _sha256_or_none(value: Any) -> Checksum | None:
    return None if value is None else Checksum("sha256", value)


# Chunk log: <index:u32><digest:16 bytes><xxh32 of the previous 20 bytes:u32>
_RECORD = struct.Struct("<I16sI")
LOG_RECORD_SIZE = _RECORD.size


def encode_log_record(index: int, digest: bytes) -> bytes:
    """One chunk-log record saying chunk `index` is durable with `digest`."""
    body = struct.pack("<I16s", index, digest)
    return body + struct.pack("<I", xxhash.xxh32_intdigest(body))


def decode_log(data: bytes, chunks: int) -> Iterator[tuple[int, bytes]]:
    """Valid (index, digest) records of a chunk log; stops at the first torn or bad record."""
    for pos in range(0, len(data) - LOG_RECORD_SIZE + 1, LOG_RECORD_SIZE):
        index, digest, check = _RECORD.unpack_from(data, pos)
        if check != xxhash.xxh32_intdigest(data[pos : pos + 20]) or index >= chunks:
            return
        yield index, digest


def bitmap_new(chunks: int) -> bytearray:
    """An all-clear bitmap for `chunks` chunks."""
    return bytearray((chunks + 7) // 8)


def bitmap_get(bitmap: bytearray | bytes, index: int) -> bool:
    """Is bit `index` set."""
    return bool(bitmap[index >> 3] & (1 << (index & 7)))


def bitmap_set(bitmap: bytearray, index: int) -> None:
    """Set bit `index`."""
    bitmap[index >> 3] |= 1 << (index & 7)


def bitmap_count(bitmap: bytearray | bytes) -> int:
    """How many bits are set."""
    return int.from_bytes(bitmap, "little").bit_count()
