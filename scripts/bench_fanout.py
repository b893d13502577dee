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

--matrix runs every cell of --hosts-list x --sizes x --rates on a fresh bed, modes
swarmcache, aria2 and naive in each, and prints one row per cell (also as JSON lines
with --json FILE): the last host of each mode, swarmcache against the physical limit
and against aria2c, the origin's egress in copies, whether every host verified, and
the CPU the swarmcache mode took (machine busy %, the daemons' core-seconds per GiB
received). Naive curl is skipped above --naive-max-hosts (its copies share the
origin's one link, 10x-limit would fail it, so its timeout is 2x hosts x limit + 60 s);
a cell the machine's cores cannot move within a mode's timeout, or estimated over
--max-seconds, is skipped with the reason. A mode that breaks off shows as failed, the
matrix goes on, and the run exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
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
    MAX_HOSTS,
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
MATRIX_MODES = ("swarmcache", "aria2", "naive")  # in the order a cell runs them
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
    daemon_cpu: float | None = None  # core-seconds the daemons used during the fetch
    busy: float | None = None  # share of all CPUs busy during the fetch (0..1)
    error: str | None = None  # the mode broke off (the exception's message)

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
        # the leechers' CPU (they seed until stopped: still there), beside the daemons'
        spent = [proc_cpu(p.pid) for p in procs.values()]
        cpu, kernel = sum(u + k for u, k in spent), sum(k for _, k in spent)
    finally:
        for proc in [*procs.values(), seeder, tracker]:
            bed.stop(proc, signal.SIGTERM, 5)
    result = ModeResult("aria2", done, verify(image, files), tx)
    result.notes.append(
        f"aria2c CPU (leechers, start to last host): {cpu:.1f} core-s in all, "
        f"{kernel:.1f} of them in the kernel"
    )
    return result


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
def settings(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """--set SECTION.KEY=VALUE options as config sections."""
    out: dict[str, dict[str, object]] = {}
    for item in args.set:
        name, sep, raw = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        value: object = raw
        with contextlib.suppress(ValueError):
            value = int(raw)
        if raw in ("true", "false"):
            value = raw == "true"
        out.setdefault(section, {})[key] = value
    return out


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
    start_timeout: float = 30.0,
    settings: dict[str, dict[str, object]] | None = None,
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
    for section, keys in (settings or {}).items():
        extra.setdefault(section, {}).update(keys)
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for h in bed.hosts:
            sections = host_config(
                h, work / h.name / "cache", origin_url(bed, origin_port), extra=extra
            )
            config = write_toml(work / h.name / "swarmcache.toml", sections)
            daemons[h.name] = spawn_daemon(bed, h, config, work / f"{h.name}-daemon.log")
        for h in bed.hosts:
            wait_daemon(
                bed, h, daemons[h.name], log=work / f"{h.name}-daemon.log", timeout=start_timeout
            )
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
        used = {n: sum(cpu1[n]) - sum(cpu0[n]) for n in daemons}
        kernel = sum(cpu1[n][1] - cpu0[n][1] for n in daemons)
        result.daemon_cpu = sum(max(c, 0.0) for c in used.values())  # 0 once a daemon is gone
        result.busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-9)
        wall = max(t for t in times.values() if t is not None) if any(times.values()) else 0
        result.notes.append(
            f"daemon CPU during the fetch: {sum(used.values()):.1f} core-s in all, "
            f"{kernel:.1f} of them in the kernel "
            f"({', '.join(f'{n}={c:.1f}' for n, c in used.items())}); machine busy "
            f"{result.busy * 100:.0f}% of "
            f"{os.cpu_count()} cores over {wall:.1f} s"
        )
        texts = scrape(bed)
        sources = fetched_by_source(texts)
        asked = block_requests(texts)
        if asked:
            result.notes.append(asked)
        sent = messages_sent(texts)
        if sent:
            result.notes.append(sent)
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


def mode_timeout(limit: float, at_least: float = 0.0) -> float:
    """Seconds a mode may take: 10x the physical limit + 60 s (or `at_least`, the
    --min-timeout, if longer); a host not done by then fails."""
    return max(10 * limit + 60, at_least)


def tidy(mode_dir: Path, keep: bool) -> None:
    """After a mode: cold caches for the next one, and the disk space back."""
    if not keep:
        shutil.rmtree(mode_dir, ignore_errors=True)
    else:  # keep logs and configs, not 2 x hosts copies of the image
        drop_big_files(mode_dir)
    os.sync()


def drop_big_files(root: Path, limit: int = 1 << 20) -> None:
    """Delete the files over `limit` bytes under `root` (image copies and caches)."""
    for path in root.rglob("*"):
        try:
            if path.is_file() and path.stat().st_size > limit:
                path.unlink()
        except OSError:
            pass


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used ((0, 0) if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def scrape(bed: Testbed) -> dict[str, str]:
    """Every host daemon's /metrics text (hosts that do not answer are left out)."""
    texts: dict[str, str] = {}
    for h in bed.hosts:
        try:
            text = http_request(bed, h, f"http://127.0.0.1:{DAEMON_PORT}/metrics", timeout=10)
        except TestbedError:
            continue
        texts[h.name] = text.decode()
    return texts


def fetched_by_source(texts: Mapping[str, str]) -> dict[str, int]:
    """swarmcache_fetched_bytes_total of every host's daemon, summed by source label."""
    total: dict[str, int] = {}
    for text in texts.values():
        for line in text.splitlines():
            m = _FETCHED.match(line)
            if m:
                total[m.group(1)] = total.get(m.group(1), 0) + int(float(m.group(2)))
    return total


_MESSAGES = re.compile(
    r'^swarmcache_peer_messages_total\{direction="sent",type="([^"]+)"\}\s+(\S+)$'
)


_REQUESTS = re.compile(r'^swarmcache_peer_block_requests_total\{result="([^"]+)"\}\s+(\S+)$')


def messages_sent(texts: Mapping[str, str]) -> str | None:
    """Control messages each daemon sent to its peers: mean and max per host, by type."""
    per_host: list[dict[str, int]] = []
    for text in texts.values():
        kinds: dict[str, int] = {}
        for line in text.splitlines():
            m = _MESSAGES.match(line)
            if m:
                kinds[m.group(1)] = int(float(m.group(2)))
        per_host.append(kinds)
    if not per_host or not any(per_host):
        return None
    totals = [sum(k.values()) for k in per_host]
    names = sorted({k for h in per_host for k in h})
    by_kind = ", ".join(
        f"{k} {sum(h.get(k, 0) for h in per_host) / len(per_host):.0f}" for k in names
    )
    return (
        f"control messages sent per host (since the daemon started): mean "
        f"{sum(totals) / len(totals):.0f}, max {max(totals)} ({by_kind})"
    )


def block_requests(texts: Mapping[str, str]) -> str | None:
    """Block requests each daemon made of peers, by result, per host on average."""
    requests: dict[str, float] = {}
    for text in texts.values():
        for line in text.splitlines():
            r = _REQUESTS.match(line)
            if r:
                requests[r.group(1)] = requests.get(r.group(1), 0) + float(r.group(2))
    if not requests:
        return None
    asked = ", ".join(f"{k} {n / len(texts):.0f}" for k, n in sorted(requests.items()))
    return f"block requests per host by result: {asked}"


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
    # --hosts, --rate, --size and --modes default to None so --matrix can tell whether
    # they were given; the single-cell defaults are filled in below.
    p.add_argument("--hosts", type=int, help="hosts (default 8)")
    p.add_argument(
        "--rate",
        help="every link, both ways; 'none' for unshaped (default 200mbit)",
    )
    p.add_argument("--size", type=int, help="image MiB (default 256)")
    p.add_argument("--runs", type=int, default=1, help="runs of every mode (default %(default)s)")
    p.add_argument(
        "--modes",
        help=f"(default {','.join(MODES)}; with --matrix {','.join(MATRIX_MODES)})",
    )
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
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a daemon config key for swarmcache's runs, e.g. peers.request_size=256KiB "
        "(repeatable; the value as TOML would take it: numbers stay numbers)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory: logs, configs, results.json (image copies are deleted)",
    )
    p.add_argument(
        "--min-timeout",
        type=float,
        default=0.0,
        metavar="S",
        help="a mode may take at least S s (default: 10x the physical limit + 60 s, which a "
        "CPU-bound cell of many hosts on fast links can outlast)",
    )
    matrix = p.add_argument_group(
        "matrix",
        "--matrix runs every cell (hosts x size x rate) on a fresh test bed, modes "
        f"{', '.join(MATRIX_MODES)} in each, and prints one table (one row per cell)",
    )
    matrix.add_argument("--matrix", action="store_true", help="run the matrix")
    matrix.add_argument(
        "--hosts-list",
        default="4,8,16,32,64",
        metavar="N,N,..",
        help="host counts (default %(default)s)",
    )
    matrix.add_argument(
        "--sizes", default="64,256", metavar="MiB,..", help="image sizes (default %(default)s)"
    )
    matrix.add_argument(
        "--rates",
        default="50mbit,200mbit,1000mbit",
        metavar="RATE,..",
        help="link rates (default %(default)s)",
    )
    matrix.add_argument(
        "--naive-max-hosts",
        type=int,
        default=16,
        metavar="N",
        help="skip naive curl above N hosts: N copies share the origin's link "
        "(default %(default)s)",
    )
    matrix.add_argument(
        "--max-seconds",
        type=float,
        default=1200,
        metavar="S",
        help="skip a cell estimated to take longer than S s, or whose bytes this machine's "
        "cores cannot move within a mode's timeout; 0: run every cell, bounded by the "
        "per-mode timeouts alone (default %(default)s)",
    )
    matrix.add_argument("--json", type=Path, metavar="FILE", help="also write the rows here")
    args = p.parse_args()
    if args.matrix:
        cells, modes = matrix_args(p, args)
        missing = check_tools(modes)
        if missing:
            print(
                f"bench-fanout: missing {', '.join(missing)}: run scripts/install-bench-tools",
                file=sys.stderr,
            )
            return 2
        return in_work_dir(args, lambda work: run_matrix(args, cells, modes, work))
    for flag in ("hosts_list", "sizes", "rates", "naive_max_hosts", "max_seconds", "json"):
        if getattr(args, flag) != p.get_default(flag):
            p.error(f"--{flag.replace('_', '-')} goes with --matrix")
    args.hosts = 8 if args.hosts is None else args.hosts
    args.size = 256 if args.size is None else args.size
    args.rate = "200mbit" if args.rate is None else args.rate
    args.rate = None if args.rate == "none" else args.rate
    modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",") if m.strip()]
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
    return in_work_dir(args, lambda work: bench(args, modes, work))


