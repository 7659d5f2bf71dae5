"""Helpers for the real-client conformance tests: plain HTTP, subprocesses,
and an OCI image layout written by hand (no tool of ours builds it)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

# Content is random but seeded: ``rng("name")`` gives the same bytes for the same name within a
# run. The per-run salt keeps digests from repeating across runs, so that skopeo's persistent
# blob-info cache (/var/lib/containers/cache for root, not ours to redirect) never remembers a
# blob from an earlier run and changes what the client does. CONFORMANCE_SEED=<salt> replays a run.
SALT = os.environ.get("CONFORMANCE_SEED") or os.urandom(8).hex()


def rng(name: str) -> random.Random:
    return random.Random(f"{SALT}:{name}")


# Debian package that ships each client binary, for skip messages.
DEBIAN_PACKAGE = {"skopeo": "skopeo", "podman": "podman", "buildah": "buildah"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: install the Debian package '{DEBIAN_PACKAGE.get(name, name)}' "
                    f"(apt-get install {DEBIAN_PACKAGE.get(name, name)})")
    return path


# ---------------------------------------------------------------- HTTP

@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def http(base: str, method: str, path: str, body: bytes | None = None,
         headers: Mapping[str, str] | None = None, timeout: float = 30) -> Response:
    req = urllib.request.Request(base + path, data=body, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return Response(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, e.headers, e.read())


# ---------------------------------------------------------------- subprocesses

def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120,
        check: bool = True, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client in its own process group; on timeout the whole group is killed."""
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        if proc.poll() is None:  # pragma: no cover - interrupted
            kill_group(proc)
            proc.wait()
    result = subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"exit status {proc.returncode}: {' '.join(cmd)}\nstdout:\n{out}\nstderr:\n{err}")
    return result


# ---------------------------------------------------------------- content

def random_tar(rng: random.Random, files: Mapping[str, int]) -> bytes:
    """A small tar archive of files with random content (deterministic for a seeded rng)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, size in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def write_random_tar(path: Path, name: str, size: int, seed: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """Stream a tar holding one random file of ``size`` bytes to ``path`` without keeping it in
    memory; returns (sha256 digest, total size)."""
    gen = rng(seed)
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    h = hashlib.sha256()
    total = 0
    with open(path, "wb") as f:
        def put(block: bytes) -> None:
            nonlocal total
            f.write(block)
            h.update(block)
            total += len(block)
        put(header)
        left = size
        while left:
            n = min(chunk, left)
            put(gen.randbytes(n))
            left -= n
        pad = (-size) % 512
        put(b"\0" * pad + b"\0" * 1024)  # padding, then the two zero blocks ending the archive
    return "sha256:" + h.hexdigest(), total


# ---------------------------------------------------------------- OCI image layout

def _desc(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


class OCILayout:
    """An OCI image layout directory (image-spec image-layout.md), written by hand."""

    def __init__(self, path: Path):
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (path / "oci-layout").exists():
            (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def blob_path(self, digest: str) -> Path:
        algo, hexpart = digest.split(":", 1)
        return self.path / "blobs" / algo / hexpart

    def add_blob(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        self.blob_path(digest).write_bytes(data)
        return _desc(media_type, digest, len(data), **extra)

    def add_blob_file(self, src: Path, digest: str, size: int, media_type: str) -> dict[str, Any]:
        os.replace(src, self.blob_path(digest))
        return _desc(media_type, digest, size)

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def image(self, layers: list[dict[str, Any]], diff_ids: list[str], *, os_: str = "linux",
              arch: str = "amd64", variant: str | None = None,
              annotations: Mapping[str, str] | None = None) -> tuple[dict[str, Any], bytes]:
        """Write a config and an image manifest over already-written layers."""
        cfg: dict[str, Any] = {"created": "2023-11-14T22:13:20Z", "architecture": arch, "os": os_,
                               "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"]},
                               "rootfs": {"type": "layers", "diff_ids": diff_ids},
                               "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "conformance"}
                                           for _ in layers]}
        if variant:
            cfg["variant"] = variant
        config = self.add_blob(json.dumps(cfg, separators=(",", ":")).encode(), OCI_CONFIG)
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
        if annotations:
            doc["annotations"] = dict(annotations)
        body = json.dumps(doc, indent=2).encode()  # not compact: byte preservation must not depend on it
        platform = {"architecture": arch, "os": os_, **({"variant": variant} if variant else {})}
        return self.add_blob(body, OCI_MANIFEST, platform=platform), body

    def index(self, manifests: list[dict[str, Any]]) -> tuple[dict[str, Any], bytes]:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
        return self.add_blob(body, OCI_INDEX), body

    def set_tags(self, tagged: Mapping[str, dict[str, Any]]) -> None:
        """Write index.json naming each descriptor by its tag (org.opencontainers.image.ref.name)."""
        entries = []
        for tag, desc in tagged.items():
            entry = {k: v for k, v in desc.items() if k != "platform"}
            entry["annotations"] = {REF_NAME: tag}
            entries.append(entry)
        (self.path / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                           "manifests": entries}))

    def resolve(self, tag: str) -> dict[str, Any]:
        index = json.loads((self.path / "index.json").read_text())
        found = [m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) == tag]
        assert len(found) == 1, f"tag {tag!r} in {self.path}/index.json: {index}"
        return found[0]


def random_gzip_layer(layout: OCILayout, rng: random.Random, files: Mapping[str, int]) -> tuple[dict[str, Any], str]:
    """A tar+gzip layer of random files; returns (descriptor, diff_id)."""
    tar = random_tar(rng, files)
    return layout.add_blob(gzip_bytes(tar), OCI_LAYER_GZIP), sha256(tar)

