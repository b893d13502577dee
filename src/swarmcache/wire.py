"""Pure peer protocol: the msgpack messages daemons exchange over a WebSocket.

Theory of operation. A daemon that fetches an image first Joins it at the image's
readers (`POST /v1/peer/images/{id}/join`, a Join; the answer is Peers: the reader's
manifest and a sample of the hosts fetching or holding the image). It then links to
a bounded set of them (one WebSocket per peer, `GET /v1/peer/ws`, carrying every image
the two share), says Hello, and Subscribes to the image with its own State. The peer
answers with its State (its manifest with the digests it knows, a bitmap of the
blocks it holds, whether it is fetching the image itself); from then on both sides
push Have (blocks that became readable, with their digests), Slot (the sender gives
the other one of its upload slots, or takes it back) and Status (it started or
stopped fetching, or dropped the image) until Unsubscribe or the socket closes.
Blocks themselves go over plain HTTP (`GET /v1/peer/images/{id}/blocks/{index}`)
with sendfile.

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

PROTOCOL_VERSION = 2  # 2: blocks, slots, joins (1: chunks, takings; not spoken any more)
MAX_MESSAGE = MAX_MANIFEST_BYTES + 1024 * 1024  # a State carries a whole manifest
MAX_LIST = 1 << 22  # block indices in one message
MAX_PEERS = 64  # hosts in one Peers answer
NODE_ID_MAX = 64


class WireError(PeerError):
    """A peer sent a message we cannot accept."""


@dataclass(frozen=True)
class Hello:
    """First message on a socket, both ways: who is speaking and where to reach it."""

    node: str
    host: str
    port: int
    seeder: bool = False  # daemon.role = "seeder"


@dataclass(frozen=True)
class Subscribe:
    """Let us trade this image: my State follows; `fetching`: I am fetching it."""

    image_id: str
    fetching: bool


@dataclass(frozen=True)
class Unsubscribe:
    """Stop sending changes of this image (and I no longer fetch it)."""

    image_id: str


@dataclass(frozen=True)
class State:
    """What the sender holds of an image (after Subscribe, and as its answer)."""

    image_id: str
    manifest: Manifest | None  # None: the sender has no entry for the image
    have: bytes  # bitmap of readable blocks (empty if manifest is None)
    fetching: bool


@dataclass(frozen=True)
class Have:
    """Blocks that became readable at the sender, with their digests."""

    image_id: str
    blocks: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class Slot:
    """The sender gives the receiver one of its upload slots (open) or takes it back."""

    image_id: str
    open: bool


@dataclass(frozen=True)
class Status:
    """The sender started or stopped fetching an image (or dropped it: gone)."""

    image_id: str
    fetching: bool
    gone: bool = False


@dataclass(frozen=True)
class Join:
    """To an image's reader: I fetch (or hold) this image; where are the others?"""

    image_id: str
    node: str
    host: str
    port: int
    fetching: bool


@dataclass(frozen=True)
class Peers:
    """A reader's answer to Join: its manifest (None if it has none) and hosts that
    fetch or hold the image (node, host, port)."""

    image_id: str
    manifest: Manifest | None
    peers: tuple[tuple[str, str, int], ...]


Message = Hello | Subscribe | Unsubscribe | State | Have | Slot | Status | Join | Peers


def encode(msg: Message) -> bytes:
    """The msgpack bytes of one message."""
    body: dict[str, Any]
    match msg:
        case Hello():
            body = {"t": "hello", "node": msg.node, "host": msg.host, "port": msg.port}
            if msg.seeder:  # only then: a daemon of the version before reads it as before
                body["seeder"] = True
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
                "fetching": msg.fetching,
            }
        case Have():
            body = {"t": "have", "image": msg.image_id, "blocks": [list(c) for c in msg.blocks]}
        case Slot():
            body = {"t": "slot", "image": msg.image_id, "open": msg.open}
        case Status():
            body = {
                "t": "status",
                "image": msg.image_id,
                "fetching": msg.fetching,
                "gone": msg.gone,
            }
        case Join():
            body = {
                "t": "join",
                "image": msg.image_id,
                "node": msg.node,
                "host": msg.host,
                "port": msg.port,
                "fetching": msg.fetching,
            }
        case Peers():
            body = {
                "t": "peers",
                "image": msg.image_id,
                "manifest": msg.manifest.encode() if msg.manifest is not None else None,
                "peers": [list(p) for p in msg.peers],
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
        return Hello(*_where(obj["node"], obj["host"], obj["port"]), obj.get("seeder") is True)
    image_id = validate_image_id(obj["image"])
    if kind == "sub":
        return Subscribe(image_id, _bool(obj["fetching"]))
    if kind == "unsub":
        return Unsubscribe(image_id)
    if kind == "state":
        manifest = _manifest(obj["manifest"], image_id)
        have = obj["have"]
        if not isinstance(have, bytes):
            raise TypeError("have is not a bitmap")
        if manifest is not None and len(have) != (manifest.blocks + 7) // 8:
            raise ValueError("have bitmap does not match the block count")
        if manifest is not None and not manifest.block_size:
            raise ValueError("manifest without blocks")
        return State(image_id, manifest, have, _bool(obj["fetching"]))
    if kind == "have":
        blocks = []
        for entry in obj["blocks"]:
            index, digest = entry
            if not isinstance(index, int) or index < 0:
                raise ValueError("bad block index")
            if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
                raise ValueError("bad digest")
            blocks.append((index, digest))
        return Have(image_id, tuple(blocks))
    if kind == "slot":
        return Slot(image_id, _bool(obj["open"]))
    if kind == "status":
        return Status(image_id, _bool(obj["fetching"]), _bool(obj.get("gone", False)))
    if kind == "join":
        node, host, port = _where(obj["node"], obj["host"], obj["port"])
        return Join(image_id, node, host, port, _bool(obj["fetching"]))
    if kind == "peers":
        peers = obj["peers"]
        if not isinstance(peers, list) or len(peers) > MAX_PEERS:
            raise ValueError("bad peer list")
        return Peers(
            image_id,
            _manifest(obj["manifest"], image_id),
            tuple(_where(*p) for p in peers),
        )
    raise ValueError(f"unknown message type {kind!r}")


def _where(node: object, host: object, port: object) -> tuple[str, str, int]:
    if not isinstance(node, str) or not 0 < len(node) <= NODE_ID_MAX:
        raise ValueError("bad node id")
    if not isinstance(host, str) or len(host) > 255:
        raise ValueError("bad host")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError("bad port")
    return node, host, port


def _manifest(data: object, image_id: str) -> Manifest | None:
    if data is None:
        return None
    if not isinstance(data, bytes):
        raise TypeError("manifest is not bytes")
    manifest = Manifest.decode(data)
    if manifest.image_id != image_id:
        raise ValueError("manifest of another image")
    return manifest


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected a boolean")
    return value
