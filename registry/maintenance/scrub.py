"""Scrub: rehash stored blobs and check manifests, record what is damaged.

Blobs are rehashed with their own digest's algorithm (sha256, sha512, blake3),
in a worker thread, paced to ``bytesPerSecond``. A quick pass compares the
xxh3-128 recorded when the blob was written instead, at disk speed. Findings
are kept per stored copy in the metadata store; a damaged blob is not served
until a push of the same content replaces it. A manifest file whose bytes
differ from the manifest recorded at push time is rewritten from that record
(manifests are served from it) and reported once. The pass keeps a cursor in
the metadata store, resumes after a restart, and runs on one replica at a time.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import xxhash

from registry.digest import digest_bytes, new_hasher, parse_digest
from registry.keys import Services
from registry.meta.base import ScrubItem, ScrubState
from registry.services.blobs import blob_key
from registry.services.manifests import parse

log = logging.getLogger(__name__)
# Read size: 1 MiB stays in a core's L2 between the read and the hash (4 MiB measured up to 12%
# slower for xxh3, 5% for blake3: bench/scrub_bench.py), and is the pacing granularity.
CHUNK = 1 << 20
BATCH = 200
# One thread: a paced scrub sleeps in it, never in the loop's shared pool.
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrub")
# Seconds of unused allowance a pacer may catch up on: time spent not reading (waiting for the
# lock another replica holds, a run of manifests, a slow disk) is no licence for a burst.
BURST = 1.0


class Stopped(Exception):
    """The pass was cancelled while a file was being hashed."""


class Pacer:
    """At most ``rate`` bytes per second on average (0: unpaced); called from the scrub thread.
    ``stop()`` (the pass was cancelled) ends any sleep and makes ``hash_file`` give up."""

    def __init__(self, rate: float):
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def consume(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            self.start = max(self.start, now - self.done / self.rate - BURST)
            self.done += n
            ahead = self.done / self.rate - (now - self.start)
        if ahead > 0:
            self._stop.wait(ahead)


def hash_file(path: str, algorithm: str, pacer: Pacer) -> tuple[str, int]:
    """(hex digest, bytes read); ``algorithm`` is a digest algorithm or "xxh3"."""
    h = xxhash.xxh3_128() if algorithm == "xxh3" else new_hasher(algorithm)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            h.update(view[:n])
            total += n
            pacer.consume(n)
            if pacer.stopped:
                raise Stopped(path)
    return h.hexdigest(), total


async def _in_thread(pacer: Pacer, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn`` in the scrub thread; a cancelled pass stops it there too (not hours of paced hashing later)."""
    try:
        return await asyncio.get_running_loop().run_in_executor(_executor, fn, *args)
    except asyncio.CancelledError:
        pacer.stop()
        raise


@dataclass
class Finding:
    repository: str
    kind: str
    digest: str
    error: str


@dataclass
class ScrubResult:
    quick: bool
    started: float
    duration: float = 0.0
    blobs: int = 0
    manifests: int = 0
    bytes: int = 0
    complete: bool = False
    damaged: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _check_blob(svc: Services, item: ScrubItem, quick: bool, pacer: Pacer) -> tuple[str | None, int]:
    digest = parse_digest(item.digest)
    path = svc.storage.local_path(svc.blobs.key(item.repo, digest))  # (S3 with dedupe: one key per digest)
    if path is None:  # not on a local disk: stream it
        return await _check_stream(svc, item, pacer)
    loop = asyncio.get_running_loop()
    try:
        size = (await loop.run_in_executor(None, os.stat, path)).st_size
    except FileNotFoundError:
        return "file missing", 0
    if size != item.size:
        return f"file is {size} bytes, expected {item.size}", 0
    recorded = await svc.meta.checksum_get(item.digest) if quick else None
    algorithm = "xxh3" if recorded else digest.algorithm
    try:
        got, n = await _in_thread(pacer, hash_file, str(path), algorithm, pacer)
    except FileNotFoundError:
        return "file missing", 0
    if n != item.size:
        return f"file is {n} bytes, expected {item.size}", n
    if recorded:
        return (None if got == recorded else "content changed since it was written (xxh3 mismatch)"), n
    if got != digest.hex:
        return f"content does not match its digest ({digest.algorithm} is {got})", n
    return None, n


async def _check_stream(svc: Services, item: ScrubItem, pacer: Pacer) -> tuple[str | None, int]:
    digest = parse_digest(item.digest)
    read = getattr(svc.storage, "read_stream", None)
    if read is None:
        return None, 0
    h, n = new_hasher(digest.algorithm), 0
    try:
        async for chunk in read(svc.blobs.key(item.repo, digest)):
            await _in_thread(pacer, h.update, chunk)
            await _in_thread(pacer, pacer.consume, len(chunk))
            n += len(chunk)
    except Exception as exc:  # NotFound and friends: what the store says is the finding
        return f"unreadable: {exc}", n
    if n != item.size:
        return f"object is {n} bytes, expected {item.size}", n
    return (None if h.hexdigest() == digest.hex else
            f"content does not match its digest ({digest.algorithm} is {h.hexdigest()})"), n


async def _check_manifest(svc: Services, item: ScrubItem) -> str | None:
    m = await svc.meta.manifest_get(item.repo, item.digest)
    if m is None:
        return None  # deleted meanwhile
    digest = parse_digest(item.digest)
    if digest_bytes(m.payload, digest.algorithm) != digest:
        return "the recorded manifest does not match its digest"
    try:
        parse(m.payload, m.media_type)
    except Exception as exc:
        return f"the recorded manifest does not parse: {getattr(exc, 'detail', exc)}"
    key = f"{item.repo}/{digest.path}"
    try:
        on_disk = await svc.storage.read(key)
    except Exception:
        on_disk = None
    if on_disk == m.payload:
        return None
    await svc.storage.write(key, m.payload)
    what = "missing" if on_disk is None else "corrupt"
    return f"manifest file was {what}; rewritten from the metadata store"


