"""S3 storage on aiobotocore: the same keys as the filesystem layout, in a bucket.

Keys are the filesystem's (``<repo>/index.json``, ``<repo>/oci-layout``,
``<repo>/blobs/<alg>/<hex>``) under ``rootdirectory``. With dedupe on, a blob
is ONE object per digest for the whole registry, ``blobs/<alg>/<hex>`` under
the prefix, and which repositories hold it is only in the metadata store
(``shared_blobs``: services/blobs.py deletes the object when the last holder
goes). Manifests stay under their repository's key: their rows are per
repository and nothing else would know when the last copy went.

Uploads (multipart, a local spool for what is below the part minimum, state
objects under ``_uploads/<id>/``) are in s3_uploads.py.

Errors: every botocore/aiohttp failure leaves as NotFound or StorageError with
a message naming what failed and, at start-up, the setting to look at; never
a credential. Transient failures (5xx, throttling, timeouts, dropped
connections) are retried by botocore (standard mode, ``maxAttempts``) with
backoff before they count.
"""
from __future__ import annotations

import asyncio
import logging
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, AsyncIterator

from registry.config import StorageDriverConfig
from registry.digest import Digest, Hasher
from registry.storage.base import NotFound, StorageError, aside_key, aside_name

log = logging.getLogger("registry.storage.s3")
TRASH = "_trash"
COPY_SINGLE_MAX = 1 << 30  # larger objects are copied in parallel ranges (UploadPartCopy)
COPY_PART = 256 << 20
READ_CHUNK = 1 << 20
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "InvalidClientTokenId", "AllAccessDisabled"}


class S3ConfigError(StorageError):
    """The store cannot be used as configured (found at start-up); the message names the setting."""


def endpoint_url(d: StorageDriverConfig) -> str | None:
    if not d.regionendpoint:
        return None
    if "://" in d.regionendpoint:
        return d.regionendpoint
    return ("https://" if d.secure else "http://") + d.regionendpoint


