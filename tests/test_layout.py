"""Every repository on disk is a valid OCI image layout, kept in step with the API;
and concurrent pushes leave it consistent."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.helpers import (OCI_INDEX, OCI_MANIFEST, REF_NAME, image_doc, sha256, sha512, start_upload, stream,
                           weird_json, with_query)


def on_disk(config) -> Path:  # type: ignore[no-untyped-def]
    """The data directory, for the checks of files on the local disk; on S3 (the "s3" param of
    the config fixture) the same keys are in the bucket instead: tests/test_storage_s3.py."""
    if config.storage.storage_driver.name == "s3":
        pytest.skip("checks files of the OCI layout on the local disk; with S3 storage they are objects "
                    "in the bucket (tests/test_storage_s3.py checks those)")
    return config.root


def read_index(root: Path, repo: str) -> dict:
    doc = json.loads((root / repo / "index.json").read_bytes())
    assert doc["schemaVersion"] == 2
    assert doc.get("mediaType", OCI_INDEX) == OCI_INDEX
    assert isinstance(doc["manifests"], list)
    return doc


def tags_in_index(root: Path, repo: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in read_index(root, repo)["manifests"]:
        tag = (m.get("annotations") or {}).get(REF_NAME)
        if tag is not None:
            assert tag not in out, f"tag {tag} listed twice"
            out[tag] = m["digest"]
    return out


def blob_file(root: Path, repo: str, digest: str) -> Path:
    alg, hexpart = digest.split(":")
    return root / repo / "blobs" / alg / hexpart


def assert_valid_layout(root: Path, repo: str) -> None:
    """oci-layout is right, every descriptor in index.json points at a blob of that size and digest."""
    assert json.loads((root / repo / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    for m in read_index(root, repo)["manifests"]:
        path = blob_file(root, repo, m["digest"])
        data = path.read_bytes()
        assert len(data) == m["size"]
        assert sha256(data) == m["digest"]
        assert json.loads(data).get("mediaType", m["mediaType"]) == m["mediaType"]


def stray_files(root: Path, repo: str) -> list[str]:
    """Temporary or hidden files left in the repository's directories."""
    out = []
    for dirpath, _dirs, files in os.walk(root / repo):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root / repo)
            parts = rel.split(os.sep)
            if name.startswith(".") or "tmp" in name.lower() or name.endswith((".part", ".partial")):
                out.append(rel)
            elif parts[0] == "blobs" and (len(parts) != 3 or parts[1] not in ("sha256", "sha512", "blake3")):
                out.append(rel)
            elif parts[0] != "blobs" and rel not in ("oci-layout", "index.json"):
                out.append(rel)
    return out


async def test_layout_after_pushes(client, push, config):
    root = on_disk(config)
    d1, b1 = await push.image("lay/app", "v1", layers=[b"layer one", b"layer two"])
    d2, b2 = await push.image("lay/app", "v2", layers=[b"layer three"])
    assert (root / "lay" / "app" / "oci-layout").is_file()
    assert tags_in_index(root, "lay/app") == {"v1": d1, "v2": d2}
    assert_valid_layout(root, "lay/app")
    for data in (b"layer one", b"layer two", b"layer three"):
        assert blob_file(root, "lay/app", sha256(data)).read_bytes() == data
    assert blob_file(root, "lay/app", d1).read_bytes() == b1
    assert blob_file(root, "lay/app", d2).read_bytes() == b2
    entry = next(m for m in read_index(root, "lay/app")["manifests"] if m["digest"] == d1)
    assert entry["mediaType"] == OCI_MANIFEST and entry["size"] == len(b1)
    assert stray_files(root, "lay/app") == []


async def test_index_json_follows_tag_changes(client, push, config):
    root = on_disk(config)
    d1, body = await push.image("lay/tags", "v1")
    for t in ("v2", "v3"):
        assert (await client.put(f"/v2/lay/tags/manifests/{t}", data=body,
                                 headers={"Content-Type": OCI_MANIFEST})).status == 201
    assert tags_in_index(root, "lay/tags") == {"v1": d1, "v2": d1, "v3": d1}
    assert (await client.delete("/v2/lay/tags/manifests/v2")).status == 202
    assert tags_in_index(root, "lay/tags") == {"v1": d1, "v3": d1}
    # moving a tag
    d2, _ = await push.image("lay/tags", "v3", layers=[b"new layer"])
    assert tags_in_index(root, "lay/tags") == {"v1": d1, "v3": d2}
    assert_valid_layout(root, "lay/tags")
    # deleting a manifest removes it and its tags
    assert (await client.delete(f"/v2/lay/tags/manifests/{d1}")).status == 202
    assert tags_in_index(root, "lay/tags") == {"v3": d2}
    assert d1 not in {m["digest"] for m in read_index(root, "lay/tags")["manifests"]}
    assert not blob_file(root, "lay/tags", d1).exists()
    assert_valid_layout(root, "lay/tags")
    assert stray_files(root, "lay/tags") == []


