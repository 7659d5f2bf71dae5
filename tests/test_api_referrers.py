"""GET /v2/<name>/referrers/<digest>[?artifactType=] (end-12a, end-12b)."""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from tests.helpers import OCI_EMPTY, OCI_INDEX, OCI_MANIFEST, assert_error, sha256, weird_json

SBOM = "application/vnd.example.sbom.v1"
SIG_CONFIG = "application/vnd.example.sig.config.v1+json"
ATTEST = "application/vnd.example.attestation.v1"


async def setup_referrers(client, push, repo: str = "ref/app"):
    """A subject image and three referrers: artifactType set, artifactType from config, and an index."""
    subject, subject_body = await push.image(repo, "v1")
    subj = {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)}
    empty = await push.blob(repo, b"{}")
    payload = await push.blob(repo, b"sbom contents")
    sig_cfg = await push.blob(repo, b'{"sig": true}')
    expected = {}

    sbom = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SBOM,
            "config": {"mediaType": OCI_EMPTY, "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/spdx+json", "digest": payload, "size": 13}],
            "subject": subj, "annotations": {"org.example.kind": "sbom", "created": "2024-01-01"}}
    body = weird_json(sbom)
    r = await client.put(f"/v2/{repo}/manifests/{sha256(body)}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201 and r.headers["OCI-Subject"] == subject
    expected[sha256(body)] = {"mediaType": OCI_MANIFEST, "digest": sha256(body), "size": len(body),
                              "artifactType": SBOM, "annotations": sbom["annotations"]}

    sig = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": SIG_CONFIG, "digest": sig_cfg, "size": 13},
           "layers": [], "subject": subj}
    body = json.dumps(sig).encode()
    r = await client.put(f"/v2/{repo}/manifests/{sha256(body)}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201 and r.headers["OCI-Subject"] == subject
    expected[sha256(body)] = {"mediaType": OCI_MANIFEST, "digest": sha256(body), "size": len(body),
                              "artifactType": SIG_CONFIG}

    idx = {"schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": ATTEST, "manifests": [],
           "subject": subj, "annotations": {"org.example.kind": "index"}}
    body = json.dumps(idx).encode()
    r = await client.put(f"/v2/{repo}/manifests/{sha256(body)}", data=body, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201 and r.headers["OCI-Subject"] == subject
    expected[sha256(body)] = {"mediaType": OCI_INDEX, "digest": sha256(body), "size": len(body),
                              "artifactType": ATTEST, "annotations": idx["annotations"]}
    return subject, expected


def by_digest(doc: dict) -> dict:
    return {m["digest"]: m for m in doc["manifests"]}


async def get_index(client, url: str) -> tuple[dict, object]:
    r = await client.get(url)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].split(";")[0] == OCI_INDEX
    doc = json.loads(await r.read())
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == OCI_INDEX
    assert isinstance(doc["manifests"], list)
    return doc, r


async def test_referrers_lists_every_referrer(client, push):
    subject, expected = await setup_referrers(client, push)
    doc, r = await get_index(client, f"/v2/ref/app/referrers/{subject}")
    assert "OCI-Filters-Applied" not in r.headers
    got = by_digest(doc)
    assert set(got) == set(expected)
    for d, want in expected.items():
        assert got[d]["mediaType"] == want["mediaType"]
        assert got[d]["size"] == want["size"]
        assert got[d]["artifactType"] == want["artifactType"]
        assert got[d].get("annotations") == want.get("annotations")
    assert len(doc["manifests"]) == 3


async def test_artifact_type_falls_back_to_config_media_type(client, push):
    subject, expected = await setup_referrers(client, push)
    doc, _ = await get_index(client, f"/v2/ref/app/referrers/{subject}")
    types = sorted(m["artifactType"] for m in doc["manifests"])
    assert types == sorted([SBOM, SIG_CONFIG, ATTEST])


@pytest.mark.parametrize("wanted", [SBOM, SIG_CONFIG, ATTEST])
async def test_artifact_type_filter(client, push, wanted):
    subject, expected = await setup_referrers(client, push)
    doc, r = await get_index(client, f"/v2/ref/app/referrers/{subject}?artifactType={quote(wanted, safe='')}")
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["artifactType"] for m in doc["manifests"]] == [wanted]
    d = doc["manifests"][0]["digest"]
    assert expected[d]["artifactType"] == wanted


