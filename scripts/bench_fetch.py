"""Single-host fetch benchmark (run through scripts/bench-fetch).

One origin, one host; every figure comes from the same run, so the ratios matter:
  A curl origin -> /dev/null            what the path between origin and host allows
  F curl origin -> file                 a hypervisor downloading by itself
  B curl origin -> file + fsync         the same, durable on disk as swarmcache makes it
  C swarmcache cold GET -> /dev/null    cache empty; curl through the daemon on the host
  E the same fetch until the daemon reports it complete (verified, durable)
  D swarmcache warm GET -> /dev/null    image complete in the cache
  S curl of the same file from aiohttp's own static handler on the host (web.static)
plus the daemon's peak RSS and the bytes the origin sent per cold fetch.

Topologies:
  loopback (default)   origin and host processes on this machine's loopback
  --link RATE          two network namespaces made for the run, joined by a veth pair
                       shaped with tbf to RATE (e.g. 1gbit) in both directions; origin in
                       one, daemon and curl in the other; the physical limit
                       size / RATE is printed too. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
STATIC_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


class Loopback:
    """Origin and host share this machine's loopback."""

    origin_addr = "127.0.0.1"
    label = "loopback"

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def origin_cmd(self, cmd: list[str]) -> list[str]:
        return cmd

    def host_cmd(self, cmd: list[str]) -> list[str]:
        return cmd


