"""A 200 MiB layer through skopeo, generated and checked as a stream (never whole in memory)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conformance._util import OCI_LAYER, OCILayout, sha256_file, write_random_tar

LAYER_FILE_SIZE = 200 << 20  # 200 MiB of random content in the layer's one file
MAX_SERVER_GROWTH = 64 << 20


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) in bytes, where /proc tells it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.mark.slow
def test_200mib_layer_roundtrip(server, skopeo, workdir: Path) -> None:
    src = OCILayout(workdir / "src")
    tmp = workdir / "layer.partial"
    digest, size = write_random_tar(tmp, "big.bin", LAYER_FILE_SIZE, seed="conformance-200MiB")
    assert size > LAYER_FILE_SIZE
    # An uncompressed layer: it is also its own diff_id.
    layer = src.add_blob_file(tmp, digest, size, OCI_LAYER)
    manifest, body = src.image([layer], [digest])
    src.set_tags({"big": manifest})
    peak_before = peak_rss(server.proc.pid)

    # --preserve-digests: skopeo must not recompress the layer (it would by default for a registry).
    skopeo.copy(f"oci:{src.path}:big", server.ref("skopeo/large", "big"), "--preserve-digests", timeout=150)
    shutil.rmtree(src.path)  # free the disk before pulling

    r = server.http("HEAD", f"/v2/skopeo/large/blobs/{digest}")
    assert r.status == 200
    assert int(r.headers["Content-Length"]) == size
    assert r.headers["Docker-Content-Digest"] == digest
    assert skopeo.inspect_raw(server.ref("skopeo/large", "big")) == body

    out = OCILayout(workdir / "out")
    skopeo.copy(server.ref("skopeo/large", "big"), f"oci:{out.path}:big", "--preserve-digests", timeout=150)
    assert out.resolve("big")["digest"] == manifest["digest"]
    assert out.read_blob(manifest["digest"]) == body
    pulled = out.blob_path(digest)
    assert pulled.stat().st_size == size
    assert sha256_file(pulled) == digest
    assert json.loads(body)["layers"][0]["digest"] == digest

    # The server streams blobs: its peak memory must not grow by anything like the layer's size.
    peak_after = peak_rss(server.proc.pid)
    if peak_before is not None and peak_after is not None:
        assert peak_after - peak_before < MAX_SERVER_GROWTH, \
            f"server peak RSS grew by {(peak_after - peak_before) >> 20} MiB moving a {size >> 20} MiB blob"
