"""The dedupe walk (issue 5): link the copies already on disk when dedupe is
turned on, or give every repository its own copy back when it is turned off.

It goes digest by digest through the metadata store's copies (blob and
manifest rows of every repository), groups each digest's files by inode, and:

- "on": picks the inode most copies already share, verifies its content (the
  xxh3 recorded when the blob was written, or a rehash with the digest's own
  algorithm; an inode that fails is never used, and is itself replaced), then
  replaces every other copy by a hard link to it;
- "off": gives every copy that shares its inode with another its own copy.

Each replacement is made under a temporary name in the file's own directory,
checked (the inode and its size and mtime are still what was verified, the
file being replaced is still what was examined), then renamed over the old
name: a reader finds the old file or the new one, never nothing, and a reader
that has the old one open keeps reading it. With ``commit`` on, copies and
directory entries are fsynced. Copies whose size differs from their row are
left alone (scrub's business); so are copies on another filesystem than the
chosen inode (logged once) -- they are deduped among themselves.

The walk keeps its cursor (the last digest done) and running totals in the
metadata store, resumes after a crash or a restart, and runs on one process at
a time (the "dedupe" lock). The server starts it in the background when the
store's state does not match ``storage.dedupe``; ``registry dedupe`` runs it now.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import xxhash

from registry.digest import new_hasher, parse_digest
from registry.meta.dedupe import DedupeItem, DedupeState
from registry.storage import fs_links
from registry.storage.filesystem import FilesystemStorage
from registry.storage.fs_links import FileId

log = logging.getLogger("registry.dedupe")
BATCH = 200  # digests per metadata query
SAVE_EVERY = 1.0  # seconds between cursor saves (and at the end of every batch)
REPORT_LIMIT = 1000  # problems listed in a result
ON, OFF = "on", "off"
STOP_TIMEOUT = 10.0  # seconds a server shutdown waits for the walk to stop at a clean point
START_DELAY = 2.0  # seconds after start-up before the server looks at its files (short-lived apps never do)
# Walks of one store in one process take turns (the store's lock excludes other processes only).
_IN_PROCESS: "weakref.WeakKeyDictionary[Any, asyncio.Lock]" = weakref.WeakKeyDictionary()


def _in_process_lock(meta: Any) -> asyncio.Lock:
    lock = _IN_PROCESS.get(meta)
    if lock is None:
        lock = _IN_PROCESS[meta] = asyncio.Lock()
    return lock


class Halted(Exception):
    """The walk was asked to stop (server shutdown); it stops between two files."""


class Pacer:
    """At most ``rate`` bytes per second on average (0: unpaced); its waits end at once when
    ``halt`` is set, and so does the walk."""

    def __init__(self, rate: float, halt: threading.Event):
        self.rate = rate
        self.halt = halt
        self.start = time.monotonic()
        self.done = 0

    def consume(self, n: int) -> None:
        if self.halt.is_set():
            raise Halted()
        if self.rate <= 0:
            return
        self.done += n
        ahead = self.done / self.rate - (time.monotonic() - self.start)
        if ahead > 0 and self.halt.wait(ahead):
            raise Halted()


@dataclass
class DedupeResult:
    mode: str  # "on": link duplicates; "off": give every repository its own copy
    dry_run: bool
    started: float
    duration: float = 0.0
    resumed: bool = False
    digests: int = 0  # digests examined in this run
    files: int = 0  # files replaced (or that would be): links made for "on", copies made for "off"
    bytes: int = 0  # "on": disk bytes freed; "off": disk bytes the copies take
    total_files: int = 0  # over the whole walk, earlier interrupted runs included
    total_bytes: int = 0
    complete: bool = False
    problems: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problem(self, digest: str, repo: str, what: str) -> None:
        if len(self.problems) < REPORT_LIMIT:
            self.problems.append({"digest": digest, "repository": repo, "problem": what})
        log.warning("dedupe: %s@%s: %s", repo, digest, what)


@dataclass
class _Copy:
    item: DedupeItem
    path: Path
    id: FileId | None


def _hash_inode(path: Path, algorithm: str, pacer: Pacer) -> tuple[str, FileId]:
    """Hash the bytes of the file at path; returns the digest and the inode that was read
    (unchanged from start to end, or ValueError)."""
    h = xxhash.xxh3_128() if algorithm == "xxh3" else new_hasher(algorithm)
    buf = bytearray(fs_links.CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        before = FileId.of(os.fstat(f.fileno()))
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            h.update(view[:n])
            pacer.consume(n)
        after = FileId.of(os.fstat(f.fileno()))
    if not after.same_bytes(before):
        raise ValueError("the file changed while it was read")
    return h.hexdigest(), before


class _Walk:
    def __init__(self, svc: Any, fs: FilesystemStorage, mode: str, dry_run: bool, bytes_per_second: float,
                 result: DedupeResult, halt: threading.Event):
        self.svc = svc
        self.fs = fs
        self.mode = mode
        self.dry_run = dry_run
        self.halt = halt
        self.pacer = Pacer(bytes_per_second, halt)
        self.result = result
        self.loop = asyncio.get_running_loop()
        # One thread reads and copies (a paced walk sleeps in it, never in the loop's shared pool).
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dedupe")
        self.cross_device_warned = False

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(self.pool, fn, *args)

    def _examine(self, items: list[DedupeItem]) -> list[_Copy]:
        out, seen = [], set()
        for it in items:
            key = (it.repo, it.digest)
            if key in seen:  # a blob and a manifest row of one repository: one file
                continue
            seen.add(key)
            path = self.fs._path(f"{it.repo}/{parse_digest(it.digest).path}")
            out.append(_Copy(it, path, fs_links.file_id(path)))
        return out

    async def digest(self, digest: str, items: list[DedupeItem]) -> None:
        self.result.digests += 1
        if len(items) < 2:
            return
        copies = await self.run(self._examine, items)
        usable = []
        for c in copies:
            if c.id is None:
                continue  # no file (a row reindex repairs, or one GC is removing): nothing to link
            if c.id.size != c.item.size:
                self.result.problem(digest, c.item.repo, f"file is {c.id.size} bytes, its row says "
                                    f"{c.item.size}: left for scrub")
                continue
            usable.append(c)
        by_dev: dict[int, list[_Copy]] = defaultdict(list)
        for c in usable:
            by_dev[c.id.dev].append(c)  # type: ignore[union-attr]
        if len(by_dev) > 1 and not self.cross_device_warned:
            self.cross_device_warned = True
            log.warning("dedupe: copies of %s are on %d filesystems: each is deduped on its own (logged once)",
                        digest, len(by_dev))
        for group in by_dev.values():
            if self.mode == ON:
                await self._link(digest, group)
            else:
                await self._unlink(digest, group)

    async def _verify(self, digest: str, c: _Copy) -> FileId | None:
        """The inode of ``c`` if its bytes are the digest's (by the recorded xxh3, or a rehash)."""
        d = parse_digest(digest)
        recorded = await self.svc.meta.checksum_get(digest)
        algorithm, want = ("xxh3", recorded) if recorded else (d.algorithm, d.hex)
        try:
            got, fid = await self.run(_hash_inode, c.path, algorithm, self.pacer)
        except (OSError, ValueError) as exc:
            self.result.problem(digest, c.item.repo, f"not verified, not used: {exc}")
            return None
        if got != want or fid.size != c.item.size or c.id is None or not fid.same_bytes(c.id):
            self.result.problem(digest, c.item.repo, f"content does not match ({algorithm}): not used; "
                                "replaced by a verified copy when there is one")
            return None
        return fid

    async def _link(self, digest: str, group: list[_Copy]) -> None:
        inodes: dict[int, list[_Copy]] = defaultdict(list)
        for c in group:
            inodes[c.id.ino].append(c)  # type: ignore[union-attr]
        if len(inodes) < 2:
            return
        # Verify the inode most copies share first (fewest replacements); copies scrub found
        # damaged are candidates last, and only if nothing else is good.
        order = sorted(inodes.values(), key=lambda cs: (all(c.item.damaged for c in cs), -len(cs),
                                                         -cs[0].id.nlink, cs[0].item.repo))  # type: ignore[union-attr]
        if self.dry_run:
            canonical, cid = order[0][0], order[0][0].id
        else:
            canonical, cid = None, None
            for cs in order:
                cid = await self._verify(digest, cs[0])
                if cid is not None:
                    canonical = cs[0]
                    break
            if canonical is None or cid is None:
                self.result.problem(digest, group[0].item.repo, "no copy could be verified: left as it is")
                return
        for ino, cs in inodes.items():
            if ino == cid.ino:  # type: ignore[union-attr]
                continue
            replaced = 0
            for c in cs:
                if self.dry_run or await self._relink(digest, canonical.path, cid, c):  # type: ignore[arg-type]
                    replaced += 1
            self.result.files += replaced
            if replaced == len(cs) and cs[0].id.nlink <= len(cs):  # type: ignore[union-attr]
                self.result.bytes += cs[0].id.size  # type: ignore[union-attr]  # its last link is gone

    async def _relink(self, digest: str, canonical: Path, cid: FileId, c: _Copy) -> bool:
        assert c.id is not None
        try:
            done = await self.run(fs_links.relink, self.fs, canonical, cid, c.path, c.id)
        except OSError as exc:
            self.result.problem(digest, c.item.repo, f"not linked: {exc.strerror or exc}")
            return False
        if done:
            await self._after_replace(digest, c)
        return done

    async def _after_replace(self, digest: str, c: _Copy) -> None:
        """The race protocol (services/blobs.py): a file put under a repository whose row
        went meanwhile is taken away again; a damaged copy replaced by verified bytes is fine."""
        d = parse_digest(digest)
        if await self.svc.meta.blob_size(c.item.repo, digest) is None:
            await self.svc.blobs.remove_content(c.item.repo, d)
        elif c.item.damaged is not None and self.mode == ON:
            await self.svc.meta.scrub_mark(c.item.repo, c.item.kind, digest, None, time.time())

    async def _unlink(self, digest: str, group: list[_Copy]) -> None:
        inodes: dict[int, list[_Copy]] = defaultdict(list)
        for c in group:
            inodes[c.id.ino].append(c)  # type: ignore[union-attr]
        recorded = None if self.dry_run else await self.svc.meta.checksum_get(digest)
        for cs in inodes.values():
            for c in sorted(cs, key=lambda c: c.item.repo)[1:]:  # the first keeps the inode
                if self.dry_run or await self._own_copy(digest, c, recorded):
                    self.result.files += 1
                    self.result.bytes += c.id.size  # type: ignore[union-attr]

    async def _own_copy(self, digest: str, c: _Copy, recorded: str | None) -> bool:
        assert c.id is not None
        h = xxhash.xxh3_128() if recorded else None
        pacer = self.pacer

        def check(chunk: bytes) -> None:
            if h is not None:
                h.update(chunk)
            pacer.consume(len(chunk))
        try:
            outcome = await self.run(fs_links.own_copy, self.fs, c.path, c.id, check,
                                     lambda: h is None or h.hexdigest() == recorded)
        except OSError as exc:
            self.result.problem(digest, c.item.repo, f"not copied: {exc.strerror or exc}")
            return False
        if outcome == fs_links.MISMATCH and h is not None and h.hexdigest() != recorded:
            self.result.problem(digest, c.item.repo, "content does not match the xxh3 recorded at write "
                                "time: not copied (run registry scrub)")
        if outcome != fs_links.LINKED:
            return False
        await self._after_replace(digest, c)
        return True

    async def sweep(self) -> int:
        """Remove the temporary files an interrupted walk left (only this walk makes them,
        and only one walk runs at a time)."""
        removed, last = 0, None
        while True:
            names = await self.svc.meta.catalog(500, last)
            if not names:
                return removed
            for name in names:
                base = self.fs._path(f"{name}/blobs")
                dirs = await self.run(lambda b=base: [Path(e.path) for e in os.scandir(b) if e.is_dir()]
                                      if b.is_dir() else [])
                for d in dirs:
                    removed += await self.run(fs_links.sweep, d)
            last = names[-1]


