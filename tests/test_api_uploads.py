"""Blob uploads: POST, monolithic, streamed and chunked PATCH, status, PUT, cancel (end-4..6, end-13)."""
from __future__ import annotations

import re
import uuid

import pytest

from tests.helpers import assert_pullable, assert_error, sha256, start_upload, stream, with_query

DATA = bytes((i * 7 + 3) % 251 for i in range(3000))




def assert_created(r, repo: str, digest: str) -> None:
    assert r.status == 201
    assert r.headers["Docker-Content-Digest"] == digest
    assert r.headers["Location"].endswith(f"/v2/{repo}/blobs/{digest}")


async def test_post_starts_session(client):
    r = await client.post("/v2/up/a/blobs/uploads/")
    assert r.status == 202
    loc = r.headers["Location"]
    uid = r.headers["Docker-Upload-UUID"]
    assert uid and loc.endswith(uid) and loc.startswith("/v2/up/a/blobs/uploads/")
    assert r.headers["Range"] == "0-0"
    r2 = await client.post("/v2/up/a/blobs/uploads/")
    assert r2.headers["Docker-Upload-UUID"] != uid


async def test_post_without_trailing_slash(client):
    r = await client.post("/v2/up/a/blobs/uploads")
    assert r.status == 202 and r.headers["Location"]


async def test_monolithic_post(client):
    d = sha256(DATA)
    r = await client.post(f"/v2/up/mono/blobs/uploads/?digest={d}", data=DATA,
                          headers={"Content-Type": "application/octet-stream"})
    assert_created(r, "up/mono", d)
    await assert_pullable(client, "up/mono", d, DATA)


async def test_monolithic_post_streamed_body(client):
    d = sha256(DATA)
    r = await client.post(f"/v2/up/mono/blobs/uploads/?digest={d}", data=stream(DATA[:100], DATA[100:]))
    assert_created(r, "up/mono", d)
    await assert_pullable(client, "up/mono", d, DATA)


async def test_monolithic_post_digest_mismatch(client):
    wrong = sha256(b"other")
    r = await client.post(f"/v2/up/mono/blobs/uploads/?digest={wrong}", data=DATA)
    await assert_error(r, 400, "DIGEST_INVALID")
    await assert_error(await client.head(f"/v2/up/mono/blobs/{wrong}"), 404)
    await assert_error(await client.head(f"/v2/up/mono/blobs/{sha256(DATA)}"), 404)


async def test_post_then_put_whole_body(client):
    loc = await start_upload(client, "up/two")
    d = sha256(DATA)
    r = await client.put(with_query(loc, digest=d), data=DATA)
    assert_created(r, "up/two", d)
    await assert_pullable(client, "up/two", d, DATA)


async def test_streamed_patch_without_content_range(client):
    loc = await start_upload(client, "up/stream")
    r = await client.patch(loc, data=stream(DATA[:1000], DATA[1000:1001], DATA[1001:]))
    assert r.status == 202
    assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert r.headers["Range"] == f"0-{len(DATA) - 1}"
    assert r.headers["Location"] == loc or r.headers["Location"].endswith(loc)
    d = sha256(DATA)
    r = await client.put(with_query(r.headers["Location"], digest=d))
    assert_created(r, "up/stream", d)
    await assert_pullable(client, "up/stream", d, DATA)


async def test_two_streamed_patches_then_put_without_body(client):
    loc = await start_upload(client, "up/stream")
    r = await client.patch(loc, data=stream(DATA[:1234]))
    assert r.status == 202 and r.headers["Range"] == "0-1233"
    r = await client.patch(r.headers["Location"], data=stream(DATA[1234:]))
    assert r.status == 202 and r.headers["Range"] == f"0-{len(DATA) - 1}"
    d = sha256(DATA)
    assert_created(await client.put(with_query(r.headers["Location"], digest=d)), "up/stream", d)
    await assert_pullable(client, "up/stream", d, DATA)


async def test_chunked_patch_with_content_range(client):
    loc = await start_upload(client, "up/chunks")
    pos = 0
    for size in (1, 999, 1000, 1000):
        chunk = DATA[pos:pos + size]
        r = await client.patch(loc, data=chunk, headers={
            "Content-Range": f"{pos}-{pos + size - 1}", "Content-Type": "application/octet-stream"})
        assert r.status == 202, await r.text()
        pos += size
        assert r.headers["Range"] == f"0-{pos - 1}"
        assert r.headers["Docker-Upload-UUID"]
        loc = r.headers["Location"]
    assert pos == len(DATA)
    d = sha256(DATA)
    assert_created(await client.put(with_query(loc, digest=d)), "up/chunks", d)
    await assert_pullable(client, "up/chunks", d, DATA)


