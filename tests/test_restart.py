"""State that must survive a new process: uploads resume with the true range and a
rebuilt hasher, pushed content stays, and an OCI layout copied under the root is served."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from registry.app import create_app
from tests.conftest import make_config
from tests.helpers import (DIGESTERS, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, REF_NAME, assert_error,
                           sha256, start_upload, stream, with_query)

DATA = bytes((i * 31 + 7) % 256 for i in range(200_000))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(params=["filesystem", "s3"])
def new_app(request, aiohttp_client, root):
    """Each call starts a fresh application (new services, new metadata connection) on the same root;
    for "s3", with the blobs and upload state in the same bucket (a moto server, tests/s3.py)."""
    storage = {"commit": False}
    if request.param == "s3":
        storage["storage_driver"] = request.getfixturevalue("s3").driver(chunksize=5 << 20)

    async def make():
        return await aiohttp_client(create_app(make_config(root, storage=storage)))
    make.on_s3 = request.param == "s3"
    return make


def layout_on_disk(new_app) -> None:
    if new_app.on_s3:
        pytest.skip("imports an OCI layout copied under the root directory at start-up: on S3 the blobs are in "
                    "the bucket, and registry reindex imports them (tests/test_reindex.py)")


@pytest.mark.parametrize("alg", ["sha256", "sha512", "blake3"])
async def test_upload_resumes_after_restart(new_app, alg):
    a = await new_app()
    loc = await start_upload(a, "rs/app")
    r = await a.patch(loc, data=DATA[:70_000], headers={"Content-Range": "0-69999"})
    assert r.status == 202
    await a.close()

    b = await new_app()
    r = await b.get(loc)
    assert r.status == 204
    assert r.headers["Range"] == "0-69999"
    # a chunk that does not continue from the true range is refused with it
    r = await b.patch(loc, data=DATA[:10], headers={"Content-Range": "0-9"})
    await assert_error(r, 416)
    assert r.headers["Range"] == "0-69999"
    r = await b.patch(loc, data=DATA[70_000:150_000], headers={"Content-Range": "70000-149999"})
    assert r.status == 202 and r.headers["Range"] == "0-149999"
    d = DIGESTERS[alg](DATA)
    r = await b.put(with_query(loc, digest=d), data=DATA[150_000:])
    assert r.status == 201, await r.text()
    assert r.headers["Docker-Content-Digest"] == d
    r = await b.get(f"/v2/rs/app/blobs/{d}")
    assert r.status == 200 and await r.read() == DATA


async def test_streamed_upload_resumes_then_put_without_body(new_app):
    a = await new_app()
    loc = await start_upload(a, "rs/stream")
    r = await a.patch(loc, data=stream(DATA[:1000], DATA[1000:100_000]))
    assert r.status == 202 and r.headers["Range"] == "0-99999"
    await a.close()

    b = await new_app()
    r = await b.patch(loc, data=stream(DATA[100_000:]))
    assert r.status == 202 and r.headers["Range"] == f"0-{len(DATA) - 1}"
    r = await b.put(with_query(loc, digest=sha256(DATA)))
    assert r.status == 201, await r.text()
    r = await b.get(f"/v2/rs/stream/blobs/{sha256(DATA)}")
    assert await r.read() == DATA


async def test_resumed_upload_still_checks_digest(new_app):
    a = await new_app()
    loc = await start_upload(a, "rs/check")
    await a.patch(loc, data=DATA[:5000])
    await a.close()

    b = await new_app()
    # the digest of only the bytes sent after the restart must not be accepted
    r = await b.put(with_query(loc, digest=sha256(DATA[5000:10_000])), data=DATA[5000:10_000])
    await assert_error(r, 400, "DIGEST_INVALID")
    await assert_error(await b.head(f"/v2/rs/check/blobs/{sha256(DATA[5000:10_000])}"), 404)
    await assert_error(await b.head(f"/v2/rs/check/blobs/{sha256(DATA[:10_000])}"), 404)


async def test_restart_after_every_chunk(new_app):
    pos, loc = 0, None
    for i, size in enumerate((1, 4095, 50_000, 100_000)):
        c = await new_app()
        if loc is None:
            loc = await start_upload(c, "rs/many")
        r = await c.get(loc)
        assert r.headers["Range"] == f"0-{max(pos - 1, 0)}"
        r = await c.patch(loc, data=DATA[pos:pos + size], headers={"Content-Range": f"{pos}-{pos + size - 1}"})
        assert r.status == 202
        pos += size
        await c.close()
    c = await new_app()
    r = await c.put(with_query(loc, digest=sha256(DATA)), data=DATA[pos:])
    assert r.status == 201
    r = await c.get(f"/v2/rs/many/blobs/{sha256(DATA)}")
    assert r.status == 200 and await r.read() == DATA


async def test_content_survives_restart(new_app):
    from tests.conftest import Pusher
    a = await new_app()
    push = Pusher(a)
    d1, b1 = await push.image("rs/keep", "v1", layers=[b"kept layer"])
    d2, b2 = await push.image("rs/keep", "v2", layers=[b"other layer"])
    assert (await a.delete("/v2/rs/keep/manifests/v2")).status == 202
    await a.close()

    b = await new_app()
    r = await b.get("/v2/rs/keep/manifests/v1")
    assert r.status == 200 and await r.read() == b1
    r = await b.get(f"/v2/rs/keep/manifests/{d2}")
    assert r.status == 200 and await r.read() == b2
    assert (await (await b.get("/v2/rs/keep/tags/list")).json())["tags"] == ["v1"]
    r = await b.get(f"/v2/rs/keep/blobs/{sha256(b'kept layer')}")
    assert await r.read() == b"kept layer"
    assert "rs/keep" in (await (await b.get("/v2/_catalog")).json())["repositories"]


async def test_cancelled_upload_stays_cancelled(new_app):
    a = await new_app()
    loc = await start_upload(a, "rs/cancel")
    await a.patch(loc, data=b"abc")
    assert (await a.delete(loc)).status == 204
    await a.close()
    b = await new_app()
    await assert_error(await b.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")


# -- an OCI layout copied under the root


def build_layout(dest: Path, tags: dict[str, bytes]) -> dict[str, tuple[str, bytes]]:
    """Write an OCI image layout by hand: one image per tag, plus an index tagged 'multi'.
    Returns tag -> (manifest digest, manifest bytes); '_untagged_child' is an index child with no tag."""
    blobs_dir = dest / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)

    def put(data: bytes) -> str:
        d = sha256(data)
        (blobs_dir / d.split(":")[1]).write_bytes(data)
        return d

    entries, out = [], {}
    children = []
    for tag, layer in tags.items():
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": OCI_CONFIG, "digest": put(cfg), "size": len(cfg)},
               "layers": [{"mediaType": OCI_LAYER, "digest": put(layer), "size": len(layer)}]}
        body = json.dumps(doc, indent=1).encode()  # layouts need not be canonical either
        md = put(body)
        out[tag] = (md, body)
        children.append({"mediaType": OCI_MANIFEST, "digest": md, "size": len(body)})
        entries.append({"mediaType": OCI_MANIFEST, "digest": md, "size": len(body),
                        "annotations": {REF_NAME: tag}})
    # a child reachable only through the index, not listed in index.json itself
    cfg = b'{"architecture":"arm64","os":"linux"}'
    layer = b"arm64 layer only in the index"
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": put(cfg), "size": len(cfg)},
           "layers": [{"mediaType": OCI_LAYER, "digest": put(layer), "size": len(layer)}]}
    body = json.dumps(doc).encode()
    out["_untagged_child"] = (put(body), body)
    children.append({"mediaType": OCI_MANIFEST, "digest": sha256(body), "size": len(body),
                     "platform": {"architecture": "arm64", "os": "linux"}})
    index_body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    out["multi"] = (put(index_body), index_body)
    entries.append({"mediaType": OCI_INDEX, "digest": sha256(index_body), "size": len(index_body),
                    "annotations": {REF_NAME: "multi"}})
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return out


async def check_imported(client, repo: str, images: dict[str, tuple[str, bytes]], layers: dict[str, bytes]):
    md, body = images.pop("_untagged_child")
    r = await client.get(f"/v2/{repo}/manifests/{md}")
    assert r.status == 200, await r.text()
    assert await r.read() == body
    r = await client.get(f"/v2/{repo}/blobs/{sha256(b'arm64 layer only in the index')}")
    assert r.status == 200 and await r.read() == b"arm64 layer only in the index"
    r = await client.get(f"/v2/{repo}/tags/list")
    assert r.status == 200, await r.text()
    assert (await r.json())["tags"] == sorted(images)
    for tag, (md, body) in images.items():
        for ref in (tag, md):
            r = await client.get(f"/v2/{repo}/manifests/{ref}")
            assert r.status == 200, await r.text()
            assert await r.read() == body
            assert r.headers["Docker-Content-Digest"] == md
    for tag, layer in layers.items():
        r = await client.get(f"/v2/{repo}/blobs/{sha256(layer)}")
        assert r.status == 200 and await r.read() == layer
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
        r = await client.get(f"/v2/{repo}/blobs/{sha256(cfg)}")
        assert r.status == 200 and await r.read() == cfg
    r = await client.get("/v2/_catalog")
    assert repo in (await r.json())["repositories"]


async def test_copied_layout_is_served_on_fresh_root(new_app, root, tmp_path):
    layout_on_disk(new_app)
    layers = {"v1": b"hello layer one", "v2": b"hello layer two"}
    src = tmp_path / "elsewhere" / "hello"
    images = build_layout(src, layers)
    shutil.copytree(src, root / "imported" / "hello")
    c = await new_app()
    await check_imported(c, "imported/hello", images, layers)
    # and it is a normal repository afterwards
    from tests.conftest import Pusher
    d, body = await Pusher(c).image("imported/hello", "v3")
    r = await c.get("/v2/imported/hello/tags/list")
    assert (await r.json())["tags"] == ["multi", "v1", "v2", "v3"]
    index = json.loads((root / "imported" / "hello" / "index.json").read_bytes())
    assert {m["annotations"][REF_NAME] for m in index["manifests"] if m.get("annotations")} == \
        {"multi", "v1", "v2", "v3"}


async def test_copied_layout_is_served_next_to_existing_data(new_app, root, tmp_path):
    layout_on_disk(new_app)
    from tests.conftest import Pusher
    a = await new_app()
    d, body = await Pusher(a).image("existing/app", "v1")
    await a.close()
    layers = {"latest": b"copied in later"}
    src = tmp_path / "elsewhere" / "copied"
    images = build_layout(src, layers)
    shutil.copytree(src, root / "copied")
    b = await new_app()
    await check_imported(b, "copied", images, layers)
    r = await b.get("/v2/existing/app/manifests/v1")
    assert r.status == 200 and await r.read() == body
    r = await b.get("/v2/_catalog")
    assert (await r.json())["repositories"] == ["copied", "existing/app"]
