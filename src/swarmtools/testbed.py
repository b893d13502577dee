"""A multi-host network test bed: N hosts and an origin as network namespaces on one bridge.

Theory of operation. Every host (h1..hN) and the origin is a network namespace with one
interface, `eth0`, at `<subnet>.<n>/24`. Its veth peer sits in a "switch" namespace and
is a port of the bridge `br0` there, so the root namespace's network is never touched
and two test beds never see each other. There is no default route; a route
`224.0.0.0/4 dev eth0` lets multicast (mDNS on 224.0.0.251:5353) out, and the bridge
floods multicast (snooping off, STP off, forward delay 0) from the first packet on.
With `rate`, both ends of every veth get a tbf qdisc on egress: the host end limits
what the host sends, the switch end what it receives (this kernel has no netem, and
tbf on the sending side needs no ifb).

Processes run in a namespace with `ip netns exec`, each in its own process group, and
the bed stops every one it started when it closes, before it deletes its namespaces
(which takes every link with them). Needs root, iproute2 (`ip`, `tc`).

The helpers below the class start what the swarm tests and benchmarks share: the
demo origin server, one `swarmcache serve` per host with its config file.

    python -m swarmtools.testbed [--hosts N] [--rate R] [--image-size MiB]   (scripts/netns-swarm)
    python -m swarmtools.testbed --check | --cleanup-stale
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

DAEMON_PORT = 7480
ORIGIN_PORT = 8080
ORIGIN_OCTET = 2
FIRST_HOST_OCTET = 10  # h1 is <subnet>.11
MAX_HOSTS = 200
STOP_GRACE_S = 5.0
_NS_RE = re.compile(r"^sc(\d+)-\d+-(?:sw|o|h\d+|probe)$")
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_beds = itertools.count()

# Polls a URL from inside a namespace until it answers 2xx or the deadline passes.
_WAIT_HTTP = """
import ssl, sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
# https: a liveness probe of a daemon with mutual TLS (its certificate is not the point)
https = urllib.request.HTTPSHandler(context=ssl._create_unverified_context())
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), https)
while True:
    try:
        with opener.open(url, timeout=2) as r:
            r.read()
        sys.exit(0)
    except Exception as e:
        err = e
    if time.monotonic() > deadline:
        sys.exit(f"{url}: {err}")
    time.sleep(0.05)
"""
# One HTTP request from inside a namespace; the body goes to stdout.
_HTTP = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
req = urllib.request.Request(sys.argv[1], method=sys.argv[2])
with opener.open(req, timeout=float(sys.argv[3])) as r:
    sys.stdout.buffer.write(r.read())
"""
# One HTTP request from inside a namespace, any status: "<status>\n" then the body.
_HTTP_STATUS = """
import json, ssl, sys, urllib.error, urllib.request
handlers = [urllib.request.ProxyHandler({})]
if len(sys.argv) > 5:  # https: trust this CA, present this certificate (if any)
    tls = json.loads(sys.argv[5])
    ctx = ssl.create_default_context(cafile=tls["ca"])
    ctx.check_hostname = False
    if tls.get("cert"):
        ctx.load_cert_chain(tls["cert"], tls["key"])
    handlers.append(urllib.request.HTTPSHandler(context=ctx))
opener = urllib.request.build_opener(*handlers)
req = urllib.request.Request(sys.argv[1], method=sys.argv[2], headers=json.loads(sys.argv[4]))
try:
    with opener.open(req, timeout=float(sys.argv[3])) as r:
        status, body = r.status, r.read()
except urllib.error.HTTPError as err:
    status, body = err.code, err.read()
sys.stdout.buffer.write(str(status).encode() + b"\\n" + body)
"""


