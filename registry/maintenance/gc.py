"""Online garbage collection, driven by the metadata store.

A pass reads GC's queue (rows whose review_after has passed: see meta/base.py)
in batches. Each batch is re-checked and deleted by the store under row locks
(gc_collect), so a push that refers to a row and a pass that deletes it meet in
one transaction. The files of deleted rows go afterwards, by Blobs.remove_content,
which puts a file back if its row reappeared meanwhile. Deleting a manifest
queues what it referred to, due a whole gcDelay later: a client may have checked
those while they were in use (which writes nothing) and must keep that delay to
push a manifest naming them. So an index, its children and their blobs go in
successive passes, one gcDelay apart. Expired upload sessions and their data go
too. Passes never overlap, across replicas included (the "gc" lock).

A full pass (not one repository) also sweeps what a crash left set aside
(sweep_trash). The storage walk of ``registry gc --full`` is in repair.py.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable, TypeVar

from registry.digest import parse_digest
from registry.errors import RegistryError
from registry.keys import Services
from registry.meta.base import Candidate
from registry.reference import NAME_RE
from registry.storage.base import NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")
BATCH = 500
REPORT_LIMIT = 10000  # deleted items listed in a result (the counts are always complete)
# A set-aside object younger than this may still be in a removal's hands: an S3 server-side
# copy of a huge blob takes minutes between set_aside and restore/discard.
TRASH_GRACE = 3600.0


@dataclass
class GCResult:
    dry_run: bool
    started: float
    duration: float = 0.0
    reviewed: int = 0
    blobs_deleted: int = 0
    manifests_deleted: int = 0
    uploads_deleted: int = 0
    bytes_reclaimed: int = 0  # logical: a deduplicated file frees disk only with its last holder
    pending: int = 0
    trash_restored: int = 0  # set-aside objects put back under their key (see sweep_trash)
    trash_discarded: int = 0
    deleted: list[dict[str, object]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def collect(svc: Services, *, delete_untagged: bool, upload_ttl: float, dry_run: bool = False,
                  repo: str | None = None, now: float | None = None,
                  progress: Callable[[int, int], None] | None = None) -> GCResult:
    now = time.time() if now is None else now
    result = GCResult(dry_run=dry_run, started=now)
    t0 = time.monotonic()
    async with svc.meta.exclusive("gc"):
        total = await svc.meta.gc_pending(now)
        await _round(svc, result, now, now + svc.blobs.gc_delay(), delete_untagged, dry_run, repo, total, progress)
        await _expire_uploads(svc, result, now - upload_ttl, dry_run, repo)
        if repo is None:
            result.trash_restored, result.trash_discarded = await sweep_trash(svc, now=now, dry_run=dry_run)
        result.pending = await svc.meta.gc_pending(time.time())
    result.duration = time.monotonic() - t0
    return result


async def _round(svc: Services, result: GCResult, now: float, requeue_at: float, delete_untagged: bool,
                 dry_run: bool, repo: str | None, total: int,
                 progress: Callable[[int, int], None] | None) -> int:
    """One walk over the queue; returns how many rows it deleted."""
    after = None
    deleted_here = 0
    while True:
        batch = await svc.meta.gc_candidates(now, BATCH, repo, after)
        if not batch:
            return deleted_here
        last = batch[-1]
        after = (last.review_after, last.repo, last.kind, last.digest)
        deleted = await _uninterrupted(_collect_batch(svc, result, batch, now, requeue_at, delete_untagged,
                                                      dry_run))
        deleted_here += len(deleted)
        if progress:
            progress(result.reviewed, max(total, result.reviewed))


async def _uninterrupted(coro: Awaitable[T]) -> T:
    """Run ``coro`` to its end even when the caller is cancelled (the scheduler stopping
    at shutdown), then let the cancellation through: rows a batch deleted must not
    leave their files behind."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def _collect_batch(svc: Services, result: GCResult, batch: list[Candidate], now: float, requeue_at: float,
                         delete_untagged: bool, dry_run: bool) -> list[Candidate]:
    deleted = await svc.meta.gc_collect(batch, now, delete_untagged, dry_run, requeue_at)
    result.reviewed += len(batch)
    await _remove(svc, result, deleted, dry_run)
    return deleted


async def _remove(svc: Services, result: GCResult, deleted: list[Candidate], dry_run: bool) -> None:
    changed = set()
    for c in deleted:
        if c.kind == "blob":
            result.blobs_deleted += 1
        else:
            result.manifests_deleted += 1
            changed.add(c.repo)
        result.bytes_reclaimed += c.size
        if len(result.deleted) < REPORT_LIMIT:
            result.deleted.append({"repository": c.repo, "kind": c.kind, "digest": c.digest, "size": c.size})
        if not dry_run:
            await svc.blobs.remove_content(c.repo, parse_digest(c.digest))
    if not dry_run:
        for name in sorted(changed):  # untagged manifests are listed in index.json
            await svc.layout.sync(name)


