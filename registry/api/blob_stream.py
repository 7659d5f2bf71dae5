"""GET of a blob kept on a remote store (S3): a 307 to a presigned URL when the
driver's ``redirect`` is on; else from the local read cache (sendfile) when the
blob is there; else streamed from the store, whole or a single ``Range``
(206, or 416 with the spec's error body), filling the cache on the way when
the whole blob is asked for. Memory stays at one read chunk per response.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from aiohttp import web

from registry.digest import Digest
from registry.errors import RegistryError
from registry.storage.base import NotFound, StorageError

log = logging.getLogger("registry.api")
INLINE_WRITE = 256 << 10


def _wanted_range(request: web.Request, size: int, etag: str) -> tuple[int, int] | None:
    """(start, stop) of a single byte range asked for (stop exclusive); None for the whole blob."""
    if "Range" not in request.headers:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() not in (f'"{etag}"', etag):
        return None  # the validator does not match: the whole blob (RFC 9110, 13.1.5)
    try:
        rng: slice | None = request.http_range
    except ValueError:
        rng = None
    bad = RegistryError("RANGE_INVALID", {"range": request.headers["Range"][:100], "size": size},
                        status=416, headers={"Content-Range": f"bytes */{size}"})
    if rng is None:
        raise bad
    start, stop = rng.start, rng.stop
    if start is None and stop is None:
        return None
    if start is not None and start < 0:  # a suffix: the last -start bytes
        start, stop = max(size + start, 0), size
    else:
        start = start or 0
        stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise bad
    return start, stop


async def serve_remote(request: web.Request, svc: Any, repo: str, digest: Digest, size: int,
                       headers: dict[str, str]) -> web.StreamResponse:
    storage = svc.storage
    key = svc.blobs.key(repo, digest)
    own_key = f"{repo}/{digest.path}"  # where a manifest's bytes are, on a store with shared blobs
    route = getattr(storage, "route", None)
    driver, inner = route(key) if route is not None else (storage, key)
    rng = _wanted_range(request, size, digest.hex)

    if getattr(driver, "redirect", False):
        if key != own_key:  # a shared blob key: the digest may be a manifest's, under the repository
            try:
                await driver.stat(inner)
            except NotFound:
                driver, inner = route(own_key) if route is not None else (storage, own_key)
        url = await driver.presign(inner)
        return web.Response(status=307, headers={"Location": url, "Docker-Content-Digest": str(digest)})

    cache = getattr(driver, "cache", None)
    name = f"{digest.algorithm}-{digest.hex}"
    if cache is not None:
        path = cache.get(name)
        if path is not None:
            resp = web.FileResponse(path, headers=headers)
            resp.etag = digest.hex
            return resp

    opener = getattr(driver, "open_range", None)
    if opener is None:  # pragma: no cover - every remote driver streams
        raise StorageError("the storage driver can neither serve a file nor stream")
    start, end = (rng[0], rng[1] - 1) if rng else (0, None)
    try:
        length, chunks = await opener(inner, start, end)
    except NotFound:
        length, chunks = -1, None
        if own_key != key:
            d2, k2 = route(own_key) if route is not None else (storage, own_key)
            try:
                length, chunks = await d2.open_range(k2, start, end)
            except NotFound:
                pass
    expected = (rng[1] - rng[0]) if rng else size
    if chunks is None or length != expected:
        if chunks is not None:
            await chunks.aclose()  # type: ignore[attr-defined]
        log.error("blob %s of %s is recorded (%d bytes) but the store has %s; run registry reindex", digest,
                  repo, size, "no object" if chunks is None else f"{length} bytes for the range asked")
        raise RegistryError("BLOB_UNKNOWN", {"digest": str(digest)})

    resp = web.StreamResponse(status=206 if rng else 200, headers=headers)
    resp.content_length = length
    resp.etag = digest.hex
    if rng:
        resp.headers["Content-Range"] = f"bytes {rng[0]}-{rng[1] - 1}/{size}"
    fill = cache.fill(name, size) if cache is not None and rng is None else None
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for data in _guarded(chunks, request, digest, repo):
                await resp.write(data)
                if fill is not None:
                    if len(data) < INLINE_WRITE:
                        fill.write(data)
                    else:
                        await loop.run_in_executor(None, fill.write, data)
    except _Cut:
        if fill is not None:
            fill.abort()
        return resp
    except BaseException:
        if fill is not None:
            fill.abort()
        raise
    if fill is not None:
        await loop.run_in_executor(None, fill.commit)
    await resp.write_eof()
    return resp


class _Cut(Exception):
    """The store failed after the response started: the connection is closed instead."""


async def _guarded(chunks: AsyncIterator[bytes], request: web.Request, digest: Digest,
                   repo: str) -> AsyncIterator[bytes]:
    try:
        async for data in chunks:
            yield data
    except StorageError as exc:
        # Headers are out: no error body can follow. Closing the connection makes the short
        # body visible to the client, which retries (Range lets it resume).
        log.error("storage failed while sending blob %s of %s: %s", digest, repo, exc)
        if request.transport is not None:
            request.transport.close()
        raise _Cut() from None
