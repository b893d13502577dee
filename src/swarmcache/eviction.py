"""Pure eviction policy: which cached images to drop to get back under max_size."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """What the policy needs to know about one cached image."""

    image_id: str
    bytes: int
    last_access: float
    complete: bool
    pinned: bool = False
    in_use: bool = False  # being read or fetched


def plan_eviction(
    entries: Iterable[Candidate], max_size: int, incoming: int = 0, wait: bool = False
) -> list[str]:
    """Ids to evict, in order, so that used + incoming <= max_size.

    Least-recently-used complete images go first, then idle partial ones (a
    fetch that was abandoned). Pinned images and images in use are never chosen;
    if they alone exceed the limit the result frees what it can. With `wait`, an
    image in use keeps its place in that order, and images after it are not
    chosen in its stead: it goes once its use ends and the caller asks again (a
    cache over max_size for a while, rather than the image fetched last evicted
    for being last).
    """
    entries = list(entries)
    excess = sum(e.bytes for e in entries) + incoming - max_size
    if excess <= 0:
        return []
    victims = sorted(
        (e for e in entries if not e.pinned and (wait or not e.in_use)),
        key=lambda e: (not e.complete, e.last_access, e.image_id),
    )
    chosen: list[str] = []
    for e in victims:
        if excess <= 0:
            break
        if not e.in_use:
            chosen.append(e.image_id)
        excess -= e.bytes
    return chosen
