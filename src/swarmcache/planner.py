"""Pure fetch planning: which missing chunk a free worker takes next.

Theory of operation. Every chunk of the image being fetched is in one of three
states: MISSING, INFLIGHT (a worker is fetching it) or DONE (durable and verified).
A free worker asks `next()`. Chunks a client is waiting for right now (a Range
read or a stream that caught up with the fetch) were passed to `want()` and go
first, in the order asked; otherwise the lowest-numbered missing chunk goes, so a
hypervisor streaming the image from the start rarely waits. A chunk whose fetch
failed goes back to MISSING (and to the front, if it was wanted) for another try,
from another source once there are several.

No I/O and no clock: the async executor (fetcher.py) drives it, tests drive it
directly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

MISSING, INFLIGHT, DONE = 0, 1, 2


class ChunkPlan:
    """The chunk-by-chunk state of one image fetch."""

    def __init__(self, chunks: int, present: Iterable[int] = ()) -> None:
        self.state = bytearray(chunks)
        for i in present:
            self.state[i] = DONE
        self.remaining = self.state.count(MISSING)
        self._cursor = 0
        self._urgent: deque[int] = deque()
        self._urgent_set: set[int] = set()

    @property
    def finished(self) -> bool:
        """Every chunk is DONE."""
        return self.remaining == 0

    def want(self, indices: Iterable[int]) -> None:
        """A client waits for these chunks: fetch them before anything else."""
        for i in indices:
            if self.state[i] == MISSING and i not in self._urgent_set:
                self._urgent.append(i)
                self._urgent_set.add(i)

    def next(self) -> int | None:
        """The chunk to fetch next (now INFLIGHT), or None if none is MISSING."""
        while self._urgent:
            i = self._urgent.popleft()
            self._urgent_set.discard(i)
            if self.state[i] == MISSING:
                self.state[i] = INFLIGHT
                return i
        n = len(self.state)
        while self._cursor < n and self.state[self._cursor] != MISSING:
            self._cursor += 1
        if self._cursor == n:
            return None
        i = self._cursor
        self.state[i] = INFLIGHT
        return i

    def done(self, index: int) -> None:
        """Chunk `index` is durable and verified."""
        if self.state[index] != DONE:
            self.state[index] = DONE
            self.remaining -= 1

    def hold(self, index: int) -> None:
        """Keep workers off a MISSING chunk that something else settles (done or failed)."""
        if self.state[index] == MISSING:
            self.state[index] = INFLIGHT

    def failed(self, index: int) -> None:
        """The fetch of chunk `index` failed: it is MISSING again."""
        if self.state[index] == INFLIGHT:
            self.state[index] = MISSING
            self._cursor = min(self._cursor, index)
