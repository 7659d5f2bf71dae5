"""Repair on every store (issue 6): the storage walk of ``registry gc --full`` and the sweep of
objects a crash left set aside, on disk and on S3 (a moto server), with SQLite and PostgreSQL.

"Old" is controlled by ``older_than`` / ``now``, never by sleeping. A crash between set_aside
and restore/discard is simulated by calling ``storage.set_aside`` and stopping there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from registry.config import Config, to_dict
from registry.digest import parse_digest
from registry.keys import CONFIG, SERVICES
from registry.maintenance.gc import TRASH_GRACE, collect, sweep_trash
from registry.maintenance.reindex import reindex
from registry.maintenance.repair import full_walk
from registry.meta.base import NEVER
from registry.storage.base import NotFound
from tests.conftest import Pusher, make_config, sha256
from tests.helpers import assert_pullable

DELAY = 100.0
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["disk-sqlite", "disk-postgres", "s3-sqlite", "s3-postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    store, meta = request.param.split("-")
    storage: dict[str, Any] = {"commit": False, "gc_delay": DELAY, "gc_interval": 0}
    if store == "s3":
        storage["storage_driver"] = request.getfixturevalue("s3").driver(chunksize=5 << 20)
    extra: dict[str, Any] = {}
    if meta == "postgres":
        extra["meta"] = {"driver": "postgres", "postgres": {"dsn": request.getfixturevalue("pg_dsn"),
                                                            "schema": request.getfixturevalue("pg_schema"),
                                                            "pool_size": 4}}
    return make_config(tmp_path / "data", storage=storage, **extra)


def svc_of(client):  # type: ignore[no-untyped-def]
    return client.app[SERVICES]


def on_s3(client) -> bool:  # type: ignore[no-untyped-def]
    return client.app[CONFIG].storage.storage_driver.name == "s3"


async def stored(svc, key: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        await svc.storage.stat(key)
    except NotFound:
        return False
    return True


async def plant(svc, repo: str, data: bytes) -> str:  # type: ignore[no-untyped-def]
    """An object under the repository's blobs/ that no row accounts for (a crash after placing it)."""
    key = f"{repo}/{parse_digest(sha256(data)).path}"
    await svc.storage.write(key, data)
    return key


def soon() -> float:
    """An ``older_than`` that counts everything stored so far as old."""
    return time.time() + 60


# ---------------------------------------------------------------- registry gc --full

async def test_full_walk_deletes_old_orphans_keeps_young_and_held(client, push):
    svc = svc_of(client)
    layer = b"layer of a tagged image"
    m, body = await push.image("fw/app", "v1", layers=[layer])
    loose = await push.blob("fw/app", b"held, referenced by nothing yet")
    if svc.storage.shared_blobs:  # a copy of a held layer under the repository (an imported layout's)
        await plant(svc, "fw/app", layer)
    orphans = sorted([await plant(svc, "fw/app", b"orphan one"), await plant(svc, "fw/app", b"orphan two")])

    young = await full_walk(svc, older_than=time.time() - 3600)
    assert young == {"orphan_files_deleted": [], "rows_without_file": [], "layouts_not_imported": []}
    dry = await full_walk(svc, older_than=soon(), dry_run=True)
    assert sorted(dry["orphan_files_deleted"]) == orphans
    for key in orphans:
        assert await stored(svc, key)
    r = await full_walk(svc, older_than=soon())
    assert sorted(r["orphan_files_deleted"]) == orphans
    assert r["rows_without_file"] == [] and r["layouts_not_imported"] == []
    for key in orphans:
        assert not await stored(svc, key)
    assert await full_walk(svc, older_than=soon()) == {"orphan_files_deleted": [], "rows_without_file": [],
                                                       "layouts_not_imported": []}
    got = await client.get("/v2/fw/app/manifests/v1")
    assert got.status == 200 and await got.read() == body
    await assert_pullable(client, "fw/app", sha256(layer), layer)
    await assert_pullable(client, "fw/app", loose, b"held, referenced by nothing yet")
    assert await stored(svc, f"fw/app/{parse_digest(m).path}")
    if svc.storage.shared_blobs:
        assert await stored(svc, f"fw/app/{parse_digest(sha256(layer)).path}")


async def test_rows_without_file_cover_every_row(client, push):
    """Rows in use (out of GC's queue) and repositories without an oci-layout are checked too."""
    svc = svc_of(client)
    layer = b"a layer whose file goes missing"
    m, _ = await push.image("fw/rows", "v1", layers=[layer])
    await collect(svc, delete_untagged=True, upload_ttl=86400, now=time.time() + 10 * DELAY)
    d = parse_digest(sha256(layer))
    assert (await svc.meta.blob_stat("fw/rows", str(d))).review_after == NEVER
    assert await svc.storage.delete(svc.blobs.key("fw/rows", d))
    assert await svc.storage.delete(f"fw/rows/{parse_digest(m).path}")
    assert await svc.storage.delete("fw/rows/oci-layout")
    r = await full_walk(svc, older_than=soon())
    assert sorted(r["rows_without_file"]) == sorted([f"fw/rows@{d}", f"fw/rows@{m}"])
    assert r["orphan_files_deleted"] == []