def in_work_dir(args: argparse.Namespace, body: Callable[[Path], int]) -> int:
    """Run `body` in a fresh work directory that Ctrl-C and SIGTERM also clean up."""
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
        return body(work)
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
    timeout = mode_timeout(limit, args.min_timeout)
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
                bed,
                image,
                d,
                timeout,
                args.chunk_size,
                args.settle,
                log_level=args.log_level,
                settings=settings(args),
            ),
            "swarmcache-cache": lambda d: run_swarmcache(
                bed,
                image,
                d,
                timeout,
                args.chunk_size,
                args.settle,
                log_level=args.log_level,
                settings=settings(args),
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
                tidy(mode_dir, args.keep)
    report(results, image, args)
    if args.keep:
        (work / "results.json").write_text(
            json.dumps({m: [r.__dict__ for r in rs] for m, rs in results.items()}, indent=1)
        )
    return 0 if all(r.ok for rs in results.values() for r in rs) else 1


# ---------------------------------------------------------------------------------------
# matrix mode: every cell (hosts x size x rate) on a fresh bed, one row per cell
# ---------------------------------------------------------------------------------------
# Bits per second of image data one core moves to the hosts (veths, bridge, tbf, the
# daemons' hashing and writes): on the project's 2-core machine 8 hosts x 200 Mbit/s
# (1.6 Gbit/s) of swarmcache kept it 77-81% busy (README, 2026-12-02). Only used to skip
# cells that plainly cannot finish in time; the table reports what was measured.
CORE_BITS_PER_S = 0.8e9
# Core-seconds one daemon needs to start (Python, aiohttp, zeroconf); all start at once.
DAEMON_START_CORE_S = 1.0
GiB = 1 << 30


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: `hosts` hosts want one `size` MiB image over `rate` links."""

    hosts: int
    size: int  # MiB
    rate: str

    @property
    def limit(self) -> float:
        """The physical limit: seconds for the image through one link."""
        return self.size * MiB * 8 / rate_bits_per_s(self.rate)

    @property
    def naive_timeout(self) -> float:
        """Naive curl's timeout: all copies cross the origin's link, so above 10 hosts
        mode_timeout() would fail it by construction; twice that bound + 60 s instead."""
        return max(mode_timeout(self.limit), 2 * self.hosts * self.limit + 60)

    @property
    def machine_seconds(self) -> float:
        """Seconds this machine's cores need to move hosts x size at CORE_BITS_PER_S."""
        return self.hosts * self.size * MiB * 8 / ((os.cpu_count() or 1) * CORE_BITS_PER_S)

    def estimate(self, modes: Sequence[str], settle: float) -> float:
        """Rough seconds the cell takes: bed, origin, each mode and its sha256 checks."""
        moved = max(self.limit, self.machine_seconds)
        start = self.hosts * DAEMON_START_CORE_S / (os.cpu_count() or 1) + settle
        verify = self.hosts * self.size * MiB / 1e9
        each = {
            "swarmcache": start + moved,
            "aria2": moved,
            "naive": max(self.hosts * self.limit, self.machine_seconds),
        }
        return 10 + sum(each[m] + verify + 5 for m in modes)

    def __str__(self) -> str:
        return f"{self.hosts} hosts x {self.size} MiB x {self.rate}"


@dataclass
class CellResult:
    """What became of one cell."""

    cell: Cell
    results: dict[str, ModeResult] = field(default_factory=dict)  # the modes that ran
    skipped: dict[str, str] = field(default_factory=dict)  # mode -> why it did not run
    reason: str | None = None  # why the whole cell was skipped
    interrupted: bool = False  # Ctrl-C or SIGTERM came during the cell

    @property
    def ok(self) -> bool:
        """Every mode that ran got every host the verified image in time."""
        return all(r.ok for r in self.results.values())


def matrix_args(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[Cell], list[str]]:
    """The cells and modes of --matrix (an argparse error for what does not fit)."""
    for flag in ("hosts", "size", "rate"):
        if getattr(args, flag) is not None:
            p.error(f"--{flag} is for one cell; --matrix takes --hosts-list, --sizes, --rates")
    if args.runs != 1:
        p.error("--runs is for one cell; --matrix runs every cell once")
    modes = [m.strip() for m in (args.modes or ",".join(MATRIX_MODES)).split(",") if m.strip()]
    if not modes or set(modes) - set(MATRIX_MODES):
        p.error(f"--modes with --matrix: choose from {', '.join(MATRIX_MODES)}")

    def ints(flag: str, text: str, top: int) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            p.error(f"{flag}: expected whole numbers separated by commas, not {text!r}")
        if not values or not all(1 <= v <= top for v in values):
            p.error(f"{flag}: one or more values, each 1..{top}, not {text!r}")
        return list(dict.fromkeys(values))

    hosts = ints("--hosts-list", args.hosts_list, MAX_HOSTS)
    sizes = ints("--sizes", args.sizes, 1 << 20)
    rates = list(dict.fromkeys(r.strip().lower() for r in args.rates.split(",") if r.strip()))
    for rate in rates or [args.rates]:
        try:
            rate_bits_per_s(rate)
        except ValueError as err:
            p.error(f"--rates: {err} (the matrix shapes every link)")
    if args.naive_max_hosts < 0 or args.max_seconds < 0:
        p.error("--naive-max-hosts and --max-seconds take 0 or more")
    cells = [Cell(h, s, r) for h in hosts for s in sizes for r in rates]
    return cells, [m for m in MATRIX_MODES if m in modes]


def plan_cell(cell: Cell, modes: Sequence[str], args: argparse.Namespace) -> CellResult:
    """Which of the cell's modes will run: naive not above --naive-max-hosts, and no mode
    of a cell the --max-seconds guard rules out (each with the reason)."""
    planned = CellResult(cell)
    if "naive" in modes and cell.hosts > args.naive_max_hosts:
        planned.skipped["naive"] = f"over {args.naive_max_hosts} hosts (--naive-max-hosts)"
    run = [m for m in modes if m not in planned.skipped]
    if args.max_seconds <= 0 or not run:
        return planned
    cores = os.cpu_count() or 1
    timeout = mode_timeout(cell.limit, args.min_timeout)
    if cell.machine_seconds > timeout:
        planned.reason = (
            f"delivering {cell.hosts * cell.size * MiB / GiB:.1f} GiB takes "
            f"~{cell.machine_seconds:.0f} s at the ~{cores * CORE_BITS_PER_S / 1e9:.1f} Gbit/s "
            f"{cores} cores move, over the {timeout:.0f} s a mode may take"
        )
    elif cell.estimate(run, args.settle) > args.max_seconds:
        planned.reason = (
            f"estimated {cell.estimate(run, args.settle):.0f} s, "
            f"over --max-seconds {args.max_seconds:.0f}"
        )
    if planned.reason:
        planned.skipped.update(dict.fromkeys(run, "cell skipped"))
    return planned


def broken(mode: str, hosts: Sequence[Host], err: Exception) -> ModeResult:
    """The result of a mode that broke off: every host failed; the error's first line and,
    if it has more (a TestbedError ends with the log's tail), its last."""
    lines = [line.strip() for line in str(err).strip().splitlines()] or [""]
    error = f"{type(err).__name__}: {lines[0]}"
    if len(lines) > 1:
        error += f" ... {lines[-1][-300:]}"
    return ModeResult(mode, dict.fromkeys(h.name for h in hosts), [], 0, error=error)


def run_cell(
    args: argparse.Namespace, planned: CellResult, modes: Sequence[str], image: Image, root: Path
) -> None:
    """Build a bed for the cell, start the origin, run the planned modes into `planned`.

    A mode that raises (or a bed that does not come up) is recorded as failed with its
    error, so the matrix goes on; the bed still stops everything and deletes itself.
    """
    cell = planned.cell
    run = [m for m in modes if m not in planned.skipped]
    # swarmcache: the daemon's copy and the client's, on every host
    need = cell.hosts * image.size * (2 if "swarmcache" in run else 1) + GiB
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if run and need > free:
        planned.reason = f"needs ~{need / GiB:.1f} GiB of disk, {free / GiB:.1f} GiB free"
        planned.skipped.update(dict.fromkeys(run, "cell skipped"))
        return
    timeout = mode_timeout(cell.limit, args.min_timeout)
    start_timeout = max(30.0, 2 * cell.hosts * DAEMON_START_CORE_S / (os.cpu_count() or 1) + 10)
    cell_dir = root / f"h{cell.hosts}-{cell.size}mib-{cell.rate}"
    bed = Testbed(cell.hosts, rate=cell.rate)
    announce = f"http://{bed.origin.addr}:{TRACKER_PORT}/announce"
    runners: dict[str, Callable[[Path], ModeResult]] = {
        "swarmcache": lambda d: run_swarmcache(
            bed,
            image,
            d,
            timeout,
            args.chunk_size,
            args.settle,
            log_level=args.log_level,
            settings=settings(args),
            start_timeout=start_timeout,
        ),
        "aria2": lambda d: run_aria2(
            bed,
            image,
            d,
            timeout,
            make_torrent(image, d / "bench.torrent", announce, args.piece_size),
        ),
        "naive": lambda d: run_naive(bed, image, d, cell.naive_timeout),
    }
    try:
        with bed:
            start_origin(bed, image.path.parent, log=cell_dir / "origin.log")
            for mode in run:
                mode_dir = cell_dir / mode
                mode_dir.mkdir(parents=True)
                print(f"  {mode} ...", flush=True)
                try:
                    result = runners[mode](mode_dir)
                except Exception as err:  # one broken mode must not end the matrix
                    print(f"  {mode}: broke off: {err}", flush=True)
                    result = broken(mode, bed.hosts, err)
                planned.results[mode] = result
                print(f"  {mode}: {mode_cell(result, cell)}", flush=True)
                tidy(mode_dir, args.keep)
    except Exception as err:  # the bed or the origin did not come up
        print(f"  test bed: {err}", flush=True)
        for mode in run:
            planned.results.setdefault(mode, broken(mode, bed.hosts, err))


def run_matrix(
    args: argparse.Namespace, cells: Sequence[Cell], modes: Sequence[str], work: Path
) -> int:
    """Run every cell; print one table (also when interrupted); exit 1 if a mode failed."""
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_describe(),
        "cores": os.cpu_count(),
        "modes": list(modes),
        "chunk_size": args.chunk_size,
        "piece_size_log2": args.piece_size,
        "settle_s": args.settle,
    }
    plans = [plan_cell(c, modes, args) for c in cells]
    todo = [p for p in plans if p.reason is None]
    est = sum(p.cell.estimate([m for m in modes if m not in p.skipped], args.settle) for p in todo)
    print(
        f"matrix: {len(cells)} cells ({len(cells) - len(todo)} skipped by the guard), modes "
        f"{', '.join(modes)}; {os.cpu_count()} cores; roughly {est / 60:.0f} min",
        flush=True,
    )
    for p in plans:
        if p.reason:
            print(f"  skipping {p.cell}: {p.reason}", flush=True)
    images: dict[int, Image] = {}
    done: list[CellResult] = []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.json, "w")) if args.json else None
        try:
            for i, planned in enumerate(plans, 1):
                cell = planned.cell
                done.append(planned)  # an interrupted cell still shows the modes it ran
                if planned.reason is None:
                    print(f"[{i}/{len(plans)}] {cell} (limit {cell.limit:.2f} s)", flush=True)
                    if cell.size not in images:
                        images[cell.size] = matrix_image(work, cell.size)
                    try:
                        run_cell(args, planned, modes, images[cell.size], work / "cells")
                    except KeyboardInterrupt:
                        planned.interrupted = True
                        raise
                if out:
                    out.write(json.dumps(matrix_json(planned, meta)) + "\n")
                    out.flush()
        finally:
            print_matrix(done, modes, len(plans), args)
            if args.json:
                print(f"rows as JSON lines: {args.json}")
    return 0 if all(c.ok for c in done) else 1


