"""Open the metadata store the config names."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator

from registry.config import Config
from registry.meta.base import MetaStore
from registry.meta.sqlite import SQLiteMeta


def sqlite_path(cfg: Config) -> Path:
    return Path(cfg.meta.path) if cfg.meta.path else cfg.root / "_registry" / "meta.sqlite"


@contextlib.asynccontextmanager
async def open_meta(cfg: Config) -> AsyncIterator[MetaStore]:
    store = SQLiteMeta(sqlite_path(cfg), durable=cfg.storage.commit)
    try:
        await store.open()
        yield store
    finally:
        await store.close()
