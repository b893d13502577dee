"""Buffers kept for reuse: block bodies received from peers, chunks read back from disk.

A fresh buffer costs more than the bytes it carries: `bytearray(n)` zero-fills it,
and every new page it touches is a page fault the kernel answers with a zeroed page.
perf of 32 daemons on this project's 2-core test machine (32 x 64 MiB at 50 Mbit/s)
put 13-14% of all CPU in that zeroing: chunk read-back buffers (one per I/O thread
that ever sealed or hashed a chunk) and block bodies (one per block). On that machine
(a VM whose freed memory goes back to its host) each fresh page also costs the host a
fault; on any host it is a fault per 4 KiB. A pool hands the same memory out again:
as many buffers as are in use at once, not one per thread or per block.

One pool per process (SHARED), for both: thread-safe (the I/O threads and the event
loop share it) and bounded (at most `limit` bytes of free buffers are kept). Buffers
are only taken while a fetch runs, so the fetcher lets them all go (`clear`) when the
last fetch ends: an idle daemon holds none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

POOL_MIN = 64 * 1024  # smaller buffers are not worth keeping


class BufferPool:
    """Free buffers by size, at most `limit` bytes of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # bytes of free buffers kept
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of exactly `size` bytes: a free one if there is one (its old bytes
        are not cleared: the caller overwrites what it uses), else a new one."""
        with self._lock:
            free = self._free.get(size)
            if free:
                self.held -= size
                return free.pop()
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        """Keep `buf` for reuse. Nobody may touch it after this (a memoryview of it
        still held somewhere would see the next user's bytes)."""
        size = len(buf)
        if size < POOL_MIN:
            return
        with self._lock:
            if self.held + size > self.limit:
                return
            self._free.setdefault(size, []).append(buf)
            self.held += size

    @contextmanager
    def lend(self, size: int) -> Iterator[bytearray]:
        """A buffer for the `with` block, given back after it."""
        buf = self.take(size)
        try:
            yield buf
        finally:
            self.give(buf)

    def clear(self) -> None:
        """Let every free buffer go."""
        with self._lock:
            self._free.clear()
            self.held = 0


SHARED = BufferPool(48 * 1024 * 1024)  # the process's: block bodies and chunk read-backs
