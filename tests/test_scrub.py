"""Scrub (issue 7), through the API, on SQLite and PostgreSQL.

A populated store (sha256, sha512 and blake3 blobs and manifests, an index with
children) gets every kind of damage on disk: flipped bits, truncation, extra
bytes, a deleted blob file, a corrupted and a deleted manifest file, a manifest
whose layer row is gone and one whose layer file is gone. A deep and a quick
pass must each find exactly those, name them per repository and tag, never
serve the bad bytes, and report ok again once a push of the same content has
repaired them. Separate tests cover hard-linked copies (mounts), the cursor,
cancellation, pacing, the scheduled pass's metrics and the CLI.

Damage is only ever done to a file with one link: a mount shares the inode, and
damaging it damages every repository holding that copy (one test does that on
purpose).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import registry.maintenance.scrub as scrub_mod
from registry.app import create_app
from registry.config import Config, to_dict
from registry.digest import parse_digest
from registry.keys import CONFIG, SERVICES
from registry.maintenance.scrub import Pacer, report, scrub
from registry.meta.base import ScrubItem
from tests.conftest import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, make_config
from tests.helpers import DIGESTERS, assert_error

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@pytest.fixture(params=["sqlite", "postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    """Both metadata stores, blobs on disk (damage is done to files); S3 has its own test below."""
    if request.param == "postgres":
        dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
        return make_config(tmp_path / "data", storage={"commit": False},
                           meta={"driver": "postgres", "postgres": {"dsn": dsn, "schema": schema, "pool_size": 4}})
    return make_config(tmp_path / "data", storage={"commit": False})


# ---------------------------------------------------------------- helpers

def svc_of(client):  # type: ignore[no-untyped-def]
    return client.app[SERVICES]


def blob_path(client, repo: str, digest: str) -> Path:  # type: ignore[no-untyped-def]
    return client.app[CONFIG].root / repo / parse_digest(digest).path


def content(label: str, size: int) -> bytes:
    """Bytes no other test blob has (so no two repositories share a file by accident)."""
    seed = f"{label}:".encode()
    return (seed * (size // len(seed) + 1))[:size]


async def put_blob(client, repo: str, data: bytes, alg: str = "sha256") -> str:  # type: ignore[no-untyped-def]
    digest = DIGESTERS[alg](data)
    r = await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest}", data=data)
    assert r.status == 201, await r.text()
    return digest


async def put_manifest(client, repo: str, doc: dict[str, Any], tags: list[str], alg: str = "sha256",  # type: ignore[no-untyped-def]
                       media_type: str = OCI_MANIFEST) -> tuple[str, bytes]:
    """Push by digest (in ``alg``), with ``?tag=`` for each tag."""
    body = json.dumps(doc).encode()
    digest = DIGESTERS[alg](body)
    query = "&".join(f"tag={t}" for t in tags)
    r = await client.put(f"/v2/{repo}/manifests/{digest}" + (f"?{query}" if query else ""), data=body,
                         headers={"Content-Type": media_type})
    assert r.status == 201, await r.text()
    assert r.headers["Docker-Content-Digest"] == digest
    return digest, body


class Image:
    def __init__(self, repo: str, digest: str, body: bytes, config: tuple[str, bytes],
                 layers: list[tuple[str, bytes]]):
        self.repo, self.digest, self.body, self.config, self.layers = repo, digest, body, config, layers


async def image(client, repo: str, tags: list[str], layers: list[bytes], alg: str = "sha256",  # type: ignore[no-untyped-def]
                label: str | None = None) -> Image:
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "label": label or f"{repo}:{tags}"}).encode()
    cd = await put_blob(client, repo, cfg, alg)
    descs = []
    for layer in layers:
        descs.append((await put_blob(client, repo, layer, alg), layer))
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": len(cfg)},
           "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for d, b in descs]}
    digest, body = await put_manifest(client, repo, doc, tags, alg)
    return Image(repo, digest, body, (cd, cfg), descs)


async def index(client, repo: str, tags: list[str], children: list[Image]) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
           "manifests": [{"mediaType": OCI_MANIFEST, "digest": c.digest, "size": len(c.body),
                          "platform": {"architecture": f"arch{i}", "os": "linux"}} for i, c in enumerate(children)]}
    return await put_manifest(client, repo, doc, tags, media_type=OCI_INDEX)


def single_link(path: Path) -> Path:
    assert path.is_file(), path
    assert os.stat(path).st_nlink == 1, f"{path} is shared with another copy: damaging it would damage both"
    return path


def flip_bits(path: Path, offset: int | None = None) -> None:
    with open(single_link(path), "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        offset = size // 2 if offset is None else offset
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x21]))


def truncate(path: Path, cut: int) -> None:
    os.truncate(single_link(path), os.stat(path).st_size - cut)


def append(path: Path, extra: bytes) -> None:
    with open(single_link(path), "ab") as f:
        f.write(extra)


def by_tag(rows: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
    """(repository, tag) -> {affected blob: error}; {} for a tag reported ok."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        bad = out.setdefault((r["repository"], r["tag"]), {})
        if r["status"] == "ok":
            assert r["affected_blob"] == "" and r["error"] == "", r
        else:
            assert r["status"] == "affected", r
            bad[r["affected_blob"]] = r["error"]
    for key, bad in out.items():  # a tag is either one "ok" row or only "affected" rows
        statuses = {r["status"] for r in rows if (r["repository"], r["tag"]) == key}
        assert statuses == ({"affected"} if bad else {"ok"}), (key, statuses)
    return out


