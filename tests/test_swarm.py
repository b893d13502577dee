"""The swarm across real hosts: each daemon in its own network namespace on a bridge.

mDNS works between them as on a LAN. Every test starts its own daemons (fresh cache
directories, its own image) on one shared bed of hosts and stops them at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import metric, need_testbed
from swarmtools.testbed import (
    Host,
    Testbed,
    TestbedError,
    file_sha256,
    host_config,
    http_request,
    make_image,
    origin_stats,
    origin_url,
    python_argv,
    start_daemon,
    start_origin,
    tbf_args,
    write_toml,
)

HOSTS = 6
MIB = 1024 * 1024
API = "http://127.0.0.1:7480"
# every test daemon's API token ([security] api_token_file): watchers polling the
# daemons from another namespace are callers on other hosts
API_TOKEN = "the test bed's API token, 16+ bytes"


@pytest.fixture(scope="module")
def swarm_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, Path]]:
    """Six hosts and an origin (serving the module's image directory), unshaped."""
    need_testbed()
    work = tmp_path_factory.mktemp("swarm")
    (work / "images").mkdir()
    with Testbed(HOSTS) as bed:
        start_origin(bed, work / "images", log=work / "origin.log")
        yield bed, work


class Swarm:
    """The daemons one test started; stopped (by PID, through the bed) at the end."""

    def __init__(self, bed: Testbed, work: Path, name: str) -> None:
        self.bed = bed
        self.work = work / name
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, host: Host, env: dict[str, str] | None = None, **extra: dict[str, Any]
    ) -> subprocess.Popen[bytes]:
        """Start a daemon on `host` (mDNS on unless `discovery` says otherwise)."""
        token = self.work / "api-token"
        if not token.exists():
            token.parent.mkdir(parents=True, exist_ok=True)
            token.write_text(API_TOKEN + "\n")
        sections: dict[str, dict[str, Any]] = {
            "discovery": {"mdns": True},
            "cache": {"chunk_size": "256KiB"},
            "origin": {"retries": 2, "retry_backoff": "50ms"},
            "security": {"api_token_file": str(token)},
        }
        for section, keys in extra.items():
            sections.setdefault(section, {}).update(keys)
        config = write_toml(
            self.work / f"{host.name}.toml",
            host_config(
                host, self.work / host.name / "cache", origin_url(self.bed), extra=sections
            ),
        )
        proc = start_daemon(self.bed, host, config, log=self.work / f"{host.name}.log", env=env)
        self.procs[host.name] = proc
        return proc

    def stop(self, host: Host, sig: int = signal.SIGTERM) -> None:
        """Stop the daemon of `host`."""
        self.bed.stop(self.procs.pop(host.name), sig, 10)

    def close(self) -> None:
        """Stop every daemon still running."""
        for name in list(self.procs):
            self.stop(self.bed.host(name))

    def peers(self, host: Host) -> list[dict[str, Any]]:
        """`GET /v1/peers` on `host`."""
        peers: list[dict[str, Any]] = json.loads(http_request(self.bed, host, API + "/v1/peers"))[
            "peers"
        ]
        return peers

    def log(self, host: Host) -> str:
        """What the daemon of `host` logged."""
        return (self.work / f"{host.name}.log").read_text(errors="replace")


@pytest.fixture
def swarm(swarm_bed: tuple[Testbed, Path], request: pytest.FixtureRequest) -> Iterator[Swarm]:
    """Daemons for one test."""
    bed, work = swarm_bed
    s = Swarm(bed, work, request.node.name)
    try:
        yield s
    finally:
        s.close()


def wait_for(what: str, check: Any, timeout: float = 20.0) -> Any:
    """Poll `check()` until it returns something true (bounded); fail with `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:.0f}s; last: {last!r}")


def ok_peers(swarm: Swarm, host: Host) -> set[str]:
    """Addresses of the usable peers `host` knows."""
    return {p["address"] for p in swarm.peers(host) if p["state"] == "ok"}


def add_image(work: Path, name: str, mib: int) -> str:
    """An image in the origin's directory; its sha256."""
    return make_image(work / "images" / name, mib)


