"""A real OpenStack Glance API server for the tests: glance-api under uWSGI, no Keystone.

Theory of operation. `scripts/setup-glance` installs Glance and uWSGI (pyuwsgi) into
their own venv, `.venv-glance`, kept apart from `.venv` because Glance pins much of
OpenStack. GlanceServer writes a configuration into a work directory (SQLite database,
file store under `<workdir>/images`, sha512 as the multihash), creates the schema with
`glance-manage db_sync`, starts `glance.wsgi.api:application` under uWSGI in its own
process group (optionally inside a network namespace, `ip netns exec NS`), waits for
GET /versions to answer and, on exit, stops the group and removes the work directory.

There is no Keystone. With `auth="noauth"` (the default) the paste pipeline is Glance's
`unauthenticated-context` one: every request is an admin with no roles and no project,
so the policy file lets that context do everything (`context_is_admin` and
`service_api` empty, or uploads get 403), and an admin may still download a
deactivated image (Glance refuses only non-admins). With `auth="headers"` the pipeline
is the one Keystone's authtoken would front, without authtoken: Glance's `context`
middleware believes the identity headers it finds (ADMIN_HEADERS, which the helpers
here always send), and a request without them is an anonymous, read-only non-admin
that sees public images and gets 403 for a deactivated one, as a cloud's non-admin
user would. Either way the import methods need a project and a staging area, so data
goes up with PUT /v2/images/{id}/file, and the images made here are public.

The HTTP helpers use only the standard library so that they also run from plain
scripts. When the server is in a namespace the test process may not reach its address,
so the helpers then run this module's CLI inside that namespace.

    python -m swarmtools.glance serve [--host H] [--port P] [--workdir D] [--auth headers]
    python -m swarmtools.glance upload --url URL --file PATH [--name N]
    python -m swarmtools.glance show|deactivate|reactivate|delete --url URL IMAGE_ID
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-glance"
SETUP_SCRIPT = REPO / "scripts" / "setup-glance"
DEFAULT_PORT = 9292  # Glance's own port: the default of `serve`
STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
HTTP_TIMEOUT_S = 120.0
# glanceclient uploads with chunked encoding in 1 MiB chunks; uWSGI's default limit
# on one chunk is 1 MiB, which a chunk plus its framing overflows.
CHUNKED_INPUT_LIMIT = 16 * 1024 * 1024
_UPLOAD_BLOCK = 1 << 20  # http.client sends a file body in blocks of this size

AUTH_MODES = ("noauth", "headers")
# Who the helpers say they are; only auth="headers" reads it (the headers Keystone's
# authtoken middleware would set for a token of an admin of project "swarmtools").
ADMIN_HEADERS = {
    "X-Identity-Status": "Confirmed",
    "X-User-Id": "swarmtools",
    "X-Project-Id": "swarmtools",
    "X-Roles": "admin,member,reader",
}

_POLICY = {
    # The unauthenticated context has no roles; these rules let it do everything.
    "noauth": """\
"context_is_admin": ""
"service_api": ""
"default": ""
""",
    # Glance's defaults want a reader role even for a public image; the anonymous
    # context has none, so reading is opened up. Downloading too, except for a caller
    # with the role "no_download": one who may see an image but not download it, as
    # operators restrict download_image (tests/test_glance.py). Everything else stays
    # Glance's.
    "headers": """\
"get_image": ""
"get_images": ""
"download_image": "not role:no_download"
""",
}
# The pipeline auth="headers" adds to Glance's paste file: "keystone" less authtoken.
_HEADERS_PIPELINE = "cors http_proxy_to_wsgi versionnegotiation osprofiler context rootapp"

# free_port() inside a namespace: bind port 0 on argv[1], print the port.
_FREE_PORT = """
import socket, sys
with socket.socket() as s:
    s.bind((sys.argv[1], 0))
    print(s.getsockname()[1])
"""

_CONF = """\
# Written by swarmtools.glance.
[DEFAULT]
enabled_backends = fs:file
hashing_algorithm = sha512
image_cache_dir = {work}/cache
use_stderr = true
debug = false
# Only the `context` middleware of auth="headers" reads it.
allow_anonymous_access = true

[database]
connection = sqlite:///{work}/glance.sqlite

[paste_deploy]
# Empty: Glance's unauthenticated-context pipeline; "headers": see _paste_ini().
flavor = {flavor}
config_file = {work}/glance-api-paste.ini

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {work}/images

[os_glance_staging_store]
filesystem_store_datadir = {work}/staging

