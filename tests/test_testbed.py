"""The network test bed: hosts reach each other and the origin, multicast crosses the
bridge, shaping holds, and nothing it made (namespaces, links, processes) outlives it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_testbed
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
    start_daemon,
    start_origin,
    wait_http,
    write_toml,
)


@pytest.fixture(scope="session")
def testbed_ok() -> None:
    """Skip (fail under CI) a test that needs a network test bed this machine cannot build."""
    need_testbed()


@pytest.fixture(scope="module")
def bed(testbed_ok: None) -> Iterator[Testbed]:
    """Two hosts and the origin, unshaped, shared by the read-only tests of this module."""
    with Testbed(2) as tb:
        yield tb


def netns_names() -> set[str]:
    """Names of the namespaces that exist now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not count: nobody may reap orphans here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


SERVE = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    with c:
        c.sendall(sys.argv[4].encode() * int(sys.argv[5]))
"""

FETCH = """
import socket, sys, time
t0 = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
    n = 0
    while data := s.recv(1 << 16):
        n += len(data)
print(n, time.monotonic() - t0)
"""


def serve(tb: Testbed, host: Host, port: int, text: str, repeat: int = 1, conns: int = 1) -> None:
    """A TCP server in `host` that sends `text * repeat` to each of `conns` clients."""
    proc = tb.popen(
        host,
        [sys.executable, "-c", SERVE, host.addr, str(port), str(conns), text, str(repeat)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"


def fetch(tb: Testbed, host: Host, peer: Host, port: int, timeout: float = 5) -> tuple[int, float]:
    """Bytes read from `peer`'s server and the seconds it took, from inside `host`."""
    done = tb.run(host, [sys.executable, "-c", FETCH, peer.addr, str(port), str(timeout)])
    assert done.returncode == 0, done.stderr
    n, secs = done.stdout.split()
    return int(n), float(secs)


def test_hosts_and_origin_reach_each_other_over_tcp(bed: Testbed) -> None:
    h1, h2 = bed.hosts
    assert [h.name for h in bed.all] == ["origin", "h1", "h2"]
    assert len({h.addr for h in bed.all}) == 3
    serve(bed, bed.origin, 9001, "from-origin", conns=2)
    serve(bed, h2, 9002, "from-h2")
    assert fetch(bed, h1, bed.origin, 9001)[0] == len("from-origin")
    assert fetch(bed, h2, bed.origin, 9001)[0] == len("from-origin")
    assert fetch(bed, h1, h2, 9002)[0] == len("from-h2")


