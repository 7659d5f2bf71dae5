"""create_app(config) -> web.Application. Long-lived objects are made in cleanup
contexts and reached through the AppKeys in keys.py."""
from __future__ import annotations

import logging
from typing import AsyncIterator

from aiohttp import web

from registry.api.middleware import API_VERSION, errors
from registry.api.observe import Observer
from registry.config import Config
from registry.keys import BACKGROUND, CONFIG, METRICS, OBSERVER, SERVICES, STORAGE, TUNABLES, Services
from registry.maintenance.dedupe import DedupeRunner
from registry.maintenance.gc import GCStats, collect
from registry.maintenance.reindex import reindex_new_layouts
from registry.maintenance.scheduler import Periodic
from registry.maintenance.scrub import ScrubStats, scheduled_scrub
from registry.meta.factory import open_meta
from registry.metrics import Metrics
from registry.reload import Tunables
from registry.routes import add_routes
from registry.services.blobs import Blobs
from registry.services.layout import Layout
from registry.services.manifests import Manifests
from registry.services.uploads import Uploads
from registry.storage.factory import storage_ctx

log = logging.getLogger("registry")


async def _add_version_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(API_VERSION)


def build_services(cfg: Config, meta, storage, tunables: Tunables | None = None) -> Services:  # type: ignore[no-untyped-def]
    layout = Layout(meta, storage)
    blobs = Blobs(cfg, meta, storage, layout, tunables)
    return Services(meta=meta, storage=storage, layout=layout, blobs=blobs,
                    uploads=Uploads(meta, storage, blobs), manifests=Manifests(cfg, meta, blobs, layout))


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    storage = app[STORAGE]
    async with open_meta(cfg) as meta:
        tunables = app[TUNABLES]
        svc = build_services(cfg, meta, storage, tunables)
        app[SERVICES] = svc
        repaired = await svc.layout.repair()
        if repaired:
            log.warning("rewrote index.json of %d repositories left stale by an interrupted run", repaired)
        await reindex_new_layouts(svc)
        stats = GCStats()
        if METRICS in app:
            app[METRICS].registry.register(stats)
        gc = Periodic("gc", lambda: collect(svc, delete_untagged=cfg.storage.gc_delete_untagged,
                                            upload_ttl=cfg.uploads.ttl),
                      lambda: tunables.gc_interval if tunables.gc else 0, stats.record)
        scrub_stats = ScrubStats()
        # the last complete pass before this start (this server's, another replica's, the CLI's)
        scrub_stats.last_complete = (await meta.scrub_state()).last_complete or 0.0
        if METRICS in app:
            app[METRICS].registry.register(scrub_stats)
        scrubber = Periodic("scrub", lambda: scheduled_scrub(svc, interval=tunables.scrub.interval,
                                                             bytes_per_second=tunables.scrub.bytes_per_second),
                            lambda: tunables.scrub.interval if tunables.scrub.enable else 0, scrub_stats.record)
        unsubscribe = tunables.subscribe(lambda _: (gc.wake(), scrubber.wake()))
        if app[BACKGROUND]:
            gc.start()
            scrubber.start()
        # Issue 5: a walk when the files do not match storage.dedupe; usage in /metrics.
        dedupe = DedupeRunner(svc, cfg, app[METRICS] if METRICS in app else None)
        if app[BACKGROUND]:
            dedupe.start()
        try:
            yield
        finally:
            unsubscribe()
            await gc.stop()
            await scrubber.stop()
            await dedupe.stop()


def _routing_middleware(cfg: Config) -> list:  # type: ignore[type-arg]
    """storage.subPaths: the repository of each request picks the driver of the uploads it starts."""
    if not cfg.storage.sub_paths:
        return []
    from registry.storage.routing import middleware
    return [middleware]


def create_app(cfg: Config, *, background: bool = True) -> web.Application:
    """``background``: run GC and scrub on their intervals (one process of several does)."""
    # Metrics, request ids and the access log (issue 8): the observer middleware runs outermost.
    metrics = Metrics(cfg) if cfg.extensions.metrics.enable else None
    observer = Observer(metrics, cfg.extensions.metrics.effective_path)
    app = web.Application(middlewares=[observer.middleware(), errors] + _routing_middleware(cfg),
                          client_max_size=cfg.uploads.max_manifest_size + 1)
    app[CONFIG] = cfg
    app[BACKGROUND] = background
    app[OBSERVER] = observer
    app[TUNABLES] = Tunables.from_config(cfg)
    if metrics is not None:
        app[METRICS] = metrics
    app.cleanup_ctx.append(storage_ctx(STORAGE))  # S3: client made and bucket checked here
    app.cleanup_ctx.append(_services_ctx)
    app.on_response_prepare.append(_add_version_header)
    add_routes(app)
    return app
