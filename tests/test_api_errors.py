"""Errors: the spec's JSON body with the right status for every failure, never a 500
or a traceback, including for junk sent to every route."""
from __future__ import annotations

import itertools
import json

import pytest

from tests.helpers import (OCI_INDEX, OCI_MANIFEST, assert_error, check_error_body, image_doc, raw_request,
                           sha256, start_upload)

# -- repository names


@pytest.mark.parametrize("name", [
    "Upper", "UPPER/case", "a/B", "a..b", "a__-b" + "..", "-lead", "trail-", "a/-b", "a_", ".a",
    "a" * 256, "a" * 200 + "/" + "b" * 55, "%C3%A9", "a%00b", "a%20b", "a:b", "a@b",
])
@pytest.mark.parametrize("route", ["tags", "manifest", "blob", "upload", "referrers"])
async def test_invalid_name(client, name, route):
    d = sha256(b"x")
    path = {"tags": f"/v2/{name}/tags/list", "manifest": f"/v2/{name}/manifests/latest",
            "blob": f"/v2/{name}/blobs/{d}", "upload": f"/v2/{name}/blobs/uploads/",
            "referrers": f"/v2/{name}/referrers/{d}"}[route]
    method = "POST" if route == "upload" else "GET"
    status, headers, body = await raw_request(client, method, path.encode())
    assert status == 400, body
    assert check_error_body(body)[0]["code"] == "NAME_INVALID"
    assert headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("target", [b"/v2/a/../b/tags/list", b"/v2/../tags/list", b"/v2/a/%2E%2E/b/tags/list",
                                    b"/v2/a/./b/tags/list", b"/v2/a//b/tags/list"])
async def test_dot_segments_in_name(client, push, target):
    await push.image("b", "v1")  # a repo a normalised path would reach
    status, _, body = await raw_request(client, "GET", target)
    assert status == 400, body
    assert check_error_body(body)[0]["code"] == "NAME_INVALID"


async def test_name_of_255_is_accepted(client, push):
    name = "a" * 100 + "/" + "b" * 100 + "/" + "c" * 53
    assert len(name) == 255
    await push.image(name, "v1")
    r = await client.get(f"/v2/{name}/tags/list")
    assert r.status == 200 and (await r.json())["tags"] == ["v1"]
    too_long = name + "c"
    await assert_error(await client.get(f"/v2/{too_long}/tags/list"), 400, "NAME_INVALID")
    await assert_error(await client.post(f"/v2/{too_long}/blobs/uploads/"), 400, "NAME_INVALID")


