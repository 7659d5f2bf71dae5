"""Dedupe by hard link (issue 5): one inode per digest across repositories, independent
deletion, stale holders skipped and repaired, the walk that turns dedupe on or off for an
existing store (while a real server serves pulls), and a walk killed mid-way that resumes."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conformance._util import http, kill_group
from conformance.conftest import REPO_ROOT, _read_port, running_server
from registry.app import create_app
from registry.keys import SERVICES
from registry.maintenance.dedupe import walk
from registry.maintenance.gc import collect
from registry.maintenance.usage import measure
from registry.storage import fs_links
from tests.conftest import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, make_config, sha256


# ---------------------------------------------------------------- helpers

def blob_file(root: Path, repo: str, digest: str) -> Path:
    alg, hexpart = digest.split(":", 1)
    return root / repo / "blobs" / alg / hexpart


def inode(root: Path, repo: str, digest: str) -> int:
    return os.stat(blob_file(root, repo, digest)).st_ino


def content(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def push_upload(client: Any, repo: str, data: bytes) -> str:
    """A chunked upload: POST, PATCH the first half, PUT the rest with the digest."""
    digest = sha256(data)
    r = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status == 202, await r.text()
    loc = r.headers["Location"]
    half = len(data) // 2
    r = await client.patch(loc, data=data[:half], headers={"Content-Range": f"0-{half - 1}",
                                                           "Content-Type": "application/octet-stream"})
    assert r.status == 202, await r.text()
    r = await client.put(loc + ("&" if "?" in loc else "?") + f"digest={digest}", data=data[half:])
    assert r.status == 201, await r.text()
    return digest


async def push_monolithic(client: Any, repo: str, data: bytes) -> str:
    digest = sha256(data)
    r = await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", data=data)
    assert r.status == 201, await r.text()
    return digest


async def push_image(client: Any, repo: str, tag: str, layers: list[bytes], config: bytes) -> tuple[str, list[str]]:
    cd = await push_upload(client, repo, config)
    lds = [await push_upload(client, repo, layer) for layer in layers]
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": len(config)},
           "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for d, b in zip(lds, layers)]}
    r = await client.put(f"/v2/{repo}/manifests/{tag}", data=json.dumps(doc).encode(),
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    return r.headers["Docker-Content-Digest"], [cd] + lds


async def get_ok(client: Any, repo: str, digest: str, data: bytes) -> None:
    r = await client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status == 200, (repo, digest, r.status, await r.text())
    assert await r.read() == data


@pytest.fixture(params=["sqlite", "postgres"])
def meta_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "postgres":
        dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
        return {"driver": "postgres", "postgres": {"dsn": dsn, "schema": schema, "pool_size": 4}}
    return {"driver": "sqlite"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def new_client(aiohttp_client: Any, root: Path, meta_section: dict[str, Any]) -> Any:
    async def make(**storage: Any) -> Any:
        cfg = make_config(root, storage={"commit": False, **storage}, meta=meta_section)
        return await aiohttp_client(create_app(cfg, background=False))  # the tests run the walks
    return make


@pytest.fixture
def new_sqlite_client(aiohttp_client: Any, root: Path) -> Any:
    async def make(**storage: Any) -> Any:
        return await aiohttp_client(create_app(make_config(root, storage={"commit": False, **storage}),
                                               background=False))
    return make


# ---------------------------------------------------------------- the push path

async def test_duplicates_across_repositories_share_one_inode(new_client, root):
    c = await new_client()
    layer = content("shared-layer", 300_000)
    digest = sha256(layer)
    for repo in ("team/a", "team/b", "other"):  # three real uploads, no mount
        assert await push_upload(c, repo, layer) == digest
    await push_monolithic(c, "mono", layer)
    r = await c.post(f"/v2/mounted/blobs/uploads/?mount={digest}&from=team/a")
    assert r.status == 201
    r = await c.post(f"/v2/anywhere/blobs/uploads/?mount={digest}")  # mount without from
    assert r.status == 201
    repos = ("team/a", "team/b", "other", "mono", "mounted", "anywhere")
    inodes = {inode(root, repo, digest) for repo in repos}
    assert len(inodes) == 1
    assert os.stat(blob_file(root, "team/a", digest)).st_nlink == len(repos)  # no stray link (upload, trash)
    # a push of a known digest: HEAD says it is there; nothing new on disk
    r = await c.head(f"/v2/other/blobs/{digest}")
    assert r.status == 200
    await push_upload(c, "other", layer)
    assert os.stat(blob_file(root, "team/a", digest)).st_nlink == len(repos)
    u = await measure(c.server.app[SERVICES])
    assert (u.logical_bytes, u.physical_bytes, u.files, u.inodes) == (6 * len(layer), len(layer), 6, 1)
    for repo in repos:
        await get_ok(c, repo, digest, layer)


async def test_deleting_from_one_repository_never_changes_another(new_client, root):
    c = await new_client()
    svc = c.server.app[SERVICES]
    layers = [content(f"del-{i}", 100_000 + i) for i in range(3)]
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    images = {repo: await push_image(c, repo, "v1", layers, config) for repo in ("keep", "del/blob", "del/manifest",
                                                                                 "del/all")}
    mdigest, digests = images["keep"]
    assert len({inode(root, r, digests[1]) for r in images}) == 1
    # a blob deleted from one repository
    r = await c.delete(f"/v2/del/blob/blobs/{digests[1]}")
    assert r.status == 202
    assert not blob_file(root, "del/blob", digests[1]).exists()
    # a manifest deleted from another, then GC takes its blobs
    r = await c.delete(f"/v2/del/manifest/manifests/{mdigest}")
    assert r.status == 202
    # a whole repository emptied: its manifest deleted, GC, and then its directory removed
    r = await c.delete(f"/v2/del/all/manifests/{mdigest}")
    assert r.status == 202
    res = await collect(svc, delete_untagged=True, upload_ttl=86400, now=time.time() + 10 * 86400)
    assert res.blobs_deleted >= 2 * len(digests)
    for d in digests:
        assert not blob_file(root, "del/manifest", d).exists()
    import shutil
    shutil.rmtree(root / "del" / "all")
    # what "keep" serves is unchanged: same bytes, same manifest
    for d, data in zip(digests, [config] + layers):
        await get_ok(c, "keep", d, data)
        # what is left linked: "keep", and "del/blob" for all but the blob it deleted
        assert os.stat(blob_file(root, "keep", d)).st_nlink == (1 if d == digests[1] else 2)
    r = await c.get(f"/v2/keep/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == mdigest
    # "del/blob" still serves what it still holds
    await get_ok(c, "del/blob", digests[2], layers[1])


async def test_a_holder_whose_file_is_missing_is_skipped_and_repaired(new_sqlite_client, root):
    c = await new_sqlite_client()
    layer = content("missing-holder", 200_000)
    digest = await push_upload(c, "first", layer)
    blob_file(root, "first", digest).unlink()  # the row says "first" holds it; the disk disagrees
    await push_upload(c, "second", layer)
    assert blob_file(root, "second", digest).read_bytes() == layer
    # the stale holder was put back, as a link to the verified push
    assert inode(root, "first", digest) == inode(root, "second", digest)
    await get_ok(c, "first", digest, layer)


async def test_a_damaged_or_wrong_holder_is_not_trusted_and_is_repaired(new_sqlite_client, root):
    c = await new_sqlite_client()
    svc = c.server.app[SERVICES]
    layer = content("damaged-holder", 150_000)
    digest = await push_upload(c, "good", layer)
    # "bad" holds the digest too, but its own (rotten) inode, and scrub has said so
    await push_monolithic(c, "bad", layer)
    bad = blob_file(root, "bad", digest)
    tmp = bad.with_name("rot")
    tmp.write_bytes(b"\0" * len(layer))
    os.replace(tmp, bad)
    await svc.meta.scrub_mark("bad", "blob", digest, "content does not match its digest", time.time())
    # "short" holds a file of the wrong size, not yet noticed by anyone
    await push_monolithic(c, "short", layer)
    short = blob_file(root, "short", digest)
    tmp.write_bytes(layer[:1000])
    os.replace(tmp, short)

    await push_upload(c, "new", layer)
    assert blob_file(root, "new", digest).read_bytes() == layer
    assert inode(root, "new", digest) == inode(root, "good", digest)
    # both bad copies were replaced by the verified bytes, and the finding cleared
    assert bad.read_bytes() == layer and short.read_bytes() == layer
    assert (await svc.meta.blob_stat("bad", digest)).damaged is None
    await get_ok(c, "bad", digest, layer)


async def test_a_repair_push_heals_every_link_of_the_bad_inode(new_sqlite_client, root):
    from registry.maintenance.scrub import scrub
    c = await new_sqlite_client()
    svc = c.server.app[SERVICES]
    layer = content("rot-inode", 120_000)
    digest = await push_upload(c, "x", layer)
    await push_upload(c, "y", layer)
    assert inode(root, "x", digest) == inode(root, "y", digest)
    with open(blob_file(root, "x", digest), "r+b") as f:  # bit rot in the one shared inode
        f.seek(5000)
        f.write(b"\xff\xfe")
    result = await scrub(svc)
    assert {(d.repository, d.digest) for d in result.damaged} == {("x", digest), ("y", digest)}
    r = await c.get(f"/v2/y/blobs/{digest}")
    assert r.status == 404  # damaged copies are not served
    await push_upload(c, "x", layer)  # the repair: never linked to the bad inode
    for repo in ("x", "y"):
        assert blob_file(root, repo, digest).read_bytes() == layer
        assert (await svc.meta.blob_stat(repo, digest)).damaged is None
        await get_ok(c, repo, digest, layer)


async def test_mount_uses_another_holder_when_the_source_file_is_gone(new_sqlite_client, root):
    c = await new_sqlite_client()
    layer = content("mount-source", 90_000)
    digest = await push_upload(c, "src", layer)
    await push_upload(c, "other", layer)
    blob_file(root, "src", digest).unlink()
    r = await c.post(f"/v2/dst/blobs/uploads/?mount={digest}&from=src")
    assert r.status == 201, await r.text()
    assert inode(root, "dst", digest) == inode(root, "other", digest)
    await get_ok(c, "dst", digest, layer)


async def test_across_filesystems_duplicates_are_copied_and_logged_once(new_sqlite_client, root, monkeypatch,
                                                                         caplog):
    c = await new_sqlite_client()
    real_link = os.link

    def link(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if "/blobs/" in str(src) and not Path(src).name.startswith("."):  # from another repository's file
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst, *a, **kw)
    monkeypatch.setattr(os, "link", link)
    caplog.set_level(logging.WARNING, "registry.dedupe")
    layers = [content(f"xdev-{i}", 70_000) for i in range(2)]
    for data in layers:
        for repo in ("a", "b", "c"):
            await push_upload(c, repo, data)
    r = await c.post(f"/v2/d/blobs/uploads/?mount={sha256(layers[0])}&from=a")
    assert r.status == 201
    for data in layers:
        d = sha256(data)
        repos = ("a", "b", "c", "d") if data is layers[0] else ("a", "b", "c")
        assert len({inode(root, repo, d) for repo in repos}) == len(repos)  # copies, all good
        for repo in repos:
            await get_ok(c, repo, d, data)
    assert len([r for r in caplog.records if "different filesystems" in r.getMessage()]) == 1


async def test_commit_fsyncs_data_and_directories(new_sqlite_client, root, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        try:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    c = await new_sqlite_client(commit=True, dedupe=False)
    svc = c.server.app[SERVICES]
    layer = content("fsync", 100_000)
    digest = await push_upload(c, "one", layer)
    await push_upload(c, "two", layer)  # dedupe off: its own inode
    blobs_dir = str(blob_file(root, "two", digest).parent)
    assert blobs_dir in synced  # the new directory entry was made durable before the 201
    synced.clear()
    await walk(svc)  # dedupe the two copies: the rename over "two" (or "one") is made durable
    assert inode(root, "one", digest) == inode(root, "two", digest)
    assert any(p.endswith("/blobs/sha256") for p in synced)
    synced.clear()
    await walk(svc, undo=True)  # a copy: its data, then its directory entry
    assert inode(root, "one", digest) != inode(root, "two", digest)
    assert any(fs_links.WALK_PREFIX in p for p in synced), synced
    assert any(p.endswith("/blobs/sha256") for p in synced)
    for repo in ("one", "two"):
        await get_ok(c, repo, digest, layer)


# ---------------------------------------------------------------- the walk, in process

async def test_walk_turns_dedupe_on_then_off(new_client, root):
    c = await new_client(dedupe=False)
    svc = c.server.app[SERVICES]
    layers = [content(f"walk-{i}", 50_000 + 1000 * i) for i in range(4)]
    config = b'{"architecture":"amd64","os":"linux"}'
    repos = ("w/a", "w/b", "w/c")
    for repo in repos:
        await push_image(c, repo, "v1", layers, config)
    digests = [sha256(config)] + [sha256(x) for x in layers]
    for d in digests:
        assert len({inode(root, r, d) for r in repos}) == 3
    before = await measure(svc)
    assert before.physical_bytes == before.logical_bytes

    dry = await walk(svc, dry_run=True)
    expected_files = 2 * (len(digests) + 1)  # every copy but one, manifests included
    expected_bytes = 2 * (len(config) + sum(map(len, layers))) + 2 * (before.logical_bytes // 3
                                                                     - len(config) - sum(map(len, layers)))
    assert (dry.files, dry.bytes) == (expected_files, expected_bytes)
    assert len({inode(root, r, digests[1]) for r in repos}) == 3  # a dry run changes nothing

    on = await walk(svc)
    assert (on.files, on.bytes, on.complete, on.problems) == (expected_files, expected_bytes, True, [])
    for d in digests:
        assert len({inode(root, r, d) for r in repos}) == 1
    after = await measure(svc)
    assert after.physical_bytes == before.logical_bytes // 3
    assert before.physical_bytes - after.physical_bytes == on.bytes
    state = await svc.meta.dedupe_state()
    assert (state.mode, state.started, state.cursor) == ("on", None, None)
    again = await walk(svc)
    assert (again.files, again.bytes) == (0, 0)

    off = await walk(svc, undo=True)
    assert (off.files, off.bytes, off.problems) == (expected_files, expected_bytes, [])
    for d in digests:
        assert len({inode(root, r, d) for r in repos}) == 3
    for repo in repos:
        for d, data in zip(digests, [config] + layers):
            await get_ok(c, repo, d, data)
    assert (await measure(svc)).physical_bytes == before.logical_bytes


async def test_walk_never_links_to_a_copy_it_cannot_verify(new_sqlite_client, root):
    c = await new_sqlite_client(dedupe=False)
    svc = c.server.app[SERVICES]
    layer = content("verify", 80_000)
    digest = sha256(layer)
    for repo in ("v1", "v2", "v3", "v4"):
        await push_upload(c, repo, layer)
    # v2 and v3 share one inode whose bytes rotted (same size): the most shared, so tried first
    v2, v3 = blob_file(root, "v2", digest), blob_file(root, "v3", digest)
    tmp = v2.with_name("rot")
    tmp.write_bytes(bytes(b ^ 1 for b in layer))
    os.replace(tmp, v2)
    os.unlink(v3)
    os.link(v2, v3)
    result = await walk(svc)
    assert result.complete and result.problems  # the rotten inode was reported, not used
    assert len({inode(root, r, digest) for r in ("v1", "v2", "v3", "v4")}) == 1
    for repo in ("v1", "v2", "v3", "v4"):
        assert blob_file(root, repo, digest).read_bytes() == layer


async def test_a_copy_put_back_by_the_walk_after_its_row_went_is_removed(new_sqlite_client, root, monkeypatch):
    c = await new_sqlite_client(dedupe=False)
    svc = c.server.app[SERVICES]
    layer = content("race", 60_000)
    digest = sha256(layer)
    for repo in ("r1", "r2"):
        await push_upload(c, repo, layer)
    real = fs_links.relink

    def relink(fs, canonical, cid, dst, dst_id):  # type: ignore[no-untyped-def]
        ok = real(fs, canonical, cid, dst, dst_id)
        # a DELETE of the blob lands right after the rename: its row is gone
        asyncio.run_coroutine_threadsafe(svc.meta.blob_unlink(dst.parts[-4], digest), loop).result()
        return ok
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(fs_links, "relink", relink)
    await walk(svc)
    files = [r for r in ("r1", "r2") if blob_file(root, r, digest).exists()]
    rows = [r for r in ("r1", "r2") if await svc.meta.blob_size(r, digest) is not None]
    assert files == rows and len(files) == 1  # no file without a row was left behind
    await get_ok(c, files[0], digest, layer)


# ---------------------------------------------------------------- a real server, concurrent pulls

def write_config(path: Path, root: Path, **storage: Any) -> Path:
    path.write_text(json.dumps({"http": {"address": "127.0.0.1", "port": 0},
                                "storage": {"rootDirectory": str(root), "commit": False, **storage},
                                "log": {"level": "info", "format": "text"}}))
    return path


async def seed_store(base: str, repos: tuple[str, ...], blobs: list[bytes]) -> list[tuple[str, str, bytes]]:
    """Push every blob to every repository (single-request pushes) plus a tagged manifest."""
    out = []
    async with aiohttp.ClientSession() as s:
        for repo in repos:
            for data in blobs:
                d = sha256(data)
                async with s.post(f"{base}/v2/{repo}/blobs/uploads/?digest={d}", data=data) as r:
                    assert r.status == 201, await r.text()
                out.append((repo, d, data))
            doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                   "config": {"mediaType": OCI_CONFIG, "digest": sha256(blobs[0]), "size": len(blobs[0])},
                   "layers": [{"mediaType": OCI_LAYER, "digest": sha256(b), "size": len(b)} for b in blobs[1:]]}
            async with s.put(f"{base}/v2/{repo}/manifests/latest", data=json.dumps(doc).encode(),
                             headers={"Content-Type": OCI_MANIFEST}) as r:
                assert r.status == 201, await r.text()
    return out


def metric(base: str, name: str) -> float | None:
    for line in http(base, "GET", "/metrics").body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def pull_during_walk(base: str, items: list[tuple[str, str, bytes]], timeout: float = 120) -> dict[str, Any]:
    """Pull (GET whole, GET a range, HEAD) every blob over and over with several clients, verifying
    every byte, until the server reports its background walk done. Returns the tallies."""
    stop = asyncio.Event()
    stats: dict[str, Any] = {"ok": 0, "during_walk": 0, "failures": []}
    running = {"now": True}

    async def worker(seed: int) -> None:
        order = list(items)
        random.Random(seed).shuffle(order)
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                for repo, digest, data in order:
                    if stop.is_set():
                        return
                    url = f"{base}/v2/{repo}/blobs/{digest}"
                    try:
                        kind = (stats["ok"] + seed) % 4
                        if kind == 0:
                            async with s.head(url) as r:
                                good = r.status == 200 and int(r.headers["Content-Length"]) == len(data)
                        elif kind == 1 and len(data) > 10:
                            a, b = len(data) // 3, len(data) // 2
                            async with s.get(url, headers={"Range": f"bytes={a}-{b}"}) as r:
                                good = r.status == 206 and await r.read() == data[a:b + 1]
                        else:
                            async with s.get(url) as r:
                                body = await r.read()
                                good = r.status == 200 and hashlib.sha256(body).hexdigest() == digest[7:]
                        if not good:
                            stats["failures"].append((repo, digest, r.status))
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        stats["failures"].append((repo, digest, repr(exc)))
                    else:
                        stats["ok"] += 1
                        if running["now"]:
                            stats["during_walk"] += 1

    async def watch() -> None:
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            runs = await loop.run_in_executor(None, metric, base, "registry_dedupe_runs_total")
            busy = await loop.run_in_executor(None, metric, base, "registry_dedupe_walk_running")
            if runs and runs >= 1 and not busy:
                running["now"] = False
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)  # a few more pulls after the walk
        stop.set()
    workers = [asyncio.create_task(worker(i)) for i in range(6)]
    await watch()
    await asyncio.gather(*workers)
    assert not running["now"], "the background walk did not finish in time"
    return stats


@pytest.mark.slow
async def test_turning_dedupe_on_then_off_with_a_live_server_and_concurrent_pulls(tmp_path):
    root = tmp_path / "data"
    repos = ("live/a", "live/b", "live/c")
    blobs = [b'{"architecture":"amd64","os":"linux"}'] + [content(f"live-{i}", 150_000 + i) for i in range(16)] \
        + [content(f"small-{i}", 9_000 + i) for i in range(8)]
    digests = [sha256(b) for b in blobs]
    logical = 3 * sum(map(len, blobs))
    # a store that never deduped
    with running_server(root, tmp_path / "s1.log", write_config(tmp_path / "c1.json", root, dedupe=False)) as srv:
        items = await seed_store(srv.base, repos, blobs)
    assert all(len({inode(root, r, d) for r in repos}) == 3 for d in digests)

    # dedupe turned on: the walk runs in the background (paced, so it lasts a few seconds)
    cfg = write_config(tmp_path / "c2.json", root, dedupe=True, dedupeBytesPerSecond=1_000_000)
    with running_server(root, tmp_path / "s2.log", cfg) as srv:
        stats = await pull_during_walk(srv.base, items)
        log_on = srv.log_text()
    assert stats["failures"] == [], stats["failures"][:10]
    assert stats["during_walk"] > 100, stats
    assert all(len({inode(root, r, d) for r in repos}) == 1 for d in digests)
    assert "dedupe: linked" in log_on

    # and off again: every repository gets its own copy back, still serving
    cfg = write_config(tmp_path / "c3.json", root, dedupe=False, dedupeBytesPerSecond=2_000_000)
    with running_server(root, tmp_path / "s3.log", cfg) as srv:
        stats = await pull_during_walk(srv.base, items)
        log_off = srv.log_text()
        time.sleep(5.1)  # the store-wide gauges are cached for 5s
        physical = metric(srv.base, "registry_storage_physical_bytes")
        logical_metric = metric(srv.base, "registry_storage_logical_bytes")
    assert stats["failures"] == [], stats["failures"][:10]
    assert stats["during_walk"] > 100, stats
    assert all(len({inode(root, r, d) for r in repos}) == 3 for d in digests)
    assert "gave" in log_off and "own copy" in log_off
    manifests = logical_metric - logical
    assert physical == logical_metric and manifests > 0  # own copies: physical is logical again
    for repo, d, data in items:
        assert blob_file(root, repo, d).read_bytes() == data


# ---------------------------------------------------------------- crashes in the middle of a walk

def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    return subprocess.run([sys.executable, "-m", "registry", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def walk_state(root: Path) -> tuple[Any, ...] | None:
    conn = sqlite3.connect(root / "_registry" / "meta.sqlite")
    try:
        rows = conn.execute("SELECT mode, cursor, started FROM dedupe_state WHERE id = 1").fetchall()
    finally:
        conn.close()
    return rows[0] if rows else None


def kill_when(proc: subprocess.Popen, ready: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the walk ended before it could be interrupted; slow it down"
        if ready():
            kill_group(proc, signal.SIGKILL)
            proc.wait(10)
            return
        time.sleep(0.02)
    kill_group(proc, signal.SIGKILL)
    pytest.fail("the walk never reached the point where it should be killed")


async def seed_in_process(aiohttp_client: Any, root: Path, repos: tuple[str, ...], blobs: list[bytes]) -> None:
    c = await aiohttp_client(create_app(make_config(root, storage={"commit": False, "dedupe": False}),
                                        background=False))
    for repo in repos:
        for data in blobs:
            await push_monolithic(c, repo, data)
    await c.close()


def check_intact(root: Path, repos: tuple[str, ...], blobs: list[bytes]) -> set[int]:
    """Every copy is there with its bytes; returns how many inodes each digest has."""
    counts = set()
    for data in blobs:
        d = sha256(data)
        for repo in repos:
            assert blob_file(root, repo, d).read_bytes() == data, (repo, d)
        counts.add(len({inode(root, r, d) for r in repos}))
    leftovers = [p for p in root.rglob(f"{fs_links.WALK_PREFIX}*")]
    return counts | ({-1} if leftovers else set())


@pytest.mark.slow
@pytest.mark.parametrize("undo", [False, True])
async def test_cli_walk_killed_mid_way_resumes_and_finishes(aiohttp_client, tmp_path, undo):
    root = tmp_path / "data"
    repos = ("k/a", "k/b", "k/c")
    blobs = [content(f"kill-{i}", 60_000 + i) for i in range(30)]
    await seed_in_process(aiohttp_client, root, repos, blobs)
    if undo:  # start from a deduped store
        done = cli("dedupe", "--root", str(root))
        assert done.returncode == 0, done.stderr
        assert check_intact(root, repos, blobs) == {1}
    start_inodes = 1 if undo else 3
    args = ["dedupe", "--root", str(root), "--bytes-per-second", "300000"] + (["--undo"] if undo else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    proc = subprocess.Popen([sys.executable, "-m", "registry", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def half_way() -> bool:  # some digests done (cursor saved), many still to go
        st = walk_state(root) if (root / "_registry" / "meta.sqlite").exists() else None
        if not st or st[0] != ("off" if undo else "on") or st[1] is None:
            return False
        changed = sum(1 for b in blobs if len({inode(root, r, sha256(b)) for r in repos}) != start_inodes)
        return changed >= 3
    kill_when(proc, half_way)
    mode, cursor, started = walk_state(root)
    assert started is not None and cursor is not None  # interrupted, with a place to resume from
    counts = check_intact(root, repos, blobs) - {-1}  # no copy lost or damaged by the kill
    assert counts <= {1, 2, 3} and len(counts) >= 2  # part done, part not
    again = cli(*args[:3], *(["--undo"] if undo else []), "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["resumed"] and result["complete"]
    assert check_intact(root, repos, blobs) == {3 if undo else 1}  # all done, no temporary file left
    assert walk_state(root)[1:] == (None, None)
    # the totals of the whole walk include what the killed run had saved with its cursor
    assert result["files"] < result["total_files"] <= len(blobs) * 2
    du = json.loads(cli("du", "--root", str(root), "--json").stdout)
    data_bytes = sum(map(len, blobs))
    assert (du["logical_bytes"], du["physical_bytes"]) == (3 * data_bytes, (3 if undo else 1) * data_bytes)


@pytest.mark.slow
async def test_server_killed_during_its_background_walk_resumes_at_the_next_start(aiohttp_client, tmp_path):
    root = tmp_path / "data"
    repos = ("s/a", "s/b")
    blobs = [content(f"srv-kill-{i}", 80_000 + i) for i in range(30)]
    await seed_in_process(aiohttp_client, root, repos, blobs)
    cfg = write_config(tmp_path / "on.json", root, dedupe=True, dedupeBytesPerSecond=300_000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "registry", "serve", "--config", str(cfg)], cwd=REPO_ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _read_port(log, proc)  # serving: the walk runs in the background

        def half_way() -> bool:
            st = walk_state(root)
            return bool(st and st[1] is not None
                        and sum(1 for b in blobs if len({inode(root, r, sha256(b)) for r in repos}) == 1) >= 3)
        kill_when(proc, half_way)
    finally:
        kill_group(proc)
    assert walk_state(root)[2] is not None  # interrupted
    counts = check_intact(root, repos, blobs)
    assert 1 in counts and 2 in counts  # half done, and nothing lost
    cfg = write_config(tmp_path / "fast.json", root, dedupe=True)
    with running_server(root, tmp_path / "resumed.log", cfg) as srv:
        deadline = time.monotonic() + 60
        while metric(srv.base, "registry_dedupe_runs_total") != 1 or metric(srv.base, "registry_dedupe_walk_running"):
            assert time.monotonic() < deadline, srv.log_text()
            time.sleep(0.1)
        for data in blobs:
            r = srv.http("GET", f"/v2/s/b/blobs/{sha256(data)}")
            assert r.status == 200 and r.body == data
        text = srv.log_text()
    assert "resuming the on walk" in text
    assert check_intact(root, repos, blobs) == {1}
    assert walk_state(root)[1:] == (None, None)