class ShapedLink:
    """Two namespaces joined by a veth pair, tbf-shaped both ways; removed on exit."""

    origin_addr = "10.251.0.1"
    host_addr = "10.251.0.2"

    def __init__(self, rate: str) -> None:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate)
        if not m:
            raise SystemExit(f"--link wants a rate such as 200mbit or 1gbit, not {rate!r}")
        self.rate = rate
        self.bits_per_s = float(m.group(1)) * RATE_UNITS[m.group(2)]
        tag = f"{os.getpid() % 100000}"
        self.ns_o, self.ns_h = f"scb-o-{tag}", f"scb-h-{tag}"
        self.if_o, self.if_h = f"scbo{tag}", f"scbh{tag}"
        self.label = f"veth shaped to {rate} both ways (tbf), two network namespaces"

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True)

    def __enter__(self) -> ShapedLink:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
            raise SystemExit("--link needs root, ip and tc")
        self._ip("netns", "add", self.ns_o)
        self._ip("netns", "add", self.ns_h)
        try:
            self._ip("link", "add", self.if_o, "type", "veth", "peer", "name", self.if_h)
            burst = max(64 * 1024, int(self.bits_per_s / 8 / 100))  # 10 ms of traffic
            for ns, dev, addr in (
                (self.ns_o, self.if_o, self.origin_addr),
                (self.ns_h, self.if_h, self.host_addr),
            ):
                self._ip("link", "set", dev, "netns", ns)
                self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                self._ip("-n", ns, "link", "set", "lo", "up")
                self._ip("-n", ns, "link", "set", dev, "up")
                subprocess.run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        self.rate,
                        "burst",
                        str(burst),
                        "latency",
                        "50ms",
                    ],
                    check=True,
                )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.ns_o, self.ns_h):
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)

    def origin_cmd(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns_o, *cmd]

    def host_cmd(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns_h, *cmd]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bench:
    def __init__(self, topo: Loopback | ShapedLink, work: Path) -> None:
        self.topo = topo
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def curl(self, *args: str) -> bytes:
        cmd = self.topo.host_cmd(["curl", "-sSf", "--noproxy", "*", *args])
        return subprocess.run(cmd, check=True, capture_output=True).stdout

    def timed_curl(self, url: str, out: str = "/dev/null") -> float:
        t0 = time.perf_counter()
        self.curl("-o", out, url)
        return time.perf_counter() - t0

    def wait_http(self, url: str) -> None:
        for _ in range(200):
            try:
                self.curl("-o", "/dev/null", url)
                return
            except subprocess.CalledProcessError:
                time.sleep(0.05)
        raise SystemExit(f"{url} did not come up")

    def start(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def make_image(path: Path, size_mib: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size_mib):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    path.with_name(path.name + ".sha256").write_text(f"{h.hexdigest()}  {path.name}\n")
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description="swarmcache single-host fetch benchmark")
    p.add_argument("size_mib", nargs="?", type=int, default=1024, help="image size (MiB)")
    p.add_argument("runs", nargs="?", type=int, default=3, help="runs per mode (median)")
    p.add_argument("--link", metavar="RATE", help="shaped veth between two namespaces")
    args = p.parse_args()
    size = args.size_mib << 20
    topo: Loopback | ShapedLink = ShapedLink(args.link) if args.link else Loopback()
    work = Path(tempfile.mkdtemp(prefix="swarmcache-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        with topo:
            bench = Bench(topo, work)
            try:
                run(bench, topo, work, args.size_mib, size, args.runs)
            finally:
                bench.stop_all()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(
    bench: Bench, topo: Loopback | ShapedLink, work: Path, size_mib: int, size: int, runs: int
) -> None:
    origin_dir = work / "origin"
    origin_dir.mkdir()
    sha = make_image(origin_dir / "bench", size_mib)
    oport, dport = free_port(), free_port()
    oaddr = topo.origin_addr
    origin_url = f"http://{oaddr}:{oport}/images/bench"
    bench.start(
        topo.origin_cmd(
            [
                sys.executable,
                "-m",
                "swarmtools.origin_server",
                str(origin_dir),
                "--listen",
                f"{oaddr}:{oport}",
            ]
        )
    )
    bench.wait_http(f"http://{oaddr}:{oport}/_stats")
    env = {
        **os.environ,
        "SWARMCACHE_DAEMON_LISTEN": f"127.0.0.1:{dport}",
        "SWARMCACHE_CACHE_DIR": str(work / "cache"),
        "SWARMCACHE_CACHE_MAX_SIZE": "100GiB",
        "SWARMCACHE_ORIGIN_URL": f"http://{oaddr}:{oport}/images/{{image_id}}",
        "SWARMCACHE_DAEMON_LOG_LEVEL": "warning",
    }
    env.pop("SWARMCACHE_CONFIG", None)
    daemon = bench.start(topo.host_cmd([sys.executable, "-m", "swarmcache", "serve"]), env)
    daemon_url = f"http://127.0.0.1:{dport}"
    bench.wait_http(daemon_url + "/healthz")
    image_url = daemon_url + "/v1/images/bench"

    sport = free_port()
    bench.start(topo.host_cmd([sys.executable, "-c", STATIC_SERVER, str(origin_dir), str(sport)]))
    static_url = f"http://127.0.0.1:{sport}/bench"
    bench.wait_http(static_url + ".sha256")

    bench.timed_curl(origin_url)  # the origin's file into its page cache once
    results: dict[str, list[float]] = {k: [] for k in "AFBCEDS"}
    origin_bytes: list[int] = []
    out = str(work / "curl.out")
    for _ in range(runs):
        results["A"].append(bench.timed_curl(origin_url))
        results["F"].append(bench.timed_curl(origin_url, out))
        os.unlink(out)
        t0 = time.perf_counter()
        bench.curl("-o", out, origin_url)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        results["B"].append(time.perf_counter() - t0)
        os.unlink(out)

        bench.curl("-X", "POST", f"http://{oaddr}:{oport}/_stats/reset", "-o", "/dev/null")
        t0 = time.perf_counter()
        results["C"].append(bench.timed_curl(image_url))
        for _ in range(60000):  # bounded: 10 minutes
            st = json.loads(bench.curl(image_url + "/status"))
            if st["state"] != "fetching":
                break
            time.sleep(0.01)
        results["E"].append(time.perf_counter() - t0)
        if st["state"] != "complete" or st["sha256"] != sha:
            raise SystemExit(f"fetch did not verify: {st}")
        stats = json.loads(bench.curl(f"http://{oaddr}:{oport}/_stats"))
        origin_bytes.append(stats["bytes_by_path"].get("bench", 0))
        results["D"].append(bench.timed_curl(image_url))
        results["S"].append(bench.timed_curl(static_url))
        bench.curl("-X", "DELETE", image_url, "-o", "/dev/null")
    rss = hwm_kib(daemon.pid)

    med = {k: statistics.median(v) for k, v in results.items()}
    limit = size * 8 / topo.bits_per_s if isinstance(topo, ShapedLink) else None
    names = {
        "A": "A curl origin -> /dev/null",
        "F": "F curl origin -> file",
        "B": "B curl origin -> file + fsync",
        "C": "C swarmcache cold GET, client has every byte",
        "E": "E swarmcache cold, until complete (verified, durable)",
        "D": "D swarmcache warm GET (sendfile from the cache)",
        "S": "S curl of the file from aiohttp web.static, on the host",
    }
    print(
        f"\n{topo.label}; image {size_mib} MiB, chunk 4 MiB, median of {runs} runs, "
        f"{os.cpu_count()} cores"
    )
    head = "| what | time | MiB/s | vs A | vs F |" + (" vs link limit |" if limit else "")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for key in "AFBCEDS":
        row = (
            f"| {names[key]} | {med[key]:.2f} s | {size / med[key] / 2**20:.0f} | "
            f"{med[key] / med['A']:.2f}x | {med[key] / med['F']:.2f}x |"
        )
        if limit:
            row += f" {med[key] / limit:.2f}x |"
        print(row)
    if limit:
        print(f"link limit (size / rate): {limit:.2f} s")
    print(f"warm GET vs aiohttp web.static: {med['D'] / med['S']:.2f}x")
    print(f"origin bytes per cold fetch: {origin_bytes} (image {size})")
    print(f"daemon peak RSS (VmHWM): {rss / 1024:.0f} MiB")
    print("raw seconds:", {k: [round(x, 3) for x in v] for k, v in results.items()})


if __name__ == "__main__":
    main()
