"""SQLite: what the scrubber and its reports need."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from registry.meta.base import Reach, ScrubItem, ScrubState

_TABLE = {"blob": "repo_blobs", "manifest": "manifests"}

# Everything each tag reaches: its manifest, child manifests, their blobs; with
# the scrub finding of each, or why its row is missing.
REACH_SQL = """
WITH RECURSIVE reach (repo_id, tag, digest, kind) AS (
    SELECT t.repo_id, t.name, t.digest, 'manifest' FROM tags t
    {where}
    UNION
    SELECT r.repo_id, r.tag, x.child, x.kind FROM reach r
    JOIN manifest_refs x ON x.repo_id = r.repo_id AND x.parent = r.digest AND r.kind = 'manifest'
)
SELECT p.name, r.tag, r.kind, r.digest,
       CASE WHEN r.kind = 'blob' AND b.digest IS NULL THEN 'blob missing from the repository'
            WHEN r.kind = 'manifest' AND m.digest IS NULL THEN 'manifest missing from the repository'
            ELSE coalesce(b.damaged, m.damaged) END
FROM reach r JOIN repositories p ON p.id = r.repo_id
LEFT JOIN repo_blobs b ON r.kind = 'blob' AND b.repo_id = r.repo_id AND b.digest = r.digest
LEFT JOIN manifests m ON r.kind = 'manifest' AND m.repo_id = r.repo_id AND m.digest = r.digest
ORDER BY 1, 2, 3, 4
"""

# Damaged rows (the partial indexes on damaged IS NOT NULL): what no tag reaches is reported too.
DAMAGED_SQL = """
SELECT r.name, '', 'blob', b.digest, b.damaged FROM repo_blobs b JOIN repositories r ON r.id = b.repo_id
WHERE b.damaged IS NOT NULL AND ($1 IS NULL OR r.name = $1)
UNION ALL
SELECT r.name, '', 'manifest', m.digest, m.damaged FROM manifests m JOIN repositories r ON r.id = m.repo_id
WHERE m.damaged IS NOT NULL AND ($1 IS NULL OR r.name = $1)
ORDER BY 1, 3, 4
"""


class SQLiteScrub:
    _read: Callable[..., list[tuple[Any, ...]]]
    _write: Callable[..., Awaitable[Any]]

    async def checksum_put(self, digest: str, xxh3: str) -> None:
        await self._write(lambda conn: conn.execute(
            "INSERT OR IGNORE INTO checksums (digest, xxh3) VALUES (?, ?)", (digest, xxh3)) and None)

    async def checksum_get(self, digest: str) -> str | None:
        rows = self._read("SELECT xxh3 FROM checksums WHERE digest = ?", (digest,))
        return rows[0][0] if rows else None

    async def scrub_items(self, after: tuple[str, str, str] | None, limit: int,
                          repo: str | None = None) -> list[ScrubItem]:
        after = after or ("", "", "")
        rows = self._read(
            "SELECT * FROM (SELECT r.name, 'blob' AS kind, b.digest, b.size FROM repo_blobs b "
            "JOIN repositories r ON r.id = b.repo_id UNION ALL SELECT r.name, 'manifest', m.digest, m.size "
            "FROM manifests m JOIN repositories r ON r.id = m.repo_id) "
            "WHERE (? IS NULL OR name = ?) AND (name, kind, digest) > (?, ?, ?) ORDER BY 1, 2, 3 LIMIT ?",
            (repo, repo, *after, limit))
        return [ScrubItem(*r) for r in rows]

    async def scrub_mark(self, repo: str, kind: str, digest: str, damaged: str | None, now: float) -> None:
        await self._write(lambda conn: conn.execute(
            f"UPDATE {_TABLE[kind]} SET damaged = ?, scrubbed_at = ? WHERE digest = ? "
            "AND repo_id = (SELECT id FROM repositories WHERE name = ?)", (damaged, now, digest, repo)) and None)

    async def scrub_state(self) -> ScrubState:
        rows = self._read("SELECT cursor_repo, cursor_kind, cursor_digest, pass_started, last_complete "
                          "FROM scrub_state WHERE id = 1")
        if not rows:
            return ScrubState(None, None, None)
        r = rows[0]
        return ScrubState((r[0], r[1], r[2]) if r[0] is not None else None, r[3], r[4])

    async def scrub_save(self, state: ScrubState) -> None:
        c = state.cursor or (None, None, None)
        await self._write(lambda conn: conn.execute(
            "INSERT INTO scrub_state (id, cursor_repo, cursor_kind, cursor_digest, pass_started, last_complete) "
            "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET cursor_repo = excluded.cursor_repo, "
            "cursor_kind = excluded.cursor_kind, cursor_digest = excluded.cursor_digest, "
            "pass_started = excluded.pass_started, last_complete = excluded.last_complete",
            (*c, state.pass_started, state.last_complete)) and None)

    async def scrub_damaged(self, repo: str | None = None) -> list[Reach]:
        rows = self._read(DAMAGED_SQL.replace("$1", "?"), (repo, repo, repo, repo))
        return [Reach(*r) for r in rows]

    async def scrub_reach(self, repo: str | None = None) -> list[Reach]:
        where = "WHERE t.repo_id = (SELECT id FROM repositories WHERE name = ?)" if repo is not None else ""
        rows = self._read(REACH_SQL.format(where=where), (repo,) if repo is not None else ())
        return [Reach(*r) for r in rows]
