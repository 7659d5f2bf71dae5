"""Open the metadata store the config names."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator

from registry.config import Config
from registry.meta.base import MetaStore


def sqlite_path(cfg: Config) -> Path:
    return Path(cfg.meta.path) if cfg.meta.path else cfg.root / "_registry" / "meta.sqlite"


def make_meta(cfg: Config) -> MetaStore:
    if cfg.meta.driver == "postgres":
        from registry.meta.postgres import PostgresMeta
        return PostgresMeta(cfg.meta.postgres)
    if cfg.meta.driver == "memory":
        from registry.meta.memory import MemoryMeta
        return MemoryMeta()
    from registry.meta.sqlite import SQLiteMeta
    return SQLiteMeta(sqlite_path(cfg), durable=cfg.storage.commit)


@contextlib.asynccontextmanager
async def open_meta(cfg: Config) -> AsyncIterator[MetaStore]:
    store = make_meta(cfg)
    try:
        await store.open()
        yield store
    finally:
        await store.close()
