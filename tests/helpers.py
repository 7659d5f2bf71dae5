"""Shared helpers for the API tests: error-body checks, upload sessions, raw HTTP."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any, AsyncIterator

import blake3
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from tests.conftest import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, sha256

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
ERROR_CODES = {"BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
               "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
               "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
               "RANGE_INVALID", "UNAVAILABLE", "UNKNOWN"}

__all__ = ["OCI_CONFIG", "OCI_INDEX", "OCI_LAYER", "OCI_MANIFEST", "sha256"]


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def b3(data: bytes) -> str:
    return "blake3:" + blake3.blake3(data).hexdigest()


DIGESTERS = {"sha256": sha256, "sha512": sha512, "blake3": b3}


def check_error_body(body: bytes) -> list[dict[str, Any]]:
    """The spec's error shape: {"errors": [{"code", "message", ...}]}, no traceback."""
    assert b"Traceback" not in body, body[:2000]
    doc = json.loads(body)
    assert isinstance(doc, dict) and set(doc) == {"errors"}, doc
    errs = doc["errors"]
    assert isinstance(errs, list) and errs, doc
    for e in errs:
        assert isinstance(e, dict), doc
        assert isinstance(e.get("code"), str) and e["code"] in ERROR_CODES, doc
        assert isinstance(e.get("message"), str) and e["message"], doc
    return errs


async def assert_error(r: ClientResponse, status: int, code: str | None = None) -> list[dict[str, Any]]:
    body = await r.read()
    assert r.status == status, (r.status, body[:2000])
    if r.method == "HEAD":
        assert body == b""
        return []
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    errs = check_error_body(body)
    if code is not None:
        assert errs[0]["code"] == code, errs
    return errs


async def start_upload(client: TestClient, repo: str) -> str:
    r = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status == 202, await r.text()
    loc = r.headers["Location"]
    assert loc.startswith(f"/v2/{repo}/blobs/uploads/")
    return loc


def with_query(url: str, **params: str) -> str:
    from urllib.parse import quote
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


async def stream(*parts: bytes) -> AsyncIterator[bytes]:
    """A request body sent with chunked transfer encoding, in the given pieces."""
    for p in parts:
        yield p


def next_link(r: ClientResponse) -> str | None:
    link = r.headers.get("Link")
    if link is None:
        return None
    m = re.fullmatch(r'\s*<([^>]+)>\s*;\s*rel="?next"?\s*', link)
    assert m, link
    return m.group(1)


def image_doc(config_digest: str, config_size: int, layers: list[tuple[str, int]], **extra: Any) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers], **extra}


def weird_json(doc: Any) -> bytes:
    """Valid JSON in a non-canonical spelling: odd indentation, spaces, trailing newlines."""
    return b"  \n" + json.dumps(doc, indent=3, separators=(" ,", " :  ")).encode() + b"\n\n\t "


async def raw_request(client: TestClient, method: str, target: bytes, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send exactly these bytes as the request line's target (no client-side normalisation)."""
    hdrs = {"Host": "registry", "Connection": "close", **(headers or {})}
    if body or method in ("PUT", "POST", "PATCH"):
        hdrs.setdefault("Content-Length", str(len(body)))
    head = f"{method} ".encode() + target + b" HTTP/1.1\r\n" + b"".join(
        f"{k}: {v}\r\n".encode("latin-1") for k, v in hdrs.items()) + b"\r\n"
    rd, wr = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        wr.write(head + body)
        await wr.drain()
        data = await rd.read()
    finally:
        wr.close()
    head_b, _, payload = data.partition(b"\r\n\r\n")
    lines = head_b.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    resp_headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        resp_headers[k.strip().lower()] = v.strip()
    if resp_headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = bytearray(), payload
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2:]
        payload = bytes(out)
    return status, resp_headers, payload


async def assert_pullable(client, repo: str, digest: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """GET returns the bytes with the right Docker-Content-Digest; HEAD the right length."""
    r = await client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status == 200, await r.text()
    assert await r.read() == data
    assert r.headers["Docker-Content-Digest"] == digest
    r = await client.head(f"/v2/{repo}/blobs/{digest}")
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