def wanted_mode(dedupe: bool) -> str:
    return ON if dedupe else OFF


async def pending(svc: Any, dedupe: bool) -> bool:
    """Whether the store's files may not match ``storage.dedupe``: a walk is needed."""
    if not isinstance(svc.storage, FilesystemStorage) or not hasattr(svc.meta, "dedupe_state"):
        return False
    state = await svc.meta.dedupe_state()
    return state.mode != wanted_mode(dedupe) or state.started is not None


async def walk(svc: Any, *, undo: bool = False, dry_run: bool = False, bytes_per_second: float = 0,
               progress: Callable[[int, int], None] | None = None,
               halt: threading.Event | None = None) -> DedupeResult:
    """Run the walk (or the rest of an interrupted one) to the end. ``undo``: give every
    repository its own copy. ``dry_run``: report what would change, change nothing (the
    copies' content is not verified then). Setting ``halt`` stops it at the next file,
    with its cursor saved (``complete`` stays false)."""
    halt = halt or threading.Event()
    mode = OFF if undo else ON
    result = DedupeResult(mode=mode, dry_run=dry_run, started=time.time())
    t0 = time.monotonic()
    fs = svc.storage
    if not isinstance(fs, FilesystemStorage) or not hasattr(svc.meta, "dedupe_state"):
        result.complete = True  # nothing to do: this store keeps no files of its own to link
        return result
    w = _Walk(svc, fs, mode, dry_run, bytes_per_second, result, halt)
    try:
        async with _in_process_lock(svc.meta), svc.meta.exclusive("dedupe"):
            state = await svc.meta.dedupe_state()
            after = None
            if not dry_run:
                if state.started is not None and state.mode == mode:
                    after, result.resumed = state.cursor, True
                    log.info("dedupe: resuming the %s walk started at %s after %s", mode, time.ctime(state.started),
                             after or "the start")
                    swept = await w.sweep()
                    if swept:
                        log.info("dedupe: removed %d temporary files of the interrupted walk", swept)
                else:
                    if state.started is not None:  # a walk the other way was interrupted: it starts over
                        await w.sweep()
                    state = DedupeState(mode, None, time.time(), state.completed, 0, 0)
                    await svc.meta.dedupe_save(state)
            total, done = await svc.meta.dedupe_count(after)
            last_save = time.monotonic()
            while True:
                items = await svc.meta.dedupe_items(after, BATCH)
                if not items:
                    break
                by_digest: dict[str, list[DedupeItem]] = defaultdict(list)
                for it in items:
                    by_digest[it.digest].append(it)
                for digest, rows in by_digest.items():
                    if halt.is_set():
                        break
                    try:
                        await w.digest(digest, rows)
                    except Halted:
                        break  # this digest is done again on resume: every step is idempotent
                    after = digest
                    done += 1
                    if progress:
                        progress(done, max(total, done))
                    if not dry_run and time.monotonic() - last_save >= SAVE_EVERY:
                        await _save(svc, state, after, result)
                        last_save = time.monotonic()
                if not dry_run:
                    await _save(svc, state, after, result)
                    last_save = time.monotonic()
                if halt.is_set():
                    log.info("dedupe: walk stopped after %s; it resumes there", after or "the start")
                    return result
            result.complete = True
            result.total_files = state.files + result.files
            result.total_bytes = state.bytes + result.bytes
            if not dry_run:
                await svc.meta.dedupe_save(DedupeState(mode, None, None, time.time(), result.total_files,
                                                       result.total_bytes))
    finally:
        w.pool.shutdown(wait=False)
        result.duration = time.monotonic() - t0
    return result


