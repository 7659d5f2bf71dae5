"""/healthz and /readyz (issue 8): ready while the metadata store answers and the storage
root takes files; 503 with the spec's JSON error body otherwise."""
from __future__ import annotations

import shutil

import pytest

from registry.app import create_app
from registry.keys import SERVICES
from tests.conftest import make_config
from tests.helpers import assert_error


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"


@pytest.fixture
async def app_client(aiohttp_client, root):
    return await aiohttp_client(create_app(make_config(root, storage={"commit": False})))


async def test_healthz_and_readyz_when_all_is_well(app_client):
    r = await app_client.get("/healthz")
    assert r.status == 200 and await r.json() == {"status": "ok"}
    r = await app_client.get("/readyz")
    assert r.status == 200 and await r.json() == {"status": "ready"}
    assert (await app_client.head("/readyz")).status == 200
    assert not [p for p in (app_client.app[SERVICES].storage.root / "_uploads").iterdir()]  # the probe is gone


async def test_readyz_503_when_the_metadata_store_is_closed(app_client):
    await app_client.app[SERVICES].meta.close()
    r = await app_client.get("/readyz")
    errs = await assert_error(r, 503, "UNAVAILABLE")
    assert set(errs[0]["detail"]) == {"meta"}, errs
    assert r.headers["Retry-After"] == "5"
    r = await app_client.get("/healthz")  # the process is still up
    assert r.status == 200
    await assert_error(await app_client.head("/readyz"), 503)


async def test_readyz_503_when_the_root_is_gone(app_client, root):
    shutil.rmtree(root)
    r = await app_client.get("/readyz")
    errs = await assert_error(r, 503, "UNAVAILABLE")
    detail = errs[0]["detail"]
    assert "storage" in detail and "not a directory" in detail["storage"], errs
    root.mkdir()
    (root / "_uploads").mkdir()
    assert (await app_client.get("/readyz")).status == 200  # back once the storage is


async def test_readyz_503_when_the_root_is_not_writable(app_client, root, monkeypatch):
    import registry.api.ops as ops

    def read_only(path):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(ops, "_probe_dir", read_only)
    errs = await assert_error(await app_client.get("/readyz"), 503, "UNAVAILABLE")
    assert "Read-only file system" in errs[0]["detail"]["storage"]


async def test_probes_do_not_touch_the_v2_api(app_client):
    """/healthz and /readyz sit outside /v2/: no API version header is needed, none is in the way."""
    for path in ("/healthz", "/readyz"):
        r = await app_client.get(path)
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.headers["X-Request-Id"]