def matrix_image(work: Path, size: int) -> Image:
    """The image of `size` MiB (one directory per size: the origin serves it alone)."""
    image_id = f"bench-{size}mib"
    path = work / "images" / str(size) / image_id
    print(f"making a {size} MiB image ...", flush=True)
    return Image(image_id, path, make_image(path, size), size * MiB)


def git_describe() -> str | None:
    """The commit this runs from, "+dirty" with uncommitted changes (None outside git)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def good_hosts(r: ModeResult) -> int:
    """Hosts done in time with the verified image."""
    return sum(1 for h, t in r.host_times.items() if t is not None and h not in r.bad)


def mode_cell(r: ModeResult | None, cell: Cell, ratio: bool = False) -> str:
    """A mode's table cell: last host's seconds (and x limit), or why there is none."""
    if r is None:
        return "-"
    if r.error:
        return "FAILED (error)"
    if not r.ok:
        return f"FAILED ({good_hosts(r)}/{len(r.host_times)} ok)"
    return f"{r.wall:.2f} s ({r.wall / cell.limit:.2f}x)" if ratio else f"{r.wall:.2f} s"


def cpu_per_gib(r: ModeResult, cell: Cell) -> float | None:
    """The daemons' core-seconds per GiB the hosts received (None unless every host did)."""
    if r.daemon_cpu is None or not r.ok:
        return None
    return r.daemon_cpu / (cell.hosts * cell.size * MiB / GiB)


