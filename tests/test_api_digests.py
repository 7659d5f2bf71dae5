"""sha512 and blake3 digests for blobs (monolithic, chunked) and manifests; cross-repo mount (end-11)."""
from __future__ import annotations

import json

import pytest

from tests.helpers import (assert_pullable, OCI_MANIFEST, DIGESTERS, assert_error, b3, image_doc, sha256, sha512, start_upload,
                           stream, weird_json, with_query)

DATA = b"digest algorithms " * 500
ALGS = ["sha256", "sha512", "blake3"]




def test_blake3_helper_is_blake3():
    # the published test vector for the empty input
    assert b3(b"") == "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


@pytest.mark.parametrize("alg", ALGS)
async def test_monolithic(client, alg):
    d = DIGESTERS[alg](DATA)
    r = await client.post(f"/v2/alg/mono/blobs/uploads/?digest={d}", data=DATA)
    assert r.status == 201, await r.text()
    assert r.headers["Docker-Content-Digest"] == d
    await assert_pullable(client, "alg/mono", d, DATA)


@pytest.mark.parametrize("alg", ALGS)
async def test_chunked(client, alg):
    d = DIGESTERS[alg](DATA)
    loc = await start_upload(client, "alg/chunked")
    r = await client.patch(loc, data=DATA[:1000], headers={"Content-Range": "0-999"})
    assert r.status == 202
    r = await client.patch(r.headers["Location"], data=stream(DATA[1000:5000]))
    assert r.status == 202 and r.headers["Range"] == "0-4999"
    r = await client.put(with_query(r.headers["Location"], digest=d), data=DATA[5000:])
    assert r.status == 201, await r.text()
    assert r.headers["Docker-Content-Digest"] == d
    await assert_pullable(client, "alg/chunked", d, DATA)


@pytest.mark.parametrize("alg", ALGS)
async def test_chunked_mismatch(client, alg):
    wrong = DIGESTERS[alg](DATA + b"x")
    loc = await start_upload(client, "alg/bad")
    await client.patch(loc, data=DATA)
    await assert_error(await client.put(with_query(loc, digest=wrong)), 400, "DIGEST_INVALID")
    await assert_error(await client.head(f"/v2/alg/bad/blobs/{wrong}"), 404)


@pytest.mark.parametrize("alg", ["sha512", "blake3"])
async def test_monolithic_mismatch(client, alg):
    wrong = DIGESTERS[alg](b"other")
    await assert_error(await client.post(f"/v2/alg/bad/blobs/uploads/?digest={wrong}", data=DATA),
                       400, "DIGEST_INVALID")
    await assert_error(await client.head(f"/v2/alg/bad/blobs/{wrong}"), 404)


async def test_same_content_under_several_algorithms(client):
    for alg in ALGS:
        d = DIGESTERS[alg](DATA)
        assert (await client.post(f"/v2/alg/multi/blobs/uploads/?digest={d}", data=DATA)).status == 201
    for alg in ALGS:
        await assert_pullable(client, "alg/multi", DIGESTERS[alg](DATA), DATA)


