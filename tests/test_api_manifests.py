"""Manifests: PUT/GET/HEAD/DELETE for every supported type, validation, size limit (end-3, end-7, end-9)."""
from __future__ import annotations

import json

import pytest

from tests.helpers import (DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
                           assert_error, image_doc, sha256, weird_json)

MiB = 1 << 20


async def put_raw(client, repo: str, ref: str, body: bytes, media_type: str | None):
    headers = {"Content-Type": media_type} if media_type else {}
    return await client.put(f"/v2/{repo}/manifests/{ref}", data=body, headers=headers)


async def blobs_for_image(push, repo: str, tag: str = "") -> tuple[str, int, str, int]:
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
    layer = b"layer bytes " + repo.encode() + tag.encode()
    return await push.blob(repo, cfg), len(cfg), await push.blob(repo, layer), len(layer)


async def assert_served(client, repo: str, ref: str, body: bytes, media_type: str) -> None:
    digest = sha256(body)
    r = await client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": media_type})
    assert r.status == 200, await r.text()
    assert await r.read() == body
    assert r.headers["Content-Type"] == media_type
    assert r.headers["Docker-Content-Digest"] == digest
    r = await client.head(f"/v2/{repo}/manifests/{ref}", headers={"Accept": media_type})
    assert r.status == 200
    assert r.headers["Content-Type"] == media_type
    assert r.headers["Docker-Content-Digest"] == digest
    assert int(r.headers["Content-Length"]) == len(body)
    assert await r.read() == b""


async def put_ok(client, repo: str, ref: str, body: bytes, media_type: str | None) -> str:
    r = await put_raw(client, repo, ref, body, media_type)
    assert r.status == 201, await r.text()
    digest = sha256(body) if ":" not in ref or ref.startswith("sha256:") else ref
    assert r.headers["Docker-Content-Digest"] == digest
    assert r.headers["Location"].endswith(f"/v2/{repo}/manifests/{digest}")
    return digest


# -- each manifest type, bytes exactly as pushed


async def test_oci_image_manifest(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/oci")
    body = weird_json(image_doc(cd, cs, [(ld, ls)], annotations={"b": "2", "a": "1"}))
    assert json.dumps(json.loads(body)).encode() != body  # really non-canonical
    digest = await put_ok(client, "m/oci", "v1", body, OCI_MANIFEST)
    await assert_served(client, "m/oci", "v1", body, OCI_MANIFEST)
    await assert_served(client, "m/oci", digest, body, OCI_MANIFEST)


async def test_oci_image_manifest_by_digest(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/bydigest")
    body = weird_json(image_doc(cd, cs, [(ld, ls)]))
    digest = await put_ok(client, "m/bydigest", sha256(body), body, OCI_MANIFEST)
    await assert_served(client, "m/bydigest", digest, body, OCI_MANIFEST)
    r = await client.get("/v2/m/bydigest/tags/list")
    assert r.status == 200 and (await r.json())["tags"] == []


async def test_oci_image_index(client, push):
    children = []
    for arch in ("amd64", "arm64"):
        cd, cs, ld, ls = await blobs_for_image(push, "m/index", arch)
        child = weird_json(image_doc(cd, cs, [(ld, ls)]))
        await put_ok(client, "m/index", sha256(child), child, OCI_MANIFEST)
        children.append({"mediaType": OCI_MANIFEST, "digest": sha256(child), "size": len(child),
                         "platform": {"architecture": arch, "os": "linux"}})
    body = weird_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children})
    digest = await put_ok(client, "m/index", "multi", body, OCI_INDEX)
    await assert_served(client, "m/index", "multi", body, OCI_INDEX)
    await assert_served(client, "m/index", digest, body, OCI_INDEX)


async def test_oci_index_without_mediatype_field_uses_content_type(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/index2")
    child = json.dumps(image_doc(cd, cs, [(ld, ls)])).encode()
    await put_ok(client, "m/index2", "child", child, OCI_MANIFEST)
    body = weird_json({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256(child), "size": len(child)}]})
    await put_ok(client, "m/index2", "idx", body, OCI_INDEX)
    await assert_served(client, "m/index2", "idx", body, OCI_INDEX)


