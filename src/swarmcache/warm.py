"""Pre-warming: fetch images into many hosts' caches from one request.

`POST /v1/warm {"images": [...], "hosts": "all" | ["host:port", ...]}` answers 202
with a job id at once; `GET /v1/warm/{job}` shows, per host and image, queued,
fetching (bytes, rate), cached or failed (the reason). Without `hosts` only this
host warms; "all" is this host and every peer it knows that is not gone.

Every host of a job starts on an image at the same moment, so the swarm's cold
start applies: the origin sends each image about once however many hosts warm it
(the image's readers read shares, everyone else trades blocks). `[warm]
concurrency` bounds how many images this daemon warms at once (over all its jobs),
so a list of fifty images does not become fifty half-done fetches on every host.

Remote hosts are driven through their own API (`POST /v1/images/{id}/fetch`, then
`GET .../status?wait=`), as an operator would, with requests signed with the cluster
secret (access.py; a host without one answers 403): a host that cannot
be reached, refuses, or whose fetch fails, is marked failed with the reason, and the
others go on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

from .errors import BadRequest, Busy, ImageNotFound, NotFound, SwarmcacheError
from .fetch import Fetcher
from .manifest import validate_image_id
from .peers.swarm import Swarm

log = logging.getLogger(__name__)

MAX_IMAGES = 1000  # per job
MAX_HOSTS = 10000  # per job
MAX_JOBS = 100  # finished jobs kept for GET /v1/warm/{job}; the oldest go first
MAX_RUNNING = 100  # jobs running at once; more is a 503 (they queue behind each other)
STUCK = 600.0  # seconds a remote fetch may show no progress before it counts as failed
POLL = 2.0  # seconds a remote status poll waits for the fetch to end (?wait=)
REMOTE_TRIES = 5  # failed requests in a row before a remote host is marked failed
LOCAL = "local"  # how a job's own host is named in `hosts` (shown by its address)


@dataclass
class Target:
    """One image on one host, as the job sees it."""

    state: str = "queued"  # queued | fetching | cached | failed
    bytes: int = 0
    size: int | None = None
    rate: float = 0.0  # bytes/s of the running fetch
    reason: str | None = None

    def describe(self) -> dict[str, Any]:
        """The JSON form."""
        out: dict[str, Any] = {"state": self.state, "bytes": self.bytes, "size": self.size}
        if self.state == "fetching":
            out["rate_bytes_per_s"] = round(self.rate)
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass
class WarmJob:
    """One warm request: images x hosts."""

    job_id: str
    images: list[str]
    hosts: list[str]  # "host:port", this host's advertised address first
    created: float = field(default_factory=time.time)
    finished: float | None = None
    targets: dict[tuple[str, str], Target] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for host, image in itertools.product(self.hosts, self.images):
            self.targets[host, image] = Target()

    @property
    def state(self) -> str:
        """running | done (every target cached) | failed (some target failed)."""
        if self.finished is None:
            return "running"
        failed = any(t.state == "failed" for t in self.targets.values())
        return "failed" if failed else "done"

    def describe(self) -> dict[str, Any]:
        """The JSON form of `GET /v1/warm/{job}`."""
        counts = dict.fromkeys(("queued", "fetching", "cached", "failed"), 0)
        for t in self.targets.values():
            counts[t.state] += 1
        return {
            "job": self.job_id,
            "state": self.state,
            "created": self.created,
            "finished": self.finished,
            "images": self.images,
            "counts": counts,
            "hosts": {
                host: {image: self.targets[host, image].describe() for image in self.images}
                for host in self.hosts
            },
        }


class Warmer:
    """Runs warm jobs; an async context manager (its tasks end with it)."""

    def __init__(self, fetcher: Fetcher, swarm: Swarm, concurrency: int) -> None:
        self.fetcher = fetcher
        self.swarm = swarm
        self.jobs: dict[str, WarmJob] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def me(self) -> str:
        """This host's address as other hosts know it."""
        host, port = self.swarm.advertise
        return f"[{host}]:{port}" if ":" in host else f"{host or '127.0.0.1'}:{port}"

    async def __aenter__(self) -> Warmer:
        tls = self.swarm.tls  # mutual TLS: other hosts' ports speak HTTPS, as to peers
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=POLL + 30, sock_connect=5),
            connector=aiohttp.TCPConnector(ssl=tls if tls is not None else True),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def hosts_for(self, hosts: object) -> list[str]:
        """The hosts a request names: none (this host), "all", or a list of host:port."""
        if hosts is None:
            return [self.me]
        if hosts == "all":
            now = self.swarm.clock()
            peers = [p.address for p in self.swarm.table.peers.values() if p.state(now) != "gone"]
            return [self.me, *sorted(set(peers) - {self.me})]
        if not isinstance(hosts, list) or not hosts or len(hosts) > MAX_HOSTS:
            raise BadRequest(f'hosts must be "all" or a list of 1-{MAX_HOSTS} "host:port"')
        out: list[str] = []
        for host in hosts:
            if not isinstance(host, str) or not _is_address(host):
                raise BadRequest(f"hosts: {str(host)[:100]!r} is not host:port")
            if host not in out:
                out.append(host)
        return out

    def submit(self, images: list[str], hosts: list[str]) -> WarmJob:
        """Start a job; it runs in the background (Busy, a 503, when MAX_RUNNING jobs
        run already)."""
        if sum(j.finished is None for j in self.jobs.values()) >= MAX_RUNNING:
            raise Busy(f"{MAX_RUNNING} warm jobs are running; try again later")
        job = WarmJob(secrets.token_hex(8), images, hosts)
        self.jobs[job.job_id] = job
        finished = [j for j in self.jobs.values() if j.finished is not None]
        for old in finished[: max(0, len(finished) - MAX_JOBS)]:
            del self.jobs[old.job_id]
        task = asyncio.create_task(self._run(job), name=f"warm-{job.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info(
            "warm job %s: %d image(s) on %d host(s): %s",
            job.job_id,
            len(images),
            len(hosts),
            ", ".join(images[:5]) + (" ..." if len(images) > 5 else ""),
        )
        return job

    async def _run(self, job: WarmJob) -> None:
        try:
            await asyncio.gather(*(self._image(job, image) for image in job.images))
        finally:
            job.finished = time.time()
            log.info("warm job %s %s: %s", job.job_id, job.state, job.describe()["counts"])

    async def _image(self, job: WarmJob, image: str) -> None:
        async with self._slots:
            # every host at once: the swarm makes that cost the origin about one copy
            await asyncio.gather(*(self._target(job, host, image) for host in job.hosts))

    async def _target(self, job: WarmJob, host: str, image: str) -> None:
        target = job.targets[host, image]
        target.state = "fetching"
        try:
            if host == self.me:
                await self._local(image, target)
            else:
                await self._remote(host, image, target)
        except SwarmcacheError as err:
            _fail(target, f"{err.error}: {err.detail}")
        except Exception as err:  # a bug: the job must still end, and say why
            log.exception("warm %s on %s crashed", image, host)
            _fail(target, f"{err.__class__.__name__}: {err}")
        if target.state == "failed":
            log.warning("warm %s on %s failed: %s", image, host, target.reason)

    async def _local(self, image: str, target: Target) -> None:
        fetcher = self.fetcher
        job = await fetcher.start(image)
        while job is not None and image in fetcher.jobs:
            progress = job.progress()
            target.bytes, target.size = job.image.present_bytes, job.image.manifest.size
            target.rate = progress["rate_bytes_per_s"]
            await fetcher.wait(image, 1.0)
        cached = fetcher.store.get(image)
        if cached is not None and cached.complete:
            _cached(target, cached.manifest.size)
            return
        failure = fetcher.failures.get(image)
        if failure is not None:
            raise failure.error
        raise ImageNotFound(f"image {image} is not in the cache after its fetch")

    async def _remote(self, host: str, image: str, target: Target) -> None:
        path = f"{self.swarm.scheme}://{host}/v1/images/{quote(image, safe='')}"
        status = await self._call(host, "POST", path + "/fetch")
        moved = time.monotonic()
        while True:
            state = status.get("state")
            done = int(status.get("bytes") or 0)
            if done != target.bytes:
                moved = time.monotonic()
            elif state == "fetching" and time.monotonic() - moved > STUCK:
                _fail(target, f"no progress on {host} for {STUCK:.0f}s (still fetching there)")
                return
            target.bytes = done
            target.size = status.get("size")
            target.rate = float((status.get("fetch") or {}).get("rate_bytes_per_s") or 0)
            if state == "complete":
                _cached(target, target.size)
                return
            if state in ("failed", "partial"):
                error = status.get("error") or {}
                _fail(target, f"{error.get('error', state)}: {error.get('detail', '')}")
                return
            status = await self._call(host, "GET", f"{path}/status?wait={POLL:g}")

    async def _call(self, host: str, method: str, url: str) -> dict[str, Any]:
        """A JSON request to a host's API; retried a few times if it cannot be reached."""
        assert self._session is not None
        last = ""
        for attempt in range(REMOTE_TRIES):
            try:
                headers = self._credentials(method, url)
                async with self._session.request(method, url, headers=headers) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status >= 400:
                        detail = body.get("detail") if isinstance(body, dict) else None
                        error = body.get("error") if isinstance(body, dict) else None
                        raise _RemoteError(f"{error or resp.status}: {detail or resp.reason}")
                    if not isinstance(body, dict):
                        raise _RemoteError(f"{host} answered {resp.status} without a status")
                    return body
            except _RemoteError:
                raise
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                last = f"{err.__class__.__name__}: {err}"
                if attempt + 1 < REMOTE_TRIES:  # 0.2 + 0.4 + 0.8 + 1.6 s in all
                    await asyncio.sleep(0.2 * 2**attempt)
        raise _RemoteError(f"cannot reach {host}: {last}")

    def _credentials(self, method: str, url: str) -> dict[str, str]:
        """What opens another host's API (access.py): the request signed with the
        cluster secret (good for this path, once, for a minute), or with mutual TLS our
        certificate, which the session presents. Never the API token: a
        caller on this host names the hosts, and the token would open every host's API
        to whoever answers at one of them."""
        path = URL(url).raw_path_qs
        return self.swarm.sign(method, path)[0]


