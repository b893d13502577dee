"""Soak (run through scripts/soak): many readers, peer traffic and evictions for a while.

Four daemons on loopback (static peers of each other, mDNS off), an origin serving
a dozen images of 1-6 MiB, and a cache too small to hold them all on any host, so
images are evicted and fetched again all along. 64 readers loop until the time is
up: each picks a host, an image and either the whole image or a Range of it, and
checks the bytes against the origin's file. At the end it prints the errors, the
latency of the reads (p50, p99, max), and each daemon's RSS and open file
descriptors after the warm-up and at the end, each measured once no daemon is
fetching; the exit status is 1 if any read failed or a daemon's fds or RSS grew
past a bound (fds +16, RSS x1.5 + 64 MiB) and stayed there for 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HOSTS = 4
READERS = 64
MIB = 1024 * 1024
CACHE_MIB = 24
SETTLE = 20.0  # seconds the daemons get to finish fetches and close sockets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def open_fds(pid: int) -> dict[str, int]:
    """What a process's fds point at, counted: socket, pipe, anon_inode:..., or the path."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:")) else target
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def grown(before: tuple[int, int], after: tuple[int, int]) -> bool:
    (rss0, fd0), (rss1, fd1) = before, after
    return fd1 > fd0 + 16 or rss1 > 1.5 * rss0 + 64 * MIB


async def wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


