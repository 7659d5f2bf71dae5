"""PostgreSQL: what dedupe needs (see meta/dedupe.py)."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from registry.meta.dedupe import DedupeItem, DedupeState, Holder

_NEXT_DIGESTS = (
    "SELECT digest FROM ("
    "(SELECT DISTINCT digest FROM repo_blobs WHERE digest > $1 ORDER BY digest LIMIT $2) "
    "UNION (SELECT DISTINCT digest FROM manifests WHERE digest > $1 ORDER BY digest LIMIT $2)"
    ") u ORDER BY digest LIMIT $2")


class PostgresDedupe:
    _rows: Callable[..., Awaitable[list[Any]]]
    _row: Callable[..., Awaitable[Any]]
    _call: Callable[..., Awaitable[Any]]

    async def blob_holders(self, digest: str, limit: int) -> list[Holder]:
        rows = await self._rows(
            "SELECT r.name, b.size, b.damaged FROM repo_blobs b JOIN repositories r ON r.id = b.repo_id "
            "WHERE b.digest = $1 ORDER BY b.damaged IS NOT NULL, b.created_at, r.name LIMIT $2", digest, limit)
        return [Holder(r[0], r[1], r[2]) for r in rows]

    async def dedupe_items(self, after: str | None, limit: int) -> list[DedupeItem]:
        rows = await self._rows(
            f"WITH d AS ({_NEXT_DIGESTS}) "
            "SELECT b.digest, r.name, 'blob', b.size, b.damaged FROM repo_blobs b "
            "JOIN repositories r ON r.id = b.repo_id WHERE b.digest IN (SELECT digest FROM d) "
            "UNION ALL SELECT m.digest, r.name, 'manifest', m.size, m.damaged FROM manifests m "
            "JOIN repositories r ON r.id = m.repo_id WHERE m.digest IN (SELECT digest FROM d) "
            "ORDER BY 1, 2, 3", after or "", limit)
        return [DedupeItem(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def dedupe_count(self, upto: str | None) -> tuple[int, int]:
        row = await self._row(
            "SELECT count(*), count(*) FILTER (WHERE digest <= $1) FROM "
            "(SELECT digest FROM repo_blobs UNION SELECT digest FROM manifests) d", upto or "")
        return int(row[0]), int(row[1])

    async def dedupe_state(self) -> DedupeState:
        r = await self._row("SELECT mode, cursor, started, completed, files, bytes FROM dedupe_state WHERE id = 1")
        return DedupeState(r[0], r[1], r[2], r[3], r[4], r[5]) if r else DedupeState()

    async def dedupe_save(self, state: DedupeState) -> None:
        await self._call(
            "execute",
            "INSERT INTO dedupe_state (id, mode, cursor, started, completed, files, bytes) "
            "VALUES (1, $1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET mode = excluded.mode, "
            "cursor = excluded.cursor, started = excluded.started, completed = excluded.completed, "
            "files = excluded.files, bytes = excluded.bytes",
            state.mode, state.cursor, state.started, state.completed, state.files, state.bytes)
