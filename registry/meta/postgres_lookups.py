"""The PostgreSQL store's request-path lookups, batched (meta/pg_batch.py): manifests by
tag or digest, blob stats, tag pages, and the GC postponements of existence checks. Each
statement answers a batch of keys; the first column of its rows is the key's position."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from registry.meta.base import NEVER, MetaError
from registry.meta.pg_batch import Batcher

MANIFEST_COLS = ("m.digest, m.media_type, m.size, m.payload, m.subject, m.artifact_type, m.annotations, "
                 "m.review_after")
# Each step is a LATERAL subquery with LIMIT 1, so PostgreSQL plans it on its own as the
# unique-key lookup it is, whatever its statistics say (a fresh schema has none, and a join
# flattened into one plan then scans a repository's tags for every key). COLLATE "C" lets
# the names use their btree.
_KEYS = ("FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q (a, b, i) CROSS JOIN LATERAL "
         '(SELECT id FROM repositories WHERE name = q.a COLLATE "C" LIMIT 1) r ')
_BY_TAG = (f"SELECT q.i, {MANIFEST_COLS} {_KEYS} CROSS JOIN LATERAL (SELECT digest FROM tags "
           'WHERE repo_id = r.id AND name = q.b COLLATE "C" LIMIT 1) t CROSS JOIN LATERAL '
           "(SELECT * FROM manifests WHERE repo_id = r.id AND digest = t.digest LIMIT 1) m")
_BY_DIGEST = (f"SELECT q.i, {MANIFEST_COLS} {_KEYS} CROSS JOIN LATERAL "
              "(SELECT * FROM manifests WHERE repo_id = r.id AND digest = q.b LIMIT 1) m")
_BLOB_STAT = (f"SELECT q.i, x.* {_KEYS} CROSS JOIN LATERAL (SELECT b.size, b.review_after, b.damaged "
              "FROM repo_blobs b WHERE b.repo_id = r.id AND b.digest = q.b UNION ALL "
              "SELECT m.size, $3::float8, NULL::text FROM manifests m WHERE m.repo_id = r.id "
              "AND m.digest = q.b LIMIT 1) x")
_TAGS = ("SELECT q.i, ARRAY(SELECT name FROM tags "
         'WHERE repo_id = r.id AND name > q.b COLLATE "C" ORDER BY name LIMIT q.n) '
         "FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS q (a, b, n, i) CROSS JOIN LATERAL "
         '(SELECT id FROM repositories WHERE name = q.a COLLATE "C" LIMIT 1) r')


class PostgresLookups:
    cfg: Any  # PostgresConfig
    pool: Any
    _batchers: dict[str, Batcher[Any]]
    _rows: Callable[..., Awaitable[list[Any]]]

    def _batched(self, kind: str) -> Batcher[Any]:
        b = self._batchers.get(kind)
        if b is None:
            if self.pool is None:
                raise MetaError("metadata store not open")
            b = self._batchers[kind] = Batcher(getattr(self, f"_batch_{kind}"), max(1, self.cfg.pool_size // 8))
        return b

    async def _batch_by_tag(self, keys: list[tuple[str, str]]) -> list[Any]:
        return await self._rows(_BY_TAG, [k[0] for k in keys], [k[1] for k in keys])

    async def _batch_by_digest(self, keys: list[tuple[str, str]]) -> list[Any]:
        return await self._rows(_BY_DIGEST, [k[0] for k in keys], [k[1] for k in keys])

    async def _batch_blob_stat(self, keys: list[tuple[str, str]]) -> list[Any]:
        return await self._rows(_BLOB_STAT, [k[0] for k in keys], [k[1] for k in keys], NEVER)

    async def _batch_tags(self, keys: list[tuple[str, str, int | None]]) -> list[Any]:
        return await self._rows(_TAGS, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])

    async def _batch_touch_blob(self, keys: list[tuple[str, str, float]]) -> list[Any]:
        return await self._rows("SELECT * FROM registry_touch('blob', $1, $2, $3)",
                                [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])

    async def _batch_touch_manifest(self, keys: list[tuple[str, str, float]]) -> list[Any]:
        return await self._rows("SELECT * FROM registry_touch('manifest', $1, $2, $3)",
                                [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
