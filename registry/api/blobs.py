"""GET/HEAD/DELETE /v2/<name>/blobs/<digest> (end-2, end-10)."""
from __future__ import annotations

from aiohttp import web

from registry.api.common import path_digest, repo_name, services

OCTET = "application/octet-stream"


async def get_blob(request: web.Request) -> web.StreamResponse:
    repo, digest = repo_name(request), path_digest(request)
    svc = services(request)
    size = await svc.blobs.size(repo, digest)
    headers = {"Docker-Content-Digest": str(digest), "Content-Type": OCTET,
               "Cache-Control": "max-age=31536000", "Accept-Ranges": "bytes"}
    if request.method == "HEAD":
        headers["Content-Length"] = str(size)
        return web.Response(headers=headers)
    path = svc.blobs.local_path(repo, digest)
    assert path is not None, "only local storage is wired for now"
    resp = web.FileResponse(path, headers=headers)
    resp.etag = digest.hex  # the digest is the strongest validator there is
    return resp


async def delete_blob(request: web.Request) -> web.Response:
    repo, digest = repo_name(request), path_digest(request)
    await services(request).blobs.delete(repo, digest)
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})
