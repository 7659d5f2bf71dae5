"""Hard links on the filesystem store, for dedupe (issue 5).

Blocking helpers, run in a worker thread. Every file that becomes visible goes
in under a temporary name in the destination's directory and is renamed into
place (``os.replace``), so a reader always finds either the old file or the new
one, never nothing; with ``commit`` on, copied data and the directory entry are
fsynced first. A file is checked (size, and for the walk its inode and content
hash) while it sits under the temporary name, before anyone can see it.

Temporary names: ``.tmp-*`` for the push path (as the store's own writes),
``.dedupe-*`` for the walk, which sweeps its own leftovers after a crash.
"""
from __future__ import annotations

import errno
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from registry.storage.filesystem import FilesystemStorage, _fsync_dir

WALK_PREFIX = ".dedupe-"
CHUNK = 4 << 20

# Outcomes of placing a file by hard link.
LINKED = "linked"        # dst now holds src's inode
EXISTS = "exists"        # dst was there already and is kept
MISSING = "missing"      # src is gone
MISMATCH = "mismatch"    # src is not a regular file of the expected size
CROSS_DEVICE = "cross-device"  # src is on another filesystem, or the filesystem refuses hard links
TOO_MANY_LINKS = "too-many-links"  # src's inode reached the filesystem's link limit


@dataclass(frozen=True, slots=True)
class FileId:
    """What identifies the bytes of a file at one moment: an inode, and its size and mtime."""
    dev: int
    ino: int
    size: int
    mtime_ns: int
    nlink: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileId":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_nlink)

    def same_bytes(self, other: "FileId") -> bool:
        """The same inode, not written since (the link count may differ)."""
        return (self.dev, self.ino, self.size, self.mtime_ns) == (other.dev, other.ino, other.size, other.mtime_ns)


def file_id(path: Path) -> FileId | None:
    """The regular file at path, or None (missing, or not a regular file)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return FileId.of(st) if stat.S_ISREG(st.st_mode) else None


def _publish(fs: FilesystemStorage, tmp: Path, dst: Path, replace: bool) -> str:
    """Make tmp visible as dst: rename over it, or link without replacing an existing file."""
    if replace:
        os.replace(tmp, dst)
    else:
        try:
            os.link(tmp, dst)
        except FileExistsError:
            return EXISTS
    if fs.commit:
        _fsync_dir(dst.parent)
    return LINKED


def link_into(fs: FilesystemStorage, src: Path, dst: Path, size: int, replace: bool = False,
              avoid: FileId | None = None) -> str:
    """Hard-link src's inode at dst, after checking it is a regular file of ``size`` bytes
    (and not the inode ``avoid``, known bad). An existing dst is kept unless ``replace``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not replace and dst.exists():
        return EXISTS
    tmp = dst.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        try:
            os.link(src, tmp)
        except (FileNotFoundError, NotADirectoryError):
            return MISSING
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                return CROSS_DEVICE
            if exc.errno == errno.EMLINK:
                return TOO_MANY_LINKS
            raise
        st = os.lstat(tmp)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return MISMATCH
        if avoid is not None and (st.st_dev, st.st_ino) == (avoid.dev, avoid.ino):
            return MISMATCH
        return _publish(fs, tmp, dst, replace)
    finally:
        tmp.unlink(missing_ok=True)


def copy_into(fs: FilesystemStorage, src: Path, dst: Path, size: int, replace: bool = False,
              prefix: str = ".tmp-", check: Callable[[bytes], None] | None = None,
              accept: Callable[[], bool] | None = None, expect: FileId | None = None) -> str:
    """Copy src to dst (a new inode): to a temporary name, fsynced when commit is on, checked,
    then renamed into place. ``check`` sees every chunk copied (a hasher, a pacer) and
    ``accept`` says at the end whether the copy may be published (MISMATCH otherwise);
    ``expect`` is the inode src (and dst, when it is the same path) must still be."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not replace and dst.exists():
        return EXISTS
    tmp = dst.parent / f"{prefix}{uuid.uuid4().hex}"
    try:
        try:
            fin = open(src, "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError):
            return MISSING
        with fin:
            got = FileId.of(os.fstat(fin.fileno()))
            if got.size != size or (expect is not None and not got.same_bytes(expect)):
                return MISMATCH
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                total = 0
                while n := fin.readinto(buf):
                    if check is not None:
                        check(view[:n])
                    off = 0
                    while off < n:
                        off += os.write(fd, view[off:n])
                    total += n
                if fs.commit:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if total != size or (expect is not None and not FileId.of(os.fstat(fin.fileno())).same_bytes(expect)):
                return MISMATCH
        if accept is not None and not accept():
            return MISMATCH
        if expect is not None and dst == src:
            now = file_id(dst)
            if now is None or not now.same_bytes(expect):
                return MISMATCH
        return _publish(fs, tmp, dst, replace)
    finally:
        tmp.unlink(missing_ok=True)


def relink(fs: FilesystemStorage, canonical: Path, canonical_id: FileId, dst: Path, dst_id: FileId) -> bool:
    """Replace dst (still the inode ``dst_id``) by a hard link to ``canonical`` (still the
    verified inode ``canonical_id``), atomically. False when either changed meanwhile."""
    tmp = dst.parent / f"{WALK_PREFIX}{uuid.uuid4().hex}"
    try:
        try:
            os.link(canonical, tmp)
        except (FileNotFoundError, NotADirectoryError):
            return False
        got = file_id(tmp)
        if got is None or not got.same_bytes(canonical_id):
            return False
        now = file_id(dst)
        if now is None or not now.same_bytes(dst_id):
            return False
        os.replace(tmp, dst)
        if fs.commit:
            _fsync_dir(dst.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def own_copy(fs: FilesystemStorage, path: Path, path_id: FileId, check: Callable[[bytes], None] | None = None,
             accept: Callable[[], bool] | None = None) -> str:
    """Give path a new inode of its own holding the same bytes (breaking a hard link), atomically."""
    return copy_into(fs, path, path, path_id.size, replace=True, prefix=WALK_PREFIX, check=check, accept=accept,
                     expect=path_id)


def sweep(directory: Path) -> int:
    """Remove what an interrupted walk left in a directory (its temporary names only)."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for e in entries:
        if e.name.startswith(WALK_PREFIX):
            try:
                os.unlink(e.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed
