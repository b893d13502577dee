"""One exception tree for the whole daemon.

Every error the daemon raises on purpose derives from SwarmcacheError and carries
an HTTP status hint; the API middleware is the only place that turns it into a
response, so the rest of the code never imports aiohttp.web to report a failure.
"""

from __future__ import annotations

import asyncio


class SwarmcacheError(Exception):
    """Root of every error swarmcache raises on purpose."""

    status = 500
    error = "internal error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(SwarmcacheError, ValueError):
    """The configuration file or an environment override is invalid."""

    error = "invalid configuration"

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


class StartupError(SwarmcacheError):
    """The daemon cannot start (its address is taken or cannot be resolved)."""

    error = "cannot start"


class BadRequest(SwarmcacheError, ValueError):
    """A request is malformed (bad image id, bad parameter)."""

    status = 400
    error = "bad request"


class InvalidImageId(BadRequest):
    """An image id does not match the allowed pattern."""

    error = "invalid image id"


class ImageNotFound(SwarmcacheError, LookupError):
    """The image is neither in the cache nor at the origin."""

    status = 404
    error = "image not found"


class Unauthorized(SwarmcacheError):
    """A request without proof of the cluster secret or the API token."""

    status = 401
    error = "unauthorized"


class Forbidden(SwarmcacheError):
    """A request from elsewhere to an API that answers this host only."""

    status = 403
    error = "forbidden"


class NotFound(SwarmcacheError, LookupError):
    """A thing the API names (a warm job) does not exist."""

    status = 404
    error = "not found"


class ImageBusy(SwarmcacheError):
    """The image is being read or fetched, so it cannot be removed now."""

    status = 409
    error = "image busy"


class RangeNotSatisfiable(SwarmcacheError):
    """A Range header asks for bytes outside the image."""

    status = 416
    error = "range not satisfiable"

    def __init__(self, detail: str, size: int) -> None:
        super().__init__(detail)
        self.size = size


class PreconditionFailed(SwarmcacheError):
    """A conditional request's precondition (If-Match) does not hold."""

    status = 412
    error = "precondition failed"


class CannotSign(SwarmcacheError):
    """A held image whose manifest cannot be signed as it is."""

    status = 409
    error = "cannot sign"


class NotASeeder(SwarmcacheError):
    """A seed request to a daemon that does not sign manifests."""

    status = 409
    error = "not a seeder"


class ShuttingDown(SwarmcacheError):
    """The daemon is stopping and starts no new fetch."""

    status = 503
    error = "shutting down"


class Busy(SwarmcacheError):
    """Too much of something runs already (warm jobs); try again later."""

    status = 503
    error = "busy"


class GlanceUnreachable(SwarmcacheError):
    """Glance did not answer the Glance-compatible endpoint (connection refused,
    timeout, nonsense): 503, which nova retries."""

    status = 503
    error = "glance unreachable"


class OriginError(SwarmcacheError):
    """The origin store failed to deliver (after retries)."""

    status = 502
    error = "origin unavailable"

    def __init__(
        self, detail: str, *, retryable: bool = True, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.retryable = retryable
        self.retry_after = retry_after  # seconds the origin asked us to wait, if it did


class OriginNotFound(OriginError, ImageNotFound):
    """The origin answered that it has no such image."""

    status = 404
    error = "image not found at origin"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retryable=False)


class OriginInvalid(OriginError):
    """The origin answered something unusable (bad sidecar, wrong range, no Range support)."""

    error = "unusable origin answer"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retryable=False)


class OriginChanged(OriginError):
    """The image changed at the origin while it was being fetched (the next fetch restarts)."""

    error = "image changed at origin"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retryable=False)


class OriginDenied(OriginError):
    """The origin refused our credentials (401 after a renewed token, or 403)."""

    error = "origin refused access"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retryable=False)


class ImageNotActive(OriginError):
    """The origin has the image but will not serve its bytes yet (Glance: not active)."""

    status = 409
    error = "image not active"

    def __init__(self, detail: str, image_status: str) -> None:
        super().__init__(detail, retryable=False)
        self.image_status = image_status


class OriginTimeout(OriginError, asyncio.TimeoutError):
    """The origin did not answer in time (after retries)."""

    status = 504
    error = "origin timeout"


class IntegrityError(SwarmcacheError):
    """Bytes failed verification (chunk digest or whole-image checksum)."""

    status = 502
    error = "verification failed"


class ManifestRefuted(IntegrityError):
    """The origin names another version of an image than the manifest a peer gave."""


class StorageError(SwarmcacheError, OSError):
    """The cache directory could not take the data (disk full, I/O error)."""

    status = 507
    error = "cache storage error"


class FetchFailed(SwarmcacheError):
    """A fetch ended without a complete image for a reason of its own (cancelled, a bug)."""

    status = 502
    error = "fetch failed"


class PeerError(SwarmcacheError):
    """A peer failed, misbehaved or sent something unusable (we then use another source)."""

    status = 502
    error = "peer error"


class StreamRefused(PeerError):
    """A peer does not have a chunk to stream to us (yet): not a failure of the peer."""


class PeerGone(PeerError):
    """A read from a peer ended because the peer is gone (link lost, down, quarantined):
    counted where it went away, not once more per read."""


class PeerLacks(PeerGone):
    """A peer answered 404 for a block it announced: it dropped the image (evicted)
    since, or it claims what it does not hold. Either way it is no source of it now."""
