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


async def test_digest_held_by_blob_or_manifest_rows(meta):
    assert not await meta.digest_held(D[30])
    await meta.blob_link("held/a", D[30], 3, FUTURE)
    assert await meta.digest_held(D[30])
    await meta.manifest_put("held/b", manifest(D[31]), [], FUTURE)
    assert await meta.digest_held(D[31]) and await meta.blob_holder(D[31]) is None
    await meta.blob_unlink("held/a", D[30])
    await meta.manifest_delete("held/b", D[31])
    assert not await meta.digest_held(D[30]) and not await meta.digest_held(D[31])


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


async def test_layout_rewrite_covers_what_it_read(meta):
    await meta.blob_link("a", D[0], 5, FUTURE)
    await meta.manifest_put("a", manifest(D[10], [Ref(D[0], "blob", 5)]), ["v1"], FUTURE)
    assert "a" in await meta.layout_stale()
    async with meta.layout_rewrite("a") as entries:
        assert [(e.tag, e.digest) for e in entries] == [("v1", D[10])]
    assert await meta.layout_stale() == []
    # A rewrite that fails keeps the repository stale.
    await meta.tag_delete("a", "v1")
    with pytest.raises(RuntimeError):
        async with meta.layout_rewrite("a") as entries:
            assert [(e.tag, e.digest) for e in entries] == [(None, D[10])]
            raise RuntimeError("index.json could not be written")
    assert await meta.layout_stale() == ["a"]
    # A change committed after the rewrite read its entries is not covered by it.
    async with meta.layout_rewrite("a") as entries:
        await meta.manifest_put("a", manifest(D[11], [Ref(D[0], "blob", 5)]), ["v2"], FUTURE)
    assert await meta.layout_stale() == ["a"]
    async with meta.layout_rewrite("a") as entries:
        assert [(e.tag, e.digest) for e in entries] == [(None, D[10]), ("v2", D[11])]
    assert await meta.layout_stale() == []


async def test_layout_rewrites_exclude_each_other(meta):
    """Two rewrites of one repository never overlap (across processes: an advisory lock on
    PostgreSQL, a file lock on SQLite); other repositories are not held up."""
    await meta.blob_link("a", D[0], 5, FUTURE)
    inside, order = 0, []

    async def rewrite(repo: str, n: int) -> None:
        nonlocal inside
        async with meta.layout_rewrite(repo):
            if repo == "a":
                inside += 1
                assert inside == 1
            order.append((repo, n))
            await asyncio.sleep(0.02)
            if repo == "a":
                inside -= 1
    await asyncio.gather(*(rewrite("a", i) for i in range(4)), rewrite("b", 0))
    assert len(order) == 5


async def test_concurrent_lookups_each_get_their_own_answer(meta):
    """Many lookups at once (on PostgreSQL they share statements: meta/pg_batch.py), mixed
    kinds, hits and misses: each caller gets exactly the answer for its own key."""
    expect_tags: dict[str, list[str]] = {}
    expect_manifest: dict[tuple[str, str], str] = {}
    for r, repo in enumerate(["a", "team/b", "team/b/c"]):
        await meta.blob_link(repo, D[r], 5 + r, FUTURE)
        for i in range(6):
            digest = D[20 + 10 * r + i]
            tags = [f"t{i}", f"x{i}"] if i % 2 else [f"t{i}"]
            await meta.manifest_put(repo, manifest(digest, [Ref(D[r], "blob", 5 + r)]), tags, FUTURE)
            expect_manifest[(repo, digest)] = digest
            for t in tags:
                expect_manifest[(repo, t)] = digest
        expect_tags[repo] = sorted(f"{p}{i}" for i in range(6) for p in ("t", "x") if p == "t" or i % 2)

    async def check(k: int) -> None:
        repo = ["a", "team/b", "team/b/c", "nope"][k % 4]
        r = ["a", "team/b", "team/b/c"].index(repo) if repo != "nope" else 0
        kind = (k // 4) % 4
        if kind == 0:
            ref = [f"t{k % 7}", f"x{k % 7}", D[20 + 10 * r + k % 7]][k % 3]
            m = await meta.manifest_get(repo, ref)
            want = expect_manifest.get((repo, ref))
            assert (m.digest if m else None) == want, (repo, ref)
        elif kind == 1:
            st = await meta.blob_stat(repo, D[r])
            assert (st.size if st else None) == (None if repo == "nope" else 5 + r)
            st = await meta.blob_stat(repo, D[20 + 10 * r])  # a manifest counts, with its size
            assert (st is not None) == (repo != "nope")
        elif kind == 2:
            n, last = [None, 2, 5][k % 3], ["", "t1", "x3"][k % 3]
            got = await meta.tags(repo, n, last or None)
            if repo == "nope":
                assert got is None
            else:
                want = [t for t in expect_tags[repo] if t > last]
                assert got == (want if n is None else want[:n]), (repo, n, last)
        else:
            assert await meta.blob_size(repo, D[r]) == (None if repo == "nope" else 5 + r)

    await asyncio.gather(*(check(k) for k in range(400)))
    await meta.tag_delete("a", "t0")  # and a change is seen by the next lookups
    assert await meta.manifest_get("a", "t0") is None
    assert "t0" not in await meta.tags("a", None, None)


async def test_touch_postpones_queued_rows_and_says_whether_they_exist(meta):
    now = time.time()
    await meta.blob_link("a", D[0], 5, now + 10)
    await meta.blob_link("a", D[1], 5, now + 10)
    await meta.manifest_put("a", manifest(D[10], [Ref(D[0], "blob", 5)]), [], now + 10)
    # Many at once (one transaction on PostgreSQL), hits and misses mixed.
    got = await asyncio.gather(*[meta.touch(repo, kind, d, now + 100) for repo, kind, d in [
        ("a", "blob", D[0]), ("a", "blob", D[1]), ("a", "blob", D[2]), ("b", "blob", D[0]),
        ("a", "manifest", D[10]), ("a", "manifest", D[11]), ("a", "manifest", D[0])] * 5])
    assert got == [True, True, False, False, True, False, False] * 5
    assert (await meta.blob_stat("a", D[0])).review_after == now + 100
    assert (await meta.manifest_get("a", D[10])).review_after == now + 100
    assert await meta.touch("a", "blob", D[0], now + 50) is True  # never moved back
    assert (await meta.blob_stat("a", D[0])).review_after == now + 100
    assert await meta.blob_unlink("a", D[1])
    assert await meta.touch("a", "blob", D[1], now + 200) is False  # gone: the caller answers 404


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
