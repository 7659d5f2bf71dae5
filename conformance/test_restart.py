"""What skopeo pushed is still served, byte for byte, by a new server process on the same
root, this time configured from a YAML file (--config)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from conformance._util import OCILayout
from conformance.conftest import running_server
from conformance.test_skopeo import assert_same_image, build_image


def test_restart_keeps_content(skopeo, workdir: Path) -> None:
    root, config = workdir / "data", workdir / "registry.yaml"
    config.write_text(yaml.safe_dump({"http": {"address": "127.0.0.1", "port": 0},
                                      "storage": {"rootDirectory": str(root)}, "log": {"level": "info"}}))
    src = OCILayout(workdir / "src")
    img = build_image(src, "restart", sizes=(40_000, 700_000))
    index, index_body = src.index([img.manifest])
    src.set_tags({"v1": img.manifest, "list": index})

    with running_server(root, workdir / "first.log", config) as first:
        skopeo.copy(f"oci:{src.path}:v1", first.ref("restart/app", "v1"))
        skopeo.copy(f"oci:{src.path}:list", first.ref("restart/app", "list"), "--all")
        skopeo("delete", "--tls-verify=false", first.ref("restart/app", "list"))

    with running_server(root, workdir / "second.log", config) as second:
        assert second.port != 0
        assert skopeo.inspect_raw(second.ref("restart/app", "v1")) == img.body
        listed = json.loads(skopeo("list-tags", "--tls-verify=false", second.ref("restart/app")).stdout)
        assert listed["Tags"] == ["v1"], "a deleted tag came back after the restart"
        assert second.http("GET", f"/v2/restart/app/manifests/{index['digest']}").status == 404
        out = OCILayout(workdir / "out")
        skopeo.copy(second.ref("restart/app", "v1"), f"oci:{out.path}:v1")
        assert out.resolve("v1")["digest"] == img.digest
        assert_same_image(out, src, img)