def findings(result) -> set[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    return {(f.repository, f.kind, f.digest) for f in result.damaged}


async def pull(client, repo: str, digest: str) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    r = await client.get(f"/v2/{repo}/blobs/{digest}")
    return r.status, await r.read()


async def assert_refused(client, repo: str, digest: str, bad: bytes | None = None) -> None:  # type: ignore[no-untyped-def]
    """Neither GET nor HEAD serves a blob known to be damaged; the error is JSON, never its bytes."""
    r = await client.get(f"/v2/{repo}/blobs/{digest}")
    errs = await assert_error(r, 404, "BLOB_UNKNOWN")
    assert errs[0]["detail"]["digest"] == digest
    if bad:
        body = await r.read()
        assert bad[:64] not in body
    r = await client.head(f"/v2/{repo}/blobs/{digest}")
    await assert_error(r, 404)
    r = await client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-9"})
    await assert_error(r, 404, "BLOB_UNKNOWN")


async def assert_serves(client, repo: str, digest: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    status, body = await pull(client, repo, digest)
    assert status == 200, (repo, digest, body[:300])
    assert body == data


# ---------------------------------------------------------------- the populated store

class Store:
    """What ``populate`` pushed, and what each damage is expected to produce."""

    def __init__(self) -> None:
        self.healthy: list[tuple[str, str, bytes]] = []  # (repo, digest, bytes) that must keep pulling
        self.damaged: dict[str, tuple[str, str, bytes]] = {}  # kind of damage -> (repo, digest, original bytes)
        self.manifests: dict[str, tuple[str, str, bytes]] = {}
        self.tags: set[tuple[str, str]] = set()
        self.blobs = 0
        self.manifest_rows = 0


async def populate(client) -> Store:  # type: ignore[no-untyped-def]
    s = Store()

    async def img(repo: str, tags: list[str], layers: list[bytes], alg: str = "sha256") -> Image:
        i = await image(client, repo, tags, layers, alg)
        s.tags.update((repo, t) for t in tags)
        return i

    # flipped bits: v1 and v3 share the layer, v2 in the same repository is healthy
    flip = await img("s/flip", ["v1"], [content("flip", 300_000), content("flip-ok", 5000)])
    await img("s/flip", ["v3"], [flip.layers[0][1]])
    v2 = await img("s/flip", ["v2"], [content("flip-v2", 100_000)])
    s.damaged["flip"] = ("s/flip", *flip.layers[0])
    s.healthy += [("s/flip", *flip.layers[1]), ("s/flip", *v2.layers[0]), ("s/flip", *flip.config)]
    s.blobs += 6  # config x3, flip, flip-ok, flip-v2
    s.manifest_rows += 3

    trunc = await img("s/trunc", ["v1"], [content("trunc", 200_000)])
    s.damaged["trunc"] = ("s/trunc", *trunc.layers[0])
    s.healthy.append(("s/trunc", *trunc.config))
    extra = await img("s/extra", ["v1"], [content("extra", 70_000)])
    s.damaged["extra"] = ("s/extra", *extra.layers[0])
    s.healthy.append(("s/extra", *extra.config))
    nocfg = await img("s/nocfg", ["v1"], [content("nocfg", 1000)])
    s.damaged["nocfg"] = ("s/nocfg", *nocfg.config)
    s.healthy.append(("s/nocfg", *nocfg.layers[0]))
    nofile = await img("s/nofile", ["v1"], [content("nofile", 90_000), content("nofile-ok", 800)])
    s.damaged["nofile"] = ("s/nofile", *nofile.layers[0])
    s.healthy.append(("s/nofile", *nofile.layers[1]))
    norow = await img("s/norow", ["v1"], [content("norow", 4000)])
    s.damaged["norow"] = ("s/norow", *norow.layers[0])
    s.healthy.append(("s/norow", *norow.config))
    s.blobs += 2 + 2 + 2 + 3 + 2
    s.manifest_rows += 5

    mfile = await img("s/mfile", ["v1"], [content("mfile", 2000)])
    s.manifests["mfile"] = ("s/mfile", mfile.digest, mfile.body)
    mgone = await img("s/mgone", ["v1", "latest"], [content("mgone", 2000)])
    s.manifests["mgone"] = ("s/mgone", mgone.digest, mgone.body)
    s.blobs += 4
    s.manifest_rows += 2

    # other algorithms: healthy ones must stay ok (zot reports sha512 blobs as corrupt); a damaged
    # blake3 layer is found with blake3
    big512 = await img("s/sha512", ["v1"], [content("sha512-a", 150_000), content("sha512-b", 3000)], "sha512")
    s.healthy += [("s/sha512", *big512.layers[0]), ("s/sha512", *big512.layers[1]), ("s/sha512", *big512.config)]
    b3 = await img("s/blake3", ["v1"], [content("blake3-a", 150_000), content("blake3-b", 3000)], "blake3")
    s.healthy += [("s/blake3", *b3.layers[0]), ("s/blake3", *b3.config)]
    b3bad = await img("s/blake3", ["v2"], [content("blake3-bad", 120_000)], "blake3")
    s.damaged["b3flip"] = ("s/blake3", *b3bad.layers[0])
    s.blobs += 3 + 3 + 2
    s.manifest_rows += 3

    # an index with children (untagged, one sha512), one child damaged; "good" reaches only healthy ones
    a = await image(client, "s/index", [], [content("child-a", 10_000)], "sha512")
    b = await image(client, "s/index", ["b"], [content("child-b", 80_000)])
    c = await image(client, "s/index", [], [content("child-c", 10_000)])
    await index(client, "s/index", ["all"], [a, b])
    await index(client, "s/index", ["good"], [a, c])
    s.tags.update({("s/index", "all"), ("s/index", "good"), ("s/index", "b")})
    s.damaged["child"] = ("s/index", *b.layers[0])
    s.healthy += [("s/index", *a.layers[0]), ("s/index", *c.layers[0])]
    s.blobs += 6
    s.manifest_rows += 5

    healthy = await img("s/healthy", ["v1", "v2"], [content("healthy", 100_000)])
    s.healthy.append(("s/healthy", *healthy.layers[0]))
    s.blobs += 2
    s.manifest_rows += 1
    return s


async def damage(client, s: Store) -> None:  # type: ignore[no-untyped-def]
    root = client.app[CONFIG].root
    flip_bits(blob_path(client, *s.damaged["flip"][:2]))
    truncate(blob_path(client, *s.damaged["trunc"][:2]), 100)
    append(blob_path(client, *s.damaged["extra"][:2]), b"\0trailing garbage")
    os.unlink(single_link(blob_path(client, *s.damaged["nocfg"][:2])))
    os.unlink(single_link(blob_path(client, *s.damaged["nofile"][:2])))
    repo, digest, _ = s.damaged["norow"]
    r = await client.delete(f"/v2/{repo}/blobs/{digest}")
    assert r.status == 202, await r.text()
    assert not blob_path(client, repo, digest).exists()
    flip_bits(blob_path(client, *s.damaged["b3flip"][:2]), 0)
    flip_bits(blob_path(client, *s.damaged["child"][:2]), 12345)
    repo, digest, body = s.manifests["mfile"]
    path = root / repo / parse_digest(digest).path
    path.write_bytes(body.replace(b'"schemaVersion": 2', b'"schemaVersion": 3'))
    repo, digest, _ = s.manifests["mgone"]
    os.unlink(root / repo / parse_digest(digest).path)


def expected_report(s: Store, quick: bool) -> dict[tuple[str, str], dict[str, str]]:
    """(repository, tag) -> {affected digest: a fragment its error must contain}."""
    def size(kind: str) -> int:
        return len(s.damaged[kind][2])
    hashed = "xxh3 mismatch" if quick else "does not match its digest (sha256 is "
    want: dict[tuple[str, str], dict[str, str]] = {t: {} for t in s.tags}
    want[("s/flip", "v1")] = want[("s/flip", "v3")] = {s.damaged["flip"][1]: hashed}
    want[("s/trunc", "v1")] = {s.damaged["trunc"][1]: f"file is {size('trunc') - 100} bytes, expected {size('trunc')}"}
    want[("s/extra", "v1")] = {s.damaged["extra"][1]: f"file is {size('extra') + 17} bytes, expected {size('extra')}"}
    want[("s/nocfg", "v1")] = {s.damaged["nocfg"][1]: "file missing"}
    want[("s/nofile", "v1")] = {s.damaged["nofile"][1]: "file missing"}
    want[("s/norow", "v1")] = {s.damaged["norow"][1]: "blob missing from the repository"}
    want[("s/mfile", "v1")] = {s.manifests["mfile"][1]: "manifest file was corrupt; rewritten"}
    want[("s/mgone", "v1")] = want[("s/mgone", "latest")] = {
        s.manifests["mgone"][1]: "manifest file was missing; rewritten"}
    want[("s/blake3", "v2")] = {s.damaged["b3flip"][1]: "xxh3 mismatch" if quick else "(blake3 is "}
    want[("s/index", "all")] = want[("s/index", "b")] = {s.damaged["child"][1]: hashed}
    return want


def assert_report(rows: list[dict[str, str]], want: dict[tuple[str, str], dict[str, str]]) -> None:
    got = by_tag(rows)
    assert set(got) == set(want), set(got) ^ set(want)
    for key, bad in want.items():
        assert set(got[key]) == set(bad), (key, got[key], bad)
        for digest, fragment in bad.items():
            assert fragment in got[key][digest], (key, digest, got[key][digest], fragment)


async def api_report(client, repo: str | None = None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = await client.get("/_registry/scrub" + (f"?repo={repo}" if repo else ""))
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("application/json")
    return await r.json()


def as_api(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"repository": r["repository"], "tag": r["tag"], "status": r["status"],
             "affectedBlob": r["affected_blob"], "error": r["error"]} for r in rows]


# ---------------------------------------------------------------- every kind of damage

@pytest.mark.parametrize("quick", [False, True], ids=["deep", "quick"])
async def test_every_damage_is_found_named_refused_and_repaired(client, quick):
    svc = svc_of(client)
    s = await populate(client)

    # a healthy store: nothing reported, every tag ok, and everything was checked
    r = await scrub(svc, quick=quick)
    assert r.complete and r.damaged == [], r.damaged
    assert (r.blobs, r.manifests) == (s.blobs, s.manifest_rows)
    assert r.bytes == sum(i.size for i in await svc.meta.scrub_items(None, 100_000) if i.kind == "blob")
    rows = await report(svc)
    assert {(x["repository"], x["tag"]) for x in rows} == s.tags
    assert all(x["status"] == "ok" for x in rows), [x for x in rows if x["status"] != "ok"]

    await damage(client, s)
    r = await scrub(svc, quick=quick)
    assert r.complete
    want_found = {(repo, "blob", d) for k, (repo, d, _) in s.damaged.items() if k != "norow"}
    want_found |= {(repo, "manifest", d) for repo, d, _ in s.manifests.values()}
    assert findings(r) == want_found  # exactly the damage: nothing healthy, no sha512/blake3 false alarm
    assert not any(f.digest.startswith("sha512:") for f in r.damaged)
    assert [f.digest for f in r.damaged if f.digest.startswith("blake3:")] == [s.damaged["b3flip"][1]]
    assert (r.blobs, r.manifests) == (s.blobs - 1, s.manifest_rows)  # the deleted row is gone

    want = expected_report(s, quick)
    rows = await report(svc)
    assert_report(rows, want)
    # one repository at a time
    assert_report(await report(svc, "s/flip"), {k: v for k, v in want.items() if k[0] == "s/flip"})

    # GET /_registry/scrub serves the same report
    doc = await api_report(client)
    assert doc["scrubResult"] == as_api(rows)
    assert doc["affected"] == sum(len(v) for v in want.values())
    assert doc["lastCompletePass"] is not None and doc["passInProgress"] is False
    doc = await api_report(client, "s/index")
    assert doc["scrubResult"] == as_api(await report(svc, "s/index"))
    assert {x["tag"] for x in doc["scrubResult"] if x["status"] == "affected"} == {"all", "b"}

    # damaged blobs are refused (never their bytes); everything healthy still pulls
    for kind, (repo, digest, data) in s.damaged.items():
        await assert_refused(client, repo, digest, data if kind not in ("nocfg", "nofile", "norow") else None)
    for repo, digest, data in s.healthy:
        await assert_serves(client, repo, digest, data)
    # the manifest files were rewritten from the metadata store; manifests are served from it throughout
    for repo, digest, body in s.manifests.values():
        assert (client.app[CONFIG].root / repo / parse_digest(digest).path).read_bytes() == body
        for ref in (digest, "v1"):
            resp = await client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
            assert resp.status == 200 and await resp.read() == body
    # mounting a damaged copy is refused too: an upload session instead
    repo, digest, _ = s.damaged["flip"]
    resp = await client.post(f"/v2/s/elsewhere/blobs/uploads/?mount={digest}&from={repo}")
    assert resp.status == 202, await resp.text()

    # a push of the same content repairs each damaged blob
    for kind, (repo, digest, data) in s.damaged.items():
        alg = parse_digest(digest).algorithm
        assert await put_blob(client, repo, data, alg) == digest
        await assert_serves(client, repo, digest, data)
    after = await report(svc)
    assert all(x["status"] == "ok" for x in after if x["repository"] != "s/mfile" and x["repository"] != "s/mgone")

    # and the next pass finds nothing: the manifest findings were reported once
    r = await scrub(svc, quick=quick)
    assert r.damaged == [], r.damaged
    assert (r.blobs, r.manifests) == (s.blobs, s.manifest_rows)
    rows = await report(svc)
    assert {(x["repository"], x["tag"]) for x in rows} == s.tags
    assert all(x["status"] == "ok" for x in rows), [x for x in rows if x["status"] != "ok"]
    assert (await api_report(client))["affected"] == 0


async def test_quick_pass_rehashes_with_the_digest_when_no_xxh3_was_recorded(client):
    """The xxh3 is recorded per digest at write time and shared by every copy (a mount included);
    a blob with none recorded (reindexed from a layout on disk) is rehashed with its digest's
    algorithm even in a quick pass."""
    svc = svc_of(client)
    img = await image(client, "q/a", ["v1"], [content("quick-a", 50_000)])
    digest, data = img.layers[0]
    assert await svc.meta.checksum_get(digest) == __import__("xxhash").xxh3_128_hexdigest(data)
    resp = await client.post(f"/v2/q/b/blobs/uploads/?mount={digest}&from=q/a")
    assert resp.status == 201
    other = await image(client, "q/c", ["v1"], [content("quick-c", 50_000)], "sha512")
    d512 = other.layers[0][0]
    with open(blob_path(client, "q/a", digest), "r+b") as f:
        f.seek(10)
        f.write(b"X")
    flip_bits(blob_path(client, "q/c", d512))
    r = await scrub(svc, quick=True)
    errors = {(f.repository, f.digest): f.error for f in r.damaged}
    shared = os.stat(blob_path(client, "q/a", digest)).st_ino == os.stat(blob_path(client, "q/b", digest)).st_ino
    assert set(errors) == {("q/a", digest), ("q/c", d512)} | ({("q/b", digest)} if shared else set())
    assert all("xxh3 mismatch" in e for e in errors.values())
    # without the recorded checksums, the quick pass falls back to each digest's own algorithm
    if client.app[CONFIG].meta.driver == "sqlite":
        await svc.meta._write(lambda conn: conn.execute("DELETE FROM checksums") and None)
    else:
        await svc.meta._call("execute", "DELETE FROM checksums")
    assert await svc.meta.checksum_get(digest) is None
    r = await scrub(svc, quick=True)
    errors = {(f.repository, f.digest): f.error for f in r.damaged}
    assert "(sha256 is " in errors[("q/a", digest)] and "(sha512 is " in errors[("q/c", d512)]


async def test_hard_linked_copies_are_all_found_and_never_served(client):
    svc = svc_of(client)
    src = await image(client, "h/src", ["v1"], [content("shared", 120_000)])
    digest, data = src.layers[0]
    resp = await client.post(f"/v2/h/dst/blobs/uploads/?mount={digest}&from=h/src")
    assert resp.status == 201, await resp.text()
    await image(client, "h/dst", ["v1"], [data])  # the layer is already there (mounted)
    a, b = blob_path(client, "h/src", digest), blob_path(client, "h/dst", digest)
    assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_nlink == 2
    with open(a, "r+b") as f:  # damaging one file damages both repositories' copies
        f.seek(1000)
        f.write(b"\xff\xfe")
    r = await scrub(svc)
    assert findings(r) == {("h/src", "blob", digest), ("h/dst", "blob", digest)}
    assert_report(await report(svc), {("h/src", "v1"): {digest: "does not match"},
                                      ("h/dst", "v1"): {digest: "does not match"}})
    await assert_refused(client, "h/src", digest)
    await assert_refused(client, "h/dst", digest)
    # a push into one repository repairs its copy (and, with dedupe, every holder of the bad inode);
    # whatever is not repaired yet is still refused, never served
    await put_blob(client, "h/dst", data)
    await assert_serves(client, "h/dst", digest, data)
    status, body = await pull(client, "h/src", digest)
    assert (status, body) == (200, data) or status == 404
    r = await scrub(svc)
    assert findings(r) <= {("h/src", "blob", digest)}
    await put_blob(client, "h/src", data)
    r = await scrub(svc)
    assert r.damaged == []
    assert_report(await report(svc), {("h/src", "v1"): {}, ("h/dst", "v1"): {}})
    await assert_serves(client, "h/src", digest, data)


@pytest.mark.parametrize("dedupe", [True, False], ids=["dedupe", "no-dedupe"])
async def test_mount_never_links_a_damaged_copy(aiohttp_client, config, dedupe):
    """With or without ``from``, whichever repository the registry would pick: the new
    repository must not get the damaged bytes (an upload session instead, which repairs)."""
    client = await aiohttp_client(create_app(config.replace(storage={"dedupe": dedupe})))
    svc = svc_of(client)
    img = await image(client, "mnt/src", ["v1"], [content("mount-src", 70_000)])
    digest, data = img.layers[0]
    flip_bits(blob_path(client, "mnt/src", digest))
    assert findings(await scrub(svc)) == {("mnt/src", "blob", digest)}
    for i, q in enumerate((f"mount={digest}&from=mnt/src", f"mount={digest}")):
        repo = f"mnt/dst{i}"
        resp = await client.post(f"/v2/{repo}/blobs/uploads/?{q}")
        assert resp.status == 202, (q, resp.status, await resp.text())
        assert await svc.meta.blob_stat(repo, digest) is None
        status, body = await pull(client, repo, digest)
        assert status == 404 and data[:64] not in body
    # a healthy holder elsewhere is a fine source for a mount without from
    await put_blob(client, "mnt/good", data)
    resp = await client.post(f"/v2/mnt/dst2/blobs/uploads/?mount={digest}")
    assert resp.status in (201, 202), await resp.text()
    if resp.status == 201:
        await assert_serves(client, "mnt/dst2", digest, data)


# ---------------------------------------------------------------- cursor and cancellation

def record_checks(monkeypatch, fail_at: int | None = None) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    """Record each item the pass checks; raise at the ``fail_at``-th (a crash mid-pass)."""
    seen: list[tuple[str, str, str]] = []
    blob, manifest = scrub_mod._check_blob, scrub_mod._check_manifest

    def note(item: ScrubItem) -> None:
        seen.append((item.repo, item.kind, item.digest))
        if fail_at is not None and len(seen) == fail_at:
            raise RuntimeError("killed mid-pass")

    async def check_blob(svc, item, quick, pacer):  # type: ignore[no-untyped-def]
        note(item)
        return await blob(svc, item, quick, pacer)

    async def check_manifest(svc, item):  # type: ignore[no-untyped-def]
        note(item)
        return await manifest(svc, item)
    monkeypatch.setattr(scrub_mod, "_check_blob", check_blob)
    monkeypatch.setattr(scrub_mod, "_check_manifest", check_manifest)
    return seen


async def all_items(svc) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    return [(i.repo, i.kind, i.digest) for i in await svc.meta.scrub_items(None, 100_000)]


async def test_interrupted_pass_resumes_after_its_cursor(client, monkeypatch):
    svc = svc_of(client)
    for i in range(5):
        await image(client, f"c/r{i}", ["v1"], [content(f"cursor-{i}", 2000 + i)])
    items = await all_items(svc)
    assert len(items) == 15
    monkeypatch.setattr(scrub_mod, "BATCH", 4)
    seen = record_checks(monkeypatch, fail_at=11)
    with pytest.raises(RuntimeError, match="killed mid-pass"):
        await scrub(svc)
    assert seen == items[:11]
    state = await svc.meta.scrub_state()
    assert state.cursor == items[7]  # the end of the last finished batch
    assert state.pass_started is not None and state.last_complete is None
    doc = await api_report(client)
    assert doc["passInProgress"] is True and doc["lastCompletePass"] is None

    # a scrub of one repository leaves the store-wide cursor alone
    seen = record_checks(monkeypatch)
    await scrub(svc, repo="c/r0")
    assert seen == [x for x in items if x[0] == "c/r0"]
    assert await svc.meta.scrub_state() == state

    # the next pass (after a restart: the state is in the store) starts after the cursor and completes
    seen = record_checks(monkeypatch)
    r = await scrub(svc)
    assert seen == items[8:], "resumed from the start instead of after the cursor"
    assert r.complete and r.blobs + r.manifests == 7
    done = await svc.meta.scrub_state()
    assert done.cursor is None and done.pass_started is None
    assert done.last_complete is not None and done.last_complete >= state.pass_started
    doc = await api_report(client)
    assert doc["passInProgress"] is False and doc["lastCompletePass"] == pytest.approx(done.last_complete)

    # and the pass after that starts from the beginning
    seen = record_checks(monkeypatch)
    await scrub(svc)
    assert seen == items


async def test_restarted_app_resumes_the_pass(aiohttp_client, config, monkeypatch):
    """The cursor lives in the metadata store: a new app (a restart) on the same store resumes."""
    client = await aiohttp_client(create_app(config))
    for i in range(3):
        await image(client, f"rs/r{i}", ["v1"], [content(f"restart-{i}", 1000 + i)])
    items = await all_items(svc_of(client))
    monkeypatch.setattr(scrub_mod, "BATCH", 3)
    record_checks(monkeypatch, fail_at=5)
    with pytest.raises(RuntimeError):
        await scrub(svc_of(client))
    await client.close()
    client = await aiohttp_client(create_app(config))
    state = await svc_of(client).meta.scrub_state()
    assert state.cursor == items[2] and state.pass_started is not None
    seen = record_checks(monkeypatch)
    r = await scrub(svc_of(client))
    assert seen == items[3:] and r.complete
    assert (await svc_of(client).meta.scrub_state()).last_complete is not None


async def test_cancelled_pass_keeps_its_cursor_and_frees_the_scrub_thread(client, monkeypatch):
    """Cancelling a paced pass (shutdown, Ctrl-C) stops the hashing thread at once: a thread left
    sleeping through a large file would hold up the next pass and the process's exit."""
    svc = svc_of(client)
    for i in range(4):
        await image(client, f"k/r{i}", ["v1"], [content(f"cancel-{i}", 1000 + i)])
    big = await image(client, "k/z", ["v1"], [content("cancel-big", 24 * MiB)])
    items = await all_items(svc)
    monkeypatch.setattr(scrub_mod, "BATCH", 2)
    seen = record_checks(monkeypatch)
    task = asyncio.create_task(scrub(svc, bytes_per_second=4 * MiB))  # the big file alone takes 6s
    deadline = time.monotonic() + 30
    while ("k/z", "blob", big.layers[0][0]) not in seen:
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    t0 = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(scrub_mod._executor, lambda: None)
    assert time.monotonic() - t0 < 1.0, "the scrub thread went on hashing after the pass was cancelled"
    state = await svc.meta.scrub_state()
    assert state.cursor is not None and state.pass_started is not None
    position = items.index(state.cursor)
    assert 0 < position < items.index(("k/z", "blob", big.layers[0][0]))
    seen.clear()
    r = await scrub(svc)
    assert seen == items[position + 1:] and r.complete and r.damaged == []


# ---------------------------------------------------------------- pacing

def test_pacer_gives_no_burst_for_time_spent_idle():
    """Time without reading (waiting for the lock another replica holds, a run of manifests) is no
    licence to read at full speed afterwards."""
    p = Pacer(10 * MiB)
    p.start -= 60  # a minute idle (another replica held the lock): 600 MiB of unused allowance
    t0 = time.monotonic()
    for _ in range(25):
        p.consume(MiB)
    elapsed = time.monotonic() - t0
    # 25 MiB at 10 MiB/s, minus at most BURST seconds caught up (unbounded, it would take no time at all)
    assert 2.5 - scrub_mod.BURST - 0.05 <= elapsed <= 2.5 - scrub_mod.BURST + 0.5, elapsed


def test_pacer_stop_interrupts_its_sleep():
    p = Pacer(1 * MiB)
    import threading
    threading.Timer(0.2, p.stop).start()
    t0 = time.monotonic()
    p.consume(10 * MiB)  # 10s, unless stopped
    assert time.monotonic() - t0 < 1.0
    assert p.stopped


@pytest.fixture
def sqlite_only(config: Config) -> None:
    if config.meta.driver != "sqlite":
        pytest.skip("timing is measured once, on the embedded store")


@pytest.mark.parametrize("rate_mib, quick", [(20, False), (40, True)], ids=["deep-20MiB/s", "quick-40MiB/s"])
async def test_pacing_is_honoured_within_10_percent(client, sqlite_only, rate_mib, quick):
    svc = svc_of(client)
    n, size = 10, 4 * MiB  # 40 MiB
    for i in range(n):
        await put_blob(client, "pace/quiet", content(f"pace-{i}", size))
    for p in (client.app[CONFIG].root / "pace/quiet/blobs/sha256").iterdir():
        p.read_bytes()  # in the page cache: the disk is not what is measured
    unpaced = await scrub(svc, repo="pace/quiet", quick=quick)
    rate = rate_mib * MiB
    if unpaced.duration > n * size / rate / 2:
        pytest.skip(f"the machine is too busy to measure pacing: {unpaced.duration:.2f}s unpaced")
    r = await scrub(svc, repo="pace/quiet", quick=quick, bytes_per_second=rate)
    assert r.bytes == n * size and r.damaged == []
    achieved = r.bytes / r.duration
    print(f"pacing: target {rate / MiB:.1f} MiB/s, achieved {achieved / MiB:.2f} MiB/s in {r.duration:.3f}s")
    assert 0.9 * rate <= achieved <= 1.1 * rate, (
        f"target {rate / MiB:.1f} MiB/s, achieved {achieved / MiB:.2f} MiB/s in {r.duration:.2f}s")


# ---------------------------------------------------------------- scheduled passes and metrics

async def test_scheduled_pass_shows_on_metrics(aiohttp_client, config):
    from tests.test_ops_metrics import scrape
    client = await aiohttp_client(create_app(config.replace(extensions={"scrub": {"interval": 0.05}})))
    img = await image(client, "m/app", ["v1"], [content("metrics", 300_000)])
    bad = await put_blob(client, "m/app", content("metrics-bad", 10_000))
    flip_bits(blob_path(client, "m/app", bad))
    deadline = time.monotonic() + 30
    while True:
        m = await scrape(client)
        if m.get("registry_scrub_corrupt_total", {}).get((), 0) >= 1 \
                and m["registry_scrub_blobs_total"][()] >= 3 and m["registry_scrub_runs_total"][()] >= 1:
            break
        assert time.monotonic() < deadline, "no scheduled scrub pass showed on /metrics within 30s"
        await asyncio.sleep(0.05)
    assert m["registry_scrub_bytes_total"][()] >= 310_000
    assert m["registry_scrub_duration_seconds_total"][()] > 0
    assert 0 < m["registry_scrub_last_complete_timestamp_seconds"][()] <= time.time()
    # the scheduled pass persisted its findings: the report shows them
    await assert_refused(client, "m/app", bad)
    await assert_serves(client, "m/app", *img.layers[0])


async def test_disabled_scrub_never_runs(aiohttp_client, config):
    from tests.test_ops_metrics import scrape
    client = await aiohttp_client(create_app(config.replace(extensions={"scrub": {"enable": False,
                                                                                  "interval": 0.01}})))
    await put_blob(client, "m/off", b"never scrubbed")
    await asyncio.sleep(0.3)
    m = await scrape(client)
    assert m["registry_scrub_runs_total"][()] == 0
    assert (await svc_of(client).meta.scrub_state()).last_complete is None


# ---------------------------------------------------------------- CLI

def _cli(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    return subprocess.run([sys.executable, "-m", "registry", "scrub", "--config", str(cfg_path), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


async def test_cli_scrub_exit_status_and_report_without_rehashing(aiohttp_client, tmp_path):
    cfg = make_config(tmp_path / "data", storage={"commit": False})
    client = await aiohttp_client(create_app(cfg))
    a = await image(client, "cli/a", ["v1", "v2"], [content("cli-a", 100_000)])
    b = await image(client, "cli/b", ["v1"], [content("cli-b", 100_000)], "sha512")
    cfg_path = tmp_path / "registry.json"
    cfg_path.write_text(json.dumps(to_dict(cfg)))
    healthy = [{"repository": "cli/a", "tag": "v1", "status": "ok", "affected_blob": "", "error": ""},
               {"repository": "cli/a", "tag": "v2", "status": "ok", "affected_blob": "", "error": ""},
               {"repository": "cli/b", "tag": "v1", "status": "ok", "affected_blob": "", "error": ""}]

    p = _cli(cfg_path, "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["scrubResult"] == healthy and doc["affected"] == 0 and doc["damaged"] == []
    assert doc["pass"]["complete"] is True and doc["pass"]["blobs"] == 4 and doc["pass"]["manifests"] == 2
    assert doc["pass"]["bytes"] == 200_000 + len(a.config[1]) + len(b.config[1])

    # damage after the pass: --report prints the stored results, it does not rehash
    layer, data = a.layers[0]
    flip_bits(blob_path(client, "cli/a", layer))
    p = _cli(cfg_path, "--report", "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc == {"scrubResult": healthy, "affected": 0}
    p = _cli(cfg_path, "--report")
    assert p.returncode == 0 and "affected" not in p.stdout and "scrub:" not in p.stdout

    # a pass finds it: exit 1, the affected rows named
    p = _cli(cfg_path, "--format", "json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    bad = [{"repository": "cli/a", "tag": t, "status": "affected", "affected_blob": layer,
            "error": doc["scrubResult"][0]["error"]} for t in ("v1", "v2")]
    assert doc["scrubResult"] == bad + healthy[2:] and doc["affected"] == 2
    assert "does not match its digest (sha256 is " in bad[0]["error"]
    assert [(d["repository"], d["kind"], d["digest"]) for d in doc["damaged"]] == [("cli/a", "blob", layer)]

    # --report now shows the stored finding, exit 1; the table names it too
    p = _cli(cfg_path, "--report", "--format", "json")
    assert p.returncode == 1 and json.loads(p.stdout)["scrubResult"] == doc["scrubResult"]
    p = _cli(cfg_path, "--report")
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "STATUS", "AFFECTED", "BLOB", "ERROR"]
    assert any(ln.split()[:4] == ["cli/a", "v1", "affected", layer] for ln in lines)
    assert any(ln.split()[:3] == ["cli/b", "v1", "ok"] for ln in lines)

    # --repo narrows the pass and the report; --quick finds the same damage
    p = _cli(cfg_path, "--repo", "cli/b", "--format", "json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["scrubResult"] == healthy[2:]
    p = _cli(cfg_path, "--quick", "--format", "json")
    assert p.returncode == 1
    assert "xxh3" in json.loads(p.stdout)["scrubResult"][0]["error"]
    p = _cli(cfg_path, "--quick")
    assert p.returncode == 1 and "quick scrub: 4 blobs" in p.stdout and "1 damaged" in p.stdout

    # the server refuses the blob; a push of the same content repairs it; the CLI agrees
    await assert_refused(client, "cli/a", layer)
    await put_blob(client, "cli/a", data)
    p = _cli(cfg_path, "--format", "json")
    assert p.returncode == 0, p.stdout
    assert json.loads(p.stdout)["scrubResult"] == healthy


# ---------------------------------------------------------------- damage no tag reaches

async def test_damage_no_tag_reaches_is_reported_too(client):
    """An untagged manifest's layer, a referrer's blob (a signature: reached by no tag) and a blob no
    manifest names are damaged: each shows as an affected row with an empty tag, so the report, the
    API and ``registry scrub --report`` (its exit status) tell the operator; tagged images stay ok."""
    svc = svc_of(client)
    tagged = await image(client, "u/app", ["v1"], [content("untagged-v1", 5000)])
    loose = await image(client, "u/app", [], [content("untagged-loose", 5000)])
    sig = await put_blob(client, "u/app", content("untagged-signature", 3000))
    empty = await put_blob(client, "u/app", b"{}")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
           "layers": [{"mediaType": "application/vnd.example.sig", "digest": sig, "size": 3000}],
           "subject": {"mediaType": OCI_MANIFEST, "digest": tagged.digest, "size": len(tagged.body)}}
    referrer, _ = await put_manifest(client, "u/app", doc, [])
    stray = await put_blob(client, "u/app", content("untagged-stray", 4000))
    for d in (loose.layers[0][0], sig, stray):
        flip_bits(blob_path(client, "u/app", d))
    r = await scrub(svc)
    assert findings(r) == {("u/app", "blob", d) for d in (loose.layers[0][0], sig, stray)}
    rows = await report(svc)
    assert [x for x in rows if x["tag"] == "v1"] == [
        {"repository": "u/app", "tag": "v1", "status": "ok", "affected_blob": "", "error": ""}]
    untagged = {x["affected_blob"]: x for x in rows if x["tag"] == ""}
    assert set(untagged) == {loose.layers[0][0], sig, stray}
    assert all(x["status"] == "affected" and "does not match its digest" in x["error"] for x in untagged.values())
    doc = await api_report(client)
    assert doc["affected"] == 3 and doc["scrubResult"] == as_api(rows)
    assert referrer
    # and the CLI's stored report exits 1 on them, naming them in the table
    cfg_path = client.app[CONFIG].root.parent / "registry.json"
    cfg_path.write_text(json.dumps(to_dict(client.app[CONFIG])))
    p = _cli(cfg_path, "--report")
    assert p.returncode == 1, p.stderr
    assert sum(1 for ln in p.stdout.splitlines() if ln.split()[:3] == ["u/app", "(untagged)", "affected"]) == 3


# ---------------------------------------------------------------- S3: objects are streamed and checked

async def test_s3_objects_are_checked_refused_and_repaired(aiohttp_client, tmp_path, request):
    s3 = request.getfixturevalue("s3")
    cfg = make_config(tmp_path / "data", storage={"commit": False, "storage_driver": s3.driver(chunksize=5 << 20)})
    client = await aiohttp_client(create_app(cfg))
    svc = svc_of(client)
    img = await image(client, "s3/app", ["v1"], [content("s3-flip", 300_000), content("s3-gone", 2000),
                                                 content("s3-ok", 1000)])
    other = await image(client, "s3/other", ["v1"], [content("s3-other", 5000)], "sha512")
    r = await scrub(svc)
    assert r.complete and r.damaged == [] and r.blobs == 6 and r.manifests == 2

    def key_of(digest: str, repo: str | None = None) -> str:
        hexpart = parse_digest(digest).hex
        keys = [k for k in s3.keys() if k.endswith("/" + hexpart) and (repo is None or f"/{repo}/" in f"/{k}")]
        assert len(keys) == 1, keys
        return keys[0]
    (flip, flip_data), (gone, gone_data), (ok, ok_data) = img.layers
    k = key_of(flip)
    data = bytearray(s3.get(k))
    data[len(data) // 2] ^= 0x10
    s3.client().put_object(Bucket=s3.bucket, Key=k, Body=bytes(data))
    s3.client().delete_object(Bucket=s3.bucket, Key=key_of(gone))
    mkey = key_of(img.digest, "s3/app")
    s3.client().put_object(Bucket=s3.bucket, Key=mkey, Body=img.body[:-5])

    r = await scrub(svc)
    errors = {(f.kind, f.digest): f.error for f in r.damaged}
    assert set(errors) == {("blob", flip), ("blob", gone), ("manifest", img.digest)}, errors
    assert "does not match its digest (sha256 is " in errors[("blob", flip)]
    assert "unreadable" in errors[("blob", gone)] or "missing" in errors[("blob", gone)]
    assert "rewritten" in errors[("manifest", img.digest)]
    assert s3.get(mkey) == img.body
    assert_report(await report(svc), {("s3/app", "v1"): {flip: "does not match", gone: "", img.digest: "rewritten"},
                                      ("s3/other", "v1"): {}})
    await assert_refused(client, "s3/app", flip, flip_data)
    await assert_refused(client, "s3/app", gone)
    await assert_serves(client, "s3/app", ok, ok_data)
    await assert_serves(client, "s3/other", *other.layers[0])

    for d, b in ((flip, flip_data), (gone, gone_data)):
        await put_blob(client, "s3/app", b)
        await assert_serves(client, "s3/app", d, b)
    r = await scrub(svc)
    assert r.damaged == []
    assert_report(await report(svc), {("s3/app", "v1"): {}, ("s3/other", "v1"): {}})


async def test_last_complete_pass_on_metrics_survives_a_restart(aiohttp_client, config):
    """The gauge an operator alerts on starts from the store's last complete pass, not from 0."""
    from tests.test_ops_metrics import scrape
    client = await aiohttp_client(create_app(config))
    assert (await scrape(client))["registry_scrub_last_complete_timestamp_seconds"][()] == 0
    await image(client, "rs/m", ["v1"], [content("restart-metrics", 1000)])
    await scrub(svc_of(client))
    done = (await svc_of(client).meta.scrub_state()).last_complete
    await client.close()
    client = await aiohttp_client(create_app(config))
    m = await scrape(client)
    assert m["registry_scrub_last_complete_timestamp_seconds"][()] == pytest.approx(done)
    assert m["registry_scrub_runs_total"][()] == 0


async def test_a_blob_deleted_during_the_pass_is_no_finding(client, monkeypatch):
    """GC (or a DELETE) removing a blob between the listing and its check is no damage: the
    pass must not count it (CLI exit status, registry_scrub_corrupt) nor log it as corrupt."""
    svc = svc_of(client)
    img = await image(client, "race/app", ["v1"], [content("race-keep", 1000)])
    loose = await put_blob(client, "race/app", content("race-loose", 2000))
    check = scrub_mod._check_blob

    async def deleted_meanwhile(svc_, item, quick, pacer):  # type: ignore[no-untyped-def]
        if item.digest == loose:
            r = await client.delete(f"/v2/race/app/blobs/{loose}")
            assert r.status == 202
        return await check(svc_, item, quick, pacer)
    monkeypatch.setattr(scrub_mod, "_check_blob", deleted_meanwhile)
    r = await scrub(svc)
    assert r.complete and r.damaged == [], r.damaged
    assert_report(await report(svc), {("race/app", "v1"): {}})
    assert img.digest


async def test_scheduled_pass_counts_for_every_replica(client, push):
    """Each replica's scheduler fires; a pass another completed within half an interval counts."""
    import asyncio as _asyncio
    from registry.keys import SERVICES as _SERVICES
    from registry.maintenance.scrub import scheduled_scrub
    await push.image("sched/once", "v1")
    svc = client.app[_SERVICES]
    first = await scheduled_scrub(svc, interval=3600, bytes_per_second=0)
    assert first is not None and first.complete and first.blobs >= 2
    assert await scheduled_scrub(svc, interval=3600, bytes_per_second=0) is None
    await _asyncio.sleep(0.02)
    again = await scheduled_scrub(svc, interval=0.01, bytes_per_second=0)
    assert again is not None and again.complete
