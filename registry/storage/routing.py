"""zot's ``storage.subPaths``: repository-name prefixes kept on other roots or drivers
(``/team-a`` on a local disk, everything else on S3), behind one Storage.

Keys of a repository (``<repo>/...``) go to the driver of the longest prefix
the repository name falls under, the default driver otherwise. A driver's own
keys that name no repository (a shared blob ``blobs/<alg>/<hex>``, a set-aside
``_trash/...``) are handed out as ``_sub/<n>/<key>`` for the n-th subpath, so
they come back to the driver that made them.

Upload data is kept by upload id, with no repository in the Protocol: the
driver of a new upload is the one of the repository the request is for
(``UPLOAD_REPO``, set per request by ``middleware``); a process that meets an
upload it did not start asks each driver for it. Should an upload end up on
another driver than its blob's (a request outside the API), placing it streams
it across.
"""
from __future__ import annotations

import contextvars
from pathlib import Path
from typing import AsyncIterator, Iterable

from aiohttp import web

from registry.digest import Digest, Hasher
from registry.storage.base import NotFound, Storage

UPLOAD_REPO: contextvars.ContextVar[str | None] = contextvars.ContextVar("upload_repo", default=None)
SUB = "_sub"


@web.middleware
async def middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """The repository of this request, for the driver of an upload it starts."""
    token = UPLOAD_REPO.set(request.match_info.get("name"))
    try:
        return await handler(request)
    finally:
        UPLOAD_REPO.reset(token)


