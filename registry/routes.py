"""The route table; each line names the spec endpoint it serves (distribution-spec
v1.1 "end-N" ids). Repository names contain slashes, so ``name`` is matched
greedily and validated by the handler (a bad name is NAME_INVALID, not 404)."""
from __future__ import annotations

from aiohttp import web

from registry.api import scrub, base, blobs, catalog, manifests, ops, referrers, tags, uploads
from registry.keys import CONFIG

N = "/v2/{name:.+}"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2/", base.version_check)                                        # end-1
    r.add_get("/v2", base.version_check)                                         # end-1 (no slash)
    r.add_get("/v2/_catalog", catalog.catalog)                                   # catalog extension
    r.add_get(N + "/blobs/uploads/{upload}", uploads.upload_status)              # end-13
    r.add_patch(N + "/blobs/uploads/{upload}", uploads.patch_upload)             # end-5
    r.add_put(N + "/blobs/uploads/{upload}", uploads.finish_upload)              # end-6
    r.add_delete(N + "/blobs/uploads/{upload}", uploads.cancel_upload)           # cancel an upload
    r.add_post(N + "/blobs/uploads/", uploads.start_upload)                      # end-4a, end-4b, end-11
    r.add_post(N + "/blobs/uploads", uploads.start_upload)                       # (no trailing slash)
    r.add_get(N + "/blobs/{digest}", blobs.get_blob)                             # end-2 (GET and HEAD)
    r.add_delete(N + "/blobs/{digest}", blobs.delete_blob)                       # end-10
    r.add_get(N + "/manifests/{reference}", manifests.get_manifest)              # end-3 (GET and HEAD)
    r.add_put(N + "/manifests/{reference}", manifests.put_manifest)              # end-7
    r.add_delete(N + "/manifests/{reference}", manifests.delete_manifest)        # end-9
    r.add_get(N + "/tags/list", tags.list_tags)                                  # end-8a, end-8b
    r.add_get(N + "/referrers/{digest}", referrers.list_referrers)              # end-12a, end-12b
    # Operations (not in the spec): liveness, readiness, Prometheus metrics.
    r.add_get("/healthz", ops.healthz)
    r.add_get("/readyz", ops.readyz)
    r.add_get("/_registry/scrub", scrub.scrub_report)                           # scrub report (JSON)
    metrics = app[CONFIG].extensions.metrics
    if metrics.enable:
        r.add_get(metrics.effective_path, ops.metrics)
