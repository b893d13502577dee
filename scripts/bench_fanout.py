"""Fan-out benchmark (run through scripts/bench-fanout): N hosts want one image at once.

A network test bed (swarmtools.testbed: N hosts + an origin as network namespaces on
one bridge, every link shaped with tbf to RATE in both directions) and one image of
SIZE MiB at the origin. In the same run, each mode starts with cold caches:

  naive       every host curls the image from the origin server at once
  aria2       the origin seeds the image with aria2c (torrent made by mktorrent,
              1 MiB pieces), every host leeches at once; peers are handed out by a
              tiny static tracker in the origin namespace that answers every announce
              with every other peer
  swarmcache  one daemon per host ([discovery] mdns = true), every host curls
              http://127.0.0.1:7480/v1/images/<id> to a file at once (the daemon's
              cached copy plus the client's copy: two writes of the image per host)
  swarmcache-cache
              the same daemons, every host asks its daemon to fetch the image at once
              (curl -X POST .../fetch?wait=...): done when the daemon answers 200, i.e.
              holds the image complete (verified against the origin's sha256,
              durable); one copy per host, as aria2c leaves

Every host writes the image to its local disk and it is checked (sha256) afterwards;
a host with wrong or missing bytes, or one not done within 10x the physical limit
+ 60 s, fails the mode. Origin egress is the origin's eth0 tx_bytes (all protocols)
and, for the HTTP modes, the bytes the origin server counted at /_stats.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from swarmtools.testbed import (
    DAEMON_PORT,
    ORIGIN_PORT,
    Host,
    Testbed,
    TestbedError,
    file_sha256,
    host_config,
    http_request,
    make_image,
    origin_stats,
    origin_url,
    rate_bits_per_s,
    reset_origin_stats,
    spawn_daemon,
    start_origin,
    testbed_unavailable,
    wait_daemon,
    wait_http,
    write_toml,
)

MODES = ("naive", "aria2", "swarmcache", "swarmcache-cache")
TRACKER_PORT = 6969
BT_PORT = 6881
MiB = 1 << 20
CURL = ["curl", "-sS", "-f", "--noproxy", "*"]

# A BitTorrent tracker that knows every peer up front: each announce gets all the
# others (compact form). No allow-list, no root/chroot rules, no 30-minute interval.
TRACKER = """
import http.server, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
peers = [(a, int(p)) for a, p in (x.rsplit(":", 1) for x in sys.argv[3:])]
class Announce(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        me = self.client_address[0]
        compact = b"".join(socket.inet_aton(a) + p.to_bytes(2, "big") for a, p in peers if a != me)
        body = b"d8:intervali30e12:min intervali10e5:peers%d:%se" % (len(compact), compact)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((addr, port), Announce).serve_forever()
"""
# aria2c calls this (GID, file count, first file) when a download is complete, before
# it goes on seeding; the wall-clock time marks the host done.
ARIA2_HOOK = '#!/bin/sh\ndate +%s.%N > "$3.done.tmp" && mv "$3.done.tmp" "$3.done"\n'


@dataclass(frozen=True)
class Image:
    """The image every host wants."""

    id: str
    path: Path
    sha256: str
    size: int


@dataclass
class ModeResult:
    """One mode's run."""

    mode: str
    host_times: dict[str, float | None]  # seconds from the start; None: not done in time
    bad: list[str]  # hosts whose file is missing or has the wrong sha256
    origin_tx: int  # bytes out of the origin's eth0
    origin_served: int | None = None  # bytes the origin HTTP server counted
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every host has the verified image in time."""
        return not self.bad and all(t is not None for t in self.host_times.values())

    @property
    def wall(self) -> float:
        """Seconds until the last host was done."""
        return max((t for t in self.host_times.values() if t is not None), default=float("nan"))

    @property
    def median(self) -> float:
        """Median seconds of the hosts that were done."""
        done = [t for t in self.host_times.values() if t is not None]
        return statistics.median(done) if done else float("nan")


def race(
    bed: Testbed,
    argv: Mapping[Host, list[str]],
    deadline: float,
    logs: Path,
) -> dict[str, float | None]:
    """Start one command per host at once; seconds until each exited 0 (None: failed)."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    t0 = time.monotonic()
    for host, cmd in argv.items():
        with open(logs / f"{host.name}.log", "ab") as log:
            procs[host.name] = bed.popen(host, cmd, stdout=log, stderr=subprocess.STDOUT)
    times: dict[str, float | None] = dict.fromkeys(procs)
    running = dict(procs)
    try:
        while running and time.monotonic() < deadline:
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    times[name] = time.monotonic() - t0 if proc.returncode == 0 else None
                    del running[name]
            time.sleep(0.01)
    finally:
        for proc in running.values():
            bed.stop(proc, signal.SIGKILL, 5)
    return times


def verify(image: Image, files: Mapping[str, Path]) -> list[str]:
    """Hosts whose file is missing or differs from the image."""
    return [name for name, path in files.items() if file_sha256(path) != image.sha256]


def run_naive(
    bed: Testbed, image: Image, work: Path, timeout: float, origin_port: int = ORIGIN_PORT
) -> ModeResult:
    """Every host curls the image from the origin server at once."""
    url = origin_url(bed, origin_port).format(image_id=image.id)
    files = {h.name: work / h.name / image.id for h in bed.hosts}
    for path in files.values():
        path.parent.mkdir(parents=True)
    reset_origin_stats(bed, origin_port)
    tx0 = bed.link_bytes(bed.origin)[1]
    cmds = {h: [*CURL, "-o", str(files[h.name]), url] for h in bed.hosts}
    times = race(bed, cmds, time.monotonic() + timeout, work)
    tx = bed.link_bytes(bed.origin)[1] - tx0
    served = origin_stats(bed, origin_port)["total_bytes"]
    return ModeResult("naive", times, verify(image, files), tx, served)


def make_torrent(image: Image, out: Path, announce: str, piece_log2: int) -> Path:
    """A .torrent of the image (mktorrent, pieces of 2**piece_log2 bytes)."""
    out.unlink(missing_ok=True)
    subprocess.run(
        ["mktorrent", "-l", str(piece_log2), "-a", announce, "-o", str(out), str(image.path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def aria2_argv(download_dir: Path, log: Path, torrent: Path) -> list[str]:
    """aria2c for a LAN swarm of known peers: no DHT, no LPD, seeds until stopped."""
    return [
        "aria2c",
        "--no-conf=true",
        f"--dir={download_dir}",
        f"--log={log}",
        "--log-level=notice",
        "--console-log-level=warn",
        "--summary-interval=0",
        "--enable-color=false",
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=true",
        "--disable-ipv6=true",
        f"--listen-port={BT_PORT}",
        "--bt-max-peers=0",
        "--seed-ratio=0.0",
        "--file-allocation=none",
        "--allow-overwrite=true",
        "--auto-file-renaming=false",
        "--bt-save-metadata=false",
        "--bt-tracker-connect-timeout=5",
        "--bt-tracker-timeout=10",
        # aria2c quits by itself if this benchmark dies without cleaning up.
        f"--stop-with-process={os.getpid()}",
        str(torrent),
    ]


def run_aria2(bed: Testbed, image: Image, work: Path, timeout: float, torrent: Path) -> ModeResult:
    """The origin seeds with aria2c; every host leeches at once until all have it."""
    o = bed.origin
    peers = [f"{h.addr}:{BT_PORT}" for h in bed.all]
    tracker = bed.popen(
        o,
        [sys.executable, "-c", TRACKER, o.addr, str(TRACKER_PORT), *peers],
        stderr=subprocess.DEVNULL,
    )
    wait_http(bed, o, f"http://{o.addr}:{TRACKER_PORT}/announce", 15, tracker)
    seeder = bed.popen(
        o,
        [
            *aria2_argv(image.path.parent, work / "origin-aria2.log", torrent)[:-1],
            "--bt-seed-unverified=true",
            "--check-integrity=false",
            str(torrent),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(bed, o, BT_PORT, seeder, 15)
    hook = work / "done-hook"
    hook.write_text(ARIA2_HOOK)
    hook.chmod(0o755)
    files = {h.name: work / h.name / image.id for h in bed.hosts}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    tx0 = bed.link_bytes(o)[1]
    t0 = time.time()
    deadline = time.monotonic() + timeout
    try:
        for h in bed.hosts:
            files[h.name].parent.mkdir(parents=True)
            argv = aria2_argv(files[h.name].parent, work / f"{h.name}-aria2.log", torrent)
            argv.insert(-1, f"--on-bt-download-complete={hook}")
            procs[h.name] = bed.popen(h, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done: dict[str, float | None] = dict.fromkeys(files)
        while time.monotonic() < deadline and any(t is None for t in done.values()):
            for name, path in files.items():
                marker = path.with_name(path.name + ".done")
                if done[name] is None and marker.exists() and marker.read_text().strip():
                    done[name] = float(marker.read_text()) - t0
                elif done[name] is None and procs[name].poll() is not None:
                    deadline = 0  # a leecher died: this mode has failed
            time.sleep(0.05)
        tx = bed.link_bytes(o)[1] - tx0
    finally:
        for proc in [*procs.values(), seeder, tracker]:
            bed.stop(proc, signal.SIGTERM, 5)
    return ModeResult("aria2", done, verify(image, files), tx)


def wait_listening(
    bed: Testbed, host: Host, port: int, proc: subprocess.Popen[Any], timeout: float
) -> None:
    """Wait until something listens on TCP `port` in `host`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TestbedError(f"{proc.args!r} exited with {proc.returncode}")
        if bed.run(host, ["ss", "-Hltn", f"sport = :{port}"], timeout=10).stdout.strip():
            return
        time.sleep(0.1)
    raise TestbedError(f"nothing listens on port {port} in {host.name} after {timeout} s")


# ---------------------------------------------------------------------------------------
# swarmcache mode
# ---------------------------------------------------------------------------------------
def run_swarmcache(
    bed: Testbed,
    image: Image,
    work: Path,
    timeout: float,
    chunk_size: str = "4MiB",
    settle: float = 3.0,
    origin_port: int = ORIGIN_PORT,
    log_level: str = "info",
    sink: str = "file",
) -> ModeResult:
    """One daemon per host (mDNS discovery); every host GETs the image through it at once.

    The daemons start first and get `settle` seconds to find each other (in a boot
    storm the hypervisors' daemons have been running for a long time); then every host
    curls http://127.0.0.1:7480/v1/images/<id> to local disk at the same moment.
    """
    extra: dict[str, dict[str, object]] = {
        "daemon": {"log_level": log_level},
        "cache": {"chunk_size": chunk_size},
        "discovery": {"mdns": True},
    }
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for h in bed.hosts:
            sections = host_config(
                h, work / h.name / "cache", origin_url(bed, origin_port), extra=extra
            )
            config = write_toml(work / h.name / "swarmcache.toml", sections)
            daemons[h.name] = spawn_daemon(bed, h, config, work / f"{h.name}-daemon.log")
        for h in bed.hosts:
            wait_daemon(bed, h, daemons[h.name], log=work / f"{h.name}-daemon.log")
        time.sleep(settle)
        files = {h.name: work / h.name / image.id for h in bed.hosts}
        reset_origin_stats(bed, origin_port)
        tx0 = bed.link_bytes(bed.origin)[1]
        url = f"http://127.0.0.1:{DAEMON_PORT}/v1/images/{image.id}"
        cmds = {h: [*CURL, "-o", str(files[h.name]), url] for h in bed.hosts}
        if sink == "cache":
            # what a pre-warm script does: POST .../fetch?wait, answered 200 once the
            # daemon holds the image verified and durable (curl: no Python start-up
            # per host competing for the daemons' CPU)
            fetch = [
                *CURL,
                "-o",
                "/dev/null",
                "-X",
                "POST",
                f"{url}/fetch?wait={min(timeout, 3600):.0f}",
            ]
            cmds = {h: fetch for h in bed.hosts}
        cpu0 = {n: proc_cpu(p.pid) for n, p in daemons.items()}
        busy0 = machine_busy()
        times = race(bed, cmds, time.monotonic() + timeout, work)
        busy1 = machine_busy()
        cpu1 = {n: proc_cpu(p.pid) for n, p in daemons.items()}
        tx = bed.link_bytes(bed.origin)[1] - tx0
        served = origin_stats(bed, origin_port)["total_bytes"]
        if sink == "cache":
            bad = [h.name for h in bed.hosts if cached_sha256(bed, h, image.id) != image.sha256]
            result = ModeResult("swarmcache-cache", times, bad, tx, served)
        else:
            result = ModeResult("swarmcache", times, verify(image, files), tx, served)
        used = {n: cpu1[n] - cpu0[n] for n in daemons}
        wall = max(t for t in times.values() if t is not None) if any(times.values()) else 0
        result.notes.append(
            f"daemon CPU during the fetch: {sum(used.values()):.1f} core-s in all "
            f"({', '.join(f'{n}={c:.1f}' for n, c in used.items())}); machine busy "
            f"{(busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-9) * 100:.0f}% of "
            f"{os.cpu_count()} cores over {wall:.1f} s"
        )
        sources = fetched_by_source(bed)
        if sources:
            result.notes.append(
                "daemons fetched "
                + ", ".join(f"{mib(n):.0f} MiB from {s}" for s, n in sorted(sources.items()))
            )
        for name, proc in daemons.items():
            if proc.poll() is not None:
                result.notes.append(f"{name}'s daemon exited with {proc.returncode}")
        return result
    finally:
        for proc in daemons.values():
            bed.stop(proc, signal.SIGTERM, 10)


_FETCHED = re.compile(r'^swarmcache_fetched_bytes_total\{[^}]*source="([^"]+)"[^}]*\}\s+(\S+)$')


def cached_sha256(bed: Testbed, host: Host, image_id: str) -> str | None:
    """The sha256 a host's daemon verified for a complete image (None if not complete)."""
    try:
        body = http_request(
            bed, host, f"http://127.0.0.1:{DAEMON_PORT}/v1/images/{image_id}/status", timeout=10
        )
    except TestbedError:
        return None
    status = json.loads(body)
    return status["sha256"] if status.get("state") == "complete" else None


def drop_big_files(root: Path, limit: int = 1 << 20) -> None:
    """Delete the files over `limit` bytes under `root` (image copies and caches)."""
    for path in root.rglob("*"):
        try:
            if path.is_file() and path.stat().st_size > limit:
                path.unlink()
        except OSError:
            pass


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds a process has used (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def fetched_by_source(bed: Testbed) -> dict[str, int]:
    """swarmcache_fetched_bytes_total of every host's daemon, summed by source label."""
    total: dict[str, int] = {}
    for h in bed.hosts:
        try:
            text = http_request(bed, h, f"http://127.0.0.1:{DAEMON_PORT}/metrics", timeout=10)
        except TestbedError:
            continue
        for line in text.decode().splitlines():
            m = _FETCHED.match(line)
            if m:
                total[m.group(1)] = total.get(m.group(1), 0) + int(float(m.group(2)))
    return total


# ---------------------------------------------------------------------------------------


def mib(n: float) -> float:
    """Bytes in MiB."""
    return n / MiB


def report(results: Mapping[str, list[ModeResult]], image: Image, args: argparse.Namespace) -> None:
    """Print the table: medians over the runs, ratios to the limit and to the other modes."""
    limit = image.size * 8 / rate_bits_per_s(args.rate) if args.rate else None
    modes = list(results)
    walls = {m: statistics.median(r.wall for r in rs) for m, rs in results.items()}
    ok = {m: all(r.ok for r in rs) for m, rs in results.items()}
    shaped = f"every link shaped to {args.rate} both ways" if args.rate else "links unshaped"
    print(
        f"\n{args.hosts} hosts + origin, {shaped}; image {args.size} MiB; "
        f"median of {args.runs} run(s); {os.cpu_count()} cores"
    )
    head = [
        "mode",
        "result",
        "wall (last host)",
        "median host",
        "vs limit",
        "origin egress (veth)",
        "origin served (HTTP)",
    ] + [f"vs {m}" for m in modes]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m, rs in results.items():
        tx = statistics.median(r.origin_tx for r in rs)
        served = [r.origin_served for r in rs if r.origin_served is not None]
        row = [
            m,
            "ok" if ok[m] else "FAILED",
            f"{walls[m]:.2f} s",
            f"{statistics.median(r.median for r in rs):.2f} s",
            f"{walls[m] / limit:.2f}x" if limit else "-",
            f"{mib(tx):.0f} MiB ({tx / image.size:.2f} copies)",
            f"{mib(statistics.median(served)):.0f} MiB" if served else "-",
        ]
        row += ["-" if o == m else f"{walls[m] / walls[o]:.2f}x" for o in modes]
        print("| " + " | ".join(row) + " |")
    if limit:
        print(
            f"physical limit: image size / link rate = {limit:.2f} s "
            f"(naive's own bound, {args.hosts} copies through the origin's link: "
            f"{limit * args.hosts:.2f} s)"
        )
    print("'vs X' = this mode's wall time / X's. Per run, seconds to each host:")
    for m, rs in results.items():
        for i, r in enumerate(rs, 1):
            times = " ".join(
                f"{h}={t:.1f}" if t is not None else f"{h}=TIMEOUT" for h, t in r.host_times.items()
            )
            bad = f"; WRONG/MISSING BYTES on {', '.join(r.bad)}" if r.bad else ""
            notes = "".join(f"; {n}" for n in r.notes)
            print(f"  {m} run {i}: {times}{bad}{notes}")


def check_tools(modes: Sequence[str]) -> list[str]:
    """What is missing for the chosen modes."""
    need = {
        "naive": ["curl"],
        "aria2": ["aria2c", "mktorrent"],
        "swarmcache": ["curl"],
        "swarmcache-cache": [],
    }
    return sorted({t for m in modes for t in need[m] if shutil.which(t) is None})


def main() -> int:
    """Run the benchmark; exit 1 if a mode failed."""
    p = argparse.ArgumentParser(description="swarmcache fan-out benchmark (needs root)")
    p.add_argument("--hosts", type=int, default=8, help="hosts (default %(default)s)")
    p.add_argument(
        "--rate",
        default="200mbit",
        help="every link, both ways; 'none' for unshaped (default %(default)s)",
    )
    p.add_argument("--size", type=int, default=256, help="image MiB (default %(default)s)")
    p.add_argument("--runs", type=int, default=1, help="runs of every mode (default %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="(default %(default)s)")
    p.add_argument("--chunk-size", default="4MiB", help="swarmcache cache.chunk_size")
    p.add_argument(
        "--piece-size",
        type=int,
        default=20,
        metavar="LOG2",
        help="aria2 torrent piece size, 2**LOG2 bytes (default 20: 1 MiB)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds the daemons get to find each other (default %(default)s)",
    )
    p.add_argument("--log-level", default="info", help="swarmcache daemon.log_level")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory: logs, configs, results.json (image copies are deleted)",
    )
    args = p.parse_args()
    args.rate = None if args.rate == "none" else args.rate
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    if args.rate:
        rate_bits_per_s(args.rate)
    missing = check_tools(modes)
    if missing:
        print(
            f"bench-fanout: missing {', '.join(missing)}: run scripts/install-bench-tools",
            file=sys.stderr,
        )
        return 2
    reason = testbed_unavailable()
    if reason:
        print(f"bench-fanout: {reason}", file=sys.stderr)
        return 2
    # SIGTERM ends the run like Ctrl-C, and Ctrl-C works even when started in the
    # background (which ignores SIGINT), so the namespaces are always deleted.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="swarmcache-fanout-", dir=os.environ.get("BENCH_DIR")))
    try:
        return bench(args, modes, work)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, modes: list[str], work: Path) -> int:
    """Build the bed, run every mode `args.runs` times, print the table."""
    image_path = work / "origin" / "bench-image"
    print(f"making a {args.size} MiB image ...", flush=True)
    image = Image("bench-image", image_path, make_image(image_path, args.size), args.size * MiB)
    limit = image.size * 8 / rate_bits_per_s(args.rate) if args.rate else 60.0
    timeout = 10 * limit + 60
    results: dict[str, list[ModeResult]] = {m: [] for m in modes}
    with Testbed(args.hosts, rate=args.rate) as bed:
        torrent = None
        if "aria2" in modes:
            announce = f"http://{bed.origin.addr}:{TRACKER_PORT}/announce"
            torrent = make_torrent(image, work / "bench.torrent", announce, args.piece_size)
        start_origin(bed, image_path.parent, log=work / "origin.log")
        runners: dict[str, Callable[[Path], ModeResult]] = {
            "naive": lambda d: run_naive(bed, image, d, timeout),
            "aria2": lambda d: run_aria2(bed, image, d, timeout, torrent or Path()),
            "swarmcache": lambda d: run_swarmcache(
                bed, image, d, timeout, args.chunk_size, args.settle, log_level=args.log_level
            ),
            "swarmcache-cache": lambda d: run_swarmcache(
                bed,
                image,
                d,
                timeout,
                args.chunk_size,
                args.settle,
                log_level=args.log_level,
                sink="cache",
            ),
        }
        for run in range(1, args.runs + 1):
            for mode in modes:
                mode_dir = work / f"run{run}" / mode
                mode_dir.mkdir(parents=True)
                print(f"run {run}: {mode} ...", flush=True)
                busy0 = machine_busy()
                result = runners[mode](mode_dir)
                busy1 = machine_busy()
                result.notes.append(
                    f"machine CPU busy {(busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-9):.0%}"
                    " over the whole mode (start-up and checks included)"
                )
                results[mode].append(result)
                state = "ok" if result.ok else "FAILED"
                print(
                    f"run {run}: {mode}: {state}, last host {result.wall:.2f} s, "
                    f"origin egress {mib(result.origin_tx):.0f} MiB",
                    flush=True,
                )
                if not args.keep:  # cold caches for the next mode, and the disk space back
                    shutil.rmtree(mode_dir, ignore_errors=True)
                else:  # keep logs and configs, not 2 x hosts copies of the image
                    drop_big_files(mode_dir)
                os.sync()
    report(results, image, args)
    if args.keep:
        (work / "results.json").write_text(
            json.dumps({m: [r.__dict__ for r in rs] for m, rs in results.items()}, indent=1)
        )
    return 0 if all(r.ok for rs in results.values() for r in rs) else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
