"""Glance origin benchmark (run through scripts/bench-glance): one host, a real Glance.

Every figure comes from the same run, on this machine's loopback:
  G  curl of the image from Glance -> /dev/null   what Glance and loopback allow
  H  sha512sum of the image file                 what a check after the transfer costs
  N  glance image-download --file F               nova-compute's way: glanceclient writes
                                                 the file and checks sha512 itself
  S  swarmcache: GET /v1/images/ID -> /dev/null   cache empty, Glance as the origin
     transfer: from the request until every chunk is on disk (status bytes == size)
     tail:     from then until the image is complete (sha512 matched, durable)
The sha512 runs as chunks land, so the tail should be a small fraction of H.
Status is polled every 10 ms, so tail figures carry +-10 ms. Load average printed.

With --hosts N (root): N hosts and the origin as network namespaces on a bridge, every
link shaped to --rate, Glance in the origin's namespace:
  D  every host downloads the image from Glance at once (curl)   no swarmcache
  W  every host reads it through its own daemon at once           swarmcache, mDNS on
  time until the last host is done, against the physical limit size / rate (each
  host's own link), and the copies Glance sent (its request log)

Usage: scripts/bench-glance [--size-mib 1024] [--runs 3] [--chunk-size 4MiB]
                            [--hosts N --rate 1gbit]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from swarmtools import testbed as tb
from swarmtools.glance import GlanceServer

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(argv: list[str]) -> float:
    """Seconds `argv` took (it must succeed)."""
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return time.monotonic() - t0


def status(base: str, image_id: str) -> dict[str, object]:
    """The daemon's status of an image ({} while it has none)."""
    try:
        with urllib.request.urlopen(f"{base}/v1/images/{image_id}/status", timeout=10) as r:
            body: dict[str, object] = json.load(r)
            return body
    except urllib.error.HTTPError:
        return {}