class S3Storage:
    def __init__(self, d: StorageDriverConfig, *, dedupe: bool = True, spool_dir: str | os.PathLike[str],
                 setting: str = "storage.storageDriver"):
        from registry.storage.s3_uploads import S3Uploads
        self.cfg = d
        self.setting = setting
        self.bucket = d.bucket
        self.prefix = d.rootdirectory.strip("/")
        self.shared_blobs = dedupe
        self.dedupe = dedupe
        self.part_size = int(d.chunksize)
        self.endpoint = endpoint_url(d)
        self.redirect = d.redirect
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._opening: asyncio.Lock | None = None
        self._put_extra: dict[str, str] = {}
        if d.encrypt:
            self._put_extra["ServerSideEncryption"] = "aws:kms" if d.keyid else "AES256"
            if d.keyid:
                self._put_extra["SSEKMSKeyId"] = d.keyid
        if d.storageclass and d.storageclass.upper() != "NONE":
            self._put_extra["StorageClass"] = d.storageclass
        self.cache = None
        if d.cache_size:
            from registry.storage.cache import BlobCache
            self.cache = BlobCache(Path(d.cache_directory), int(d.cache_size))
        self.uploads = S3Uploads(self, Path(spool_dir))
        # Bytes this process moved to and from the store (the benchmark's "through the store").
        self.bytes_out = 0
        self.bytes_in = 0

    @property
    def chunk_min_length(self) -> int:
        """What a chunked push should send per PATCH (OCI-Chunk-Min-Length): one part."""
        return self.part_size

    def describe(self) -> str:
        where = self.endpoint or f"AWS {self.cfg.region}"
        return f"s3://{self.bucket}/{self.prefix} at {where}"

    # -- client
    async def open(self) -> None:
        """Make the client and check the bucket answers (HeadBucket): a missing bucket, refused
        credentials or an unreachable endpoint stop start-up with the setting to fix."""
        await self._get_client()
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - translated below, nothing raw leaves
            raise self._startup_error(exc) from None
        self.uploads.start()
        log.info("storage: %s (dedupe %s, parts of %d bytes)", self.describe(), "on" if self.dedupe else "off",
                 self.part_size)

    async def close(self) -> None:
        self.uploads.stop()
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._client is None:
                self._client = await self._make_client()
        return self._client

    async def _make_client(self) -> Any:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        d = self.cfg
        config = AioConfig(
            connect_timeout=float(d.connect_timeout), read_timeout=float(d.read_timeout),
            max_pool_connections=d.max_pool_connections,
            retries={"total_max_attempts": d.max_attempts, "mode": "standard"},
            s3={"addressing_style": "path" if d.forcepathstyle else "auto"},
            signature_version="s3v4",
            # CRC32 of every part costs a read of it; S3 checks the payload's SigV4 hash (http) or TLS.
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        kwargs: dict[str, Any] = {"region_name": d.region, "config": config}
        if self.endpoint:
            kwargs["endpoint_url"] = self.endpoint
        elif not d.secure:
            kwargs["use_ssl"] = False
        if d.skipverify:
            kwargs["verify"] = False
        if d.accesskey:
            kwargs["aws_access_key_id"] = d.accesskey
            kwargs["aws_secret_access_key"] = d.secretkey
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(get_session().create_client("s3", **kwargs))
        except Exception as exc:  # noqa: BLE001 - a bad endpoint URL, region...
            await stack.aclose()
            raise S3ConfigError(f"{self.setting}: cannot make an S3 client: {type(exc).__name__}: "
                                f"{_safe(exc)}") from None
        self._stack = stack
        return client

    # -- errors
    def _startup_error(self, exc: BaseException) -> StorageError:
        s, b = self.setting, self.bucket
        code, status = _code(exc)
        if code in ("NoSuchBucket",) or status == 404:
            return S3ConfigError(f"{s}.bucket: bucket {b!r} does not exist at {self.endpoint or 'AWS'}")
        if code in _DENIED or status == 403:
            creds = "accesskey/secretkey" if self.cfg.accesskey else \
                "accesskey/secretkey (unset: botocore's default credential chain was used)"
            return S3ConfigError(f"{s}.{creds}: access to bucket {b!r} was refused ({code or status}): wrong "
                                 "credentials, or no permission on the bucket")
        if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException") \
                or status == 301:
            return S3ConfigError(f"{s}.region: bucket {b!r} is not in region {self.cfg.region!r}")
        if _is_credentials(exc):
            return S3ConfigError(f"{s}.accesskey/secretkey: no credentials (none configured, and botocore's "
                                 "default chain found none)")
        if _is_connection(exc):
            return S3ConfigError(f"{s}.regionendpoint: cannot reach {self.endpoint or 'the AWS endpoint'} "
                                 f"({type(exc).__name__})")
        return S3ConfigError(f"{s}: bucket {b!r} at {self.endpoint or 'AWS'} did not answer: {_describe(exc)}")

    def error(self, exc: BaseException, what: str) -> StorageError:
        """A botocore/aiohttp failure as the Protocol's error; the message is safe to log."""
        if isinstance(exc, StorageError):
            return exc
        code, status = _code(exc)
        if code in _NOT_FOUND or status == 404 and code not in ("NoSuchBucket",):
            return NotFound(what)
        if code == "NoSuchBucket":
            return StorageError(f"S3 bucket {self.bucket!r} is gone ({what})")
        if code in _DENIED or status == 403:
            return StorageError(f"S3 refused {what} ({code or status})")
        return StorageError(f"S3 {what} failed: {_describe(exc)}")

    async def call(self, op: str, what: str, **kw: Any) -> Any:
        client = await self._get_client()
        try:
            return await getattr(client, op)(Bucket=self.bucket, **kw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, timeouts: translated
            raise self.error(exc, what) from None

    # -- keys
    def k(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"bad key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def unk(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def blob_key(self, repo: str, digest: Digest) -> str:
        return digest.path if self.shared_blobs else f"{repo}/{digest.path}"

    def local_path(self, key: str) -> Path | None:
        return None

    # -- objects
    async def stat(self, key: str) -> int:
        r = await self.call("head_object", key, Key=self.k(key))
        return int(r["ContentLength"])

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except NotFound:
            return False
        return True

    async def read(self, key: str) -> bytes:
        r = await self.call("get_object", key, Key=self.k(key))
        try:
            async with r["Body"] as body:
                data: bytes = await body.read()
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, key) from None
        self.bytes_out += len(data)
        return data

    async def write(self, key: str, data: bytes) -> None:
        await self.call("put_object", key, Key=self.k(key), Body=data, **self._put_extra)
        self.bytes_in += len(data)

    async def put_file(self, key: str, body: Any, length: int, **kw: Any) -> dict[str, Any]:
        r: dict[str, Any] = await self.call("put_object", key, Key=self.k(key), Body=body, ContentLength=length,
                                            **self._put_extra, **kw)
        self.bytes_in += length
        return r

    async def delete(self, key: str) -> bool:
        if not await self.exists(key):
            return False
        await self.call("delete_object", key, Key=self.k(key))
        return True

    async def delete_many(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self.k(k)} for k in keys[i:i + 1000]]
            if batch:
                r = await self.call("delete_objects", "delete", Delete={"Objects": batch, "Quiet": True})
                for e in r.get("Errors", []):
                    log.warning("s3: could not delete %s: %s", e.get("Key"), e.get("Code"))

    async def copy(self, src: str, dst: str, size: int | None = None) -> None:
        """Server-side copy (NotFound when src is absent); large objects in parallel ranges."""
        if size is None:
            size = await self.stat(src)
        source = {"Bucket": self.bucket, "Key": self.k(src)}
        if size <= COPY_SINGLE_MAX:
            await self.call("copy_object", src, Key=self.k(dst), CopySource=source,
                            MetadataDirective="COPY", **self._put_extra)
            return
        await self.copy_ranges(src, dst, size)

    async def copy_ranges(self, src: str, dst: str, size: int, part: int = COPY_PART) -> None:
        source = {"Bucket": self.bucket, "Key": self.k(src)}
        part = max(part, -(-size // 9000))
        mpu = await self.call("create_multipart_upload", dst, Key=self.k(dst), **self._put_extra)
        uid = mpu["UploadId"]
        sem = asyncio.Semaphore(max(2, self.cfg.part_concurrency))

        async def one(n: int, start: int) -> dict[str, Any]:
            end = min(start + part, size) - 1
            async with sem:
                r = await self.call("upload_part_copy", src, Key=self.k(dst), UploadId=uid, PartNumber=n,
                                    CopySource=source, CopySourceRange=f"bytes={start}-{end}")
            return {"PartNumber": n, "ETag": r["CopyPartResult"]["ETag"]}
        try:
            parts = await asyncio.gather(*(one(i + 1, s) for i, s in enumerate(range(0, size, part))))
            await self.call("complete_multipart_upload", dst, Key=self.k(dst), UploadId=uid,
                            MultipartUpload={"Parts": list(parts)})
        except BaseException:
            try:
                await self.call("abort_multipart_upload", dst, Key=self.k(dst), UploadId=uid)
            except StorageError:
                pass
            raise

    async def link(self, src: str, dst: str) -> None:
        if src == dst:  # a shared blob: "linking" is making sure it is there
            await self.stat(src)
            return
        if await self.exists(dst):
            return
        await self.copy(src, dst)

    async def set_aside(self, key: str) -> str | None:
        aside = aside_name(key)
        try:
            size = await self.stat(key)
            await self.copy(key, aside, size)
        except NotFound:
            return None
        await self.call("delete_object", key, Key=self.k(key))
        return aside

    async def restore(self, aside: str, key: str) -> None:
        if await self.exists(key):
            return
        await self.copy(aside, key)

    async def discard(self, aside: str) -> None:
        await self.call("delete_object", aside, Key=self.k(aside))

    async def set_aside_list(self) -> list[tuple[str, str | None, float]]:
        # The copy that set an object aside made it new: LastModified is when it was set aside.
        return [(name, aside_key(name), when) async for name, _size, when in self.walk_mtime(TRASH)]

    async def list_objects(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Pages of ListObjectsV2 under the storage key ``prefix`` (a directory when it ends in /)."""
        client = await self._get_client()
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.k(prefix) if prefix else
                              (self.prefix + "/" if self.prefix else "")}
        if delimiter:
            kw["Delimiter"] = delimiter
        try:
            async for page in client.get_paginator("list_objects_v2").paginate(**kw):
                yield page
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, f"list {prefix or '/'}") from None

    async def walk(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        async for key, size, _when in self.walk_mtime(prefix):
            yield key, size

    async def walk_mtime(self, prefix: str) -> AsyncIterator[tuple[str, int, float]]:
        p = prefix.rstrip("/") + "/" if prefix else ""
        async for page in self.list_objects(p):
            for obj in page.get("Contents", []):
                yield self.unk(obj["Key"]), int(obj["Size"]), obj["LastModified"].timestamp()

    async def list_dirs(self, prefix: str) -> list[str]:
        return (await self.list_dir(prefix))[0]

    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        """One delimited listing (a request per 1,000 names)."""
        p = prefix.rstrip("/") + "/" if prefix else ""
        dirs, files = [], []
        async for page in self.list_objects(p, "/"):
            dirs += [cp["Prefix"].rstrip("/").rsplit("/", 1)[-1] for cp in page.get("CommonPrefixes", [])]
            files += [obj["Key"].rsplit("/", 1)[-1] for obj in page.get("Contents", [])]
        return sorted(dirs), sorted(files)

    # -- streaming reads (pulls, scrub)
    async def open_range(self, key: str, start: int = 0, end: int | None = None) -> tuple[int, AsyncIterator[bytes]]:
        """(length, chunks) of bytes start..end (inclusive) of an object; NotFound before any byte."""
        kw: dict[str, Any] = {"Key": self.k(key)}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end}"
        r = await self.call("get_object", key, **kw)
        return int(r["ContentLength"]), self._chunks(r["Body"], key)

    async def _chunks(self, body: Any, key: str) -> AsyncIterator[bytes]:
        try:
            async with body:
                while True:
                    data = await body.read(READ_CHUNK)
                    if not data:
                        return
                    self.bytes_out += len(data)
                    yield data
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a connection dropped mid-object
            raise self.error(exc, f"read of {key}") from None

    async def read_stream(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        _, chunks = await self.open_range(key, start, end)
        async for data in chunks:
            yield data

    async def presign(self, key: str, expires: float | None = None) -> str:
        client = await self._get_client()
        try:
            url: str = await client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.k(key)},
                ExpiresIn=int(expires or self.cfg.redirect_expiry))
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, f"presign {key}") from None
        return url

    # -- uploads (s3_uploads.py)
    async def upload_write(self, upload_id: str, offset: int, chunks: AsyncIterator[bytes],
                           hashers: list[Hasher], limit: int | None = None) -> int:
        return await self.uploads.write(upload_id, offset, chunks, hashers)

    async def upload_size(self, upload_id: str) -> int:
        return await self.uploads.size(upload_id)

    async def upload_read(self, upload_id: str, length: int) -> AsyncIterator[bytes]:
        async for data in self.uploads.read(upload_id, length):
            yield data

    async def upload_place(self, upload_id: str, key: str, replace: bool = False) -> None:
        await self.uploads.place(upload_id, key, replace)

    async def upload_delete(self, upload_id: str) -> None:
        await self.uploads.delete(upload_id)

    async def upload_list(self) -> list[tuple[str, float]]:
        return await self.uploads.list()


def _code(exc: BaseException) -> tuple[str, int | None]:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {}) or {}
        meta = resp.get("ResponseMetadata", {}) or {}
        return str(err.get("Code", "")), meta.get("HTTPStatusCode")
    return "", None


def _is_credentials(exc: BaseException) -> bool:
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    return isinstance(exc, (NoCredentialsError, PartialCredentialsError))


def _is_connection(exc: BaseException) -> bool:
    import aiohttp
    from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    return isinstance(exc, (BotoConnectionError, HTTPClientError, aiohttp.ClientError, asyncio.TimeoutError,
                            OSError))


def _safe(exc: BaseException) -> str:
    """An exception's text without anything that could be a credential."""
    text = str(exc)
    for marker in ("Signature=", "Credential=", "X-Amz-Security-Token", "secret"):
        if marker.lower() in text.lower():
            return type(exc).__name__
    return text[:300]


def _describe(exc: BaseException) -> str:
    code, status = _code(exc)
    if code or status:
        return f"{code or 'error'} (HTTP {status})"
    if _is_connection(exc):
        return f"connection failed ({type(exc).__name__})"
    return f"{type(exc).__name__}: {_safe(exc)}"
