"""Simulated boot storms (run through scripts/bench-sim): swarmtools.sim at scale.

Every cell is one run of the discrete-event simulator (swarmtools.sim), which drives the
daemon's own exchange code (swarmcache.exchange) over modelled links: N hosts want one
image at once, every host link carries RATE each way, the origin's uplink too. First a
grid of hosts x rates, then three scenarios at --scenario-hosts x --scenario-rate:

  slow   one host (not an origin reader; --slow-reader: the first reader) at 1/4 rate
  dead   the first origin reader dies at 2 s (the others notice `detect` s later)
  late   a tenth of the hosts (random non-readers) join at 5 s

Columns: the physical limit (image size / link rate: no host can be faster), the time
from the first join to the last and to the median host holding the image (seconds and x
the limit), origin bytes / image size, control messages per host (mean, max), links per
host (max), simulated events, and the wall and CPU seconds the run took (this machine is
shared: the load average is printed before and after). `--json FILE` writes each row as
a JSON line as soon as it is done. `--seed` seeds the simulator and, unless PYTHONHASHSEED
is set, str hashing too (the simulator walks sets of host names: without it the same seed
gives different runs). A cell past 1.2x the limit, origin past 1.05x the image or a host
never done is listed under "check"; the exit status is 1 if a host that stayed never held
the image.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import swarmcache.exchange
import swarmtools.sim
from swarmcache.exchange import HAVE_BATCH, HAVE_BATCH_MIN, readers
from swarmtools.sim import SimConfig, SimResult, Simulator

MiB = 1 << 20
IMAGE_KEY = "image"  # the key swarmtools.sim gives its image
SLOW_FACTOR = 0.25
DIES_AT = 2.0
JOIN_AT = 5.0
LATE_SHARE = 10  # one host in this many joins late
PROGRESS_EVERY = 15.0  # wall seconds between progress lines on stderr
TOO_SLOW = 1.2  # x the limit: listed under "check"
TOO_MUCH_ORIGIN = 1.05  # x the image: listed under "check"
SCENARIOS = ("slow", "dead", "late")
UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


@dataclass
class Cell:
    """One simulated run to make: a grid cell or a scenario."""

    scenario: str  # "base" for the grid
    rate_text: str
    cfg: SimConfig
    subject: list[int] = field(default_factory=list)  # the slow, dead or late hosts


@dataclass
class Row:
    """What one cell produced, as printed and as written to --json."""

    scenario: str
    hosts: int
    rate: str
    rate_bit_s: float
    size_mib: float
    limit: float
    last: float
    median: float
    done: int
    finishers: int
    origin_x: float
    origin_end: float
    msgs_mean: float
    msgs_max: int
    links_max: int
    events: int
    sim_end: float
    wall: float
    cpu: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    seed: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)

    @property
    def last_x(self) -> float:
        """Time to the last host, x the limit."""
        return self.last / self.limit

    @property
    def median_x(self) -> float:
        """Time to the median host, x the limit."""
        return self.median / self.limit


def parse_rate(text: str) -> float:
    """'1gbit', '200mbit', '10gbit' -> bytes/s."""
    low = text.strip().lower()
    for unit, scale in UNITS.items():
        if low.endswith(unit):
            return float(low[: -len(unit)]) * scale / 8
    raise argparse.ArgumentTypeError(f"not a rate (e.g. 1gbit, 200mbit): {text!r}")


def _counts(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not host counts (e.g. 100,1000): {text!r}") from None


def _rates(text: str) -> list[str]:
    rates = [x.strip() for x in text.split(",") if x.strip()]
    for r in rates:
        parse_rate(r)  # refuse a bad one now, not after an hour of simulating
    return rates


def rate_label(bytes_s: float) -> str:
    """Bytes/s -> '1 Gbit/s'."""
    bits = bytes_s * 8
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}bit/s"
    return f"{bits:g} bit/s"


def names(hosts: int) -> list[str]:
    """The simulator's host names, by index."""
    return [f"h{i:04d}" for i in range(hosts)]


def reader_indexes(hosts: int, concurrency: int) -> list[int]:
    """Indexes of the image's origin readers, in rank order."""
    all_names = names(hosts)
    return [all_names.index(n) for n in readers(IMAGE_KEY, all_names, concurrency)]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "never"


