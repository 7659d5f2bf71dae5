"""Keeps every repository a valid OCI image layout: ``oci-layout`` and an
``index.json`` in step with the tags.

index.json is rebuilt from the metadata store and replaced atomically, never
edited in place. Rewrites are coalesced per repository: a caller waits for a
rewrite that started after its own change was committed, so concurrent pushes
to one repository share one write.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from registry.meta.base import LayoutEntry, MetaStore
from registry.storage.base import NotFound, Storage

log = logging.getLogger(__name__)
OCI_LAYOUT = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass
class _State:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requested: int = 0
    done: int = 0


class Layout:
    def __init__(self, meta: MetaStore, storage: Storage):
        self.meta = meta
        self.storage = storage
        self._known: set[str] = set()
        self._state: dict[str, _State] = {}

    async def repair(self) -> int:
        """Rewrite index.json of repositories changed but not synced before a crash."""
        stale = await self.meta.layout_stale()
        for repo in stale:
            await self.sync(repo)
        return len(stale)

    async def ensure_repo(self, repo: str) -> None:
        """Write ``<repo>/oci-layout`` the first time a repository gets content."""
        if repo in self._known:
            return
        try:
            await self.storage.stat(f"{repo}/oci-layout")
        except NotFound:
            await self.storage.write(f"{repo}/oci-layout", OCI_LAYOUT)
        self._known.add(repo)

    @staticmethod
    def render(entries: list[LayoutEntry]) -> bytes:
        manifests = []
        for e in entries:
            desc: dict[str, object] = {"mediaType": e.media_type, "digest": e.digest, "size": e.size}
            if e.artifact_type:
                desc["artifactType"] = e.artifact_type
            if e.tag is not None:
                desc["annotations"] = {REF_NAME: e.tag}
            manifests.append(desc)
        doc = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests}
        return json.dumps(doc, indent=2).encode() + b"\n"

    async def sync(self, repo: str) -> None:
        """Return once index.json reflects every change committed before the call."""
        st = self._state.setdefault(repo, _State())
        st.requested += 1
        mine = st.requested
        async with st.lock:
            if st.done >= mine:
                return
            target = st.requested
            await self.ensure_repo(repo)
            # Across processes too: whoever writes last has read the newest state.
            async with self.meta.layout_rewrite(repo) as entries:
                await self.storage.write(f"{repo}/index.json", self.render(entries))
            st.done = target
        if not st.lock.locked() and st.done == st.requested:
            self._state.pop(repo, None)
