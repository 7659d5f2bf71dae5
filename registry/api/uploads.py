"""Blob uploads: POST (end-4a/4b, mount end-11), PATCH (end-5), PUT (end-6),
GET status (end-13), DELETE (cancel)."""
from __future__ import annotations

import re

from aiohttp import web

from registry.api.common import body_chunks, has_body, repo_name, services
from registry.digest import parse_digest
from registry.errors import RegistryError

_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(\d+|\*))?")


def _session_headers(repo: str, upload_id: str, size: int) -> dict[str, str]:
    return {"Location": f"/v2/{repo}/blobs/uploads/{upload_id}", "Docker-Upload-UUID": upload_id,
            "Range": f"0-{max(size - 1, 0)}", "Content-Length": "0"}


def _chunk_min(request: web.Request, repo: str, headers: dict[str, str]) -> dict[str, str]:
    """OCI-Chunk-Min-Length (distribution-spec 1.1): on S3, a chunk below one multipart part
    costs a round through the local spool and the bucket; ask clients for parts."""
    storage = services(request).storage
    per_repo = getattr(storage, "chunk_min_length_for", None)
    n = per_repo(repo) if per_repo is not None else getattr(storage, "chunk_min_length", None)
    if n:
        headers["OCI-Chunk-Min-Length"] = str(n)
    return headers


def _created(repo: str, digest: str) -> web.Response:
    return web.Response(status=201, headers={"Location": f"/v2/{repo}/blobs/{digest}",
                                             "Docker-Content-Digest": digest, "Content-Length": "0"})


async def start_upload(request: web.Request) -> web.Response:
    repo = repo_name(request)
    svc = services(request)
    mount = request.query.get("mount")
    if mount is not None:
        try:
            digest = parse_digest(mount)
        except RegistryError:
            digest = None  # a bad mount request falls back to a normal upload
        if digest is not None and await svc.blobs.mount(repo, digest, request.query.get("from")):
            return _created(repo, str(digest))
    elif "digest" in request.query:
        digest = parse_digest(request.query["digest"])
        await svc.uploads.monolithic(repo, digest, body_chunks(request))
        return _created(repo, str(digest))
    up = await svc.uploads.start(repo)
    return web.Response(status=202, headers=_chunk_min(request, repo, _session_headers(repo, up.id, 0)))


def _content_range(request: web.Request) -> int | None:
    text = request.headers.get("Content-Range")
    if text is None:
        return None
    m = _CONTENT_RANGE.fullmatch(text.strip())
    if not m or int(m.group(2)) < int(m.group(1)):
        raise RegistryError("RANGE_INVALID", f"malformed Content-Range {text[:100]!r}", status=416)
    start, end = int(m.group(1)), int(m.group(2))
    length = request.content_length
    if length is not None and length != end - start + 1:
        raise RegistryError("RANGE_INVALID", f"Content-Range {text} does not match Content-Length {length}",
                            status=416)
    return start


async def patch_upload(request: web.Request) -> web.Response:
    repo, upload_id = repo_name(request), request.match_info["upload"]
    start = _content_range(request)
    up = await services(request).uploads.patch(repo, upload_id, body_chunks(request), start)
    return web.Response(status=202, headers=_chunk_min(request, repo, _session_headers(repo, up.id, up.size)))


async def finish_upload(request: web.Request) -> web.Response:
    repo, upload_id = repo_name(request), request.match_info["upload"]
    digest = parse_digest(request.query.get("digest"))
    chunks = body_chunks(request) if has_body(request) else None
    await services(request).uploads.finish(repo, upload_id, digest, chunks)
    return _created(repo, str(digest))


async def upload_status(request: web.Request) -> web.Response:
    repo, upload_id = repo_name(request), request.match_info["upload"]
    up = await services(request).uploads.get(repo, upload_id)
    return web.Response(status=204, headers=_chunk_min(request, repo, _session_headers(repo, up.id, up.size)))


async def cancel_upload(request: web.Request) -> web.Response:
    repo, upload_id = repo_name(request), request.match_info["upload"]
    await services(request).uploads.cancel(repo, upload_id)
    return web.Response(status=204)
