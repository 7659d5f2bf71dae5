"""Online GC (issue 6), through the API, on SQLite and PostgreSQL.

A pass is ``collect()`` with a ``now`` in the future, so no test waits for
gcDelay to pass: the store's review_after times are compared with that ``now``.
One test sleeps (under a second): an existence check must postpone with the
wall clock. The scheduler and the CLI are exercised on their own.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from registry.app import create_app
from registry.config import Config, to_dict
from registry.keys import CONFIG, SERVICES
from registry.maintenance.gc import GCResult, collect
from registry.meta.base import NEVER
from tests.conftest import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, Pusher, sha256

DELAY = 100.0  # gcDelay of these tests, in seconds
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    """conftest's config with gcDelay 100s and no scheduled passes (each test runs its own)."""
    storage = {"commit": False, "gc_delay": DELAY, "gc_interval": 0}
    if request.param == "postgres":
        dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
        from tests.conftest import make_config
        return make_config(tmp_path / "data", storage=storage,
                           meta={"driver": "postgres", "postgres": {"dsn": dsn, "schema": schema, "pool_size": 4}})
    from tests.conftest import make_config
    return make_config(tmp_path / "data", storage=storage)


@pytest.fixture
def other_client(aiohttp_client, config: Config, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A client of an app with other storage settings, on its own root (and the test's PG schema)."""
    async def make(**storage: Any):  # type: ignore[no-untyped-def]
        root = tmp_path / f"other-{len(os.listdir(tmp_path))}"
        return await aiohttp_client(create_app(config.replace(storage={"root_directory": str(root), **storage})))
    return make


# ---------------------------------------------------------------- helpers

def later(k: float = 10.0) -> float:
    """A pass ``k`` gcDelays from now."""
    return time.time() + k * DELAY


async def gc(client, at: float | None = None, **kw: Any) -> GCResult:  # type: ignore[no-untyped-def]
    cfg = client.app[CONFIG]
    kw.setdefault("delete_untagged", cfg.storage.gc_delete_untagged)
    kw.setdefault("upload_ttl", cfg.uploads.ttl)
    return await collect(client.app[SERVICES], now=later() if at is None else at, **kw)


async def gc_chain(client, at: float | None = None, passes: int = 4, **kw: Any) -> GCResult:  # type: ignore[no-untyped-def]
    """Passes one gcDelay apart, merged: what a deleted manifest frees is due a whole
    gcDelay after it went (a client may have checked it while it was in use), so a
    manifest, then its blobs (an index: its children, then their blobs) go in turn."""
    start = later() if at is None else at
    merged = GCResult(dry_run=False, started=start)
    for k in range(passes):
        r = await gc(client, at=start + 2 * k * DELAY, **kw)
        merged.deleted += r.deleted
        merged.blobs_deleted += r.blobs_deleted
        merged.manifests_deleted += r.manifests_deleted
        merged.bytes_reclaimed += r.bytes_reclaimed
        merged.reviewed += r.reviewed
    return merged


def items(result: GCResult) -> set[tuple[str, str, str]]:
    return {(str(d["kind"]), str(d["repository"]), str(d["digest"])) for d in result.deleted}


def blob_file(client, repo: str, digest: str) -> Path:  # type: ignore[no-untyped-def]
    algo, hexpart = digest.split(":", 1)
    return client.app[CONFIG].root / repo / "blobs" / algo / hexpart


async def row(client, repo: str, digest: str) -> int | None:  # type: ignore[no-untyped-def]
    return await client.app[SERVICES].meta.blob_size(repo, digest)


async def review_after(client, repo: str, digest: str) -> float:  # type: ignore[no-untyped-def]
    stat = await client.app[SERVICES].meta.blob_stat(repo, digest)
    return stat.review_after if hasattr(stat, "review_after") else stat[1]


async def head(client, repo: str, digest: str) -> int:  # type: ignore[no-untyped-def]
    return (await client.head(f"/v2/{repo}/blobs/{digest}")).status


async def gone(client, repo: str, digest: str) -> bool:  # type: ignore[no-untyped-def]
    """No row, no file (checked without a HEAD, which would postpone a queued blob)."""
    return await row(client, repo, digest) is None and not blob_file(client, repo, digest).exists()


async def kept(client, repo: str, digest: str) -> bool:  # type: ignore[no-untyped-def]
    return await row(client, repo, digest) is not None and blob_file(client, repo, digest).exists()


def config_blob(name: str) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "name": name}).encode()