class TestbedError(RuntimeError):
    """A test bed step failed; the message names the command and what it printed."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class Host:
    """One machine of the bed: a namespace with `eth0` at `addr`."""

    name: str
    ns: str
    addr: str


def rate_bits_per_s(rate: str) -> float:
    """A tc rate such as "200mbit" in bits per second (tc's units are decimal)."""
    m = _RATE_RE.fullmatch(rate.strip().lower())
    if not m:
        raise ValueError(f"expected a rate such as 200mbit or 1gbit, not {rate!r}")
    bits = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if bits <= 0:
        raise ValueError(f"rate must be greater than zero, not {rate!r}")
    return bits


def tbf_args(rate: str) -> list[str]:
    """tc arguments of a tbf qdisc shaping to `rate`.

    The bucket holds 10 ms of traffic but at least 64 KiB, since a veth hands tbf GSO
    packets of up to 64 KiB and a packet bigger than the bucket is dropped; 50 ms of
    queue lets TCP fill the link (what scripts/bench_fetch.py measured at 1 Gbit/s).
    """
    burst = max(64 * 1024, int(rate_bits_per_s(rate) / 8 / 100))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


def _default_subnet() -> str:
    pid = os.getpid()
    return f"10.{128 + (pid >> 8) % 128}.{pid % 256}"


def _cmd(argv: Sequence[str], timeout: float = 30) -> str:
    """Run a setup command; TestbedError with its stderr if it fails."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TestbedError(f"{' '.join(argv)}: {err}") from err
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _netns_list() -> list[str]:
    out = _cmd(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_del(ns: str) -> None:
    subprocess.run(
        ["ip", "netns", "del", ns],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (main thread only) and deliver them afterwards.

    Cleanup that a second Ctrl-C interrupts would leave namespaces behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[signal.Signals] = []

    def note(signum: int, frame: FrameType | None) -> None:
        caught.append(signal.Signals(signum))

    saved: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, note)
        yield
    finally:
        for old, handler in saved.items():
            signal.signal(old, handler)
        if caught:
            signal.raise_signal(caught[0])


@functools.cache
def testbed_unavailable() -> str | None:
    """None if this process can build a test bed, else the reason why not."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    ns = f"sc{os.getpid()}-{next(_beds)}-probe"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb"],
        ["ip", "-n", ns, "link", "set", "va", "master", "br0"],
        ["tc", "-n", ns, "qdisc", "add", "dev", "vb", "root", *tbf_args("10mbit")],
        ["ip", "netns", "exec", ns, "true"],
    ]
    try:
        for step in steps:
            try:
                _cmd(step, timeout=10)
            except TestbedError as err:
                who = "" if os.geteuid() == 0 else " (not root)"
                return f"cannot build a network test bed{who}: {err}"
        return None
    finally:
        _netns_del(ns)


_NEIGH = Path("/proc/sys/net/ipv4/neigh/default")
_neigh_saved: dict[str, str] = {}  # gc_thresh values before the first open bed raised them
_neigh_beds = 0  # beds open that raised them


