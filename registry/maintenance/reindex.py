"""Rebuild the metadata of repositories from their OCI layouts on storage.

On start-up, layout directories the metadata store does not know (an existing
layout copied under a local root) are imported; ``registry reindex`` re-imports
every layout, repairing rows whose content is gone and adding what is missing.
Layouts are found through the storage, so ``registry reindex`` works on every
driver; start-up import looks at local disks only (on S3 it would list the
bucket at every start).

With shared blobs (S3 with dedupe) a blob's content lives at one key per digest:
a layer a copied-in layout holds under ``<repo>/blobs/`` is linked there, and a
blob a manifest refers to that the layout does not hold is found there.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from registry.digest import ALGORITHMS, parse_digest
from registry.errors import RegistryError
from registry.keys import Services
from registry.meta.base import BadReferences
from registry.reference import NAME_RE, is_tag
from registry.services.layout import REF_NAME
from registry.services.manifests import KNOWN_TYPES, parse
from registry.storage.base import NotFound, Storage

log = logging.getLogger(__name__)


@dataclass
class ReindexResult:
    repositories: int = 0
    blobs: int = 0
    manifests: int = 0
    tags: int = 0
    problems: list[str] = field(default_factory=list)


async def find_layouts(storage: Storage, *, local_only: bool = False) -> list[str]:
    """Repository names of every directory holding an ``oci-layout`` object, one directory
    level at a time (on S3 a delimited listing each), skipping ``_``/``.`` directories and a
    layout's own ``blobs/``. ``local_only``: only below roots on a local disk."""
    found = []
    todo = [""]
    while todo:
        prefix = todo.pop()
        if local_only and storage.local_path(prefix) is None:
            continue
        dirs, files = await storage.list_dir(prefix)
        layout = "oci-layout" in files
        if layout and prefix and NAME_RE.fullmatch(prefix):
            found.append(prefix)
        todo += [f"{prefix}/{d}" if prefix else d for d in dirs
                 if not d.startswith(("_", ".")) and not (layout and d == "blobs")]
    return sorted(found)


async def _link_blob(svc: Services, repo: str, digest: str, size: int) -> None:
    """Record a blob the layout holds; with shared blobs, first make sure the shared key has it."""
    d = parse_digest(digest)
    own, key = f"{repo}/{d.path}", svc.blobs.key(repo, d)
    if key == own:
        await svc.meta.blob_link(repo, digest, size, svc.blobs.review_after())
        return

    async def place() -> None:
        await svc.storage.link(own, key)
    await place()
    await svc.blobs.link_placed(repo, d, size, place)  # a GC pass may take the shared object meanwhile


async def _link_shared(svc: Services, repo: str, manifests: dict[str, object], sizes: dict[str, int]) -> int:
    """Link the blobs manifests refer to that the layout does not hold but the shared key does
    (a repository pushed through the registry keeps only its manifests under its own key)."""
    linked = 0
    for m in manifests.values():
        for ref in getattr(m, "refs", []):
            if ref.kind != "blob" or ref.digest in sizes:
                continue
            d = parse_digest(ref.digest)
            if svc.blobs.key(repo, d) == f"{repo}/{d.path}":
                continue
            try:
                size = await svc.storage.stat(svc.blobs.key(repo, d))
            except NotFound:
                continue  # reported by manifest_put as missing
            sizes[ref.digest] = size
            await svc.meta.blob_link(repo, ref.digest, size, svc.blobs.review_after())
            linked += 1
    return linked


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
            await _link_blob(svc, repo, digest, size)
            result.blobs += 1
    result.blobs += await _link_shared(svc, repo, manifests, sizes)
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


async def reindex(svc: Services, *, only_new: bool, local_only: bool = False) -> ReindexResult:
    result = ReindexResult()
    for repo in await find_layouts(svc.storage, local_only=local_only):
        if only_new and await svc.meta.repo_exists(repo):
            continue
        await import_layout(svc, repo, result)
    for p in result.problems:
        log.warning("reindex: %s", p)
    return result


async def reindex_new_layouts(svc: Services) -> None:
    """Start-up import. Local disks only: on S3 this would list the bucket level by level at
    every start (requests that cost money and time); there ``registry reindex`` imports."""
    if svc.storage.local_path("") is None:
        return
    result = await reindex(svc, only_new=True, local_only=True)
    if result.repositories:
        log.info("imported %d OCI layout(s): %d manifests, %d tags, %d blobs", result.repositories,
                 result.manifests, result.tags, result.blobs)