def one_fetch(
    glance: GlanceServer, image_id: str, size: int, chunk: str, work: Path
) -> dict[str, float]:
    """A cold fetch through a fresh daemon: transfer and tail seconds."""
    port = free_port()
    cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    config = work / "daemon.toml"
    config.write_text(
        f'[daemon]\nlisten = "127.0.0.1:{port}"\n[cache]\ndir = "{cache}"\n'
        f'chunk_size = "{chunk}"\nmax_size = "100GiB"\n[discovery]\nmdns = false\n'
        f'[origin]\nkind = "glance"\nurl = "{glance.url}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMCACHE_")}
    log = open(work / "daemon.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmcache", "--config", str(config), "serve"],
        stdout=log,
        stderr=log,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        t0 = time.monotonic()
        reader = threading.Thread(
            target=lambda: subprocess.run(
                ["curl", "-sf", "-o", "/dev/null", f"{base}/v1/images/{image_id}"],
                check=True,
                timeout=600,
            )
        )
        reader.start()
        landed = done = None
        deadline = t0 + 600
        while time.monotonic() < deadline:
            st = status(base, image_id)
            now = time.monotonic()
            if landed is None and st.get("bytes") == size:
                landed = now
            if st.get("state") == "complete":
                done = now
                landed = landed or now
                break
            if st.get("state") == "failed":
                raise RuntimeError(f"fetch failed: {st}")
            time.sleep(0.01)
        reader.join(600)
        if landed is None or done is None:
            raise RuntimeError("the fetch did not end in 600 s")
        ticks = os.sysconf("SC_CLK_TCK")
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return {"transfer": landed - t0, "tail": done - landed, "total": done - t0, "cpu": cpu}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
        subprocess.run(["rm", "-rf", str(cache)], check=False)


def swarm_bench(args: argparse.Namespace) -> int:
    """N hosts at once: straight from Glance, then through their daemons."""
    size = args.size_mib * 1024 * 1024
    limit = size * 8 / tb.rate_bits_per_s(args.rate)
    rows: list[tuple[str, list[float], list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-glance-") as tmp:
        work = Path(args.keep or tmp)
        image = work / "image"
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1024 * 1024))
        with (
            tb.Testbed(args.hosts, rate=args.rate) as bed,
            GlanceServer(
                host=bed.origin.addr, port=9292, netns=bed.origin.ns, workdir=work / "glance"
            ) as glance,
        ):
            meta = glance.create_image_from_file(image)
            image.unlink()
            image_id = meta["id"]
            file_url = f"{glance.url}/v2/images/{image_id}/file"
            direct: list[float] = []
            direct_copies: list[float] = []
            for _ in range(args.runs):
                before = glance.data_bytes_sent(image_id)
                direct.append(all_at_once(bed, ["curl", "-sf", "-o", "/dev/null", file_url]))
                direct_copies.append((glance.data_bytes_sent(image_id) - before) / size)
            rows.append(("D every host from Glance", direct, direct_copies))
            swarm: list[float] = []
            swarm_copies: list[float] = []
            for run in range(args.runs):
                procs = start_daemons(bed, glance, work / f"run{run}", args.chunk_size)
                before = glance.data_bytes_sent(image_id)
                api = f"http://127.0.0.1:{tb.DAEMON_PORT}/v1/images/{image_id}"
                swarm.append(all_at_once(bed, ["curl", "-sf", "-o", "/dev/null", api]))
                swarm_copies.append((glance.data_bytes_sent(image_id) - before) / size)
                for proc in procs:
                    bed.stop(proc)
            rows.append(("W every host through swarmcache", swarm, swarm_copies))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{args.hosts} hosts, image {args.size_mib} MiB, links {args.rate}, chunk "
        f"{args.chunk_size}, runs {args.runs}, load {load}; limit size/rate {limit:.2f} s"
    )
    for name, times, copies in rows:
        shown = " ".join(f"{t:7.2f}" for t in times)
        med = sorted(times)[len(times) // 2]
        print(
            f"{name:34} {shown} s  median {med:.2f} s = {med / limit:.2f}x limit, "
            f"Glance sent {' '.join(f'{c:.3f}' for c in copies)} copies"
        )
    return 0


def all_at_once(bed: tb.Testbed, argv: list[str]) -> float:
    """Seconds until `argv` ended on every host, all started together."""
    t0 = time.monotonic()
    procs = [bed.popen(h, argv) for h in bed.hosts]
    for proc in procs:
        if proc.wait(timeout=900) != 0:
            raise RuntimeError(f"{proc.args} failed with {proc.returncode}")
    return time.monotonic() - t0


def start_daemons(
    bed: tb.Testbed, glance: GlanceServer, work: Path, chunk: str
) -> list[subprocess.Popen[bytes]]:
    """A fresh daemon on every host (mDNS on), once they all see each other."""
    procs = []
    for h in bed.hosts:
        sections = tb.host_config(
            h,
            work / h.name / "cache",
            glance.url,
            extra={
                "origin": {"kind": "glance", "url": glance.url},
                "discovery": {"mdns": True},
                "cache": {"chunk_size": chunk},
            },
        )
        config = tb.write_toml(work / f"{h.name}.toml", sections)
        procs.append(tb.start_daemon(bed, h, config, log=work / f"{h.name}.log"))
    want = len(bed.hosts) - 1
    deadline = time.monotonic() + 60
    for h in bed.hosts:
        while True:
            peers = json.loads(
                tb.http_request(bed, h, f"http://127.0.0.1:{tb.DAEMON_PORT}/v1/peers")
            )
            if sum(p["state"] == "ok" for p in peers["peers"]) >= want:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{h.name} did not discover the others in 60 s")
            time.sleep(0.2)
    return procs


def main() -> int:
    """Run the benchmark and print its table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chunk-size", default="4MiB")
    p.add_argument("--hosts", type=int, default=0, help="N hosts in network namespaces")
    p.add_argument("--rate", default="1gbit", help="with --hosts: every link's rate")
    p.add_argument("--keep", metavar="DIR", help="with --hosts: work (logs) in DIR, kept")
    args = p.parse_args()
    if args.hosts:
        return swarm_bench(args)
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="bench-glance-") as tmp:
        work = Path(tmp)
        image = work / "image"
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1024 * 1024))
        with GlanceServer(workdir=work / "glance") as glance:
            meta = glance.create_image_from_file(image)
            image_id = meta["id"]
            rows: list[tuple[str, list[float]]] = []
            g = [
                timed(["curl", "-sf", "-o", "/dev/null", f"{glance.url}/v2/images/{image_id}/file"])
                for _ in range(args.runs)
            ]
            h = [timed(["sha512sum", str(image)]) for _ in range(args.runs)]
            cli = Path(sys.executable).with_name("glance")
            n = [
                timed(
                    [
                        str(cli),
                        "--os-image-url",
                        glance.url,
                        "--os-auth-token",
                        "x",
                        "--os-image-api-version",
                        "2",
                        "image-download",
                        "--file",
                        str(work / "nova-copy"),
                        image_id,
                    ]
                )
                for _ in range(args.runs)
            ]
            (work / "nova-copy").unlink()
            runs = [
                one_fetch(glance, image_id, size, args.chunk_size, work) for _ in range(args.runs)
            ]
            rows = [
                ("G curl from Glance", g),
                ("H sha512sum of the file", h),
                ("S transfer (request -> all chunks on disk)", [r["transfer"] for r in runs]),
                ("S tail (all on disk -> complete)", [r["tail"] for r in runs]),
                ("S total", [r["total"] for r in runs]),
                ("S daemon CPU seconds (user + system)", [r["cpu"] for r in runs]),
                ("N glance image-download (nova's way)", n),
            ]
    load = os.getloadavg()
    loads = " ".join(f"{x:.2f}" for x in load)
    print(f"image {args.size_mib} MiB, chunk {args.chunk_size}, runs {args.runs}, load {loads}")
    for name, values in rows:
        shown = " ".join(f"{v:7.3f}" for v in values)
        print(f"{name:45} {shown}  s   median {sorted(values)[len(values) // 2]:.3f}")
    med = {name: sorted(v)[len(v) // 2] for name, v in rows}
    tail, check = med["S tail (all on disk -> complete)"], med["H sha512sum of the file"]
    print(f"tail / sha512sum: {tail / check:.3f}")
    print(f"total / curl from Glance: {med['S total'] / med['G curl from Glance']:.3f}")
    nova = med["N glance image-download (nova's way)"]
    print(f"total / glance image-download: {med['S total'] / nova:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
