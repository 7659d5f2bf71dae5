"""GET /v2/, and blob GET/HEAD/DELETE with ranges (end-1, end-2, end-10)."""
from __future__ import annotations

import pytest

from tests.helpers import assert_error, sha256

BLOB = bytes(range(256)) * 40  # 10240 bytes, every byte value
N = len(BLOB)


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
async def test_version_check(client, path):
    r = await client.get(path)
    assert r.status == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_version_header_on_errors_too(client):
    r = await client.get("/v2/nope/tags/list")
    assert r.status == 404
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_get_blob(client, push):
    d = await push.blob("lib/blobs", BLOB)
    r = await client.get(f"/v2/lib/blobs/blobs/{d}")
    assert r.status == 200
    assert await r.read() == BLOB
    assert r.headers["Docker-Content-Digest"] == d
    assert int(r.headers["Content-Length"]) == N


async def test_head_blob(client, push):
    d = await push.blob("lib/blobs", BLOB)
    r = await client.head(f"/v2/lib/blobs/blobs/{d}")
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == d
    assert int(r.headers["Content-Length"]) == N
    assert await r.read() == b""


async def test_empty_blob(client, push):
    d = await push.blob("lib/empty", b"")
    r = await client.get(f"/v2/lib/empty/blobs/{d}")
    assert r.status == 200 and await r.read() == b""
    assert r.headers["Docker-Content-Digest"] == d == sha256(b"")
    r = await client.head(f"/v2/lib/empty/blobs/{d}")
    assert r.status == 200 and r.headers["Content-Length"] == "0"


@pytest.mark.parametrize("spec,start,end", [
    ("bytes=0-0", 0, 0),
    ("bytes=0-99", 0, 99),
    ("bytes=1000-2047", 1000, 2047),
    ("bytes=10000-", 10000, N - 1),
    ("bytes=-50", N - 50, N - 1),
    ("bytes=10200-99999", 10200, N - 1),  # end past the blob is clipped
    (f"bytes={N - 1}-{N - 1}", N - 1, N - 1),
])
async def test_range_request(client, push, spec, start, end):
    d = await push.blob("lib/ranges", BLOB)
    r = await client.get(f"/v2/lib/ranges/blobs/{d}", headers={"Range": spec})
    assert r.status == 206
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/{N}"
    body = await r.read()
    assert body == BLOB[start:end + 1]
    assert int(r.headers["Content-Length"]) == end - start + 1


@pytest.mark.parametrize("spec", [f"bytes={N}-", f"bytes={N}-{N + 100}", "bytes=99999-100000"])
async def test_range_unsatisfiable(client, push, spec):
    d = await push.blob("lib/ranges", BLOB)
    r = await client.get(f"/v2/lib/ranges/blobs/{d}", headers={"Range": spec})
    assert r.headers["Content-Range"] == f"bytes */{N}"
    await assert_error(r, 416)  # an error like any other: the spec's JSON body


@pytest.mark.parametrize("spec", ["bytes=junk", "bytes=5-1", "bytes=0-1,3-4", "items=0-1"])
async def test_range_malformed(client, push, spec):
    """A malformed Range is either ignored (200, whole blob) or refused with a JSON 416."""
    d = await push.blob("lib/ranges", BLOB)
    r = await client.get(f"/v2/lib/ranges/blobs/{d}", headers={"Range": spec})
    if r.status == 200:
        assert await r.read() == BLOB
    else:
        await assert_error(r, 416)


