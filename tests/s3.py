"""An S3 server for the tests, for real: moto's ThreadedMotoServer on 127.0.0.1.

One server per test session, on a free port; every test that asks for a bucket
gets the server's state reset first (POST /moto-api/reset) and a fresh bucket.
While the server runs, every AWS_* variable of the environment is removed and a
few are set to harmless values (no profile, no config or credentials file, no
instance metadata), so neither the tests nor a registry they start can reach a
real cloud or pick up an operator's credentials.
"""
from __future__ import annotations

import json
import os
import socket
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

BUCKET = "registry-test"
REGION = "us-east-1"
KEY_ID, SECRET = "AKIATESTTESTTEST", "test-secret-not-real"
SAFE_ENV = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": REGION}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_aws_env() -> dict[str, str | None]:
    """Remove every AWS_* variable, set the safe ones; returns what to put back."""
    saved: dict[str, str | None] = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in list(saved):
        del os.environ[k]
    for k, v in SAFE_ENV.items():
        saved.setdefault(k, None)
        os.environ[k] = v
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    for k, v in saved.items():
        if v is not None:
            os.environ[k] = v


@dataclass
class S3:
    endpoint: str
    bucket: str = BUCKET

    def driver(self, **extra: Any) -> dict[str, Any]:
        """storage.storageDriver for this bucket, in python field names (for Config.replace)."""
        return {"name": "s3", "region": REGION, "bucket": self.bucket, "regionendpoint": self.endpoint,
                "accesskey": KEY_ID, "secretkey": SECRET, "forcepathstyle": True, "max_attempts": 2,
                "connect_timeout": 5, "read_timeout": 30, **extra}

    def file_driver(self, **extra: Any) -> dict[str, Any]:
        """The same, spelled as in a config file."""
        return {"name": "s3", "region": REGION, "bucket": self.bucket, "regionendpoint": self.endpoint,
                "accesskey": KEY_ID, "secretkey": SECRET, "forcepathstyle": True, "maxAttempts": 2,
                "connectTimeout": "5s", "readTimeout": "30s", **extra}

    def client(self) -> Any:
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET)

    def keys(self, prefix: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def multipart_uploads(self) -> list[str]:
        r = self.client().list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in r.get("Uploads", [])]

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    import logging
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    saved = clean_aws_env()
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        restore_env(saved)


def reset(endpoint: str) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST", data=b"")
    urllib.request.urlopen(req, timeout=30).read()


@pytest.fixture
def s3(moto_endpoint: str) -> S3:
    """A fresh bucket on an emptied moto server."""
    reset(moto_endpoint)
    s = S3(moto_endpoint)
    s.client().create_bucket(Bucket=s.bucket)
    return s


def moto_state(endpoint: str) -> Any:  # pragma: no cover - a debugging aid
    return json.loads(urllib.request.urlopen(f"{endpoint}/moto-api/data.json").read())


class FaultProxy:
    """An HTTP proxy in front of the moto server that can answer S3-style errors instead:
    ``fail(n, status)`` for the next n requests (a transient fault: 5xx, throttling), ``deny``
    for all (wrong credentials), ``stall`` to hold requests past a read timeout. Counts requests."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.fail_left = 0
        self.fail_status = 503
        self.fail_code = "SlowDown"
        self.deny = False
        self.stall = 0.0
        self.requests = 0
        self.failed = 0
        self.url = ""
        self._session: Any = None

    def fail(self, n: int, status: int = 503, code: str = "SlowDown") -> None:
        self.fail_left, self.fail_status, self.fail_code = n, status, code

    def _error(self, status: int, code: str) -> Any:
        from aiohttp import web
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by the test</Message></Error>").encode()
        return web.Response(status=status, body=body, content_type="application/xml")

    async def handle(self, request: Any) -> Any:
        import asyncio
        from aiohttp import ClientSession, web
        self.requests += 1
        body = await request.read()
        if self.deny:
            self.failed += 1
            return self._error(403, "InvalidAccessKeyId")
        if self.fail_left:
            self.fail_left -= 1
            self.failed += 1
            return self._error(self.fail_status, self.fail_code)
        if self.stall:
            await asyncio.sleep(self.stall)
        if self._session is None:
            self._session = ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "transfer-encoding")}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False) as r:
            data = await r.read()
            drop = ("transfer-encoding", "content-encoding", "connection") + (
                () if request.method == "HEAD" else ("content-length",))
            out = {k: v for k, v in r.headers.items() if k.lower() not in drop}
            if request.method == "HEAD":
                resp = web.StreamResponse(status=r.status, headers=out)
                await resp.prepare(request)
                return resp
            return web.Response(status=r.status, body=data, headers=out)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@pytest.fixture
async def fault_proxy(s3: S3, aiohttp_server: Any) -> Any:
    from aiohttp import web
    proxy = FaultProxy(s3.endpoint)
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    server = await aiohttp_server(app)
    proxy.url = f"http://127.0.0.1:{server.port}"
    yield proxy
    await proxy.close()
