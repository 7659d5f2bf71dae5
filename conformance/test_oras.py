"""The oras Python SDK (oras-py) against the registry: artifacts with files, and referrers."""
from __future__ import annotations

import hashlib
import json
from urllib.parse import quote
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conformance._util import OCI_EMPTY, OCI_INDEX, OCI_MANIFEST, rng, sha256

oras_client = pytest.importorskip("oras.client", reason="the oras Python SDK is not installed (pip install oras)")
import oras.oci  # noqa: E402  (after the importorskip)

CONFIG_TYPE = "application/vnd.example.thing.config.v1+json"
SIGNATURE_TYPE = "application/vnd.example.signature.v1+json"
SBOM_TYPE = "application/vnd.example.sbom.v1+json"
BUNDLE_TYPE = "application/vnd.example.bundle.v1+json"


@pytest.fixture
def sdk(server) -> Any:
    client = oras_client.OrasClient(hostname=server.host, insecure=True)
    client.session.trust_env = False  # loopback: no proxy from the environment
    return client


@pytest.fixture(autouse=True)
def no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """oras-py retries a failed request with sleeps of 3s, 5s, 11s...: a server error would make
    the suite crawl. The retries still happen, without the wait."""
    import oras.decorator
    monkeypatch.setattr(oras.decorator, "time", SimpleNamespace(sleep=lambda seconds: None))


def write_files(d: Path, seed: str) -> dict[str, bytes]:
    gen = rng(seed)
    files = {"readme.txt": b"hello from the conformance suite\n", "data.bin": gen.randbytes(150_000),
             "big.bin": gen.randbytes(3 << 20), "empty.txt": b""}
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def push_artifact(sdk: Any, server: Any, workdir: Path, repo: str, tag: str, **kw: Any) -> dict[str, bytes]:
    files = write_files(workdir / "in", f"{repo}:{tag}")
    (workdir / "config.json").write_text(json.dumps({"kind": "thing", "repo": repo}))
    r = sdk.push(target=f"{server.host}/{repo}:{tag}",
                  files=[f"{workdir / 'in' / 'readme.txt'}:text/plain", str(workdir / "in" / "data.bin"),
                         f"{workdir / 'in' / 'big.bin'}:application/vnd.example.blob",
                         f"{workdir / 'in' / 'empty.txt'}:text/plain"],
                  manifest_config=f"{workdir / 'config.json'}:{CONFIG_TYPE}",
                  manifest_annotations={"org.example.purpose": "conformance"},
                  disable_path_validation=True, quiet=True, **kw)
    assert r.status_code == 201, r.text
    return files


