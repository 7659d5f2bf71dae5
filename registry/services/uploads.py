"""Upload sessions: stream, hash, verify, then commit.

The running sha256 of a session lives in this process's memory. When a chunk
or the final PUT arrives at a process that does not hold it (a restart,
another replica), or the digest uses another algorithm, the bytes received so
far are read back and hashed once. The received length is recorded in the
metadata store after each chunk is on disk, so ``GET <location>`` tells the
truth after a restart.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from typing import AsyncIterator

import xxhash

from registry.digest import DEFAULT_ALGORITHM, Digest, Hasher, new_hasher
from registry.errors import RegistryError
from registry.meta.base import MetaError, MetaStore, Upload
from registry.services.blobs import Blobs
from registry.storage.base import InvalidOffset, NotFound, Storage, WriteInterrupted

_ID = re.compile(r"[0-9a-f]{32}")
LEASE = 120.0  # seconds a writer holds an upload without renewing (renewed as bytes arrive)


class LeaseLost(ConnectionError):
    """Raised inside the body stream: the storage driver stops writing and keeps what it wrote."""
HASH_INLINE = 256 << 10
MAX_CACHED_HASHERS = 10_000


async def _empty() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover


class Uploads:
    def __init__(self, meta: MetaStore, storage: Storage, blobs: Blobs):
        self.meta = meta
        self.storage = storage
        self.blobs = blobs
        # upload id -> ([sha256, xxh3-128] of the bytes received, how many bytes)
        self._hashers: dict[str, tuple[list[Hasher], int]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Sessions are often finished on another replica, or abandoned: keep the most recent
        # running hashes only (one evicted costs a read-back at the finish, never a wrong digest).
        self.max_cached_hashers = MAX_CACHED_HASHERS

    def _keep(self, upload_id: str, hashers: list[Hasher], size: int) -> None:
        self._hashers[upload_id] = (hashers, size)
        while len(self._hashers) > self.max_cached_hashers:
            del self._hashers[next(iter(self._hashers))]  # the least recently used

    @contextlib.asynccontextmanager
    async def _lock(self, upload_id: str) -> AsyncIterator[None]:
        """This process's lock on a session; forgotten when nobody holds or waits for it (a
        session continued or finished on another replica must leave nothing behind here)."""
        lock = self._locks.setdefault(upload_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock._waiters and self._locks.get(upload_id) is lock:  # type: ignore[attr-defined]
                del self._locks[upload_id]

    async def start(self, repo: str) -> Upload:
        upload_id = uuid.uuid4().hex
        await self.meta.upload_create(upload_id, repo)
        self._keep(upload_id, [new_hasher(), xxhash.xxh3_128()], 0)
        return Upload(upload_id, repo, 0, 0.0, 0.0)

    async def get(self, repo: str, upload_id: str) -> Upload:
        up = await self.meta.upload_get(upload_id) if _ID.fullmatch(upload_id) else None
        if up is None or up.repo != repo:
            raise RegistryError("BLOB_UPLOAD_UNKNOWN", {"upload": upload_id[:64]})
        return up

    def _range_error(self, size: int, detail: str) -> RegistryError:
        return RegistryError("RANGE_INVALID", detail, status=416, headers={
            "Range": f"0-{max(size - 1, 0)}",
        })

    async def _append(self, up: Upload, chunks: AsyncIterator[bytes]) -> int:
        # The lease makes this the only writer of the session, in every process:
        # a writer that lost a race must not overwrite bytes another recorded.
        writer = uuid.uuid4().hex
        now = time.time()
        try:
            leased = await self.meta.upload_lease(up.id, up.size, writer, now + LEASE, now)
        except MetaError:  # it may have been taken all the same, the answer lost
            await self._give_back(up, writer)
            raise
        if not leased:
            fresh = await self.meta.upload_get(up.id)
            size = fresh.size if fresh else up.size
            raise self._range_error(size, "another request is writing this upload" if size == up.size
                                    else f"the upload holds {size} bytes now")
        cached = self._hashers.pop(up.id, None)
        hashers = cached[0] if cached and cached[1] == up.size else []
        try:
            size = await self.storage.upload_write(up.id, up.size, self._leased(up, writer, chunks), hashers)
        except WriteInterrupted as exc:  # keep what arrived; the client can ask where to resume
            if await self.meta.upload_set_size(up.id, up.size, exc.size, writer) and hashers:
                self._keep(up.id, hashers, exc.size)
            raise RegistryError("BLOB_UPLOAD_INVALID", "the request body ended early") from None
        except BaseException as exc:
            await asyncio.shield(self.meta.upload_set_size(up.id, up.size, up.size, writer))  # give the lease back
            if isinstance(exc, InvalidOffset):
                raise RegistryError("BLOB_UPLOAD_INVALID", f"stored data is {exc.size} bytes, expected "
                                    f"{up.size}; restart the upload") from None
            raise
        try:
            recorded = await self.meta.upload_set_size(up.id, up.size, size, writer)
        except MetaError:  # not acknowledged; without the lease back, retries wait out LEASE
            await self._give_back(up, writer)
            raise
        if not recorded:
            raise self._range_error(size, "the upload was changed concurrently")
        if hashers:
            self._keep(up.id, hashers, size)
        return size

    async def _give_back(self, up: Upload, writer: str) -> None:
        """Release the lease after the database failed under a write, if it answers again."""
        with contextlib.suppress(MetaError):
            await asyncio.shield(self.meta.upload_set_size(up.id, up.size, up.size, writer))

    async def _leased(self, up: Upload, writer: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Pass chunks through, renewing the lease as they flow; stop if it was lost."""
        renewed = time.monotonic()
        async for chunk in chunks:
            if time.monotonic() - renewed > LEASE / 3:
                now = time.time()
                if not await self.meta.upload_lease(up.id, up.size, writer, now + LEASE, now):
                    raise LeaseLost("the upload's write lease was lost")
                renewed = time.monotonic()
            yield chunk

    async def patch(self, repo: str, upload_id: str, chunks: AsyncIterator[bytes],
                    start: int | None) -> Upload:
        async with self._lock(upload_id):
            up = await self.get(repo, upload_id)
            if start is not None and start != up.size:
                raise self._range_error(up.size, f"chunk starts at {start}, upload holds {up.size} bytes")
            size = await self._append(up, chunks)
            return Upload(up.id, repo, size, up.created_at, up.updated_at)

    async def _digest_of(self, up: Upload, algorithm: str) -> tuple[str, str]:
        """The upload's digest in ``algorithm`` and its xxh3-128, from the hashers
        this process kept, or by reading back what was received."""
        cached = self._hashers.get(up.id)
        if algorithm == DEFAULT_ALGORITHM and cached and cached[1] == up.size:
            return cached[0][0].hexdigest(), cached[0][1].hexdigest()
        hashers = [new_hasher(algorithm), xxhash.xxh3_128()]
        loop = asyncio.get_running_loop()

        def update(data: bytes) -> None:
            for h in hashers:
                h.update(data)
        try:
            async for data in self.storage.upload_read(up.id, up.size):
                if len(data) < HASH_INLINE:
                    update(data)
                else:
                    await loop.run_in_executor(None, update, data)
        except NotFound:
            if up.size:
                raise RegistryError("BLOB_UPLOAD_INVALID", "the upload's data is gone; restart the upload") from None
        return hashers[0].hexdigest(), hashers[1].hexdigest()

    async def _stored_size(self, upload_id: str) -> int:
        try:
            return await self.storage.upload_size(upload_id)
        except NotFound:
            return 0

    async def finish(self, repo: str, upload_id: str, digest: Digest,
                     chunks: AsyncIterator[bytes] | None) -> Upload:
        async with self._lock(upload_id):
            up = await self.get(repo, upload_id)
            if chunks is not None:
                size = await self._append(up, chunks)
                up = Upload(up.id, repo, size, up.created_at, up.updated_at)
            await self._complete(up, digest)
            return up

    async def _complete(self, up: Upload, digest: Digest) -> None:
        if up.size == 0:  # nothing was ever written: the file may not exist
            await self.storage.upload_write(up.id, 0, _empty(), [])
        elif await self._stored_size(up.id) > up.size:
            # Bytes past the recorded length are from a chunk never acknowledged (a process
            # killed mid-write, here or on another replica): cut them off, or they would be
            # placed with the blob, past what the digest was checked on.
            await self.storage.upload_write(up.id, up.size, _empty(), [])
        got, checksum = await self._digest_of(up, digest.algorithm)
        if got != digest.hex:
            await self.cancel(up.repo, up.id, locked=True)
            raise RegistryError("DIGEST_INVALID", {"digest": str(digest), "size": up.size})
        await self.blobs.commit_upload(up.repo, up.id, digest, up.size, checksum)
        await self._drop(up.id)

    async def monolithic(self, repo: str, digest: Digest, chunks: AsyncIterator[bytes]) -> int:
        """POST ?digest=: one request, no session row (a crash leaves only a file
        in the upload area, which upload expiry removes)."""
        upload_id = uuid.uuid4().hex
        hashers = [new_hasher(digest.algorithm), xxhash.xxh3_128()]
        try:
            size = await self.storage.upload_write(upload_id, 0, chunks, hashers)
            if hashers[0].hexdigest() != digest.hex:
                raise RegistryError("DIGEST_INVALID", {"digest": str(digest), "size": size})
            await self.blobs.commit_upload(repo, upload_id, digest, size, hashers[1].hexdigest())
            return size
        except WriteInterrupted:
            raise RegistryError("BLOB_UPLOAD_INVALID", "the request body ended early") from None
        finally:
            await self.storage.upload_delete(upload_id)

    async def cancel(self, repo: str, upload_id: str, *, locked: bool = False) -> None:
        if not locked:
            async with self._lock(upload_id):
                await self.get(repo, upload_id)
                await self._drop(upload_id)
        else:
            await self._drop(upload_id)

    async def _drop(self, upload_id: str) -> None:
        await self.meta.upload_delete(upload_id)
        await self.storage.upload_delete(upload_id)
        self._hashers.pop(upload_id, None)
        lock = self._locks.get(upload_id)
        if lock is not None and not lock._waiters:  # type: ignore[attr-defined]
            self._locks.pop(upload_id, None)
