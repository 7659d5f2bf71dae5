"""Storage accounting (issue 5): logical and physical bytes, per repository and in total.

- logical: the bytes of the blobs and manifests each repository holds, as
  clients see them (a blob held by three repositories counts three times);
- physical: what the disk holds for them: each distinct file (inode) once, by
  its size. Per repository, ``physical`` is what the repository's own files
  take (each inode once) and ``exclusive`` what deleting it would free (inodes
  no other repository links).

The copies come from the metadata store (every blob and manifest row), the
inodes from a ``stat`` of each copy's file: the figures follow pushes, deletes,
GC and dedupe walks without any bookkeeping of their own. A row without a file
is counted in ``missing`` (``registry reindex`` repairs those). On a store
without local files (S3), physical is the logical size of each digest once.
Index files (index.json, oci-layout), upload data and the metadata database
are not content and are not counted.
"""
from __future__ import annotations

import asyncio
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from registry.digest import parse_digest

PAGE = 5000


@dataclass
class RepoUsage:
    repository: str
    logical_bytes: int = 0
    physical_bytes: int = 0
    exclusive_bytes: int = 0
    blobs: int = 0
    manifests: int = 0
    missing: int = 0


@dataclass
class Usage:
    logical_bytes: int = 0
    physical_bytes: int = 0
    files: int = 0  # copies (rows) with a file
    inodes: int = 0  # distinct files on disk behind them
    missing: int = 0
    local: bool = True  # physical figures come from the disk
    measured_at: float = 0.0
    duration: float = 0.0
    repositories: list[RepoUsage] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return self.logical_bytes - self.physical_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["saved_bytes"] = self.saved_bytes
        return out


def _stat_all(paths: list[tuple[int, str]]) -> list[tuple[int, tuple[int, int, int] | None]]:
    out: list[tuple[int, tuple[int, int, int] | None]] = []
    for i, p in paths:
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            out.append((i, None))
            continue
        out.append((i, (st.st_dev, st.st_ino, st.st_size) if stat.S_ISREG(st.st_mode) else None))
    return out


async def measure(svc: Any, repo: str | None = None) -> Usage:
    """Walk every stored copy (of ``repo`` only, if given) and stat its file."""
    t0 = time.monotonic()
    usage = Usage(measured_at=time.time())
    loop = asyncio.get_running_loop()
    root = svc.storage.local_path("")
    usage.local = root is not None
    repos: dict[str, RepoUsage] = {}
    inode_size: dict[tuple[int, int], int] = {}
    inode_repos: dict[tuple[int, int], set[str]] = {}
    digest_size: dict[str, int] = {}
    after = None
    seen: set[tuple[str, str]] = set()
    while True:
        items = await svc.meta.scrub_items(after, PAGE, repo)
        if not items:
            break
        after = (items[-1].repo, items[-1].kind, items[-1].digest)
        todo: list[tuple[int, str]] = []
        for i, it in enumerate(items):
            r = repos.get(it.repo)
            if r is None:
                r = repos[it.repo] = RepoUsage(it.repo)
            r.logical_bytes += it.size
            if it.kind == "blob":
                r.blobs += 1
            else:
                r.manifests += 1
            usage.logical_bytes += it.size
            digest_size[it.digest] = it.size
            if usage.local and (it.repo, it.digest) not in seen:  # a digest held as blob and manifest: one file
                seen.add((it.repo, it.digest))
                path = svc.storage.local_path(f"{it.repo}/{parse_digest(it.digest).path}")
                todo.append((i, str(path)))
        if usage.local:
            for i, found in await loop.run_in_executor(None, _stat_all, todo):
                name = items[i].repo
                if found is None:
                    repos[name].missing += 1
                    usage.missing += 1
                    continue
                dev, ino, size = found
                usage.files += 1
                inode_size[(dev, ino)] = size
                inode_repos.setdefault((dev, ino), set()).add(name)
    if usage.local:
        usage.inodes = len(inode_size)
        usage.physical_bytes = sum(inode_size.values())
        for key, names in inode_repos.items():
            size = inode_size[key]
            for name in names:
                repos[name].physical_bytes += size
            if len(names) == 1:
                repos[next(iter(names))].exclusive_bytes += size
    else:
        usage.physical_bytes = sum(digest_size.values())
        for r in repos.values():
            r.physical_bytes = r.logical_bytes
    usage.repositories = sorted(repos.values(), key=lambda r: r.repository)
    usage.duration = time.monotonic() - t0
    return usage


class UsageCache:
    """The latest measure, for /metrics: refreshed when a scrape finds it older than
    ``max_age``, and never more often than ten times the last measure took (a scrape
    of a huge store costs at most a tenth of one thread's time)."""

    def __init__(self, svc: Any, max_age: float = 5.0):
        self.svc = svc
        self.max_age = max_age
        self.latest: Usage | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        """The next scrape measures again (after a dedupe walk changed the files)."""
        self._at = float("-inf")

    async def refresh(self) -> Usage | None:
        async with self._lock:
            now = time.monotonic()
            if self.latest is not None and now - self._at < max(self.max_age, 10 * self.latest.duration) \
                    and self._at != float("-inf"):
                return self.latest
            self.latest = await measure(self.svc)
            self._at = time.monotonic()
            return self.latest