async def test_error_statuses_and_codes(client, push):
    """One request per error code the API produces, each with its spec status."""
    md, _ = await push.image("err/repo", "v1")
    d = sha256(b"nothing")
    await assert_error(await client.get(f"/v2/err/repo/blobs/{d}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.get("/v2/err/repo/blobs/uploads/" + "0" * 32), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.get("/v2/err/repo/blobs/sha256:1"), 400, "DIGEST_INVALID")
    await assert_error(await client.get("/v2/err/repo/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.put("/v2/err/repo/manifests/x", data=b"{",
                                        headers={"Content-Type": OCI_MANIFEST}), 400, "MANIFEST_INVALID")
    body = json.dumps(image_doc(d, 7, [])).encode()
    await assert_error(await client.put("/v2/err/repo/manifests/x", data=body,
                                        headers={"Content-Type": OCI_MANIFEST}), 404, "MANIFEST_BLOB_UNKNOWN")
    await assert_error(await client.get("/v2/err/Repo/tags/list"), 400, "NAME_INVALID")
    await assert_error(await client.get("/v2/err/none/tags/list"), 404, "NAME_UNKNOWN")


@pytest.mark.parametrize("method,path", [
    ("GET", "/v2/nothing/here"), ("GET", "/v3/"), ("GET", "/"), ("POST", "/v2/"), ("DELETE", "/v2/_catalog"),
    ("PUT", "/v2/a/tags/list"), ("PATCH", "/v2/a/manifests/v1"), ("POST", "/v2/a/manifests/v1"),
    ("GET", "/v2/a/blobs/uploads/"), ("PUT", "/v2/a/blobs/" + "sha256:" + "a" * 64), ("GET", "/v2//tags/list"),
])
async def test_unknown_route_or_method_is_json(client, method, path):
    r = await client.request(method, path)
    assert r.status in (404, 405)
    await assert_error(r, r.status)


@pytest.mark.parametrize("content_range", ["junk", "bytes=9-0", "0-", "x-y", "0-3/2/1", "-1-3"])
async def test_malformed_content_range(client, content_range):
    loc = await start_upload(client, "err/range")
    r = await client.patch(loc, data=b"0123", headers={"Content-Range": content_range})
    assert 400 <= r.status < 500
    await assert_error(r, r.status)


async def test_deeply_nested_manifest_json(client, push):
    await push.image("err/deep", "v1")
    body = b"[" * 100_000 + b"]" * 100_000
    r = await client.put("/v2/err/deep/manifests/v2", data=body, headers={"Content-Type": OCI_MANIFEST})
    await assert_error(r, 400, "MANIFEST_INVALID")
    body = b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'", "x": ' + b"{\"a\":" * 50_000 \
        + b"1" + b"}" * 50_000 + b"}"
    r = await client.put("/v2/err/deep/manifests/v2", data=body, headers={"Content-Type": OCI_MANIFEST})
    await assert_error(r, 400, "MANIFEST_INVALID")


@pytest.mark.parametrize("field", ["artifactType", "configMediaType", "annotation"])
async def test_manifest_with_lone_surrogate_strings(client, push, field):
    """JSON may spell a lone UTF-16 surrogate (\\ud800); such a string cannot be stored as UTF-8."""
    cfg = await push.blob("err/surrogate", b"{}")
    doc = image_doc(cfg, 2, [])
    if field == "artifactType":
        doc["artifactType"] = "application/x\ud800"
    elif field == "configMediaType":
        doc["config"]["mediaType"] = "application/x\ud800"
    else:
        doc["annotations"] = {"k\ud800": "v\udfff"}
    body = json.dumps(doc).encode()  # ensure_ascii spells the surrogate as \ud800
    assert b"\\ud800" in body or b"\\udfff" in body
    r = await client.put("/v2/err/surrogate/manifests/v1", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status < 500, await r.text()
    if r.status >= 400:
        await assert_error(r, r.status)
    else:
        r = await client.get("/v2/err/surrogate/manifests/v1")
        assert r.status == 200 and await r.read() == body


@pytest.mark.parametrize("path", [
    "/v2/err/q/tags/list?last=%ED%A0%80", "/v2/_catalog?last=%ED%A0%80", "/v2/_catalog?last=%FF%FE",
    "/v2/err/q/tags/list?n=2&last=%00", f"/v2/err/q/referrers/{sha256(b'x')}?artifactType=%ED%A0%80",
    f"/v2/err/q/referrers/{sha256(b'x')}?artifactType=%FF",
])
async def test_odd_query_strings(client, push, path):
    await push.image("err/q", "v1")
    status, _, body = await raw_request(client, "GET", path.encode())
    assert status < 500, body
    if status >= 400:
        check_error_body(body)


# -- fuzz-ish: junk to every route


def _cases(known_blob: str, known_manifest: str, upload_id: str):
    names = ["fz/repo", "fz/none", "FZ", "a..b", "a" * 256, "%00", "%C3%A9", "_catalog"]
    digests = [known_blob, known_manifest, sha256(b"unknown"), "sha256:zz", "junk", "sha256:" + "a" * 300,
               "%FF", "sha256%3A" + "a" * 64, "blake3:" + "0" * 64, "sha512:" + "0" * 64]
    refs = ["v1", "nope", "-bad", "x" * 200, known_manifest, "sha256:zz", "%2E%2E", "a%20b"]
    uploads = [upload_id, "0" * 32, "junk", "%2E%2E", "A" * 32, "a" * 500]
    queries = ["", "?n=abc", "?n=-1", "?n=99999999999999999999999", "?digest=junk", "?digest=" + sha256(b"q"),
               "?mount=junk&from=UP", f"?mount={known_blob}&from=a..b", f"?mount={known_blob}",
               "?last=%FF", "?artifactType=%00", "?digest=&mount=&from=&n=&last="]
    headers = [{}, {"Content-Type": "junk/;;;=\"x"}, {"Content-Type": OCI_MANIFEST}, {"Content-Type": OCI_INDEX},
               {"Content-Range": "junk"}, {"Content-Range": "0-0"}, {"Content-Range": "5-1000"},
               {"Range": "bytes=junk"}, {"Range": "bytes=5-1"}, {"Range": "bytes=0-0,2-3"},
               {"Accept": "*/*;q=junk"}, {"If-None-Match": "\"junk\""}, {"If-Range": "junk"},
               {"If-Modified-Since": "junk"}, {"Transfer-Encoding": "gzip"}]
    bodies = [b"", b"\x00\xff" * 8, b"{", b"[]", b"null", b'{"schemaVersion": 2}',
              b'{"schemaVersion":2,"mediaType":"' + OCI_INDEX.encode() + b'","manifests":[{"digest":1}]}',
              b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","config":{"mediaType":"a",'
              b'"digest":"' + known_blob.encode() + b'","size":100000000000000000000000},"layers":[]}',
              b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","config":{"mediaType":"a",'
              b'"digest":"' + known_blob.encode() + b'","size":1},"layers":[null],"subject":[]}']
    routes = [
        ("GET", "/v2/{name}/tags/list"), ("GET", "/v2/{name}/manifests/{ref}"),
        ("HEAD", "/v2/{name}/manifests/{ref}"), ("PUT", "/v2/{name}/manifests/{ref}"),
        ("DELETE", "/v2/{name}/manifests/{ref}"), ("GET", "/v2/{name}/blobs/{digest}"),
        ("HEAD", "/v2/{name}/blobs/{digest}"), ("DELETE", "/v2/{name}/blobs/{digest}"),
        ("POST", "/v2/{name}/blobs/uploads/"), ("GET", "/v2/{name}/blobs/uploads/{upload}"),
        ("PATCH", "/v2/{name}/blobs/uploads/{upload}"), ("PUT", "/v2/{name}/blobs/uploads/{upload}"),
        ("DELETE", "/v2/{name}/blobs/uploads/{upload}"), ("GET", "/v2/{name}/referrers/{digest}"),
        ("GET", "/v2/_catalog"), ("GET", "/v2/"),
    ]
    # A deterministic spread: each route gets every value of every dimension at least once,
    # cycling the others, rather than the full product.
    out = []
    for method, template in routes:
        dims = [digests, refs, uploads, queries, headers, bodies]
        width = max(len(d) for d in dims) * 2
        for i in range(width):
            digest, ref, upload, query, hdrs, body = (d[(i * (k + 1) + i // len(d)) % len(d)]
                                                      for k, d in enumerate(dims))
            # mostly the real repository, so the junk reaches past the name check
            name = names[(i // 3) % len(names)] if i % 3 == 0 else names[i % 2]
            if method in ("GET", "HEAD", "DELETE") and i % 3:
                body = b""
            path = template.format(name=name, digest=digest, ref=ref, upload=upload) + query
            out.append((method, path, hdrs, body))
    return out


async def test_fuzz_every_route(client, push):
    md, _ = await push.image("fz/repo", "v1")
    bd = await push.blob("fz/repo", b"fuzz blob " * 10)
    loc = await start_upload(client, "fz/repo")
    r = await client.patch(loc, data=b"0123456789")
    assert r.status == 202
    upload_id = loc.rsplit("/", 1)[1]
    cases = _cases(bd, md, upload_id)
    assert len(cases) > 300
    failures = []
    for method, path, hdrs, body in cases:
        headers = dict(hdrs)
        if headers.get("Transfer-Encoding"):
            headers.pop("Transfer-Encoding")  # an unsupported coding is refused below the app
        status, resp_headers, resp_body = await raw_request(client, method, path.encode(), headers, body)
        problem = None
        if status >= 500:
            problem = f"status {status}"
        elif b"Traceback" in resp_body or b'File "' in resp_body:
            problem = "traceback in body"
        elif status >= 400 and method != "HEAD":
            try:
                check_error_body(resp_body)
            except (AssertionError, ValueError) as exc:
                problem = f"not a JSON error body: {exc!r}"
        if problem:
            failures.append((method, path[:120], hdrs, body[:60], status, problem, resp_body[:200]))
    assert not failures, "\n".join(map(repr, failures[:30]))
    # the registry still works afterwards (the fuzz may have deleted what it was given)
    md, body = await push.image("fz/repo", "after", layers=[b"after the fuzz"])
    r = await client.get("/v2/fz/repo/manifests/after")
    assert r.status == 200 and await r.read() == body
    r = await client.get(f"/v2/fz/repo/blobs/{sha256(b'after the fuzz')}")
    assert r.status == 200 and await r.read() == b"after the fuzz"


@pytest.mark.parametrize("method,path,body", list(itertools.product(
    ["PUT"], ["/v2/fz/m/manifests/v1", f"/v2/fz/m/manifests/{sha256(b'x')}"],
    [b"\xff\xfe\x00", b"1", b"true", b'{"schemaVersion": 2, "mediaType": null}',
     b'{"schemaVersion": 2, "mediaType": 5}', b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode()
     + b'", "config": {"mediaType": "x", "digest": "sha256:' + b"a" * 64 + b'", "size": true}}',
     b'{"schemaVersion": 2, "mediaType": "' + OCI_INDEX.encode() + b'", "manifests": [1, 2]}',
     b'{"schemaVersion": 2, "mediaType": "' + OCI_INDEX.encode() + b'", "manifests": [], "artifactType": 7}',
     b'{"schemaVersion": 2, "mediaType": "' + OCI_INDEX.encode() + b'", "manifests": [], "annotations": []}',
     b'{"schemaVersion": 2, "mediaType": "' + OCI_INDEX.encode() + b'", "manifests": [], "subject": {}}',
     ])))
async def test_junk_manifests_are_4xx_json(client, push, method, path, body):
    await push.blob("fz/m", b"x")
    for ctype in (OCI_MANIFEST, OCI_INDEX, "application/json", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = await client.request(method, path, data=body, headers=headers)
        assert 400 <= r.status < 500, (ctype, r.status, await r.text())
        await assert_error(r, r.status)


async def test_head_errors_have_no_body(client):
    for path in ("/v2/h/x/manifests/v1", f"/v2/h/x/blobs/{sha256(b'h')}", "/v2/H/manifests/v1"):
        r = await client.head(path)
        assert 400 <= r.status < 500
        assert await r.read() == b""
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