def image_doc(cfg: bytes, layers: list[bytes], **extra: Any) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(cfg), "size": len(cfg)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha256(x), "size": len(x)} for x in layers], **extra}


async def image(push: Pusher, repo: str, tag: str | None, name: str, layers: list[bytes],
                **extra: Any) -> tuple[str, list[str]]:
    """Push an image; returns (manifest digest, [config digest, layer digests...])."""
    cfg = config_blob(name)
    digest, _ = await push.image(repo, tag, layers=layers, config=cfg, **extra)
    return digest, [sha256(cfg)] + [sha256(x) for x in layers]


async def index(push: Pusher, repo: str, tag: str, children: list[str]) -> str:
    descs = []
    for d in children:
        body = await (await push.client.get(f"/v2/{repo}/manifests/{d}", headers={"Accept": OCI_MANIFEST})).read()
        descs.append({"mediaType": OCI_MANIFEST, "digest": d, "size": len(body)})
    digest, _ = await push.manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs},
                                    OCI_INDEX)
    return digest


def subject_of(digest: str, size: int) -> dict[str, Any]:
    return {"subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": size},
            "artifactType": "application/vnd.example.sig"}


# ---------------------------------------------------------------- blobs

async def test_unreferenced_blob_collected_after_the_delay_not_before(client, push):
    d = await push.blob("gc/loose", b"nobody refers to me")
    assert await kept(client, "gc/loose", d)
    early = await gc(client, at=later(0.5))
    assert early.blobs_deleted == 0 and await kept(client, "gc/loose", d)
    r = await gc(client)
    assert items(r) == {("blob", "gc/loose", d)}
    assert r.blobs_deleted == 1 and r.bytes_reclaimed == len(b"nobody refers to me")
    assert await gone(client, "gc/loose", d)
    assert await head(client, "gc/loose", d) == 404
    assert (await client.get(f"/v2/gc/loose/blobs/{d}")).status == 404


async def test_referenced_blob_never_collected(client, push):
    layer = b"in use " * 100
    m, blobs = await image(push, "gc/ref", "v1", "ref", [layer])
    for _ in range(2):  # the first pass finds them in use; later passes never look at them again
        r = await gc(client, at=later(100))
        assert r.blobs_deleted == r.manifests_deleted == 0, r.deleted
    svc = client.app[SERVICES]
    for d in blobs:
        assert await kept(client, "gc/ref", d)
        assert await review_after(client, "gc/ref", d) == NEVER
    r = await client.get(f"/v2/gc/ref/blobs/{blobs[1]}")
    assert r.status == 200 and await r.read() == layer
    assert (await gc(client, at=later(1000))).reviewed == 0


async def test_untagged_manifest_collected_then_its_blobs_a_delay_later(client, push):
    m, blobs = await image(push, "gc/untagged", None, "untagged", [b"layer-u1", b"layer-u2"])
    first = await gc(client)
    assert items(first) == {("manifest", "gc/untagged", m)}
    for d in blobs:  # freed by the manifest's deletion: a full gcDelay from then
        assert await kept(client, "gc/untagged", d)
    assert (await gc(client, at=later(10.5))).deleted == []
    r = await gc(client, at=later(12))
    assert items(r) == {("blob", "gc/untagged", d) for d in blobs}
    assert first.manifests_deleted == 1 and r.blobs_deleted == 3
    assert (await client.get(f"/v2/gc/untagged/manifests/{m}")).status == 404
    for d in [m, *blobs]:
        assert await gone(client, "gc/untagged", d)


async def test_tagged_manifest_kept(client, push):
    m, blobs = await image(push, "gc/tagged", "latest", "tagged", [b"layer-t"])
    r = await gc(client)
    assert r.deleted == [] and r.reviewed >= 3
    assert (await client.get("/v2/gc/tagged/manifests/latest")).status == 200
    for d in [m, *blobs]:
        assert await kept(client, "gc/tagged", d)


async def test_tag_delete_frees_manifest_and_blobs_after_the_delay(client, push):
    m, blobs = await image(push, "gc/tagdel", "v1", "tagdel", [b"layer-td"])
    assert (await gc(client)).deleted == []  # reviewed: in use
    assert (await client.delete("/v2/gc/tagdel/manifests/v1")).status == 202
    assert (await gc(client, at=later(0.5))).deleted == []  # an API delete gives a full gcDelay
    r = await gc_chain(client, at=later(2))
    assert items(r) == {("manifest", "gc/tagdel", m)} | {("blob", "gc/tagdel", d) for d in blobs}
    for d in [m, *blobs]:
        assert await gone(client, "gc/tagdel", d)


