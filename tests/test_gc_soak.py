"""The proof of issue 6: GC running continuously under a concurrent push load never
breaks a push, never loses what a tag reaches, and leaves nothing unreferenced.

A real server (``python -m registry serve``, started by conformance's helper) runs
with gcDelay 1s and a pass every 0.2s, on SQLite and on PostgreSQL. Sixteen
clients push images that share layers across repositories, move and delete tags,
re-push identical images, push indexes and referrers, mount, abandon uploads, and
always HEAD each blob first, skipping the upload when it answers 200. Every
response is recorded. Afterwards: no MANIFEST_BLOB_UNKNOWN for a manifest pushed
within gcDelay of its first blob check, no 5xx, every tag pulls and every blob it
reaches hashes to its digest; then, once every delay has run out and the server is
stopped, ``registry gc`` passes a gcDelay apart (one per level: what a deleted
manifest frees is due a delay later) leave exactly the files the tags (and their
referrers) reach, and a dry run finds nothing more.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conformance.conftest import REPO_ROOT, Server, running_server
from registry.config import to_dict
from tests.conftest import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, make_config

GC_DELAY = 1.0
GC_INTERVAL = 0.2
UPLOAD_TTL = 1.0
CLIENTS = 16
RUN_FOR = 14.0  # seconds of load per store
REPOS = [f"soak/r{i}" for i in range(4)]
TAGS = [f"t{i}" for i in range(5)]
SEED = int(os.environ.get("GC_SOAK_SEED", "0")) or random.randrange(1 << 30)
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Rec:
    op: str
    method: str
    path: str
    status: int
    code: str | None = None
    since_check: float | None = None  # manifest PUTs: seconds since the first check of what it refers to


class Load:
    """Shared content and the ledger of every response."""

    def __init__(self, base: str, seed: int):
        rng = random.Random(seed)
        sizes = [300, 2_000, 9_000, 70_000, 150_000]
        self.base = base
        self.layers = [rng.randbytes(rng.choice(sizes)) for _ in range(14)]
        self.configs = [json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode() for i in range(4)]
        self.recs: list[Rec] = []
        self.bad_bodies: list[str] = []
        self.last_request = time.time()

    async def req(self, s: aiohttp.ClientSession, op: str, method: str, path: str, *, data: bytes | None = None,
                  headers: dict[str, str] | None = None, since: float | None = None) -> tuple[int, bytes, Any]:
        async with s.request(method, self.base + path, data=data, headers=headers or {},
                             allow_redirects=False) as r:
            body = await r.read()
            self.last_request = time.time()
            code = None
            if r.status >= 400 and body[:1] == b"{":
                try:
                    code = json.loads(body)["errors"][0]["code"]
                except (ValueError, KeyError, IndexError):
                    code = "?"
            self.recs.append(Rec(op, method, path, r.status, code,
                                 None if since is None else time.monotonic() - since))
            return r.status, body, r.headers


def image_doc(cfg: bytes, layers: list[bytes], **extra: Any) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(cfg), "size": len(cfg)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha256(x), "size": len(x)} for x in layers], **extra}


async def ensure_blob(load: Load, s: aiohttp.ClientSession, op: str, repo: str, data: bytes) -> bool:
    """HEAD, then upload only when the registry says it lacks the blob."""
    d = sha256(data)
    status, _, _ = await load.req(s, op, "HEAD", f"/v2/{repo}/blobs/{d}")
    if status == 200:
        return True
    status, _, _ = await load.req(s, op, "POST", f"/v2/{repo}/blobs/uploads/?digest={d}", data=data,
                                  headers={"Content-Type": "application/octet-stream"})
    return status == 201


async def put_manifest(load: Load, s: aiohttp.ClientSession, op: str, repo: str, ref: str | None,
                       doc: dict[str, Any], since: float) -> tuple[int, str]:
    body = json.dumps(doc).encode()
    digest = sha256(body)
    status, _, _ = await load.req(s, op, "PUT", f"/v2/{repo}/manifests/{ref or digest}", data=body,
                                  headers={"Content-Type": doc["mediaType"]}, since=since)
    return status, digest


async def push_image(load: Load, s: aiohttp.ClientSession, rng: random.Random, repo: str, tag: str | None,
                     op: str = "push", extra: dict[str, Any] | None = None,
                     since: float | None = None) -> tuple[int, str, int]:
    cfg = rng.choice(load.configs)
    layers = rng.sample(load.layers, rng.randint(1, 3))
    since = time.monotonic() if since is None else since
    for blob in [cfg, *layers]:
        if not await ensure_blob(load, s, op, repo, blob):
            return 0, "", 0
    doc = image_doc(cfg, layers, **(extra or {}))
    status, digest = await put_manifest(load, s, op, repo, tag, doc, since)
    return status, digest, len(json.dumps(doc).encode())


async def worker(load: Load, s: aiohttp.ClientSession, n: int, deadline: float) -> None:
    rng = random.Random(SEED * 100 + n)
    while time.monotonic() < deadline:
        repo = rng.choice(REPOS)
        x = rng.random()
        if x < 0.40:  # push an image (identical ones recur: a re-push), tagged or not
            await push_image(load, s, rng, repo, rng.choice(TAGS) if rng.random() < 0.85 else None)
        elif x < 0.55:
            await load.req(s, "untag", "DELETE", f"/v2/{repo}/manifests/{rng.choice(TAGS)}")
        elif x < 0.62:  # an index of two images pushed by digest
            since = time.monotonic()
            children = []
            for _ in range(2):
                # Children of their own (an annotation sets them apart from the tagged images): the
                # "delete" action deletes by digest what a t* tag names, and an index whose child was
                # deleted through the API on purpose would not pull.
                status, digest, size = await push_image(load, s, rng, repo, None, "index",
                                                        {"annotations": {"role": "child"}}, since)
                if status != 201:
                    break
                children.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size})
            else:
                await put_manifest(load, s, "index", repo, rng.choice(["i0", "i1"]),
                                   {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}, since)
        elif x < 0.68:  # a referrer of what a tag names now (the subject may go meanwhile: allowed)
            status, body, headers = await load.req(s, "referrer", "GET", f"/v2/{repo}/manifests/{rng.choice(TAGS)}",
                                                   headers={"Accept": ACCEPT})
            if status == 200:
                subject = {"mediaType": headers["Content-Type"], "digest": sha256(body), "size": len(body)}
                await push_image(load, s, rng, repo, None, "referrer",
                                 {"subject": subject, "artifactType": "application/vnd.example.sig"})
        elif x < 0.74:  # mount a layer from another repository, then refer to it
            since = time.monotonic()
            layer = rng.choice(load.layers)
            d = sha256(layer)
            status, _, headers = await load.req(s, "mount", "POST",
                                                f"/v2/{repo}/blobs/uploads/?mount={d}&from={rng.choice(REPOS)}")
            if status == 202:  # not there: the registry opened a session instead; upload into it
                loc = headers["Location"]
                sep = "&" if "?" in loc else "?"
                status, _, _ = await load.req(s, "mount", "PUT", f"{loc}{sep}digest={d}", data=layer,
                                              headers={"Content-Type": "application/octet-stream"})
            if status == 201:
                cfg = rng.choice(load.configs)
                if await ensure_blob(load, s, "mount", repo, cfg):
                    await put_manifest(load, s, "mount", repo, rng.choice(TAGS), image_doc(cfg, [layer]), since)
        elif x < 0.80:  # garbage: a blob nobody will refer to
            data = rng.randbytes(rng.choice([100, 5_000]))
            await load.req(s, "loose", "POST", f"/v2/{repo}/blobs/uploads/?digest={sha256(data)}", data=data,
                           headers={"Content-Type": "application/octet-stream"})
        elif x < 0.84:  # an abandoned chunked upload
            status, _, headers = await load.req(s, "abandon", "POST", f"/v2/{repo}/blobs/uploads/")
            if status == 202:
                await load.req(s, "abandon", "PATCH", headers["Location"], data=rng.randbytes(1000),
                               headers={"Content-Type": "application/octet-stream"})
        elif x < 0.88:  # delete a manifest by digest
            status, body, _ = await load.req(s, "delete", "GET", f"/v2/{repo}/manifests/{rng.choice(TAGS)}",
                                             headers={"Accept": ACCEPT})
            if status == 200:
                await load.req(s, "delete", "DELETE", f"/v2/{repo}/manifests/{sha256(body)}")
        else:  # pull: whatever answers 200 must be the right bytes
            status, body, _ = await load.req(s, "pull", "GET", f"/v2/{repo}/manifests/{rng.choice(TAGS)}",
                                             headers={"Accept": ACCEPT})
            if status != 200:
                continue
            doc = json.loads(body)
            for desc in [doc.get("config")] + doc.get("layers", []):
                if desc:
                    got, data, _ = await load.req(s, "pull", "GET", f"/v2/{repo}/blobs/{desc['digest']}")
                    if got == 200 and sha256(data) != desc["digest"]:
                        load.bad_bodies.append(f"{repo}@{desc['digest']}")


async def reachable(s: aiohttp.ClientSession, base: str, repo: str) -> tuple[set[str], list[str]]:
    """Every manifest and blob digest the repository's tags reach (children, referrers
    included), each fetched and re-hashed; and the problems found."""
    problems: list[str] = []
    seen: set[str] = set()
    async with s.get(f"{base}/v2/{repo}/tags/list") as r:
        tags = ((await r.json()).get("tags") or []) if r.status == 200 else []
    todo: list[tuple[str, str]] = []  # (digest, how it is reached)
    for tag in tags:
        async with s.get(f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}) as r:
            body = await r.read()
            if r.status != 200:
                problems.append(f"{repo}:{tag} does not pull: {r.status} {body[:200]!r}")
                continue
            if r.headers["Docker-Content-Digest"] != sha256(body):
                problems.append(f"{repo}:{tag}: manifest body does not hash to its digest")
            todo.append((sha256(body), f"tag {tag}"))
    while todo:
        d, via = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        async with s.get(f"{base}/v2/{repo}/manifests/{d}", headers={"Accept": ACCEPT}) as r:
            body = await r.read()
            if r.status != 200 or sha256(body) != d:
                problems.append(f"{repo}@{d} ({via}): manifest {r.status}, hash ok: {sha256(body) == d}")
                continue
        doc = json.loads(body)
        todo += [(m["digest"], f"child of {d}") for m in doc.get("manifests", [])]
        for desc in [doc.get("config")] + doc.get("layers", []):
            if not desc or desc["digest"] in seen:
                continue
            seen.add(desc["digest"])
            async with s.get(f"{base}/v2/{repo}/blobs/{desc['digest']}") as r:
                data = await r.read()
                if r.status != 200 or sha256(data) != desc["digest"] or len(data) != desc["size"]:
                    problems.append(f"{repo}@{desc['digest']}: blob {r.status}, {len(data)} bytes, "
                                    f"hash ok: {sha256(data) == desc['digest']}")
        async with s.get(f"{base}/v2/{repo}/referrers/{d}") as r:
            if r.status == 200:
                todo += [(m["digest"], f"referrer of {d}") for m in (await r.json()).get("manifests", [])]
    return seen, problems


def blob_files(root: Path, repo: str) -> set[str]:
    base = root / repo / "blobs"
    if not base.exists():
        return set()
    return {f"{algo.name}:{f.name}" for algo in base.iterdir() for f in algo.iterdir()}


def cli_gc(cfg_path: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    p = subprocess.run([sys.executable, "-m", "registry", "gc", "--config", str(cfg_path), "--json", *args],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


async def soak(srv: Server) -> tuple[Load, dict[str, set[str]], list[str], str]:
    load = Load(srv.base, SEED)
    conn = aiohttp.TCPConnector(limit=CLIENTS * 2)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        deadline = time.monotonic() + RUN_FOR
        await asyncio.gather(*(worker(load, s, n, deadline) for n in range(CLIENTS)))
        async with s.get(f"{srv.base}/metrics") as r:
            metrics = await r.text()
        reached, problems = {}, []
        for repo in REPOS:
            reached[repo], found = await reachable(s, srv.base, repo)
            problems += found
    return load, reached, problems, metrics


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


async def explain(cfg_path: Path, files: dict[str, list[str]]) -> list[str]:
    """What the store says of files that should be gone."""
    from registry.config import load
    from registry.meta.factory import open_meta
    out = []
    async with open_meta(load(str(cfg_path), environ={})) as meta:
        for repo, digests in files.items():
            for d in digests:
                stat, m = await meta.blob_stat(repo, d), await meta.manifest_get(repo, d)
                kind = "no row" if stat is None else ("manifest" if m is not None else "blob")
                out.append(f"{repo}@{d}: {kind}" + (f" review_after={stat.review_after}" if stat else "")
                           + (f" subject={m.subject} type={m.media_type}" if m else ""))
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def soak_config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    meta: dict[str, Any] = {}
    if request.param == "postgres":
        meta = {"driver": "postgres", "postgres": {"dsn": request.getfixturevalue("pg_dsn"),
                                                   "schema": request.getfixturevalue("pg_schema"), "pool_size": 10}}
    cfg = make_config(tmp_path / "data", http={"address": "127.0.0.1", "port": 0},
                      storage={"commit": False, "gc_delay": GC_DELAY, "gc_interval": GC_INTERVAL},
                      uploads={"ttl": UPLOAD_TTL}, **({"meta": meta} if meta else {}))
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(to_dict(cfg)))
    return path


def test_gc_soak(soak_config: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    with running_server(root, tmp_path / "server.log", config=soak_config) as srv:
        load, reached, problems, metrics = asyncio.run(soak(srv))
        server_log = srv.log_text()
    by_status = Counter((r.op, r.method, r.status, r.code) for r in load.recs)
    summary = f"seed {SEED}: {len(load.recs)} requests; " + ", ".join(
        f"{op} {m} {st}{' ' + c if c else ''}: {n}" for (op, m, st, c), n in sorted(by_status.items(), key=str))

    # No push failed for want of a blob it had checked (or uploaded) within gcDelay.
    unknown = [r for r in load.recs if r.code == "MANIFEST_BLOB_UNKNOWN"]
    in_time = [r for r in unknown if r.since_check is not None and r.since_check < GC_DELAY]
    assert not in_time, f"{len(in_time)} pushes failed with MANIFEST_BLOB_UNKNOWN within gcDelay of their checks: " \
                        f"{in_time[:5]}\n{summary}"
    late = len(unknown) - len(in_time)
    puts = [r for r in load.recs if r.method == "PUT" and r.since_check is not None]
    assert late <= len(puts) // 100, f"{late} pushes took longer than gcDelay: the load is too heavy\n{summary}"
    assert not [r for r in load.recs if r.status >= 500], summary
    assert not load.bad_bodies, load.bad_bodies

    # The load did what it is for: many pushes and tag deletes, and GC deleting all along.
    ok_puts = sum(1 for r in puts if r.status == 201)
    assert ok_puts >= 200 and by_status[("untag", "DELETE", 202, None)] >= 50, summary
    # Passes follow each other (under this load one may take seconds; the next starts at once).
    assert metric(metrics, "registry_gc_runs_total") >= 5, summary
    assert metric(metrics, 'registry_gc_deleted_total{kind="blob"}') > 0
    assert metric(metrics, 'registry_gc_deleted_total{kind="manifest"}') > 0
    assert "Traceback" not in server_log

    # Every tag pulls; every blob and manifest it reaches hashes to its digest.
    assert not problems, "\n".join(problems[:20])

    # One more pass once every delay has run out (HEADs postpone by up to 1.5 delays):
    # exactly what the tags reach is left, on disk and in the store.
    time.sleep(max(0.0, load.last_request + 1.5 * GC_DELAY + max(GC_DELAY, UPLOAD_TTL) - time.time()))
    # A manifest GC deletes frees its blobs (an index: its children) a whole gcDelay later,
    # so the last chains need one pass per level, a delay apart.
    for level in range(3):
        if level:
            time.sleep(GC_DELAY * 1.2)
        cli_gc(soak_config)
    extra, missing = {}, {}
    for repo in REPOS:
        files = blob_files(root, repo)
        if files - reached[repo]:
            extra[repo] = sorted(files - reached[repo])
        if reached[repo] - files:
            missing[repo] = sorted(reached[repo] - files)
    assert not missing, f"files a tag reaches are gone: {missing}"
    assert not extra, f"unreferenced files left after the final pass: {asyncio.run(explain(soak_config, extra))}"
    assert not any((root / "_uploads").iterdir()), list((root / "_uploads").iterdir())
    assert not any((root / "_trash").iterdir()), list((root / "_trash").iterdir())
    again = cli_gc(soak_config, "--dry-run")
    assert (again["blobs_deleted"], again["manifests_deleted"], again["uploads_deleted"], again["pending"]) == \
        (0, 0, 0, 0), again
    for repo in REPOS:  # index.json lists what the store keeps, tags first
        path = root / repo / "index.json"
        if path.exists():
            listed = {m["digest"] for m in json.loads(path.read_bytes())["manifests"]}
            assert listed <= reached[repo], (repo, listed - reached[repo])
    print(summary)
