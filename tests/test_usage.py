"""Storage accounting (issue 5): logical and physical bytes, per repository and in total, from
``measure`` (what ``registry du`` prints) and from /metrics, checked against a walk of the disk
(os.walk + st_ino/st_size/st_nlink) after pushes, deletes and a GC pass."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from conformance.conftest import REPO_ROOT
from registry.app import create_app
from registry.keys import METRICS, SERVICES
from registry.maintenance.gc import collect
from registry.maintenance.usage import measure
from tests.conftest import OCI_MANIFEST, make_config, sha256
from tests.test_dedupe import content, push_image, push_monolithic, push_upload

NOT_REPOSITORIES = {"_uploads", "_trash", "_registry"}


def disk_walk(root: Path) -> dict[str, Any]:
    """Usage as the disk tells it: every blob file of every layout (``<repo>/blobs/<alg>/<hex>``),
    each inode once for physical bytes. Also checks that no inode has a link outside the layouts
    (st_nlink equals the links found), so no upload or set-aside file holds content."""
    repos: dict[str, dict[str, Any]] = defaultdict(lambda: {"logical": 0, "inodes": {}})
    inodes: dict[tuple[int, int], int] = {}
    links: dict[tuple[int, int], int] = defaultdict(int)
    nlink: dict[tuple[int, int], int] = {}
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        if rel and rel[0] in NOT_REPOSITORIES:
            dirs[:] = []
            continue
        if len(rel) < 3 or rel[-2] != "blobs":
            continue
        repo = "/".join(rel[:-2])
        for name in files:
            if name.startswith("."):
                continue
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            repos[repo]["logical"] += st.st_size
            repos[repo]["inodes"][key] = st.st_size
            inodes[key] = st.st_size
            links[key] += 1
            nlink[key] = st.st_nlink
    assert links == nlink, "an inode is linked from outside the repositories' layouts"
    owners: dict[tuple[int, int], set[str]] = defaultdict(set)
    for name, r in repos.items():
        for key in r["inodes"]:
            owners[key].add(name)
    out = {"logical": sum(r["logical"] for r in repos.values()), "physical": sum(inodes.values()),
           "inodes": len(inodes), "files": sum(links.values()), "repositories": {}}
    for name, r in repos.items():
        out["repositories"][name] = {
            "logical": r["logical"], "physical": sum(r["inodes"].values()),
            "exclusive": sum(size for key, size in r["inodes"].items() if len(owners[key]) == 1)}
    return out


def check_against_disk(usage: Any, root: Path) -> dict[str, Any]:
    disk = disk_walk(root)
    assert usage.missing == 0
    assert (usage.logical_bytes, usage.physical_bytes, usage.files, usage.inodes) == \
        (disk["logical"], disk["physical"], disk["files"], disk["inodes"])
    got = {r.repository: {"logical": r.logical_bytes, "physical": r.physical_bytes, "exclusive": r.exclusive_bytes}
           for r in usage.repositories if r.logical_bytes or r.blobs or r.manifests}
    assert got == disk["repositories"]
    return disk


def scrape(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("registry_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def cfg(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    meta: dict[str, Any] = {"driver": "sqlite"}
    if request.param == "postgres":
        meta = {"driver": "postgres", "postgres": {"dsn": request.getfixturevalue("pg_dsn"),
                                                   "schema": request.getfixturevalue("pg_schema"), "pool_size": 4}}
    return make_config(tmp_path / "data", storage={"commit": False}, meta=meta,
                       extensions={"metrics": {"repository_labels": True, "max_repositories": 100}})


async def test_usage_matches_the_disk_after_pushes_deletes_and_gc(aiohttp_client, cfg, monkeypatch):
    monkeypatch.setattr("registry.metrics.COUNTS_MAX_AGE", 0)  # every scrape reads the store
    root = cfg.root
    c = await aiohttp_client(create_app(cfg))
    svc = c.server.app[SERVICES]
    c.server.app[METRICS].store.usage.max_age = 0  # every scrape measures (the default caches 5s)
    base = [content(f"base-{i}", 120_000 + i) for i in range(3)]
    config = b'{"architecture":"amd64","os":"linux"}'
    # three repositories share a base image; each adds a layer of its own
    for i, repo in enumerate(("apps/web", "apps/api", "tools")):
        await push_image(c, repo, "v1", base + [content(f"own-{repo}", 50_000 + i)], config)
    await push_monolithic(c, "apps/web", content("loose", 7_000))  # a blob no manifest refers to (yet)
    u = await measure(svc)
    disk = check_against_disk(u, root)
    assert u.physical_bytes < u.logical_bytes  # the shared base counts once on disk
    shared = sum(map(len, base)) + len(config)
    assert u.logical_bytes - u.physical_bytes >= 2 * shared

    # the metrics say the same, per repository too
    r = await c.get("/metrics")
    m = scrape(await r.text())
    assert m["registry_storage_logical_bytes"] == disk["logical"]
    assert m["registry_storage_physical_bytes"] == disk["physical"]
    for name, d in disk["repositories"].items():
        assert m[f'registry_repository_storage_logical_bytes{{repository="{name}"}}'] == d["logical"]
        assert m[f'registry_repository_storage_physical_bytes{{repository="{name}"}}'] == d["physical"]

    # deletes: a blob, a manifest; then GC takes what nothing refers to
    r = await c.delete(f"/v2/tools/blobs/{sha256(base[0])}")
    assert r.status == 202
    r = await c.get("/v2/apps/api/manifests/v1", headers={"Accept": OCI_MANIFEST})
    r = await c.delete(f"/v2/apps/api/manifests/{r.headers['Docker-Content-Digest']}")
    assert r.status == 202
    check_against_disk(await measure(svc), root)
    res = await collect(svc, delete_untagged=True, upload_ttl=86400, now=time.time() + 10 * 86400)
    assert res.blobs_deleted >= 5  # apps/api's blobs, and the loose one in apps/web
    u = await measure(svc)
    disk = check_against_disk(u, root)
    m = scrape(await (await c.get("/metrics")).text())
    assert (m["registry_storage_logical_bytes"], m["registry_storage_physical_bytes"]) == \
        (disk["logical"], disk["physical"])
    assert 'registry_repository_storage_logical_bytes{repository="apps/api"}' not in m or \
        m['registry_repository_storage_logical_bytes{repository="apps/api"}'] == 0
    # and a push after GC: the same layer in a new repository costs nothing on disk
    before = u.physical_bytes
    await push_upload(c, "late", base[1])
    u = await measure(svc)
    check_against_disk(u, root)
    assert u.physical_bytes == before and u.logical_bytes == disk["logical"] + len(base[1])


async def test_registry_du_prints_the_same_figures(aiohttp_client, tmp_path):
    root = tmp_path / "data"
    c = await aiohttp_client(create_app(make_config(root, storage={"commit": False})))
    layer = content("du", 64_000)
    for repo in ("du/a", "du/b"):
        await push_image(c, repo, "v1", [layer, content(f"du-{repo}", 1000)], b"{}")
    expected = disk_walk(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    out = subprocess.run([sys.executable, "-m", "registry", "du", "--root", str(root), "--json"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["logical_bytes"], got["physical_bytes"], got["inodes"]) == \
        (expected["logical"], expected["physical"], expected["inodes"])
    assert {r["repository"]: r["physical_bytes"] for r in got["repositories"]} == \
        {k: v["physical"] for k, v in expected["repositories"].items()}
    table = subprocess.run([sys.executable, "-m", "registry", "du", "--root", str(root), "--bytes"], cwd=REPO_ROOT,
                           env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["REPOSITORY", "LOGICAL", "PHYSICAL", "EXCLUSIVE", "BLOBS", "MANIFESTS"]
    total = next(line.split() for line in lines if line.startswith("TOTAL"))
    assert total[1:3] == [str(expected["logical"]), str(expected["physical"])]


async def test_with_dedupe_off_physical_is_logical(aiohttp_client, tmp_path):
    root = tmp_path / "data"
    c = await aiohttp_client(create_app(make_config(root, storage={"commit": False, "dedupe": False})))
    layer = content("off", 30_000)
    for repo in ("o/a", "o/b", "o/c"):
        await push_upload(c, repo, layer)
    u = await measure(c.server.app[SERVICES])
    check_against_disk(u, root)
    assert u.physical_bytes == u.logical_bytes == 3 * len(layer)


async def test_per_repository_series_are_opt_in_and_capped(aiohttp_client, tmp_path, monkeypatch):
    monkeypatch.setattr("registry.metrics.COUNTS_MAX_AGE", 0)
    layer = content("cap", 5_000)
    for labels, cap in ((False, 100), (True, 2)):
        root = tmp_path / f"data-{labels}"
        app = create_app(make_config(root, storage={"commit": False},
                                     extensions={"metrics": {"repository_labels": labels, "max_repositories": cap}}))
        c = await aiohttp_client(app)
        for i, repo in enumerate(("r1", "r2", "r3", "r4")):
            await push_monolithic(c, repo, layer + bytes(i))  # r4 is the largest
        app[METRICS].store.usage.max_age = 0
        m = scrape(await (await c.get("/metrics")).text())
        series = {k for k in m if k.startswith("registry_repository_storage_")}
        if not labels:
            assert series == set()  # no unbounded labels by default
        else:
            names = {k.split('"')[1] for k in series}
            assert names == {"r4", "r3", "_other"}  # the two largest, the rest summed
            assert m['registry_repository_storage_logical_bytes{repository="_other"}'] == 2 * len(layer) + 1
        assert m["registry_storage_physical_bytes"] == sum(len(layer) + i for i in range(4))
        await c.close()
