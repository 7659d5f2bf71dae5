"""SQLite: what dedupe needs (see meta/dedupe.py)."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from registry.meta.dedupe import DedupeItem, DedupeState, Holder

# The next digests after a cursor, each table through its digest index (a
# UNION of two ordered, limited range scans: never a sort of everything left).
_NEXT_DIGESTS = (
    "SELECT digest FROM ("
    "SELECT * FROM (SELECT DISTINCT digest FROM repo_blobs WHERE digest > :after ORDER BY digest LIMIT :n) "
    "UNION SELECT * FROM (SELECT DISTINCT digest FROM manifests WHERE digest > :after ORDER BY digest LIMIT :n)"
    ") ORDER BY digest LIMIT :n")


class SQLiteDedupe:
    _read: Callable[..., list[tuple[Any, ...]]]
    _write: Callable[..., Awaitable[Any]]

    async def blob_holders(self, digest: str, limit: int) -> list[Holder]:
        rows = self._read(
            "SELECT r.name, b.size, b.damaged FROM repo_blobs b JOIN repositories r ON r.id = b.repo_id "
            "WHERE b.digest = ? ORDER BY b.damaged IS NOT NULL, b.created_at, r.name LIMIT ?", (digest, limit))
        return [Holder(*r) for r in rows]

    async def dedupe_items(self, after: str | None, limit: int) -> list[DedupeItem]:
        rows = self._read(
            f"WITH d AS ({_NEXT_DIGESTS}) "
            "SELECT b.digest, r.name, 'blob', b.size, b.damaged FROM repo_blobs b "
            "JOIN repositories r ON r.id = b.repo_id WHERE b.digest IN (SELECT digest FROM d) "
            "UNION ALL SELECT m.digest, r.name, 'manifest', m.size, m.damaged FROM manifests m "
            "JOIN repositories r ON r.id = m.repo_id WHERE m.digest IN (SELECT digest FROM d) "
            "ORDER BY 1, 2, 3", {"after": after or "", "n": limit})
        return [DedupeItem(*r) for r in rows]

    async def dedupe_count(self, upto: str | None) -> tuple[int, int]:
        row = self._read(
            "SELECT count(*), coalesce(sum(digest <= :upto), 0) FROM "
            "(SELECT digest FROM repo_blobs UNION SELECT digest FROM manifests)", {"upto": upto or ""})[0]
        return int(row[0]), int(row[1])

    async def dedupe_state(self) -> DedupeState:
        rows = self._read("SELECT mode, cursor, started, completed, files, bytes FROM dedupe_state WHERE id = 1")
        return DedupeState(*rows[0]) if rows else DedupeState()

    async def dedupe_save(self, state: DedupeState) -> None:
        await self._write(lambda conn: conn.execute(
            "INSERT INTO dedupe_state (id, mode, cursor, started, completed, files, bytes) "
            "VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET mode = excluded.mode, "
            "cursor = excluded.cursor, started = excluded.started, completed = excluded.completed, "
            "files = excluded.files, bytes = excluded.bytes",
            (state.mode, state.cursor, state.started, state.completed, state.files, state.bytes)) and None)