async def test_shared_orphans_go_only_when_no_repository_holds_them(client, push):
    svc = svc_of(client)
    if not svc.storage.shared_blobs:
        pytest.skip("one object per digest for the whole registry: S3 with dedupe")
    data = b"held by two repositories"
    d = parse_digest(await push.blob("sh/a", data))
    await push.blob("sh/b", data)
    m, body = await push.image("sh/a", "v1", layers=[b"sh layer"])
    stray = parse_digest(sha256(b"nobody holds me"))
    await svc.storage.write(stray.path, b"nobody holds me")
    await svc.storage.write(parse_digest(m).path, body)  # a manifest row holds this digest
    assert await svc.meta.blob_unlink("sh/a", str(d))  # sh/b still holds it

    r = await full_walk(svc, older_than=soon())
    assert r["orphan_files_deleted"] == [stray.path]
    assert not await stored(svc, stray.path)
    assert await stored(svc, d.path) and await stored(svc, parse_digest(m).path)
    await assert_pullable(client, "sh/b", str(d), data)

    assert await svc.meta.blob_unlink("sh/b", str(d))
    young = await full_walk(svc, older_than=time.time() - 3600)
    assert young["orphan_files_deleted"] == [] and await stored(svc, d.path)
    r = await full_walk(svc, older_than=soon())
    assert r["orphan_files_deleted"] == [d.path]
    assert not await stored(svc, d.path)
    await assert_pullable(client, "sh/a", sha256(b"sh layer"), b"sh layer")


async def test_a_layout_not_imported_is_left_alone_until_reindex(client, push, tmp_path):
    from tests.test_restart import build_layout
    svc = svc_of(client)
    await push.image("fw/known", "v1", layers=[b"known layer"])
    images = build_layout(tmp_path / "layout", {"v1": b"copied layer"})
    for path in sorted((tmp_path / "layout").rglob("*")):
        if path.is_file():
            await svc.storage.write(f"fw/copied/{path.relative_to(tmp_path / 'layout').as_posix()}",
                                    path.read_bytes())
    copied = f"fw/copied/{parse_digest(sha256(b'copied layer')).path}"
    stray = parse_digest(sha256(b"stray shared object"))
    if svc.storage.shared_blobs:
        await svc.storage.write(stray.path, b"stray shared object")

    r = await full_walk(svc, older_than=soon())
    assert r == {"orphan_files_deleted": [], "rows_without_file": [], "layouts_not_imported": ["fw/copied"]}
    assert await stored(svc, copied)
    if svc.storage.shared_blobs:  # it might be the layout's: left alone too
        assert await stored(svc, stray.path)

    assert (await reindex(svc, only_new=False)).problems == []
    r = await full_walk(svc, older_than=soon())
    assert r["layouts_not_imported"] == [] and r["rows_without_file"] == []
    assert r["orphan_files_deleted"] == ([stray.path] if svc.storage.shared_blobs else [])
    got = await client.get("/v2/fw/copied/manifests/v1")
    assert got.status == 200 and await got.read() == images["v1"][1]
    await assert_pullable(client, "fw/copied", sha256(b"copied layer"), b"copied layer")


# ---------------------------------------------------------------- sweep of set-aside objects

async def test_sweep_finishes_removals_a_crash_interrupted(client, push):
    svc = svc_of(client)
    layer = b"a layer in use"
    m, body = await push.image("tr/app", "v1", layers=[layer])
    ld, md = parse_digest(sha256(layer)), parse_digest(m)
    gone = parse_digest(await push.blob("tr/app", b"its row goes"))
    again = parse_digest(await push.blob("tr/app", b"pushed again meanwhile"))
    # Crashes between set_aside and restore/discard:
    await svc.storage.set_aside(svc.blobs.key("tr/app", ld))  # row present, key missing: restore
    await svc.storage.set_aside(f"tr/app/{md.path}")  # a manifest's own file: restore
    await svc.storage.set_aside(svc.blobs.key("tr/app", gone))  # row gone: discard
    assert await svc.meta.blob_unlink("tr/app", str(gone))
    await svc.storage.set_aside(svc.blobs.key("tr/app", again))  # key placed again: discard
    await push.blob("tr/app", b"pushed again meanwhile")
    await svc.storage.write("_trash/" + "e" * 32, b"named before keys were kept")  # discard
    assert len(await svc.storage.set_aside_list()) == 5

    young = await collect(svc, delete_untagged=True, upload_ttl=86400, now=time.time())
    assert (young.trash_restored, young.trash_discarded) == (0, 0)
    assert len(await svc.storage.set_aside_list()) == 5 and not await stored(svc, svc.blobs.key("tr/app", ld))
    later = time.time() + 2 * TRASH_GRACE
    assert await sweep_trash(svc, now=later, dry_run=True) == (2, 3)
    assert len(await svc.storage.set_aside_list()) == 5
    only_repo = await collect(svc, delete_untagged=True, upload_ttl=86400, now=later, repo="tr/app")
    assert (only_repo.trash_restored, only_repo.trash_discarded) == (0, 0)  # a --repo pass never sweeps

    r = await collect(svc, delete_untagged=True, upload_ttl=86400, now=later)
    assert (r.trash_restored, r.trash_discarded) == (2, 3)
    assert await svc.storage.set_aside_list() == []
    await assert_pullable(client, "tr/app", str(ld), layer)
    assert await svc.storage.read(f"tr/app/{md.path}") == body
    assert not await stored(svc, svc.blobs.key("tr/app", gone))
    if svc.storage.local_path("") is not None:
        assert list((svc.storage.local_path("") / "_trash").iterdir()) == []