def head_manifest(server: Any, repo: str, ref: str) -> tuple[str, int, str]:
    r = server.http("HEAD", f"/v2/{repo}/manifests/{ref}", headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
    assert r.status == 200, r
    return r.headers["Docker-Content-Digest"], int(r.headers["Content-Length"]), r.headers["Content-Type"]


def test_push_pull_artifact(sdk, server, workdir: Path) -> None:
    files = push_artifact(sdk, server, workdir, "oras/artifact", "v1")

    manifest = sdk.get_manifest(f"{server.host}/oras/artifact:v1")
    assert manifest["config"]["mediaType"] == CONFIG_TYPE
    assert manifest["annotations"] == {"org.example.purpose": "conformance"}
    titles = [l["annotations"]["org.opencontainers.image.title"] for l in manifest["layers"]]
    assert titles == ["readme.txt", "data.bin", "big.bin", "empty.txt"]
    assert [l["mediaType"] for l in manifest["layers"]] == \
        ["text/plain", "application/vnd.oci.image.layer.v1.tar", "application/vnd.example.blob", "text/plain"]
    for layer, name in zip(manifest["layers"], titles):
        assert layer["digest"] == sha256(files[name]) and layer["size"] == len(files[name])

    pulled = sdk.pull(target=f"{server.host}/oras/artifact:v1", outdir=str(workdir / "out"))
    assert sorted(Path(p).name for p in pulled) == sorted(files)
    for p in pulled:
        assert Path(p).read_bytes() == files[Path(p).name], p
    assert sdk.get_tags(f"{server.host}/oras/artifact") == ["v1"]


def test_chunked_push(sdk, server, workdir: Path) -> None:
    """oras-py's chunked upload: POST, PATCH with Content-Range per chunk, PUT ?digest=."""
    files = push_artifact(sdk, server, workdir, "oras/chunked", "v1", do_chunked=True, chunk_size=1 << 20)
    pulled = sdk.pull(target=f"{server.host}/oras/chunked:v1", outdir=str(workdir / "out"))
    assert {Path(p).name: Path(p).read_bytes() for p in pulled} == files


def test_delete_tag(sdk, server, workdir: Path) -> None:
    push_artifact(sdk, server, workdir, "oras/deltag", "gone")
    assert sdk.delete_tag(f"{server.host}/oras/deltag", "gone") is True
    assert server.http("HEAD", "/v2/oras/deltag/manifests/gone").status == 404


def test_referrers(sdk, server, workdir: Path) -> None:
    repo = "oras/referrers"
    push_artifact(sdk, server, workdir, repo, "subject")
    subj_digest, subj_size, subj_type = head_manifest(server, repo, "subject")
    subject = oras.oci.Subject(mediaType=subj_type, digest=subj_digest, size=subj_size)

    # Referrer 1: the SDK's own push with subject; its artifact type is its config's media type.
    (workdir / "sig").mkdir()
    (workdir / "sig" / "signature.bin").write_bytes(hashlib.sha512(subj_digest.encode()).digest())
    (workdir / "sig.json").write_text("{}")
    r = sdk.push(target=f"{server.host}/{repo}:signature", files=[str(workdir / "sig" / "signature.bin")],
                  manifest_config=f"{workdir / 'sig.json'}:{SIGNATURE_TYPE}",
                  manifest_annotations={"org.example.signed-by": "conformance"},
                  subject=subject, disable_path_validation=True, quiet=True)
    assert r.status_code == 201, r.text
    assert r.headers.get("OCI-Subject") == subj_digest, r.headers
    sig_digest = r.headers["Docker-Content-Digest"]

    # Referrer 2: an OCI 1.1 artifact manifest with artifactType and the empty config, through
    # the SDK's blob and manifest calls (its push() has no artifactType parameter).
    container = sdk.get_container(f"{server.host}/{repo}:sbom")
    sbom = workdir / "sbom.spdx.json"
    sbom.write_text(json.dumps({"spdxVersion": "SPDX-2.3", "name": "conformance"}))
    empty = workdir / "empty.json"
    empty.write_bytes(b"{}")
    sbom_layer = oras.oci.NewLayer(str(sbom), media_type="application/spdx+json")
    sbom_layer["annotations"] = {"org.opencontainers.image.title": "sbom.spdx.json"}
    empty_desc = {"mediaType": OCI_EMPTY, "digest": sha256(b"{}"), "size": 2}
    for path, desc in ((sbom, sbom_layer), (empty, empty_desc)):
        resp = sdk.upload_blob(str(path), container, desc)
        assert resp.status_code in (200, 201), resp.text
    sbom_manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SBOM_TYPE,
                     "config": empty_desc, "layers": [sbom_layer],
                     "subject": {"mediaType": subj_type, "digest": subj_digest, "size": subj_size},
                     "annotations": {"org.opencontainers.image.created": "2023-11-14T22:13:20Z"}}
    r = sdk.upload_manifest(sbom_manifest, container)
    assert r.status_code == 201, r.text
    assert r.headers.get("OCI-Subject") == subj_digest
    sbom_digest = r.headers["Docker-Content-Digest"]
    r = server.http("GET", f"/v2/{repo}/manifests/{sbom_digest}", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200 and sha256(r.body) == sbom_digest and json.loads(r.body) == sbom_manifest
    sbom_size = len(r.body)

    # Referrer 3: an image index as a referrer, pushed untagged (by digest) with plain HTTP.
    idx_doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": BUNDLE_TYPE,
               "manifests": [{"mediaType": OCI_MANIFEST, "digest": sig_digest,
                              "size": head_manifest(server, repo, sig_digest)[1]}],
               "subject": {"mediaType": subj_type, "digest": subj_digest, "size": subj_size}}
    idx_body = json.dumps(idx_doc, separators=(",", ":")).encode()
    idx_digest = sha256(idx_body)
    r = server.http("PUT", f"/v2/{repo}/manifests/{idx_digest}", idx_body, {"Content-Type": OCI_INDEX})
    assert r.status == 201, r.body
    assert r.headers.get("OCI-Subject") == subj_digest
    assert r.headers["Docker-Content-Digest"] == idx_digest

    # Unfiltered: all three referrers, with their artifact types and annotations.
    r = server.http("GET", f"/v2/{repo}/referrers/{subj_digest}")
    assert r.status == 200, r.body
    assert r.headers["Content-Type"].split(";")[0] == OCI_INDEX
    index = r.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {m["digest"]: m for m in index["manifests"]}
    assert set(by_digest) == {sig_digest, sbom_digest, idx_digest}, index
    assert by_digest[sig_digest]["artifactType"] == SIGNATURE_TYPE
    assert by_digest[sig_digest]["annotations"] == {"org.example.signed-by": "conformance"}
    assert by_digest[sig_digest]["size"] == head_manifest(server, repo, sig_digest)[1]
    assert by_digest[sbom_digest] == {"mediaType": OCI_MANIFEST, "digest": sbom_digest, "size": sbom_size,
                                      "artifactType": SBOM_TYPE,
                                      "annotations": {"org.opencontainers.image.created": "2023-11-14T22:13:20Z"}}
    assert by_digest[idx_digest] == {"mediaType": OCI_INDEX, "digest": idx_digest, "size": len(idx_body),
                                     "artifactType": BUNDLE_TYPE}

    # Filtered by artifactType.
    for wanted, digest in ((SBOM_TYPE, sbom_digest), (SIGNATURE_TYPE, sig_digest), (BUNDLE_TYPE, idx_digest)):
        # "+" must be percent-encoded in a query string (as Go clients do), or it reads as a space
        r = server.http("GET", f"/v2/{repo}/referrers/{subj_digest}?artifactType={quote(wanted, safe='')}")
        assert r.status == 200
        assert [m["digest"] for m in r.json()["manifests"]] == [digest]
        assert r.headers.get("OCI-Filters-Applied") == "artifactType"
    r = server.http("GET", f"/v2/{repo}/referrers/{subj_digest}?artifactType=application/vnd.example.none")
    assert r.status == 200 and r.json()["manifests"] == []

    # A digest nobody refers to: an empty index, not an error.
    r = server.http("GET", f"/v2/{repo}/referrers/{sha256(b'nothing refers to this')}")
    assert r.status == 200 and r.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}

    # The SDK pulls a referrer by digest.
    pulled = sdk.pull(target=f"{server.host}/{repo}@{sbom_digest}", outdir=str(workdir / "out"))
    assert [Path(p).read_bytes() for p in pulled] == [sbom.read_bytes()]

    # Deleting a referrer takes it out of the list.
    assert server.http("DELETE", f"/v2/{repo}/manifests/{sbom_digest}").status == 202
    r = server.http("GET", f"/v2/{repo}/referrers/{subj_digest}")
    assert sorted(m["digest"] for m in r.json()["manifests"]) == sorted([sig_digest, idx_digest])
