"""The scrub part of the metadata contract: SQLite, in-memory and PostgreSQL alike."""
from __future__ import annotations

import time

from registry.meta.base import Ref, ScrubItem, ScrubState
from tests.test_meta_contract import D, FUTURE, manifest, meta  # noqa: F401  (the store fixture)


async def test_checksums_are_recorded_once_per_digest(meta):  # noqa: F811
    assert await meta.checksum_get(D[0]) is None
    await meta.checksum_put(D[0], "a" * 32)
    await meta.checksum_put(D[0], "b" * 32)  # the first one recorded stays
    assert await meta.checksum_get(D[0]) == "a" * 32
    await meta.blob_link("r", D[1], 3, FUTURE, "c" * 32)
    await meta.blob_link("s", D[1], 3, FUTURE, "d" * 32)
    assert await meta.checksum_get(D[1]) == "c" * 32


async def test_items_in_order_with_paging_and_repo_filter(meta):  # noqa: F811
    for repo in ("b", "a"):
        for d in (D[3], D[1], D[2]):
            await meta.blob_link(repo, d, 4, FUTURE)
    await meta.manifest_put("a", manifest(D[9], [Ref(D[1], "blob", 4)]), ["v1"], FUTURE)
    everything = await meta.scrub_items(None, 100)
    want = [("a", "blob", d) for d in (D[1], D[2], D[3])] + [("a", "manifest", D[9])] + \
           [("b", "blob", d) for d in (D[1], D[2], D[3])]
    assert [(i.repo, i.kind, i.digest) for i in everything] == want
    assert everything[0] == ScrubItem("a", "blob", D[1], 4)
    got, after = [], None
    while page := await meta.scrub_items(after, 3):
        got += page
        after = (page[-1].repo, page[-1].kind, page[-1].digest)
    assert got == everything
    assert [i.repo for i in await meta.scrub_items(None, 100, "b")] == ["b"] * 3
    assert await meta.scrub_items(("a", "manifest", D[9]), 100, "a") == []


async def test_mark_stat_reach_and_damaged(meta):  # noqa: F811
    for d in (D[0], D[1]):
        await meta.blob_link("a", d, 5, FUTURE)
    await meta.blob_link("a", D[2], 5, FUTURE)  # no manifest names it
    await meta.manifest_put("a", manifest(D[10], [Ref(D[0], "blob", 5)]), ["v1"], FUTURE)
    await meta.manifest_put("a", manifest(D[11], [Ref(D[1], "blob", 5)]), [], FUTURE)
    await meta.manifest_put("a", manifest(D[12], [Ref(D[10], "manifest", len(manifest(D[10]).payload))]),
                            ["idx"], FUTURE)
    now = time.time()
    await meta.scrub_mark("a", "blob", D[0], "bad bytes", now)
    await meta.scrub_mark("a", "blob", D[2], "file missing", now)
    await meta.scrub_mark("a", "manifest", D[11], "rewritten", now)
    await meta.scrub_mark("nope", "blob", D[0], "ignored", now)  # unknown rows: nothing happens
    assert (await meta.blob_stat("a", D[0])).damaged == "bad bytes"
    assert (await meta.blob_stat("a", D[1])).damaged is None
    reach = {(r.tag, r.kind, r.digest): r.damaged for r in await meta.scrub_reach()}
    assert reach == {("v1", "manifest", D[10]): None, ("v1", "blob", D[0]): "bad bytes",
                     ("idx", "manifest", D[12]): None, ("idx", "manifest", D[10]): None,
                     ("idx", "blob", D[0]): "bad bytes"}
    damaged = [(r.repo, r.tag, r.kind, r.digest, r.damaged) for r in await meta.scrub_damaged()]
    assert damaged == [("a", "", "blob", D[0], "bad bytes"), ("a", "", "blob", D[2], "file missing"),
                       ("a", "", "manifest", D[11], "rewritten")]
    assert await meta.scrub_damaged("b") == []
    assert len(await meta.scrub_damaged("a")) == 3
    # a row removed under a tag's manifest is reported missing
    assert await meta.blob_unlink("a", D[0])
    reach = {(r.tag, r.kind, r.digest): r.damaged for r in await meta.scrub_reach("a")}
    assert reach[("v1", "blob", D[0])] == "blob missing from the repository"
    # clearing a mark (a repair, or a clean pass)
    await meta.scrub_mark("a", "blob", D[2], None, now)
    await meta.scrub_mark("a", "manifest", D[11], None, now)
    assert await meta.scrub_damaged() == []


async def test_state_roundtrip(meta):  # noqa: F811
    assert await meta.scrub_state() == ScrubState(None, None, None)
    s = ScrubState(("a/b", "blob", D[3]), 1000.5, None)
    await meta.scrub_save(s)
    assert await meta.scrub_state() == s
    done = ScrubState(None, None, 2000.25)
    await meta.scrub_save(done)
    assert await meta.scrub_state() == done


async def test_scrub_lock_is_released_after_each_pass(meta):  # noqa: F811
    for _ in range(2):
        async with meta.exclusive("scrub"):
            pass