async def _save(svc: Any, state: DedupeState, after: str | None, result: DedupeResult) -> None:
    await svc.meta.dedupe_save(DedupeState(state.mode, after, state.started, state.completed,
                                           state.files + result.files, state.bytes + result.bytes))


class DedupeStats:
    """Prometheus series of the walks this process ran (a prometheus-client collector)."""

    def __init__(self) -> None:
        self.runs = 0
        self.files = {ON: 0, OFF: 0}
        self.bytes = {ON: 0, OFF: 0}
        self.running = 0
        self.last_complete = 0.0

    def record(self, r: DedupeResult) -> None:
        self.runs += 1
        if not r.dry_run:
            self.files[r.mode] += r.files
            self.bytes[r.mode] += r.bytes
        if r.complete:
            self.last_complete = time.time()
        if r.mode == ON:
            log.info("dedupe: linked %d duplicate files, %d bytes freed (%d digests in %.1fs%s); %d problems",
                     r.files, r.bytes, r.digests, r.duration, ", resumed" if r.resumed else "", len(r.problems))
        else:
            log.info("dedupe: gave %d files their own copy, %d bytes more on disk (%d digests in %.1fs%s); "
                     "%d problems", r.files, r.bytes, r.digests, r.duration, ", resumed" if r.resumed else "",
                     len(r.problems))

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        yield CounterMetricFamily("registry_dedupe_runs", "Dedupe walks run by this process.", value=self.runs)
        files = CounterMetricFamily("registry_dedupe_files", "Files the dedupe walk replaced: by a hard link "
                                    "(mode on) or by a copy of their own (mode off).", labels=["mode"])
        size = CounterMetricFamily("registry_dedupe_bytes", "Disk bytes the dedupe walk freed (mode on) or "
                                   "took for copies (mode off).", labels=["mode"])
        for mode in (ON, OFF):
            files.add_metric([mode], self.files[mode])
            size.add_metric([mode], self.bytes[mode])
        yield files
        yield size
        yield GaugeMetricFamily("registry_dedupe_walk_running", "1 while a dedupe walk runs in this process.",
                                value=self.running)
        yield GaugeMetricFamily("registry_dedupe_last_complete_timestamp_seconds",
                                "When the last complete dedupe walk of this process ended.", value=self.last_complete)


