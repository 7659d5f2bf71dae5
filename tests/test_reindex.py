"""``registry reindex`` on every store: an OCI layout copied into the data directory or the
bucket is imported (manifests, tags, blobs) and served; the metadata of a registry whose
store lost it is rebuilt (on S3 with dedupe the layers are then found at their shared key).
Start-up imports layouts on local disks only: on S3 ``registry reindex`` does it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from registry.app import create_app
from registry.config import Config, to_dict
from registry.keys import SERVICES
from registry.maintenance.reindex import reindex
from tests.conftest import Pusher, make_config, sha256
from tests.helpers import assert_pullable
from tests.test_restart import build_layout, check_imported

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"v1": b"hello layer one", "v2": b"hello layer two"}


@pytest.fixture(params=["disk", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """How to make configs (``cfg(meta_file)``) on one storage, and how to copy a layout into it."""
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    root = tmp_path / "data"

    def cfg(meta_file: str | None = None) -> Config:
        storage: dict[str, Any] = {"commit": False}
        if s3 is not None:
            storage["storage_driver"] = s3.driver(chunksize=5 << 20)
        return make_config(root, storage=storage, **({"meta": {"path": str(tmp_path / meta_file)}} if meta_file else {}))

    def copy_in(src: Path, repo: str) -> None:
        if s3 is None:
            shutil.copytree(src, root / repo)
            return
        client = s3.client()
        for path in sorted(src.rglob("*")):
            if path.is_file():
                client.put_object(Bucket=s3.bucket, Key=f"{repo}/{path.relative_to(src).as_posix()}",
                                  Body=path.read_bytes())
    return {"cfg": cfg, "copy_in": copy_in, "s3": s3}


def cli_reindex(cfg: Config, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(to_dict(cfg)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    p = subprocess.run([sys.executable, "-m", "registry", "reindex", "--config", str(path)], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout, p.stderr)
    return json.loads(p.stdout)  # type: ignore[no-any-return]


async def test_registry_reindex_imports_a_copied_layout(aiohttp_client, store, tmp_path):
    images = build_layout(tmp_path / "elsewhere" / "hello", LAYERS)
    store["copy_in"](tmp_path / "elsewhere" / "hello", "imported/hello")
    c = await aiohttp_client(create_app(store["cfg"]()))
    catalog = (await (await c.get("/v2/_catalog")).json())["repositories"]
    # start-up import: on a local disk yes; on S3 it would list the bucket at every start
    assert catalog == ([] if store["s3"] else ["imported/hello"])
    out = cli_reindex(store["cfg"](), tmp_path)
    assert out["repositories"] == 1 and out["problems"] == []
    assert (out["manifests"], out["tags"]) == (4, 3)
    await check_imported(c, "imported/hello", dict(images), LAYERS)
    if store["s3"]:  # dedupe: the layers are at their one key per digest now, for pulls and mounts
        keys = store["s3"].keys()
        for layer in LAYERS.values():
            assert f"blobs/sha256/{sha256(layer)[7:]}" in keys
        index = json.loads(store["s3"].get("imported/hello/index.json"))
        assert {m["digest"] for m in index["manifests"]} >= {images["v1"][0], images["multi"][0]}
    r = await c.post(f"/v2/other/app/blobs/uploads/?mount={sha256(LAYERS['v1'])}&from=imported/hello")
    assert r.status == 201
    await assert_pullable(c, "other/app", sha256(LAYERS["v1"]), LAYERS["v1"])
    # and it is a normal repository afterwards
    await Pusher(c).image("imported/hello", "v3")
    assert (await (await c.get("/v2/imported/hello/tags/list")).json())["tags"] == ["multi", "v1", "v2", "v3"]


async def test_reindex_rebuilds_lost_metadata(aiohttp_client, store):
    """A registry pushed through the API, then a new metadata store on the same storage: on S3
    with dedupe the repository holds only its manifests, its layers are at the shared keys."""
    a = await aiohttp_client(create_app(store["cfg"]()))
    push = Pusher(a)
    layer, shared = b"rebuilt layer", b"a layer two repositories hold"
    m1, body1 = await push.image("rb/app", "v1", layers=[layer, shared])
    m2, body2 = await push.image("rb/other", "latest", layers=[shared])
    await a.close()

    b = await aiohttp_client(create_app(store["cfg"]("fresh.sqlite")))
    result = await reindex(b.app[SERVICES], only_new=False)
    assert result.problems == [] and result.repositories == 2 and result.tags == 2
    for repo, tag, digest, body in (("rb/app", "v1", m1, body1), ("rb/other", "latest", m2, body2)):
        r = await b.get(f"/v2/{repo}/manifests/{tag}")
        assert r.status == 200 and await r.read() == body and r.headers["Docker-Content-Digest"] == digest
    await assert_pullable(b, "rb/app", sha256(layer), layer)
    await assert_pullable(b, "rb/app", sha256(shared), shared)
    await assert_pullable(b, "rb/other", sha256(shared), shared)
    assert sorted((await (await b.get("/v2/_catalog")).json())["repositories"]) == ["rb/app", "rb/other"]


async def test_reindex_through_subpaths(aiohttp_client, s3, tmp_path):
    """Layouts on both sides of a router (the default driver on S3, /team-a on a local disk)."""
    team_root = tmp_path / "team-a-disk"
    cfg = make_config(tmp_path / "data", storage={
        "commit": False, "storage_driver": s3.driver(chunksize=5 << 20),
        "sub_paths": {"/team-a": {"rootDirectory": str(team_root), "commit": False}}})
    images = build_layout(tmp_path / "elsewhere" / "hello", LAYERS)
    shutil.copytree(tmp_path / "elsewhere" / "hello", team_root / "team-a" / "hello")
    client = s3.client()
    for path in sorted((tmp_path / "elsewhere" / "hello").rglob("*")):
        if path.is_file():
            rel = path.relative_to(tmp_path / "elsewhere" / "hello").as_posix()
            client.put_object(Bucket=s3.bucket, Key=f"other/hello/{rel}", Body=path.read_bytes())
    c = await aiohttp_client(create_app(cfg))
    result = await reindex(c.app[SERVICES], only_new=False)
    assert result.problems == [] and result.repositories == 2
    await check_imported(c, "team-a/hello", dict(images), LAYERS)
    await check_imported(c, "other/hello", dict(images), LAYERS)
    assert not [k for k in s3.keys() if k.startswith("team-a/")]