async def test_a_blob_shared_by_two_manifests_survives_deleting_one(client, push):
    shared = b"shared layer " * 50
    m1, b1 = await image(push, "gc/share", "one", "one", [shared, b"only-in-one"])
    m2, b2 = await image(push, "gc/share", "two", "two", [shared, b"only-in-two"])
    assert (await gc(client)).deleted == []
    assert (await client.delete(f"/v2/gc/share/manifests/{m1}")).status == 202
    r = await gc(client, at=later(2))
    assert items(r) == {("blob", "gc/share", b1[0]), ("blob", "gc/share", b1[2])}
    for d in [m2, *b2]:
        assert await kept(client, "gc/share", d)
    got = await client.get(f"/v2/gc/share/blobs/{sha256(shared)}")
    assert got.status == 200 and await got.read() == shared
    assert (await client.get("/v2/gc/share/manifests/two")).status == 200


async def test_a_blob_shared_across_repositories_survives_gc_of_one(client, push):
    layer = bytes(range(256)) * 300  # large enough to go out with sendfile
    d = sha256(layer)
    keep_m, keep_blobs = await image(push, "gc/keeper", "v1", "keeper", [layer])
    r = await client.post(f"/v2/gc/leaver/blobs/uploads/?mount={d}&from=gc/keeper")
    assert r.status == 201, await r.text()
    leave_m, _ = await image(push, "gc/leaver", None, "leaver", [layer])
    loose = await push.blob("gc/keeper", b"garbage of the keeper")
    r = await gc_chain(client, repo="gc/leaver")
    assert {(k, repo) for k, repo, _ in items(r)} == {("manifest", "gc/leaver"), ("blob", "gc/leaver")}
    assert ("blob", "gc/leaver", d) in items(r)
    assert await gone(client, "gc/leaver", d)
    assert await kept(client, "gc/keeper", loose)  # --repo leaves other repositories alone
    r = await gc(client, at=later(100))  # a full pass keeps what the keeper uses
    assert items(r) == {("blob", "gc/keeper", loose)}
    got = await client.get(f"/v2/gc/keeper/blobs/{d}")
    assert got.status == 200
    body = await got.read()
    assert body == layer and sha256(body) == d
    assert blob_file(client, "gc/keeper", d).read_bytes() == layer
    assert (await client.get("/v2/gc/keeper/manifests/v1")).status == 200


# ---------------------------------------------------------------- indexes and referrers

async def test_an_index_keeps_its_children_and_takes_them_along(client, push):
    c1, b1 = await image(push, "gc/index", None, "amd64", [b"amd64 layer"])
    c2, b2 = await image(push, "gc/index", None, "arm64", [b"arm64 layer"])
    i = await index(push, "gc/index", "multi", [c1, c2])
    r = await gc(client)
    assert r.deleted == []  # the children are untagged, but the index refers to them
    for d in [c1, c2, *b1, *b2]:
        assert await kept(client, "gc/index", d)
    assert (await client.delete("/v2/gc/index/manifests/multi")).status == 202
    r = await gc_chain(client, at=later(2))  # the index, then its children, then their blobs
    assert items(r) == ({("manifest", "gc/index", d) for d in (i, c1, c2)}
                        | {("blob", "gc/index", d) for d in b1 + b2})
    for d in [i, c1, c2, *b1, *b2]:
        assert await gone(client, "gc/index", d)


async def test_referrer_kept_while_its_subject_exists(client, push):
    s, sb = await image(push, "gc/refs", "app", "subject", [b"app layer"])
    size = len(await (await client.get(f"/v2/gc/refs/manifests/{s}")).read())
    r_digest, rb = await image(push, "gc/refs", None, "signature", [b"signature bytes"], **subject_of(s, size))
    assert (await gc(client)).deleted == []  # untagged, but its subject is there
    listed = await (await client.get(f"/v2/gc/refs/referrers/{s}")).json()
    assert [x["digest"] for x in listed["manifests"]] == [r_digest]
    assert (await client.delete(f"/v2/gc/refs/manifests/{s}")).status == 202
    r = await gc_chain(client, at=later(2))
    assert ("manifest", "gc/refs", r_digest) in items(r)
    assert items(r) == {("manifest", "gc/refs", r_digest)} | {("blob", "gc/refs", d) for d in sb + rb}
    listed = await (await client.get(f"/v2/gc/refs/referrers/{s}")).json()
    assert listed["manifests"] == []


