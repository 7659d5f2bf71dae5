"""Blob rules: existence in a repository, mount, delete, and making an upload visible.

The file and the metadata row of a blob change in an order that keeps them
consistent under races (see DESIGN.md, "a push racing GC"): content is placed
before its row is inserted and checked again after; content is set aside only
after its row is deleted, and put back if a row reappeared meanwhile. Content
is addressed by digest, so any copy of a file is as good as any other.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from registry.config import Config
from registry.digest import Digest
from registry.errors import RegistryError
from registry.meta.base import NEVER, MetaStore
from registry.reference import NAME_RE
from registry.services.dedupe import link_blob, place_upload
from registry.services.layout import Layout
from registry.storage.base import NotFound, Storage

if TYPE_CHECKING:
    from registry.reload import Tunables


def blob_key(repo: str, digest: Digest) -> str:
    return f"{repo}/{digest.path}"


class Blobs:
    def __init__(self, cfg: Config, meta: MetaStore, storage: Storage, layout: Layout,
                 tunables: "Tunables | None" = None):
        self.cfg = cfg
        self.tunables = tunables  # SIGHUP may change gcDelay
        self.meta = meta
        self.storage = storage
        self.layout = layout

    def gc_delay(self) -> float:
        return self.tunables.gc_delay if self.tunables is not None else self.cfg.storage.gc_delay

    def review_after(self) -> float:
        return time.time() + self.gc_delay()

    async def size(self, repo: str, digest: Digest) -> int:
        size = await self.meta.blob_size(repo, str(digest))
        if size is None:
            raise RegistryError("BLOB_UNKNOWN", {"digest": str(digest)})
        return size

    async def check(self, repo: str, digest: Digest) -> int:
        """Size of a blob a client asks about (HEAD, GET). A blob GC has queued
        (nothing refers to it yet) gets a new gcDelay: a client that saw it may
        push a manifest referring to it. Blobs in use are left alone, so the
        usual existence check writes nothing."""
        stat = await self.meta.blob_stat(repo, str(digest))
        if stat is None:
            raise RegistryError("BLOB_UNKNOWN", {"digest": str(digest)})
        if stat.damaged is not None:  # never serve bytes known to be wrong; a push of the content repairs it
            raise RegistryError("BLOB_UNKNOWN", {"digest": str(digest), "damaged": stat.damaged})
        if not await self.postpone(repo, "blob", str(digest), stat.review_after):
            raise RegistryError("BLOB_UNKNOWN", {"digest": str(digest)})  # GC took it meanwhile
        return stat.size

    async def postpone(self, repo: str, kind: str, digest: str, review_after: float) -> bool:
        """Keep a queued row for at least gcDelay from now (rows in use are left
        alone). False when GC deleted the row between the caller's read and this
        write: the caller must then answer as if it never existed."""
        delay = self.gc_delay()
        now = time.time()
        if review_after >= NEVER or review_after >= now + delay:
            return True
        # 1.5 delays: a full delay is guaranteed, and a row is written at most once per half delay.
        if await self.meta.touch(repo, kind, digest, now + delay * 1.5):
            return True
        return await self.meta.blob_size(repo, digest) is not None  # a blob that is also a manifest

    def key(self, repo: str, digest: Digest) -> str:
        """Where the storage keeps ``repo``'s copy of a blob: on a store with shared blobs
        (S3 with dedupe) one key per digest for the whole registry."""
        by_storage = getattr(self.storage, "blob_key", None)
        return by_storage(repo, digest) if by_storage is not None else blob_key(repo, digest)

    def local_path(self, repo: str, digest: Digest) -> Path | None:
        return self.storage.local_path(self.key(repo, digest))

    async def _present(self, repo: str, digest: Digest) -> bool:
        return await self.meta.blob_size(repo, str(digest)) is not None

    async def link_placed(self, repo: str, digest: Digest, size: int,
                          place: Callable[[], Awaitable[None]], checksum: str | None = None) -> None:
        """Record a blob whose content ``place()`` has put under its key, then
        make sure a concurrent removal did not take the file away meanwhile."""
        await self.meta.blob_link(repo, str(digest), size, self.review_after(), checksum)
        try:
            await self.storage.stat(self.key(repo, digest))
        except NotFound:
            await place()

    async def commit_upload(self, repo: str, upload_id: str, digest: Digest, size: int,
                            checksum: str | None = None) -> None:
        """Make a verified upload visible; ``checksum`` is the xxh3 of its bytes."""
        await self.layout.ensure_repo(repo)
        stat = await self.meta.blob_stat(repo, str(digest))
        repair = stat is not None and stat.damaged is not None

        async def place() -> None:
            await place_upload(self, repo, upload_id, digest, size, replace=repair)  # dedupe: a holder's inode
        await place()
        await self.link_placed(repo, digest, size, place, checksum)
        if repair:  # the verified bytes replaced the damaged copy
            await self.meta.scrub_mark(repo, "blob", str(digest), None, time.time())

    async def mount(self, repo: str, digest: Digest, source: str | None) -> bool:
        """Link a blob the registry already holds into ``repo``; False to fall back to an upload."""
        here = await self.meta.blob_stat(repo, str(digest))
        if here is not None and (here.damaged is not None  # a damaged copy is repaired by an upload, not a mount
                                 or await self.postpone(repo, "blob", str(digest), here.review_after)):
            return here.damaged is None
        if source is not None:
            if not NAME_RE.fullmatch(source):
                return False
            stat = await self.meta.blob_stat(source, str(digest))
            size = stat.size if stat is not None and stat.damaged is None else None
        else:
            holder = await self.meta.blob_holder(str(digest))
            source, size = holder if holder else (None, None)
            if source is not None:  # the holder named may be a copy scrub found damaged: no source then
                stat = await self.meta.blob_stat(source, str(digest))
                size = stat.size if stat is not None and stat.damaged is None else None
        if source is None or size is None:
            return False
        await self.layout.ensure_repo(repo)

        async def place() -> None:
            await link_blob(self, digest, size, source, repo)  # dedupe: another good holder if source's is gone
        try:
            await place()
        except NotFound:  # deleted from the source meanwhile
            return False
        try:
            await self.link_placed(repo, digest, size, place)
        except NotFound:  # a shared object went with its last other holder meanwhile: upload instead
            if await self._stored(self.key(repo, digest)):
                return True
            await self.meta.blob_unlink(repo, str(digest))
            return False
        return True

    async def delete(self, repo: str, digest: Digest) -> None:
        if not await self.meta.blob_unlink(repo, str(digest)):
            raise RegistryError("BLOB_UNKNOWN", {"digest": str(digest)})
        await self.remove_content(repo, digest)

    async def remove_content(self, repo: str, digest: Digest) -> None:
        """Remove a file whose row is gone, unless a row for it reappeared meanwhile. On a store
        with shared blobs the one object of the digest goes only when no repository holds it any
        more; the repository's own key then holds at most a manifest's file."""
        if getattr(self.storage, "shared_blobs", False):
            await self._remove_shared(repo, digest)
        key = blob_key(repo, digest)
        aside = await self.storage.set_aside(key)
        if aside is None:
            return
        if await self._present(repo, digest):
            await self.storage.restore(aside, key)
        await self.storage.discard(aside)

    async def _stored(self, key: str) -> bool:
        try:
            await self.storage.stat(key)
        except NotFound:
            return False
        return True

    async def _remove_shared(self, repo: str, digest: Digest) -> None:
        """The set-aside/restore protocol of remove_content, for the object every repository
        shares: a push or mount that links the digest meanwhile either sees the object back
        (restored here) or finds it missing after linking and places it again (link_placed)."""
        key = self.key(repo, digest)
        if key == blob_key(repo, digest):  # this repository's store keeps a copy per repository
            return
        if await self.meta.blob_holder(str(digest)) is not None:
            return
        aside = await self.storage.set_aside(key)
        if aside is None:
            return
        if await self.meta.blob_holder(str(digest)) is not None:
            await self.storage.restore(aside, key)
        await self.storage.discard(aside)