@pytest.mark.parametrize("alg", ["sha512", "blake3"])
async def test_manifest_by_digest(client, push, alg):
    cfg = b'{"architecture":"arm64","os":"linux"}'
    layer = b"layer for " + alg.encode()
    # the layers themselves are addressed with the same algorithm
    cd, ld = DIGESTERS[alg](cfg), DIGESTERS[alg](layer)
    for data, d in ((cfg, cd), (layer, ld)):
        assert (await client.post(f"/v2/alg/man/blobs/uploads/?digest={d}", data=data)).status == 201
    body = weird_json(image_doc(cd, len(cfg), [(ld, len(layer))]))
    md = DIGESTERS[alg](body)
    r = await client.put(f"/v2/alg/man/manifests/{md}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201, await r.text()
    assert r.headers["Docker-Content-Digest"] == md
    assert r.headers["Location"].endswith(f"/v2/alg/man/manifests/{md}")
    r = await client.get(f"/v2/alg/man/manifests/{md}", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200
    assert await r.read() == body
    assert r.headers["Docker-Content-Digest"] == md
    assert r.headers["Content-Type"] == OCI_MANIFEST
    r = await client.head(f"/v2/alg/man/manifests/{md}")
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(body)
    # the wrong digest of the same algorithm is refused
    other = DIGESTERS[alg](body + b" ")
    r = await client.put(f"/v2/alg/man/manifests/{other}", data=body, headers={"Content-Type": OCI_MANIFEST})
    await assert_error(r, 400, "DIGEST_INVALID")
    await assert_error(await client.get(f"/v2/alg/man/manifests/{other}"), 404, "MANIFEST_UNKNOWN")
    # and it can be deleted by that digest
    assert (await client.delete(f"/v2/alg/man/manifests/{md}")).status == 202
    await assert_error(await client.get(f"/v2/alg/man/manifests/{md}"), 404, "MANIFEST_UNKNOWN")


# -- mount


async def test_mount_from_repo_holding_blob(client, push):
    d = await push.blob("src/repo", DATA)
    r = await client.post(f"/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo")
    assert r.status == 201, await r.text()
    assert r.headers["Docker-Content-Digest"] == d
    assert r.headers["Location"].endswith(f"/v2/dst/repo/blobs/{d}")
    await assert_pullable(client, "dst/repo", d, DATA)
    # the mount is independent of the source afterwards
    assert (await client.delete(f"/v2/src/repo/blobs/{d}")).status == 202
    await assert_pullable(client, "dst/repo", d, DATA)


@pytest.mark.parametrize("alg", ["sha512", "blake3"])
async def test_mount_other_algorithms(client, alg):
    d = DIGESTERS[alg](DATA)
    assert (await client.post(f"/v2/src/alg/blobs/uploads/?digest={d}", data=DATA)).status == 201
    r = await client.post(f"/v2/dst/alg/blobs/uploads/?mount={d}&from=src/alg")
    assert r.status == 201
    await assert_pullable(client, "dst/alg", d, DATA)


async def test_mount_when_source_lacks_blob_starts_upload(client, push):
    await push.blob("src/repo", b"something else")
    d = sha256(DATA)
    r = await client.post(f"/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo")
    assert r.status == 202
    loc = r.headers["Location"]
    assert "/v2/dst/repo/blobs/uploads/" in loc and r.headers["Docker-Upload-UUID"]
    await assert_error(await client.head(f"/v2/dst/repo/blobs/{d}"), 404)
    # it is a normal session
    r = await client.put(with_query(loc, digest=d), data=DATA)
    assert r.status == 201
    await assert_pullable(client, "dst/repo", d, DATA)


@pytest.mark.parametrize("source", ["Bad/Name", "a..b", "", "no/such/repo", "-x"])
async def test_mount_from_invalid_or_unknown_source_starts_upload(client, push, source):
    d = await push.blob("src/repo", DATA)
    r = await client.post(with_query(f"/v2/dst/repo/blobs/uploads/?mount={d}", **{"from": source}))
    assert r.status == 202, await r.text()
    assert r.headers["Location"] and r.headers["Docker-Upload-UUID"]
    await assert_error(await client.head(f"/v2/dst/repo/blobs/{d}"), 404)


@pytest.mark.parametrize("mount", ["junk", "sha256:abc", ""])
async def test_mount_with_bad_digest_starts_upload(client, push, mount):
    await push.blob("src/repo", DATA)
    r = await client.post(with_query("/v2/dst/repo/blobs/uploads/", mount=mount, **{"from": "src/repo"}))
    assert r.status == 202, await r.text()
    assert r.headers["Location"]


async def test_mount_without_from(client, push):
    d = await push.blob("holder/repo", DATA)
    r = await client.post(f"/v2/dst/nofrom/blobs/uploads/?mount={d}")
    assert r.status == 201, await r.text()
    assert r.headers["Docker-Content-Digest"] == d
    await assert_pullable(client, "dst/nofrom", d, DATA)


async def test_mount_without_from_unknown_digest(client, push):
    await push.blob("holder/repo", DATA)
    r = await client.post(f"/v2/dst/nofrom/blobs/uploads/?mount={sha256(b'nobody has this')}")
    assert r.status == 202 and r.headers["Location"]


async def test_mount_of_manifest_digest(client, push):
    """Mounting a digest the source holds only as a manifest: either a 201 serving exactly
    the manifest's bytes, or a 202 upload session; never wrong content."""
    md, body = await push.image("src/man", "v1")
    r = await client.post(f"/v2/dst/man/blobs/uploads/?mount={md}&from=src/man")
    assert r.status in (201, 202)
    if r.status == 201:
        await assert_pullable(client, "dst/man", md, body)


async def test_mounted_blob_usable_in_manifest(client, push):
    cfg = json.dumps({"os": "linux"}).encode()
    cd = await push.blob("src/img", cfg)
    ld = await push.blob("src/img", DATA)
    for d in (cd, ld):
        assert (await client.post(f"/v2/dst/img/blobs/uploads/?mount={d}&from=src/img")).status == 201
    md, body = await push.manifest("dst/img", "v1", image_doc(cd, len(cfg), [(ld, len(DATA))]))
    r = await client.get("/v2/dst/img/manifests/v1")
    assert r.status == 200 and await r.read() == body


def test_sha512_helper():
    assert sha512(b"").startswith("sha512:cf83e1357eefb8bd")