async def test_referrer_of_a_subject_never_pushed_lives_for_the_delay(client, push):
    missing = sha256(b"a subject nobody pushed")
    r_digest, rb = await image(push, "gc/orphanref", None, "sig", [b"sig"], **subject_of(missing, 123))
    assert (await gc(client, at=later(0.5))).deleted == []
    r = await gc_chain(client, at=later(2))
    assert items(r) == {("manifest", "gc/orphanref", r_digest)} | {("blob", "gc/orphanref", d) for d in rb}


async def test_delete_untagged_false_keeps_plain_manifests_not_orphan_referrers(other_client):
    client = await other_client(gc_delete_untagged=False, gc_delay=DELAY, gc_interval=0)
    push = Pusher(client)
    plain, pb = await image(push, "gc/keepall", None, "plain", [b"plain layer"])
    s, sb = await image(push, "gc/keepall", "app", "subject", [b"subject layer"])
    size = len(await (await client.get(f"/v2/gc/keepall/manifests/{s}")).read())
    ref, rb = await image(push, "gc/keepall", None, "sig", [b"sig of app"], **subject_of(s, size))
    orphan, ob = await image(push, "gc/keepall", None, "sig2", [b"sig of nothing"],
                             **subject_of(sha256(b"never pushed"), 7))
    r = await gc_chain(client, passes=2)
    assert items(r) == {("manifest", "gc/keepall", orphan)} | {("blob", "gc/keepall", d) for d in ob}
    assert (await client.delete(f"/v2/gc/keepall/manifests/{s}")).status == 202
    r = await gc_chain(client, at=later(20))
    assert items(r) == ({("manifest", "gc/keepall", ref)} | {("blob", "gc/keepall", d) for d in sb + rb})
    for d in [plain, *pb]:
        assert await kept(client, "gc/keepall", d)
    assert (await client.get(f"/v2/gc/keepall/manifests/{plain}")).status == 200


# ---------------------------------------------------------------- existence checks and races

async def test_head_of_a_queued_blob_postpones_it_for_a_full_delay(other_client):
    delay = 2.0
    client = await other_client(gc_delay=delay, gc_interval=0)
    push = Pusher(client)
    d = await push.blob("gc/head", b"about to be referred to")
    uploaded_ra = await review_after(client, "gc/head", d)
    await asyncio.sleep(0.3 * delay)  # the only wait of this file: the check must use the wall clock
    checked = time.time()
    assert await head(client, "gc/head", d) == 200
    assert await review_after(client, "gc/head", d) >= checked + delay
    # A pass after the upload's delay but within a delay of the HEAD keeps it...
    assert checked + 0.95 * delay > uploaded_ra
    r = await collect(client.app[SERVICES], delete_untagged=True, upload_ttl=86400, now=checked + 0.95 * delay)
    assert r.deleted == []
    # ... so the manifest the client pushes within gcDelay of its HEAD is accepted.
    digest, _ = await push.manifest("gc/head", "v1", image_doc(b"about to be referred to", []))
    assert (await client.get("/v2/gc/head/manifests/v1")).status == 200
    # A blob nobody refers to after all goes once the postponed time has passed.
    d2 = await push.blob("gc/head", b"checked but never used")
    assert await head(client, "gc/head", d2) == 200
    r = await collect(client.app[SERVICES], delete_untagged=True, upload_ttl=86400, now=time.time() + 10 * delay)
    assert items(r) == {("blob", "gc/head", d2)}


