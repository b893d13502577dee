"""Single-host fetch benchmark (run through scripts/bench-fetch).

Everything runs on loopback in one run, so the ratios are what matters:
  origin  = swarmcache.origin.server (aiohttp FileResponse, sendfile) serving a file
  A curl origin -> /dev/null          the link's practical limit here
  B curl origin -> file + fsync       the same, also writing it durably to disk like we do
  F curl origin -> file                what a hypervisor downloading by itself does
  C swarmcache cold GET (curl through the daemon, cache empty) -> /dev/null
  E the same fetch until the daemon reports it complete (verified, durable)
  D swarmcache warm GET (complete in cache) -> /dev/null
  and the daemon's peak RSS (VmHWM) over all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def curl(url: str, out: str = "/dev/null") -> float:
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", out, url], check=True)
    return time.perf_counter() - t0


def curl_to_file_fsync(url: str, path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", str(path), url], check=True)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def main() -> None:
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    work = Path(tempfile.mkdtemp(prefix="swarmcache-bench-", dir=os.environ.get("BENCH_DIR")))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        origin_dir = work / "origin"
        origin_dir.mkdir()
        image = origin_dir / "bench"
        h = hashlib.sha256()
        with open(image, "wb") as f:
            for _ in range(size_mib):
                block = os.urandom(1 << 20)
                h.update(block)
                f.write(block)
        (origin_dir / "bench.sha256").write_text(f"{h.hexdigest()}  bench\n")
        size = size_mib << 20

        oport, dport = free_port(), free_port()
        origin_url = f"http://127.0.0.1:{oport}/images/bench"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "swarmcache.origin.server", str(origin_dir),
             "--listen", f"127.0.0.1:{oport}"]))
        wait_http(f"http://127.0.0.1:{oport}/_stats")
        cache_dir = work / "cache"
        env = {**os.environ, "SWARMCACHE_DAEMON_LISTEN": f"127.0.0.1:{dport}",
               "SWARMCACHE_CACHE_DIR": str(cache_dir), "SWARMCACHE_CACHE_MAX_SIZE": "100GiB",
               "SWARMCACHE_ORIGIN_URL": f"http://127.0.0.1:{oport}/images/{{image_id}}",
               "SWARMCACHE_DAEMON_LOG_LEVEL": "warning"}
        env.pop("SWARMCACHE_CONFIG", None)
        daemon = subprocess.Popen([sys.executable, "-m", "swarmcache", "serve"], env=env)
        procs.append(daemon)
        daemon_url = f"http://127.0.0.1:{dport}"
        wait_http(daemon_url + "/healthz")
        image_url = daemon_url + "/v1/images/bench"

        curl(origin_url)  # warm the page cache of the origin file once
        results: dict[str, list[float]] = {k: [] for k in "ABCDEF"}
        origin_bytes: list[int] = []
        for _ in range(runs):
            results["A"].append(curl(origin_url))
            results["B"].append(curl_to_file_fsync(origin_url, work / "curl.out"))
            results["F"].append(curl(origin_url, str(work / "curl.out")))
            (work / "curl.out").unlink()
            try:
                urllib.request.urlopen(urllib.request.Request(image_url, method="DELETE")).close()
            except urllib.error.HTTPError as err:
                if err.code != 404:
                    raise
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{oport}/_stats/reset", method="POST")).close()
            t0 = time.perf_counter()
            results["C"].append(curl(image_url))
            for _ in range(6000):  # bounded: 10 minutes at most
                with urllib.request.urlopen(image_url + "/status") as resp:
                    st = json.load(resp)
                if st["state"] != "fetching":
                    break
                time.sleep(0.01)
            results["E"].append(time.perf_counter() - t0)
            assert st["state"] == "complete" and st["sha256"] == h.hexdigest(), st
            with urllib.request.urlopen(f"http://127.0.0.1:{oport}/_stats") as resp:
                origin_bytes.append(json.load(resp)["bytes_by_path"].get("bench", 0))
            results["D"].append(curl(image_url))
        rss = hwm_kib(daemon.pid)

        def row(label: str, key: str, base: str | None) -> str:
            med = statistics.median(results[key])
            rate = size / med / (1 << 20)
            ratio = f"{med / statistics.median(results[base]):.2f}x" if base else "1.00x"
            return f"| {label:<44} | {med:7.2f} s | {rate:8.0f} MiB/s | {ratio:>7} |"

        print(f"\nsingle host, loopback, image {size_mib} MiB, chunk 4 MiB, median of {runs}"
              f" runs, {os.cpu_count()} cores")
        print("| what | time | rate | vs A |")
        print("|---|---|---|---|")
        print(row("A curl origin -> /dev/null", "A", None))
        print(row("F curl origin -> file (page cache)", "F", "A"))
        print(row("B curl origin -> file + fsync", "B", "A"))
        print(row("C swarmcache cold GET, client has every byte", "C", "A"))
        print(row("E swarmcache cold: complete (verified+durable)", "E", "A"))
        print(row("D swarmcache warm GET (sendfile from cache)", "D", "A"))
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\ncold GET vs F (curl to a file): {med['C'] / med['F']:.2f}x; "
              f"complete vs B (curl to a file + fsync): {med['E'] / med['B']:.2f}x")
        print(f"origin bytes per cold fetch: {origin_bytes} (image {size})")
        print(f"daemon peak RSS (VmHWM): {rss / 1024:.0f} MiB")
        print("raw seconds:", {k: [round(x, 3) for x in v] for k, v in results.items()})
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
