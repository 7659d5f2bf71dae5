"""A local read cache of hot blobs on disk, bounded in bytes, least recently used out first.

Blobs are content-addressed, so a cached file never goes stale: it is named by
its digest (``<alg>-<hex>``) and shared by every repository holding the digest.
It is filled by a whole GET streamed from the store (the bytes are written to a
temporary file as they go to the client, and renamed in only when complete and
of the expected size) and served with sendfile afterwards. The access order is
kept in memory (rebuilt from the files' access times at start); several
processes sharing the directory each enforce the bound on what they know, so
the directory can briefly hold up to that many times the bound.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("registry.storage.cache")
TMP = ".tmp-"


class CacheFill:
    """A blob being written into the cache while it streams to a client."""

    def __init__(self, cache: "BlobCache", name: str, size: int):
        self.cache, self.name, self.size = cache, name, size
        self.tmp = cache.dir / f"{TMP}{uuid.uuid4().hex}"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.written = 0

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)
        self.written += len(data)

    def commit(self) -> None:
        os.close(self.fd)
        self.fd = -1
        if self.written != self.size:
            self.abort()
            return
        os.replace(self.tmp, self.cache.dir / self.name)
        self.cache._add(self.name, self.size)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


class BlobCache:
    def __init__(self, directory: Path, max_bytes: int, max_fraction: float = 0.5):
        self.dir = directory
        self.max_bytes = max_bytes
        self.max_object = int(max_bytes * max_fraction)  # one blob never pushes out more than this
        self._lru: OrderedDict[str, int] = OrderedDict()  # name -> size, oldest first
        self.total = 0
        self.hits = self.misses = self.evictions = 0
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        self.dir.mkdir(parents=True, exist_ok=True)
        found = []
        for e in os.scandir(self.dir):
            if e.name.startswith(TMP):  # a fill cut off by a crash
                try:
                    os.unlink(e.path)
                except FileNotFoundError:
                    pass
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_atime, e.name, st.st_size))
        for _, name, size in sorted(found):
            self._lru[name] = size
            self.total += size
        self._evict()

    @staticmethod
    def name_for(key: str) -> str | None:
        """``<alg>-<hex>`` of a content-addressed key (``.../blobs/<alg>/<hex>``); None otherwise."""
        parts = key.split("/")
        if len(parts) >= 3 and parts[-3] == "blobs":
            return f"{parts[-2]}-{parts[-1]}"
        return None

    def get(self, name: str) -> Path | None:
        """The cached file, marked as just used; None on a miss."""
        self._load()
        if name not in self._lru:
            self.misses += 1
            return None
        path = self.dir / name
        if not path.is_file():  # evicted by another process sharing the directory
            self.total -= self._lru.pop(name)
            self.misses += 1
            return None
        self._lru.move_to_end(name)
        self.hits += 1
        return path

    def fill(self, name: str, size: int) -> CacheFill | None:
        """A writer for a blob about to stream from the store; None when it should not be cached."""
        self._load()
        if size > self.max_object or name in self._lru:
            return None
        try:
            return CacheFill(self, name, size)
        except OSError as exc:
            log.warning("cache: cannot write to %s: %s", self.dir, exc.strerror)
            return None

    def _add(self, name: str, size: int) -> None:
        if name in self._lru:
            self.total -= self._lru.pop(name)
        self._lru[name] = size
        self.total += size
        self._evict()

    def _evict(self) -> None:
        while self.total > self.max_bytes and self._lru:
            name, size = self._lru.popitem(last=False)
            self.total -= size
            self.evictions += 1
            try:
                os.unlink(self.dir / name)
            except FileNotFoundError:
                pass
