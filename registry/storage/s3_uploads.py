"""Uploads in progress on S3: multipart uploads, a spool on local disk, state in the bucket.

An upload's state is a small JSON object, ``_uploads/<id>/state.json``, rewritten
at the end of every write, so any process can continue, read back or finish the
upload after a restart. It records:

- ``mpu``: the S3 multipart upload (key ``_uploads/<id>/data-<n>``, upload id,
  parts as ``[number, etag, size]``). Every part but the last is exactly the
  configured part size (``chunksize``, 5 MiB at least).
- ``tail``: the bytes after the last part, fewer than a part: byte ranges of
  small "piece" objects (one per write that did not fill a part), in order.
- ``base``: after ``materialize`` (below), one completed object holding every
  byte, instead of ``mpu`` and ``tail``.

Writing. Bytes are hashed as they arrive (the caller's hashers, as on the
filesystem) and appended to a spool file on local disk holding the tail: a
chunk smaller than a part is never held in memory. When the spool reaches the
part size it is uploaded as the next part (``partConcurrency`` at once, the
request body waits for a free slot: memory and disk stay bounded whatever the
blob size) and a new spool starts. At the end of the write what is left in the
spool is stored as a piece and the state is saved (conditionally on the ETag of
the state the write started from, where the store supports it: a concurrent
writer on another replica then gets InvalidOffset instead of overwriting).
Another process that continues the upload downloads the tail's pieces (less
than a part) into its own spool first.

Reading back (a rehash by a process that does not hold the running hash, or a
digest in another algorithm) and placing: parts of an unfinished multipart
upload cannot be read in S3, so ``materialize`` completes it, with the tail as
the last part, into ``_uploads/<id>/data-<n>`` and records that object as
``base``. Placing then copies it server-side to the blob's key.

Why not complete straight to the blob's key: the key of a multipart upload is
fixed when it is created, at the first part, before the digest is known (a
chunked push names it only in the final PUT). Completing to a temporary key and
copying is also what makes the order of DESIGN.md hold: the digest is verified
(by the caller, before ``upload_place``) against exactly the bytes that become
visible, and a blob key only ever receives a whole verified object. An
interrupted upload leaves only objects under ``_uploads/<id>/`` and possibly an
open multipart upload, both invisible to pulls; ``delete`` aborts the multipart
uploads and removes the objects, and GC's upload expiry calls it.

A write that starts from a state holding more bytes than the caller recorded
(a write acknowledged by S3 but never recorded in the metadata store) is cut
back first; cutting inside the parts goes through ``materialize`` and copies the
kept whole parts back server-side (UploadPartCopy).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from io import RawIOBase
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from registry.digest import Hasher
from registry.storage.filesystem import hash_and_write
from registry.storage.base import InvalidOffset, NotFound, StorageError, WriteInterrupted

if TYPE_CHECKING:
    from registry.storage.s3 import S3Storage

log = logging.getLogger("registry.storage.s3")
UPLOADS = "_uploads"
BATCH = 1 << 20  # bytes hashed and written to the spool per thread hop
INLINE = 256 << 10  # smaller batches are written on the loop
MAX_PARTS = 10000
MAX_REMEMBERED = 10000  # uploads whose objects this process remembers (a shortcut for delete)
INLINE_MAX = 256 << 10  # a tail up to this size is kept in the state object: no piece object
MAX_SPOOLS = 512  # spooled tails kept between writes (each less than a part); others are downloaded again
STREAM_ERRORS = (ConnectionError, asyncio.TimeoutError, OSError, ValueError, EOFError)


class Conflict(Exception):
    """The state changed under a writer (another replica wrote the same upload)."""


@dataclass
class State:
    size: int = 0
    base: list[Any] | None = None  # [key, length, exact]: bytes [0, length) of one object
    mpu: dict[str, Any] | None = None  # {"key", "id", "parts": [[number, etag, size], ...]}
    tail: list[list[Any]] = field(default_factory=list)  # [[key, start, length, exact], ...]
    inline: bytes | None = None  # instead of ``tail``: a small tail kept inside the state object
    gen: str = ""
    created: float = 0.0
    etag: str | None = None  # of state.json as read; not stored

    def dump(self) -> bytes:
        return json.dumps({"v": 1, "size": self.size, "base": self.base, "mpu": self.mpu, "tail": self.tail,
                           "inline": None if self.inline is None else base64.b64encode(self.inline).decode(),
                           "gen": self.gen, "created": self.created}).encode()

    @classmethod
    def load(cls, data: bytes, etag: str | None) -> "State":
        doc = json.loads(data)
        inline = doc.get("inline")
        return cls(size=doc["size"], base=doc.get("base"), mpu=doc.get("mpu"), tail=doc.get("tail") or [],
                   inline=None if inline is None else base64.b64decode(inline),
                   gen=doc.get("gen", ""), created=doc.get("created", 0.0), etag=etag)

    @property
    def parts_size(self) -> int:
        return sum(p[2] for p in self.mpu["parts"]) if self.mpu else 0

    @property
    def tail_size(self) -> int:
        return len(self.inline) if self.inline is not None else sum(r[2] for r in self.tail)

    def next_part(self) -> int:
        return max((p[0] for p in self.mpu["parts"]), default=0) + 1 if self.mpu else 1


@dataclass
class _Owned:
    """Everything this process created for an upload it started, while no other process wrote it:
    deleting it then needs no listing."""
    gen: str
    keys: set[str] = field(default_factory=set)
    mpus: set[tuple[str, str]] = field(default_factory=set)


class FileRange(RawIOBase):
    """A seekable read-only view of bytes [start, start + length) of an open file (a request body)."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self._fd, self._start, self._len, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + offset))
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = self._len - self._pos
        if n is None or n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._start + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def __len__(self) -> int:
        return self._len


