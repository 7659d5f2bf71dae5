#!/usr/bin/env python3
"""GC benchmark (issue 6): the cost of a pass follows what changed, not the store's size.

Builds a metadata store of 10,000 tagged manifests (100 repositories x 100) each
referring to 10 blobs of its own plus one base layer its repository shares:
100,100 blobs. Rows are inserted with bulk SQL on the store's own connection
(the same schema the store migrated), all due for review; one pass reviews
them all (every row is then NEVER: out of the queue). Then, for each change
ratio, the tags of that share of the manifests are deleted (each manifest and
its 10 blobs become garbage; the shared base is requeued and found in use) and
one ``collect()`` pass is timed. A 0% pass shows the fixed cost.

Blob files are never written: the root is an empty temporary directory, and
removing a file that is not there is a no-op (index.json of the repositories
that lost manifests is rewritten, as in a real pass).

    python bench/gc_bench.py                       # both stores
    python bench/gc_bench.py --stores sqlite --manifests 1000

PostgreSQL: REGISTRY_TEST_POSTGRES_DSN (default postgresql://postgres@127.0.0.1:5432/test);
the benchmark works in a schema of its own, dropped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.app import build_services  # noqa: E402
from registry.config import load  # noqa: E402
from registry.maintenance.gc import collect  # noqa: E402
from registry.meta.factory import open_meta  # noqa: E402
from registry.storage.factory import make_storage  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def fake_digest(*parts: object) -> str:
    return "sha256:" + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


class Data:
    """Rows of the store, as plain tuples (repo names; ids are resolved per store)."""

    def __init__(self, repos: int, per_repo: int, blobs_per_manifest: int):
        self.repos = [f"bench/r{r:03d}" for r in range(repos)]
        self.blobs: list[tuple[str, str, int]] = []  # repo, digest, size
        self.manifests: list[tuple[str, str, int, bytes]] = []  # repo, digest, size, payload
        self.refs: list[tuple[str, str, str]] = []  # repo, parent, child (all blobs)
        self.tags: list[tuple[str, str, str]] = []  # repo, tag, digest
        for repo in self.repos:
            base = fake_digest(repo, "base")
            self.blobs.append((repo, base, 30_000_000))
            for m in range(per_repo):
                own = [fake_digest(repo, m, b) for b in range(blobs_per_manifest)]
                self.blobs += [(repo, d, 1_000_000 + b) for b, d in enumerate(own)]
                doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": OCI_CONFIG, "digest": own[0], "size": 1_000_000},
                       "layers": [{"mediaType": OCI_LAYER, "digest": base, "size": 30_000_000}]
                       + [{"mediaType": OCI_LAYER, "digest": d, "size": 1_000_000 + b}
                          for b, d in enumerate(own) if b > 0]}
                payload = json.dumps(doc).encode()
                digest = "sha256:" + hashlib.sha256(payload).hexdigest()
                self.manifests.append((repo, digest, len(payload), payload))
                self.refs += [(repo, digest, d) for d in [base, *own]]
                self.tags.append((repo, f"v{m}", digest))


async def load_sqlite(meta: Any, data: Data, due: float) -> None:
    def op(conn: Any) -> None:
        now = time.time()
        conn.executemany("INSERT INTO repositories (name, created_at) VALUES (?, ?)", [(r, now) for r in data.repos])
        ids = dict(conn.execute("SELECT name, id FROM repositories").fetchall())
        conn.executemany("INSERT INTO repo_blobs (repo_id, digest, size, created_at, review_after) VALUES (?, ?, ?, ?, ?)",
                         [(ids[r], d, s, now, due) for r, d, s in data.blobs])
        conn.executemany("INSERT INTO manifests (repo_id, digest, media_type, size, payload, created_at, review_after) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [(ids[r], d, OCI_MANIFEST, s, p, now, due) for r, d, s, p in data.manifests])
        conn.executemany("INSERT INTO manifest_refs (repo_id, parent, child, kind) VALUES (?, ?, ?, 'blob')",
                         [(ids[r], p, c) for r, p, c in data.refs])
        conn.executemany("INSERT INTO tags (repo_id, name, digest, updated_at) VALUES (?, ?, ?, ?)",
                         [(ids[r], t, d, now) for r, t, d in data.tags])
    await meta._write(op)
    await meta._write(lambda conn: conn.execute("ANALYZE"))


async def load_postgres(meta: Any, data: Data, due: float) -> None:
    now = time.time()
    async with meta.pool.acquire() as conn:
        async with conn.transaction():
            await conn.executemany("INSERT INTO repositories (name, created_at) VALUES ($1, $2)",
                                   [(r, now) for r in data.repos])
            ids = {r["name"]: r["id"] for r in await conn.fetch("SELECT name, id FROM repositories")}
            await conn.copy_records_to_table("repo_blobs", columns=["repo_id", "digest", "size", "created_at",
                                                                    "review_after"],
                                             records=[(ids[r], d, s, now, due) for r, d, s in data.blobs])
            await conn.copy_records_to_table(
                "manifests", columns=["repo_id", "digest", "media_type", "size", "payload", "created_at", "review_after"],
                records=[(ids[r], d, OCI_MANIFEST, s, p, now, due) for r, d, s, p in data.manifests])
            await conn.copy_records_to_table("manifest_refs", columns=["repo_id", "parent", "child", "kind"],
                                             records=[(ids[r], p, c, "blob") for r, p, c in data.refs])
            await conn.copy_records_to_table("tags", columns=["repo_id", "name", "digest", "updated_at"],
                                             records=[(ids[r], t, d, now) for r, t, d in data.tags])
        await conn.execute("ANALYZE repositories, repo_blobs, manifests, manifest_refs, tags")  # ours only


async def run_store(store: str, data: Data, ratios: list[float], dsn: str) -> list[tuple[Any, ...]]:
    tmp = Path(tempfile.mkdtemp(prefix="gc-bench-"))
    schema = f"gc_bench_{uuid.uuid4().hex[:8]}"
    overrides: dict[str, Any] = {"storage": {"rootDirectory": str(tmp / "data"), "commit": False}}
    if store == "postgres":
        overrides["meta"] = {"driver": "postgres", "postgres": {"dsn": dsn, "schema": schema, "poolSize": 4}}
    cfg = load(None, environ={}, overrides=overrides)
    rows: list[tuple[Any, ...]] = []
    try:
        async with open_meta(cfg) as meta:
            svc = build_services(cfg, meta, make_storage(cfg))
            t0 = time.perf_counter()
            await (load_sqlite if store == "sqlite" else load_postgres)(meta, data, time.time() - 10)
            print(f"{store}: loaded {len(data.blobs)} blobs, {len(data.manifests)} manifests, "
                  f"{len(data.refs)} references in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

            delay = svc.blobs.gc_delay()
            clock = time.time()  # passes run at simulated times: what GC requeues is due a gcDelay later

            async def one_pass(label: str, step: str, changed: int, at: float) -> None:
                t = time.perf_counter()
                r = await collect(svc, delete_untagged=True, upload_ttl=86400, now=at)
                secs = time.perf_counter() - t
                rows.append((store, label, step, changed, r.reviewed, r.manifests_deleted, r.blobs_deleted, secs))
                print(f"{store}: {label} ({step}): reviewed {r.reviewed}, deleted {r.manifests_deleted} manifests "
                      f"and {r.blobs_deleted} blobs in {secs:.3f}s", file=sys.stderr)

            clock += 1
            await one_pass("initial review", "all rows", len(data.manifests), clock)
            left = list(data.tags)
            for ratio in ratios:
                n = round(len(data.manifests) * ratio / 100)
                step = max(1, len(left) // n) if n else 1
                chosen = left[::step][:n]
                for repo, tag, _ in chosen:
                    assert await meta.tag_delete(repo, tag)  # the manifest is due at once
                gone = {(r, t) for r, t, _ in chosen}
                left = [x for x in left if (x[0], x[1]) not in gone]
                clock = max(clock, time.time()) + 1
                await one_pass(f"{ratio:g}%", "manifests", n, clock)
                clock += delay + 1  # what the deleted manifests referred to is due now
                await one_pass(f"{ratio:g}%", "their blobs", n, clock)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if store == "postgres":
            import asyncpg
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", default="sqlite,postgres")
    p.add_argument("--repos", type=int, default=100)
    p.add_argument("--manifests", type=int, default=10_000, help="in all (spread over --repos)")
    p.add_argument("--blobs-per-manifest", type=int, default=10)
    p.add_argument("--ratios", default="0,0.1,1,10", help="percent of the manifests whose tag is deleted, per pass")
    args = p.parse_args()
    data = Data(args.repos, args.manifests // args.repos, args.blobs_per_manifest)
    ratios = [float(x) for x in args.ratios.split(",")]
    dsn = os.environ.get("REGISTRY_TEST_POSTGRES_DSN", DEFAULT_DSN)
    rows = []
    for store in args.stores.split(","):
        rows += asyncio.run(run_store(store, data, ratios, dsn))
    header = ("store", "changed", "pass", "manifests untagged", "candidates", "manifests deleted", "blobs deleted",
              "seconds")
    cells = [header] + [(s, c, st, str(n), str(rv), str(md), str(bd), f"{secs:.3f}")
                        for s, c, st, n, rv, md, bd, secs in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"store: {len(data.blobs)} blobs, {len(data.manifests)} manifests in {len(data.repos)} repositories")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if j > 2 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