async def test_put_with_final_chunk(client):
    loc = await start_upload(client, "up/final")
    r = await client.patch(loc, data=DATA[:2000], headers={"Content-Range": "0-1999"})
    assert r.status == 202
    d = sha256(DATA)
    r = await client.put(with_query(r.headers["Location"], digest=d), data=DATA[2000:],
                         headers={"Content-Range": f"2000-{len(DATA) - 1}"})
    assert_created(r, "up/final", d)
    await assert_pullable(client, "up/final", d, DATA)


async def test_upload_status(client):
    loc = await start_upload(client, "up/status")
    r = await client.get(loc)
    assert r.status == 204
    assert r.headers["Range"] == "0-0"
    assert r.headers["Docker-Upload-UUID"] in loc
    await client.patch(loc, data=DATA[:500], headers={"Content-Range": "0-499"})
    r = await client.get(loc)
    assert r.status == 204
    assert r.headers["Range"] == "0-499"
    assert r.headers["Location"].endswith(loc)


async def test_out_of_order_chunk_is_416_with_true_range(client):
    loc = await start_upload(client, "up/ooo")
    r = await client.patch(loc, data=DATA[:100], headers={"Content-Range": "0-99"})
    assert r.status == 202
    # a chunk that skips ahead
    r = await client.patch(loc, data=DATA[200:300], headers={"Content-Range": "200-299"})
    await assert_error(r, 416)
    assert r.headers["Range"] == "0-99"
    # a chunk that was already received (a retry)
    r = await client.patch(loc, data=DATA[:100], headers={"Content-Range": "0-99"})
    await assert_error(r, 416)
    assert r.headers["Range"] == "0-99"
    # an overlapping chunk
    r = await client.patch(loc, data=DATA[50:150], headers={"Content-Range": "50-149"})
    await assert_error(r, 416)
    assert r.headers["Range"] == "0-99"
    # nothing changed: the status and the rest of the upload still work
    r = await client.get(loc)
    assert r.status == 204 and r.headers["Range"] == "0-99"
    r = await client.patch(loc, data=DATA[100:], headers={"Content-Range": f"100-{len(DATA) - 1}"})
    assert r.status == 202 and r.headers["Range"] == f"0-{len(DATA) - 1}"
    d = sha256(DATA)
    assert_created(await client.put(with_query(loc, digest=d)), "up/ooo", d)
    await assert_pullable(client, "up/ooo", d, DATA)


async def test_first_chunk_not_at_zero_is_416(client):
    loc = await start_upload(client, "up/ooo")
    r = await client.patch(loc, data=DATA[10:20], headers={"Content-Range": "10-19"})
    await assert_error(r, 416)
    assert "Range" in r.headers
    r = await client.get(loc)
    assert r.status == 204 and r.headers["Range"] == "0-0"


@pytest.mark.parametrize("content_range", ["abc", "5-2", "bytes", "-", "0-", "1-2-3", "0-9/x", "0 - 9", "0-4"])
async def test_malformed_content_range(client, content_range):
    loc = await start_upload(client, "up/badrange")
    r = await client.patch(loc, data=DATA[:10], headers={"Content-Range": content_range})
    assert 400 <= r.status < 500
    await assert_error(r, r.status)
    r = await client.get(loc)
    assert r.status == 204 and r.headers["Range"] == "0-0"


