"""Make the storage driver the config names."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

from aiohttp import web

from registry.config import Config, StorageDriverConfig
from registry.storage.filesystem import FilesystemStorage


def _driver(d: StorageDriverConfig, root: Path, *, commit: bool, dedupe: bool, setting: str,
            spool_root: Path) -> Any:
    if d.name.lower() == "s3":
        from registry.storage.s3 import S3Storage
        return S3Storage(d, dedupe=dedupe, spool_dir=Path(d.spool_directory) if d.spool_directory else spool_root,
                         setting=setting)
    return FilesystemStorage(root, commit=commit, dedupe=dedupe)


def make_storage(cfg: Config) -> Any:
    """The filesystem store under rootDirectory, an S3 store (storage.storageDriver.name: s3), and
    a router in front when storage.subPaths sends repository-name prefixes elsewhere."""
    s = cfg.storage
    spool = cfg.root / "_spool"
    default = _driver(s.storage_driver, cfg.root, commit=s.commit, dedupe=s.dedupe,
                      setting="storage.storageDriver", spool_root=spool)
    if not s.sub_paths:
        return default
    from registry.storage.routing import RoutingStorage
    routes = []
    for prefix, sub in s.sub_paths.items():
        root = Path(sub.root_directory) if sub.root_directory else cfg.root
        routes.append((prefix, _driver(sub.storage_driver, root, commit=sub.commit, dedupe=sub.dedupe,
                                       setting=f"storage.subPaths.{prefix}.storageDriver", spool_root=spool)))
    return RoutingStorage(default, routes)


async def open_storage(storage: Any) -> None:
    """Connect a remote store and check it answers (a clear error naming the setting otherwise)."""
    opener = getattr(storage, "open", None)
    if opener is not None:
        await opener()


async def close_storage(storage: Any) -> None:
    closer = getattr(storage, "close", None)
    if closer is not None:
        await closer()


@contextlib.asynccontextmanager
async def storage_context(cfg: Config) -> AsyncIterator[Any]:
    storage = make_storage(cfg)
    try:
        await open_storage(storage)
        yield storage
    finally:
        await close_storage(storage)


def storage_ctx(key: "web.AppKey[Any]") -> Any:
    """An aiohttp cleanup context keeping the app's storage in ``app[key]``."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from registry.keys import CONFIG
        async with storage_context(app[CONFIG]) as storage:
            app[key] = storage
            yield
    return ctx
