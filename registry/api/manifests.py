"""Manifests: GET/HEAD (end-3), PUT (end-7), DELETE (end-9)."""
from __future__ import annotations

from aiohttp import web

from registry.api.common import repo_name, services
from registry.errors import RegistryError
from registry.keys import CONFIG


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise RegistryError("SIZE_INVALID", f"manifests are limited to {limit} bytes", status=413)
    body = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise RegistryError("SIZE_INVALID", f"manifests are limited to {limit} bytes", status=413)


async def get_manifest(request: web.Request) -> web.Response:
    repo = repo_name(request)
    m = await services(request).manifests.get(repo, request.match_info["reference"])
    headers = {"Docker-Content-Digest": m.digest, "Content-Type": m.media_type, "ETag": f'"{m.digest}"'}
    if request.method == "HEAD":
        headers["Content-Length"] = str(m.size)
        return web.Response(headers=headers)
    return web.Response(body=m.payload, headers=headers)


async def put_manifest(request: web.Request) -> web.Response:
    repo, reference = repo_name(request), request.match_info["reference"]
    svc = services(request)
    body = await _read_body(request, request.app[CONFIG].uploads.max_manifest_size)
    pushed = await svc.manifests.put(repo, reference, request.headers.get("Content-Type"), body,
                                     request.query.getall("tag", []))
    headers = {"Location": f"/v2/{repo}/manifests/{pushed.digest}", "Docker-Content-Digest": str(pushed.digest),
               "Content-Length": "0"}
    if pushed.subject:
        headers["OCI-Subject"] = pushed.subject
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    repo = repo_name(request)
    await services(request).manifests.delete(repo, request.match_info["reference"])
    return web.Response(status=202)
