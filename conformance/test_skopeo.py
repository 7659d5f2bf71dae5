"""skopeo (containers/image) against the registry: OCI layouts written by hand are pushed,
pulled back and compared digest by digest and byte by byte."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance._util import OCI_INDEX, OCI_MANIFEST, OCILayout, random_gzip_layer, rng, sha256

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class Image:
    manifest: dict[str, Any]      # descriptor (digest, size, mediaType, platform)
    body: bytes                   # the manifest bytes as written
    config: dict[str, Any]
    layers: list[dict[str, Any]]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def blobs(self) -> list[str]:
        return [self.config["digest"], *(l["digest"] for l in self.layers)]


def build_image(layout: OCILayout, seed: str, sizes: tuple[int, ...] = (100, 300_000, 2_100_000),
                arch: str = "amd64", variant: str | None = None) -> Image:
    gen = rng(seed)
    layers, diff_ids = [], []
    for i, size in enumerate(sizes):
        desc, diff_id = random_gzip_layer(layout, gen, {f"{seed}/file{i}.bin": size, f"{seed}/small{i}": 10})
        layers.append(desc)
        diff_ids.append(diff_id)
    desc, body = layout.image(layers, diff_ids, arch=arch, variant=variant,
                              annotations={"org.opencontainers.image.title": seed})
    config = json.loads(body)["config"]
    return Image(desc, body, config, layers)


def assert_same_image(out: OCILayout, src: OCILayout, img: Image) -> None:
    """Every blob of ``img`` is in ``out`` with the same bytes as in ``src``."""
    assert out.read_blob(img.digest) == img.body, "manifest bytes changed"
    for digest in img.blobs:
        pulled = out.blob_path(digest)
        assert pulled.exists(), f"blob {digest} missing from the pulled layout"
        assert pulled.read_bytes() == src.read_blob(digest), f"blob {digest} bytes differ"
        assert sha256(pulled.read_bytes()) == digest


def test_push_pull_image_roundtrip(server, skopeo, workdir: Path) -> None:
    src = OCILayout(workdir / "src")
    img = build_image(src, "roundtrip")
    src.set_tags({"v1": img.manifest})

    skopeo.copy(f"oci:{src.path}:v1", server.ref("skopeo/roundtrip", "v1"))

    # What the registry serves is what was pushed, bytes and digest.
    assert skopeo.inspect_raw(server.ref("skopeo/roundtrip", "v1")) == img.body
    assert skopeo.inspect_raw(server.ref("skopeo/roundtrip", digest=img.digest)) == img.body
    r = server.http("GET", "/v2/skopeo/roundtrip/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200 and r.body == img.body
    assert r.headers["Docker-Content-Digest"] == img.digest
    assert r.headers["Content-Type"] == OCI_MANIFEST
    for digest in img.blobs:
        r = server.http("GET", f"/v2/skopeo/roundtrip/blobs/{digest}")
        assert r.status == 200 and r.body == src.read_blob(digest)

    info = json.loads(skopeo("inspect", "--tls-verify=false", server.ref("skopeo/roundtrip", "v1")).stdout)
    assert info["Digest"] == img.digest
    assert info["Layers"] == [l["digest"] for l in img.layers]
    assert (info["Architecture"], info["Os"]) == ("amd64", "linux")

    out = OCILayout(workdir / "out")
    skopeo.copy(server.ref("skopeo/roundtrip", "v1"), f"oci:{out.path}:v1")
    pulled = out.resolve("v1")
    assert pulled["digest"] == img.digest
    assert pulled["mediaType"] == OCI_MANIFEST
    assert pulled["size"] == len(img.body)
    assert_same_image(out, src, img)


def test_multiarch_index_all(server, skopeo, workdir: Path) -> None:
    src = OCILayout(workdir / "src")
    amd = build_image(src, "multi-amd64", sizes=(50_000, 700_000), arch="amd64")
    arm = build_image(src, "multi-arm64", sizes=(60_000, 800_000), arch="arm64", variant="v8")
    index, index_body = src.index([amd.manifest, arm.manifest])
    src.set_tags({"multi": index})

    skopeo.copy(f"oci:{src.path}:multi", server.ref("skopeo/multi", "multi"), "--all")

    assert skopeo.inspect_raw(server.ref("skopeo/multi", "multi")) == index_body
    r = server.http("HEAD", "/v2/skopeo/multi/manifests/multi", headers={"Accept": OCI_INDEX})
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == index["digest"]
    assert r.headers["Content-Type"] == OCI_INDEX
    for img in (amd, arm):
        r = server.http("GET", f"/v2/skopeo/multi/manifests/{img.digest}", headers={"Accept": OCI_MANIFEST})
        assert r.status == 200 and r.body == img.body

    out = OCILayout(workdir / "out")
    skopeo.copy(server.ref("skopeo/multi", "multi"), f"oci:{out.path}:multi", "--all")
    pulled = out.resolve("multi")
    assert pulled["digest"] == index["digest"], "the index digest was not preserved"
    assert out.read_blob(index["digest"]) == index_body
    for img in (amd, arm):
        assert_same_image(out, src, img)

    # Without --all, skopeo picks one platform out of the index.
    one = OCILayout(workdir / "one")
    skopeo("--override-arch", "arm64", "--override-variant", "v8", "copy", "--src-tls-verify=false",
           server.ref("skopeo/multi", "multi"), f"oci:{one.path}:arm")
    assert one.resolve("arm")["digest"] == arm.digest
    assert_same_image(one, src, arm)


def test_list_tags(server, skopeo, workdir: Path) -> None:
    src = OCILayout(workdir / "src")
    img = build_image(src, "tags", sizes=(1000,))
    src.set_tags({"v1": img.manifest})
    skopeo.copy(f"oci:{src.path}:v1", server.ref("skopeo/tags", "v1"))
    for tag in ("v2", "latest", "1.0.0-rc.1"):
        skopeo.copy(server.ref("skopeo/tags", "v1"), server.ref("skopeo/tags", tag))

    listed = json.loads(skopeo("list-tags", "--tls-verify=false", server.ref("skopeo/tags")).stdout)
    assert listed["Repository"] == f"{server.host}/skopeo/tags"
    assert sorted(listed["Tags"]) == sorted(["v1", "v2", "latest", "1.0.0-rc.1"])
    for tag in listed["Tags"]:
        assert skopeo.inspect_raw(server.ref("skopeo/tags", tag)) == img.body

    missing = skopeo("list-tags", "--tls-verify=false", server.ref("skopeo/no-such-repo"), check=False)
    assert missing.returncode != 0


def test_delete(server, skopeo, workdir: Path) -> None:
    src = OCILayout(workdir / "src")
    doomed = build_image(src, "delete-a", sizes=(1000,))
    kept = build_image(src, "delete-b", sizes=(2000,))
    src.set_tags({"a": doomed.manifest, "b": kept.manifest})
    skopeo.copy(f"oci:{src.path}:a", server.ref("skopeo/delete", "a"))
    skopeo.copy(f"oci:{src.path}:b", server.ref("skopeo/delete", "b"))

    skopeo("delete", "--tls-verify=false", server.ref("skopeo/delete", "a"))

    gone = skopeo("inspect", "--tls-verify=false", "--raw", server.ref("skopeo/delete", "a"), check=False)
    assert gone.returncode != 0, gone.stdout
    assert "manifest unknown" in gone.stderr.lower(), gone.stderr
    gone = skopeo("inspect", "--tls-verify=false", "--raw", server.ref("skopeo/delete", digest=doomed.digest),
                  check=False)
    assert gone.returncode != 0, gone.stdout
    assert server.http("GET", f"/v2/skopeo/delete/manifests/{doomed.digest}").status == 404
    assert server.http("HEAD", "/v2/skopeo/delete/manifests/a").status == 404

    # The other image in the repository is untouched.
    assert skopeo.inspect_raw(server.ref("skopeo/delete", "b")) == kept.body
    listed = json.loads(skopeo("list-tags", "--tls-verify=false", server.ref("skopeo/delete")).stdout)
    assert listed["Tags"] == ["b"]


def test_copy_between_repositories(server, skopeo, workdir: Path) -> None:
    src = OCILayout(workdir / "src")
    img = build_image(src, "between")
    src.set_tags({"x": img.manifest})
    skopeo.copy(f"oci:{src.path}:x", server.ref("skopeo/between-a", "x"))

    skopeo.copy(server.ref("skopeo/between-a", "x"), server.ref("skopeo/between-b", "x"))

    a = server.http("HEAD", "/v2/skopeo/between-a/manifests/x", headers={"Accept": OCI_MANIFEST})
    b = server.http("HEAD", "/v2/skopeo/between-b/manifests/x", headers={"Accept": OCI_MANIFEST})
    assert a.status == b.status == 200
    assert a.headers["Docker-Content-Digest"] == b.headers["Docker-Content-Digest"] == img.digest
    assert skopeo.inspect_raw(server.ref("skopeo/between-b", "x")) == img.body
    for digest in img.blobs:  # every blob is reachable through the second repository
        r = server.http("GET", f"/v2/skopeo/between-b/blobs/{digest}")
        assert r.status == 200 and r.body == src.read_blob(digest), digest

    out = OCILayout(workdir / "out")
    skopeo.copy(server.ref("skopeo/between-b", "x"), f"oci:{out.path}:x")
    assert out.resolve("x")["digest"] == img.digest
    assert_same_image(out, src, img)


def test_convert_to_docker_schema2(server, skopeo, workdir: Path) -> None:
    """skopeo rewrites the OCI image as a Docker schema 2 manifest; the registry keeps that too."""
    src = OCILayout(workdir / "src")
    img = build_image(src, "docker-v2s2", sizes=(5000, 40_000))
    src.set_tags({"v1": img.manifest})
    skopeo.copy(f"oci:{src.path}:v1", server.ref("skopeo/docker", "v1"), "--format", "v2s2")

    raw = skopeo.inspect_raw(server.ref("skopeo/docker", "v1"))
    doc = json.loads(raw)
    assert doc["mediaType"] == DOCKER_MANIFEST
    assert [l["digest"] for l in doc["layers"]] == [l["digest"] for l in img.layers]
    r = server.http("GET", "/v2/skopeo/docker/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
    assert r.status == 200 and r.body == raw
    assert r.headers["Content-Type"] == DOCKER_MANIFEST
    assert r.headers["Docker-Content-Digest"] == sha256(raw)

    # The dir: transport stores the manifest as served (an OCI layout would need a conversion).
    out = workdir / "out"
    skopeo.copy(server.ref("skopeo/docker", "v1"), f"dir:{out}", "--preserve-digests")
    assert (out / "manifest.json").read_bytes() == raw
    for layer in img.layers:
        assert (out / layer["digest"].split(":")[1]).read_bytes() == src.read_blob(layer["digest"])


def test_source_repository_deleted_after_cross_repo_copy(server, skopeo, workdir: Path) -> None:
    """Blobs shared with another repository (cross-repository mount or dedupe) survive the
    deletion of the repository they were first pushed to."""
    src = OCILayout(workdir / "src")
    img = build_image(src, "shared", sizes=(80_000, 90_000))
    src.set_tags({"x": img.manifest})
    skopeo.copy(f"oci:{src.path}:x", server.ref("skopeo/shared-a", "x"))
    skopeo.copy(server.ref("skopeo/shared-a", "x"), server.ref("skopeo/shared-b", "x"))

    skopeo("delete", "--tls-verify=false", server.ref("skopeo/shared-a", "x"))
    for digest in img.blobs:
        assert server.http("DELETE", f"/v2/skopeo/shared-a/blobs/{digest}").status == 202
        assert server.http("HEAD", f"/v2/skopeo/shared-a/blobs/{digest}").status == 404

    out = OCILayout(workdir / "out")
    skopeo.copy(server.ref("skopeo/shared-b", "x"), f"oci:{out.path}:x")
    assert out.resolve("x")["digest"] == img.digest
    assert_same_image(out, src, img)


def test_tag_overwrite(server, skopeo, workdir: Path) -> None:
    src = OCILayout(workdir / "src")
    first = build_image(src, "overwrite-1", sizes=(3000,))
    second = build_image(src, "overwrite-2", sizes=(4000,))
    src.set_tags({"one": first.manifest, "two": second.manifest})
    skopeo.copy(f"oci:{src.path}:one", server.ref("skopeo/overwrite", "latest"))
    assert skopeo.inspect_raw(server.ref("skopeo/overwrite", "latest")) == first.body
    skopeo.copy(f"oci:{src.path}:two", server.ref("skopeo/overwrite", "latest"))
    assert skopeo.inspect_raw(server.ref("skopeo/overwrite", "latest")) == second.body
    # The first image is untagged now, still there by digest.
    assert skopeo.inspect_raw(server.ref("skopeo/overwrite", digest=first.digest)) == first.body
    listed = json.loads(skopeo("list-tags", "--tls-verify=false", server.ref("skopeo/overwrite")).stdout)
    assert listed["Tags"] == ["latest"]


def test_unusual_but_valid_names(server, skopeo, workdir: Path) -> None:
    """Repository and tag names at the edges of the grammar that clients accept."""
    src = OCILayout(workdir / "src")
    img = build_image(src, "names", sizes=(500,))
    src.set_tags({"v1": img.manifest})
    repo = "skopeo/a.b/c_d/e__f/g-h/i--j/0/" + "k" * 40
    tags = ["V1.0_rc-1", "_underscore", "t" * 128]
    for tag in tags:
        skopeo.copy(f"oci:{src.path}:v1", server.ref(repo, tag))
        assert skopeo.inspect_raw(server.ref(repo, tag)) == img.body
    listed = json.loads(skopeo("list-tags", "--tls-verify=false", server.ref(repo)).stdout)
    assert sorted(listed["Tags"]) == sorted(tags)


def test_concurrent_pushes(server, skopeo, workdir: Path) -> None:
    """Several skopeo processes pushing the same blobs at once, to several repositories and to
    the same one: all succeed and every copy reads back identical."""
    src = OCILayout(workdir / "src")
    img = build_image(src, "concurrent", sizes=(1_500_000, 1_200_000, 900_000, 10))
    src.set_tags({"v1": img.manifest})
    targets = [("skopeo/concurrent-0", "v1"), ("skopeo/concurrent-1", "v1"), ("skopeo/concurrent-2", "v1"),
               ("skopeo/concurrent-same", "v1"), ("skopeo/concurrent-same", "v1"), ("skopeo/concurrent-same", "v2")]
    with ThreadPoolExecutor(len(targets)) as pool:
        results = list(pool.map(lambda t: skopeo.copy(f"oci:{src.path}:v1", server.ref(*t), check=False),
                                targets))
    for target, r in zip(targets, results):
        assert r.returncode == 0, f"{target}: {r.stderr}"
    for repo, tag in set(targets):
        assert skopeo.inspect_raw(server.ref(repo, tag)) == img.body
        for digest in img.blobs:
            r = server.http("GET", f"/v2/{repo}/blobs/{digest}")
            assert r.status == 200 and sha256(r.body) == digest, (repo, digest)


def test_docker_manifest_list(server, skopeo, workdir: Path) -> None:
    """skopeo converts a two-platform OCI index into a Docker manifest list of schema 2
    manifests; the registry serves both kinds with their own media types, and a registry-to-
    registry copy with --all keeps the list's digest."""
    DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    src = OCILayout(workdir / "src")
    amd = build_image(src, "list-amd64", sizes=(20_000,), arch="amd64")
    arm = build_image(src, "list-arm64", sizes=(30_000,), arch="arm64", variant="v8")
    index, _ = src.index([amd.manifest, arm.manifest])
    src.set_tags({"multi": index})
    skopeo.copy(f"oci:{src.path}:multi", server.ref("skopeo/list-a", "1"), "--all", "--format", "v2s2")

    raw = skopeo.inspect_raw(server.ref("skopeo/list-a", "1"))
    doc = json.loads(raw)
    assert doc["mediaType"] == DOCKER_LIST
    r = server.http("GET", "/v2/skopeo/list-a/manifests/1", headers={"Accept": DOCKER_LIST})
    assert r.status == 200 and r.body == raw and r.headers["Content-Type"] == DOCKER_LIST
    assert [m["platform"]["architecture"] for m in doc["manifests"]] == ["amd64", "arm64"]
    for child in doc["manifests"]:
        assert child["mediaType"] == DOCKER_MANIFEST
        r = server.http("GET", f"/v2/skopeo/list-a/manifests/{child['digest']}", headers={"Accept": DOCKER_MANIFEST})
        assert r.status == 200 and sha256(r.body) == child["digest"] and len(r.body) == child["size"]
        assert r.headers["Content-Type"] == DOCKER_MANIFEST

    skopeo.copy(server.ref("skopeo/list-a", "1"), server.ref("skopeo/list-b", "1"), "--all", "--preserve-digests")
    assert skopeo.inspect_raw(server.ref("skopeo/list-b", "1")) == raw
    r = server.http("HEAD", "/v2/skopeo/list-b/manifests/1", headers={"Accept": DOCKER_LIST})
    assert r.headers["Docker-Content-Digest"] == sha256(raw)