async def test_cancel_upload(client):
    loc = await start_upload(client, "up/cancel")
    await client.patch(loc, data=DATA[:10], headers={"Content-Range": "0-9"})
    r = await client.delete(loc)
    assert r.status == 204
    await assert_error(await client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.patch(loc, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.put(with_query(loc, digest=sha256(DATA[:10]))), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.delete(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.head(f"/v2/up/cancel/blobs/{sha256(DATA[:10])}"), 404)


async def test_put_digest_mismatch(client):
    loc = await start_upload(client, "up/mismatch")
    await client.patch(loc, data=DATA, headers={"Content-Range": f"0-{len(DATA) - 1}"})
    wrong = sha256(DATA + b"!")
    await assert_error(await client.put(with_query(loc, digest=wrong)), 400, "DIGEST_INVALID")
    await assert_error(await client.head(f"/v2/up/mismatch/blobs/{wrong}"), 404)
    await assert_error(await client.head(f"/v2/up/mismatch/blobs/{sha256(DATA)}"), 404)
    await assert_error(await client.get(f"/v2/up/mismatch/blobs/{wrong}"), 404, "BLOB_UNKNOWN")


async def test_put_digest_mismatch_with_final_body(client):
    loc = await start_upload(client, "up/mismatch")
    wrong = sha256(b"not this")
    await assert_error(await client.put(with_query(loc, digest=wrong), data=DATA), 400, "DIGEST_INVALID")
    await assert_error(await client.head(f"/v2/up/mismatch/blobs/{wrong}"), 404)
    await assert_error(await client.head(f"/v2/up/mismatch/blobs/{sha256(DATA)}"), 404)


@pytest.mark.parametrize("query", ["", "?digest=", "?digest=sha256:zz", "?digest=foo:" + "a" * 64])
async def test_put_without_valid_digest(client, query):
    loc = await start_upload(client, "up/nodigest")
    await client.patch(loc, data=DATA[:10])
    await assert_error(await client.put(loc + query), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("upload_id", [uuid.uuid4().hex, "not-an-upload", "0" * 32, "A" * 32])
async def test_unknown_upload_id(client, upload_id):
    loc = f"/v2/up/unknown/blobs/uploads/{upload_id}"
    await assert_error(await client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.patch(loc, data=b"abc"), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.patch(loc, data=b"abc", headers={"Content-Range": "0-2"}),
                       404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.put(with_query(loc, digest=sha256(b"abc"))), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.put(with_query(loc, digest=sha256(b"abc")), data=b"abc"),
                       404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.delete(loc), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_upload_id_under_other_repo(client):
    loc = await start_upload(client, "up/owner")
    upload_id = loc.rsplit("/", 1)[1]
    other = f"/v2/up/thief/blobs/uploads/{upload_id}"
    await assert_error(await client.get(other), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.patch(other, data=b"abc"), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.put(with_query(other, digest=sha256(b"abc")), data=b"abc"),
                       404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.delete(other), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.head(f"/v2/up/thief/blobs/{sha256(b'abc')}"), 404)
    # the real owner's session is untouched
    r = await client.get(loc)
    assert r.status == 204 and r.headers["Range"] == "0-0"
    d = sha256(DATA)
    assert_created(await client.put(with_query(loc, digest=d), data=DATA), "up/owner", d)
    await assert_pullable(client, "up/owner", d, DATA)


async def test_session_is_gone_after_completion(client):
    loc = await start_upload(client, "up/done")
    d = sha256(DATA)
    assert_created(await client.put(with_query(loc, digest=d), data=DATA), "up/done", d)
    await assert_error(await client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.patch(loc, data=b"more"), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_empty_upload(client):
    loc = await start_upload(client, "up/empty")
    d = sha256(b"")
    assert_created(await client.put(with_query(loc, digest=d)), "up/empty", d)
    await assert_pullable(client, "up/empty", d, b"")


async def test_same_blob_pushed_twice(client):
    d = sha256(DATA)
    for _ in range(2):
        loc = await start_upload(client, "up/twice")
        assert_created(await client.put(with_query(loc, digest=d), data=DATA), "up/twice", d)
    await assert_pullable(client, "up/twice", d, DATA)


async def test_large_blob_streamed(client):
    """Several MiB in odd-sized pieces, to cross the storage layer's batching."""
    big = bytes(range(256)) * (5 * 4096 + 3)
    pieces = [big[i:i + 300_001] for i in range(0, len(big), 300_001)]
    loc = await start_upload(client, "up/large")
    r = await client.patch(loc, data=stream(*pieces))
    assert r.status == 202 and r.headers["Range"] == f"0-{len(big) - 1}"
    d = sha256(big)
    assert_created(await client.put(with_query(r.headers["Location"], digest=d)), "up/large", d)
    await assert_pullable(client, "up/large", d, big)
    assert re.fullmatch(r"[0-9]+", (await client.head(f"/v2/up/large/blobs/{d}")).headers["Content-Length"])


async def test_streamed_chunk_with_content_range(client):
    """Content-Range on a chunked-encoded body (no Content-Length) is checked against the offset only."""
    loc = await start_upload(client, "up/mixed")
    r = await client.patch(loc, data=stream(DATA[:10], DATA[10:1000]), headers={"Content-Range": "0-999"})
    assert r.status == 202 and r.headers["Range"] == "0-999"
    r = await client.patch(loc, data=stream(DATA[1000:]), headers={"Content-Range": f"1000-{len(DATA) - 1}"})
    assert r.status == 202 and r.headers["Range"] == f"0-{len(DATA) - 1}"
    d = sha256(DATA)
    assert_created(await client.put(with_query(loc, digest=d)), "up/mixed", d)
    await assert_pullable(client, "up/mixed", d, DATA)


async def test_content_range_with_bytes_prefix(client):
    loc = await start_upload(client, "up/prefix")
    r = await client.patch(loc, data=DATA[:100], headers={"Content-Range": "bytes 0-99/*"})
    assert r.status == 202 and r.headers["Range"] == "0-99"
    r = await client.patch(loc, data=DATA[100:], headers={"Content-Range": f"bytes=100-{len(DATA) - 1}/{len(DATA)}"})
    assert r.status == 202 and r.headers["Range"] == f"0-{len(DATA) - 1}"