async def test_docker_schema2_manifest(client, push):
    cfg = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    layer = b"\x1f\x8b docker layer"
    cd, ld = await push.blob("m/docker", cfg), await push.blob("m/docker", layer)
    body = weird_json({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                       "config": {"mediaType": DOCKER_CONFIG, "size": len(cfg), "digest": cd},
                       "layers": [{"mediaType": DOCKER_LAYER, "size": len(layer), "digest": ld}]})
    digest = await put_ok(client, "m/docker", "latest", body, DOCKER_MANIFEST)
    await assert_served(client, "m/docker", "latest", body, DOCKER_MANIFEST)
    await assert_served(client, "m/docker", digest, body, DOCKER_MANIFEST)


async def test_docker_manifest_list(client, push):
    cfg = b'{"architecture":"amd64","os":"linux"}'
    layer = b"docker layer for list"
    cd, ld = await push.blob("m/dlist", cfg), await push.blob("m/dlist", layer)
    child = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                        "config": {"mediaType": DOCKER_CONFIG, "size": len(cfg), "digest": cd},
                        "layers": [{"mediaType": DOCKER_LAYER, "size": len(layer), "digest": ld}]}).encode()
    await put_ok(client, "m/dlist", sha256(child), child, DOCKER_MANIFEST)
    body = weird_json({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "size": len(child), "digest": sha256(child),
         "platform": {"architecture": "amd64", "os": "linux"}}]})
    digest = await put_ok(client, "m/dlist", "latest", body, DOCKER_LIST)
    await assert_served(client, "m/dlist", "latest", body, DOCKER_LIST)
    await assert_served(client, "m/dlist", digest, body, DOCKER_LIST)


