"""Fixtures: a registry app on a temporary root, driven through aiohttp's test client."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestClient

from registry.app import create_app
from tests.pg import pg_dsn, pg_schema  # noqa: F401  (fixtures)
from tests.s3 import moto_endpoint, s3  # noqa: F401  (fixtures)
from registry.config import Config, load

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_config(root: Path, **sections: Any) -> Config:
    cfg = load(None, environ={}, overrides={"storage": {"rootDirectory": str(root)}})
    return cfg.replace(**sections) if sections else cfg


@pytest.fixture(params=["sqlite", "postgres", "s3"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    """Every API test runs on the embedded default, on PostgreSQL, and on S3 (a moto server;
    SQLite metadata): see tests/s3.py. 5 MiB parts, so multi-MiB pushes cross part boundaries."""
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return make_config(tmp_path / "data", storage={"commit": False,
                                                       "storage_driver": s3.driver(chunksize=5 << 20)})
    if request.param == "postgres":
        dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
        return make_config(tmp_path / "data", storage={"commit": False},
                           meta={"driver": "postgres", "postgres": {"dsn": dsn, "schema": schema, "pool_size": 4}})
    return make_config(tmp_path / "data", storage={"commit": False})


@pytest.fixture
async def client(aiohttp_client: Callable[..., Any], config: Config) -> AsyncIterator[TestClient]:
    yield await aiohttp_client(create_app(config))


class Pusher:
    """Helpers to push blobs and manifests through the API, checking each step."""

    def __init__(self, client: TestClient):
        self.client = client

    async def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        r = await self.client.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", data=data)
        assert r.status == 201, await r.text()
        return digest

    async def manifest(self, repo: str, ref: str, doc: dict[str, Any],
                       media_type: str = OCI_MANIFEST) -> tuple[str, bytes]:
        body = json.dumps(doc).encode()
        r = await self.client.put(f"/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media_type})
        assert r.status == 201, await r.text()
        return r.headers["Docker-Content-Digest"], body

    async def image(self, repo: str, tag: str | None, layers: list[bytes] | None = None,
                    config: bytes | None = None, **extra: Any) -> tuple[str, bytes]:
        """Push config and layers, then an OCI image manifest; returns (digest, body)."""
        config = config if config is not None else json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        layers = layers if layers is not None else [b"layer-" + repo.encode()]
        cd = await self.blob(repo, config)
        descs = [{"mediaType": OCI_LAYER, "digest": await self.blob(repo, layer), "size": len(layer)}
                 for layer in layers]
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": len(config)}, "layers": descs, **extra}
        body = json.dumps(doc).encode()
        return await self.manifest(repo, tag or sha256(body), doc)


@pytest.fixture
def push(client: TestClient) -> Pusher:
    return Pusher(client)
