"""Pure peer protocol: the msgpack messages daemons exchange over a WebSocket.

Theory of operation. A daemon that fetches an image opens one WebSocket to each
peer (`GET /v1/peer/ws`), says Hello, and Subscribes to the image. The peer answers
with a State (its manifest with the digests it knows, a bitmap of the chunks it
holds, the chunks it is taking from the origin right now, whether it is fetching
the image itself) and then pushes Have (chunks that became readable, with their
digests), Taking (chunks it started to take from the origin) and Status (it started
or stopped fetching) until Unsubscribe or the socket closes. Chunks themselves go
over plain HTTP (`GET /v1/peer/images/{id}/chunks/{index}`) with sendfile.

Every message is a msgpack map with "v" (PROTOCOL_VERSION) and "t" (its type). The
size is capped before decoding and the decoder has per-field limits; anything
malformed raises WireError, which closes that one peer's socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import IntegrityError, PeerError
from .manifest import DIGEST_SIZE, MAX_MANIFEST_BYTES, Manifest, validate_image_id

PROTOCOL_VERSION = 1
MAX_MESSAGE = MAX_MANIFEST_BYTES + 1024 * 1024  # a State carries a whole manifest
MAX_LIST = 1 << 22  # chunk indices in one message
NODE_ID_MAX = 64


class WireError(PeerError):
    """A peer sent a message we cannot accept."""


@dataclass(frozen=True)
class Hello:
    """First message on a socket, both ways: who is speaking and where to reach it."""

    node: str
    host: str
    port: int


@dataclass(frozen=True)
class Subscribe:
    """Send me the state of this image and its changes; `fetching`: I am fetching it."""

    image_id: str
    fetching: bool


@dataclass(frozen=True)
class Unsubscribe:
    """Stop sending changes of this image (and I no longer fetch it)."""

    image_id: str


@dataclass(frozen=True)
class State:
    """What the sender holds of an image (answer to Subscribe)."""

    image_id: str
    manifest: Manifest | None  # None: the sender has no entry for the image
    have: bytes  # bitmap of readable chunks (empty if manifest is None)
    taking: tuple[int, ...]
    fetching: bool


@dataclass(frozen=True)
class Have:
    """Chunks that became readable at the sender, with their digests."""

    image_id: str
    chunks: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class Taking:
    """Chunks the sender started to read from the origin (others should wait for them)."""

    image_id: str
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class Status:
    """The sender started or stopped fetching an image (or dropped it: gone)."""

    image_id: str
    fetching: bool
    gone: bool = False


Message = Hello | Subscribe | Unsubscribe | State | Have | Taking | Status


def encode(msg: Message) -> bytes:
    """The msgpack bytes of one message."""
    body: dict[str, Any]
    match msg:
        case Hello():
            body = {"t": "hello", "node": msg.node, "host": msg.host, "port": msg.port}
        case Subscribe():
            body = {"t": "sub", "image": msg.image_id, "fetching": msg.fetching}
        case Unsubscribe():
            body = {"t": "unsub", "image": msg.image_id}
        case State():
            body = {
                "t": "state",
                "image": msg.image_id,
                "manifest": msg.manifest.encode() if msg.manifest is not None else None,
                "have": msg.have,
                "taking": list(msg.taking),
                "fetching": msg.fetching,
            }
        case Have():
            body = {"t": "have", "image": msg.image_id, "chunks": [list(c) for c in msg.chunks]}
        case Taking():
            body = {"t": "taking", "image": msg.image_id, "chunks": list(msg.chunks)}
        case Status():
            body = {
                "t": "status",
                "image": msg.image_id,
                "fetching": msg.fetching,
                "gone": msg.gone,
            }
    body["v"] = PROTOCOL_VERSION
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes) -> Message:
    """Parse one message from a peer; WireError if it is oversized or malformed."""
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE} byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=MAX_MANIFEST_BYTES,
            max_str_len=4096,
            max_array_len=MAX_LIST,
            max_map_len=32,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise WireError(f"message is not valid msgpack: {err}") from err
    if not isinstance(obj, dict):
        raise WireError("message is not a map")
    if obj.get("v") != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {obj.get('v')!r}")
    try:
        return _parse(obj)
    except (KeyError, TypeError, ValueError, IntegrityError) as err:
        raise WireError(f"malformed {obj.get('t')!r} message: {err!r}") from err


def _parse(obj: dict[str, Any]) -> Message:
    kind = obj["t"]
    if kind == "hello":
        node, host, port = obj["node"], obj["host"], obj["port"]
        if not isinstance(node, str) or not 0 < len(node) <= NODE_ID_MAX:
            raise ValueError("bad node id")
        if not isinstance(host, str) or len(host) > 255:
            raise ValueError("bad host")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("bad port")
        return Hello(node, host, port)
    image_id = validate_image_id(obj["image"])
    if kind == "sub":
        return Subscribe(image_id, _bool(obj["fetching"]))
    if kind == "unsub":
        return Unsubscribe(image_id)
    if kind == "state":
        manifest = Manifest.decode(obj["manifest"]) if obj["manifest"] is not None else None
        have = obj["have"]
        if not isinstance(have, bytes):
            raise TypeError("have is not a bitmap")
        if manifest is not None and len(have) != (manifest.chunks + 7) // 8:
            raise ValueError("have bitmap does not match the chunk count")
        if manifest is not None and manifest.image_id != image_id:
            raise ValueError("manifest of another image")
        return State(image_id, manifest, have, _indices(obj["taking"]), _bool(obj["fetching"]))
    if kind == "have":
        chunks = []
        for entry in obj["chunks"]:
            index, digest = entry
            if not isinstance(index, int) or index < 0:
                raise ValueError("bad chunk index")
            if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
                raise ValueError("bad digest")
            chunks.append((index, digest))
        return Have(image_id, tuple(chunks))
    if kind == "taking":
        return Taking(image_id, _indices(obj["chunks"]))
    if kind == "status":
        return Status(image_id, _bool(obj["fetching"]), _bool(obj.get("gone", False)))
    raise ValueError(f"unknown message type {kind!r}")


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected a boolean")
    return value


def _indices(values: object) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(i, int) and i >= 0 for i in values):
        raise ValueError("expected a list of chunk indices")
    return tuple(values)