async def test_artifact_type_filter_matching_nothing(client, push):
    subject, _ = await setup_referrers(client, push)
    doc, r = await get_index(client, f"/v2/ref/app/referrers/{subject}?artifactType=application/none")
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert doc["manifests"] == []


async def test_unknown_subject_is_empty_index(client, push):
    await setup_referrers(client, push)
    doc, _ = await get_index(client, f"/v2/ref/app/referrers/{sha256(b'unknown')}")
    assert doc["manifests"] == []


async def test_unknown_repo_is_empty_index_or_404(client):
    r = await client.get(f"/v2/ref/nowhere/referrers/{sha256(b'unknown')}")
    if r.status == 200:
        assert json.loads(await r.read())["manifests"] == []
    else:
        await assert_error(r, 404)


async def test_referrers_before_subject_exists(client, push):
    """A referrer pushed first is listed for its subject, which need not exist."""
    missing = sha256(b"subject to come")
    cfg = await push.blob("ref/early", b"{}")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SBOM,
           "config": {"mediaType": OCI_EMPTY, "digest": cfg, "size": 2}, "layers": [],
           "subject": {"mediaType": OCI_MANIFEST, "digest": missing, "size": 10}}
    digest, body = await push.manifest("ref/early", "sbom", doc)
    got, _ = await get_index(client, f"/v2/ref/early/referrers/{missing}")
    assert [m["digest"] for m in got["manifests"]] == [digest]
    assert got["manifests"][0]["size"] == len(body)


async def test_deleted_referrer_disappears(client, push):
    subject, expected = await setup_referrers(client, push)
    gone = next(iter(expected))
    assert (await client.delete(f"/v2/ref/app/manifests/{gone}")).status == 202
    doc, _ = await get_index(client, f"/v2/ref/app/referrers/{subject}")
    assert set(by_digest(doc)) == set(expected) - {gone}


async def test_referrers_are_per_repository(client, push):
    subject, _ = await setup_referrers(client, push, "ref/one")
    await push.image("ref/two", "v1")  # same subject bytes in another repo
    doc, _ = await get_index(client, f"/v2/ref/two/referrers/{subject}")
    assert doc["manifests"] == []


async def test_referrers_of_a_referrer(client, push):
    subject, expected = await setup_referrers(client, push)
    parent = next(iter(expected))
    cfg = await push.blob("ref/app", b"{}")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
           "config": {"mediaType": OCI_EMPTY, "digest": cfg, "size": 2}, "layers": [],
           "subject": {"mediaType": OCI_MANIFEST, "digest": parent, "size": expected[parent]["size"]}}
    digest, _ = await push.manifest("ref/app", "sig-of-sbom", doc)
    got, _ = await get_index(client, f"/v2/ref/app/referrers/{parent}")
    assert [m["digest"] for m in got["manifests"]] == [digest]
    got, _ = await get_index(client, f"/v2/ref/app/referrers/{subject}")
    assert digest not in by_digest(got)


@pytest.mark.parametrize("digest", ["sha256:abc", "junk", "sha256:" + "G" * 64])
async def test_referrers_bad_digest(client, push, digest):
    await push.image("ref/bad", "v1")
    await assert_error(await client.get(f"/v2/ref/bad/referrers/{digest}"), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("alg", ["sha512", "blake3"])
async def test_referrers_of_subject_with_other_algorithm(client, push, alg):
    from tests.helpers import DIGESTERS
    subject = DIGESTERS[alg](b"some manifest")
    cfg = await push.blob("ref/alg", b"{}")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SBOM,
           "config": {"mediaType": OCI_EMPTY, "digest": cfg, "size": 2}, "layers": [],
           "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 13}}
    digest, _ = await push.manifest("ref/alg", "a", doc)
    got, _ = await get_index(client, f"/v2/ref/alg/referrers/{subject}")
    assert [m["digest"] for m in got["manifests"]] == [digest]
