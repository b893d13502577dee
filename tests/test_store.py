"""The on-disk store with real files: reload, torn log, full disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from swarmcache import buffers
from swarmcache.buffers import BufferPool
from swarmcache.errors import IntegrityError, StorageError
from swarmcache.manifest import LOG_RECORD_SIZE, Checksum, Manifest, block_digest, digest_blocks
from swarmcache.store import Store, pwrite_all

CHUNK = 64 * 1024


def _new(store: Store, manifest: Manifest):
    image = store.make_entry(manifest)
    store.add(image)
    return image


def _chunk(i: int) -> bytes:
    return bytes([i % 251]) * CHUNK


def test_reload_keeps_logged_chunks_and_cuts_torn_tail(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = _new(store, Manifest("img", size=4 * CHUNK, chunk_size=CHUNK))
    for i in (0, 1, 2):
        image.write_chunk(i, _chunk(i), block_digest([_chunk(i)]))
    assert [image.has(i) for i in range(4)] == [True, True, True, False]
    assert image.present_chunks == 0  # readable, not yet durable
    image.sync_chunks([0, 2])  # 1 was written but never synced: lost in the "crash"
    assert image.present_chunks == 2
    store.close()
    log = tmp_path / "images" / "img" / "chunks.log"
    with open(log, "ab") as f:
        f.write(b"\x01\x02\x03")  # a record torn by a crash
    assert log.stat().st_size == 2 * LOG_RECORD_SIZE + 3

    store = Store(tmp_path, 1 << 30)
    store.open()
    image = store.images["img"]
    assert image.present_bytes == 2 * CHUNK
    assert [i for i in range(4) if image.has(i)] == []  # nothing readable before the check
    assert image.check_present() == []
    assert [i for i in range(4) if image.has(i)] == [0, 2]
    assert image.manifest.digest(2) == block_digest([_chunk(2)])
    assert log.stat().st_size == 2 * LOG_RECORD_SIZE
    with image.read_chunk(2) as data:
        assert data == _chunk(2)
    for i in (1, 3):
        image.write_chunk(i, _chunk(i), block_digest([_chunk(i)]))
    image.sync_chunks([1, 3])
    sha = hashlib.sha256(b"".join(_chunk(i) for i in range(4))).hexdigest()
    assert hashlib.sha256(image.data_path.read_bytes()).hexdigest() == sha
    image.mark_complete(Checksum("sha256", sha))
    assert not log.exists()
    store.close()

    store = Store(tmp_path, 1 << 30)
    store.open()
    assert store.images["img"].complete
    assert store.images["img"].manifest.image_hash == Checksum("sha256", sha)
    store.close()


def test_check_present_forgets_chunks_changed_on_disk(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = _new(store, Manifest("img", size=3 * CHUNK, chunk_size=CHUNK))
    for i in range(3):
        image.write_chunk(i, _chunk(i), block_digest([_chunk(i)]))
    image.sync_chunks([0, 1, 2])
    store.close()
    with open(image.data_path, "r+b") as f:
        f.seek(CHUNK + 7)
        f.write(b"!")
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = store.images["img"]
    assert image.check_present() == [1]
    assert [image.has(i) for i in range(3)] == [True, False, True]
    assert image.present_chunks == 2
    store.close()


def test_second_daemon_on_same_dir_is_refused(tmp_path: Path) -> None:
    first = Store(tmp_path, 1 << 30)
    first.open()
    with pytest.raises(StorageError, match="in use by another swarmcache"):
        Store(tmp_path, 1 << 30).open()
    first.close()


def test_full_disk_is_a_clear_error_and_keeps_what_was_written(tiny_fs: Path) -> None:
    store = Store(tiny_fs, 1 << 30)
    store.open()
    image = _new(store, Manifest("big", size=16 * CHUNK, chunk_size=CHUNK))
    written = 0
    with pytest.raises(StorageError, match="disk full"):
        for i in range(16):
            image.write_chunk(i, _chunk(i), block_digest([_chunk(i)]))
            image.sync_chunks([i])
            written += 1
    assert 0 < written < 16
    store.close()
    store = Store(tiny_fs, 1 << 30)
    store.open()
    assert store.images["big"].present_chunks == written
    store.close()


def test_durability_order_data_then_log_then_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 cannot show a missing fsync (the page cache survives): record the calls."""
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = _new(store, Manifest("img", size=2 * CHUNK, chunk_size=CHUNK))
    events: list[tuple[str, str]] = []
    real_fdatasync, real_write, real_fsync, real_replace = (
        os.fdatasync,
        os.write,
        os.fsync,
        os.replace,
    )

    def name(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def fdatasync(fd: int) -> None:
        events.append(("fdatasync", name(fd)))
        real_fdatasync(fd)

    def write(fd: int, data: bytes) -> int:
        events.append(("write", name(fd)))
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        events.append(("fsync", name(fd)))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("rename", os.path.basename(str(dst))))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for i in range(2):
        image.write_chunk(i, _chunk(i), block_digest([_chunk(i)]))
    assert events == []  # written, not yet durable, not logged
    image.sync_chunks([0, 1])
    assert events[0] == ("fdatasync", "data")
    assert events.index(("write", "chunks.log")) < events.index(("fdatasync", "chunks.log"))
    assert image.present_chunks == 2
    events.clear()
    image.mark_complete(Checksum("sha256", hashlib.sha256(_chunk(0) + _chunk(1)).hexdigest()))
    assert events[0] == ("fdatasync", "data")
    assert events.index(("rename", "manifest")) > events.index(("fdatasync", "data"))
    fsynced_tmp = [e for e in events if e[0] == "fsync" and e[1].startswith(".manifest")]
    assert fsynced_tmp, events  # the new manifest was fsynced before the rename
    store.close()