async def test_a_head_answered_while_gc_deletes_the_blob_is_never_200(client, push, monkeypatch):
    """The HEAD reads the row, GC deletes it, then the HEAD's postponement finds nothing:
    the HEAD must say 404 (a 200 would let the client skip the upload and fail its push)."""
    import registry.services.blobs as blobs_mod
    d = await push.blob("gc/headrace", b"queued and due")
    svc = client.app[SERVICES]
    ra = await review_after(client, "gc/headrace", d)
    t = ra + 1  # the HEAD and the pass happen at the same moment, after the blob fell due

    class Clock:
        @staticmethod
        def time() -> float:
            return t
    monkeypatch.setattr(blobs_mod, "time", Clock)
    touch = svc.meta.touch
    ran: list[GCResult] = []

    async def gc_first(*args: Any) -> Any:  # GC's transaction commits between the HEAD's read and write
        ran.append(await collect(svc, delete_untagged=True, upload_ttl=86400, now=t))
        return await touch(*args)
    monkeypatch.setattr(svc.meta, "touch", gc_first)
    status = await head(client, "gc/headrace", d)
    assert [r.blobs_deleted for r in ran] == [1]
    assert status == 404


@pytest.mark.parametrize("check", ["head", "upload", "mount"])
async def test_a_blob_checked_while_its_last_manifest_awaits_gc_survives_the_delay(client, push, check):
    layer = b"in use until the tag goes"
    m, blobs = await image(push, "gc/race", "old", "race", [layer])
    await image(push, "gc/elsewhere", "keep", "race", [layer])  # a mount source
    assert (await gc(client)).deleted == []  # reviewed: in use (NEVER)
    assert (await client.delete("/v2/gc/race/manifests/old")).status == 202
    svc = client.app[SERVICES]
    due = (await svc.meta.manifest_get("gc/race", m)).review_after  # the tag delete + gcDelay
    # A client makes sure the config and layer are there, the way it chose.
    for d, data in zip(blobs, [config_blob("race"), layer]):
        if check == "head":
            assert await head(client, "gc/race", d) == 200
        elif check == "upload":
            assert await push.blob("gc/race", data) == d
        else:
            r = await client.post(f"/v2/gc/race/blobs/uploads/?mount={d}&from=gc/elsewhere")
            assert r.status == 201
    # GC runs when the old manifest falls due: less than gcDelay after the checks.
    await gc(client, at=due)
    # The client pushes its manifest, well within gcDelay of its checks.
    r = await client.put("/v2/gc/race/manifests/new", data=json.dumps(image_doc(config_blob("race"), [layer])),
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()


async def test_a_child_pushed_while_its_old_index_awaits_gc_survives_the_delay(client, push):
    """What the soak test hits: an index's child is pushed again (201), the index naming it fails."""
    c, _ = await image(push, "gc/race", None, "child", [b"child layer"])
    child = await (await client.get(f"/v2/gc/race/manifests/{c}", headers={"Accept": OCI_MANIFEST})).read()
    old = await index(push, "gc/race", "old", [c])
    assert (await gc(client)).deleted == []  # the child is in use (NEVER)
    assert (await client.delete("/v2/gc/race/manifests/old")).status == 202
    due = (await client.app[SERVICES].meta.manifest_get("gc/race", old)).review_after
    assert (await push.manifest("gc/race", c, json.loads(child)))[0] == c  # pushed again by digest: 201
    await gc(client, at=due)
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
           "manifests": [{"mediaType": OCI_MANIFEST, "digest": c, "size": len(child)}]}
    r = await client.put("/v2/gc/race/manifests/new", data=json.dumps(doc), headers={"Content-Type": OCI_INDEX})
    assert r.status == 201, await r.text()


async def test_mount_of_a_blob_already_held_postpones_it(client, push):
    d = await push.blob("gc/mount", b"mounted again")
    svc = client.app[SERVICES]
    ra = await review_after(client, "gc/mount", d)
    r = await client.post(f"/v2/gc/mount/blobs/uploads/?mount={d}&from=gc/mount")
    assert r.status == 201
    mounted = time.time()
    assert await review_after(client, "gc/mount", d) >= max(ra, mounted + DELAY)


async def test_get_of_a_queued_manifest_by_digest_postpones_it(client, push):
    m, _ = await image(push, "gc/getm", None, "getm", [b"child layer"])
    svc = client.app[SERVICES]
    fetched = time.time()
    assert (await client.get(f"/v2/gc/getm/manifests/{m}", headers={"Accept": OCI_MANIFEST})).status == 200
    assert (await svc.meta.manifest_get("gc/getm", m)).review_after >= fetched + DELAY
    assert (await gc(client, at=fetched + 0.99 * DELAY)).deleted == []


async def test_a_pass_stopped_mid_batch_still_removes_the_files_of_what_it_deleted(client, push):
    """The scheduler is cancelled at shutdown: rows a batch deleted must not leave orphan files."""
    loose = [await push.blob("gc/cancel", b"loose %d" % i) for i in range(5)]
    svc = client.app[SERVICES]
    real = svc.meta.gc_collect
    committed = asyncio.Event()

    async def gc_collect(*args: Any, **kw: Any) -> Any:
        out = await real(*args, **kw)
        committed.set()
        return out
    svc.meta.gc_collect = gc_collect  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(gc(client))
        await committed.wait()
        task.cancel()  # lands while the batch removes its files
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        del svc.meta.gc_collect
    for d in loose:
        assert await gone(client, "gc/cancel", d)
    assert not any((client.app[CONFIG].root / "_trash").iterdir())


async def test_a_rejected_manifest_push_leaves_no_file(client, push):
    """Its file is written before the store checks its references; a rejection must take
    it back, or it stays an orphan no pass ever sees."""
    cfg_digest = await push.blob("gc/rejected", config_blob("rejected"))
    doc = image_doc(config_blob("rejected"), [b"never uploaded"])
    body = json.dumps(doc).encode()
    r = await client.put("/v2/gc/rejected/manifests/v1", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    assert not blob_file(client, "gc/rejected", sha256(body)).exists()
    assert await kept(client, "gc/rejected", cfg_digest)


# ---------------------------------------------------------------- dry run, uploads, layout

async def test_dry_run_reports_what_a_pass_deletes_chains_included(client, push):
    m, blobs = await image(push, "gc/dry", None, "dry", [b"dry layer"])
    dry = await gc(client, dry_run=True, at=later(10))
    real = await gc(client, at=later(10))
    assert items(dry) == items(real)


async def test_dry_run_deletes_nothing_and_reports_the_same_items(client, push):
    shared = b"used by the tagged image too"
    await image(push, "gc/dry", "keep", "keep", [shared])
    # Its config and layer stay (the tagged image uses them): a dry run sees no chain to follow.
    m, blobs = await image(push, "gc/dry", None, "keep", [shared], annotations={"n": "untagged"})
    loose = [await push.blob("gc/dry", b"loose %d" % i) for i in range(3)]
    await push.blob("gc/dry2", b"loose in another repository")
    at = later(10)
    dry = await gc(client, dry_run=True, at=at)
    assert dry.dry_run and dry.manifests_deleted == 1 and dry.blobs_deleted == 4
    for d in [m, *loose]:
        assert await kept(client, "gc/dry", d)
    assert (await client.get(f"/v2/gc/dry/manifests/{m}")).status == 200
    again = await gc(client, dry_run=True, at=at)
    assert items(again) == items(dry)  # a dry run changed nothing, not even the queue
    real = await gc(client, at=at)
    assert items(real) == items(dry)
    assert real.bytes_reclaimed == dry.bytes_reclaimed
    for d in [m, *loose]:
        assert await gone(client, "gc/dry", d)


async def test_expired_upload_sessions_and_orphan_upload_files_go(client):
    cfg = client.app[CONFIG]
    uploads = cfg.root / "_uploads"
    r = await client.post("/v2/gc/up/blobs/uploads/")
    assert r.status == 202
    loc, uid = r.headers["Location"], r.headers["Docker-Upload-UUID"]
    r = await client.patch(loc, data=b"x" * 1000, headers={"Content-Type": "application/octet-stream"})
    assert r.status == 202, await r.text()
    assert (uploads / uid).exists()
    old_orphan, new_orphan = uploads / ("a" * 32), uploads / ("b" * 32)
    old_orphan.write_bytes(b"a crash left me")
    new_orphan.write_bytes(b"a push still streaming")
    os.utime(old_orphan, (time.time() - 3 * DELAY, time.time() - 3 * DELAY))
    # Now, with a TTL of gcDelay: the old orphan goes; the session and the new file are recent.
    r = await gc(client, at=time.time(), upload_ttl=DELAY)
    assert r.uploads_deleted == 1 and not old_orphan.exists() and new_orphan.exists()
    assert (await client.get(loc)).status == 204
    # Past the TTL: the session goes, with its data, and so does the other file.
    r = await gc(client, at=later(2), upload_ttl=DELAY)
    assert r.uploads_deleted == 2 and ("upload", "gc/up", uid) in items(r)
    assert not (uploads / uid).exists() and not new_orphan.exists()
    r = await client.get(loc)
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    r = await client.patch(loc, data=b"more", headers={"Content-Type": "application/octet-stream"})
    assert r.status == 404


async def test_index_json_drops_a_collected_untagged_manifest(client, push):
    tagged, _ = await image(push, "gc/layout", "v1", "v1", [b"tagged layer"])
    untagged, _ = await image(push, "gc/layout", None, "loose", [b"untagged layer"])
    path = client.app[CONFIG].root / "gc" / "layout" / "index.json"

    def listed() -> set[str]:
        return {m["digest"] for m in json.loads(path.read_bytes())["manifests"]}
    assert listed() == {tagged, untagged}
    r = await gc(client)
    assert ("manifest", "gc/layout", untagged) in items(r)
    assert listed() == {tagged}


# ---------------------------------------------------------------- CLI and scheduler

def _cli(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    return subprocess.run([sys.executable, "-m", "registry", "gc", "--config", str(cfg_path), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


async def test_cli_gc_json_and_dry_run(other_client, tmp_path):
    client = await other_client(gc_delay=0, gc_interval=0)  # due at once: the CLI passes at the wall clock
    push = Pusher(client)
    shared = b"kept: the tagged image uses it"
    await image(push, "cli/app", "v1", "v1", [shared])
    m, _ = await image(push, "cli/app", None, "v1", [shared], annotations={"n": "untagged"})
    loose = [await push.blob("cli/app", b"loose %d" % i) for i in range(2)]
    r = await client.post("/v2/cli/app/blobs/uploads/")
    assert r.status == 202
    cfg: Config = client.app[CONFIG]
    cfg_path = tmp_path / "registry.json"
    doc = to_dict(cfg)
    doc["uploads"]["ttl"] = 0  # every session counts as expired
    cfg_path.write_text(json.dumps(doc))
    want_bytes = sum(len(b"loose %d" % i) for i in range(2)) + (await client.app[SERVICES].meta.blob_size("cli/app", m))

    p = _cli(cfg_path, "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    dry = json.loads(p.stdout)
    assert (dry["dry_run"], dry["manifests_deleted"], dry["blobs_deleted"], dry["uploads_deleted"]) == (True, 1, 2, 1)
    assert dry["bytes_reclaimed"] == want_bytes
    for d in [m, *loose]:
        assert await kept(client, "cli/app", d)

    p = _cli(cfg_path, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert f"would delete: 2 blobs, 1 manifests, 1 uploads; {want_bytes} bytes reclaimed" in p.stdout
    assert m in p.stdout and all(d in p.stdout for d in loose)

    p = _cli(cfg_path, "--json")
    assert p.returncode == 0, p.stderr
    done = json.loads(p.stdout)
    assert (done["dry_run"], done["manifests_deleted"], done["blobs_deleted"], done["uploads_deleted"]) == (False, 1, 2, 1)
    assert {(x["kind"], x["digest"]) for x in done["deleted"]} == {(x["kind"], x["digest"]) for x in dry["deleted"]}
    for d in [m, *loose]:
        assert await gone(client, "cli/app", d)
    assert (await client.get("/v2/cli/app/manifests/v1")).status == 200

    p = _cli(cfg_path)
    assert p.returncode == 0, p.stderr
    assert "deleted: 0 blobs, 0 manifests, 0 uploads; 0 bytes reclaimed" in p.stdout


async def test_scheduled_pass_shows_on_metrics(other_client):
    client = await other_client(gc_delay=0, gc_interval=0.05)
    push = Pusher(client)
    await push.blob("gc/metrics", b"collected by the scheduler")
    from tests.test_ops_metrics import scrape
    deadline = time.monotonic() + 20
    while True:
        m = await scrape(client)
        blobs = m.get("registry_gc_deleted_total", {}).get((("kind", "blob"),), 0)
        if blobs >= 1 and m["registry_gc_runs_total"][()] >= 1:
            break
        assert time.monotonic() < deadline, "no scheduled GC pass showed on /metrics within 20s"
        await asyncio.sleep(0.05)
    assert m["registry_gc_reclaimed_bytes_total"][()] >= len(b"collected by the scheduler")
    assert m["registry_gc_duration_seconds_total"][()] > 0
    assert m["registry_gc_deleted_total"][(("kind", "manifest"),)] == 0
    assert m["registry_gc_candidates_pending"][()] == 0
    assert m["registry_gc_last_run_timestamp_seconds"][()] > time.time() - 60