class S3Uploads:
    def __init__(self, s3: "S3Storage", spool_root: Path):
        self.s3 = s3
        self.spool_root = spool_root
        self.spool: Path | None = None
        self.part_size = s3.part_size
        self.concurrency = s3.cfg.part_concurrency
        self.conditional = True  # state saved with If-Match / If-None-Match while the store takes them
        self._spools: dict[str, tuple[str, Path]] = {}  # upload id -> (state gen, spool file = its tail)
        self._owned: dict[str, _Owned] = {}
        # upload id -> the state this process last wrote, or read back (and so hashed): what
        # upload_place makes visible when called here next, without reading the state again.
        self._mem: dict[str, State] = {}

    # -- the local spool directory: one per process, removed at exit (and when found orphaned)
    def start(self) -> None:
        self._spool_dir()

    def stop(self) -> None:
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)
            self.spool = None
        self._spools.clear()

    def _spool_dir(self) -> Path:
        if self.spool is None:
            self.spool_root.mkdir(parents=True, exist_ok=True)
            for d in self.spool_root.glob("p*-*"):
                try:
                    pid = int(d.name[1:].split("-")[0])
                    os.kill(pid, 0)
                except ProcessLookupError:  # its process is gone
                    shutil.rmtree(d, ignore_errors=True)
                except (ValueError, PermissionError):
                    continue
            self.spool = self.spool_root / f"p{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.spool.mkdir()
        return self.spool

    def _new_spool_file(self, upload_id: str) -> Path:
        return self._spool_dir() / f"{upload_id}.{uuid.uuid4().hex[:12]}"

    def _forget_spool(self, upload_id: str) -> None:
        cached = self._spools.pop(upload_id, None)
        if cached is not None:
            cached[1].unlink(missing_ok=True)

    # -- state
    def _key(self, upload_id: str, name: str) -> str:
        return f"{UPLOADS}/{upload_id}/{name}"

    async def _load(self, upload_id: str) -> State | None:
        key = self._key(upload_id, "state.json")
        try:
            r = await self.s3.call("get_object", key, Key=self.s3.k(key))
            async with r["Body"] as body:
                data = await body.read()
        except NotFound:
            return None
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.s3.error(exc, key) from None
        try:
            return State.load(data, r.get("ETag"))
        except (ValueError, KeyError, TypeError):
            raise StorageError(f"upload {upload_id}: state object is unreadable") from None

    async def _save(self, upload_id: str, st: State, *, over_any: bool = False) -> None:
        """Write the state, conditionally on the version it was read at (none: it must not exist).
        ``over_any``: a write from offset 0, which replaces whatever state there is."""
        from registry.storage.s3 import _code
        key = self._key(upload_id, "state.json")
        st.gen = uuid.uuid4().hex
        client = await self.s3._get_client()
        while True:
            cond: dict[str, str] = {}
            if self.conditional:
                cond = {"IfMatch": st.etag} if st.etag else {"IfNoneMatch": "*"}
            try:
                r = await client.put_object(Bucket=self.s3.bucket, Key=self.s3.k(key), Body=st.dump(),
                                            ContentType="application/json", **self.s3._put_extra, **cond)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated
                code, status = _code(exc)
                if cond and (code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)):
                    if over_any and not st.etag:  # an earlier state of this upload: replace it
                        old = await self._load(upload_id)
                        self._owned.pop(upload_id, None)  # its objects are not all ours: list them to delete
                        if old is not None:
                            st.etag, over_any = old.etag, False
                            continue
                    raise Conflict() from None
                if cond and (code in ("NotImplemented", "InvalidArgument", "InvalidRequest") or status == 501):
                    log.warning("s3: the store refuses conditional writes (%s): upload state is saved without "
                                "them; concurrent writes to one upload on two replicas are then not detected", code)
                    self.conditional = False
                    continue
                raise self.s3.error(exc, key) from None
        st.etag = r.get("ETag")
        own = self._owned.get(upload_id)
        if own is not None:
            own.gen = st.gen
            own.keys.add(key)
        self._remember(upload_id, st)

    def _remember(self, upload_id: str, st: State) -> None:
        self._mem.pop(upload_id, None)
        self._mem[upload_id] = st
        while len(self._mem) > MAX_REMEMBERED:
            del self._mem[next(iter(self._mem))]

    def _ownership(self, upload_id: str, st: State | None) -> _Owned | None:
        """The record of what this process created for the upload, if it alone wrote it so far."""
        if st is None:
            own = self._owned[upload_id] = _Owned("")
            while len(self._owned) > MAX_REMEMBERED:  # sessions finished elsewhere: forget the oldest
                del self._owned[next(iter(self._owned))]
            return own
        own = self._owned.get(upload_id)
        if own is not None and own.gen != st.gen:
            del self._owned[upload_id]
            return None
        return own

    def _track(self, upload_id: str, key: str | None = None, mpu: tuple[str, str] | None = None) -> None:
        own = self._owned.get(upload_id)
        if own is not None:
            if key:
                own.keys.add(key)
            if mpu:
                own.mpus.add(mpu)

    # -- multipart pieces
    async def _create_mpu(self, upload_id: str, st: State) -> None:
        key = self._key(upload_id, f"data-{uuid.uuid4().hex[:12]}")
        r = await self.s3.call("create_multipart_upload", key, Key=self.s3.k(key),
                               ContentType="application/octet-stream", **self.s3._put_extra)
        st.mpu = {"key": key, "id": r["UploadId"], "parts": []}
        self._track(upload_id, key, (key, r["UploadId"]))

    async def _upload_part(self, st: State, number: int, path: Path, size: int) -> list[Any]:
        assert st.mpu is not None
        with open(path, "rb") as f:
            r = await self.s3.call("upload_part", st.mpu["key"], Key=self.s3.k(st.mpu["key"]),
                                   UploadId=st.mpu["id"], PartNumber=number, Body=f, ContentLength=size)
        self.s3.bytes_in += size
        return [number, r["ETag"], size]

    async def _fill_spool(self, upload_id: str, st: State) -> tuple[Path, int]:
        """A spool file holding the tail's bytes: the one this process left, or downloaded."""
        cached = self._spools.pop(upload_id, None)
        want = st.tail_size
        if cached is not None:
            gen, path = cached
            try:
                if gen == st.gen and path.stat().st_size == want:
                    return path, want
            except FileNotFoundError:
                pass
            path.unlink(missing_ok=True)
        path = self._new_spool_file(upload_id)
        loop = asyncio.get_running_loop()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pos = os.pwrite(fd, st.inline, 0) if st.inline else 0
            for key, start, length, _exact in [] if st.inline is not None else st.tail:
                if not length:
                    continue
                _, chunks = await self.s3.open_range(key, start, start + length - 1)
                async for data in chunks:
                    await loop.run_in_executor(None, os.pwrite, fd, data, pos)
                    pos += len(data)
            if pos != want:
                raise StorageError(f"upload {upload_id}: tail holds {pos} bytes, state says {want}")
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return path, want

    async def _normalize(self, upload_id: str, st: State) -> None:
        """A ``base`` object becomes whole parts (copied server-side) plus a tail range."""
        if st.base is None:
            return
        key, length, exact = st.base
        m = length // self.part_size
        if m:
            if st.mpu is None:
                await self._create_mpu(upload_id, st)
            assert st.mpu is not None
            first = st.next_part()
            mpu = st.mpu
            source = {"Bucket": self.s3.bucket, "Key": self.s3.k(key)}
            sem = asyncio.Semaphore(self.concurrency)

            async def copy(i: int) -> list[Any]:
                start = i * self.part_size
                async with sem:
                    r = await self.s3.call("upload_part_copy", key, Key=self.s3.k(mpu["key"]), UploadId=mpu["id"],
                                           PartNumber=first + i, CopySource=source,
                                           CopySourceRange=f"bytes={start}-{start + self.part_size - 1}")
                return [first + i, r["CopyPartResult"]["ETag"], self.part_size]
            mpu["parts"] += list(await asyncio.gather(*(copy(i) for i in range(m))))
        rem = length - m * self.part_size
        st.tail = ([[key, m * self.part_size, rem, bool(exact and m == 0)]] if rem else []) + st.tail
        st.base = None

    async def _materialize(self, upload_id: str, st: State) -> tuple[str, int]:
        """One completed object holding exactly the upload's bytes: (key, size)."""
        if st.base is not None and st.base[2] and st.mpu is None and not st.tail and st.inline is None:
            return st.base[0], st.base[1]
        if st.base is None and st.mpu is None and st.inline is None and len(st.tail) == 1 and st.tail[0][3]:
            return st.tail[0][0], st.tail[0][2]  # one whole piece: nothing to assemble
        await self._normalize(upload_id, st)
        if st.mpu is None:  # all in the tail, less than a part: one object from the spool
            key = self._key(upload_id, f"data-{uuid.uuid4().hex[:12]}")
            path, size = await self._fill_spool(upload_id, st)
            try:
                with open(path, "rb") as f:
                    await self.s3.put_file(key, f, size, ContentType="application/octet-stream")
            finally:
                path.unlink(missing_ok=True)
            self._track(upload_id, key)
        else:
            key = st.mpu["key"]
            parts = list(st.mpu["parts"])
            if st.tail_size:
                path, size = await self._fill_spool(upload_id, st)
                try:
                    if st.next_part() > MAX_PARTS:
                        raise StorageError(f"upload {upload_id} needs more than {MAX_PARTS} parts")
                    parts.append(await self._upload_part(st, st.next_part(), path, size))
                finally:
                    path.unlink(missing_ok=True)
            await self.s3.call("complete_multipart_upload", key, Key=self.s3.k(key), UploadId=st.mpu["id"],
                               MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e, _ in
                                                          sorted(parts)]})
        st.base, st.mpu, st.tail, st.inline = [key, st.size, True], None, [], None
        try:
            await self._save(upload_id, st)
        except Conflict:
            raise StorageError(f"upload {upload_id} was changed by another process meanwhile") from None
        return key, st.size

    async def _truncate(self, upload_id: str, st: State, offset: int) -> None:
        """Cut the upload back to ``offset`` bytes (bytes stored but never recorded)."""
        parts = st.parts_size
        if st.base is None and offset >= parts and st.inline is not None:
            st.inline, st.size = st.inline[:offset - parts], offset
            return
        if st.base is None and offset >= parts:
            keep, tail = offset - parts, []
            for key, start, length, exact in st.tail:
                if keep <= 0:
                    break
                take = min(length, keep)
                tail.append([key, start, take, bool(exact and take == length)])
                keep -= take
            st.tail, st.size = tail, offset
            return
        if st.base is None:
            await self._materialize(upload_id, st)
        assert st.base is not None
        st.base = [st.base[0], offset, bool(st.base[2] and offset == st.base[1])]
        st.size = offset

    async def _put_small(self, key: str, data: bytes, replace: bool) -> None:
        """PUT a small object, unless one is there already (If-None-Match, where the store takes it)."""
        from registry.storage.s3 import _code
        if replace or not self.conditional:
            if not replace and await self.s3.exists(key):
                return
            await self.s3.write(key, data)
            return
        client = await self.s3._get_client()
        try:
            await client.put_object(Bucket=self.s3.bucket, Key=self.s3.k(key), Body=data, IfNoneMatch="*",
                                    **self.s3._put_extra)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated
            code, status = _code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return  # there already
            if code in ("NotImplemented", "InvalidArgument", "InvalidRequest") or status == 501:
                self.conditional = False
                await self._put_small(key, data, replace)
                return
            raise self.s3.error(exc, key) from None
        self.s3.bytes_in += len(data)

    # -- the Protocol's upload methods
    async def size(self, upload_id: str) -> int:
        st = await self._load(upload_id)
        if st is None:
            raise NotFound(f"upload {upload_id}")
        return st.size

    async def write(self, upload_id: str, offset: int, chunks: AsyncIterator[bytes], hashers: list[Hasher]) -> int:
        if offset == 0:  # whatever the upload held is dropped: no need to read its state first
            st: State | None = None
        else:
            st = await self._load(upload_id)
            if st is None:
                raise InvalidOffset(0)
        self._ownership(upload_id, st)
        if st is None:
            st = State(created=time.time())
        if st.size < offset:
            raise InvalidOffset(st.size)
        try:
            if st.size > offset:
                await self._truncate(upload_id, st, offset)
            await self._normalize(upload_id, st)
            return await _Write(self, upload_id, st, hashers).run(chunks, over_any=offset == 0)
        except Conflict:
            self._forget_spool(upload_id)
            current = await self._load(upload_id)
            raise InvalidOffset(current.size if current else 0) from None

    async def read(self, upload_id: str, length: int) -> AsyncIterator[bytes]:
        st = await self._load(upload_id)
        if st is None:
            raise NotFound(f"upload {upload_id}")
        if length <= 0:
            return
        if st.size < length:
            raise StorageError(f"upload {upload_id} is shorter than {length} bytes")
        self._ownership(upload_id, st)
        if st.inline is not None and st.mpu is None and st.base is None:  # all of it in the state
            self._remember(upload_id, st)
            yield st.inline[:length]
            return
        key, _ = await self._materialize(upload_id, st)
        self._forget_spool(upload_id)
        _, chunks = await self.s3.open_range(key, 0, length - 1)
        async for data in chunks:
            yield data

    async def place(self, upload_id: str, key: str, replace: bool = False) -> None:
        """Make the bytes this process wrote or read back (the ones its caller hashed) visible."""
        st = self._mem.get(upload_id)
        if st is None:
            st = await self._load(upload_id)
            if st is None:
                raise NotFound(f"upload {upload_id}")
            self._ownership(upload_id, st)
        if st.inline is not None and st.mpu is None and st.base is None:  # small: one PUT, if absent
            await self._put_small(key, st.inline, replace)
            return
        if not replace and await self.s3.exists(key):
            return
        src, size = await self._materialize(upload_id, st)
        self._forget_spool(upload_id)
        await self.s3.copy(src, key, size)

    async def delete(self, upload_id: str) -> None:
        """Abort the upload's multipart uploads and remove its objects and spool."""
        self._forget_spool(upload_id)
        own = self._owned.pop(upload_id, None)
        self._mem.pop(upload_id, None)
        st = None
        if own is not None:
            # All this process made, while nobody else wrote the upload as far as it saw. Should
            # another process have written it since, what it made stays as an upload with no
            # session, which upload expiry (GC) finds by listing and deletes.
            mpus, keys = set(own.mpus), set(own.keys)
        else:
            st = await self._load(upload_id)
            mpus, keys = set(), set()
            async for page in self._list_mpus(f"{UPLOADS}/{upload_id}/"):
                for u in page.get("Uploads", []):
                    mpus.add((self.s3.unk(u["Key"]), u["UploadId"]))
            async for key, _size in self.s3.walk(f"{UPLOADS}/{upload_id}"):
                keys.add(key)
        if st is not None and st.mpu is not None:
            mpus.add((st.mpu["key"], st.mpu["id"]))
        for key, uid in mpus:
            try:
                await self.s3.call("abort_multipart_upload", key, Key=self.s3.k(key), UploadId=uid)
            except NotFound:  # completed or aborted already
                pass
        await self.s3.delete_many(sorted(keys))

    async def _list_mpus(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        client = await self.s3._get_client()
        try:
            async for page in client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.s3.bucket, Prefix=self.s3.k(prefix)):
                yield page
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.s3.error(exc, f"list uploads {prefix}") from None

    async def list(self) -> list[tuple[str, float]]:
        """(upload id, last activity) of every upload with objects or an open multipart upload."""
        seen: dict[str, float] = {}

        def note(key: str, when: Any) -> None:
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] == UPLOADS:
                t = when.timestamp() if hasattr(when, "timestamp") else float(when)
                seen[parts[1]] = max(seen.get(parts[1], 0.0), t)
        async for page in self.s3.list_objects(f"{UPLOADS}/"):
            for obj in page.get("Contents", []):
                note(self.s3.unk(obj["Key"]), obj["LastModified"])
        async for page in self._list_mpus(f"{UPLOADS}/"):
            for u in page.get("Uploads", []):
                note(self.s3.unk(u["Key"]), u["Initiated"])
        return list(seen.items())