async def test_sweep_of_a_shared_object_follows_any_holder(client, push):
    svc = svc_of(client)
    if not svc.storage.shared_blobs:
        pytest.skip("one object per digest for the whole registry: S3 with dedupe")
    held = parse_digest(await push.blob("tr/a", b"held by tr/b too"))
    await push.blob("tr/b", b"held by tr/b too")
    unheld = parse_digest(await push.blob("tr/a", b"held by nobody"))
    for d in (held, unheld):
        assert await svc.meta.blob_unlink("tr/a", str(d))
        assert (await svc.storage.set_aside(d.path)).startswith("_trash/")
    assert await sweep_trash(svc, now=time.time() + 2 * TRASH_GRACE) == (1, 1)
    await assert_pullable(client, "tr/b", str(held), b"held by tr/b too")
    assert not await stored(svc, unheld.path)


async def test_walk_and_sweep_reach_every_driver_of_subpaths(aiohttp_client, s3, tmp_path):
    """Behind a router (local disk by default, /team-s3 in a bucket with dedupe) the bucket's own
    names come out as ``_sub/0/...``: its shared blobs and its set-aside objects."""
    from registry.app import create_app
    cfg = make_config(tmp_path / "data", storage={
        "commit": False, "gc_delay": DELAY, "gc_interval": 0,
        "sub_paths": {"/team-s3": {"storageDriver": s3.file_driver(chunksize=5 << 20)}}})
    c = await aiohttp_client(create_app(cfg))
    svc, push = svc_of(c), Pusher(c)
    s_layer, d_layer = b"a layer in the bucket", b"a layer on the disk"
    await push.image("team-s3/app", "v1", layers=[s_layer])
    await push.image("local/app", "v1", layers=[d_layer])
    sd, dd = parse_digest(sha256(s_layer)), parse_digest(sha256(d_layer))
    assert svc.blobs.key("team-s3/app", sd) == f"_sub/0/{sd.path}"
    orphans = [await plant(svc, "local/app", b"orphan on the disk"),
               await plant(svc, "team-s3/app", b"orphan in the bucket")]
    stray = parse_digest(sha256(b"stray in the bucket"))
    await svc.storage.write(f"_sub/0/{stray.path}", b"stray in the bucket")

    r = await full_walk(svc, older_than=soon())
    assert sorted(r["orphan_files_deleted"]) == sorted(orphans + [f"_sub/0/{stray.path}"])
    assert r["rows_without_file"] == [] and r["layouts_not_imported"] == []
    assert not [k for k in s3.keys() if "orphan" in k or k.endswith(sha256(b"stray in the bucket")[7:])]
    assert stray.path not in s3.keys() and sd.path in s3.keys()

    a_s3 = await svc.storage.set_aside(svc.blobs.key("team-s3/app", sd))
    a_disk = await svc.storage.set_aside(svc.blobs.key("local/app", dd))
    assert a_s3.startswith("_sub/0/_trash/") and a_disk.startswith("_trash/")
    listed = {a: k for a, k, _ in await svc.storage.set_aside_list()}
    assert listed == {a_s3: f"_sub/0/{sd.path}", a_disk: f"local/app/{dd.path}"}
    assert await sweep_trash(svc, now=time.time() + 2 * TRASH_GRACE) == (2, 0)
    await assert_pullable(c, "team-s3/app", str(sd), s_layer)
    await assert_pullable(c, "local/app", str(dd), d_layer)
    assert await svc.storage.set_aside_list() == [] and not s3.keys("_trash/")


# ---------------------------------------------------------------- the CLI

async def test_cli_gc_full_json(client, push, tmp_path):
    svc = svc_of(client)
    await push.image("cli/full", "v1", layers=[b"cli layer"])
    orphan = await plant(svc, "cli/full", b"a crash left me")
    doc = to_dict(client.app[CONFIG])
    doc["storage"]["gcDelay"] = 0  # the walk deletes what is older than now - gcDelay
    cfg_path = tmp_path / "registry.json"
    cfg_path.write_text(json.dumps(doc))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "registry", "gc", "--config", str(cfg_path), "--full", *args],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    p = cli("--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["full"]["orphan_files_deleted"] == [orphan] and out["trash_restored"] == 0
    assert await stored(svc, orphan)
    p = cli()
    assert p.returncode == 0, p.stderr
    assert "full walk: 1 orphan files deleted, 0 rows without a file" in p.stdout
    assert not await stored(svc, orphan)
    await assert_pullable(client, "cli/full", sha256(b"cli layer"), b"cli layer")
