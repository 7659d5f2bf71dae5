"""Make the storage driver the config names."""
from __future__ import annotations

from registry.config import Config
from registry.storage.filesystem import FilesystemStorage


def make_storage(cfg: Config) -> FilesystemStorage:
    return FilesystemStorage(cfg.root, commit=cfg.storage.commit, dedupe=cfg.storage.dedupe)
