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

Usage: scripts/bench-glance [--size-mib 1024] [--runs 3] [--chunk-size 4MiB]
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


def main() -> int:
    """Run the benchmark and print its table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chunk-size", default="4MiB")
    args = p.parse_args()
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
