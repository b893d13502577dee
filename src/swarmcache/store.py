"""On-disk cache: one directory per image, written chunk by chunk, crash-safe.

Layout under cache.dir:

    lock                      flock: one daemon per cache directory
    images/<id>/manifest      msgpack Manifest, replaced atomically (temp, fsync, rename)
    images/<id>/data          the image bytes, sparse until every chunk is written
    images/<id>/chunks.log    append-only: a record per chunk that is durable and verified
    images/<id>/meta          msgpack: pinned, hits, last access
    tmp/                      staging for new image dirs and for deletes (cleared at start)

A chunk is written with pwrite (readable from then on) and made durable by a group
commit: fdatasync of the data file *before* the chunks' log records are appended
and fsynced, so after a crash at any moment every logged chunk is on disk; a chunk
whose record did not make it is simply fetched again. After a restart a logged
chunk is re-checked against its digest before it is readable. An image becomes
complete (after the fetcher checked its whole-image hash) with a last fdatasync and an atomic
manifest that carries all digests; the log is then removed.

Blocking calls here are synchronous on purpose: the async callers run them in a
thread (asyncio.to_thread), so this module stays free of event-loop concerns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from . import buffers
from .errors import ImageBusy, ImageNotFound, IntegrityError, StorageError, SwarmcacheError
from .eviction import Candidate, plan_eviction
from .manifest import (
    DIGEST_SIZE,
    LOG_RECORD_SIZE,
    Buffer,
    Checksum,
    Manifest,
    Pieces,
    bitmap_count,
    bitmap_get,
    bitmap_new,
    bitmap_set,
    decode_log,
    encode_log_record,
    pieces_size,
    validate_image_id,
)
from .signing import Signer, Trust

log = logging.getLogger(__name__)
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
META_SAVE_INTERVAL = 30.0  # seconds between saves of access stats


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` durably: temp file in the same dir, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    # blocks written and checked in this run (a readable chunk's blocks count too)
    blocks_ready: bytearray = field(default_factory=bytearray)
    _bits_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fd_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fd: int | None = field(default=None, repr=False)
    _log_fd: int | None = field(default=None, repr=False)

    meta_dirty: bool = field(default=False, repr=False)
    removed: bool = field(default=False, repr=False)  # taken out of the cache
    _meta_saved: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        # A chunk is readable once written and checked in this run, or once a chunk
        # logged before a restart was checked again on disk (check_present): never
        # straight from the log, which a crash or a bad disk may have outlived.
        if not self.readable:
            self.readable = bitmap_new(self.manifest.chunks)
        if not self.blocks_ready:
            self.blocks_ready = bitmap_new(self.manifest.blocks)

    def cut(self, block_size: int) -> None:
        """Give an image written before blocks existed (version 1) its blocks: their
        digests are worked out as its chunks are checked or read (check_present,
        ensure_blocks). No-op if it has them."""
        m = self.manifest
        if m.block_size:
            return
        with self._bits_lock:
            m.block_size = block_size
            m.block_digests = bytearray(DIGEST_SIZE * m.blocks)
            self.blocks_ready = bitmap_new(m.blocks)

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

    def has_block(self, block: int) -> bool:
        """Can block `block` be read (and served on): written and checked."""
        m = self.manifest
        return (
            m.complete
            or bitmap_get(self.blocks_ready, block)
            or bitmap_get(self.readable, block * m.block_size // m.chunk_size)
        )

    # -- blocking I/O: call through asyncio.to_thread --------------------------------

    def write_chunk(self, index: int, data: Buffer | Pieces, digest: bytes) -> None:
        """Write a checked chunk (whole or in pieces): readable now, durable after
        sync_chunks. Blocking."""
        offset, length = self.manifest.span(index)
        pieces = [data] if isinstance(data, Buffer) else data
        size = pieces_size(pieces)
        if size != length:
            raise IntegrityError(f"chunk {index} of {self.image_id}: {size} bytes, want {length}")
        blocks: list[bytes] = []
        if self.manifest.block_size:
            _, blocks = self.manifest.hash_chunk(pieces)
        try:
            pwrite_all(self._data_fd(), pieces, offset)
        except OSError as err:
            raise _storage_error(f"cannot store chunk {index} of {self.image_id}", err) from err
        with self._bits_lock:
            self.manifest.set_digest(index, digest)
            for block, block_digest in zip(self.manifest.blocks_of(index), blocks, strict=True):
                self.manifest.set_block_digest(block, block_digest)
            bitmap_set(self.readable, index)

    def write_block(self, block: int, data: Buffer | Pieces, digest: bytes) -> bool:
        """Write a checked block: readable (and served on) now. True when it was the
        last of its chunk: seal_chunk() then makes the chunk readable. Blocking."""
        m = self.manifest
        offset, length = m.block_span(block)
        pieces = [data] if isinstance(data, Buffer) else data
        size = pieces_size(pieces)
        if size != length:
            raise IntegrityError(f"block {block} of {self.image_id}: {size} bytes, want {length}")
        try:
            pwrite_all(self._data_fd(), pieces, offset)
        except OSError as err:
            raise _storage_error(f"cannot store block {block} of {self.image_id}", err) from err
        chunk = offset // m.chunk_size
        with self._bits_lock:
            m.set_block_digest(block, digest)
            bitmap_set(self.blocks_ready, block)
            return not bitmap_get(self.readable, chunk) and all(
                bitmap_get(self.blocks_ready, b) for b in m.blocks_of(chunk)
            )

    def seal_chunk(self, index: int) -> bytes:
        """Every block of chunk `index` is written: read it back, check each block
        against its digest once more (what is logged must be what is on disk), and
        make the chunk readable with its digest, which it returns. Blocking."""
        m = self.manifest
        with self.read_chunk(index) as data:
            digest, blocks = m.hash_chunk([data])
        bad = [b for b, d in zip(m.blocks_of(index), blocks, strict=True) if d != m.block_digest(b)]
        with self._bits_lock:
            if bad:
                for b in bad:
                    self.blocks_ready[b >> 3] &= ~(1 << (b & 7))
                raise IntegrityError(
                    f"chunk {index} of {self.image_id}: blocks {bad} on disk do not match "
                    "their digests"
                )
            m.set_digest(index, digest)
            bitmap_set(self.readable, index)
        return digest

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
                _fsync_dir(self.path)
            view = memoryview(records)
            while view:
                view = view[os.write(self._log_fd, view) :]
            os.fdatasync(self._log_fd)
        except OSError as err:
            # Linux reports a failed writeback once per file: after this, no later
            # fdatasync can vouch for what was written before. Forget every chunk not
            # yet logged (they are fetched again) and start over with a fresh fd.
            with self._bits_lock:
                self.readable[:] = self.bitmap
                self.blocks_ready[:] = bytes(len(self.blocks_ready))  # nor their blocks
            self.close()
            raise _storage_error(f"cannot make chunks of {self.image_id} durable", err) from err
        with self._bits_lock:
            for i in indices:
                bitmap_set(self.bitmap, i)

    @contextlib.contextmanager
    def read_chunk(self, index: int) -> Iterator[memoryview]:
        """Chunk `index` read back from disk, for the `with` block only (hash it, don't
        keep it): the buffer is reused after it (see buffers.py). Blocking."""
        offset, length = self.manifest.span(index)
        with buffers.SHARED.lend(length) as buf, memoryview(buf) as view:
            got = 0
            fd = self._data_fd()
            while got < length:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:  # the file is cut short: what is there fails its digest
                    break
                got += n
            with view[:got] as data:
                yield data

    def unchecked(self) -> list[int]:
        """Chunks logged as durable but not yet re-checked in this run (after a restart)."""
        return [
            i
            for i in range(self.manifest.chunks)
            if bitmap_get(self.bitmap, i) and not bitmap_get(self.readable, i)
        ]

    def check_present(self, indices: list[int] | None = None) -> list[int]:
        """Re-check logged chunks on disk; good ones become readable. Blocking.

        Used when a fetch resumes after a restart: a chunk logged before a crash
        must still hold the bytes its digest promises before it is served. Returns
        the bad chunks, which are forgotten (and fetched again).
        """
        bad = []
        for index in self.unchecked() if indices is None else indices:
            if not bitmap_get(self.bitmap, index) or bitmap_get(self.readable, index):
                continue
            blocks: list[bytes] = []
            with self.read_chunk(index) as data:
                digest, blocks = self.manifest.hash_chunk([data])
            ok = digest == self.manifest.digest(index)
            with self._bits_lock:
                if ok:
                    for b, d in zip(self.manifest.blocks_of(index), blocks, strict=True):
                        self.manifest.set_block_digest(b, d)
                    bitmap_set(self.readable, index)
                else:
                    self.bitmap[index >> 3] &= ~(1 << (index & 7))
                    bad.append(index)
        return bad

    def verify(self) -> tuple[int, list[int]]:
        """Re-hash every chunk held against its digest (a disk that rotted, a hand that
        slipped); drop the bad ones, which makes the image partial: they are fetched
        again by the next read. Returns (chunks checked, bad chunks). Blocking; the
        caller keeps fetches of this image out meanwhile."""
        m = self.manifest
        held = [i for i in range(m.chunks) if m.complete or bitmap_get(self.bitmap, i)]
        bad = []
        for index in held:
            with self.read_chunk(index) as data:
                if m.hash_chunk([data])[0] != m.digest(index):
                    bad.append(index)
        if bad:
            self._drop(set(bad), [i for i in held if i not in set(bad)])
        return len(held), bad

    def _drop(self, bad: set[int], good: list[int]) -> None:
        """Forget chunks `bad`: the image is partial with chunks `good` (logged first,
        then the manifest saying it is incomplete: a crash between leaves the image
        as it was, to be verified again). Blocking."""
        m = self.manifest
        records = b"".join(encode_log_record(i, m.digest(i) or bytes(16)) for i in good)
        self.close()  # the log is rewritten whole: no appending fd may outlive it
        try:
            write_atomic(self.path / "chunks.log", records)
            partial = dataclasses.replace(m, complete=False, image_hash=None)
            write_atomic(self.path / "manifest", partial.encode())
        except OSError as err:
            raise _storage_error(f"cannot drop bad chunks of {self.image_id}", err) from err
        # the digests stay: they say what the dropped chunks must hold when fetched again
        with self._bits_lock:
            bitmap = bitmap_new(m.chunks)
            for index in good:
                bitmap_set(bitmap, index)
            self.bitmap[:] = bitmap
            self.readable[:] = bitmap  # just read back and checked
            self.blocks_ready[:] = bytes(len(self.blocks_ready))
            m.complete, m.image_hash = False, None

    def ensure_blocks(self, block_size: int) -> None:
        """A complete image written before blocks existed: work out its block digests
        from the data and save them with its manifest. No-op if it has them. Blocking."""
        m = self.manifest
        if not m.complete or m.block_size:
            return
        cut = dataclasses.replace(m, block_size=block_size, block_digests=bytearray())
        for index in range(m.chunks):
            with self.read_chunk(index) as data:
                _, blocks = cut.hash_chunk([data])
            for b, d in zip(cut.blocks_of(index), blocks, strict=True):
                cut.set_block_digest(b, d)
        write_atomic(self.path / "manifest", cut.encode())
        with self._bits_lock:
            m.block_digests = cut.block_digests
            m.block_size = block_size
            self.blocks_ready = bitmap_new(m.blocks)

    def adopt(self, signed: Manifest) -> bool:
        """Take the digests and signature of a trusted manifest of this image's version
        (from now on every block must match them) and save it. False, and nothing
        changed, if a chunk or block held here has another digest. Blocking."""
        m = self.manifest
        if not signed.trusted or not signed.same_source(m) or signed.block_size != m.block_size:
            return False
        with self._bits_lock:
            for i in range(m.chunks):
                held = bitmap_get(self.bitmap, i) or bitmap_get(self.readable, i)
                if held and m.digest(i) != signed.digest(i):
                    return False
            for b in range(m.blocks):
                if bitmap_get(self.blocks_ready, b) and m.block_digest(b) != signed.block_digest(b):
                    return False
        adopted = dataclasses.replace(
            m,
            digests=bytearray(signed.digests),
            block_digests=bytearray(signed.block_digests),
            signer=signed.signer,
            signature=signed.signature,
        )
        write_atomic(self.path / "manifest", adopted.encode())
        with self._bits_lock:
            m.digests[:] = signed.digests
            m.block_digests[:] = signed.block_digests
            m.signer, m.signature, m.trusted = signed.signer, signed.signature, True
        return True

    def mark_complete(self, image_hash: Checksum, signer: Signer | None = None) -> None:
        """Make every byte durable, persist the verified manifest (signed by `signer`,
        a seeder's key, if given), drop the log. Blocking."""
        try:
            os.fdatasync(self._data_fd())
        except OSError as err:
            raise _storage_error(f"cannot make {self.image_id} durable", err) from err
        done = dataclasses.replace(self.manifest, image_hash=image_hash, complete=True)
        if signer is not None:
            signer.sign(done)
        write_atomic(self.path / "manifest", done.encode())
        m = self.manifest
        with self._bits_lock:
            m.signer, m.signature, m.trusted = done.signer, done.signature, done.trusted
            m.image_hash = image_hash
            m.complete = True
        self.close()
        with contextlib.suppress(FileNotFoundError):
            (self.path / "chunks.log").unlink()

    def save_meta(self) -> None:
        """Persist pinned/hits/last access, durably (a torn meta must not lose a pin). Blocking."""
        data = msgpack.packb(
            {"pinned": self.pinned, "hits": self.hits, "last_access": self.last_access}
        )
        write_atomic(self.path / "meta", data)
        self._meta_saved = time.monotonic()
        self.meta_dirty = False

    def touch(self, now: float) -> bool:
        """Count a read; True when the access stats are due to be saved (every 30 s at most)."""
        self.hits += 1
        self.last_access = now
        self.meta_dirty = True
        now_mono = time.monotonic()
        if now_mono - self._meta_saved < META_SAVE_INTERVAL:
            return False
        self._meta_saved = now_mono  # one save for readers finishing together
        return True

    def close(self) -> None:
        """Close open file descriptors."""
        with self._fd_lock:
            for name in ("_fd", "_log_fd"):
                fd = getattr(self, name)
                if fd is not None:
                    os.close(fd)
                    setattr(self, name, None)

    def _data_fd(self) -> int:
        fd = self._fd
        if fd is None:  # several I/O threads may get here at once: open exactly one
            with self._fd_lock:
                if self._fd is None:
                    self._fd = os.open(self.data_path, os.O_RDWR)
                fd = self._fd
        return fd


class Store:
    """All cached images under one directory."""

    def __init__(self, root: Path, max_size: int, trust: Trust | None = None) -> None:
        self.root = Path(root)
        self.max_size = max_size
        self.trust = trust  # manifests signed by these keys are trusted again at load
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
        """Save unsaved access stats, close every image's files, release the lock. Blocking."""
        for image in self.images.values():
            if image.meta_dirty:
                with contextlib.suppress(StorageError):
                    image.save_meta()
            image.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load(self, path: Path) -> CachedImage:
        validate_image_id(path.name)
        manifest = Manifest.decode((path / "manifest").read_bytes())
        if manifest.image_id != path.name:
            raise IntegrityError("manifest names another image")
        if self.trust is not None:
            self.trust.check(manifest)  # a bad signature: IntegrityError, the entry goes
        if not (path / "data").exists():
            raise IntegrityError("data file missing")
        for leftover in path.glob(".*.tmp"):  # an atomic write cut short by a crash
            leftover.unlink()
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

    def make_entry(self, manifest: Manifest) -> CachedImage:
        """Create a new, empty cache entry on disk (not yet in `images`: see add). Blocking."""
        if manifest.image_id in self.images:
            raise StorageError(f"cache entry {manifest.image_id} exists")
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
        return CachedImage(path=final, manifest=manifest, bitmap=bitmap_new(manifest.chunks))

    def add(self, image: CachedImage) -> None:
        """Publish an entry made by make_entry (on the event loop)."""
        self.images[image.image_id] = image

    def remove(self, image_id: str, *, force: bool = False) -> Path:
        """Take an image out of the cache at once (ImageBusy while it is being read).

        Only renames its directory into tmp/ (one fast syscall, safe on the event loop);
        the caller deletes the returned path with purge(), in a thread.
        """
        image = self.images.get(image_id)
        if image is None:
            raise ImageNotFound(f"image {image_id!r} is not in the cache")
        if image.readers and not force:
            raise ImageBusy(f"image {image_id!r} is being read by {image.readers} client(s)")
        del self.images[image_id]
        image.removed = True
        image.close()
        return self._to_trash(image.path)

    def discard(self, image: CachedImage) -> Path:
        """Set aside an entry made by make_entry and never added (an ingest that
        failed); the caller deletes the returned path with purge()."""
        image.removed = True
        image.close()
        return self._to_trash(image.path)

    def _to_trash(self, path: Path) -> Path:
        target = self.root / "tmp" / uuid.uuid4().hex
        try:
            os.rename(path, target)
        except OSError:
            return path
        return target

    def _trash(self, path: Path) -> None:
        self.purge(self._to_trash(path))

    @staticmethod
    def purge(path: Path) -> None:
        """Delete what remove() put aside. Blocking."""
        shutil.rmtree(path, ignore_errors=True)

    def used_bytes(self) -> int:
        """Bytes held by all images."""
        return sum(i.present_bytes for i in self.images.values())

    def evict(self, in_use: set[str], incoming: int = 0, wait: bool = False) -> list[Path]:
        """Evict LRU images until used + incoming <= max_size; returns paths to purge.
        `wait`: images in use keep their place in the LRU order (plan_eviction)."""
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
        victims = plan_eviction(candidates, self.max_size, incoming, wait)
        trash = []
        for image_id in victims:
            log.info(
                "evicting %s (%d bytes) to stay under max_size",
                image_id,
                self.images[image_id].present_bytes,
            )
            trash.append(self.remove(image_id))
        over = self.used_bytes() + incoming - self.max_size
        if over > 0 and wait:
            log.info("cache over max_size by %d bytes until images in use are done", over)
        elif over > 0:
            log.warning("cache over max_size by %d bytes: the rest is pinned or in use", over)
        return trash


def pwrite_all(fd: int, pieces: Pieces, offset: int) -> None:
    """Write `pieces` back to back at `offset` with pwritev (no join). Blocking."""
    views = [memoryview(p) for p in pieces if len(p)]
    first = 0
    while first < len(views):
        n = os.pwritev(fd, views[first : first + _IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:  # a short write ended inside this piece
            views[first] = views[first][n:]
