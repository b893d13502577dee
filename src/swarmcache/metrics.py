"""Prometheus metrics, one registry per daemon (so tests can run several daemons)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cache_hits = Counter(
            "swarmcache_cache_hits", "Image reads served from a complete cached copy", registry=r
        )
        self.cache_misses = Counter(
            "swarmcache_cache_misses", "Image reads that needed a fetch", registry=r
        )
        self.bytes_fetched = Counter(
            "swarmcache_fetched_bytes", "Image bytes fetched, by source", ["source"], registry=r
        )
        self.bytes_served = Counter(
            "swarmcache_served_bytes", "Image bytes sent to clients", registry=r
        )
        self.bytes_served_peers = Counter(
            "swarmcache_served_peer_bytes", "Chunk bytes sent to peers", registry=r
        )
        self.bytes_relayed = Counter(
            "swarmcache_relayed_bytes",
            "Chunk bytes sent to peers while they still arrived here from another peer",
            registry=r,
        )
        self.fetch_duration = Histogram(
            "swarmcache_fetch_duration_seconds",
            "Time from fetch start to verified image",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.chunk_latency = Histogram(
            "swarmcache_chunk_fetch_seconds",
            "Time to fetch one chunk, by source",
            ["source"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.glance_downloads = Counter(
            "swarmcache_glance_downloads",
            "Image downloads on the Glance-compatible endpoint, by outcome: swarm (served "
            "by swarmcache), passed (handed to Glance: no hash, too big, swarmcache's own "
            "reads could not start), refused (Glance refused the caller: 4xx), error "
            "(Glance failed: 5xx or unreachable)",
            ["outcome"],
            registry=r,
        )
        self.peer_auth_failures = Counter(
            "swarmcache_peer_auth_failures",
            "Peer requests refused (401) for lacking proof of the cluster secret",
            registry=r,
        )
        self.api_auth_failures = Counter(
            "swarmcache_api_auth_failures",
            "Client API requests refused (401, 403) from callers not on this host",
            registry=r,
        )
        self.peer_requests_refused = Counter(
            "swarmcache_peer_requests_refused",
            "Peer requests answered 503 at once for [limits] max_peer_connections",
            registry=r,
        )
        self.fetches = Counter(
            "swarmcache_fetches", "Fetches finished, by result", ["result"], registry=r
        )
        self.verification_failures = Counter(
            "swarmcache_verification_failures",
            "Chunks or images that failed verification",
            ["kind"],
            registry=r,
        )
        self.source_errors = Counter(
            "swarmcache_source_errors",
            "Failed reads from a source (after its retries), by source",
            ["source"],
            registry=r,
        )
        self.peer_errors = Counter(
            "swarmcache_peer_errors",
            "Failed chunk reads, bad messages and lost links with peers",
            registry=r,
        )
        self.block_requests = Counter(
            "swarmcache_peer_block_requests",
            "Block requests this daemon made of peers, by result (ok, busy: no upload "
            "slot for us, gone: the peer left meanwhile, failed, bad: wrong bytes)",
            ["result"],
            registry=r,
        )
        self.peer_quarantines = Counter(
            "swarmcache_peer_quarantines",
            "Peers quarantined for sending bytes that failed verification",
            registry=r,
        )
        self.evictions = Counter(
            "swarmcache_evictions", "Images evicted to stay under max_size", registry=r
        )

    def add_state_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register gauges computed at scrape time (cache size, images by state)."""
        self.registry.register(_Callback(collect))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def describe(self) -> Iterable[Metric]:
        return []


def gauge(
    name: str,
    doc: str,
    value: float | None = None,
    labelled: dict[str, float] | None = None,
    label: str = "",
) -> GaugeMetricFamily:
    """A gauge family with one value or one value per label."""
    if labelled is None:
        return GaugeMetricFamily(name, doc, value=value)
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key, v in labelled.items():
        g.add_metric([key], v)
    return g
