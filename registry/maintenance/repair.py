"""Repair by walking storage (``registry gc --full``), on every driver.

Online GC never walks storage: the metadata store says what exists. This walk
finds what a crash left behind on the storage side:

- objects under a repository's ``blobs/`` that no row of the repository
  accounts for and that are older than ``older_than`` (a crash between placing
  a file and recording it): deleted;
- with shared blobs (S3 with dedupe), objects under the shared ``blobs/`` that
  no repository holds, as a blob or a manifest: deleted;
- rows whose object is missing, every blob and manifest row of every
  repository: reported, for ``registry reindex``.

Deletion goes through ``Blobs.remove_content``, whose set-aside protocol keeps
a file a concurrent push placed meanwhile. A layout on storage that the
metadata store does not know yet (copied in, not imported) is left alone and
reported, and then so is the shared ``blobs/``: its objects may be that
layout's.
"""
from __future__ import annotations

from typing import Callable

from registry.digest import Digest, parse_digest
from registry.errors import RegistryError
from registry.keys import Services
from registry.maintenance.reindex import find_layouts
from registry.storage.base import NotFound

PAGE = 1000
_PROBE = parse_digest("sha256:" + "0" * 64)


def _digest_at(rest: str) -> Digest | None:
    """The digest of ``<alg>/<hex>`` (the part of a key after ``blobs/``); None for
    temporary files and strangers."""
    parts = rest.split("/")
    if len(parts) != 2 or parts[1].startswith("."):
        return None
    try:
        return parse_digest(f"{parts[0]}:{parts[1]}")
    except RegistryError:
        return None


async def _repositories(svc: Services) -> list[str]:
    names: list[str] = []
    while True:
        page = await svc.meta.catalog(PAGE, names[-1] if names else None)
        names += page
        if len(page) < PAGE:
            return names


def _shared_roots(svc: Services, repos: list[str]) -> dict[str, str]:
    """Where shared blobs live (``""``, or ``_sub/<n>/`` behind a router) -> a repository
    whose blobs live there (remove_content needs one)."""
    roots: dict[str, str] = {}
    for repo in repos:
        key = svc.blobs.key(repo, _PROBE)
        if key != f"{repo}/{_PROBE.path}":
            roots.setdefault(key[:-len(_PROBE.path)], repo)
    return roots


async def full_walk(svc: Services, *, older_than: float, dry_run: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, list[str]]:
    report: dict[str, list[str]] = {"orphan_files_deleted": [], "rows_without_file": [],
                                    "layouts_not_imported": []}
    on_storage = set(await find_layouts(svc.storage))
    known = set(await _repositories(svc))
    repos = sorted(on_storage | known)
    report["layouts_not_imported"] = sorted(on_storage - known)
    shared = {} if report["layouts_not_imported"] else _shared_roots(svc, repos)
    total = len(repos) + len(shared)
    done = 0
    for repo in repos:
        seen: set[str] = set()
        if repo in on_storage and repo in known:
            await _repo_orphans(svc, repo, older_than, dry_run, report, seen)
        if repo in known:
            await _rows_without_file(svc, repo, seen, report)
        done += 1
        if progress:
            progress(done, total)
    for root, repo in sorted(shared.items()):
        await _shared_orphans(svc, root, repo, older_than, dry_run, report)
        done += 1
        if progress:
            progress(done, total)
    return report


async def _repo_orphans(svc: Services, repo: str, older_than: float, dry_run: bool,
                        report: dict[str, list[str]], seen: set[str]) -> None:
    prefix = f"{repo}/blobs/"
    async for key, _size, mtime in svc.storage.walk_mtime(f"{repo}/blobs"):
        seen.add(key)
        digest = _digest_at(key[len(prefix):])
        if digest is None or mtime >= older_than:
            continue
        if await svc.meta.blob_size(repo, str(digest)) is not None:
            continue
        report["orphan_files_deleted"].append(key)
        if not dry_run:
            await svc.blobs.remove_content(repo, digest)


async def _shared_orphans(svc: Services, root: str, repo: str, older_than: float, dry_run: bool,
                          report: dict[str, list[str]]) -> None:
    prefix = f"{root}blobs/"
    async for key, _size, mtime in svc.storage.walk_mtime(f"{root}blobs"):
        digest = _digest_at(key[len(prefix):])
        if digest is None or mtime >= older_than:
            continue
        if await svc.meta.digest_held(str(digest)):
            continue
        report["orphan_files_deleted"].append(key)
        if not dry_run:  # through any repository whose blobs are here: the shared object goes
            await svc.blobs.remove_content(repo, digest)  # only while no repository holds it


async def _rows_without_file(svc: Services, repo: str, seen: set[str], report: dict[str, list[str]]) -> None:
    """Every blob and manifest row of the repository (in use or queued), checked against
    the key it is served from: the objects the walk just saw, a stat for the others."""
    after = None
    missing: dict[str, None] = {}  # a digest held as blob and as manifest: reported once
    while True:
        items = await svc.meta.scrub_items(after, PAGE, repo)
        if not items:
            break
        after = (items[-1].repo, items[-1].kind, items[-1].digest)
        for it in items:
            d = parse_digest(it.digest)
            key = svc.blobs.key(repo, d) if it.kind == "blob" else f"{repo}/{d.path}"
            if key in seen:
                continue
            try:
                await svc.storage.stat(key)
            except NotFound:
                missing[f"{repo}@{it.digest}"] = None
    report["rows_without_file"] += list(missing)