async def test_repush_same_manifest_is_idempotent(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/again")
    body = weird_json(image_doc(cd, cs, [(ld, ls)]))
    for _ in range(3):
        await put_ok(client, "m/again", "v1", body, OCI_MANIFEST)
    await put_ok(client, "m/again", sha256(body), body, OCI_MANIFEST)
    await assert_served(client, "m/again", "v1", body, OCI_MANIFEST)


async def test_tag_moves_to_new_manifest(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/move")
    one = weird_json(image_doc(cd, cs, [(ld, ls)], annotations={"n": "1"}))
    two = weird_json(image_doc(cd, cs, [(ld, ls)], annotations={"n": "2"}))
    await put_ok(client, "m/move", "latest", one, OCI_MANIFEST)
    await put_ok(client, "m/move", "latest", two, OCI_MANIFEST)
    await assert_served(client, "m/move", "latest", two, OCI_MANIFEST)
    await assert_served(client, "m/move", sha256(one), one, OCI_MANIFEST)  # still there by digest


async def test_content_type_with_parameters(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/params")
    body = weird_json(image_doc(cd, cs, [(ld, ls)]))
    await put_ok(client, "m/params", "v1", body, OCI_MANIFEST + "; charset=utf-8")
    r = await client.get("/v2/m/params/manifests/v1")
    assert r.headers["Content-Type"].split(";")[0] == OCI_MANIFEST


# -- validation


async def test_put_by_wrong_digest(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/wrong")
    body = weird_json(image_doc(cd, cs, [(ld, ls)]))
    wrong = sha256(body + b"\n")
    await assert_error(await put_raw(client, "m/wrong", wrong, body, OCI_MANIFEST), 400, "DIGEST_INVALID")
    await assert_error(await client.get(f"/v2/m/wrong/manifests/{wrong}"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.get(f"/v2/m/wrong/manifests/{sha256(body)}"), 404, "MANIFEST_UNKNOWN")


async def test_missing_layer(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/missing")
    missing = sha256(b"never uploaded")
    body = json.dumps(image_doc(cd, cs, [(ld, ls), (missing, 14)])).encode()
    await assert_error(await put_raw(client, "m/missing", "v1", body, OCI_MANIFEST), 404, "MANIFEST_BLOB_UNKNOWN")
    await assert_error(await client.get("/v2/m/missing/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_missing_config(client, push):
    _, _, ld, ls = await blobs_for_image(push, "m/missing")
    body = json.dumps(image_doc(sha256(b"no config"), 9, [(ld, ls)])).encode()
    await assert_error(await put_raw(client, "m/missing", "v1", body, OCI_MANIFEST), 404, "MANIFEST_BLOB_UNKNOWN")


async def test_layer_in_other_repo_only(client, push):
    cd, cs, _, _ = await blobs_for_image(push, "m/here")
    other = await push.blob("m/elsewhere", b"layer elsewhere")
    body = json.dumps(image_doc(cd, cs, [(other, 15)])).encode()
    await assert_error(await put_raw(client, "m/here", "v1", body, OCI_MANIFEST), 404, "MANIFEST_BLOB_UNKNOWN")


async def test_index_with_missing_child(client, push):
    await push.blob("m/idxmissing", b"anything")  # the repo exists
    child = sha256(b"no such manifest")
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": child, "size": 100}]}).encode()
    await assert_error(await put_raw(client, "m/idxmissing", "v1", body, OCI_INDEX), 404, "MANIFEST_BLOB_UNKNOWN")


async def test_docker_list_with_missing_child(client, push):
    await push.blob("m/dlmissing", b"anything")
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": sha256(b"no such"), "size": 10}]}).encode()
    await assert_error(await put_raw(client, "m/dlmissing", "v1", body, DOCKER_LIST), 404, "MANIFEST_BLOB_UNKNOWN")


def _valid_doc(cd: str, cs: int, ld: str, ls: int) -> dict:
    return image_doc(cd, cs, [(ld, ls)])


@pytest.mark.parametrize("case", [
    "not json", "json array", "json string", "truncated", "unknown media type", "unknown content type",
    "schemaVersion 1", "schemaVersion missing", "schemaVersion string", "content-type disagrees",
    "index content-type for image", "config missing", "config not object", "layers not list",
    "layer without digest", "layer with bad digest", "layer negative size", "layer size string",
    "annotations not strings", "no media type at all", "manifests not list", "subject not object",
    "invalid utf8", "empty body",
])
async def test_invalid_manifest(client, push, case):
    cd, cs, ld, ls = await blobs_for_image(push, "m/invalid")
    doc = _valid_doc(cd, cs, ld, ls)
    ctype = OCI_MANIFEST
    body: bytes | None = None
    if case == "not json":
        body = b"this is { not json"
    elif case == "json array":
        body = json.dumps([doc]).encode()
    elif case == "json string":
        body = b'"manifest"'
    elif case == "truncated":
        body = json.dumps(doc).encode()[:-5]
    elif case == "unknown media type":
        doc["mediaType"] = ctype = "application/vnd.example.unknown+json"
    elif case == "unknown content type":
        del doc["mediaType"]
        ctype = "application/vnd.example.unknown+json"
    elif case == "schemaVersion 1":
        doc["schemaVersion"] = 1
    elif case == "schemaVersion missing":
        del doc["schemaVersion"]
    elif case == "schemaVersion string":
        doc["schemaVersion"] = "2"
    elif case == "content-type disagrees":
        ctype = DOCKER_MANIFEST
    elif case == "index content-type for image":
        ctype = OCI_INDEX
    elif case == "config missing":
        del doc["config"]
    elif case == "config not object":
        doc["config"] = "sha256:abc"
    elif case == "layers not list":
        doc["layers"] = {"0": doc["layers"][0]}
    elif case == "layer without digest":
        del doc["layers"][0]["digest"]
    elif case == "layer with bad digest":
        doc["layers"][0]["digest"] = "sha256:nothex"
    elif case == "layer negative size":
        doc["layers"][0]["size"] = -1
    elif case == "layer size string":
        doc["layers"][0]["size"] = str(ls)
    elif case == "annotations not strings":
        doc["annotations"] = {"a": 1}
    elif case == "no media type at all":
        del doc["mediaType"]
        ctype = None
    elif case == "manifests not list":
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}
        ctype = OCI_INDEX
    elif case == "subject not object":
        doc["subject"] = "sha256:" + "a" * 64
    elif case == "invalid utf8":
        body = json.dumps(doc).encode()[:-1] + b', "x": "\xff\xfe"}'
    elif case == "empty body":
        body = b""
    if body is None:
        body = json.dumps(doc).encode()
    r = await put_raw(client, "m/invalid", "v1", body, ctype)
    await assert_error(r, 400, "MANIFEST_INVALID")
    await assert_error(await client.get("/v2/m/invalid/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_wrong_layer_size_is_rejected(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/size")
    body = json.dumps(image_doc(cd, cs, [(ld, ls + 1)])).encode()
    r = await put_raw(client, "m/size", "v1", body, OCI_MANIFEST)
    assert r.status == 400
    await assert_error(r, 400)


@pytest.mark.parametrize("tag", ["-leading-dash", ".dot", "x" * 129, "has space", "tag/slash"])
async def test_invalid_tag(client, push, tag):
    cd, cs, ld, ls = await blobs_for_image(push, "m/tags")
    body = json.dumps(_valid_doc(cd, cs, ld, ls)).encode()
    r = await client.put(f"/v2/m/tags/manifests/{tag.replace(' ', '%20')}", data=body,
                         headers={"Content-Type": OCI_MANIFEST})
    assert 400 <= r.status < 500
    await assert_error(r, r.status)


async def test_longest_tag_accepted(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/tags")
    body = json.dumps(_valid_doc(cd, cs, ld, ls)).encode()
    tag = "T" + "x" * 127
    await put_ok(client, "m/tags", tag, body, OCI_MANIFEST)
    await assert_served(client, "m/tags", tag, body, OCI_MANIFEST)


def _padded(cd: str, cs: int, ld: str, ls: int, total: int) -> bytes:
    doc = image_doc(cd, cs, [(ld, ls)], annotations={"pad": ""})
    base = len(json.dumps(doc).encode())
    doc["annotations"]["pad"] = "p" * (total - base)
    body = json.dumps(doc).encode()
    assert len(body) == total
    return body


async def test_manifest_of_exactly_4mib(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/big")
    body = _padded(cd, cs, ld, ls, 4 * MiB)
    await put_ok(client, "m/big", "big", body, OCI_MANIFEST)
    await assert_served(client, "m/big", "big", body, OCI_MANIFEST)


async def test_manifest_over_4mib_is_413(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/big")
    body = _padded(cd, cs, ld, ls, 4 * MiB + 1)
    r = await put_raw(client, "m/big", "toobig", body, OCI_MANIFEST)
    await assert_error(r, 413)
    await assert_error(await client.get("/v2/m/big/manifests/toobig"), 404, "MANIFEST_UNKNOWN")


async def test_manifest_over_4mib_streamed_is_413(client, push):
    from tests.helpers import stream
    cd, cs, ld, ls = await blobs_for_image(push, "m/big")
    body = _padded(cd, cs, ld, ls, 4 * MiB + 1)
    r = await client.put("/v2/m/big/manifests/toobig", data=stream(body[:MiB], body[MiB:]),
                         headers={"Content-Type": OCI_MANIFEST})
    await assert_error(r, 413)
    await assert_error(await client.get("/v2/m/big/manifests/toobig"), 404, "MANIFEST_UNKNOWN")


async def test_subject_that_does_not_exist(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/subject")
    subject = sha256(b"a manifest pushed later, or never")
    body = weird_json(image_doc(cd, cs, [(ld, ls)], artifactType="application/vnd.example.sig",
                                subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": 1234}))
    r = await put_raw(client, "m/subject", sha256(body), body, OCI_MANIFEST)
    assert r.status == 201, await r.text()
    assert r.headers["OCI-Subject"] == subject
    assert r.headers["Docker-Content-Digest"] == sha256(body)
    await assert_served(client, "m/subject", sha256(body), body, OCI_MANIFEST)


async def test_no_oci_subject_header_without_subject(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/nosubject")
    r = await put_raw(client, "m/nosubject", "v1", json.dumps(_valid_doc(cd, cs, ld, ls)).encode(), OCI_MANIFEST)
    assert r.status == 201 and "OCI-Subject" not in r.headers


# -- delete


async def test_delete_by_tag_removes_only_the_tag(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/deltag")
    body = weird_json(_valid_doc(cd, cs, ld, ls))
    digest = await put_ok(client, "m/deltag", "v1", body, OCI_MANIFEST)
    await put_ok(client, "m/deltag", "v2", body, OCI_MANIFEST)
    r = await client.delete("/v2/m/deltag/manifests/v1")
    assert r.status == 202
    await assert_error(await client.get("/v2/m/deltag/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.head("/v2/m/deltag/manifests/v1"), 404)
    await assert_served(client, "m/deltag", digest, body, OCI_MANIFEST)
    await assert_served(client, "m/deltag", "v2", body, OCI_MANIFEST)
    r = await client.get("/v2/m/deltag/tags/list")
    assert (await r.json())["tags"] == ["v2"]
    await assert_error(await client.delete("/v2/m/deltag/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    # the blobs are still there
    assert (await client.head(f"/v2/m/deltag/blobs/{ld}")).status == 200


async def test_delete_by_digest_removes_manifest_and_tags(client, push):
    cd, cs, ld, ls = await blobs_for_image(push, "m/deldigest")
    body = weird_json(_valid_doc(cd, cs, ld, ls))
    digest = await put_ok(client, "m/deldigest", "v1", body, OCI_MANIFEST)
    await put_ok(client, "m/deldigest", "v2", body, OCI_MANIFEST)
    other = weird_json(image_doc(cd, cs, [(ld, ls)], annotations={"other": "yes"}))
    await put_ok(client, "m/deldigest", "keep", other, OCI_MANIFEST)
    r = await client.delete(f"/v2/m/deldigest/manifests/{digest}")
    assert r.status == 202
    for ref in (digest, "v1", "v2"):
        await assert_error(await client.get(f"/v2/m/deldigest/manifests/{ref}"), 404, "MANIFEST_UNKNOWN")
        await assert_error(await client.head(f"/v2/m/deldigest/manifests/{ref}"), 404)
    r = await client.get("/v2/m/deldigest/tags/list")
    assert (await r.json())["tags"] == ["keep"]
    await assert_served(client, "m/deldigest", "keep", other, OCI_MANIFEST)
    await assert_error(await client.delete(f"/v2/m/deldigest/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")
    # pushing it again works
    await put_ok(client, "m/deldigest", "v1", body, OCI_MANIFEST)
    await assert_served(client, "m/deldigest", "v1", body, OCI_MANIFEST)


async def test_get_unknown(client, push):
    await push.image("m/known", "v1")
    for ref in ("nope", sha256(b"nope")):
        await assert_error(await client.get(f"/v2/m/known/manifests/{ref}"), 404, "MANIFEST_UNKNOWN")
        await assert_error(await client.head(f"/v2/m/known/manifests/{ref}"), 404)
        await assert_error(await client.delete(f"/v2/m/known/manifests/{ref}"), 404, "MANIFEST_UNKNOWN")
    r = await client.get("/v2/never/pushed/manifests/v1")
    assert r.status == 404
    assert (await assert_error(r, 404))[0]["code"] in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")


async def test_manifest_isolated_per_repo(client, push):
    digest, _ = await push.image("m/mine", "v1")
    await push.image("m/yours", "v1", layers=[b"other"])
    await assert_error(await client.get(f"/v2/m/yours/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("ref", ["sha256:abc", "sha256:" + "Z" * 64, "md5:" + "a" * 32])
async def test_malformed_digest_reference(client, push, ref):
    await push.image("m/malformed", "v1")
    r = await client.get(f"/v2/m/malformed/manifests/{ref}")
    assert 400 <= r.status < 500
    await assert_error(r, r.status)
    cd, cs, ld, ls = await blobs_for_image(push, "m/malformed")
    r = await put_raw(client, "m/malformed", ref, json.dumps(_valid_doc(cd, cs, ld, ls)).encode(), OCI_MANIFEST)
    await assert_error(r, 400)


async def test_foreign_layer_with_urls_need_not_exist(client, push):
    cd, cs, _, _ = await blobs_for_image(push, "m/foreign")
    doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
           "config": {"mediaType": DOCKER_CONFIG, "digest": cd, "size": cs},
           "layers": [{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                       "digest": sha256(b"windows base"), "size": 100,
                       "urls": ["https://example.com/layer"]}]}
    body = json.dumps(doc).encode()
    await put_ok(client, "m/foreign", "v1", body, DOCKER_MANIFEST)


async def test_oci_config_and_layer_types_roundtrip(client, push):
    # an artifact manifest: empty config, arbitrary layer types
    empty = await push.blob("m/artifact", b"{}")
    blob = await push.blob("m/artifact", b"artifact payload")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.thing",
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
           "layers": [{"mediaType": "application/vnd.example.blob", "digest": blob, "size": 16}]}
    body = weird_json(doc)
    await put_ok(client, "m/artifact", "art", body, OCI_MANIFEST)
    await assert_served(client, "m/artifact", "art", body, OCI_MANIFEST)
