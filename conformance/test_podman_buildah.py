"""podman and buildah against the registry, each with its own throw-away vfs store.

Whether these tools can run at all depends on the machine (user namespaces, storage
drivers...). Each is probed first with a command that does not touch the registry; if the
probe fails the tests skip with the tool's own error text. Anything failing after that is
a real failure."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conformance._util import random_tar, require_binary, rng, run, sha256


@dataclass
class Store:
    root: Path
    runroot: Path
    tmpdir: Path


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    base = Path(tempfile.mkdtemp(prefix="conformance-store-"))
    try:
        s = Store(base / "root", base / "runroot", base / "tmp")
        for d in (s.root, s.runroot, s.tmpdir):
            d.mkdir()
        yield s
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Tool:
    def __init__(self, name: str, global_args: list[str], env: dict[str, str]):
        self.binary = require_binary(name)
        self.name = name
        self.global_args = global_args
        self.env = env

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([self.binary, *self.global_args, *args], env=self.env, check=check, timeout=timeout)

    def probe(self, *args: str) -> None:
        r = self(*args, check=False, timeout=60)
        if r.returncode != 0:
            err = (r.stderr.strip() or r.stdout.strip() or f"exit status {r.returncode}")[-2000:]
            pytest.skip(f"{self.name} cannot run in this environment: `{self.name} {' '.join(args)}` "
                        f"(with --storage-driver vfs and temp --root/--runroot) failed: {err}")


def _env(client_env, store: Store) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {**client_env.env, "TMPDIR": str(store.tmpdir)}


@pytest.fixture(scope="module")
def buildah(client_env, store: Store) -> Tool:  # type: ignore[no-untyped-def]
    tool = Tool("buildah", ["--storage-driver", "vfs", "--root", str(store.root), "--runroot", str(store.runroot)],
                _env(client_env, store))
    tool.probe("from", "--name", "conformance-probe", "scratch")
    tool("rm", "conformance-probe")
    return tool


@pytest.fixture(scope="module")
def podman(client_env, store: Store) -> Tool:  # type: ignore[no-untyped-def]
    tool = Tool("podman", ["--storage-driver", "vfs", "--root", str(store.root), "--runroot", str(store.runroot),
                           "--tmpdir", str(store.tmpdir / "libpod"), "--events-backend", "none",
                           "--cgroup-manager", "cgroupfs"], _env(client_env, store))
    tool.probe("images")
    return tool


def _image_ids(tool: Tool) -> set[str]:
    ids = {i.removeprefix("sha256:") for i in tool("images", "--no-trunc", "--quiet").stdout.split()}
    assert all(len(i) == 64 for i in ids), ids
    return ids


def _manifest(server, repo: str, ref: str) -> tuple[str, bytes, str]:  # type: ignore[no-untyped-def]
    r = server.http("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ", ".join([
        "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"])})
    assert r.status == 200, r.body
    return r.headers["Docker-Content-Digest"], r.body, r.headers["Content-Type"]


def test_buildah_scratch_push_pull(buildah: Tool, server, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    payload = {"hello.txt": b"hello from buildah\n", "random.bin": rng("buildah").randbytes(512_000)}
    for name, data in payload.items():
        (workdir / name).write_bytes(data)
    local = "localhost/conformance/buildah:1"
    remote = server.ref("buildah/scratch", "1")

    ctr = buildah("from", "--name", "conformance-buildah", "scratch").stdout.strip()
    buildah("copy", ctr, str(workdir / "hello.txt"), str(workdir / "random.bin"), "/data/")
    buildah("config", "--cmd", "/data/hello.txt", "--label", "org.example.suite=conformance", ctr)
    image_id = buildah("commit", "--format", "oci", "--rm", ctr, local).stdout.strip().splitlines()[-1]
    assert len(image_id) == 64, image_id
    assert image_id in _image_ids(buildah)

    digestfile = workdir / "digest"
    buildah("push", "--tls-verify=false", "--retry", "0", "--digestfile", str(digestfile), local, remote)
    pushed = digestfile.read_text().strip()

    digest, body, ctype = _manifest(server, "buildah/scratch", "1")
    assert digest == pushed == sha256(body)
    doc = json.loads(body)
    assert ctype == doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert doc["config"]["digest"] == f"sha256:{image_id}"

    buildah("rmi", local)
    assert image_id not in _image_ids(buildah)

    buildah("pull", "--tls-verify=false", "--retry", "0", remote)
    ids = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}} {{.FromImageDigest}}",
                  remote.removeprefix("docker://")).stdout.split()
    assert ids == [image_id, pushed], "the pulled image differs from the one built and pushed"

    # The files inside made the trip intact.
    ctr = buildah("from", "--name", "conformance-buildah-check", remote.removeprefix("docker://")).stdout.strip()
    try:
        mnt = Path(buildah("mount", ctr).stdout.strip())
        for name, data in payload.items():
            assert (mnt / "data" / name).read_bytes() == data, name
        buildah("umount", ctr)
    finally:
        buildah("rm", ctr, check=False)
    buildah("rmi", "--force", image_id)


def test_podman_push_pull(podman: Tool, server, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    files = {"etc/motd": 20, "opt/blob.bin": 700_000}
    tar = random_tar(rng("podman"), files)
    (workdir / "rootfs.tar").write_bytes(tar)
    local = "localhost/conformance/podman:1"
    podman("import", "--change", "CMD=/opt/blob.bin", str(workdir / "rootfs.tar"), local)
    image_id = podman("image", "inspect", "--format", "{{.Id}}", local).stdout.strip()
    assert image_id in _image_ids(podman)

    pushed = {}
    for fmt in ("oci", "v2s2"):
        digestfile = workdir / f"digest-{fmt}"
        podman("push", "--tls-verify=false", "--format", fmt, "--digestfile", str(digestfile),
               local, server.ref("podman/img", fmt))
        pushed[fmt] = digestfile.read_text().strip()
        digest, body, ctype = _manifest(server, "podman/img", fmt)
        assert digest == pushed[fmt] == sha256(body)
        want = {"oci": "application/vnd.oci.image.manifest.v1+json",
                "v2s2": "application/vnd.docker.distribution.manifest.v2+json"}[fmt]
        # containers/image 5.23 leaves mediaType out of OCI manifests: Content-Type told the registry
        assert ctype == json.loads(body).get("mediaType", want) == want

    podman("rmi", "--force", local)
    assert image_id not in _image_ids(podman)

    for fmt in ("oci", "v2s2"):
        ref = f"{server.host}/podman/img:{fmt}"
        podman("pull", "--tls-verify=false", ref)
        got = podman("image", "inspect", "--format", "{{.Id}} {{.Digest}}", ref).stdout.split()
        if fmt == "oci":
            assert got == [image_id, pushed[fmt]], "the pulled image differs from the one pushed"
        else:  # the schema 2 config is a conversion of the OCI one: a different image id
            assert got[1] == pushed[fmt]
        mnt = Path(podman("image", "mount", ref).stdout.strip())
        try:
            with_content = rng("podman")  # the same generator random_tar drew from
            expected = {name: with_content.randbytes(size) for name, size in files.items()}
            for name, data in expected.items():
                assert (mnt / name).read_bytes() == data, name
        finally:
            podman("image", "unmount", ref, check=False)
        podman("rmi", "--force", ref)

    # By digest, too.
    ref = f"{server.host}/podman/img@{pushed['oci']}"
    podman("pull", "--tls-verify=false", ref)
    assert podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip() == image_id
    podman("rmi", "--force", image_id)


def test_podman_manifest_list(podman: Tool, server, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    """``podman manifest create/add/push --all``: an index built by podman and its image."""
    (workdir / "rootfs.tar").write_bytes(random_tar(rng("podman-list"), {"bin/tool": 300_000}))
    image = "localhost/conformance/podman-list-image:1"
    listname = "localhost/conformance/podman-list:1"
    podman("import", str(workdir / "rootfs.tar"), image)
    podman("manifest", "create", listname)
    try:
        podman("manifest", "add", listname, f"containers-storage:{image}")
        digestfile = workdir / "digest"
        podman("manifest", "push", "--all", "--tls-verify=false", "--digestfile", str(digestfile),
               listname, server.ref("podman/list", "1"))
        pushed = digestfile.read_text().strip()
        r = server.http("GET", "/v2/podman/list/manifests/1", headers={"Accept": ", ".join([
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json"])})
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == pushed == sha256(r.body)
        doc = json.loads(r.body)
        assert r.headers["Content-Type"] == doc.get("mediaType", r.headers["Content-Type"])
        assert len(doc["manifests"]) == 1
        child = doc["manifests"][0]
        c = server.http("GET", f"/v2/podman/list/manifests/{child['digest']}", headers={"Accept": child["mediaType"]})
        assert c.status == 200 and sha256(c.body) == child["digest"] and len(c.body) == child["size"]
        image_id = podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
        assert json.loads(c.body)["config"]["digest"] == f"sha256:{image_id}"

        # Pulling the list resolves it to the one image in it.
        podman("rmi", "--force", image)
        podman("pull", "--tls-verify=false", f"{server.host}/podman/list:1")
        got = podman("image", "inspect", "--format", "{{.Id}}", f"{server.host}/podman/list:1").stdout.strip()
        assert got == image_id
    finally:
        podman("manifest", "rm", listname, check=False)
        podman("rmi", "--force", "--all", check=False)
