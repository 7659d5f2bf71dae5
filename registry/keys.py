"""Every AppKey: long-lived objects made in the app factory's cleanup contexts."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from registry.api.observe import Observer
from registry.config import Config
from registry.meta.base import MetaStore
from registry.metrics import Metrics
from registry.reload import Tunables
from registry.services.blobs import Blobs
from registry.services.layout import Layout
from registry.services.manifests import Manifests
from registry.services.uploads import Uploads
from registry.storage.base import Storage


@dataclass
class Services:
    meta: MetaStore
    storage: Storage
    layout: Layout
    blobs: Blobs
    uploads: Uploads
    manifests: Manifests


CONFIG = web.AppKey("config", Config)
BACKGROUND = web.AppKey("background", bool)  # this process runs GC and scrub on their intervals
SERVICES = web.AppKey("services", Services)
# Issue 8: the per-app metrics registry (absent when extensions.metrics.enable is off), the request
# middleware's state (requests in flight), and the settings SIGHUP may change (gc, scrub).
METRICS = web.AppKey("metrics", Metrics)
OBSERVER = web.AppKey("observer", Observer)
TUNABLES = web.AppKey("tunables", Tunables)
# Issue 4: the storage (filesystem, S3, or a router over subPaths), opened and closed in its own
# cleanup context, before the services and after them.
STORAGE = web.AppKey("storage", Storage)
