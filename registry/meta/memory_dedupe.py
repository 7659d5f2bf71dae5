"""In-memory store: what dedupe needs (see meta/dedupe.py)."""
from __future__ import annotations

from typing import Any

from registry.meta.dedupe import DedupeItem, DedupeState, Holder


class MemoryDedupe:
    _repos: dict[str, Any]

    async def blob_holders(self, digest: str, limit: int) -> list[Holder]:
        found = [Holder(name, r.blobs[digest], r.damaged.get(("blob", digest)))
                 for name, r in self._repos.items() if digest in r.blobs]
        return sorted(found, key=lambda h: (h.damaged is not None, h.repo))[:limit]

    def _copies(self) -> list[DedupeItem]:
        out = []
        for name, r in self._repos.items():
            out += [DedupeItem(d, name, "blob", size, r.damaged.get(("blob", d))) for d, size in r.blobs.items()]
            out += [DedupeItem(d, name, "manifest", m.size, r.damaged.get(("manifest", d)))
                    for d, m in r.manifests.items()]
        return out

    async def dedupe_items(self, after: str | None, limit: int) -> list[DedupeItem]:
        copies = [c for c in self._copies() if c.digest > (after or "")]
        wanted = set(sorted({c.digest for c in copies})[:limit])
        return sorted((c for c in copies if c.digest in wanted), key=lambda c: (c.digest, c.repo, c.kind))

    async def dedupe_count(self, upto: str | None) -> tuple[int, int]:
        digests = {c.digest for c in self._copies()}
        return len(digests), sum(1 for d in digests if d <= (upto or ""))

    async def dedupe_state(self) -> DedupeState:
        return getattr(self, "_dedupe", None) or DedupeState()

    async def dedupe_save(self, state: DedupeState) -> None:
        self._dedupe = state
