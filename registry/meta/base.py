"""The metadata Protocol: repositories, tags, manifests and what they refer to,
upload sessions. It is transactional: a manifest push checks and links its
references in one transaction, so it meets GC here rather than on disk."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncContextManager, AsyncIterator, Awaitable, Callable, Protocol


# review_after of a row GC has reviewed and found in use: it is no candidate
# until an event (a manifest or tag removed) puts it back in the queue.
NEVER = 9.0e18


class MetaError(Exception):
    """The store failed (connection lost, disk full...)."""


class BadReferences(Exception):
    """A manifest refers to blobs or manifests the repository does not hold
    (``missing``), or states a size that differs from the stored one (``wrong_size``)."""

    def __init__(self, missing: list[str], wrong_size: list[str]):
        super().__init__(", ".join(missing + wrong_size))
        self.missing = missing
        self.wrong_size = wrong_size


@dataclass(frozen=True, slots=True)
class Ref:
    """Something a manifest refers to: a blob (config, layer) or a child manifest."""
    digest: str
    kind: str  # "blob" | "manifest"
    size: int


@dataclass(slots=True)
class Manifest:
    digest: str
    media_type: str
    size: int
    payload: bytes = b""
    subject: str | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    refs: list[Ref] = field(default_factory=list)
    review_after: float = NEVER


@dataclass(frozen=True, slots=True)
class LayoutEntry:
    """One line of a repository's index.json."""
    digest: str
    media_type: str
    size: int
    tag: str | None
    artifact_type: str | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A row GC may delete once its review_after has passed."""
    repo: str
    kind: str  # "blob" | "manifest"
    digest: str
    size: int
    review_after: float


@dataclass(frozen=True, slots=True)
class BlobStat:
    size: int
    review_after: float
    damaged: str | None = None  # why the last scrub found this copy bad


@dataclass(frozen=True, slots=True)
class ScrubItem:
    repo: str
    kind: str  # "blob" | "manifest"
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class ScrubState:
    cursor: tuple[str, str, str] | None  # (repo, kind, digest) last checked in the current pass
    pass_started: float | None
    last_complete: float | None


@dataclass(frozen=True, slots=True)
class Reach:
    """Something a tag reaches (its manifest, child manifests, blobs), for scrub reports.
    ``damaged`` is the last scrub's finding, or why the row itself is missing."""
    repo: str
    tag: str
    kind: str
    digest: str
    damaged: str | None


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    repo: str
    size: int
    created_at: float
    updated_at: float


class MetaStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    def exclusive(self, name: str) -> AsyncContextManager[None]:
        """Held by one process (or replica) at a time: index.json rewrites, GC passes."""

    # blobs
    async def blob_size(self, repo: str, digest: str) -> int | None:
        """Size of a blob (or manifest) the repository holds, None otherwise."""
    async def blob_holder(self, digest: str) -> tuple[str, int] | None:
        """Any repository holding the blob, with its size (mount without from)."""
    async def blob_stat(self, repo: str, digest: str) -> BlobStat | None:
        """Size, GC review time and scrub finding of a blob (or manifest) the repository holds."""
    async def touch(self, repo: str, kind: str, digest: str, review_after: float) -> bool:
        """Postpone GC of a queued blob or manifest (an existence check) to ``review_after``;
        rows GC found in use (review_after == NEVER) or already due later are left alone.
        Whether the row exists once this write is done: False when GC deleted it first."""
    async def blob_link(self, repo: str, digest: str, size: int, review_after: float,
                        checksum: str | None = None) -> None:
        """Record that the repository holds the blob (and the xxh3 of its bytes, when known)."""
    async def blob_unlink(self, repo: str, digest: str) -> bool: ...

    # manifests and tags
    async def manifest_put(self, repo: str, m: Manifest, tags: list[str], review_after: float) -> None:
        """Insert the manifest (idempotent), its references and the tags in one
        transaction; BadReferences when a referenced blob or manifest is absent."""
    async def manifest_get(self, repo: str, reference: str) -> Manifest | None: ...
    async def manifest_delete(self, repo: str, digest: str, requeue_at: float | None = None) -> bool:
        """Delete a manifest and every tag pointing at it; what it referred to, and
        its referrers, are queued for GC at ``requeue_at`` (default: now)."""
    async def tag_delete(self, repo: str, tag: str, requeue_at: float | None = None) -> bool:
        """Delete a tag; its manifest is queued for GC at ``requeue_at``."""
    async def tags(self, repo: str, n: int | None, last: str | None) -> list[str] | None:
        """Tags in lexical order after ``last``; None when the repository is unknown."""
    async def referrers(self, repo: str, subject: str, artifact_type: str | None) -> list[Manifest]: ...
    async def catalog(self, n: int | None, last: str | None) -> list[str]: ...
    async def repo_exists(self, repo: str) -> bool: ...
    async def layout_entries(self, repo: str) -> list[LayoutEntry]: ...
    def layout_rewrite(self, repo: str) -> AsyncContextManager[list[LayoutEntry]]:
        """Held by one process (or replica) at a time per repository: yields what index.json
        must list, read once the lock is held; leaving the block without an error counts every
        change that reading covered as written out."""
    async def layout_stale(self) -> list[str]:
        """Repositories whose index.json may lag behind (after a crash)."""

    # upload sessions
    async def upload_create(self, upload_id: str, repo: str) -> None: ...
    async def upload_get(self, upload_id: str) -> Upload | None: ...
    async def upload_lease(self, upload_id: str, size: int, writer: str, until: float, now: float) -> bool:
        """Take (or renew) the right to write: only while the upload holds ``size``
        bytes and no other writer's lease runs."""
    async def upload_set_size(self, upload_id: str, old: int, new: int, writer: str | None = None) -> bool:
        """Compare-and-set the received length (and, with ``writer``, only while
        that writer holds the lease, which this gives back); False when another
        writer moved it."""
    async def upload_delete(self, upload_id: str) -> bool: ...
    async def uploads_expired(self, before: float, limit: int) -> list[Upload]:
        """Sessions not written to since ``before``."""

    # garbage collection
    async def gc_candidates(self, now: float, limit: int, repo: str | None = None,
                            after: tuple[float, str, str, str] | None = None) -> list[Candidate]:
        """Rows whose review_after has passed, oldest first; ``after`` is the
        (review_after, repo, kind, digest) of the last one seen, for paging."""
    async def gc_collect(self, batch: list[Candidate], now: float, delete_untagged: bool,
                         dry_run: bool = False, requeue_at: float | None = None) -> list[Candidate]:
        """Re-check each candidate under lock and delete those still unused;
        returns the deleted. In-use rows leave the queue (NEVER); a deleted
        manifest's references and referrers join it, due at ``requeue_at``
        (now + gcDelay: a client may have checked them while they were in use,
        which wrote nothing, so they get the whole delay from now on)."""
    async def gc_pending(self, now: float) -> int: ...
    async def digest_held(self, digest: str) -> bool:
        """Whether any repository holds the digest, as a blob or as a manifest (the storage
        walk of ``registry gc --full``, for an object shared by every repository)."""

    # scrub
    async def checksum_put(self, digest: str, xxh3: str) -> None: ...
    async def checksum_get(self, digest: str) -> str | None: ...
    async def scrub_items(self, after: tuple[str, str, str] | None, limit: int,
                          repo: str | None = None) -> list[ScrubItem]:
        """Every stored blob and manifest, ordered by (repo, kind, digest), after ``after``."""
    async def scrub_mark(self, repo: str, kind: str, digest: str, damaged: str | None, now: float) -> None: ...
    async def scrub_state(self) -> ScrubState: ...
    async def scrub_save(self, state: ScrubState) -> None: ...
    async def scrub_reach(self, repo: str | None = None) -> list[Reach]: ...
    async def scrub_damaged(self, repo: str | None = None) -> list[Reach]:
        """Every blob and manifest row the last scrub found damaged (``tag`` is ""), by (repo, kind, digest)."""

    # operations (issue 8)
    async def counts(self) -> "Counts":
        """Store-wide totals for the metrics gauges; may scan, so never on a request path."""


@dataclass(frozen=True, slots=True)
class Counts:
    repositories: int
    manifests: int  # one per (repository, digest)
    tags: int
    blobs: int  # distinct blob digests
    uploads: int  # open upload sessions
    logical_bytes: int  # blobs and manifests, once per repository holding them
    unique_bytes: int  # blobs and manifests, once per digest


class NamedLocks:
    """asyncio locks by name, for stores whose cross-process lock does not exclude callers
    of one process from each other (fcntl locks belong to the process); a name's lock is
    forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


class GenerationLayout:
    """layout_rewrite for stores that count a repository's changes in a generation
    (SQLite, whose single writer serializes pushes anyway, and the in-memory store)."""

    exclusive: Callable[[str], AsyncContextManager[None]]
    layout_entries: Callable[[str], Awaitable[list[LayoutEntry]]]
    layout_generation: Callable[[str], Awaitable[int]]
    layout_synced: Callable[[str, int], Awaitable[None]]

    @contextlib.asynccontextmanager
    async def layout_rewrite(self, repo: str) -> AsyncIterator[list[LayoutEntry]]:
        async with self.exclusive(f"layout:{repo}"):
            generation = await self.layout_generation(repo)
            yield await self.layout_entries(repo)
            await self.layout_synced(repo, generation)
