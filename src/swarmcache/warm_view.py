"""The live per-host view of a warm job (`swarmcache warm --wait`), drawn with rich.

On a terminal the table redraws in place; otherwise (a log, a pipe) only the final
table is printed. Rows that need attention come first (failed, fetching, queued),
cached ones last, cut to what fits the screen with a count of the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .config import format_size

POLL_SECONDS = 0.5
_ORDER = {"failed": 0, "fetching": 1, "queued": 2, "cached": 3}
_STYLE = {"failed": "bold red", "fetching": "yellow", "queued": "dim", "cached": "green"}


def render(job: dict[str, Any], max_rows: int | None = None) -> Group:
    """The job as a summary line and a table (at most `max_rows` rows)."""
    counts = job["counts"]
    total = sum(counts.values())
    head = Text(
        f"warm job {job['job']}: {job['state']}  "
        f"{counts['cached']}/{total} cached, {counts['fetching']} fetching, "
        f"{counts['queued']} queued, {counts['failed']} failed"
    )
    rows = []
    for host, images in job["hosts"].items():
        for image, t in images.items():
            rows.append((_ORDER.get(t["state"], 9), host, image, t))
    rows.sort(key=lambda r: r[:3])
    table = Table(box=None, pad_edge=False)
    for name in ("HOST", "IMAGE", "STATE", "PROGRESS", "RATE", "REASON"):
        table.add_column(name, no_wrap=name != "REASON")
    shown = rows if max_rows is None else rows[: max(1, max_rows)]
    for _, host, image, t in shown:
        size = t.get("size")
        done = t.get("bytes") or 0
        progress = (
            f"{format_size(done)} / {format_size(size)} ({100 * done / size:.0f}%)"
            if size
            else format_size(done)
        )
        rate = t.get("rate_bytes_per_s")
        table.add_row(
            host,
            image,
            Text(t["state"], style=_STYLE.get(t["state"], "")),
            progress,
            f"{format_size(rate)}/s" if rate else "",
            t.get("reason") or "",
        )
    parts: list[Any] = [head, table]
    if len(shown) < len(rows):
        parts.append(Text(f"... and {len(rows) - len(shown)} more", style="dim"))
    return Group(*parts)


def follow(
    get_json: Callable[[str, str], Any], job: dict[str, Any], *, quiet: bool = False
) -> dict[str, Any]:
    """Poll the job until it ends, drawing it; returns its last state."""
    console = Console(stderr=quiet)
    if not console.is_terminal:  # a log or a pipe: whole lines, not 80 columns' worth
        console = Console(stderr=quiet, width=max(console.width, 240))
    path = f"/v1/warm/{job['job']}"
    rows = max(5, console.size.height - 6)
    with Live(
        render(job, rows), console=console, auto_refresh=False, transient=console.is_terminal
    ) as live:
        while job["state"] == "running":
            time.sleep(POLL_SECONDS)
            job = get_json("GET", path)
            live.update(render(job, rows), refresh=True)
    if console.is_terminal:  # the live view is gone: leave the whole result behind
        console.print(render(job))
    return job