def image_bytes_sent(bed: Testbed, name: str) -> int:
    """Image bytes the origin sent for `name` so far."""
    return int(origin_stats(bed)["bytes_by_path"].get(name, 0))


def duplicate_reads(bed: Testbed, name: str) -> dict[str, list[tuple[str, float]]]:
    """Ranges of `name` the origin sent more than once: range -> [(client, time)]."""
    reads: dict[str, list[tuple[str, float]]] = {}
    for method, path, rng, status, remote, at in origin_stats(bed)["requests"]:
        if method == "GET" and path == name and rng and status == 206:
            reads.setdefault(rng, []).append((remote, at))
    return {rng: who for rng, who in reads.items() if len(who) > 1}


def fetch_all(swarm: Swarm, hosts: list[Host], image: str) -> dict[str, str | None]:
    """`swarmcache fetch IMAGE -o FILE` on every host at once; the sha256 each file got."""
    procs = {}
    for h in hosts:
        out = swarm.work / h.name / image
        procs[h.name] = (
            swarm.bed.popen(
                h,
                python_argv(
                    "-m", "swarmcache", "--daemon", API, "fetch", image, "-q", "-o", str(out)
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
            out,
        )
    got: dict[str, str | None] = {}
    for name, (proc, out) in procs.items():
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            swarm.bed.stop(proc, signal.SIGKILL, 5)
        assert proc.returncode == 0, f"{name}: {err.decode(errors='replace')}"
        got[name] = file_sha256(out)
    return got


def test_hosts_find_each_other_over_mdns_and_notice_one_leaving(swarm: Swarm) -> None:
    hosts = swarm.bed.hosts[:4]
    for h in hosts:
        swarm.start(h)
    for h in hosts:
        want = {f"{o.addr}:7480" for o in hosts if o is not h}
        wait_for(f"{h.name} discovers the other three", lambda h=h, w=want: ok_peers(swarm, h) >= w)
    sources = {p["source"] for p in swarm.peers(hosts[0])}
    assert sources == {"mdns"}
    leaving = hosts[3]
    swarm.stop(leaving)  # SIGTERM: the daemon says goodbye over mDNS
    for h in hosts[:3]:
        wait_for(
            f"{h.name} notices {leaving.name} leaving",
            lambda h=h: f"{leaving.addr}:7480" not in ok_peers(swarm, h),
        )
        states = {p["address"]: p["state"] for p in swarm.peers(h)}
        assert states[f"{leaving.addr}:7480"] == "gone"


def test_static_peers_work_with_mdns_off(swarm: Swarm) -> None:
    bed = swarm.bed
    a, b, c = bed.hosts[:3]
    for h in (a, b, c):
        others = [f"{o.addr}:7480" for o in (a, b, c) if o is not h]
        swarm.start(h, discovery={"mdns": False, "static_peers": others})
    for h in (a, b, c):
        want = {f"{o.addr}:7480" for o in (a, b, c) if o is not h}
        wait_for(f"{h.name} knows its static peers", lambda h=h, w=want: ok_peers(swarm, h) >= w)
    sha = add_image(swarm.work.parent, "static-img", 4)
    assert fetch_all(swarm, [a], "static-img") == {"a" if False else a.name: sha}
    before = image_bytes_sent(bed, "static-img")
    assert fetch_all(swarm, [b, c], "static-img") == {b.name: sha, c.name: sha}
    assert image_bytes_sent(bed, "static-img") == before == 4 * MIB


def test_five_hosts_at_once_then_a_late_joiner(swarm: Swarm) -> None:
    bed = swarm.bed
    five, late = bed.hosts[:5], bed.hosts[5]
    for h in five:
        swarm.start(h)
    for h in five:
        wait_for(f"{h.name} sees four peers", lambda h=h: len(ok_peers(swarm, h)) >= 4)
    size = 24
    sha = add_image(swarm.work.parent, "storm-img", size)
    got = fetch_all(swarm, five, "storm-img")
    assert got == {h.name: sha for h in five}
    sent = image_bytes_sent(bed, "storm-img")
    twice = duplicate_reads(bed, "storm-img")
    print(f"origin sent {sent} bytes for {size * MIB}; read twice: {twice}")  # seen with -s
    assert sent <= 1.05 * size * MIB, (
        f"origin sent {sent / MIB:.2f} MiB for a {size} MiB image; read twice: {twice}"
    )
    # every host took part of the image from the origin and the rest from peers
    for h in five:
        assert "sources {'origin'" in swarm.log(h) or "'peer'" in swarm.log(h)
    # blocks went from host to host: every one of them served others
    served = [
        metric(
            http_request(bed, h, API + "/metrics").decode(), "swarmcache_served_peer_bytes_total"
        )
        for h in five
    ]
    assert all(n > 0 for n in served), served

    swarm.start(late)
    wait_for("the late joiner sees the five", lambda: len(ok_peers(swarm, late)) >= 5)
    assert fetch_all(swarm, [late], "storm-img") == {late.name: sha}
    assert image_bytes_sent(bed, "storm-img") == sent  # nothing more from the origin


def test_peer_serving_corrupt_chunks_is_quarantined_and_image_still_correct(
    swarm: Swarm,
) -> None:
    bed = swarm.bed
    bad, good = bed.hosts[:2]
    # the bad host keeps a good copy but flips a byte in every chunk it serves to peers
    swarm.start(bad, env={"SWARMCACHE_TEST_CORRUPT_PEER_CHUNKS": "1"})
    swarm.start(good)
    wait_for("good sees bad over mDNS", lambda: f"{bad.addr}:7480" in ok_peers(swarm, good))
    sha = add_image(swarm.work.parent, "corrupt-img", 4)
    assert fetch_all(swarm, [bad], "corrupt-img") == {bad.name: sha}
    assert fetch_all(swarm, [good], "corrupt-img") == {good.name: sha}
    states = {p["address"]: p["state"] for p in swarm.peers(good)}
    assert states[f"{bad.addr}:7480"] == "quarantined"
    metrics = http_request(bed, good, API + "/metrics").decode()
    assert metric(metrics, "swarmcache_peer_quarantines_total") == 1
    assert metric(metrics, "swarmcache_verification_failures_total", kind="chunk") >= 1
    assert "does not match its digest; peer quarantined" in swarm.log(good)
    # every block the bad peer sent was thrown away: good kept nothing from a peer
    assert metric(metrics, "swarmcache_fetched_bytes_total", source="peer") == 0
    assert metric(metrics, "swarmcache_fetched_bytes_total", source="origin") == 4 * MIB


@pytest.mark.parametrize(
    ("fault", "timeout", "size"),
    [
        # killed: its sockets are reset; every read from it fails at once
        ("kill", "2s", 32),
        # stopped (as a host that hangs or drops off the network): no reset, reads
        # from it just stall; they end when its link's heartbeat fails (within about
        # 10 s), not after peers.timeout. 64 MiB at 40 Mbit/s take 13 s: the fetch is
        # still on when the heartbeat fails (near its end, a slow read is also asked
        # of another holder anyway)
        ("stop", "300s", 64),
    ],
)
def test_peer_killed_or_hung_mid_transfer_costs_a_timeout_not_the_fetch(
    swarm_bed: tuple[Testbed, Path],
    request: pytest.FixtureRequest,
    fault: str,
    timeout: str,
    size: int,
) -> None:
    bed, work = swarm_bed
    # a slow link for the fetching host, so the kill lands mid-transfer
    s = Swarm(bed, work, request.node.name.replace("[", "-").rstrip("]"))
    a, b, c = bed.hosts[:3]
    image = f"{fault}-img"
    stopped = None
    try:
        sha = add_image(work, image, size)
        for h in (a, b):
            s.start(h)
        assert fetch_all(s, [a, b], image) == {a.name: sha, b.name: sha}
        sent = image_bytes_sent(bed, image)
        s.start(c, peers={"timeout": timeout})
        wait_for("c sees a and b", lambda: len(ok_peers(s, c)) >= 2)
        shape(bed, c, "40mbit")  # 32 MiB take about 7 s: the fault lands mid-transfer
        proc = bed.popen(
            c,
            python_argv("-m", "swarmcache", "--daemon", API, "fetch", image, "-q"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for("c to be fetching", lambda: chunks_present(bed, c, image) > 4, timeout=30)
        if fault == "kill":
            s.stop(a, signal.SIGKILL)  # mid-transfer, no goodbye
        else:
            stopped = s.procs[a.name]
            os.kill(stopped.pid, signal.SIGSTOP)  # mid-transfer: its sockets stay open
        _, err = proc.communicate(timeout=120)
        bed.stop(proc, signal.SIGKILL, 5)
        assert proc.returncode == 0, err.decode(errors="replace")
        status = json.loads(http_request(bed, c, API + f"/v1/images/{image}/status"))
        assert status["state"] == "complete"
        assert status["sha256"] == sha
        # b still held every chunk: the origin was not needed
        assert image_bytes_sent(bed, image) == sent
        if fault == "stop":  # the reads it held were ended, not waited out
            assert "is gone: ending" in s.log(c)
            assert "link to peer" in s.log(c)  # lost: its heartbeat went unanswered
            # counted: the lost link, and joins or links to it that failed afterwards;
            # not the reads it ended, once more each
            log = s.log(c)
            counted = sum(
                log.count(what)
                for what in ("link to peer", "cannot link to peer", "join of ", "failed: ")
            )
            metrics = http_request(bed, c, API + "/metrics").decode()
            assert 1 <= metric(metrics, "swarmcache_peer_errors_total") <= counted
    finally:
        if stopped is not None:
            os.kill(stopped.pid, signal.SIGCONT)
        s.close()
        unshape(bed, c)


def chunks_present(bed: Testbed, host: Host, image: str) -> int:
    """Chunks of `image` the daemon on `host` holds (0 before its fetch started)."""
    try:
        status = json.loads(http_request(bed, host, f"{API}/v1/images/{image}/status"))
    except TestbedError:
        return 0
    return int(status.get("chunks_present", 0))


def _tc(bed: Testbed, host: Host, action: str, rate: str | None) -> None:
    # both directions: the host's eth0 (what it sends), its switch port (what it gets)
    qdisc = tbf_args(rate) if rate else []
    for ns, dev in ((host.ns, "eth0"), (bed.switch_ns, f"v-{host.name}")):
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", action, "dev", dev, "root", *qdisc],
            check=rate is not None,
            capture_output=True,
            timeout=10,
        )


def shape(bed: Testbed, host: Host, rate: str) -> None:
    """Limit one host's link to `rate` both ways."""
    _tc(bed, host, "replace", rate)


def unshape(bed: Testbed, host: Host) -> None:
    """Lift shape()."""
    _tc(bed, host, "del", None)


def test_a_seeder_role_over_mdns_counts_only_once_a_signed_hello_confirms_it(
    swarm: Swarm,
) -> None:
    """A seeder is every image's reader: with a cluster secret, a host believes the
    role from mDNS only after the announcer answered a signed hello. A stranger
    announcing itself a seeder (no secret) stays a plain, unusable-for-blocks host."""
    from swarmcache.signing import encode_key, new_private_key

    bed, work = swarm.bed, swarm.work
    work.mkdir(parents=True, exist_ok=True)
    secret, key = work / "secret", work / "manifest.key"
    secret.write_text("correct horse battery staple, 32\n")
    key.write_text(encode_key(new_private_key()) + "\n")
    seeder, host, stranger = bed.hosts[:3]
    swarm.start(
        seeder,
        daemon={"role": "seeder"},
        security={"cluster_secret_file": str(secret), "manifest_key_file": str(key)},
    )
    swarm.start(host, security={"cluster_secret_file": str(secret)})
    other_key = work / "other.key"
    other_key.write_text(encode_key(new_private_key()) + "\n")
    swarm.start(stranger, daemon={"role": "seeder"}, security={"manifest_key_file": str(other_key)})

    def roles() -> dict[str, str]:
        return {p["address"]: p["role"] for p in swarm.peers(host)}

    want = {f"{seeder.addr}:7480": "seeder", f"{stranger.addr}:7480": "host"}
    wait_for("the host knows the seeder's role, and not the stranger's", lambda: roles() == want)
    time.sleep(2.0)  # announcements go on: the stranger's claim is still not believed
    assert roles() == want