def test_failed_sync_forgets_unlogged_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    store = Store(tmp_path, 1 << 30)
    store.open()
    image = _new(store, Manifest("img", size=3 * CHUNK, chunk_size=CHUNK))
    image.write_chunk(0, _chunk(0), block_digest([_chunk(0)]))
    image.sync_chunks([0])
    image.write_chunk(1, _chunk(1), block_digest([_chunk(1)]))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(StorageError, match="Input/output error"):
        image.sync_chunks([1])
    assert [image.has(i) for i in range(3)] == [True, False, False]
    assert image.present_chunks == 1
    store.close()


def test_write_chunk_in_pieces_reads_back_whole(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = _new(store, Manifest("img", size=2 * CHUNK, chunk_size=CHUNK))
    data = os.urandom(CHUNK)
    pieces = [data[:1], data[1:1000], b"", data[1000:]]
    image.write_chunk(1, pieces, block_digest([data]))
    with image.read_chunk(1) as back:
        assert back == data
    with pytest.raises(Exception, match="bytes, want"):
        image.write_chunk(0, pieces[:2], block_digest([data]))
    store.close()


@pytest.mark.parametrize("most", [1, 7, 4096, 1 << 20])
def test_pwrite_all_finishes_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most: int
) -> None:
    """pwritev may write less than asked (signals, quotas): the rest still lands in order."""
    real = os.pwritev
    calls = []

    def short(fd: int, buffers: list, offset: int) -> int:
        calls.append(len(buffers))
        room, capped = most, []
        for b in buffers:
            if room <= 0:
                break
            capped.append(memoryview(b)[:room])
            room -= len(capped[-1])
        return real(fd, capped, offset)

    monkeypatch.setattr(os, "pwritev", short)
    data = os.urandom(3 * 4096 + 5)
    pieces = [data[:3], data[3:5000], data[5000:5001], data[5001:]]
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        pwrite_all(fd, pieces, 10)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(10) + data
    assert len(calls) >= min(len(pieces), -(-len(data) // most))


# -- blocks: the unit of transfer ---------------------------------------------------------

BLOCK = 16 * 1024


def _blocky(i: int) -> bytes:
    return b"".join(bytes([(i * 7 + k) % 251]) * BLOCK for k in range(CHUNK // BLOCK))


def test_blocks_land_one_by_one_and_the_chunk_is_sealed_from_disk(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 30)
    store.open()
    m = Manifest("img", size=2 * CHUNK, chunk_size=CHUNK, block_size=BLOCK)
    image = _new(store, m)
    data = _blocky(1)
    blocks = list(m.blocks_of(1))
    assert blocks == [4, 5, 6, 7]
    for n, b in enumerate(reversed(blocks)):  # any order
        piece = data[(b - 4) * BLOCK : (b - 3) * BLOCK]
        last = image.write_block(b, piece, block_digest([piece]))
        assert last == (n == len(blocks) - 1)
        assert image.has_block(b)
    assert not image.has(1)  # blocks are in, the chunk is not sealed yet
    assert image.seal_chunk(1) == digest_blocks([data], BLOCK)[0]  # the tree of its blocks
    assert image.has(1)
    image.sync_chunks([1])
    store.close()
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = store.images["img"]
    assert not image.has_block(5)  # nothing served before the re-check
    assert image.check_present() == []
    assert image.has_block(5)
    assert image.manifest.block_digest(5) == block_digest([data[BLOCK : 2 * BLOCK]])


def test_sealing_refuses_a_block_that_changed_on_disk(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 30)
    store.open()
    m = Manifest("img", size=CHUNK, chunk_size=CHUNK, block_size=BLOCK)
    image = _new(store, m)
    data = _blocky(0)
    for b in range(4):
        piece = data[b * BLOCK : (b + 1) * BLOCK]
        image.write_block(b, piece, block_digest([piece]))
    with open(image.data_path, "r+b") as f:  # the disk lost a byte of block 2
        f.seek(2 * BLOCK + 5)
        f.write(b"\xff")
    with pytest.raises(IntegrityError, match=r"blocks \[2\]"):
        image.seal_chunk(0)
    assert not image.has(0)
    assert [image.has_block(b) for b in range(4)] == [True, True, False, True]


def test_a_whole_chunk_write_records_its_block_digests(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = _new(store, Manifest("img", size=CHUNK, chunk_size=CHUNK, block_size=BLOCK))
    data = _blocky(3)
    pieces = [data[:1000], data[1000:40000], data[40000:]]  # not cut at block boundaries
    image.write_chunk(0, pieces, digest_blocks([data], BLOCK)[0])
    assert all(image.has_block(b) for b in range(4))
    assert [image.manifest.block_digest(b) for b in range(4)] == [
        block_digest([data[b * BLOCK : (b + 1) * BLOCK]]) for b in range(4)
    ]


def test_a_complete_image_from_before_blocks_gets_them_once(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 30)
    store.open()
    old = Manifest("old", size=CHUNK + 100, chunk_size=CHUNK, digest_algo="xxh3")
    image = _new(store, old)
    data = _blocky(2) + b"x" * 100
    image.write_chunk(0, data[:CHUNK], block_digest([data[:CHUNK]], "xxh3"))
    image.write_chunk(1, data[CHUNK:], block_digest([data[CHUNK:]], "xxh3"))
    image.sync_chunks([0, 1])
    image.mark_complete(Checksum("sha256", hashlib.sha256(data).hexdigest()))
    assert image.manifest.block_size == 0
    image.ensure_blocks(BLOCK)
    store.close()
    store = Store(tmp_path, 1 << 30)
    store.open()
    m = store.images["old"].manifest
    assert (m.block_size, m.blocks) == (BLOCK, 5)
    assert m.block_digest(4) == block_digest([b"x" * 100], "xxh3")
    assert m.block_digest(1) == block_digest([data[BLOCK : 2 * BLOCK]], "xxh3")


def test_chunks_read_back_share_buffers_and_never_each_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(buffers, "SHARED", BufferPool(1 << 30))
    store = Store(tmp_path, 1 << 30)
    store.open()
    image = _new(store, Manifest("img", size=2 * CHUNK, chunk_size=CHUNK))
    chunks = [os.urandom(CHUNK), os.urandom(CHUNK)]
    for i, data in enumerate(chunks):
        image.write_chunk(i, [data], block_digest([data]))
    with image.read_chunk(0) as first, image.read_chunk(1) as second:
        assert first == chunks[0]  # two reads at once: two buffers
        assert second == chunks[1]
        assert first.obj is not second.obj
        kept = first.obj
    with image.read_chunk(1) as again:  # the buffer read 0 into, handed out again
        assert again == chunks[1]
        assert again.obj is kept
    store.close()


def test_the_buffer_pool_is_bounded_and_let_go() -> None:
    block = 256 * 1024
    pool = BufferPool(limit=3 * block)
    taken = [pool.take(block) for _ in range(5)]
    for buf in taken:
        pool.give(buf)
    assert pool.held == 3 * block  # the rest are left to the garbage collector
    pool.give(bytearray(1024))  # too small to be worth keeping
    assert pool.held == 3 * block
    got = pool.take(block)
    assert any(got is buf for buf in taken[:3])
    with pool.lend(block) as lent:
        assert pool.held == block
        assert len(lent) == block
    assert pool.held == 2 * block
    pool.clear()
    assert pool.held == 0
    assert len(pool.take(block)) == block