async def scheduled_scrub(svc: Services, *, interval: float, bytes_per_second: float) -> ScrubResult | None:
    """The scheduler's pass. With several replicas each one's scheduler fires, but a pass
    another completed less than half an interval ago counts for all (checked under the
    scrub lock): one pass per interval, not one per replica. None when skipped."""
    return await scrub(svc, bytes_per_second=bytes_per_second, skip_if_done_since=time.time() - interval / 2)


async def scrub(svc: Services, *, quick: bool = False, repo: str | None = None, bytes_per_second: float = 0,
                progress: Callable[[int, int], None] | None = None,
                skip_if_done_since: float | None = None) -> ScrubResult | None:
    """One pass (or the rest of an interrupted one) over every stored blob and manifest."""
    now = time.time()
    result = ScrubResult(quick=quick, started=now)
    t0 = time.monotonic()
    pacer = Pacer(bytes_per_second)
    async with svc.meta.exclusive("scrub"):
        state = await svc.meta.scrub_state() if repo is None else ScrubState(None, None, None)
        if (skip_if_done_since is not None and state.pass_started is None and state.last_complete is not None
                and state.last_complete >= skip_if_done_since):
            return None
        after = state.cursor if state.pass_started is not None else None
        started = state.pass_started if after is not None else now
        if after is not None:
            log.info("scrub: resuming the pass started at %s after %s", time.ctime(started), "/".join(after))
        done = 0
        while True:
            batch = await svc.meta.scrub_items(after, BATCH, repo)
            if not batch:
                break
            for item in batch:
                if item.kind == "blob":
                    finding, n = await _check_blob(svc, item, quick, pacer)
                    result.blobs += 1
                    result.bytes += n
                    if finding is not None and await svc.meta.blob_size(item.repo, item.digest) is None:
                        finding = None  # deleted meanwhile (GC, a DELETE): gone, not damaged
                else:
                    finding = await _check_manifest(svc, item)
                    result.manifests += 1
                if finding is not None:
                    result.damaged.append(Finding(item.repo, item.kind, item.digest, finding))
                    log.warning("scrub: %s %s@%s: %s", item.kind, item.repo, item.digest, finding)
                await svc.meta.scrub_mark(item.repo, item.kind, item.digest, finding, time.time())
                done += 1
                if progress:
                    progress(done, 0)
            after = (batch[-1].repo, batch[-1].kind, batch[-1].digest)
            if repo is None:
                await svc.meta.scrub_save(ScrubState(after, started, state.last_complete))
        result.complete = True
        if repo is None:
            await svc.meta.scrub_save(ScrubState(None, None, time.time()))
    result.duration = time.monotonic() - t0
    return result


async def report(svc: Services, repo: str | None = None) -> list[dict[str, str]]:
    """zot's shape: one row per (repository, tag), or per affected blob of a tag. Damage no tag
    reaches (an untagged manifest, a referrer, a loose blob) is an affected row with tag ""."""
    by_tag: dict[tuple[str, str], list[Any]] = {}
    reached: set[tuple[str, str, str]] = set()
    for r in await svc.meta.scrub_reach(repo):
        reached.add((r.repo, r.kind, r.digest))
        by_tag.setdefault((r.repo, r.tag), [])
        if r.damaged is not None:
            by_tag[(r.repo, r.tag)].append(r)
    rows = []
    for (name, tag), bad in sorted(by_tag.items()):
        if not bad:
            rows.append({"repository": name, "tag": tag, "status": "ok", "affected_blob": "", "error": ""})
        for r in bad:
            rows.append({"repository": name, "tag": tag, "status": "affected", "affected_blob": r.digest,
                         "error": r.damaged})
    for r in await svc.meta.scrub_damaged(repo):
        if (r.repo, r.kind, r.digest) not in reached:
            rows.append({"repository": r.repo, "tag": "", "status": "affected", "affected_blob": r.digest,
                         "error": r.damaged})
    rows.sort(key=lambda x: (x["repository"], x["tag"] == ""))  # stable: a repository's untagged rows last
    return rows


class ScrubStats:
    """Prometheus series of this process's scrub passes."""

    def __init__(self) -> None:
        self.blobs = self.bytes = self.corrupt = self.runs = 0
        self.seconds = 0.0
        self.last_complete = 0.0

    def record(self, r: ScrubResult) -> None:
        self.runs += 1
        self.blobs += r.blobs
        self.bytes += r.bytes
        self.corrupt += len(r.damaged)
        self.seconds += r.duration
        if r.complete:
            self.last_complete = time.time()
        log.info("scrub: %s pass checked %d blobs (%d bytes) and %d manifests in %.1fs: %d damaged",
                 "quick" if r.quick else "deep", r.blobs, r.bytes, r.manifests, r.duration, len(r.damaged))

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        yield CounterMetricFamily("registry_scrub_runs", "Scrub passes run by this process.", value=self.runs)
        yield CounterMetricFamily("registry_scrub_blobs", "Blobs rehashed by scrub.", value=self.blobs)
        yield CounterMetricFamily("registry_scrub_bytes", "Bytes rehashed by scrub.", value=self.bytes)
        yield CounterMetricFamily("registry_scrub_corrupt", "Damaged blobs and manifests found.", value=self.corrupt)
        yield CounterMetricFamily("registry_scrub_duration_seconds", "Time spent scrubbing.", value=self.seconds)
        yield GaugeMetricFamily("registry_scrub_last_complete_timestamp_seconds",
                                "When the last complete scrub pass ended.", value=self.last_complete)
