"""In-memory metadata store: nothing persists. For tests and throwaway runs.
Every operation completes without awaiting, so each is atomic on the loop."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

from typing import AsyncIterator

from registry.meta.base import (NEVER, BadReferences, BlobStat, Candidate, GenerationLayout, LayoutEntry, Manifest,
                                NamedLocks, Reach, ScrubItem, ScrubState, Upload)

from registry.meta.memory_dedupe import MemoryDedupe


@dataclass
class _Repo:
    blobs: dict[str, int] = field(default_factory=dict)
    review: dict[str, float] = field(default_factory=dict)
    manifests: dict[str, Manifest] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    layout_gen: int = 0
    layout_synced: int = 0
    damaged: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, digest) -> finding


class MemoryMeta(MemoryDedupe, GenerationLayout):
    def __init__(self) -> None:
        self._repos: dict[str, _Repo] = {}
        self._uploads: dict[str, Upload] = {}
        self._checksums: dict[str, str] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # upload id -> (writer, until)
        self._scrub = ScrubState(None, None, None)
        self._local_locks = NamedLocks()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def schema_version(self) -> int:
        return 0

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        async with self._local_locks.hold(name):
            yield

    def _repo(self, name: str) -> _Repo:
        return self._repos.setdefault(name, _Repo())

    # -- blobs
    async def blob_size(self, repo: str, digest: str) -> int | None:
        r = self._repos.get(repo)
        if r is None:
            return None
        if digest in r.blobs:
            return r.blobs[digest]
        m = r.manifests.get(digest)
        return m.size if m else None

    async def blob_stat(self, repo: str, digest: str) -> BlobStat | None:
        r = self._repos.get(repo)
        if r is None:
            return None
        if digest in r.blobs:
            return BlobStat(r.blobs[digest], r.review[digest], r.damaged.get(("blob", digest)))
        m = r.manifests.get(digest)
        return BlobStat(m.size, NEVER) if m else None

    async def touch(self, repo: str, kind: str, digest: str, review_after: float) -> bool:
        r = self._repos.get(repo)
        if r is None:
            return False
        if kind == "blob":
            if digest in r.review and r.review[digest] < min(review_after, NEVER):
                r.review[digest] = review_after
            return digest in r.blobs
        m = r.manifests.get(digest)
        if m is not None and m.review_after < min(review_after, NEVER):
            m.review_after = review_after
        return m is not None

    async def blob_holder(self, digest: str) -> tuple[str, int] | None:
        for name, r in self._repos.items():
            if digest in r.blobs:
                return name, r.blobs[digest]
        return None

    async def blob_link(self, repo: str, digest: str, size: int, review_after: float,
                        checksum: str | None = None) -> None:
        if checksum is not None:
            self._checksums.setdefault(digest, checksum)
        r = self._repo(repo)
        r.blobs.setdefault(digest, size)
        r.review[digest] = max(r.review.get(digest, 0.0), review_after)

    async def blob_unlink(self, repo: str, digest: str) -> bool:
        r = self._repos.get(repo)
        if r is None or digest not in r.blobs:
            return False
        del r.blobs[digest]
        r.damaged.pop(("blob", digest), None)
        r.review.pop(digest, None)
        return True

    # -- manifests and tags
    async def manifest_put(self, repo: str, m: Manifest, tags: list[str], review_after: float) -> None:
        r = self._repo(repo)
        missing, wrong = [], []
        for ref in m.refs:
            have = r.blobs.get(ref.digest) if ref.kind == "blob" else (
                r.manifests[ref.digest].size if ref.digest in r.manifests else None)
            if have is None:
                missing.append(ref.digest)
            elif have != ref.size:
                wrong.append(f"{ref.digest} is {have} bytes, not {ref.size}")
        if missing or wrong:
            raise BadReferences(missing, wrong)
        if m.digest not in r.manifests:
            r.manifests[m.digest] = replace(m, refs=list(m.refs), review_after=review_after)
            r.created[m.digest] = time.time()
        else:
            held = r.manifests[m.digest]
            held.review_after = max(held.review_after, review_after)
        r.layout_gen += 1
        for tag in tags:
            old = r.tags.get(tag)
            if old is not None and old != m.digest:
                self._requeue(r, "manifest", [old], review_after)
            r.tags[tag] = m.digest

    @staticmethod
    def _requeue(r: _Repo, kind: str, digests: list[str], at: float) -> None:
        for d in digests:
            if kind == "blob" and d in r.review:
                r.review[d] = at if r.review[d] >= NEVER else max(r.review[d], at)
            elif kind == "manifest" and d in r.manifests:
                m = r.manifests[d]
                m.review_after = at if m.review_after >= NEVER else max(m.review_after, at)

    def _delete_manifest(self, r: _Repo, digest: str, at: float) -> bool:
        m = r.manifests.pop(digest, None)
        if m is None:
            return False
        r.created.pop(digest, None)
        for tag in [t for t, d in r.tags.items() if d == digest]:
            del r.tags[tag]
        self._requeue(r, "blob", [x.digest for x in m.refs if x.kind == "blob"], at)
        referrers = [x.digest for x in r.manifests.values() if x.subject == digest]
        self._requeue(r, "manifest", [x.digest for x in m.refs if x.kind == "manifest"] + referrers, at)
        r.layout_gen += 1
        return True

    async def manifest_get(self, repo: str, reference: str) -> Manifest | None:
        r = self._repos.get(repo)
        if r is None:
            return None
        digest = reference if ":" in reference else r.tags.get(reference)
        return r.manifests.get(digest) if digest else None

    async def manifest_delete(self, repo: str, digest: str, requeue_at: float | None = None) -> bool:
        r = self._repos.get(repo)
        return r is not None and self._delete_manifest(r, digest, time.time() if requeue_at is None else requeue_at)

    async def tag_delete(self, repo: str, tag: str, requeue_at: float | None = None) -> bool:
        r = self._repos.get(repo)
        if r is None or tag not in r.tags:
            return False
        self._requeue(r, "manifest", [r.tags.pop(tag)], time.time() if requeue_at is None else requeue_at)
        r.layout_gen += 1
        return True

    async def tags(self, repo: str, n: int | None, last: str | None) -> list[str] | None:
        r = self._repos.get(repo)
        if r is None:
            return None
        out = sorted(t for t in r.tags if t > (last or ""))
        return out if n is None else out[:n]

    async def referrers(self, repo: str, subject: str, artifact_type: str | None) -> list[Manifest]:
        r = self._repos.get(repo)
        if r is None:
            return []
        found = [m for m in r.manifests.values() if m.subject == subject
                 and (artifact_type is None or m.artifact_type == artifact_type)]
        return sorted(found, key=lambda m: (r.created[m.digest], m.digest))

    async def catalog(self, n: int | None, last: str | None) -> list[str]:
        out = sorted(name for name in self._repos if name > (last or ""))
        return out if n is None else out[:n]

    async def repo_exists(self, repo: str) -> bool:
        return repo in self._repos

    async def layout_entries(self, repo: str) -> list[LayoutEntry]:
        r = self._repos.get(repo)
        if r is None:
            return []
        children = {ref.digest for m in r.manifests.values() for ref in m.refs if ref.kind == "manifest"}
        tagged = set(r.tags.values())
        out = [LayoutEntry(m.digest, m.media_type, m.size, t, m.artifact_type)
               for t, d in sorted(r.tags.items()) for m in [r.manifests[d]]]
        out += [LayoutEntry(m.digest, m.media_type, m.size, None, m.artifact_type)
                for d, m in sorted(r.manifests.items()) if d not in tagged and d not in children]
        return sorted(out, key=lambda e: (e.tag is not None, e.tag or "", e.digest))

    async def layout_generation(self, repo: str) -> int:
        r = self._repos.get(repo)
        return r.layout_gen if r else 0

    async def layout_synced(self, repo: str, generation: int) -> None:
        r = self._repos.get(repo)
        if r is not None:
            r.layout_synced = max(r.layout_synced, generation)

    async def layout_stale(self) -> list[str]:
        return [name for name, r in self._repos.items() if r.layout_gen > r.layout_synced]

    # -- upload sessions
    async def upload_create(self, upload_id: str, repo: str) -> None:
        now = time.time()
        self._uploads[upload_id] = Upload(upload_id, repo, 0, now, now)

    async def upload_get(self, upload_id: str) -> Upload | None:
        return self._uploads.get(upload_id)

    async def upload_lease(self, upload_id: str, size: int, writer: str, until: float, now: float) -> bool:
        up = self._uploads.get(upload_id)
        if up is None or up.size != size:
            return False
        held = self._leases.get(upload_id)
        if held is not None and held[0] != writer and held[1] >= now:
            return False
        self._leases[upload_id] = (writer, until)
        return True

    async def upload_set_size(self, upload_id: str, old: int, new: int, writer: str | None = None) -> bool:
        up = self._uploads.get(upload_id)
        if up is None or up.size != old:
            return False
        if writer is not None and self._leases.get(upload_id, (None, 0.0))[0] != writer:
            return False
        self._leases.pop(upload_id, None)
        self._uploads[upload_id] = Upload(up.id, up.repo, new, up.created_at, time.time())
        return True

    async def upload_delete(self, upload_id: str) -> bool:
        return self._uploads.pop(upload_id, None) is not None

    async def uploads_expired(self, before: float, limit: int) -> list[Upload]:
        return sorted((u for u in self._uploads.values() if u.updated_at < before), key=lambda u: u.updated_at)[:limit]

    # -- garbage collection
    def _queue(self, now: float) -> list[Candidate]:
        out = []
        for name, r in self._repos.items():
            out += [Candidate(name, "blob", d, r.blobs[d], t) for d, t in r.review.items() if t <= now]
            out += [Candidate(name, "manifest", d, m.size, m.review_after) for d, m in r.manifests.items()
                    if m.review_after <= now]
        return sorted(out, key=lambda c: (c.review_after, c.repo, c.kind, c.digest))

    async def gc_candidates(self, now: float, limit: int, repo: str | None = None,
                            after: tuple[float, str, str, str] | None = None) -> list[Candidate]:
        after = after or (float("-inf"), "", "", "")
        return [c for c in self._queue(now) if (repo is None or c.repo == repo)
                and (c.review_after, c.repo, c.kind, c.digest) > after][:limit]

    async def gc_collect(self, batch: list[Candidate], now: float, delete_untagged: bool,
                         dry_run: bool = False, requeue_at: float | None = None) -> list[Candidate]:
        deleted = []
        for c in batch:
            r = self._repos.get(c.repo)
            if r is None:
                continue
            if c.kind == "blob":
                if c.digest not in r.blobs or r.review[c.digest] > now:
                    continue
                in_use = any(x.digest == c.digest and x.kind == "blob" for m in r.manifests.values() for x in m.refs)
            else:
                m = r.manifests.get(c.digest)
                if m is None or m.review_after > now:
                    continue
                in_use = (c.digest in r.tags.values()
                          or any(x.digest == c.digest and x.kind == "manifest"
                                 for p in r.manifests.values() for x in p.refs)
                          or (m.subject is not None and m.subject in r.manifests)
                          or (m.subject is None and not delete_untagged))
            if in_use:
                if not dry_run:
                    if c.kind == "blob":
                        r.review[c.digest] = NEVER
                    else:
                        r.manifests[c.digest].review_after = NEVER
                continue
            if not dry_run:
                if c.kind == "blob":
                    del r.blobs[c.digest], r.review[c.digest]
                else:
                    self._delete_manifest(r, c.digest, now if requeue_at is None else requeue_at)
            deleted.append(c)
        return deleted

    async def gc_pending(self, now: float) -> int:
        return len(self._queue(now))

    async def digest_held(self, digest: str) -> bool:
        return any(digest in r.blobs or digest in r.manifests for r in self._repos.values())

    # -- scrub
    async def checksum_put(self, digest: str, xxh3: str) -> None:
        self._checksums.setdefault(digest, xxh3)

    async def checksum_get(self, digest: str) -> str | None:
        return self._checksums.get(digest)

    async def scrub_items(self, after: tuple[str, str, str] | None, limit: int,
                          repo: str | None = None) -> list[ScrubItem]:
        items = [ScrubItem(name, "blob", d, size) for name, r in self._repos.items() for d, size in r.blobs.items()]
        items += [ScrubItem(name, "manifest", d, m.size) for name, r in self._repos.items()
                  for d, m in r.manifests.items()]
        after = after or ("", "", "")
        items = [i for i in items if (repo is None or i.repo == repo) and (i.repo, i.kind, i.digest) > after]
        return sorted(items, key=lambda i: (i.repo, i.kind, i.digest))[:limit]

    async def scrub_mark(self, repo: str, kind: str, digest: str, damaged: str | None, now: float) -> None:
        r = self._repos.get(repo)
        if r is None or digest not in (r.blobs if kind == "blob" else r.manifests):
            return
        if damaged is None:
            r.damaged.pop((kind, digest), None)
        else:
            r.damaged[(kind, digest)] = damaged

    async def scrub_state(self) -> ScrubState:
        return self._scrub

    async def scrub_save(self, state: ScrubState) -> None:
        self._scrub = state

    async def scrub_damaged(self, repo: str | None = None) -> list[Reach]:
        return sorted((Reach(name, "", kind, d, why) for name, r in self._repos.items()
                       if repo is None or name == repo for (kind, d), why in r.damaged.items()),
                      key=lambda x: (x.repo, x.kind, x.digest))

    async def scrub_reach(self, repo: str | None = None) -> list[Reach]:
        out: set[Reach] = set()
        for name, r in self._repos.items():
            if repo is not None and name != repo:
                continue
            for tag, top in r.tags.items():
                todo, seen = [("manifest", top)], set()
                while todo:
                    kind, d = todo.pop()
                    if (kind, d) in seen:
                        continue
                    seen.add((kind, d))
                    m = r.manifests.get(d) if kind == "manifest" else None
                    if kind == "blob" and d not in r.blobs:
                        finding: str | None = "blob missing from the repository"
                    elif kind == "manifest" and m is None:
                        finding = "manifest missing from the repository"
                    else:
                        finding = r.damaged.get((kind, d))
                    out.add(Reach(name, tag, kind, d, finding))
                    if m is not None:
                        todo += [(x.kind, x.digest) for x in m.refs]
        return sorted(out, key=lambda x: (x.repo, x.tag, x.kind, x.digest))