def _neigh_room(hosts: int) -> None:
    """Make room in the kernel's IPv4 neighbour table, which every namespace shares
    (default: 1024 entries): with 64 hosts answering each other over mDNS it fills,
    and the kernel then drops packets silently, for every bed on the machine, until
    entries age out (seen: mDNS quiet for 4 s, a later test's fetch hanging). The old
    values come back when the last bed closes."""
    global _neigh_beds
    need = 4 * hosts * hosts
    for name, share in (("gc_thresh1", 4), ("gc_thresh2", 2), ("gc_thresh3", 1)):
        path = _NEIGH / name
        try:
            old = path.read_text().strip()
            if int(old) < need // share:
                _neigh_saved.setdefault(name, old)
                path.write_text(str(need // share))
        except (OSError, ValueError):
            continue  # not Linux, or not allowed: the bed still works, smaller
    _neigh_beds += 1


def _neigh_release() -> None:
    global _neigh_beds
    _neigh_beds -= 1
    if not _neigh_beds:
        for name, old in _neigh_saved.items():
            with contextlib.suppress(OSError):
                (_NEIGH / name).write_text(old)
        _neigh_saved.clear()


class Testbed:
    """N hosts + an origin host as network namespaces on one Linux bridge."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        hosts: int,
        rate: str | None = None,
        subnet: str | None = None,
        prefix: str | None = None,
        stop_grace: float = STOP_GRACE_S,
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1..{MAX_HOSTS}, not {hosts}")
        if rate is not None:
            rate_bits_per_s(rate)  # fail before building anything
        subnet = (subnet or _default_subnet()).removesuffix(".0/24")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError(f"subnet wants three octets such as 10.77.0, not {subnet!r}")
        self.rate = rate
        self.subnet = subnet
        self.stop_grace = stop_grace  # close(): SIGTERM, this long, then SIGKILL
        self.prefix = prefix or f"sc{os.getpid()}-{next(_beds)}"
        self.switch_ns = f"{self.prefix}-sw"
        self.origin = Host("origin", f"{self.prefix}-o", f"{subnet}.{ORIGIN_OCTET}")
        self.hosts = [
            Host(f"h{i}", f"{self.prefix}-h{i}", f"{subnet}.{FIRST_HOST_OCTET + i}")
            for i in range(1, hosts + 1)
        ]
        # Switch-side veth end of each host: its names live in the switch namespace only.
        self._ports = {h.name: "v-o" if h is self.origin else f"v-{h.name}" for h in self.all}
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._open = False
        self._roomy = False  # this bed asked for room in the neighbour table

    @property
    def all(self) -> list[Host]:
        """The origin, then h1..hN."""
        return [self.origin, *self.hosts]

    def host(self, name: str) -> Host:
        """The host called `name` ("origin", "h1", ...)."""
        for h in self.all:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this bed makes (made or not yet)."""
        return [self.switch_ns, *(h.ns for h in self.all)]

    def __enter__(self) -> Testbed:
        if self._open or self._made:
            raise TestbedError("the test bed is already open")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _netns_add(self, ns: str) -> None:
        _cmd(["ip", "netns", "add", ns])
        self._made.append(ns)

    def _build(self) -> None:
        _neigh_room(len(self.all))
        self._roomy = True
        sw = self.switch_ns
        self._netns_add(sw)
        _cmd(["ip", "-n", sw, "link", "set", "lo", "up"])
        bridge = ["stp_state", "0", "forward_delay", "0", "mcast_snooping", "0"]
        _cmd(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", *bridge])
        _cmd(["ip", "-n", sw, "link", "set", "br0", "up"])
        for h in self.all:
            port = self._ports[h.name]
            self._netns_add(h.ns)
            # Both ends are born in their namespaces: the root namespace never sees them.
            peer = ["peer", "name", "eth0", "netns", h.ns]
            _cmd(["ip", "-n", sw, "link", "add", port, "type", "veth", *peer])
            _cmd(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _cmd(["ip", "-n", sw, "link", "set", port, "up"])
            _cmd(["ip", "-n", h.ns, "link", "set", "lo", "up"])
            _cmd(["ip", "-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0"])
            _cmd(["ip", "-n", h.ns, "link", "set", "eth0", "multicast", "on", "up"])
            _cmd(["ip", "-n", h.ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])
            if self.rate is not None:
                tbf = tbf_args(self.rate)
                _cmd(["tc", "-n", h.ns, "qdisc", "add", "dev", "eth0", "root", *tbf])
                _cmd(["tc", "-n", sw, "qdisc", "add", "dev", port, "root", *tbf])

    def close(self) -> None:
        """Stop every process the bed started, delete its namespaces and links; idempotent."""
        with _signals_deferred():
            self._open = False
            with contextlib.suppress(Exception):  # close never raises; namespaces go next
                self._stop_all()
            while self._made:
                _netns_del(self._made.pop())
            if self._roomy:
                self._roomy = False
                _neigh_release()

    def _stop_all(self) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.poll() is None:
                _killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            self._sweep(p)
        self._procs.clear()

    def _sweep(self, proc: subprocess.Popen[Any]) -> None:
        """SIGKILL what is left of a stopped process's group (children it left behind)."""
        if proc.returncode is not None:
            _killpg(proc.pid, signal.SIGKILL)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def exec_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` in `host`'s namespace."""
        return ["ip", "netns", "exec", host.ns, *argv]

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start `argv` in `host`'s namespace, in its own process group; close() stops it."""
        if not self._open:
            raise TestbedError("the test bed is not open")
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            self.exec_argv(host, argv), start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc

    def run(
        self,
        host: Host,
        argv: Sequence[str],
        timeout: float = 60,
        *,
        input: str | None = None,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in `host`'s namespace to the end (killed after `timeout` s); text out."""
        done: subprocess.CompletedProcess[str] = self.communicate(
            host, argv, timeout, input=input, text=True, **kwargs
        )
        if check:
            done.check_returncode()
        return done

    def communicate(
        self, host: Host, argv: Sequence[str], timeout: float, input: Any = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """run() for any Popen arguments (e.g. text=False); output captured unless redirected."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
        proc: subprocess.Popen[Any] = self.popen(host, argv, stdin=stdin, **kwargs)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            self.stop(proc, signal.SIGKILL, 5)
            raise
        self._forget(proc)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def drop_randomly(self, percent: int) -> None:
        """Drop `percent`% of the packets every namespace of the bed receives, at random
        (nftables `numgen random`; this kernel has no netem), until the bed closes."""
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be 0..100, not {percent}")
        rules = (
            "table inet swarmcache_loss {\n"
            "  chain input { type filter hook input priority 0; policy accept;\n"
            f"    numgen random mod 100 < {percent} drop\n"
            "  }\n"
            "}\n"
        )
        for h in self.all:
            done = self.run(h, ["nft", "-f", "-"], input=rules)
            if done.returncode != 0:
                raise TestbedError(f"nft in {h.name}: {done.stderr.strip()}")

    def stop(
        self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10
    ) -> int | None:
        """Stop one process the bed started (its group: `sig`, then SIGKILL); its exit status."""
        if proc not in self._procs:
            raise TestbedError(f"pid {proc.pid} was not started by this test bed")
        if proc.poll() is None:
            _killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self._sweep(proc)
        if proc.returncode is not None:
            self._forget(proc)
        return proc.returncode

    def _forget(self, proc: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        """Processes started and not yet stopped."""
        return list(self._procs)

    def set_link(self, host: Host, up: bool) -> None:
        """Take a host's link down or up at the switch (a dead peer; its addresses stay)."""
        _cmd(
            [
                "ip",
                "-n",
                self.switch_ns,
                "link",
                "set",
                self._ports[host.name],
                "up" if up else "down",
            ]
        )

    def link_bytes(self, host: Host) -> tuple[int, int]:
        """(received, sent) bytes counted on the host's eth0 so far."""
        out = _cmd(["ip", "-n", host.ns, "-j", "-s", "link", "show", "dev", "eth0"])
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])


# --- helpers shared by tests, scripts/netns-swarm and scripts/bench-fanout -------------


def python_argv(*args: str) -> list[str]:
    """`python ...` with this interpreter (the venv's, which has swarmcache)."""
    return [sys.executable, *args]


def wait_http(
    bed: Testbed,
    host: Host,
    url: str,
    timeout: float = 30,
    proc: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> None:
    """Wait until `url` answers 2xx from inside `host`; fail early if `proc` exits."""
    waiter = bed.popen(
        host,
        python_argv("-c", _WAIT_HTTP, url, str(timeout)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout + 10
    try:
        while waiter.poll() is None:
            if proc is not None and proc.poll() is not None:
                raise TestbedError(
                    f"exited with {proc.returncode} before {url} answered" + _tail(log)
                )
            if time.monotonic() > deadline:
                raise TestbedError(f"{url} did not answer within {timeout:.0f} s" + _tail(log))
            time.sleep(0.05)
        if waiter.returncode != 0:
            assert waiter.stderr is not None
            raise TestbedError(waiter.stderr.read().decode(errors="replace").strip() + _tail(log))
    finally:
        bed.stop(waiter, signal.SIGKILL, 5)


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log}:\n" + "\n".join(text)


def http_request(
    bed: Testbed, host: Host, url: str, method: str = "GET", timeout: float = 30
) -> bytes:
    """One HTTP request from inside `host` (Python's urllib, no proxy); the body."""
    argv = python_argv("-c", _HTTP, url, method, str(timeout))
    done = bed.communicate(host, argv, timeout + 10)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-500:]
        raise TestbedError(f"{method} {url} from {host.name}: {err}")
    body: bytes = done.stdout
    return body


def http_status(
    bed: Testbed,
    host: Host,
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
    tls: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP request from inside `host` with `headers`: (status, body), any status.
    `tls` (an https URL): {"ca": path, "cert": path, "key": path}, the cert optional."""
    args = [url, method, str(timeout), json.dumps(headers or {})]
    if tls is not None:
        args.append(json.dumps(dict(tls)))
    argv = python_argv("-c", _HTTP_STATUS, *args)
    done = bed.communicate(host, argv, timeout + 10)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-500:]
        raise TestbedError(f"{method} {url} from {host.name}: {err}")
    status, _, body = done.stdout.partition(b"\n")
    return int(status), body


def make_image(path: Path, size_mib: int) -> str:
    """Write `size_mib` MiB of random bytes and its `.sha256` sidecar; return the sha256."""
    h = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size_mib):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    path.with_name(path.name + ".sha256").write_text(f"{h.hexdigest()}  {path.name}\n")
    return h.hexdigest()


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file, None if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(4 << 20):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def origin_url(bed: Testbed, port: int = ORIGIN_PORT) -> str:
    """The `origin.url` template for an origin server in the bed's origin host."""
    return f"http://{bed.origin.addr}:{port}/images/{{image_id}}"


def start_origin(
    bed: Testbed,
    root: Path,
    port: int = ORIGIN_PORT,
    log: Path | None = None,
    timeout: float = 30,
) -> subprocess.Popen[bytes]:
    """Start `swarmtools.origin_server` serving `root` in the origin host; wait for it."""
    argv = python_argv(
        "-m", "swarmtools.origin_server", str(root), "--listen", f"{bed.origin.addr}:{port}"
    )
    proc = _start_logged(bed, bed.origin, argv, log)
    wait_http(bed, bed.origin, f"http://{bed.origin.addr}:{port}/_stats", timeout, proc, log)
    return proc


def origin_stats(bed: Testbed, port: int = ORIGIN_PORT) -> dict[str, Any]:
    """The origin server's /_stats (bytes it sent per path)."""
    body = http_request(bed, bed.origin, f"http://{bed.origin.addr}:{port}/_stats")
    stats: dict[str, Any] = json.loads(body)
    return stats


def reset_origin_stats(bed: Testbed, port: int = ORIGIN_PORT) -> None:
    """Zero the origin server's byte counters."""
    http_request(bed, bed.origin, f"http://{bed.origin.addr}:{port}/_stats/reset", "POST")


def host_config(
    host: Host,
    cache_dir: Path,
    origin: str,
    port: int = DAEMON_PORT,
    extra: Mapping[str, Mapping[str, object]] | None = None,
) -> dict[str, dict[str, object]]:
    """Config sections of one host's daemon; `extra` sections/keys are merged over them.

    E.g. extra={"discovery": {"mdns": True}, "cache": {"chunk_size": "4MiB"}}.
    """
    sections: dict[str, dict[str, object]] = {
        "daemon": {"listen": f"0.0.0.0:{port}", "advertise": host.addr},
        "cache": {"dir": str(cache_dir), "max_size": "100GiB"},
        "origin": {"url": origin},
    }
    for name, keys in (extra or {}).items():
        sections.setdefault(name, {}).update(keys)
    return sections


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def write_toml(path: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    """Write config sections (str, int, float, bool and list values) as a TOML file."""
    lines: list[str] = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without SWARMCACHE_* variables, which would override the file,
    plus `extra` (e.g. a test-only SWARMCACHE_TEST_* fault switch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMCACHE_")}
    return {**env, **(extra or {})}


def start_daemon(
    bed: Testbed,
    host: Host,
    config: Path,
    port: int = DAEMON_PORT,
    log: Path | None = None,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
    scheme: str = "http",
) -> subprocess.Popen[bytes]:
    """Start `swarmcache serve` with `config` in `host` and wait until /healthz answers
    (`scheme` "https": a daemon with mutual TLS)."""
    proc = spawn_daemon(bed, host, config, log, env)
    wait_daemon(bed, host, proc, port, log, timeout, scheme)
    return proc


def spawn_daemon(
    bed: Testbed,
    host: Host,
    config: Path,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `swarmcache serve` with `config` in `host` without waiting for it (`env`:
    variables to add to its environment). With SWARMTOOLS_CPROFILE=DIR in this process's
    environment the daemon runs under cProfile and writes DIR/<host>.prof when it stops
    (for benchmarks: call counts per block, where a sampling profiler shows only time)."""
    profile = os.environ.get("SWARMTOOLS_CPROFILE")
    wrap = ("-m", "cProfile", "-o", f"{profile}/{host.name}.prof") if profile else ()
    argv = python_argv(*wrap, "-m", "swarmcache", "--config", str(config), "serve")
    return _start_logged(bed, host, argv, log, env=daemon_env(env))


def wait_daemon(
    bed: Testbed,
    host: Host,
    proc: subprocess.Popen[Any],
    port: int = DAEMON_PORT,
    log: Path | None = None,
    timeout: float = 30,
    scheme: str = "http",
) -> None:
    """Wait until the daemon in `host` answers /healthz (fails if it exits first)."""
    wait_http(bed, host, f"{scheme}://127.0.0.1:{port}/healthz", timeout, proc, log)


def _start_logged(
    bed: Testbed,
    host: Host,
    argv: list[str],
    log: Path | None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    out: IO[bytes] | int = subprocess.DEVNULL
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115 - handed to the child, closed right after
    try:
        return bed.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    finally:
        if not isinstance(out, int):
            out.close()


# --- command line (scripts/netns-swarm) ------------------------------------------------


def cleanup_stale() -> list[str]:
    """Delete the namespaces of test beds whose process is gone; the names deleted."""
    gone = []
    for ns in _netns_list():
        m = _NS_RE.match(ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _netns_del(ns)
            gone.append(ns)
    return gone


def _swarm(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="swarmcache-netns-"))
    try:
        with Testbed(args.hosts, rate=args.rate) as bed:
            return _run_swarm(bed, work, args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run_swarm(bed: Testbed, work: Path, args: argparse.Namespace) -> int:
    image = work / "origin" / args.image_id
    print(f"making a {args.image_size} MiB image {args.image_id} ...", flush=True)
    sha = make_image(image, args.image_size)
    start_origin(bed, image.parent, log=work / "origin.log")
    extra: dict[str, dict[str, object]] = {"daemon": {"log_level": args.log_level}}
    if args.chunk_size:
        extra["cache"] = {"chunk_size": args.chunk_size}
    if not args.no_discovery:
        extra["discovery"] = {"mdns": True}
    daemons = {}
    for h in bed.hosts:
        sections = host_config(h, work / h.name / "cache", origin_url(bed), extra=extra)
        if args.no_discovery:
            sections["daemon"].pop("advertise", None)
        config = write_toml(work / h.name / "swarmcache.toml", sections)
        daemons[h.name] = spawn_daemon(bed, h, config, work / h.name / "daemon.log")
    for h in bed.hosts:
        wait_daemon(bed, h, daemons[h.name], log=work / h.name / "daemon.log")

    rate = f", every link shaped to {bed.rate} both ways" if bed.rate else ""
    print(f"\nswarm up: {len(bed.hosts)} hosts + origin on bridge br0 in {bed.switch_ns}{rate}")
    print(f"{'host':8} {'address':16} namespace")
    for h in bed.all:
        print(f"{h.name:8} {h.addr:16} {h.ns}")
    h1 = bed.hosts[0]
    o = bed.origin
    print(f"\nimage {args.image_id}: {args.image_size} MiB, sha256 {sha}")
    print(f"origin: http://{o.addr}:{ORIGIN_PORT}/images/{args.image_id}  (log {work}/origin.log)")
    print(f"daemons: 0.0.0.0:{DAEMON_PORT} in each host; config and log in {work}/<host>/")
    print("\ntry:")
    url = f"http://127.0.0.1:{DAEMON_PORT}/v1/images/{args.image_id}"
    print(f"  ip netns exec {h1.ns} curl -s --noproxy '*' {url} | sha256sum")
    print(f"  ip netns exec {h1.ns} curl -s --noproxy '*' {url}/status")
    print(
        f"  ip netns exec {h1.ns} {sys.executable} -m swarmcache --daemon "
        f"http://127.0.0.1:{DAEMON_PORT} ls"
    )
    print(f"  ip netns exec {o.ns} curl -s --noproxy '*' http://{o.addr}:{ORIGIN_PORT}/_stats")
    print(f"  ip netns exec {h1.ns} bash      # a shell on h1")
    limit = "until Ctrl-C" if args.duration is None else f"for {args.duration:.0f} s"
    print(f"\nrunning {limit}; Ctrl-C stops everything and deletes the namespaces", flush=True)
    deadline = time.monotonic() + (args.duration if args.duration is not None else 7 * 86400)
    reported: set[str] = set()
    while time.monotonic() < deadline:
        for name, proc in daemons.items():
            if proc.poll() is not None and name not in reported:
                reported.add(name)
                print(
                    f"{name}: daemon exited with {proc.returncode} (log {work}/{name}/daemon.log)",
                    flush=True,
                )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Bring up a swarm of daemons in namespaces until Ctrl-C (scripts/netns-swarm)."""
    p = argparse.ArgumentParser(
        prog="netns-swarm",
        description="Build a test bed (hosts + origin as network namespaces on one bridge), "
        "serve an image from the origin, run one swarmcache daemon per host; Ctrl-C ends it.",
    )
    p.add_argument("--hosts", type=int, default=3, help="number of hosts (default %(default)s)")
    p.add_argument("--rate", help="shape every link both ways with tbf, e.g. 200mbit")
    p.add_argument(
        "--image-size",
        type=int,
        default=64,
        metavar="MiB",
        help="size of the origin's image (default %(default)s)",
    )
    p.add_argument("--image-id", default="test-image", help="(default %(default)s)")
    p.add_argument("--chunk-size", help="cache.chunk_size of the daemons, e.g. 4MiB")
    p.add_argument("--log-level", default="info", help="daemon.log_level (default %(default)s)")
    p.add_argument(
        "--no-discovery",
        action="store_true",
        help="write no [discovery] section and no daemon.advertise",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--check", action="store_true", help="only say whether a bed can be built")
    p.add_argument(
        "--cleanup-stale",
        action="store_true",
        help="delete namespaces left by test beds whose process died",
    )
    args = p.parse_args(argv)
    if args.cleanup_stale:
        gone = cleanup_stale()
        print("deleted: " + (" ".join(gone) if gone else "nothing"))
        return 0
    reason = testbed_unavailable()
    if args.check or reason:
        print(reason or "ok: a test bed can be built here", file=sys.stderr if reason else None)
        return 1 if reason else 0
    # SIGTERM ends the run like Ctrl-C, and Ctrl-C works even when started in the
    # background (which ignores SIGINT), so the namespaces are always deleted.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _swarm(args)
    except KeyboardInterrupt:
        print("\nstopped; namespaces deleted", file=sys.stderr)
        return 130
    except TestbedError as err:
        print(f"netns-swarm: {err}", file=sys.stderr)
        return 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