async def test_untagged_and_index_manifests_in_layout(client, push, config):
    root = on_disk(config)
    child, child_body = await push.image("lay/multi", None)  # pushed by digest
    idx = weird_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": child, "size": len(child_body)}]})
    r = await client.put("/v2/lay/multi/manifests/multi", data=idx, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201
    tags = tags_in_index(root, "lay/multi")
    assert tags == {"multi": sha256(idx)}
    assert blob_file(root, "lay/multi", sha256(idx)).read_bytes() == idx
    assert blob_file(root, "lay/multi", child).read_bytes() == child_body
    assert_valid_layout(root, "lay/multi")


async def test_blobs_of_every_algorithm_on_disk(client, config):
    root = on_disk(config)
    data = b"stored under its algorithm"
    for d in (sha256(data), sha512(data)):
        assert (await client.post(f"/v2/lay/algs/blobs/uploads/?digest={d}", data=data)).status == 201
        assert blob_file(root, "lay/algs", d).read_bytes() == data
    assert (root / "lay" / "algs" / "oci-layout").is_file()
    assert stray_files(root, "lay/algs") == []


async def test_no_temp_files_after_uploads_of_all_kinds(client, push, config):
    root = on_disk(config)
    data = b"x" * 100_000
    await push.blob("lay/clean", data)
    loc = await start_upload(client, "lay/clean")
    await client.patch(loc, data=stream(data[:5000], data[5000:]))
    assert (await client.put(with_query(loc, digest=sha256(data)))).status == 201
    # a failed upload, a cancelled one, one still in progress
    loc = await start_upload(client, "lay/clean")
    assert (await client.put(with_query(loc, digest=sha256(b"wrong")), data=b"bytes")).status == 400
    loc = await start_upload(client, "lay/clean")
    await client.patch(loc, data=b"cancel me")
    assert (await client.delete(loc)).status == 204
    loc = await start_upload(client, "lay/clean")
    await client.patch(loc, data=b"in progress")
    assert (await client.post(f"/v2/lay/clean/blobs/uploads/?digest={sha256(b'nope')}", data=b"x")).status == 400
    await push.image("lay/clean", "v1")
    assert (await client.delete(f"/v2/lay/clean/blobs/{sha256(data)}")).status == 202
    assert stray_files(root, "lay/clean") == []
    names = {p.name for p in (root / "lay" / "clean" / "blobs" / "sha256").iterdir()}
    assert sha256(b"wrong")[7:] not in names and sha256(b"in progress")[7:] not in names
    assert sha256(data)[7:] not in names
    assert_valid_layout(root, "lay/clean")


async def test_concurrent_tag_moves(client, push, config):
    root = on_disk(config)
    cfg = json.dumps({"os": "linux"}).encode()
    cd = await push.blob("lay/race", cfg)
    ld = await push.blob("lay/race", b"shared layer")
    bodies = [json.dumps(image_doc(cd, len(cfg), [(ld, 12)], annotations={"n": str(i)})).encode()
              for i in range(20)]
    digests = {sha256(b) for b in bodies}
    responses = await asyncio.gather(*(
        client.put("/v2/lay/race/manifests/latest", data=b, headers={"Content-Type": OCI_MANIFEST})
        for b in bodies))
    assert [r.status for r in responses] == [201] * 20
    r = await client.get("/v2/lay/race/manifests/latest")
    assert r.status == 200
    final = r.headers["Docker-Content-Digest"]
    assert final in digests
    assert sha256(await r.read()) == final
    assert tags_in_index(root, "lay/race") == {"latest": final}
    r = await client.get("/v2/lay/race/tags/list")
    assert (await r.json())["tags"] == ["latest"]
    for b in bodies:  # every manifest is still there by digest
        r = await client.get(f"/v2/lay/race/manifests/{sha256(b)}")
        assert r.status == 200 and await r.read() == b
    assert_valid_layout(root, "lay/race")
    assert stray_files(root, "lay/race") == []


async def test_concurrent_tags_on_one_repo(client, push, config):
    """20 different tags at once: index.json ends up with all of them."""
    root = on_disk(config)
    d, body = await push.image("lay/many", "base")
    responses = await asyncio.gather(*(
        client.put(f"/v2/lay/many/manifests/t{i:02d}", data=body, headers={"Content-Type": OCI_MANIFEST})
        for i in range(20)))
    assert all(r.status == 201 for r in responses)
    assert tags_in_index(root, "lay/many") == {"base": d, **{f"t{i:02d}": d for i in range(20)}}


async def test_concurrent_blob_pushes(client, config):
    data = bytes(range(256)) * 1000
    d = sha256(data)
    responses = await asyncio.gather(*(
        client.post(f"/v2/lay/blobrace/blobs/uploads/?digest={d}", data=data) for _ in range(10)))
    assert [r.status for r in responses] == [201] * 10
    r = await client.get(f"/v2/lay/blobrace/blobs/{d}")
    assert await r.read() == data
    assert blob_file(on_disk(config), "lay/blobrace", d).read_bytes() == data
    assert stray_files(config.root, "lay/blobrace") == []


async def test_concurrent_chunks_to_one_session(client):
    """Two chunks claiming the same offset: exactly one lands, the other is told the true range."""
    loc = await start_upload(client, "lay/session")
    chunks = [bytes([65 + i]) * 1000 for i in range(2)]
    responses = await asyncio.gather(*(
        client.patch(loc, data=c, headers={"Content-Range": "0-999"}) for c in chunks))
    statuses = sorted(r.status for r in responses)
    assert statuses == [202, 416]
    loser = next(r for r in responses if r.status == 416)
    assert loser.headers["Range"] == "0-999"
    r = await client.get(loc)
    assert r.headers["Range"] == "0-999"
    winner = next(c for c, r in zip(chunks, responses) if r.status == 202)
    assert (await client.put(with_query(loc, digest=sha256(winner)))).status == 201