class Run:
    def __init__(self, work: Path, seconds: float, seed: int, log_level: str = "warning") -> None:
        self.log_level = log_level
        self.work = work
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.images: dict[str, bytes] = {}
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.reads = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.peaks: list[float] = []

    def make_images(self) -> None:
        root = self.work / "images"
        root.mkdir()
        for i in range(12):
            data = self.rng.randbytes(self.rng.randint(1 * MIB, 6 * MIB))
            name = f"img{i}"
            (root / name).write_bytes(data)
            (root / f"{name}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
            self.images[name] = data

    def start(self) -> None:
        port = free_port()
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "swarmtools.origin_server", str(self.work / "images"),
                 "--listen", f"127.0.0.1:{port}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        origin = f"http://127.0.0.1:{port}/images/{{image_id}}"
        ports = [free_port() for _ in range(HOSTS)]
        for i, p in enumerate(ports):
            peers = ", ".join(f'"127.0.0.1:{q}"' for q in ports if q != p)
            config = self.work / f"d{i}.toml"
            config.write_text(
                f'[daemon]\nlisten = "127.0.0.1:{p}"\nlog_level = "{self.log_level}"\n'
                f"access_log = {'true' if self.log_level == 'info' else 'false'}\n"
                f'[cache]\ndir = "{self.work / f"cache{i}"}"\nmax_size = "{CACHE_MIB}MiB"\n'
                f'chunk_size = "1MiB"\n[origin]\nurl = "{origin}"\n'
                f"[discovery]\nmdns = false\nstatic_peers = [{peers}]\n"
            )
            log = open(self.work / f"d{i}.log", "ab")  # noqa: SIM115
            env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMCACHE_")}
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "swarmcache", "--config", str(config), "serve"],
                    stdout=log,
                    stderr=log,
                    env=env,
                )
            )
            log.close()
            self.urls.append(f"http://127.0.0.1:{p}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def reader(self, s: aiohttp.ClientSession, deadline: float, rng: random.Random) -> None:
        while time.monotonic() < deadline:
            url = rng.choice(self.urls)
            name = rng.choice(sorted(self.images))
            data = self.images[name]
            headers = {}
            want = data
            if rng.random() < 0.5:
                a = rng.randrange(len(data))
                b = min(len(data) - 1, a + rng.randrange(1, 2 * MIB))
                headers["Range"] = f"bytes={a}-{b}"
                want = data[a : b + 1]
            t0 = time.monotonic()
            try:
                async with s.get(f"{url}/v1/images/{name}", headers=headers) as resp:
                    body = await resp.read()
                    ok = resp.status in (200, 206) and body == want
                    if not ok:
                        what = body[:200].decode(errors="replace") if resp.status >= 400 else ""
                        self.errors.append(
                            f"{url} {name} {headers}: {resp.status}, {len(body)} B {what}"
                        )
            except (aiohttp.ClientError, TimeoutError) as err:
                self.errors.append(f"{url} {name} {headers}: {err!r}")
            self.latencies.append(time.monotonic() - t0)
            self.reads += 1

    async def metric(self, s: aiohttp.ClientSession, sample: str) -> float:
        """One sample of /metrics (name and labels as printed) summed over the daemons."""
        return sum(await self.metrics(s, sample))

    async def metrics(self, s: aiohttp.ClientSession, sample: str) -> list[float]:
        """One sample of /metrics (name and labels as printed) of each daemon."""
        values = []
        for url in self.urls:
            async with s.get(url + "/metrics") as resp:
                for line in (await resp.text()).splitlines():
                    if line.startswith(sample + " "):
                        values.append(float(line.split()[1]))
        return values

    async def watch_caches(self, s: aiohttp.ClientSession) -> None:
        """Keep each daemon's largest swarmcache_cache_bytes in self.peaks (until cancelled):
        how far over max_size images in use held the caches."""
        while True:
            now = await self.metrics(s, "swarmcache_cache_bytes")
            self.peaks = [max(a, b) for a, b in zip(self.peaks or now, now, strict=True)]
            await asyncio.sleep(0.25)

    async def quiet(self, s: aiohttp.ClientSession) -> None:
        """Wait until no daemon is fetching (at most SETTLE s)."""
        deadline = time.monotonic() + SETTLE
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if not await self.metric(s, 'swarmcache_images{state="fetching"}'):
                return

    async def main(self) -> int:
        self.make_images()
        self.start()
        try:
            for url in self.urls:
                await wait_http(url + "/healthz")
            await asyncio.sleep(2.0)  # static peers say hello
            daemons = self.procs[1:]
            timeout = aiohttp.ClientTimeout(total=120)
            # warm up with every reader, then let their connections close: what is
            # measured before and after is the daemons' own (no client holds a socket)
            async with aiohttp.ClientSession(timeout=timeout) as s:
                warm = time.monotonic() + min(10.0, self.seconds / 4)
                await asyncio.gather(
                    *(
                        self.reader(s, warm, random.Random(self.rng.random()))
                        for _ in range(READERS)
                    )
                )
            async with aiohttp.ClientSession(timeout=timeout) as s:
                await self.quiet(s)
            before = [usage(p.pid) for p in daemons]
            warm_reads, self.reads, self.latencies = self.reads, 0, []
            async with aiohttp.ClientSession(timeout=timeout) as s:
                start = time.monotonic()
                deadline = start + self.seconds
                watch = asyncio.create_task(self.watch_caches(s))
                await asyncio.gather(
                    *(
                        self.reader(s, deadline, random.Random(self.rng.random()))
                        for _ in range(READERS)
                    )
                )
                stopped = time.monotonic()
                watch.cancel()  # (it must not outlive the session it reads with)
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
                took = stopped - start
            async with aiohttp.ClientSession(timeout=timeout) as s:
                await self.quiet(s)
                after = [usage(p.pid) for p in daemons]
                # fds held a moment after the fetches end (a socket not closed yet, a
                # pool's idle connection) are not a leak; ones that stay are
                deadline = time.monotonic() + SETTLE
                while any(map(grown, before, after)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    after = [usage(p.pid) for p in daemons]
                settled = time.monotonic() - stopped
                kinds = [open_fds(p.pid) for p in daemons]
                evictions = int(await self.metric(s, "swarmcache_evictions_total"))
        finally:
            self.stop()
        lat = sorted(self.latencies)
        print(f"warm-up: {warm_reads} reads (not counted below but in the errors)")
        print(
            f"{self.reads} reads by {READERS} readers over {took:.0f}s on {HOSTS} hosts "
            f"({len(self.images)} images of 1-6 MiB, {CACHE_MIB} MiB caches); "
            f"{evictions} evictions; load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"errors: {len(self.errors)}; latency p50 {statistics.median(lat) * 1000:.0f} ms, "
            f"p99 {lat[int(0.99 * (len(lat) - 1))] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
        )
        print(
            "largest cache during the run: "
            + ", ".join(f"{b / MIB:.0f}" for b in self.peaks)
            + f" MiB (max_size {CACHE_MIB} MiB; images in use hold it over)"
        )
        print(f"measured {settled:.1f}s after the readers stopped (fetches ended, fds settled)")
        grew = []
        for i, ((rss0, fd0), (rss1, fd1)) in enumerate(zip(before, after, strict=True)):
            print(
                f"daemon {i}: RSS {rss0 / MIB:.0f} -> {rss1 / MIB:.0f} MiB, open fds {fd0} -> {fd1}"
            )
            if grown((rss0, fd0), (rss1, fd1)):
                grew.append(i)
                held = sorted(kinds[i].items(), key=lambda kv: -kv[1])
                print("  its fds:", ", ".join(f"{n} {kind}" for kind, n in held[:12]))
        for err in self.errors[:10]:
            print("  error:", err)
        if grew:
            print(f"daemons {grew} grew past the bound")
        return 1 if self.errors or grew else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--seconds", type=float, default=120.0, help="how long the readers run")
    p.add_argument("--seed", type=int, default=None, help="replay a run (printed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) and say where")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak seed {seed} (--seed {seed} replays the images and the readers' choices)")
    work = Path(tempfile.mkdtemp(prefix="swarmcache-soak-"))
    try:
        level = "info" if args.keep else "warning"
        return asyncio.run(Run(work, args.seconds, seed, level).main())
    finally:
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