[os_glance_tasks_store]
filesystem_store_datadir = {work}/tasks

[oslo_policy]
policy_file = {work}/policy.yaml

[oslo_concurrency]
lock_path = {work}/locks

[image_format]
# Random bytes sometimes look like an MBR with a bad partition table, which Glance
# would refuse as unsafe; a raw test image is not a disk.
gpt_safety_checks_nonfatal = mbr
"""


class GlanceError(RuntimeError):
    """Glance could not be set up, started, or answered an HTTP error."""


def ensure_installed(venv: Path = VENV) -> Path:
    """Install .venv-glance if needed (scripts/setup-glance, quick when done); the venv."""
    if venv == VENV:
        done = subprocess.run(
            [str(SETUP_SCRIPT)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            out = (done.stdout + done.stderr).strip()[-2000:]
            raise GlanceError(f"{SETUP_SCRIPT} failed ({done.returncode}):\n{out}")
    for tool in ("uwsgi", "glance-manage"):
        if not (venv / "bin" / tool).exists():
            raise GlanceError(f"{venv}/bin/{tool} is missing: run {SETUP_SCRIPT}")
    return venv


def free_port(host: str = "127.0.0.1", netns: str | None = None) -> int:
    """A TCP port free on `host` now (in namespace `netns`), chosen by binding port 0."""
    if netns is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
            return port
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", _FREE_PORT, host]
    done = _run(argv, timeout=30)
    return int(done.stdout)


def _paste_ini(venv: Path) -> str:
    """Glance's paste file with one more flavor, "headers" (see the module's doc)."""
    paste = configparser.RawConfigParser()
    paste.optionxform = str  # type: ignore[assignment,method-assign]  # keep the keys' case
    paste.read(venv / "etc" / "glance" / "glance-api-paste.ini")
    paste["composite:glance-api-headers"] = dict(paste["composite:glance-api"])
    paste["composite:api"]["headers"] = _HEADERS_PIPELINE
    out = io.StringIO()
    paste.write(out)
    return out.getvalue()


class GlanceServer:
    """A glance-api under uWSGI on `host`:`port` (a free one if not given), as a context
    manager.

    `netns` runs it in that network namespace (leave the server before closing the
    namespace); `auth` is "noauth" or "headers" (see the module's doc); `workdir` is
    kept if given, else a temporary one is made and removed; `processes` x `threads`
    requests are served at once (each download holds one for its whole length).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        netns: str | None = None,
        auth: str = "noauth",
        workdir: Path | None = None,
        processes: int = 2,
        threads: int = 4,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        venv: Path = VENV,
    ) -> None:
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}, not {auth!r}")
        self.host = host
        self.port = port
        self.auth = auth
        self.netns = netns
        self.processes = processes
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.venv = venv
        self._given_workdir = workdir
        self.workdir = Path(workdir) if workdir is not None else Path()
        self.startup_s: float | None = None  # start(): configuration, schema, first answer
        self._proc: subprocess.Popen[bytes] | None = None
        self._made_workdir = False

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:40123 (the API is under /v2)."""
        if self.port is None:
            raise GlanceError("the Glance server is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def datadir(self) -> Path:
        """The file store's directory: one file per image, named by its id."""
        return self.workdir / "images"

    @property
    def log_path(self) -> Path:
        """uWSGI's and Glance's log (stdout and stderr of the server)."""
        return self.workdir / "glance.log"

    def alive(self) -> bool:
        """True while uWSGI runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The uWSGI master's PID (its process group) while running."""
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> GlanceServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration, create the schema, start uWSGI, wait for /versions."""
        if self._proc is not None:
            raise GlanceError("the Glance server is already started")
        ensure_installed(self.venv)
        t0 = time.monotonic()
        try:
            self._prepare()
            self._launch()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0

    def _prepare(self) -> None:
        if self._given_workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="swarm-glance-"))
            self._made_workdir = True
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host, self.netns)
        work = self.workdir.resolve()
        for sub in ("images", "staging", "tasks", "cache", "locks"):
            (work / sub).mkdir(exist_ok=True)
        flavor = "" if self.auth == "noauth" else self.auth
        (work / "glance-api.conf").write_text(_CONF.format(work=work, flavor=flavor))
        (work / "glance-api-paste.ini").write_text(_paste_ini(self.venv))
        (work / "policy.yaml").write_text(_POLICY[self.auth])
        # The same file the app reads, so the schema lands in the database it uses.
        conf = str(work / "glance-api.conf")
        done = subprocess.run(
            [str(self.venv / "bin" / "glance-manage"), "--config-file", conf, "db_sync"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=self._env(),
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise GlanceError(f"glance-manage db_sync failed:\n{done.stderr.strip()[-2000:]}")

    def _env(self) -> dict[str, str]:
        # The tests' interpreter settings are not Glance's (warnings as errors would stop it).
        drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONWARNINGS", "VIRTUAL_ENV"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        # glance.wsgi.api reads only $OS_GLANCE_CONFIG_DIR/glance-api.conf.
        env["OS_GLANCE_CONFIG_DIR"] = str(self.workdir.resolve())
        return env

    def _argv(self) -> list[str]:
        argv = [
            # A background job's shell ignores SIGINT and SIGQUIT, and ignored signals
            # are inherited: the master stops its workers with SIGINT, which they would
            # then ignore, holding its exit for a minute.
            "env",
            "--default-signal=INT,QUIT",
            str(self.venv / "bin" / "uwsgi"),
            "--http-socket",
            f"{self.host}:{self.port}",
            "--module",
            "glance.wsgi.api:application",
            "--master",
            "--processes",
            str(self.processes),
            "--threads",
            str(self.threads),
            # Load the app in each worker, after the fork: Glance starts threads and
            # opens its database when loaded (what DevStack's uwsgi config does too).
            "--lazy-apps",
            "--need-app",
            "--die-on-term",  # SIGTERM stops (uWSGI 2.0 would reload)
            "--chunked-input-limit",
            str(CHUNKED_INPUT_LIMIT),
            "--buffer-size",
            "65535",
            # --http-socket serves one request per connection; say so, as DevStack does.
            "--add-header",
            "Connection: close",
        ]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.workdir,
                start_new_session=True,  # its own process group: stop() kills the lot
            )

    def _wait_ready(self) -> None:
        """Poll GET /versions until it answers; fail with the log's tail if uWSGI exits
        or the time is up. In a namespace the poller runs there."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        url = self.url + "/versions"
        poller: subprocess.Popen[bytes] | None = None
        if self.netns is not None:
            poller = subprocess.Popen(
                [*self._cli_prefix(), "wait", "--url", self.url, "--timeout", "3600"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            while True:
                if poller is not None:
                    if poller.poll() == 0:
                        break
                elif _answers(url):
                    break
                if self._proc.poll() is not None:
                    raise GlanceError(
                        f"glance-api exited with {self._proc.returncode} before {url} "
                        "answered" + self.log_tail()
                    )
                if poller is not None and poller.returncode is not None:
                    raise GlanceError(
                        f"the poller in {self.netns} exited with {poller.returncode}"
                        + self.log_tail()
                    )
                if time.monotonic() > deadline:
                    raise GlanceError(
                        f"{url} did not answer within {self.startup_timeout:.0f} s"
                        + self.log_tail()
                    )
                time.sleep(0.1)
        finally:
            if poller is not None:
                _stop_group(poller, 0)

    def stop(self) -> None:
        """Stop uWSGI (SIGTERM, then SIGKILL to its group after a grace) and remove the
        work directory if this server made it; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_group(proc, STOP_GRACE_S)
        if self._made_workdir:
            self._made_workdir = False
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log, as an error message's appendix."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- last lines of {self.log_path}:\n" + "\n".join(text)

    def data_bytes_sent(self, image_id: str) -> int:
        """Image bytes Glance sent for `image_id` so far (GET .../file answers, from
        uWSGI's request log: what left the application, not counting HTTP headers)."""
        pattern = re.compile(
            rf"\] GET /v2/images/{re.escape(image_id)}/file => generated (\d+) bytes"
        )
        text = self.log_path.read_text(errors="replace")
        return sum(int(m.group(1)) for m in pattern.finditer(text))

    # --- the API ------------------------------------------------------------------------

    def create_image(
        self,
        data: bytes,
        name: str = "test-image",
        disk_format: str = "raw",
        container_format: str = "bare",
        **extra: Any,
    ) -> dict[str, Any]:
        """Create an image holding `data`; its record once active (see create_image())."""
        if self.netns is None:
            return create_image(self.url, data, name, disk_format, container_format, **extra)
        fd, tmp = tempfile.mkstemp(prefix="upload-", dir=self.workdir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.create_image_from_file(
                Path(tmp), name, disk_format, container_format, **extra
            )
        finally:
            Path(tmp).unlink(missing_ok=True)

    def create_image_from_file(
        self,
        path: Path,
        name: str = "test-image",
        disk_format: str = "raw",
        container_format: str = "bare",
        **extra: Any,
    ) -> dict[str, Any]:
        """create_image() streaming the bytes from `path` (any size, little memory)."""
        if self.netns is None:
            return create_image(self.url, Path(path), name, disk_format, container_format, **extra)
        argv = ["upload", "--file", str(Path(path).resolve()), "--name", name]
        argv += ["--disk-format", disk_format, "--container-format", container_format]
        if extra:
            argv += ["--extra", json.dumps(extra)]
        return self._cli(argv)

    def image(self, image_id: str) -> dict[str, Any]:
        """GET /v2/images/{id}: the image's record."""
        if self.netns is None:
            return get_image(self.url, image_id)
        return self._cli(["show", image_id])

    def deactivate(self, image_id: str) -> None:
        """POST /v2/images/{id}/actions/deactivate (admins, which every caller here is,
        may still download it)."""
        self._action("deactivate", image_id)

    def reactivate(self, image_id: str) -> None:
        """POST /v2/images/{id}/actions/reactivate."""
        self._action("reactivate", image_id)

    def delete(self, image_id: str) -> None:
        """DELETE /v2/images/{id}: the record and the stored bytes."""
        self._action("delete", image_id)

    def image_file_path(self, image_id: str) -> Path:
        """Where the file store keeps the image's bytes (a test may corrupt them there)."""
        return self.datadir / image_id

    def _action(self, action: str, image_id: str) -> None:
        if self.netns is None:
            _ACTIONS[action](self.url, image_id)
        else:
            self._cli([action, image_id])

    def _cli_prefix(self) -> list[str]:
        assert self.netns is not None
        return ["ip", "netns", "exec", self.netns, sys.executable, "-m", "swarmtools.glance"]

    def _cli(self, argv: Sequence[str]) -> dict[str, Any]:
        """Run this module's CLI in the namespace against this server; its JSON output."""
        action, *rest = argv
        done = _run([*self._cli_prefix(), action, "--url", self.url, *rest], HTTP_TIMEOUT_S * 2)
        out = done.stdout.strip()
        result: dict[str, Any] = json.loads(out) if out else {}
        return result


# --- HTTP helpers (standard library only) ---------------------------------------------------


def _answers(url: str) -> bool:
    """True if GET `url` answers 2xx within a second."""
    try:
        status, _, _ = _request("GET", url, timeout=1)
    except (OSError, http.client.HTTPException, GlanceError):
        return False
    return 200 <= status < 300


def _request(
    method: str,
    url: str,
    body: bytes | IO[bytes] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT_S,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body); no proxies."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise GlanceError(f"expected an http:// URL, not {url!r}")
    conn = http.client.HTTPConnection(
        parts.hostname, parts.port or 80, timeout=timeout, blocksize=_UPLOAD_BLOCK
    )
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path or "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), data
    finally:
        conn.close()


def _api(
    method: str,
    url: str,
    body: bytes | IO[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """_request() as an admin (ADMIN_HEADERS); GlanceError unless the answer is 2xx; the body."""
    status, _, data = _request(method, url, body, {**ADMIN_HEADERS, **(headers or {})})
    if not 200 <= status < 300:
        text = data.decode(errors="replace").strip()[-500:]
        raise GlanceError(f"{method} {url}: {status} {text}")
    return data


def create_image(
    base_url: str,
    data: bytes | Path,
    name: str = "test-image",
    disk_format: str = "raw",
    container_format: str = "bare",
    **extra: Any,
) -> dict[str, Any]:
    """POST /v2/images, PUT the bytes (or stream the file `data`) to /file, and return
    GET /v2/images/{id}: status 'active', size, checksum (md5 hex), os_hash_algo
    'sha512', os_hash_value. `extra` adds properties; visibility is public unless given."""
    meta = {"name": name, "disk_format": disk_format, "container_format": container_format}
    meta["visibility"] = "public"  # as a cloud's base images are (auth="headers" reads it)
    meta.update(extra)
    created = json.loads(
        _api(
            "POST",
            f"{base_url}/v2/images",
            json.dumps(meta).encode(),
            {"Content-Type": "application/json"},
        )
    )
    image_id = created["id"]
    headers = {"Content-Type": "application/octet-stream"}
    file_url = f"{base_url}/v2/images/{image_id}/file"
    if isinstance(data, Path):
        # A Content-Length and a file body: http.client streams it block by block.
        headers["Content-Length"] = str(data.stat().st_size)
        with open(data, "rb") as f:
            _api("PUT", file_url, f, headers)
    else:
        _api("PUT", file_url, data, headers)
    return get_image(base_url, image_id)


def get_image(base_url: str, image_id: str) -> dict[str, Any]:
    """GET /v2/images/{id}."""
    record: dict[str, Any] = json.loads(_api("GET", f"{base_url}/v2/images/{image_id}"))
    return record


def deactivate_image(base_url: str, image_id: str) -> None:
    """POST /v2/images/{id}/actions/deactivate."""
    _api("POST", f"{base_url}/v2/images/{image_id}/actions/deactivate")


def reactivate_image(base_url: str, image_id: str) -> None:
    """POST /v2/images/{id}/actions/reactivate."""
    _api("POST", f"{base_url}/v2/images/{image_id}/actions/reactivate")


def delete_image(base_url: str, image_id: str) -> None:
    """DELETE /v2/images/{id}."""
    _api("DELETE", f"{base_url}/v2/images/{image_id}")


_ACTIONS = {"deactivate": deactivate_image, "reactivate": reactivate_image, "delete": delete_image}


# --- processes -----------------------------------------------------------------------------


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a helper command; GlanceError with its stderr if it fails."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GlanceError(f"{' '.join(argv)}: {err}") from err
    if done.returncode != 0:
        raise GlanceError(f"{' '.join(argv)}: {done.stderr.strip()[-2000:] or done.returncode}")
    return done


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM `proc`, SIGKILL its process group after `grace` s, and reap `proc`.

    SIGTERM goes to the uWSGI master alone: it stops its workers and exits within about
    a second, while workers that get a SIGTERM of their own take a graceful reload's
    path and the lot outlasts a 10 s grace.
    """
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # Also when it has exited: whatever it left behind in its group goes too.
    _killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --- CLI -----------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server = GlanceServer(
        args.host,
        args.port,
        auth=args.auth,
        workdir=args.workdir,
        processes=args.processes,
        threads=args.threads,
    )
    with server:
        print(f"glance-api at {server.url}, files in {server.datadir}", flush=True)
        try:
            while server.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
        print("glance-api exited" + server.log_tail(), file=sys.stderr)
        return 1


def _wait(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    while not _answers(args.url + "/versions"):
        if time.monotonic() > deadline:
            print(f"{args.url}/versions did not answer", file=sys.stderr)
            return 1
        time.sleep(0.1)
    return 0


def _client(args: argparse.Namespace) -> int:
    result: dict[str, Any] | None
    if args.command == "upload":
        extra = json.loads(args.extra) if args.extra else {}
        result = create_image(
            args.url,
            Path(args.file),
            args.name,
            args.disk_format,
            args.container_format,
            **extra,
        )
    elif args.command == "show":
        result = get_image(args.url, args.image_id)
    else:
        _ACTIONS[args.command](args.url, args.image_id)
        result = None
    if result is not None:
        print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`serve` a Glance in the foreground until SIGTERM, or talk to one."""
    p = argparse.ArgumentParser(prog="python -m swarmtools.glance", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run glance-api until SIGTERM or Ctrl-C")
    serve.add_argument("--host", default="127.0.0.1", help="(default %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default %(default)s)")
    serve.add_argument("--workdir", type=Path, help="kept (default: a temporary one)")
    serve.add_argument("--auth", choices=AUTH_MODES, default="noauth", help="(default %(default)s)")
    serve.add_argument("--processes", type=int, default=2, help="(default %(default)s)")
    serve.add_argument("--threads", type=int, default=4, help="(default %(default)s)")
    wait = sub.add_parser("wait", help="wait until URL/versions answers")
    wait.add_argument("--url", required=True)
    wait.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S)
    upload = sub.add_parser("upload", help="create an image from a file; print its JSON")
    upload.add_argument("--url", required=True, help="e.g. http://127.0.0.1:9292")
    upload.add_argument("--file", required=True)
    upload.add_argument("--name", default="test-image")
    upload.add_argument("--disk-format", default="raw")
    upload.add_argument("--container-format", default="bare")
    upload.add_argument("--extra", help="more image properties, as a JSON object")
    for command in ("show", "deactivate", "reactivate", "delete"):
        one = sub.add_parser(command, help=f"{command} an image")
        one.add_argument("--url", required=True)
        one.add_argument("image_id")
    args = p.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "wait":
            return _wait(args)
        return _client(args)
    except GlanceError as err:
        print(err, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
