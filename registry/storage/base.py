"""The storage Protocol: bytes by key. Keys are '/'-separated relative paths
(``<repo>/blobs/sha256/<hex>``, ``<repo>/index.json``); upload data lives apart,
by upload id. Drivers raise only the errors defined here."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import AsyncIterator, Iterable, Protocol

from registry.digest import Digest, Hasher

TRASH = "_trash"


def aside_name(key: str) -> str:
    """A private name for a set-aside object that carries its original key, so that a sweep
    can finish the set-aside protocol after a crash (maintenance/gc.py, sweep_trash). The key
    is a path below the object's own directory rather than part of one file name: a
    repository name alone may be 255 characters, a file name's limit."""
    return f"{TRASH}/{uuid.uuid4().hex}/{key}"


def aside_key(name: str) -> str | None:
    """The original key of a set-aside name; None for names made before keys were kept."""
    parts = name.split("/", 2)
    return parts[2] if len(parts) == 3 and parts[0] == TRASH and parts[2] else None


class StorageError(Exception):
    """The backend failed; the message is safe to show (no secrets, no paths outside the root)."""


class NotFound(StorageError):
    pass


class InvalidOffset(StorageError):
    """An upload write did not start where the stored data ends."""

    def __init__(self, size: int):
        super().__init__(f"upload holds {size} bytes")
        self.size = size


class WriteInterrupted(StorageError):
    """The source stream failed mid-way; ``size`` bytes of the upload are stored."""

    def __init__(self, size: int, cause: BaseException):
        super().__init__(f"stream interrupted after {size} bytes: {cause}")
        self.size = size
        self.cause = cause


class Storage(Protocol):
    # Where a repository's blob lives. On the filesystem every repository has its own key (hard
    # links dedupe them); a store with ``shared_blobs`` keeps one object per digest for the whole
    # registry (the per-repository links are rows in meta/ only), so removing it must wait until
    # no repository holds the digest (services/blobs.py, remove_content).
    shared_blobs: bool

    def blob_key(self, repo: str, digest: Digest) -> str: ...

    async def stat(self, key: str) -> int:
        """Size in bytes, or NotFound."""

    def local_path(self, key: str) -> Path | None:
        """A file to hand to sendfile, when the driver stores on a local disk."""

    async def read(self, key: str) -> bytes:
        """A small object (index.json, a manifest) whole."""

    async def write(self, key: str, data: bytes) -> None:
        """Atomically replace a small object."""

    async def delete(self, key: str) -> bool:
        """Remove; False when it was not there."""

    async def link(self, src: str, dst: str) -> None:
        """Make dst hold src's bytes (hard link, copy, or server-side copy)."""

    async def set_aside(self, key: str) -> str | None:
        """Move an object to a private name, ``aside_name(key)`` (see services/blobs.py,
        remove_content); None if absent."""

    async def restore(self, aside: str, key: str) -> None:
        """Put a set-aside object back under key unless key already exists."""

    async def discard(self, aside: str) -> None: ...

    async def set_aside_list(self) -> list[tuple[str, str | None, float]]:
        """(set-aside name, original key or None, when it was set aside) of every set-aside
        object: what a crash left between set_aside and restore/discard."""

    def walk(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """(key, size) of every object under prefix."""

    def walk_mtime(self, prefix: str) -> AsyncIterator[tuple[str, int, float]]:
        """(key, size, last modified) of every object under prefix."""

    async def list_dirs(self, prefix: str) -> Iterable[str]: ...

    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        """(subdirectory names, object names) directly under prefix, each sorted."""

    # Uploads in progress.
    async def upload_write(self, upload_id: str, offset: int, chunks: AsyncIterator[bytes],
                           hashers: list[Hasher], limit: int | None = None) -> int:
        """Write chunks at offset (which must be the stored size: InvalidOffset
        otherwise), updating hashers; returns the new size."""

    async def upload_size(self, upload_id: str) -> int: ...

    def upload_read(self, upload_id: str, length: int) -> AsyncIterator[bytes]: ...

    async def upload_place(self, upload_id: str, key: str, replace: bool = False) -> None:
        """Make the upload's bytes visible under key (durably when commit is on);
        an existing object is kept unless ``replace`` (repairing a damaged copy).
        The upload data stays until upload_delete."""

    async def upload_delete(self, upload_id: str) -> None: ...

    async def upload_list(self) -> list[tuple[str, float]]:
        """(upload id, last modified) of every upload's data, for expiry."""