class RoutingStorage:
    def __init__(self, default: Storage, routes: list[tuple[str, Storage]]):
        self.default = default
        self.routes = [(p.strip("/"), d) for p, d in routes]  # n-th subpath is routes[n]
        self._by_length = sorted(range(len(self.routes)), key=lambda i: -len(self.routes[i][0]))
        self.drivers: list[Storage] = [default] + [d for _, d in self.routes]
        self.shared_blobs = any(getattr(d, "shared_blobs", False) for d in self.drivers)
        self._uploads: dict[str, Storage] = {}

    # -- which driver
    def _index_for_repo(self, repo: str) -> int | None:
        for i in self._by_length:
            prefix = self.routes[i][0]
            if repo == prefix or repo.startswith(prefix + "/"):
                return i
        return None

    def driver_for_repo(self, repo: str) -> Storage:
        i = self._index_for_repo(repo)
        return self.default if i is None else self.routes[i][1]

    def route(self, key: str) -> tuple[Storage, str]:
        """(driver, the driver's own key) of a key this storage handed out."""
        if key.startswith(SUB + "/"):
            _, n, rest = key.split("/", 2)
            return self.routes[int(n)][1], rest
        i = self._index_for_repo(key)
        return (self.default if i is None else self.routes[i][1]), key

    def _outer(self, i: int | None, key: str) -> str:
        """The key to hand out for driver ``i``'s own ``key``."""
        if i is None:
            return key
        prefix = self.routes[i][0]
        return key if key == prefix or key.startswith(prefix + "/") else f"{SUB}/{i}/{key}"

    def _index_of(self, driver: Storage) -> int | None:
        for i, (_, d) in enumerate(self.routes):
            if d is driver:
                return i
        return None

    # -- what the API and services ask
    def blob_key(self, repo: str, digest: Digest) -> str:
        i = self._index_for_repo(repo)
        d = self.default if i is None else self.routes[i][1]
        return self._outer(i, d.blob_key(repo, digest))

    def local_path(self, key: str) -> Path | None:
        d, k = self.route(key)
        return d.local_path(k)

    def chunk_min_length_for(self, repo: str) -> int | None:
        return getattr(self.driver_for_repo(repo), "chunk_min_length", None)

    def describe(self) -> str:
        parts = [getattr(self.default, "describe", lambda: "filesystem")()]
        for prefix, d in self.routes:
            parts.append(f"/{prefix}: {getattr(d, 'describe', lambda: 'filesystem')()}")
        return "; ".join(parts)

    # -- objects
    async def stat(self, key: str) -> int:
        d, k = self.route(key)
        return await d.stat(k)

    async def read(self, key: str) -> bytes:
        d, k = self.route(key)
        return await d.read(k)

    async def write(self, key: str, data: bytes) -> None:
        d, k = self.route(key)
        await d.write(k, data)

    async def delete(self, key: str) -> bool:
        d, k = self.route(key)
        return await d.delete(k)

    async def link(self, src: str, dst: str) -> None:
        ds, ks = self.route(src)
        dd, kd = self.route(dst)
        if ds is dd:
            await ds.link(ks, kd)
            return
        try:  # across drivers: a copy through this process
            await dd.stat(kd)
            return
        except NotFound:
            pass
        await self._copy(ds, ks, dd, kd)

    async def _copy(self, ds: Storage, ks: str, dd: Storage, kd: str) -> None:
        """Stream an object from one driver to another through the upload area of the target."""
        import uuid
        tmp = uuid.uuid4().hex
        size = await ds.stat(ks)
        await dd.upload_write(tmp, 0, _stream(ds, ks), [])
        try:
            if await dd.upload_size(tmp) != size:
                raise NotFound(ks)
            await dd.upload_place(tmp, kd)
        finally:
            await dd.upload_delete(tmp)

    async def set_aside(self, key: str) -> str | None:
        d, k = self.route(key)
        aside = await d.set_aside(k)
        return None if aside is None else self._outer(self._index_of(d), aside)

    async def restore(self, aside: str, key: str) -> None:
        d, a = self.route(aside)
        _, k = self.route(key)
        await d.restore(a, k)

    async def discard(self, aside: str) -> None:
        d, a = self.route(aside)
        await d.discard(a)

    async def set_aside_list(self) -> list[tuple[str, str | None, float]]:
        out: list[tuple[str, str | None, float]] = []
        roots = set()
        for d in self.drivers:
            root = d.local_path("")
            if root is not None:  # two subpaths on one root share one _trash: list it once
                if root in roots:
                    continue
                roots.add(root)
            i = self._index_of(d)
            for aside, key, when in await d.set_aside_list():
                out.append((self._outer(i, aside), None if key is None else self._outer(i, key), when))
        return out

    def read_stream(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        d, k = self.route(key)
        return _stream(d, k, start, end)

    async def walk(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        if prefix:
            d, k = self.route(prefix)
            i = self._index_of(d)
            async for key, size in d.walk(k):
                yield self._outer(i, key), size
            return
        for d in self.drivers:
            i = self._index_of(d)
            async for key, size in d.walk(""):
                yield self._outer(i, key), size

    async def walk_mtime(self, prefix: str) -> AsyncIterator[tuple[str, int, float]]:
        for d, k in [self.route(prefix)] if prefix else [(d, "") for d in self.drivers]:
            i = self._index_of(d)
            async for key, size, when in d.walk_mtime(k):
                yield self._outer(i, key), size, when

    async def list_dirs(self, prefix: str) -> Iterable[str]:
        d, k = self.route(prefix) if prefix else (self.default, "")
        return await d.list_dirs(k)

    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        """The listing of the driver ``prefix`` routes to, with the directories leading to a
        subpath added: ``team-a`` shows at the top even when the default driver holds nothing
        of it (a bucket, when team-a is on a local disk)."""
        d, k = self.route(prefix) if prefix else (self.default, "")
        dirs, files = await d.list_dir(k)
        above = prefix + "/" if prefix else ""
        extra = {p[len(above):].split("/", 1)[0] for p, _ in self.routes if p.startswith(above) and p != prefix}
        return sorted(set(dirs) | extra), files

    # -- uploads
    async def _upload_driver(self, upload_id: str) -> Storage:
        repo = UPLOAD_REPO.get()
        if repo:  # an upload belongs to the repository of the request
            return self.driver_for_repo(repo)
        d = self._uploads.get(upload_id)
        if d is not None:
            return d
        for candidate in self.drivers:  # outside a request (gc, cli): whoever holds it
            try:
                await candidate.upload_size(upload_id)
            except NotFound:
                continue
            self._uploads[upload_id] = candidate
            return candidate
        return self.default

    async def upload_write(self, upload_id: str, offset: int, chunks: AsyncIterator[bytes],
                           hashers: list[Hasher], limit: int | None = None) -> int:
        d = await self._upload_driver(upload_id)
        return await d.upload_write(upload_id, offset, chunks, hashers, limit)

    async def upload_size(self, upload_id: str) -> int:
        return await (await self._upload_driver(upload_id)).upload_size(upload_id)

    async def upload_read(self, upload_id: str, length: int) -> AsyncIterator[bytes]:
        d = await self._upload_driver(upload_id)
        async for data in d.upload_read(upload_id, length):
            yield data

    async def upload_place(self, upload_id: str, key: str, replace: bool = False) -> None:
        src = await self._upload_driver(upload_id)
        dst, k = self.route(key)
        if src is dst:
            await src.upload_place(upload_id, k, replace)
            return
        if not replace:
            try:
                await dst.stat(k)
                return
            except NotFound:
                pass
        size = await src.upload_size(upload_id)
        await dst.upload_write(upload_id, 0, src.upload_read(upload_id, size), [])
        try:
            await dst.upload_place(upload_id, k, replace)
        finally:
            await dst.upload_delete(upload_id)

    async def upload_delete(self, upload_id: str) -> None:
        d = self._uploads.pop(upload_id, None)
        repo = UPLOAD_REPO.get()
        if repo:
            d = self.driver_for_repo(repo)
        for candidate in [d] if d is not None else self.drivers:
            await candidate.upload_delete(upload_id)

    async def upload_list(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        for d in self.drivers:
            out += await d.upload_list()
        return out

    # -- lifecycle
    async def open(self) -> None:
        for d in self.drivers:
            if hasattr(d, "open"):
                await d.open()

    async def close(self) -> None:
        for d in self.drivers:
            if hasattr(d, "close"):
                await d.close()


async def _stream(d: Storage, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
    """An object's bytes from any driver: its read_stream, or its local file."""
    import asyncio
    reader = getattr(d, "read_stream", None)
    if reader is not None:
        async for data in reader(key, start, end):
            yield data
        return
    path = d.local_path(key)
    if path is None:  # pragma: no cover - every driver has one or the other
        raise NotFound(key)
    loop = asyncio.get_running_loop()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise NotFound(key) from None
    with f:
        f.seek(start)
        left = None if end is None else end - start + 1
        while left is None or left > 0:
            data = await loop.run_in_executor(None, f.read, 1 << 20 if left is None else min(1 << 20, left))
            if not data:
                return
            if left is not None:
                left -= len(data)
            yield data