class _RemoteError(SwarmcacheError):
    """A remote host refused or failed a warm (its message is the reason)."""

    error = "remote host"


def _cached(target: Target, size: int | None) -> None:
    target.state, target.size, target.bytes, target.rate = "cached", size, size or 0, 0.0


def _fail(target: Target, reason: str) -> None:
    target.state, target.reason, target.rate = "failed", reason, 0.0


# host:port only (a name, IPv4 or [IPv6]): nothing that could turn the URL the daemon
# builds from it into another one (a path, a query, credentials)
_ADDRESS = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})"
)


def _is_address(text: str) -> bool:
    m = _ADDRESS.fullmatch(text)
    return m is not None and 0 < int(m.group(1)) <= 65535


WARMER = web.AppKey("warmer", Warmer)


async def start_warm(request: web.Request) -> web.Response:
    """POST /v1/warm: {"images": [...], "hosts": "all" | [...]} -> 202 and the job."""
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest('the body must be JSON: {"images": [...], "hosts": ...}') from None
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"images": [...]}')
    images = body.get("images")
    if not isinstance(images, list) or not images or len(images) > MAX_IMAGES:
        raise BadRequest(f"images must be a list of 1-{MAX_IMAGES} image ids")
    ids = list(dict.fromkeys(validate_image_id(i) for i in images))
    warmer = request.app[WARMER]
    job = warmer.submit(ids, warmer.hosts_for(body.get("hosts")))
    resp = web.json_response(job.describe(), status=202)
    resp.headers["Location"] = f"/v1/warm/{job.job_id}"
    return resp


async def warm_status(request: web.Request) -> web.Response:
    """GET /v1/warm/{job}."""
    job = request.app[WARMER].jobs.get(request.match_info["job"])
    if job is None:
        raise NotFound(
            f"no warm job {request.match_info['job'][:64]!r} (finished jobs are kept: {MAX_JOBS})"
        )
    return web.json_response(job.describe())


def add_routes(app: web.Application) -> None:
    """The warm API's routes."""
    app.router.add_post("/v1/warm", start_warm)
    app.router.add_get("/v1/warm/{job}", warm_status)