class DedupeRunner:
    """The server's part: start a walk in the background when the store does not match
    ``storage.dedupe`` (turned on or off since the last walk, or a walk was interrupted);
    publish the walk's series and the storage usage in /metrics."""

    def __init__(self, svc: Any, cfg: Any, metrics: Any = None):
        self.svc = svc
        self.cfg = cfg
        self.stats = DedupeStats()
        self._task: asyncio.Task[None] | None = None
        self._halt = threading.Event()
        self._stopping = asyncio.Event()
        self.usage = None
        if metrics is not None:
            from registry.maintenance.usage import UsageCache
            metrics.registry.register(self.stats)
            metrics.store.usage = self.usage = UsageCache(svc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dedupe-walk")

    async def _run(self) -> None:
        dedupe = self.cfg.storage.dedupe
        try:
            try:
                await asyncio.wait_for(self._stopping.wait(), START_DELAY)
                return  # stopped before it began
            except asyncio.TimeoutError:
                pass
            if not await pending(self.svc, dedupe):
                return
            state = await self.svc.meta.dedupe_state()
            if state.mode is None and not await self.svc.meta.dedupe_items(None, 1):
                # A new store: nothing to walk, no lock to wait for; from now on pushes keep it right.
                await self.svc.meta.dedupe_save(DedupeState(wanted_mode(dedupe), completed=time.time()))
                return
            self.stats.running = 1
            log.info("dedupe: storage.dedupe is %s and the files on disk may not match: walking them in the "
                     "background", "on" if dedupe else "off")
            rate = getattr(self.cfg.storage, "dedupe_bytes_per_second", 0)
            result = await walk(self.svc, undo=not dedupe, bytes_per_second=rate, halt=self._halt)
            self.stats.record(result)
            if self.usage is not None:
                self.usage.invalidate()
        except asyncio.CancelledError:
            raise
        except Exception:  # logged; the next start resumes from the saved cursor
            log.exception("dedupe: the background walk failed")
        finally:
            self.stats.running = 0

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop the walk between two files, its cursor saved. Cancelling it instead could cut
        a metadata query in half (and leave a PostgreSQL connection holding its locks)."""
        if self._task is None:
            return
        self._halt.set()
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT)
        except asyncio.TimeoutError:  # stuck (waiting for another process's walk): cancel it
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None