def print_matrix(
    done: Sequence[CellResult], modes: Sequence[str], cells: int, args: argparse.Namespace
) -> None:
    """The table: one row per cell, then what was skipped or failed and why."""
    head = [
        "hosts",
        "size",
        "rate",
        "limit",
        "swarmcache (x limit)",
        "aria2c",
        "naive",
        "sc / aria2",
        "sc origin egress",
        "sc verified",
        "busy (sc)",
        "daemon CPU (sc)",
    ]
    print(f"\n{len(done)} of {cells} cells; last host of each mode; {os.cpu_count()} cores")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    notes: list[str] = []
    for c in done:
        cell, rs = c.cell, c.results
        sc, ar = rs.get("swarmcache"), rs.get("aria2")
        cols = {m: "skipped" if m in c.skipped else mode_cell(rs.get(m), cell) for m in modes}
        if sc:
            cols["swarmcache"] = mode_cell(sc, cell, ratio=True)
        cpu = cpu_per_gib(sc, cell) if sc else None
        row = [
            str(cell.hosts),
            f"{cell.size} MiB",
            cell.rate,
            f"{cell.limit:.2f} s",
            cols.get("swarmcache", "-"),
            cols.get("aria2", "-"),
            cols.get("naive", "-"),
            f"{sc.wall / ar.wall:.2f}x" if sc and ar and sc.ok and ar.ok else "-",
            f"{sc.origin_tx / (cell.size * MiB):.2f} copies" if sc and not sc.error else "-",
            ("yes" if sc.ok else "no") if sc else "-",
            f"{sc.busy:.0%}" if sc and sc.busy is not None else "-",
            f"{cpu:.1f} s/GiB" if cpu is not None else "-",
        ]
        print("| " + " | ".join(row) + " |")
        if c.reason:
            notes.append(f"{cell}: skipped: {c.reason}")
        if c.interrupted:
            notes.append(f"{cell}: interrupted; only the modes done before are shown")
        for mode, r in rs.items():
            if r.ok:
                continue
            late = [h for h, t in r.host_times.items() if t is None]
            why = [r.error] if r.error else []
            why += [f"not done in time: {', '.join(late)}"] if late and not r.error else []
            why += [f"wrong or missing bytes: {', '.join(r.bad)}"] if r.bad else []
            why += [n for n in r.notes if "exited with" in n]
            notes.append(f"{cell}: {mode} FAILED: {'; '.join(why)}")
    print(
        "limit = size / rate, the time of one copy through one link; 'x limit' = last host / "
        "limit.\nswarmcache = every host's client GETs the image through its daemon to a file "
        "(done when curl has it; sha256-checked after). sc origin egress = the origin's veth "
        "tx / image size.\nbusy = share of all CPUs busy while the swarmcache clients ran "
        "(/proc/stat); daemon CPU = the daemons' user+system seconds over the same time "
        "(/proc/PID/stat), summed, / (hosts x size)."
    )
    if any(c.skipped.get("naive", "").startswith("over") for c in done):
        print(f"naive skipped above {args.naive_max_hosts} hosts (--naive-max-hosts).")
    for note in notes:
        print(f"- {note}")


