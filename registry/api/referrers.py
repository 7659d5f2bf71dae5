"""GET /v2/<name>/referrers/<digest>[?artifactType=] (end-12a, end-12b)."""
from __future__ import annotations

import json

from aiohttp import web

from registry.api.common import path_digest, repo_name, services
from registry.services.manifests import OCI_INDEX


async def list_referrers(request: web.Request) -> web.Response:
    repo, digest = repo_name(request), path_digest(request)
    artifact_type = request.query.get("artifactType") or None
    if artifact_type is not None and "\x00" in artifact_type:
        manifests = []  # no stored artifactType holds a NUL
    else:
        manifests = await services(request).manifests.referrers(repo, digest, artifact_type)
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return web.Response(body=json.dumps(body).encode(), headers=headers)
