"""What dedupe needs from the metadata store (issue 5).

The dedupe index is the metadata itself: ``repo_blobs`` (and ``manifests``)
indexed by digest map a digest to every repository holding it. A holder is a
hint, never trusted blindly: the caller checks the file (present, right size,
not marked damaged by scrub) before linking it anywhere.

The walk that dedupes copies already on disk (or gives every repository its
own copy back) keeps its place in ``dedupe_state``, so an interrupted walk
resumes where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Holder:
    """A repository holding a blob, with the size recorded there and scrub's finding."""
    repo: str
    size: int
    damaged: str | None = None


@dataclass(frozen=True, slots=True)
class DedupeItem:
    """One stored copy of a digest: a blob or a manifest row of one repository."""
    digest: str
    repo: str
    kind: str  # "blob" | "manifest"
    size: int
    damaged: str | None = None


@dataclass(frozen=True, slots=True)
class DedupeState:
    """``mode`` is the target of the walk in progress (``started`` set) or of the
    last complete one: "on" links duplicates, "off" gives each repository its own
    copy. ``cursor`` is the last digest done; ``files``/``bytes`` the running totals."""
    mode: str | None = None
    cursor: str | None = None
    started: float | None = None
    completed: float | None = None
    files: int = 0
    bytes: int = 0


class DedupeMeta(Protocol):
    async def blob_holders(self, digest: str, limit: int) -> list[Holder]:
        """Repositories holding the blob, undamaged first, oldest first."""

    async def dedupe_items(self, after: str | None, limit: int) -> list[DedupeItem]:
        """Every stored copy (blob and manifest rows) of the next ``limit`` digests
        after ``after``, ordered by (digest, repo, kind)."""

    async def dedupe_count(self, upto: str | None) -> tuple[int, int]:
        """(distinct digests stored, how many of them are <= ``upto``)."""

    async def dedupe_state(self) -> DedupeState: ...

    async def dedupe_save(self, state: DedupeState) -> None: ...