# -- building the cells ---------------------------------------------------------------


def grid(args: argparse.Namespace) -> list[Cell]:
    """hosts x rates, every host joining at 0."""
    return [
        Cell("base", rate, _config(args, hosts, parse_rate(rate)))
        for hosts in args.hosts
        for rate in args.rates
    ]


def scenarios(args: argparse.Namespace) -> list[Cell]:
    """The slow, dead and late cells asked for."""
    hosts, rate = args.scenario_hosts, parse_rate(args.scenario_rate)
    cfg = _config(args, hosts, rate)
    top = reader_indexes(hosts, cfg.concurrency)
    others = [i for i in range(hosts) if i not in top]
    cells = []
    for name in args.scenarios:
        if name == "slow":
            who = top[0] if args.slow_reader else others[0]
            c = dataclasses.replace(cfg, slow={who: SLOW_FACTOR})
            cells.append(Cell(name, args.scenario_rate, c, [who]))
        elif name == "dead":
            c = dataclasses.replace(cfg, dies={top[0]: DIES_AT})
            cells.append(Cell(name, args.scenario_rate, c, [top[0]]))
        elif name == "late":
            # readers that join late are woken by the first host that starts (see the
            # simulator): they would not be late, so the late ones are non-readers
            late = sorted(random.Random(args.seed).sample(others, max(1, hosts // LATE_SHARE)))
            c = dataclasses.replace(cfg, join=dict.fromkeys(late, JOIN_AT))
            cells.append(Cell(name, args.scenario_rate, c, late))
    return cells


def _config(args: argparse.Namespace, hosts: int, rate: float) -> SimConfig:
    return SimConfig(
        hosts=hosts,
        size=args.size_mib * MiB,
        rate=rate,
        degree=args.degree,
        seed=args.seed,
    )


# -- running one ----------------------------------------------------------------------


@contextmanager
def progress(label: str, sim: Simulator, out: TextIO) -> Iterator[None]:
    """Print a line about `sim` to `out` every PROGRESS_EVERY wall seconds meanwhile."""
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(PROGRESS_EVERY):
            # read without a lock: a figure a moment stale is fine for a heartbeat
            done = sum(h.done is not None for h in sim.hosts)
            print(
                f"  {label}: {time.monotonic() - start:.0f} s wall, simulated "
                f"{sim.now:.2f} s, {done}/{len(sim.hosts)} hosts done, "
                f"{sim.events:,} events",
                file=out,
                flush=True,
            )

    thread = threading.Thread(target=beat, name="bench-sim-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run(cell: Cell, out: TextIO) -> Row:
    """Simulate one cell and sum it up."""
    cfg = cell.cfg
    label = f"{cell.scenario} {cfg.hosts} hosts {cell.rate_text}"
    print(f"{label}: simulating ...", file=out, flush=True)
    load_before = os.getloadavg()
    sim = Simulator(cfg)  # what swarmtools.sim.simulate does, with a handle for progress
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with progress(label, sim, out):
        res = sim.run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    row = summarise(cell, res, wall, cpu, load_before, os.getloadavg())
    print(
        f"{label}: last {_fmt(row.last)} s ({_fmt(row.last_x, 3)}x), "
        f"{row.events:,} events in {wall:.1f} s wall",
        file=out,
        flush=True,
    )
    return row


def summarise(
    cell: Cell,
    res: SimResult,
    wall: float,
    cpu: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> Row:
    """A Row of a finished run, with the scenario's own figures and the checks."""
    cfg = res.config
    finishers = res.finishers
    done = [h.done if h.done is not None else math.inf for h in finishers]
    msgs = [h.messages for h in res.hosts]
    row = Row(
        scenario=cell.scenario,
        hosts=cfg.hosts,
        rate=rate_label(cfg.rate),
        rate_bit_s=cfg.rate * 8,
        size_mib=cfg.size / MiB,
        limit=res.limit,
        last=res.last,
        median=statistics.median(done) if done else math.nan,
        done=sum(h.done is not None for h in finishers),
        finishers=len(finishers),
        origin_x=res.origin_bytes / cfg.size,
        origin_end=res.origin_end,
        msgs_mean=statistics.mean(msgs),
        msgs_max=max(msgs),
        links_max=max(h.max_links for h in res.hosts),
        events=res.events,
        sim_end=res.end,
        wall=wall,
        cpu=cpu,
        load_before=load_before,
        load_after=load_after,
        seed=cfg.seed,
    )
    SCENARIO_NOTES.get(cell.scenario, _note_base)(cell, res, row)
    if row.done < row.finishers:
        row.checks.append(f"{row.finishers - row.done} host(s) never done")
    if row.origin_x > TOO_MUCH_ORIGIN:
        row.checks.append(f"origin {row.origin_x:.3f}x the image")
    return row


def _others_last(res: SimResult, skip: set[int]) -> float:
    gone = set(res.config.dies) | set(res.config.leaves) | skip
    done = [h.done for i, h in enumerate(res.hosts) if i not in gone]
    return math.inf if any(d is None for d in done) else max(d for d in done if d is not None)


def _check_time(row: Row, what: str, seconds: float, limit: float) -> None:
    if seconds > TOO_SLOW * limit:
        row.checks.append(f"{what} {_fmt(seconds)} s = {_fmt(seconds / limit, 3)}x the limit")


def _note_base(cell: Cell, res: SimResult, row: Row) -> None:
    _check_time(row, "last host", row.last, row.limit)


def _note_slow(cell: Cell, res: SimResult, row: Row) -> None:
    (who,) = cell.subject
    h = res.hosts[who]
    own = res.limit / SLOW_FACTOR
    done = h.done if h.done is not None else math.inf
    others = _others_last(res, {who})
    kind = "reader" if who in reader_indexes(row.hosts, res.config.concurrency) else "non-reader"
    row.note = (
        f"slow {kind} {h.name}: {_fmt(done)} s = {_fmt(done / own, 3)}x its own limit "
        f"({own:.1f} s), read {h.origin_bytes / MiB:.0f} MiB of origin; "
        f"the others: last {_fmt(others)} s ({_fmt(others / res.limit, 3)}x)"
    )
    row.extra = {
        "slow_host": h.name,
        "slow_reader": kind == "reader",
        "slow_done": _finite(done),
        "slow_limit": own,
        "slow_origin_bytes": h.origin_bytes,
        "others_last": _finite(others),
    }
    _check_time(row, f"slow {h.name}", done, own)
    _check_time(row, "last of the others", others, res.limit)


def _note_dead(cell: Cell, res: SimResult, row: Row) -> None:
    (who,) = cell.subject
    h = res.hosts[who]
    cfg = res.config
    # the host that takes its place: the next in rank (OriginLane.replace)
    order = readers(IMAGE_KEY, names(cfg.hosts), cfg.concurrency + 1)
    heir = res.hosts[names(cfg.hosts).index(order[-1])]
    when = cfg.dies[who]
    if res.end < when:
        row.note = f"reader {h.name} would die at {when:g} s, but the swarm was done by then"
        _check_time(row, "last host", row.last, row.limit)
        return
    row.note = (
        f"reader {h.name} dies at {when:g} s (noticed {cfg.detect:g} s later) "
        f"after reading {h.origin_bytes / MiB:.0f} MiB of origin; {heir.name} takes its "
        f"place and reads {heir.origin_bytes / MiB:.0f} MiB"
    )
    row.extra = {
        "dead_host": h.name,
        "dead_origin_bytes": h.origin_bytes,
        "heir": heir.name,
        "heir_origin_bytes": heir.origin_bytes,
    }
    _check_time(row, "last host", row.last, row.limit)


def _note_late(cell: Cell, res: SimResult, row: Row) -> None:
    late = set(cell.subject)
    took = [
        (h.done - h.joined) if h.done is not None else math.inf
        for i, h in enumerate(res.hosts)
        if i in late
    ]
    first = _others_last(res, late)
    worst = max(took)
    row.note = (
        f"{len(late)} hosts join at {JOIN_AT:g} s: the slowest of them done "
        f"{_fmt(worst)} s after joining ({_fmt(worst / res.limit, 3)}x), median "
        f"{_fmt(statistics.median(took))} s; the first wave: last {_fmt(first)} s "
        f"({_fmt(first / res.limit, 3)}x)"
    )
    row.extra = {
        "late_hosts": sorted(res.hosts[i].name for i in late),
        "late_join": JOIN_AT,
        "late_worst_after_join": _finite(worst),
        "late_median_after_join": _finite(statistics.median(took)),
        "first_wave_last": _finite(first),
    }
    _check_time(row, "slowest late host (after joining)", worst, res.limit)
    _check_time(row, "first wave", first, res.limit)


SCENARIO_NOTES: dict[str, Callable[[Cell, SimResult, Row], None]] = {
    "slow": _note_slow,
    "dead": _note_dead,
    "late": _note_late,
}


# -- output ---------------------------------------------------------------------------


def table(rows: list[Row], scenario_column: bool) -> list[str]:
    """A markdown table of rows."""
    head = [
        "hosts",
        "rate",
        "limit s",
        "last s",
        "last x",
        "median s",
        "median x",
        "done",
        "origin x",
        "msgs/host mean",
        "msgs/host max",
        "links/host max",
        "events",
        "wall s",
        "cpu s",
    ]
    if scenario_column:
        head.insert(0, "scenario")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r.hosts),
            r.rate,
            f"{r.limit:.2f}",
            _fmt(r.last),
            _fmt(r.last_x, 3),
            _fmt(r.median),
            _fmt(r.median_x, 3),
            f"{r.done}/{r.finishers}",
            f"{r.origin_x:.3f}",
            f"{r.msgs_mean:.0f}",
            str(r.msgs_max),
            str(r.links_max),
            f"{r.events:,}",
            f"{r.wall:.1f}",
            f"{r.cpu:.1f}",
        ]
        if scenario_column:
            cells.insert(0, r.scenario)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def as_json(row: Row, code: dict[str, str]) -> str:
    """One JSON line (inf as null)."""
    d = dataclasses.asdict(row)
    d.update(
        last_x=row.last_x,
        median_x=row.median_x,
        code=code,
        at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return json.dumps({k: _finite(v) if isinstance(v, float) else v for k, v in d.items()})


def code_version() -> dict[str, str]:
    """Which code ran: the commit, whether src/ differs from it, and digests of the
    simulator and exchange modules as imported (another hand may be editing them)."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(root), *cmd], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    out = {"commit": git("rev-parse", "--short", "HEAD")}
    out["src_changed"] = "yes" if git("status", "--porcelain", "--", "src") else "no"
    for mod in (swarmtools.sim, swarmcache.exchange):
        path = Path(mod.__file__ or "")
        out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return out


def _load(avg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run the cells, print the tables."""
    defaults = SimConfig(hosts=1, size=1, rate=1)
    p = argparse.ArgumentParser(
        prog="bench-sim", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--hosts",
        type=_counts,
        default=[100, 1000],
        help="host counts of the grid (default 100,1000; '' for scenarios only)",
    )
    p.add_argument("--size-mib", type=int, default=1024, help="image MiB (default %(default)s)")
    p.add_argument(
        "--rates",
        type=_rates,
        default=["1gbit", "10gbit"],
        help="link rates of the grid (default 1gbit,10gbit)",
    )
    p.add_argument(
        "--scenarios",
        type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
        default=list(SCENARIOS),
        help=f"any of {','.join(SCENARIOS)}; '' for none (default all)",
    )
    p.add_argument("--scenario-hosts", type=int, default=100, help="(default %(default)s)")
    p.add_argument("--scenario-rate", default="1gbit", help="(default %(default)s)")
    p.add_argument(
        "--slow-reader", action="store_true", help="the slow host is the first origin reader"
    )
    p.add_argument(
        "--degree",
        type=int,
        default=defaults.degree,
        help="neighbours a host looks for (default %(default)s, as the daemon's peers.degree)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="(default %(default)s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write each row as a JSON line")
    args = p.parse_args()
    bad = set(args.scenarios) - set(SCENARIOS)
    if bad:
        p.error(f"unknown scenario(s): {', '.join(sorted(bad))}")
    parse_rate(args.scenario_rate)
    if min(args.hosts, default=1) < 1 or args.scenario_hosts < 2 or args.size_mib < 1:
        p.error("hosts and --size-mib must be positive (--scenario-hosts at least 2)")
    if not args.hosts and not args.scenarios:
        p.error("nothing to run: --hosts '' and --scenarios ''")

    if "PYTHONHASHSEED" not in os.environ:
        # the simulator walks sets of host names, whose order follows str hashing:
        # without a fixed hash seed, the same --seed gives different runs
        env = {**os.environ, "PYTHONHASHSEED": str(args.seed)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    code = code_version()
    code["PYTHONHASHSEED"] = os.environ["PYTHONHASHSEED"]
    cfg = _config(args, 1, 1.0)
    started = datetime.datetime.now().astimezone()
    load_start = os.getloadavg()
    print(f"bench-sim {started:%Y-%m-%d %H:%M %Z} on {os.uname().nodename} ({os.cpu_count()} CPUs)")
    print(
        f"code: commit {code['commit']}, src/ changed since: {code['src_changed']}, "
        f"sha256 sim.py {code['sim.py']}, exchange.py {code['exchange.py']}; "
        f"PYTHONHASHSEED={code['PYTHONHASHSEED']}"
    )
    batches = (
        f"{HAVE_BATCH_MIN * 1e3:g}-{HAVE_BATCH * 1e3:g} ms as the daemon"
        if cfg.have_batch is None
        else f"{cfg.have_batch * 1e3:g} ms"
    )
    print(
        f"model: image {args.size_mib} MiB in {cfg.chunk_size // MiB} MiB chunks of "
        f"{cfg.block_size // 1024} KiB blocks; degree {cfg.degree}, origin concurrency "
        f"{cfg.concurrency}, origin uplink = host link rate, latency {cfg.latency * 1e3:g} ms, "
        f"upload slots {cfg.upload_slots}, request slots {cfg.slots}/neighbour "
        f"{cfg.max_inflight}/host, Have batches {batches}, "
        f"death noticed after {cfg.detect:g} s; seed {args.seed}"
    )
    print(f"load average before (1, 5, 15 min): {_load(load_start)}", flush=True)

    signal.signal(signal.SIGTERM, _interrupt)  # a kill prints the rows done, as ^C does
    jsonl = args.json.open("w") if args.json else None
    cells = grid(args) + (scenarios(args) if args.scenarios else [])
    rows: list[Row] = []
    interrupted = False
    try:
        for cell in cells:
            row = run(cell, sys.stderr)
            rows.append(row)
            if jsonl:
                jsonl.write(as_json(row, code) + "\n")
                jsonl.flush()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the rows done so far", file=sys.stderr)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    finally:
        if jsonl:
            jsonl.close()

    base = [r for r in rows if r.scenario == "base"]
    special = [r for r in rows if r.scenario != "base"]
    if base:
        print(f"\nEvery host joins at 0 s; a {args.size_mib} MiB image:")
        print("\n".join(table(base, False)))
    if special:
        print(
            f"\nScenarios ({args.scenario_hosts} hosts, {args.size_mib} MiB, "
            f"{rate_label(parse_rate(args.scenario_rate))}):"
        )
        print("\n".join(table(special, True)))
        for r in special:
            print(f"  {r.scenario}: {r.note}")
    print(
        "\nlimit = image / link rate; last, median = from the first join until the host "
        "holds every block (hosts that died are left out); origin x = origin bytes / image; "
        "wall, cpu = seconds this process took to simulate the cell"
    )
    checks = [(r, c) for r in rows for c in r.checks]
    if checks:
        print(f"check (past {TOO_SLOW}x the limit, origin past {TOO_MUCH_ORIGIN}x, never done):")
        for r, c in checks:
            print(f"  {r.scenario} {r.hosts} hosts {r.rate}: {c}")
    total = sum(r.wall for r in rows)
    print(f"simulated {len(rows)}/{len(cells)} cells in {total:.0f} s wall")
    print(f"load average after (1, 5, 15 min): {_load(os.getloadavg())}")
    if interrupted:
        return 130
    return 1 if any(r.done < r.finishers for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