class _Write:
    """One upload_write: the request body into the spool, full parts out to S3, then the state."""

    def __init__(self, up: S3Uploads, upload_id: str, st: State, hashers: list[Hasher]):
        self.up, self.id, self.st, self.hashers = up, upload_id, st, hashers
        self.ps = up.part_size
        self.sem = asyncio.Semaphore(up.concurrency)
        self.tasks: list[asyncio.Task[list[Any]]] = []
        self.old_tail = list(st.tail)
        self.flushed = False
        self.fd = -1
        self.path: Path | None = None
        self.spool_len = 0
        self.pos = st.size

    async def run(self, chunks: AsyncIterator[bytes], over_any: bool = False) -> int:
        up = self.up
        self.path, self.spool_len = await up._fill_spool(self.id, self.st)
        tail_before = self.spool_len
        self.fd = os.open(self.path, os.O_RDWR)
        interrupted: BaseException | None = None
        try:
            it = chunks.__aiter__()
            buf: list[bytes] = []
            buffered = 0
            while True:
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    break
                except STREAM_ERRORS as exc:  # the client went away: keep what arrived
                    interrupted = exc
                    break
                if not chunk:
                    continue
                buf.append(chunk)
                buffered += len(chunk)
                if buffered >= BATCH or self.spool_len + buffered >= self.ps:
                    await self._absorb(buf)
                    buf, buffered = [], 0
            await self._absorb(buf)
            parts = await self._wait_parts()
            st = self.st
            if parts:
                assert st.mpu is not None
                st.mpu["parts"] += parts
            # The spool now holds the whole tail. Bytes of it already in pieces stay there; the
            # rest goes into the state object when the tail is small and has no pieces, else
            # into a new piece.
            start = 0 if self.flushed or st.inline is not None else tail_before
            if self.flushed:
                st.tail = []
            st.inline = None
            if not st.tail and self.spool_len <= INLINE_MAX:
                st.inline = os.pread(self.fd, self.spool_len, 0) if self.spool_len else b""
            elif self.spool_len > start:
                key = up._key(self.id, f"piece-{uuid.uuid4().hex[:12]}")
                await up.s3.put_file(key, FileRange(self.fd, start, self.spool_len - start),
                                     self.spool_len - start, ContentType="application/octet-stream")
                up._track(self.id, key)
                st.tail.append([key, 0, self.spool_len - start, True])
            st.size = self.pos
            await up._save(self.id, st, over_any=over_any)
        except BaseException:
            for t in self.tasks:
                t.cancel()
            if self.fd >= 0:
                os.close(self.fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(self.fd)
        up._spools[self.id] = (st.gen, self.path)
        while len(up._spools) > MAX_SPOOLS:  # sessions left or continued elsewhere: drop the oldest spool
            up._forget_spool(next(iter(up._spools)))
        if self.flushed:  # pieces now inside a part
            garbage = sorted({r[0] for r in self.old_tail})
            try:
                await up.s3.delete_many(garbage)
            except StorageError as exc:
                log.warning("s3: upload %s: could not remove old pieces: %s", self.id, exc)
        if interrupted is not None:
            raise WriteInterrupted(self.pos, interrupted)
        return self.pos

    async def _absorb(self, buf: list[bytes]) -> None:
        """Hash and spool ``buf``; every time the spool reaches a part, send it."""
        views = [memoryview(c) for c in buf]
        loop = asyncio.get_running_loop()
        while views:
            room = self.ps - self.spool_len
            take: list[memoryview] = []
            n = 0
            while views and n < room:
                v = views[0]
                if n + len(v) <= room:
                    take.append(v)
                    n += len(v)
                    views.pop(0)
                else:
                    cut = room - n
                    take.append(v[:cut])
                    views[0] = v[cut:]
                    n += cut
            if n < INLINE:
                hash_and_write(self.fd, take, self.spool_len, self.hashers)
            else:
                await loop.run_in_executor(None, hash_and_write, self.fd, take, self.spool_len, self.hashers)
            self.spool_len += n
            self.pos += n
            if self.spool_len >= self.ps:
                await self._flush()

    async def _flush(self) -> None:
        """The spool is one full part: send it (waiting for a free slot) and start a new spool."""
        self._raise_failed()
        up, st = self.up, self.st
        if st.mpu is None:
            await up._create_mpu(self.id, st)
        assert st.mpu is not None and self.path is not None
        number = st.next_part() + len(self.tasks)
        if number > MAX_PARTS:
            raise StorageError(f"upload {self.id} needs more than {MAX_PARTS} parts: raise chunksize")
        await self.sem.acquire()
        path, size = self.path, self.spool_len
        os.close(self.fd)
        self.fd = -1

        async def send() -> list[Any]:
            try:
                return await up._upload_part(st, number, path, size)
            finally:
                self.sem.release()
                path.unlink(missing_ok=True)
        self.tasks.append(asyncio.ensure_future(send()))
        self.flushed = True
        self.path = up._new_spool_file(self.id)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.spool_len = 0

    def _raise_failed(self) -> None:
        for t in self.tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def _wait_parts(self) -> list[list[Any]]:
        if not self.tasks:
            return []
        try:
            return list(await asyncio.gather(*self.tasks))
        except BaseException:
            for t in self.tasks:
                t.cancel()
            raise