def matrix_json(c: CellResult, meta: Mapping[str, object]) -> dict[str, object]:
    """One row as a JSON object: the table's columns (None where the table has '-'), each
    mode's details, and the run's settings."""
    cell = c.cell

    def num(x: float | None, digits: int = 3) -> float | None:
        return None if x is None or x != x else round(x, digits)  # x != x: NaN

    def last(mode: str) -> float | None:
        r = c.results.get(mode)
        return num(r.wall) if r and r.ok else None

    def detail(mode: str) -> dict[str, object]:
        r = c.results.get(mode)
        if r is None:
            return {
                "status": "skipped" if mode in c.skipped else "not run",
                "why": c.skipped.get(mode),
            }
        return {
            "status": "ok" if r.ok else "failed",
            "last_s": num(r.wall) if r.ok else None,
            "median_s": num(r.median),
            "hosts_ok": good_hosts(r),
            "host_times": {h: num(t) for h, t in r.host_times.items()},
            "bad": r.bad,
            "origin_tx_bytes": None if r.error else r.origin_tx,
            "origin_served_bytes": r.origin_served,
            "busy": num(r.busy),
            "daemon_cpu_s": num(r.daemon_cpu),
            "error": r.error,
            "notes": r.notes,
        }

    sc, ar = last("swarmcache"), last("aria2")
    scr = c.results.get("swarmcache")
    return {
        "hosts": cell.hosts,
        "size_mib": cell.size,
        "rate": cell.rate,
        "limit_s": num(cell.limit),
        "swarmcache_s": sc,
        "swarmcache_x_limit": num(sc / cell.limit) if sc else None,
        "aria2_s": ar,
        "naive_s": last("naive"),
        "swarmcache_vs_aria2": num(sc / ar) if sc and ar else None,
        "swarmcache_origin_copies": (
            num(scr.origin_tx / (cell.size * MiB)) if scr and not scr.error else None
        ),
        "swarmcache_verified": scr.ok if scr else None,
        "busy_pct": num(scr.busy * 100, 1) if scr and scr.busy is not None else None,
        "daemon_cpu_s_per_gib": num(cpu_per_gib(scr, cell)) if scr else None,
        "skipped": c.reason,
        "modes": {m: detail(m) for m in MATRIX_MODES},
        "run": dict(meta),
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
