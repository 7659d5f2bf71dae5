"""Dedupe on the push path (issue 5): a blob another repository already holds
becomes a hard link to that repository's file, whatever way it arrives (an
upload, a single-request push, a mount).

Holders come from the metadata store (digest -> repositories, see
meta/dedupe.py) and are hints, not trusted: a holder scrub marked damaged, or
whose file is missing or has the wrong size, is skipped and then repaired from
the verified bytes of the upload (its file put back, or replaced). When no
holder is good, the upload's own file is kept, as with dedupe off. Across
filesystems (or on one that refuses hard links) the blob is copied instead, and
that is logged once.

The order of the race protocol in services/blobs.py is kept: a file is placed
before its row, and a file placed for a repository whose row is gone is
removed again through ``remove_content`` (which checks the row once more).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from registry.digest import Digest
from registry.meta.dedupe import Holder
from registry.storage import fs_links
from registry.storage.base import NotFound, StorageError
from registry.storage.filesystem import FilesystemStorage

if TYPE_CHECKING:
    from registry.services.blobs import Blobs

log = logging.getLogger("registry.dedupe")
T = TypeVar("T")
MAX_HOLDERS = 8  # holders tried (and repaired) per push


def local_dedupe(storage: Any) -> FilesystemStorage | None:
    """The filesystem store when it dedupes by hard link; None otherwise."""
    return storage if isinstance(storage, FilesystemStorage) and storage.dedupe else None


async def _run(fn: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except OSError as exc:  # drivers raise only their own errors (DESIGN.md, convention 1)
        raise StorageError(exc.strerror or str(exc)) from None


def warn_copy(fs: FilesystemStorage, src: Path, dst: Path) -> None:
    if not fs._copy_warned:
        fs._copy_warned = True
        log.warning("dedupe: %s and %s are on different filesystems (or hard links are refused there): "
                    "duplicates are copied, not linked (logged once)", src.parent, dst.parent)


async def holders(meta: Any, digest: str, exclude: str | None = None) -> list[Holder]:
    get = getattr(meta, "blob_holders", None)
    if get is not None:
        found = await get(digest, MAX_HOLDERS + 1)
    else:  # a store without the dedupe index: the one holder it can name
        one = await meta.blob_holder(digest)
        stat = await meta.blob_stat(one[0], digest) if one else None
        found = [Holder(one[0], one[1], stat.damaged if stat else None)] if one else []
    return [h for h in found if h.repo != exclude][:MAX_HOLDERS]


def _key(repo: str, digest: Digest) -> str:
    return f"{repo}/{digest.path}"


async def place_upload(blobs: "Blobs", repo: str, upload_id: str, digest: Digest, size: int,
                       replace: bool = False) -> None:
    """Make a verified upload's bytes visible in ``repo``: a hard link to a good holder's
    file when dedupe is on, the upload's own file otherwise (an existing file is kept
    unless ``replace``, as ``Storage.upload_place``)."""
    fs = local_dedupe(blobs.storage)
    if fs is None:
        await blobs.storage.upload_place(upload_id, blobs.key(repo, digest), replace)  # (S3: shared key)
        return
    dst = fs._path(_key(repo, digest))
    if not replace and await _run(dst.exists):
        return
    # Replacing a damaged copy: its inode is bad, and so is every holder's file linked to it.
    bad = await _run(fs_links.file_id, dst) if replace else None
    stale: list[tuple[Holder, str]] = []
    placed, linking = False, True
    for h in await holders(blobs.meta, str(digest), exclude=repo):
        if h.damaged is not None:
            stale.append((h, fs_links.MISMATCH))
            continue
        if h.size != size:
            continue  # a row that disagrees on the size of a digest: not ours to judge here
        src = fs._path(_key(h.repo, digest))
        if placed or not linking:  # the other holders are only checked (a stat each), for repair
            got = await _run(fs_links.file_id, src)
            if got is None:
                stale.append((h, fs_links.MISSING))
            elif got.size != size or (bad is not None and (got.dev, got.ino) == (bad.dev, bad.ino)):
                stale.append((h, fs_links.MISMATCH))
            continue
        outcome = await _run(fs_links.link_into, fs, src, dst, size, replace, bad)
        if outcome in (fs_links.LINKED, fs_links.EXISTS):
            placed = True
        elif outcome in (fs_links.MISSING, fs_links.MISMATCH):
            stale.append((h, outcome))
        elif outcome == fs_links.CROSS_DEVICE:
            warn_copy(fs, src, dst)
            linking = False  # the upload's own file is as good as a copy, and costs no read
        # TOO_MANY_LINKS: try the next holder's inode
    if not placed:
        own = fs._upload_path(upload_id)
        outcome = await _run(fs_links.link_into, fs, own, dst, size, replace)
        if outcome == fs_links.CROSS_DEVICE:
            warn_copy(fs, own, dst)
            outcome = await _run(fs_links.copy_into, fs, own, dst, size, replace)
        if outcome == fs_links.MISSING:
            raise NotFound(f"upload {upload_id}")
        if outcome == fs_links.MISMATCH:
            raise StorageError(f"upload {upload_id} is not {size} bytes")
    for h, why in stale:
        try:
            await repair_holder(blobs, h, digest, dst, size, why)
        except Exception as exc:  # a repair is a bonus: the push itself has succeeded
            log.warning("dedupe: could not repair %s@%s: %s", h.repo, digest, exc)


async def repair_holder(blobs: "Blobs", h: Holder, digest: Digest, good: Path, size: int, why: str) -> None:
    """Put verified bytes (the file at ``good``) back under a holder whose file is missing,
    has the wrong size, or was found damaged by scrub."""
    fs = local_dedupe(blobs.storage)
    if fs is None:
        return
    key = _key(h.repo, digest)
    dst = fs._path(key)
    outcome = await _run(fs_links.link_into, fs, good, dst, size, why != fs_links.MISSING)
    if outcome == fs_links.CROSS_DEVICE:
        outcome = await _run(fs_links.copy_into, fs, good, dst, size, why != fs_links.MISSING)
    if outcome != fs_links.LINKED:
        return
    if await blobs.meta.blob_size(h.repo, str(digest)) is None:  # its row went meanwhile: take the file back
        await blobs.remove_content(h.repo, digest)
        return
    if h.damaged is not None:
        await blobs.meta.scrub_mark(h.repo, "blob", str(digest), None, time.time())
    log.warning("dedupe: repaired %s@%s (%s) from a verified push of the same content", h.repo, digest,
                "file was missing" if why == fs_links.MISSING else h.damaged or "file had the wrong size")


async def link_blob(blobs: "Blobs", digest: Digest, size: int, source: str, repo: str) -> None:
    """Mount: make ``repo`` hold the blob ``source`` holds (hard link when dedupe is on).
    When the source's file is gone or bad, another good holder's file will do; NotFound
    when none is left (the client then uploads)."""
    fs = local_dedupe(blobs.storage)
    if fs is None:
        await blobs.storage.link(blobs.key(source, digest), blobs.key(repo, digest))  # (S3: shared key)
        return
    dst = fs._path(_key(repo, digest))
    found = await holders(blobs.meta, str(digest), exclude=repo)
    bad = {h.repo for h in found if h.damaged is not None or h.size != size}
    names = [source] + [h.repo for h in found if h.repo != source]
    for name in names:
        if name in bad:
            continue
        src = fs._path(_key(name, digest))
        outcome = await _run(fs_links.link_into, fs, src, dst, size, False)
        if outcome in (fs_links.LINKED, fs_links.EXISTS):
            return
        if outcome == fs_links.CROSS_DEVICE:
            warn_copy(fs, src, dst)
            outcome = await _run(fs_links.copy_into, fs, src, dst, size, False)
            if outcome in (fs_links.LINKED, fs_links.EXISTS):
                return
    raise NotFound(_key(source, digest))