def test_http_from_one_namespace_to_another(bed: Testbed, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello from the origin")
    argv = [sys.executable, "-m", "http.server", "8000", "--bind", bed.origin.addr]
    server = bed.popen(
        bed.origin,
        [*argv, "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{bed.origin.addr}:8000/hello.txt"
    wait_http(bed, bed.hosts[0], url, timeout=10, proc=server)
    assert http_request(bed, bed.hosts[1], url) == b"hello from the origin"
    assert bed.stop(server) is not None
    assert server.poll() is not None


def test_namespaces_are_isolated_from_the_root_namespace(bed: Testbed) -> None:
    links = bed.run(bed.hosts[0], ["ip", "-o", "link"]).stdout
    assert {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()} == {
        "lo",
        "eth0",
    }
    routes = bed.run(bed.hosts[0], ["ip", "route"]).stdout
    assert "224.0.0.0/4 dev eth0" in routes
    assert "default" not in routes
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "v-h1" not in root_links  # both veth ends were born in the bed's namespaces


MCAST_RECV = """
import socket, struct, sys, time
got, socks = set(), []
for group, port in (("224.0.0.251", 5353), ("239.255.77.77", 5007)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                 struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0")))
    s.settimeout(0.05)
    socks.append((group, s))
print("ready", flush=True)
deadline = time.monotonic() + 5
while len(got) < 2 and time.monotonic() < deadline:
    for group, s in socks:
        try:
            data, src = s.recvfrom(2048)
        except TimeoutError:
            continue
        if data == b"hello " + group.encode():
            got.add(f"{group} from {src[0]}")
print(";".join(sorted(got)))
"""

MCAST_SEND = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(25):
    for group, port in (("224.0.0.251", 5353), ("239.255.77.77", 5007)):
        s.sendto(b"hello " + group.encode(), (group, port))
    time.sleep(0.02)
"""


def test_multicast_crosses_the_bridge(bed: Testbed) -> None:
    h1, h2 = bed.hosts
    receivers = []
    for host in (h2, bed.origin):
        proc = bed.popen(host, [sys.executable, "-c", MCAST_RECV], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        receivers.append(proc)
    assert bed.run(h1, [sys.executable, "-c", MCAST_SEND], timeout=10).returncode == 0
    for proc in receivers:
        out, _ = proc.communicate(timeout=10)
        assert out.decode().strip() == f"224.0.0.251 from {h1.addr};239.255.77.77 from {h1.addr}"


def test_set_link_down_cuts_a_host_off_and_up_restores_it(testbed_ok: None) -> None:
    with Testbed(2) as tb:
        h1, h2 = tb.hosts
        serve(tb, h2, 9003, "x", conns=2)
        assert fetch(tb, h1, h2, 9003)[0] == 1
        tb.set_link(h2, up=False)
        failed = tb.run(h1, [sys.executable, "-c", FETCH, h2.addr, "9003", "0.5"])
        assert failed.returncode != 0
        assert "timed out" in failed.stderr
        tb.set_link(h2, up=True)
        assert fetch(tb, h1, h2, 9003)[0] == 1


def test_rate_shapes_both_ends_of_every_link(testbed_ok: None) -> None:
    with Testbed(1, rate="40mbit") as tb:
        (h1,) = tb.hosts
        for ns, dev in (
            (h1.ns, "eth0"),
            (tb.origin.ns, "eth0"),
            (tb.switch_ns, "v-h1"),
            (tb.switch_ns, "v-o"),
        ):
            qdisc = subprocess.run(
                ["tc", "-n", ns, "qdisc", "show", "dev", dev],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert "tbf" in qdisc
            assert "rate 40Mbit" in qdisc
        serve(tb, tb.origin, 9004, "y" * 1024, repeat=2048)  # 2 MiB: 0.42 s at 40 Mbit/s
        n, secs = fetch(tb, h1, tb.origin, 9004, timeout=10)
        assert n == 2 << 20
        assert 0.3 < secs < 3
        rx, _ = tb.link_bytes(h1)
        _, tx = tb.link_bytes(tb.origin)
        assert rx > 2 << 20
        assert tx > 2 << 20


def test_close_removes_namespaces_links_and_processes(testbed_ok: None) -> None:
    tb = Testbed(2, stop_grace=0.5)
    with tb:
        names = set(tb.namespaces)
        assert names <= netns_names()
        # A shell with a child: the whole process group has to go.
        proc = tb.popen(
            tb.hosts[0], ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        stubborn = tb.popen(
            tb.hosts[1], [sys.executable, "-c", IGNORE_TERM], stdout=subprocess.PIPE
        )
        assert stubborn.stdout is not None
        assert stubborn.stdout.readline() == b"ready\n"
        assert alive(child)
    assert not names & netns_names()
    assert proc.poll() is not None
    assert stubborn.poll() is not None
    assert not alive(child)
    tb.close()  # idempotent
    with pytest.raises(TestbedError):
        tb.popen(tb.hosts[0], ["true"])


IGNORE_TERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def test_close_cleans_up_after_an_exception_inside_with(testbed_ok: None) -> None:
    tb = Testbed(1)
    with pytest.raises(RuntimeError, match="boom"), tb:
        proc = tb.popen(tb.hosts[0], ["sleep", "60"])
        raise RuntimeError("boom")
    assert not set(tb.namespaces) & netns_names()
    assert proc.poll() is not None


def test_a_failed_build_leaves_nothing(testbed_ok: None) -> None:
    tb = Testbed(1, prefix=f"sc{os.getpid()}-99")
    clash = tb.hosts[0].ns
    subprocess.run(["ip", "netns", "add", clash], check=True)
    try:
        with pytest.raises(TestbedError, match="netns add"), tb:
            pass
        assert not (set(tb.namespaces) - {clash}) & netns_names()
    finally:
        subprocess.run(["ip", "netns", "del", clash], check=True)


def test_stop_refuses_a_process_it_did_not_start(bed: Testbed) -> None:
    stranger = subprocess.Popen(["sleep", "10"])
    try:
        with pytest.raises(TestbedError, match="not started by this test bed"):
            bed.stop(stranger)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_run_kills_a_command_that_overruns_its_timeout(bed: Testbed) -> None:
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        bed.run(bed.hosts[0], ["sleep", "30"], timeout=0.3)
    assert time.monotonic() - t0 < 5
    assert bed.exec_argv(bed.hosts[0], ["sleep", "30"]) not in [p.args for p in bed.processes]


def test_a_daemon_in_a_host_fetches_from_the_origin(bed: Testbed, tmp_path: Path) -> None:
    sha = make_image(tmp_path / "origin" / "img", 2)
    start_origin(bed, tmp_path / "origin", port=8081, log=tmp_path / "origin.log")
    h1 = bed.hosts[0]
    sections = host_config(h1, tmp_path / "cache", origin_url(bed, 8081), port=7481)
    config = write_toml(tmp_path / "h1.toml", sections)
    daemon = start_daemon(bed, h1, config, port=7481, log=tmp_path / "daemon.log")
    try:
        body = http_request(bed, h1, "http://127.0.0.1:7481/v1/images/img")
        (tmp_path / "out").write_bytes(body)
        assert file_sha256(tmp_path / "out") == sha
        assert origin_stats(bed, 8081)["bytes_by_path"]["img"] == 2 << 20
    finally:
        assert bed.stop(daemon) == 0