async def _expire_uploads(svc: Services, result: GCResult, before: float, dry_run: bool, repo: str | None) -> None:
    while True:
        expired = [u for u in await svc.meta.uploads_expired(before, BATCH) if repo is None or u.repo == repo]
        if not expired:
            break
        for up in expired:
            result.uploads_deleted += 1
            if len(result.deleted) < REPORT_LIMIT:
                result.deleted.append({"repository": up.repo, "kind": "upload", "digest": up.id, "size": up.size})
            if not dry_run:
                await svc.meta.upload_delete(up.id)
                await svc.storage.upload_delete(up.id)
        if dry_run or len(expired) < BATCH:
            break
    if repo is not None:
        return
    # Data with no session row: single-request pushes cut off by a crash.
    for upload_id, mtime in await svc.storage.upload_list():
        if mtime < before and await svc.meta.upload_get(upload_id) is None:
            result.uploads_deleted += 1
            if not dry_run:
                await svc.storage.upload_delete(upload_id)


class GCStats:
    """Prometheus series of the passes this process ran (a prometheus-client collector)."""

    def __init__(self, pending: Callable[[], int] | None = None) -> None:
        self.runs = 0
        self.seconds = 0.0
        self.blobs = self.manifests = self.uploads = self.bytes = 0
        self.pending = 0
        self.last_success = 0.0

    def record(self, r: GCResult) -> None:
        self.runs += 1
        self.seconds += r.duration
        if not r.dry_run:
            self.blobs += r.blobs_deleted
            self.manifests += r.manifests_deleted
            self.uploads += r.uploads_deleted
            self.bytes += r.bytes_reclaimed
        self.pending = r.pending
        self.last_success = time.time()
        log.info("gc: %s %d blobs, %d manifests, %d uploads (%d bytes) after reviewing %d in %.2fs; %d pending",
                 "would delete" if r.dry_run else "deleted", r.blobs_deleted, r.manifests_deleted,
                 r.uploads_deleted, r.bytes_reclaimed, r.reviewed, r.duration, r.pending)

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        yield CounterMetricFamily("registry_gc_runs", "GC passes run by this process.", value=self.runs)
        yield CounterMetricFamily("registry_gc_duration_seconds", "Time spent in GC passes.", value=self.seconds)
        deleted = CounterMetricFamily("registry_gc_deleted", "Rows GC deleted.", labels=["kind"])
        for kind, n in (("blob", self.blobs), ("manifest", self.manifests), ("upload", self.uploads)):
            deleted.add_metric([kind], n)
        yield deleted
        yield CounterMetricFamily("registry_gc_reclaimed_bytes", "Logical bytes GC deleted.", value=self.bytes)
        yield GaugeMetricFamily("registry_gc_candidates_pending",
                                "Queued blobs and manifests due for review after the last pass.", value=self.pending)
        yield GaugeMetricFamily("registry_gc_last_run_timestamp_seconds",
                                "When the last GC pass ended.", value=self.last_success)


async def sweep_trash(svc: Services, *, now: float, dry_run: bool = False,
                      grace: float = TRASH_GRACE) -> tuple[int, int]:
    """Finish the set-aside protocol of removals a crash interrupted (services/blobs.py,
    remove_content): an object set aside more than ``grace`` ago goes back under its key
    when that key is missing and the metadata store still holds the content (a push of the
    same digest raced the removal), and is discarded otherwise. Returns (restored, discarded)."""
    storage = svc.storage
    restored = discarded = 0
    for aside, key, when in await storage.set_aside_list():
        if when > now - grace:
            continue
        put_back = key is not None and await _held(svc, key) and not await _stored(svc, key)
        if dry_run:
            restored, discarded = restored + put_back, discarded + (not put_back)
            continue
        if put_back:
            try:
                await storage.restore(aside, key)  # type: ignore[arg-type]
            except NotFound:  # finished by someone else meanwhile
                continue
            restored += 1
        else:
            discarded += 1
        await storage.discard(aside)
    if restored or discarded:
        log.warning("gc: %s %d and %s %d objects a crash left set aside", "would restore" if dry_run else "restored",
                    restored, "would discard" if dry_run else "discarded", discarded)
    return restored, discarded


async def _held(svc: Services, key: str) -> bool:
    """Whether the metadata store holds what a set-aside key stored: a row of the repository
    for ``<repo>/blobs/<alg>/<hex>``, any holder for a shared ``blobs/<alg>/<hex>`` (behind a
    router ``_sub/<n>/blobs/...``), as remove_content decides."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[0] == "_sub":
        parts = parts[2:]
    if len(parts) < 3 or parts[-3] != "blobs":
        return False
    try:
        digest = str(parse_digest(f"{parts[-2]}:{parts[-1]}"))
    except RegistryError:
        return False
    repo = "/".join(parts[:-3])
    if not repo:
        return await svc.meta.blob_holder(digest) is not None
    return NAME_RE.fullmatch(repo) is not None and await svc.meta.blob_size(repo, digest) is not None


async def _stored(svc: Services, key: str) -> bool:
    try:
        await svc.storage.stat(key)
    except NotFound:
        return False
    return True
