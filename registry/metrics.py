"""Prometheus metrics: one CollectorRegistry per application, no global state.

Every label has a bounded set of values: ``route`` is the route's family
("blobs", "manifests"...; never the raw path), ``method`` is one of the HTTP
methods the registry serves (anything else is "other"), ``status`` is a
number. A per-repository label exists only when
``extensions.metrics.repositoryLabels`` is on, for at most ``maxRepositories``
names; the rest are counted under "_other".

The request middleware (registry/api/observe.py) calls ``Metrics.record``
after each response is sent. That is the hot path, so the request series are
plain numbers in dictionaries, updated on the event loop (no locks, no label
children to look up), and turned into Prometheus families by a collector
when /metrics is scraped. Store-wide gauges (repositories, manifests, blobs,
bytes) are read from the metadata store at scrape time.
"""
from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from registry import __version__
from registry.config import Config

log = logging.getLogger("registry.metrics")

METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})
# Route families; "other" is a route nobody classified yet, "none" a request no route matched (404, 405).
ROUTES = ("base", "catalog", "blobs", "uploads", "manifests", "tags", "referrers", "healthz", "readyz", "metrics",
          "other", "none")
OCI_ROUTES = ROUTES[:7]
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
_LE = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]
OTHER_REPOSITORY = "_other"
# Store-wide counts are cached this long: several scrapers, or a fast scrape interval, cost one query set.
COUNTS_MAX_AGE = 5.0


def route_family(canonical: str, metrics_path: str) -> str:
    """The route label of a route pattern (``/v2/{name}/blobs/{digest}`` -> ``blobs``)."""
    if canonical.startswith("/v2/{"):
        for part, label in (("/blobs/uploads", "uploads"), ("/blobs/", "blobs"), ("/manifests/", "manifests"),
                            ("/tags/", "tags"), ("/referrers/", "referrers")):
            if part in canonical:
                return label
        return "other"
    if canonical in ("/v2", "/v2/"):
        return "base"
    if canonical.startswith("/v2/_catalog"):
        return "catalog"
    if canonical == metrics_path:
        return "metrics"
    if canonical in ("/healthz", "/readyz"):
        return canonical[1:]
    return "other"


