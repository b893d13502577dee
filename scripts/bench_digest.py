"""What the chunk digest costs (run through scripts/bench-digest).

For each of `security.chunk_digest` = xxh3, blake3, sha256, in the same run:
  hash   the digest alone: digest_blocks over 4 MiB chunks of 256 KiB blocks in
         memory, one core (GB/s)
  fetch  the whole pipeline on loopback: daemon A fetches the image from an origin,
         then daemon B fetches it from A (every block hashed on arrival, every chunk
         read back and hashed again when sealed, the whole image hashed against the
         origin's sha256); B's wall time and CPU seconds per GiB (user + system, from
         /proc), and A's CPU per GiB for the origin fetch
plus two rows with peer authentication on top of blake3: `+secret` (a cluster
secret: every request and answer HMAC-signed) and `+tls` (mutual TLS: every peer
connection encrypted, blocks sent without sendfile); and, as the baseline of the
same run, curl of the image from the origin into /dev/null (the loopback's own
cost) and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROWS = (("xxh3", ""), ("blake3", ""), ("sha256", ""), ("blake3", "secret"), ("blake3", "tls"))
MIB = 1024 * 1024
CONTEXT: ssl.SSLContext | None = None  # the bench's own https client (set with the certs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def urlopen(url: str | urllib.request.Request, timeout: float) -> Any:
    return urllib.request.urlopen(url, timeout=timeout, context=CONTEXT)


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def hash_rate(algo: str, seconds: float = 2.0) -> float:
    from swarmcache.manifest import digest_blocks

    chunk = os.urandom(4 * MIB)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        digest_blocks([chunk], 256 * 1024, algo)
        done += len(chunk)
    return done / (time.perf_counter() - t0) / 1e9


class Daemon:
    def __init__(
        self, work: Path, name: str, origin: str, algo: str, peers: list[str], auth: str
    ) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if auth == 'tls' else 'http'}://{self.addr}"
        config = work / f"{name}.toml"
        static = ", ".join(f'"{p}"' for p in peers)
        certs = work.parent / "certs"
        security = {
            "": "",
            "secret": f'cluster_secret_file = "{certs / "secret"}"\n',
            "tls": f'tls_cert = "{certs / "h.pem"}"\ntls_key = "{certs / "h.key"}"\n'
            f'tls_ca = "{certs / "ca.pem"}"\n',
        }[auth]
        config.write_text(
            f'[daemon]\nlisten = "127.0.0.1:{self.port}"\nlog_level = "warning"\n'
            f'[cache]\ndir = "{work / name}"\nmax_size = "64GiB"\n'
            f'[origin]\nurl = "{origin}"\n'
            f"[discovery]\nmdns = false\nstatic_peers = [{static}]\n"
            f'[security]\nchunk_digest = "{algo}"\n{security}'
        )
        self.log = open(work / f"{name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarmcache", "--config", str(config), "serve"],
            stdout=self.log,
            stderr=self.log,
            env={k: v for k, v in os.environ.items() if not k.startswith("SWARMCACHE_")},
        )
        wait_http(self.url + "/healthz")

    def fetch(self, image: str) -> None:
        req = urllib.request.Request(f"{self.url}/v1/images/{image}/fetch?wait=600", method="POST")
        with urlopen(req, timeout=700) as resp:
            body = json.load(resp)
        if body.get("state") != "complete":
            raise RuntimeError(f"fetch did not complete: {body}")

    def peers_ok(self) -> bool:
        with urlopen(self.url + "/v1/peers", timeout=5) as resp:
            return any(p["state"] == "ok" for p in json.load(resp)["peers"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def pipeline(work: Path, origin: str, algo: str, auth: str, size: int) -> dict[str, float]:
    run = Path(tempfile.mkdtemp(dir=work, prefix=f"{algo}-"))
    a = Daemon(run, "a", origin, algo, [], auth)
    b = None
    try:
        c0 = cpu_seconds(a.proc.pid)
        a.fetch("img")
        a_cpu = cpu_seconds(a.proc.pid) - c0
        b = Daemon(run, "b", origin, algo, [a.addr], auth)
        deadline = time.monotonic() + 30
        while not b.peers_ok():
            if time.monotonic() > deadline:
                raise RuntimeError("b never saw a")
            time.sleep(0.1)
        c0, t0 = cpu_seconds(b.proc.pid), time.perf_counter()
        b.fetch("img")
        wall = time.perf_counter() - t0
        b_cpu = cpu_seconds(b.proc.pid) - c0
    finally:
        a.stop()
        if b is not None:
            b.stop()
        shutil.rmtree(run, ignore_errors=True)
    gib = size / 1024**3
    return {"a_cpu_per_gib": a_cpu / gib, "b_cpu_per_gib": b_cpu / gib, "b_wall": wall}


def make_certs(folder: Path) -> None:
    """A cluster secret, a CA and one certificate both daemons use (for +secret, +tls)."""
    global CONTEXT
    from swarmtools.certs import make_ca, write_ca, write_host

    folder.mkdir()
    (folder / "secret").write_text(os.urandom(24).hex() + "\n")
    ca = make_ca()
    files = write_host(ca, write_ca(ca, folder / "ca.pem"), folder, "h", ("127.0.0.1",))
    CONTEXT = ssl.create_default_context(cafile=str(files.ca))
    CONTEXT.check_hostname = False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("size_mib", nargs="?", type=int, default=512, help="image size (MiB)")
    p.add_argument("runs", nargs="?", type=int, default=3, help="runs per algorithm (median)")
    args = p.parse_args()
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="swarmcache-bench-digest-"))
    origin_proc = None
    try:
        images = work / "images"
        images.mkdir()
        with open(images / "img", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        import hashlib

        h = hashlib.sha256()
        with open(images / "img", "rb") as f:
            while block := f.read(8 * MIB):
                h.update(block)
        (images / "img.sha256").write_text(f"{h.hexdigest()}  img\n")
        port = free_port()
        origin_proc = subprocess.Popen(
            [sys.executable, "-m", "swarmtools.origin_server", str(images), "--listen",
             f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        origin = f"http://127.0.0.1:{port}/images/{{image_id}}"
        wait_http(f"http://127.0.0.1:{port}/images/img.sha256")
        curl = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(
                ["curl", "-sS", "-f", "-o", "/dev/null", origin.replace("{image_id}", "img")],
                check=True,
            )
            curl.append(time.perf_counter() - t0)
        print(f"image {args.size_mib} MiB, {args.runs} runs per algorithm (median), loopback")
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
        print(f"baseline curl origin -> /dev/null: {statistics.median(curl):.2f} s")
        print()
        print(
            f"{'digest':13} {'hash GB/s':>9} {'B wall s':>9} {'B/curl':>7} "
            f"{'B CPU s/GiB':>12} {'A CPU s/GiB':>12}"
        )
        make_certs(work / "certs")
        for algo, auth in ROWS:
            rate = hash_rate(algo)
            runs = [pipeline(work, origin, algo, auth, size) for _ in range(args.runs)]
            wall = statistics.median(r["b_wall"] for r in runs)
            b_cpu = statistics.median(r["b_cpu_per_gib"] for r in runs)
            a_cpu = statistics.median(r["a_cpu_per_gib"] for r in runs)
            name = algo + ("+" + auth if auth else "")
            print(
                f"{name:13} {rate:9.2f} {wall:9.2f} {wall / statistics.median(curl):7.2f} "
                f"{b_cpu:12.2f} {a_cpu:12.2f}",
                flush=True,
            )
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    finally:
        if origin_proc is not None:
            origin_proc.terminate()
            origin_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
