"""Filesystem storage: keys are paths under the root directory.

Every file that becomes visible is written under a temporary name and renamed
into place; with ``commit`` on, file data and the directory entry are fsynced
first. Blocking calls run in the loop's executor, except writes too small for
a thread hop to pay off.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable, TypeVar

from registry.digest import Digest, Hasher
from registry.storage.base import InvalidOffset, NotFound, StorageError, WriteInterrupted, aside_key, aside_name

T = TypeVar("T")
UPLOADS = "_uploads"
TRASH = "_trash"
BATCH = 1 << 20  # bytes handed to a worker thread at a time
INLINE = 256 << 10  # a tail smaller than this is written on the loop


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn  # type: ignore[no-any-return]


# Linux: start writeback of a range without waiting for it, so that the fsync
# at the end of an upload waits only for the last batch, not the whole file.
_sync_file_range = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def hash_and_write(fd: int, chunks: list[bytes] | list[memoryview], pos: int, hashers: list[Hasher],
                   writeback: bool = False) -> None:
    """Hash and write chunks at pos (one pwritev per batch, no concatenation)."""
    start = pos
    for h in hashers:
        for c in chunks:
            h.update(c)
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.pwritev(fd, views[:1024], pos)
        pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    if writeback and _sync_file_range is not None and pos > start:
        _sync_file_range(fd, start, pos - start, SYNC_FILE_RANGE_WRITE)


class FilesystemStorage:
    shared_blobs = False  # every repository has its own file; dedupe hard-links them

    def __init__(self, root: str | os.PathLike[str], *, commit: bool = True, dedupe: bool = True):
        self.root = Path(root).resolve()
        self.commit = commit
        self.dedupe = dedupe
        for sub in (UPLOADS, TRASH):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._copy_warned = False

    # -- helpers
    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except FileNotFoundError as exc:
            raise NotFound(str(exc.filename and Path(exc.filename).name)) from None
        except OSError as exc:
            if isinstance(exc, (StorageError,)):
                raise
            raise StorageError(f"{exc.strerror or exc}") from None

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"bad key {key!r}")
        return self.root / key

    def _upload_path(self, upload_id: str) -> Path:
        return self.root / UPLOADS / upload_id

    def _durable_rename(self, tmp: Path, dst: Path) -> None:
        os.replace(tmp, dst)
        if self.commit:
            _fsync_dir(dst.parent)

    def blob_key(self, repo: str, digest: Digest) -> str:
        return f"{repo}/{digest.path}"

    # -- objects
    async def stat(self, key: str) -> int:
        return (await self._run(os.stat, self._path(key))).st_size

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def read(self, key: str) -> bytes:
        return await self._run(self._path(key).read_bytes)

    def _write_sync(self, key: str, data: bytes) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.commit:
                    f.flush()
                    os.fsync(f.fileno())
            self._durable_rename(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def write(self, key: str, data: bytes) -> None:
        await self._run(self._write_sync, key, data)

    async def delete(self, key: str) -> bool:
        try:
            await self._run(os.unlink, self._path(key))
        except NotFound:
            return False
        return True

    def _link_sync(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            return
        tmp = dst.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            if self.dedupe:
                try:
                    os.link(src, tmp)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                        raise
                    self._copy_file(src, tmp)
            else:
                self._copy_file(src, tmp)
            self._durable_rename(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def _copy_file(self, src: Path, dst: Path) -> None:
        shutil.copyfile(src, dst)
        if self.commit:
            fd = os.open(dst, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def link(self, src: str, dst: str) -> None:
        await self._run(self._link_sync, self._path(src), self._path(dst))

    def _prune_trash(self, path: Path) -> None:
        """Remove the empty directories of one set-aside name, up to (not including) _trash."""
        trash = self.root / TRASH
        while path != trash and trash in path.parents:
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent

    def _set_aside_sync(self, key: str) -> str | None:
        src = self._path(key)
        if not os.path.lexists(src):
            return None
        aside = aside_name(key)
        dst = self.root / aside
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dst)
        except FileNotFoundError:  # removed meanwhile
            self._prune_trash(dst.parent)
            return None
        return aside

    async def set_aside(self, key: str) -> str | None:
        return await self._run(self._set_aside_sync, key)

    def _restore_sync(self, aside: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(aside, dst)
        except FileExistsError:
            pass

    async def restore(self, aside: str, key: str) -> None:
        await self._run(self._restore_sync, self.root / aside, self._path(key))

    def _discard_sync(self, aside: Path) -> None:
        try:
            os.unlink(aside)
        except FileNotFoundError:
            pass
        self._prune_trash(aside.parent)

    async def discard(self, aside: str) -> None:
        await self._run(self._discard_sync, self.root / aside)

    async def set_aside_list(self) -> list[tuple[str, str | None, float]]:
        # A rename keeps the file's mtime but sets its ctime: the time it was set aside.
        return [(name, aside_key(name), when) async for name, _size, when in self.walk_mtime(TRASH)]

    def _walk_sync(self, prefix: str) -> list[tuple[str, int, float]]:
        """(key, size, changed): the later of mtime and ctime, so a file renamed or linked
        into place counts from then (a hard link of an old upload keeps its old mtime)."""
        base = self._path(prefix) if prefix else self.root
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append((p.relative_to(self.root).as_posix(), st.st_size, max(st.st_mtime, st.st_ctime)))
        return out

    async def walk(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        for key, size, _when in await self._run(self._walk_sync, prefix):
            yield key, size

    async def walk_mtime(self, prefix: str) -> AsyncIterator[tuple[str, int, float]]:
        for item in await self._run(self._walk_sync, prefix):
            yield item

    async def list_dirs(self, prefix: str) -> list[str]:
        return (await self.list_dir(prefix))[0]

    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        base = self._path(prefix) if prefix else self.root

        def ls() -> tuple[list[str], list[str]]:
            dirs, files = [], []
            try:
                for e in os.scandir(base):
                    (dirs if e.is_dir(follow_symlinks=False) else files).append(e.name)
            except (FileNotFoundError, NotADirectoryError):
                pass
            return sorted(dirs), sorted(files)
        return await self._run(ls)

    # -- uploads
    def _open_at(self, path: Path, offset: int) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size < offset:
                raise InvalidOffset(size)
            if size > offset:  # bytes written but never recorded (a crash, an interrupted stream)
                os.ftruncate(fd, offset)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def upload_write(self, upload_id: str, offset: int, chunks: AsyncIterator[bytes],
                           hashers: list[Hasher], limit: int | None = None) -> int:
        fd = await self._run(self._open_at, self._upload_path(upload_id), offset)
        pos, buf, buffered = offset, [], 0
        pending: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        wb = self.commit
        try:
            try:
                async for chunk in chunks:
                    buf.append(chunk)
                    buffered += len(chunk)
                    if buffered >= BATCH:
                        if pending is not None:
                            await pending
                        pending = loop.run_in_executor(None, hash_and_write, fd, buf, pos, hashers, wb)
                        pos += buffered
                        buf, buffered = [], 0
            except (ConnectionError, asyncio.TimeoutError, OSError, ValueError, EOFError) as exc:
                if pending is not None:
                    await pending
                hash_and_write(fd, buf, pos, hashers)
                pos += buffered
                raise WriteInterrupted(pos, exc) from exc
            if pending is not None:
                await pending
            if buffered < INLINE:
                hash_and_write(fd, buf, pos, hashers)
            else:
                await loop.run_in_executor(None, hash_and_write, fd, buf, pos, hashers)
            pos += buffered
            if self.commit:
                await loop.run_in_executor(None, os.fsync, fd)
            return pos
        except OSError as exc:
            raise StorageError(exc.strerror or str(exc)) from None
        finally:
            os.close(fd)

    async def upload_size(self, upload_id: str) -> int:
        return (await self._run(os.stat, self._upload_path(upload_id))).st_size

    async def upload_read(self, upload_id: str, length: int) -> AsyncIterator[bytes]:
        f = await self._run(open, self._upload_path(upload_id), "rb")
        try:
            left = length
            while left > 0:
                data = await self._run(f.read, min(BATCH * 4, left))
                if not data:
                    raise StorageError(f"upload {upload_id} is shorter than {length} bytes")
                left -= len(data)
                yield data
        finally:
            f.close()

    def _place_sync(self, src: Path, dst: Path, replace: bool = False) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() and not replace:
            return
        tmp = dst.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            os.link(src, tmp)
            self._durable_rename(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    async def upload_place(self, upload_id: str, key: str, replace: bool = False) -> None:
        await self._run(self._place_sync, self._upload_path(upload_id), self._path(key), replace)

    async def upload_list(self) -> list[tuple[str, float]]:
        def ls() -> list[tuple[str, float]]:
            out = []
            for e in os.scandir(self.root / UPLOADS):
                try:
                    out.append((e.name, e.stat().st_mtime))
                except FileNotFoundError:
                    continue
            return out
        return await self._run(ls)

    async def upload_delete(self, upload_id: str) -> None:
        try:
            await self._run(os.unlink, self._upload_path(upload_id))
        except NotFound:
            pass
