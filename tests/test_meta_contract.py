"""One contract for every metadata store: SQLite, in-memory and PostgreSQL run
the same tests, concurrency included."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest

from registry.config import PostgresConfig
from registry.meta.base import BadReferences, Manifest, MetaStore, Ref

D = [f"sha256:{i:064x}" for i in range(1, 200)]
FUTURE = time.time() + 3600


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def meta(request, tmp_path) -> AsyncIterator[MetaStore]:
    if request.param == "sqlite":
        from registry.meta.sqlite import SQLiteMeta
        store: MetaStore = SQLiteMeta(tmp_path / "meta.sqlite", durable=False)
    elif request.param == "memory":
        from registry.meta.memory import MemoryMeta
        store = MemoryMeta()
    else:
        from registry.meta.postgres import PostgresMeta
        dsn = request.getfixturevalue("pg_dsn")
        store = PostgresMeta(PostgresConfig(dsn=dsn, schema=request.getfixturevalue("pg_schema"), pool_size=8))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def manifest(digest: str, refs: list[Ref] = (), subject: str | None = None, artifact_type: str | None = None,
             media_type: str = "application/vnd.oci.image.manifest.v1+json") -> Manifest:
    payload = f'{{"d":"{digest}"}}'.encode()
    return Manifest(digest=digest, media_type=media_type, size=len(payload), payload=payload, subject=subject,
                    artifact_type=artifact_type, annotations={"k": "v"} if subject else None, refs=list(refs))


async def test_blob_link_size_unlink(meta):
    assert await meta.blob_size("a", D[0]) is None
    await meta.blob_link("a", D[0], 10, FUTURE)
    await meta.blob_link("a", D[0], 10, FUTURE)  # idempotent
    assert await meta.blob_size("a", D[0]) == 10
    assert await meta.blob_size("b", D[0]) is None
    assert await meta.blob_holder(D[0]) == ("a", 10)
    assert await meta.blob_holder(D[1]) is None
    assert await meta.repo_exists("a") and not await meta.repo_exists("b")
    assert await meta.blob_unlink("a", D[0]) is True
    assert await meta.blob_unlink("a", D[0]) is False
    assert await meta.blob_size("a", D[0]) is None


async def test_manifest_put_checks_references(meta):
    m = manifest(D[10], [Ref(D[0], "blob", 5), Ref(D[1], "blob", 7)])
    with pytest.raises(BadReferences) as exc:
        await meta.manifest_put("a", m, ["v1"], FUTURE)
    assert sorted(exc.value.missing) == [D[0], D[1]]
    assert await meta.manifest_get("a", D[10]) is None
    await meta.blob_link("a", D[0], 5, FUTURE)
    await meta.blob_link("a", D[1], 8, FUTURE)
    with pytest.raises(BadReferences) as exc:
        await meta.manifest_put("a", m, ["v1"], FUTURE)
    assert exc.value.missing == [] and len(exc.value.wrong_size) == 1
    await meta.blob_link("b", D[1], 7, FUTURE)  # another repository's blob does not count
    with pytest.raises(BadReferences):
        await meta.manifest_put("a", m, ["v1"], FUTURE)
    assert await meta.tags("a", None, None) == []


async def test_manifest_roundtrip_tags_and_delete(meta):
    await meta.blob_link("a", D[0], 5, FUTURE)
    m = manifest(D[10], [Ref(D[0], "blob", 5)])
    await meta.manifest_put("a", m, ["v1", "latest"], FUTURE)
    await meta.manifest_put("a", m, ["v1"], FUTURE)  # idempotent
    got = await meta.manifest_get("a", "v1")
    assert got is not None and got.digest == D[10] and got.payload == m.payload and got.size == m.size
    assert (await meta.manifest_get("a", D[10])).media_type == m.media_type
    assert await meta.blob_size("a", D[10]) == m.size  # manifests are blobs too
    assert await meta.tags("a", None, None) == ["latest", "v1"]
    assert await meta.tag_delete("a", "latest") is True
    assert await meta.tag_delete("a", "latest") is False
    assert await meta.manifest_get("a", D[10]) is not None
    assert await meta.manifest_delete("a", D[10]) is True
    assert await meta.manifest_delete("a", D[10]) is False
    assert await meta.manifest_get("a", "v1") is None
    assert await meta.tags("a", None, None) == []
    assert await meta.tags("nope", None, None) is None


async def test_index_children_and_layout_entries(meta):
    await meta.blob_link("a", D[0], 5, FUTURE)
    child1, child2 = manifest(D[11], [Ref(D[0], "blob", 5)]), manifest(D[12], [Ref(D[0], "blob", 5)])
    await meta.manifest_put("a", child1, [], FUTURE)
    await meta.manifest_put("a", child2, [], FUTURE)
    index = manifest(D[13], [Ref(D[11], "manifest", child1.size), Ref(D[12], "manifest", child2.size)],
                     media_type="application/vnd.oci.image.index.v1+json")
    with pytest.raises(BadReferences):
        await meta.manifest_put("a", manifest(D[14], [Ref(D[99], "manifest", 1)]), [], FUTURE)
    await meta.manifest_put("a", index, ["multi"], FUTURE)
    lone = manifest(D[15], [Ref(D[0], "blob", 5)])
    await meta.manifest_put("a", lone, [], FUTURE)
    entries = await meta.layout_entries("a")
    assert [(e.tag, e.digest) for e in entries] == [(None, D[15]), ("multi", D[13])]


async def test_tag_pagination_and_catalog(meta):
    await meta.blob_link("a", D[0], 5, FUTURE)
    m = manifest(D[10], [Ref(D[0], "blob", 5)])
    tags = ["b", "A", "a", "a-1", "Z", "_x", "0"]
    await meta.manifest_put("a", m, tags, FUTURE)
    assert await meta.tags("a", None, None) == sorted(tags)  # bytewise order
    assert await meta.tags("a", 2, None) == sorted(tags)[:2]
    assert await meta.tags("a", 3, sorted(tags)[1]) == sorted(tags)[2:5]
    assert await meta.tags("a", 0, None) == []
    for name in ["team/b", "team/a", "x", "team/a/api"]:
        await meta.blob_link(name, D[0], 5, FUTURE)
    every = await meta.catalog(None, None)
    assert every == sorted(["a", "team/a", "team/a/api", "team/b", "x"])
    assert await meta.catalog(2, "team/a") == ["team/a/api", "team/b"]


async def test_referrers(meta):
    await meta.blob_link("a", D[0], 5, FUTURE)
    await meta.manifest_put("a", manifest(D[20], [Ref(D[0], "blob", 5)], subject=D[30], artifact_type="x/sig"),
                            [], FUTURE)
    await meta.manifest_put("a", manifest(D[21], [Ref(D[0], "blob", 5)], subject=D[30], artifact_type="x/sbom"),
                            [], FUTURE)
    await meta.manifest_put("a", manifest(D[22], [Ref(D[0], "blob", 5)], subject=D[31]), [], FUTURE)
    assert {m.digest for m in await meta.referrers("a", D[30], None)} == {D[20], D[21]}
    [sig] = await meta.referrers("a", D[30], "x/sig")
    assert sig.digest == D[20] and sig.annotations == {"k": "v"}
    assert await meta.referrers("a", D[32], None) == []
    assert await meta.referrers("b", D[30], None) == []


async def test_layout_generation(meta):
    await meta.blob_link("a", D[0], 5, FUTURE)
    g0 = await meta.layout_generation("a")
    await meta.manifest_put("a", manifest(D[10], [Ref(D[0], "blob", 5)]), ["v1"], FUTURE)
    g1 = await meta.layout_generation("a")
    assert g1 > g0 and "a" in await meta.layout_stale()
    await meta.layout_synced("a", g1)
    assert "a" not in await meta.layout_stale()
    await meta.tag_delete("a", "v1")
    assert await meta.layout_generation("a") > g1 and "a" in await meta.layout_stale()
    await meta.layout_synced("a", g0)  # never moves back
    await meta.layout_synced("a", await meta.layout_generation("a"))
    assert await meta.layout_stale() == []


async def test_upload_sessions(meta):
    await meta.upload_create("u1", "a")
    up = await meta.upload_get("u1")
    assert up is not None and up.repo == "a" and up.size == 0
    assert await meta.upload_set_size("u1", 0, 100) is True
    assert await meta.upload_set_size("u1", 0, 50) is False  # compare-and-set
    assert (await meta.upload_get("u1")).size == 100
    assert await meta.upload_delete("u1") is True
    assert await meta.upload_delete("u1") is False
    assert await meta.upload_get("u1") is None


async def test_concurrent_tag_moves_end_on_one(meta):
    await meta.blob_link("a", D[0], 5, FUTURE)
    ms = [manifest(D[50 + i], [Ref(D[0], "blob", 5)]) for i in range(30)]
    await asyncio.gather(*(meta.manifest_put("a", m, ["hot"], FUTURE) for m in ms))
    got = await meta.manifest_get("a", "hot")
    assert got is not None and got.digest in {m.digest for m in ms}
    assert await meta.tags("a", None, None) == ["hot"]


async def test_concurrent_cas_has_one_winner(meta):
    await meta.upload_create("u", "a")
    results = await asyncio.gather(*(meta.upload_set_size("u", 0, i + 1) for i in range(20)))
    assert results.count(True) == 1
    assert (await meta.upload_get("u")).size == results.index(True) + 1


async def test_concurrent_first_use_of_a_repository(meta):
    await asyncio.gather(*(meta.blob_link("new/repo", D[i], i, FUTURE) for i in range(1, 40)))
    assert await meta.catalog(None, None) == ["new/repo"]
    assert all([await meta.blob_size("new/repo", D[i]) == i for i in range(1, 40)])