async def test_unknown_blob(client, push):
    await push.blob("lib/known", b"something")
    d = sha256(b"never pushed")
    await assert_error(await client.get(f"/v2/lib/known/blobs/{d}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.head(f"/v2/lib/known/blobs/{d}"), 404)
    await assert_error(await client.get(f"/v2/no/such/repo/blobs/{d}"), 404, "BLOB_UNKNOWN")


async def test_blob_not_visible_from_other_repo(client, push):
    d = await push.blob("lib/one", b"private bytes")
    await assert_error(await client.get(f"/v2/lib/two/blobs/{d}"), 404, "BLOB_UNKNOWN")
    await push.blob("lib/two", b"other bytes")
    await assert_error(await client.get(f"/v2/lib/two/blobs/{d}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.head(f"/v2/lib/two/blobs/{d}"), 404)


async def test_delete_blob(client, push):
    d = await push.blob("lib/del", BLOB)
    r = await client.delete(f"/v2/lib/del/blobs/{d}")
    assert r.status == 202
    await assert_error(await client.get(f"/v2/lib/del/blobs/{d}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.head(f"/v2/lib/del/blobs/{d}"), 404)
    await assert_error(await client.delete(f"/v2/lib/del/blobs/{d}"), 404, "BLOB_UNKNOWN")
    # it can be pushed again afterwards
    assert await push.blob("lib/del", BLOB) == d
    r = await client.get(f"/v2/lib/del/blobs/{d}")
    assert r.status == 200 and await r.read() == BLOB


async def test_delete_blob_keeps_other_repos_copy(client, push):
    d = await push.blob("lib/a", BLOB)
    assert await push.blob("lib/b", BLOB) == d
    assert (await client.delete(f"/v2/lib/a/blobs/{d}")).status == 202
    r = await client.get(f"/v2/lib/b/blobs/{d}")
    assert r.status == 200 and await r.read() == BLOB


@pytest.mark.parametrize("digest", [
    "sha256:xyz",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha512:" + "a" * 64,
    "md5:" + "a" * 32,
    "nocolon",
    "sha256:",
    ":" + "a" * 64,
])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_malformed_digest(client, push, digest, method):
    await push.blob("lib/x", b"x")
    r = await client.request(method, f"/v2/lib/x/blobs/{digest}")
    await assert_error(r, 400, "DIGEST_INVALID")


async def test_version_check_head(client):
    r = await client.head("/v2/")
    assert r.status == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize("repo", ["x/blobs", "x/blobs/uploads", "x/manifests/y", "x/tags/list", "referrers",
                                  "blobs/uploads/blobs", "v2/v2", "a_b/manifests"])
async def test_repo_names_that_look_like_routes(client, push, repo):
    """Names are matched greedily; a name containing route words must still work everywhere."""
    md, body = await push.image(repo, "v1", layers=[BLOB])
    r = await client.get(f"/v2/{repo}/manifests/v1")
    assert r.status == 200 and await r.read() == body
    r = await client.get(f"/v2/{repo}/blobs/{sha256(BLOB)}")
    assert r.status == 200 and await r.read() == BLOB
    r = await client.get(f"/v2/{repo}/tags/list")
    assert (await r.json()) == {"name": repo, "tags": ["v1"]}
    r = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status == 202
    loc = r.headers["Location"]
    assert (await client.get(loc)).status == 204
    d = sha256(b"more")
    assert (await client.put(f"{loc}?digest={d}", data=b"more")).status == 201
    r = await client.get(f"/v2/{repo}/referrers/{md}")
    assert r.status == 200
    assert repo in (await (await client.get("/v2/_catalog")).json())["repositories"]


@pytest.mark.parametrize("sendfile", [False, True])
async def test_large_blob_whole_and_in_ranges_either_way(aiohttp_client, config, sendfile):
    """Whole blobs over 64 KiB go out as 1 MiB copies, or with sendfile (http.sendfile);
    either way every byte, the headers, and ranges across the copy's chunk borders."""
    from tests.conftest import Pusher
    from registry.app import create_app
    cfg = config.replace(http={"sendfile": sendfile})
    client = await aiohttp_client(create_app(cfg))
    push = Pusher(client)
    data = bytes(range(251)) * (10 * 1024 + 17)  # ~2.5 MiB, not a multiple of 1 MiB
    d = await push.blob("lib/large", data)
    r = await client.get(f"/v2/lib/large/blobs/{d}")
    assert r.status == 200
    assert await r.read() == data
    assert r.headers["Docker-Content-Digest"] == d and int(r.headers["Content-Length"]) == len(data)
    etag = r.headers["ETag"]
    for start, end in ((0, (1 << 20) + 5), ((1 << 20) - 3, (2 << 20) + 3), (len(data) - 10, len(data) - 1)):
        # A download resumed with the whole response's validator gets the rest, not a new copy.
        r = await client.get(f"/v2/lib/large/blobs/{d}", headers={"Range": f"bytes={start}-{end}",
                                                                  "If-Range": etag})
        assert r.status == 206
        assert await r.read() == data[start:end + 1]


async def test_large_blob_file_shorter_than_recorded_is_cut_not_padded(aiohttp_client, tmp_path):
    """A damaged (truncated) file on disk is never completed with made-up bytes: the response
    is cut short, so the client sees an incomplete body and its digest check fails loudly."""
    import aiohttp
    from tests.conftest import Pusher, make_config
    from registry.app import create_app
    client = await aiohttp_client(create_app(make_config(tmp_path / "data", storage={"commit": False})))
    data = bytes(range(256)) * 8192  # 2 MiB
    d = await Pusher(client).blob("lib/cut", data)
    path = next((tmp_path / "data").rglob(d.split(":", 1)[1]))
    with open(path, "r+b") as f:
        f.truncate(len(data) - 1000)
    r = await client.get(f"/v2/lib/cut/blobs/{d}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.read()
