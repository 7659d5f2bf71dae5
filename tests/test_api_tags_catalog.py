"""Tags list (end-8a/8b) and the catalog, with n/last pagination and Link headers."""
from __future__ import annotations

import json

import pytest

from tests.helpers import OCI_MANIFEST, assert_error, next_link

TAGS = ["v10", "v2", "V1", "a", "b-1", "latest", "1.0", "_x", "Z", "v1.0.0-rc.1", "b_1", "b.1", "0"]


async def tag_all(client, push, repo: str, tags: list[str]) -> None:
    _, body = await push.image(repo, tags[0])
    for t in tags[1:]:
        r = await client.put(f"/v2/{repo}/manifests/{t}", data=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status == 201


async def walk(client, url: str) -> tuple[list[str], int]:
    """Follow Link rel=next to the end; returns every item seen and the number of pages."""
    items, pages = [], 0
    key = "tags" if "/tags/list" in url else "repositories"
    while url is not None:
        r = await client.get(url)
        assert r.status == 200, await r.text()
        page = (await r.json())[key]
        items += page
        pages += 1
        url = next_link(r)
        assert pages < 100, "pagination does not terminate"
    return items, pages


async def test_tags_lexical(client, push):
    await tag_all(client, push, "t/lex", TAGS)
    r = await client.get("/v2/t/lex/tags/list")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/json")
    doc = await r.json()
    assert doc == {"name": "t/lex", "tags": sorted(TAGS)}
    assert "Link" not in r.headers


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12])
async def test_tags_pagination_walks_every_tag_once(client, push, n):
    await tag_all(client, push, "t/page", TAGS)
    items, pages = await walk(client, f"/v2/t/page/tags/list?n={n}")
    assert items == sorted(TAGS)
    assert pages == -(-len(TAGS) // n)


async def test_tags_page_sizes_and_link(client, push):
    await tag_all(client, push, "t/link", TAGS)
    expected = sorted(TAGS)
    r = await client.get("/v2/t/link/tags/list?n=4")
    assert (await r.json())["tags"] == expected[:4]
    link = r.headers["Link"]
    assert 'rel="next"' in link
    assert next_link(r).startswith("/v2/t/link/tags/list?")
    assert "n=4" in next_link(r)


async def test_tags_n_equal_to_count_has_no_link(client, push):
    await tag_all(client, push, "t/exact", TAGS)
    r = await client.get(f"/v2/t/exact/tags/list?n={len(TAGS)}")
    assert (await r.json())["tags"] == sorted(TAGS)
    assert "Link" not in r.headers
    r = await client.get(f"/v2/t/exact/tags/list?n={len(TAGS) + 10}")
    assert (await r.json())["tags"] == sorted(TAGS)
    assert "Link" not in r.headers


async def test_tags_last(client, push):
    await tag_all(client, push, "t/last", TAGS)
    expected = sorted(TAGS)
    r = await client.get("/v2/t/last/tags/list?last=b-1")
    assert (await r.json())["tags"] == [t for t in expected if t > "b-1"]
    r = await client.get("/v2/t/last/tags/list?n=2&last=b-1")
    assert (await r.json())["tags"] == [t for t in expected if t > "b-1"][:2]
    r = await client.get("/v2/t/last/tags/list?last=zzz")
    assert (await r.json())["tags"] == []
    assert "Link" not in r.headers
    # last need not be an existing tag
    r = await client.get("/v2/t/last/tags/list?last=c")
    assert (await r.json())["tags"] == [t for t in expected if t > "c"]


async def test_tags_n_zero(client, push):
    await tag_all(client, push, "t/zero", TAGS)
    r = await client.get("/v2/t/zero/tags/list?n=0")
    assert r.status == 200, await r.text()
    assert (await r.json())["tags"] == []


async def test_tags_unknown_repo(client, push):
    await push.image("t/exists", "v1")
    await assert_error(await client.get("/v2/t/unknown/tags/list"), 404, "NAME_UNKNOWN")
    await assert_error(await client.get("/v2/t/unknown/tags/list?n=2"), 404, "NAME_UNKNOWN")


async def test_tags_repo_without_tags(client, push):
    await push.blob("t/untagged", b"only a blob")
    r = await client.get("/v2/t/untagged/tags/list")
    assert r.status == 200 and (await r.json())["tags"] == []


@pytest.mark.parametrize("n", ["abc", "-1", "1.5", "1e3", "0x10", " ", "²", "١", "99999999999999999999999999x"])
async def test_tags_bad_n(client, push, n):
    await push.image("t/badn", "v1")
    from urllib.parse import quote
    r = await client.get(f"/v2/t/badn/tags/list?n={quote(n)}")
    assert 400 <= r.status < 500, await r.text()
    await assert_error(r, r.status)


async def test_tags_huge_n_is_fine(client, push):
    await tag_all(client, push, "t/hugen", TAGS[:3])
    r = await client.get("/v2/t/hugen/tags/list?n=99999999999999999999")
    assert r.status == 200
    assert (await r.json())["tags"] == sorted(TAGS[:3])


async def test_deleted_tag_leaves_list(client, push):
    await tag_all(client, push, "t/del", ["a", "b", "c"])
    assert (await client.delete("/v2/t/del/manifests/b")).status == 202
    r = await client.get("/v2/t/del/tags/list")
    assert (await r.json())["tags"] == ["a", "c"]


# -- catalog

REPOS = ["a", "a/b", "a-b", "b", "c/d/e", "z", "m/n", "a/b/c", "a_b"]


async def test_catalog(client, push):
    for repo in REPOS:
        await push.blob(repo, b"x")
    r = await client.get("/v2/_catalog")
    assert r.status == 200
    assert (await r.json())["repositories"] == sorted(REPOS)
    assert "Link" not in r.headers


async def test_catalog_empty(client):
    r = await client.get("/v2/_catalog")
    assert r.status == 200 and (await r.json()) == {"repositories": []}


@pytest.mark.parametrize("n", [1, 2, 4, 9])
async def test_catalog_pagination(client, push, n):
    for repo in REPOS:
        await push.blob(repo, b"x")
    items, pages = await walk(client, f"/v2/_catalog?n={n}")
    assert items == sorted(REPOS)
    assert pages == -(-len(REPOS) // n)


async def test_catalog_link_and_last(client, push):
    for repo in REPOS:
        await push.blob(repo, b"x")
    r = await client.get("/v2/_catalog?n=3")
    assert (await r.json())["repositories"] == sorted(REPOS)[:3]
    link = next_link(r)
    assert link is not None and link.startswith("/v2/_catalog?") and 'rel="next"' in r.headers["Link"]
    r = await client.get("/v2/_catalog?last=a/b")
    assert (await r.json())["repositories"] == [x for x in sorted(REPOS) if x > "a/b"]


async def test_catalog_n_zero(client, push):
    await push.blob("cat/zero", b"x")
    r = await client.get("/v2/_catalog?n=0")
    assert r.status == 200, await r.text()
    assert (await r.json())["repositories"] == []


@pytest.mark.parametrize("n", ["abc", "-3", "²"])
async def test_catalog_bad_n(client, n):
    from urllib.parse import quote
    r = await client.get(f"/v2/_catalog?n={quote(n)}")
    assert 400 <= r.status < 500, await r.text()
    await assert_error(r, r.status)


async def test_catalog_json_shape(client, push):
    await push.image("cat/img", "v1")
    r = await client.get("/v2/_catalog")
    doc = json.loads(await r.read())
    assert list(doc) == ["repositories"] and doc["repositories"] == ["cat/img"]