class _RouteStats:
    """Duration histogram (per-bucket counts, not cumulative) and byte counters of one route."""
    __slots__ = ("buckets", "sum", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0


class StoreCollector(Collector):
    """Gauges from the metadata store's counts, refreshed by ``Metrics.refresh_store`` before a scrape."""

    def __init__(self, dedupe: bool):
        self.dedupe = dedupe
        self.counts: Any = None
        # Issue 5: the measured usage (maintenance/usage.py UsageCache), when the app set one up;
        # per-repository series for at most ``repository_cap`` names (0: none).
        self.usage: Any = None
        self.repository_cap = 0

    def collect(self) -> Iterable[Metric]:
        c = self.counts
        if c is None:
            return
        for name, doc, value in (
            ("registry_repositories", "Repositories.", c.repositories),
            ("registry_manifests", "Manifests, counted once per repository holding them.", c.manifests),
            ("registry_tags", "Tags.", c.tags),
            ("registry_blobs", "Distinct blobs (by digest).", c.blobs),
            ("registry_upload_sessions", "Upload sessions open (started, neither finished nor cancelled).",
             c.uploads),
            ("registry_storage_logical_bytes",
             "Bytes of blobs and manifests as clients see them: counted once per repository holding them.",
             c.logical_bytes),
            ("registry_storage_physical_bytes",
             "Bytes of blobs and manifests stored on disk: each distinct file (inode) once.",
             self._physical(c)),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield from self._per_repository()

    def _physical(self, c: Any) -> int:
        u = self.usage.latest if self.usage is not None else None
        if u is not None:
            return int(u.physical_bytes)
        return c.unique_bytes if self.dedupe else c.logical_bytes

    def _per_repository(self) -> Iterable[Metric]:
        """Opt-in (extensions.metrics.repositoryLabels): the largest repositories by logical
        bytes, at most maxRepositories of them; the rest are summed under _other."""
        u = self.usage.latest if self.usage is not None else None
        if u is None or self.repository_cap <= 0:
            return
        doc = f" (opt-in: repositoryLabels; beyond maxRepositories, summed under {OTHER_REPOSITORY})."
        logical = GaugeMetricFamily("registry_repository_storage_logical_bytes",
                                    "Bytes of the blobs and manifests a repository holds" + doc,
                                    labels=["repository"])
        physical = GaugeMetricFamily("registry_repository_storage_physical_bytes",
                                     "Bytes of the distinct files (inodes) a repository's content uses, "
                                     "shared ones included" + doc, labels=["repository"])
        ranked = sorted(u.repositories, key=lambda r: (-r.logical_bytes, r.repository))
        for r in ranked[:self.repository_cap]:
            logical.add_metric([r.repository], r.logical_bytes)
            physical.add_metric([r.repository], r.physical_bytes)
        rest = ranked[self.repository_cap:]
        if rest:
            logical.add_metric([OTHER_REPOSITORY], sum(r.logical_bytes for r in rest))
            physical.add_metric([OTHER_REPOSITORY], sum(r.physical_bytes for r in rest))
        yield logical
        yield physical


class Metrics(Collector):
    """The app's metrics registry, and the collector of the per-request series."""

    def __init__(self, cfg: Config):
        mc = cfg.extensions.metrics
        self.path = mc.effective_path
        self.repository_labels = mc.repository_labels
        self.max_repositories = mc.max_repositories
        self._requests: dict[tuple[str, str, int], int] = {}
        self._routes: dict[str, _RouteStats] = {route: _RouteStats() for route in OCI_ROUTES}
        self._repos: dict[str, list[int]] = {OTHER_REPOSITORY: [0, 0, 0]} if mc.repository_labels else {}
        self._in_flight: Callable[[], float] = lambda: 0
        self._uploads: Callable[[], float] = lambda: 0

        self.registry = r = CollectorRegistry()
        r.register(self)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.store = StoreCollector(cfg.storage.dedupe)
        self.store.repository_cap = mc.max_repositories if mc.repository_labels else 0
        r.register(self.store)
        self._counts_at = 0.0
        self._counts_lock = asyncio.Lock()

    def track_in_flight(self, requests: Callable[[], float], uploads: Callable[[], float]) -> None:
        """The in-flight gauges read the middleware's plain counters at scrape time."""
        self._in_flight, self._uploads = requests, uploads

    def record(self, method: str, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int,
               repository: str | None) -> None:
        """One request, after its response was sent. The hot path: a few dict and list updates."""
        key = (method, route, status)
        n = self._requests.get(key)
        if n is None and method not in METHODS:  # an arbitrary method token must not become a label
            key = ("other", route, status)
            n = self._requests.get(key)
        self._requests[key] = 1 if n is None else n + 1
        r = self._routes.get(route)
        if r is None:
            r = self._routes[route] = _RouteStats()
        r.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        r.sum += seconds
        r.bytes_in += bytes_in
        r.bytes_out += bytes_out
        if repository is not None and self.repository_labels:
            self._record_repository(repository, status, bytes_in, bytes_out)

    def _record_repository(self, repo: str, status: int, bytes_in: int, bytes_out: int) -> None:
        row = self._repos.get(repo)
        if row is None:
            # Only names that answered successfully take one of the capped slots: a scan of
            # made-up names must not fill them. (_other holds one entry of the dict.)
            if status < 400 and len(self._repos) <= self.max_repositories:
                row = self._repos[repo] = [0, 0, 0]
            else:
                row = self._repos[OTHER_REPOSITORY]
        row[0] += 1
        row[1] += bytes_in
        row[2] += bytes_out

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily("registry_http_requests", "HTTP requests answered, by method, route and "
                                       "status.", labels=["method", "route", "status"])
        for (method, route, status), n in sorted(self._requests.items()):
            requests.add_metric([method, route, str(status)], n)
        yield requests
        duration = HistogramMetricFamily("registry_http_request_duration_seconds",
                                         "Time from the start of a request until its response is sent, by route.",
                                         labels=["route"])
        bytes_in = CounterMetricFamily("registry_http_request_bytes",
                                       "Bytes of request bodies received, by route.", labels=["route"])
        bytes_out = CounterMetricFamily("registry_http_response_bytes",
                                        "Bytes of response bodies sent, by route.", labels=["route"])
        for route, r in sorted(self._routes.items()):
            total, cumulative = 0, []
            for le, n in zip(_LE, r.buckets):
                total += n
                cumulative.append((le, total))
            duration.add_metric([route], cumulative, r.sum)
            bytes_in.add_metric([route], r.bytes_in)
            bytes_out.add_metric([route], r.bytes_out)
        yield duration
        yield bytes_in
        yield bytes_out
        yield GaugeMetricFamily("registry_http_requests_in_flight", "Requests being handled now.",
                                value=self._in_flight())
        yield GaugeMetricFamily("registry_uploads_in_progress",
                                "Upload requests (POST, PATCH, PUT of blob data) being received now.",
                                value=self._uploads())
        info = GaugeMetricFamily("registry_build_info", "The registry's version (always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if self.repository_labels:
            doc = (" (opt-in: extensions.metrics.repositoryLabels; names beyond maxRepositories count as "
                   f"{OTHER_REPOSITORY}).")
            families = [CounterMetricFamily("registry_repository_requests", "HTTP requests by repository" + doc,
                                            labels=["repository"]),
                        CounterMetricFamily("registry_repository_request_bytes",
                                            "Bytes of request bodies received, by repository" + doc,
                                            labels=["repository"]),
                        CounterMetricFamily("registry_repository_response_bytes",
                                            "Bytes of response bodies sent, by repository" + doc,
                                            labels=["repository"])]
            for repo, row in sorted(self._repos.items()):
                for family, value in zip(families, row):
                    family.add_metric([repo], value)
            yield from families

    async def refresh_store(self, meta: Any) -> None:
        """Read the store-wide counts (at most every COUNTS_MAX_AGE seconds). A store without
        ``counts()`` or one that fails leaves those gauges out of the scrape rather than failing it."""
        counts = getattr(meta, "counts", None)
        if counts is None:
            return
        async with self._counts_lock:
            now = time.monotonic()
            if self.store.counts is not None and now - self._counts_at < COUNTS_MAX_AGE:
                return
            try:
                self.store.counts = await counts()
                self._counts_at = now
                if self.store.usage is not None:  # issue 5: physical bytes measured on disk
                    try:
                        await self.store.usage.refresh()
                    except Exception as exc:  # the last measure (or the estimate from counts) stands
                        log.warning("metrics: measuring storage usage failed: %s", exc)
            except Exception as exc:  # report in the log; the scrape goes on without these series
                self.store.counts = None
                log.warning("metrics: reading counts from the metadata store failed: %s", exc)

    def expose(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when the Accept header asks) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
