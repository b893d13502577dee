"""On-disk cache: one directory per image, written chunk by chunk, crash-safe.

Layout under cache.dir:

    lock                      flock: one daemon per cache directory
    images/<id>/manifest      msgpack Manifest, replaced atomically (temp, fsync, rename)
    images/<id>/data          the image bytes, sparse until every chunk is written
    images/<id>/chunks.log    append-only: a record per chunk that is durable and verified
    images/<id>/meta          msgpack: pinned, hits, last access
    tmp/                      staging for new image dirs and for deletes (cleared at start)

A chunk is written with pwrite + fdatasync *before* its log record is appended and
fsynced, so after a crash at any moment every logged chunk is on disk; a chunk
whose record did not make it is simply fetched again. An image becomes complete
only when a full read-back matches every chunk digest and the origin's sha256; its
manifest then carries all digests and the log is removed.

Blocking calls here are synchronous on purpose: the async callers run them in a
thread (asyncio.to_thread), so this module stays free of event-loop concerns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .errors import ImageBusy, ImageNotFound, IntegrityError, StorageError, SwarmcacheError
from .eviction import Candidate, plan_eviction
from .manifest import (
    LOG_RECORD_SIZE,
    Manifest,
    bitmap_count,
    bitmap_get,
    bitmap_new,
    bitmap_set,
    chunk_digest,
    decode_log,
    encode_log_record,
    validate_image_id,
)

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data`: temp file in the same dir, (fsync), rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _storage_error(f"cannot write {path}", err) from err


def _storage_error(what: str, err: OSError) -> StorageError:
    reason = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return StorageError(f"{what}: {reason}")


@dataclass
class CachedImage:
    """One image in the cache: its manifest, which chunks are present, and usage stats."""

    path: Path
    manifest: Manifest
    bitmap: bytearray
    pinned: bool = False
    hits: int = 0
    last_access: float = field(default_factory=time.time)
    readers: int = 0
    readable: bytearray = field(default_factory=bytearray)
    _bits_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fd: int | None = field(default=None, repr=False)
    _log_fd: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Chunks written and checked but maybe not yet durable can already be read.
        if not self.readable:
            self.readable = bytearray(self.bitmap)

    @property
    def image_id(self) -> str:
        """The image id."""
        return self.manifest.image_id

    @property
    def data_path(self) -> Path:
        """Path of the (possibly sparse) image file."""
        return self.path / "data"

    @property
    def complete(self) -> bool:
        """Fully present and verified."""
        return self.manifest.complete

    @property
    def present_chunks(self) -> int:
        """How many chunks are durable and checked (survive a crash)."""
        return bitmap_count(self.bitmap)

    @property
    def present_bytes(self) -> int:
        """Bytes held (what counts against max_size)."""
        m = self.manifest
        if m.complete:
            return m.size
        n = self.present_chunks
        if n and bitmap_get(self.bitmap, m.chunks - 1):
            return (n - 1) * m.chunk_size + m.span(m.chunks - 1)[1]
        return n * m.chunk_size

    def has(self, index: int) -> bool:
        """Can chunk `index` be read: written and checked (durable or about to be)."""
        return self.manifest.complete or bitmap_get(self.readable, index)

    # -- blocking I/O: call through asyncio.to_thread --------------------------------

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview, digest: bytes) -> None:
        """Write a checked chunk: readable now, durable after sync_chunks. Blocking."""
        offset, length = self.manifest.span(index)
        if len(data) != length:
            raise IntegrityError(
                f"chunk {index} of {self.image_id}: {len(data)} bytes, want {length}"
            )
        try:
            fd = self._data_fd()
            view = memoryview(data)
            done = 0
            while done < length:
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as err:
            raise _storage_error(f"cannot store chunk {index} of {self.image_id}", err) from err
        with self._bits_lock:
            self.manifest.set_digest(index, digest)
            bitmap_set(self.readable, index)

    def sync_chunks(self, indices: list[int]) -> None:
        """Make written chunks durable, then log them as present (one group commit). Blocking."""
        if not indices:
            return
        try:
            os.fdatasync(self._data_fd())
            records = b"".join(
                encode_log_record(i, bytes(self.manifest.digests[i * 16 : (i + 1) * 16]))
                for i in indices
            )
            if self._log_fd is None:
                self._log_fd = os.open(
                    self.path / "chunks.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
                )
            os.write(self._log_fd, records)
            os.fdatasync(self._log_fd)
        except OSError as err:
            raise _storage_error(f"cannot make chunks of {self.image_id} durable", err) from err
        with self._bits_lock:
            for i in indices:
                bitmap_set(self.bitmap, i)

    def read_chunk(self, index: int) -> bytes:
        """Read chunk `index` back from disk. Blocking."""
        offset, length = self.manifest.span(index)
        return os.pread(self._data_fd(), length, offset)

    def drop_corrupt(self) -> list[int]:
        """Check every present chunk on disk against its digest; forget the bad ones. Blocking.

        Used when a fetch resumes after a restart: a chunk logged before a crash must
        still hold the bytes its digest promises before it counts.
        """
        bad = []
        for index in range(self.manifest.chunks):
            if bitmap_get(self.bitmap, index) and chunk_digest(
                self.read_chunk(index)
            ) != self.manifest.digest(index):
                bad.append(index)
        with self._bits_lock:
            for index in bad:
                self.bitmap[index >> 3] &= ~(1 << (index & 7))
                self.readable[index >> 3] &= ~(1 << (index & 7))
        return bad

    def mark_complete(self, sha256: str) -> None:
        """Persist the verified manifest and drop the chunk log. Blocking."""
        self.manifest.sha256 = sha256
        self.manifest.complete = True
        write_atomic(self.path / "manifest", self.manifest.encode())
        self.close()
        with contextlib.suppress(FileNotFoundError):
            (self.path / "chunks.log").unlink()

    def save_meta(self, *, durable: bool = False) -> None:
        """Persist pinned/hits/last access (durable only when the pin changes). Blocking."""
        data = msgpack.packb(
            {"pinned": self.pinned, "hits": self.hits, "last_access": self.last_access}
        )
        write_atomic(self.path / "meta", data, durable=durable)

    def close(self) -> None:
        """Close open file descriptors."""
        for name in ("_fd", "_log_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def _data_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_RDWR)
        return self._fd


class Store:
    """All cached images under one directory."""

    def __init__(self, root: Path, max_size: int) -> None:
        self.root = Path(root)
        self.max_size = max_size
        self.images: dict[str, CachedImage] = {}
        self._lock_fd: int | None = None

    # -- lifecycle --------------------------------------------------------------------

    def open(self) -> None:
        """Take the directory lock, clear staging, load every image. Blocking."""
        try:
            for sub in ("images", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _storage_error(f"cannot use cache dir {self.root}", err) from err
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StorageError(f"cache dir {self.root} is in use by another swarmcache") from None
        for leftover in (self.root / "tmp").iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        for entry in sorted((self.root / "images").iterdir()):
            try:
                image = self._load(entry)
            except (SwarmcacheError, OSError, ValueError) as err:
                log.warning("discarding unreadable cache entry %s: %s", entry.name, err)
                self._trash(entry)
                continue
            self.images[image.image_id] = image
        log.info("cache %s: %d images, %d bytes", self.root, len(self.images), self.used_bytes())

    def close(self) -> None:
        """Close every image's files and release the lock."""
        for image in self.images.values():
            image.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load(self, path: Path) -> CachedImage:
        validate_image_id(path.name)
        manifest = Manifest.decode((path / "manifest").read_bytes())
        if manifest.image_id != path.name:
            raise IntegrityError("manifest names another image")
        if not (path / "data").exists():
            raise IntegrityError("data file missing")
        bitmap = bitmap_new(manifest.chunks)
        if not manifest.complete:
            log_path = path / "chunks.log"
            records = log_path.read_bytes() if log_path.exists() else b""
            valid = 0
            for index, digest in decode_log(records, manifest.chunks):
                manifest.set_digest(index, digest)
                bitmap_set(bitmap, index)
                valid += 1
            if valid * LOG_RECORD_SIZE != len(records):  # torn tail from a crash: cut it off
                os.truncate(log_path, valid * LOG_RECORD_SIZE)
        meta: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError, msgpack.UnpackException):
            loaded = msgpack.unpackb((path / "meta").read_bytes(), max_map_len=16)
            meta = loaded if isinstance(loaded, dict) else {}
        return CachedImage(
            path=path,
            manifest=manifest,
            bitmap=bitmap,
            pinned=bool(meta.get("pinned", False)),
            hits=int(meta.get("hits", 0)),
            last_access=float(meta.get("last_access", (path / "manifest").stat().st_mtime)),
        )

    # -- images -----------------------------------------------------------------------

    def get(self, image_id: str) -> CachedImage | None:
        """The cached image, or None."""
        return self.images.get(image_id)

    def create(self, manifest: Manifest) -> CachedImage:
        """Start a new, empty cache entry (replacing a stale one). Blocking."""
        old = self.images.get(manifest.image_id)
        if old is not None:
            self.remove(manifest.image_id, force=True)
        staging = self.root / "tmp" / uuid.uuid4().hex
        final = self.root / "images" / manifest.image_id
        try:
            staging.mkdir()
            with open(staging / "data", "wb") as f:
                f.truncate(manifest.size)
            write_atomic(staging / "manifest", manifest.encode())
            os.rename(staging, final)
            _fsync_dir(final.parent)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise _storage_error(f"cannot create cache entry for {manifest.image_id}", err) from err
        image = CachedImage(path=final, manifest=manifest, bitmap=bitmap_new(manifest.chunks))
        self.images[manifest.image_id] = image
        return image

    def remove(self, image_id: str, *, force: bool = False) -> None:
        """Drop an image from the cache (ImageBusy while it is being read). Blocking."""
        image = self.images.get(image_id)
        if image is None:
            raise ImageNotFound(f"image {image_id!r} is not in the cache")
        if image.readers and not force:
            raise ImageBusy(f"image {image_id!r} is being read by {image.readers} client(s)")
        del self.images[image_id]
        image.close()
        self._trash(image.path)

    def _trash(self, path: Path) -> None:
        # Rename first so the entry vanishes atomically, then delete at leisure.
        target = self.root / "tmp" / uuid.uuid4().hex
        try:
            os.rename(path, target)
        except OSError:
            target = path
        shutil.rmtree(target, ignore_errors=True)

    def used_bytes(self) -> int:
        """Bytes held by all images."""
        return sum(i.present_bytes for i in self.images.values())

    def evict(self, in_use: set[str], incoming: int = 0) -> list[str]:
        """Evict LRU images until used + incoming <= max_size; returns evicted ids. Blocking."""
        candidates = [
            Candidate(
                image_id=i.image_id,
                bytes=i.present_bytes,
                last_access=i.last_access,
                complete=i.complete,
                pinned=i.pinned,
                in_use=i.readers > 0 or i.image_id in in_use,
            )
            for i in self.images.values()
        ]
        victims = plan_eviction(candidates, self.max_size, incoming)
        for image_id in victims:
            log.info(
                "evicting %s (%d bytes) to stay under max_size",
                image_id,
                self.images[image_id].present_bytes,
            )
            self.remove(image_id)
        over = self.used_bytes() + incoming - self.max_size
        if over > 0:
            log.warning("cache over max_size by %d bytes: the rest is pinned or in use", over)
        return victims
