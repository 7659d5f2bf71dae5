"""Rebuild the metadata of repositories from their OCI layouts on storage.

On start-up, layout directories the metadata store does not know (an existing
layout copied under the root) are imported; ``registry reindex`` re-imports
every layout, repairing rows whose content is gone and adding what is missing.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from registry.digest import ALGORITHMS, parse_digest
from registry.errors import RegistryError
from registry.keys import Services
from registry.meta.base import BadReferences
from registry.reference import NAME_RE, is_tag
from registry.services.layout import REF_NAME
from registry.services.manifests import KNOWN_TYPES, parse

log = logging.getLogger(__name__)


@dataclass
class ReindexResult:
    repositories: int = 0
    blobs: int = 0
    manifests: int = 0
    tags: int = 0
    problems: list[str] = field(default_factory=list)


def find_layouts(root: Path) -> list[str]:
    """Repository names of every directory under root holding an ``oci-layout`` file."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        dirs[:] = [d for d in dirs if not d.startswith(("_", ".")) and not (d == "blobs" and "oci-layout" in files)]
        if "oci-layout" in files and rel != "." and NAME_RE.fullmatch(rel):
            found.append(rel)
    return sorted(found)


async def import_layout(svc: Services, repo: str, result: ReindexResult) -> None:
    storage, meta = svc.storage, svc.meta
    sizes: dict[str, int] = {}
    for alg in ALGORITHMS:
        async for key, size in storage.walk(f"{repo}/blobs/{alg}"):
            hexpart = key.rsplit("/", 1)[-1]
            try:
                sizes[str(parse_digest(f"{alg}:{hexpart}"))] = size
            except RegistryError:
                continue  # temporary files and strangers
    try:
        index = json.loads(await storage.read(f"{repo}/index.json"))
        entries = index.get("manifests", []) if isinstance(index, dict) else []
    except Exception as exc:  # a missing or broken index.json: the blobs still count
        result.problems.append(f"{repo}: index.json unreadable ({exc})")
        entries = []
    manifests: dict[str, object] = {}

    async def load(digest: str) -> object | None:
        if digest in manifests:
            return manifests[digest]
        manifests[digest] = None
        d = parse_digest(digest)
        try:
            body = await storage.read(f"{repo}/{d.path}")
            m = parse(body, None)
        except Exception as exc:
            result.problems.append(f"{repo}: manifest {digest} unusable ({exc})")
            return None
        m.digest = digest
        for ref in m.refs:
            if ref.kind == "manifest":
                await load(ref.digest)
        manifests[digest] = m
        return m

    tagged: list[tuple[str, str]] = []
    for e in entries:
        if not isinstance(e, dict) or e.get("mediaType") not in KNOWN_TYPES:
            continue
        try:
            digest = str(parse_digest(e.get("digest")))
        except RegistryError:
            continue
        if await load(digest) is None:
            continue
        tag = (e.get("annotations") or {}).get(REF_NAME)
        if isinstance(tag, str) and is_tag(tag):
            tagged.append((tag, digest))
    for digest, size in sizes.items():
        if digest not in manifests:
            await meta.blob_link(repo, digest, size, svc.blobs.review_after())
            result.blobs += 1
    # Children before parents, so every manifest's references exist when it is put.
    done: set[str] = set()

    async def put(digest: str, tag: str | None) -> None:
        m = manifests.get(digest)
        if m is None:
            return
        if digest not in done:
            for ref in m.refs:  # type: ignore[attr-defined]
                if ref.kind == "manifest":
                    await put(ref.digest, None)
        try:
            await meta.manifest_put(repo, m, [tag] if tag else [], svc.blobs.review_after())  # type: ignore[arg-type]
        except BadReferences as exc:
            result.problems.append(f"{repo}: manifest {digest} refers to missing content {exc}")
            return
        if digest not in done:
            done.add(digest)
            result.manifests += 1
        if tag is not None:
            result.tags += 1

    for tag, digest in tagged:
        await put(digest, tag)
    for digest in list(manifests):
        await put(digest, None)
    result.repositories += 1
    await svc.layout.sync(repo)


async def reindex(svc: Services, *, only_new: bool) -> ReindexResult:
    result = ReindexResult()
    root = svc.storage.local_path("")
    if root is None:
        return result
    for repo in await asyncio.get_running_loop().run_in_executor(None, find_layouts, root):
        if only_new and await svc.meta.repo_exists(repo):
            continue
        await import_layout(svc, repo, result)
    for p in result.problems:
        log.warning("reindex: %s", p)
    return result


async def reindex_new_layouts(svc: Services) -> None:
    result = await reindex(svc, only_new=True)
    if result.repositories:
        log.info("imported %d OCI layout(s): %d manifests, %d tags, %d blobs", result.repositories,
                 result.manifests, result.tags, result.blobs)
