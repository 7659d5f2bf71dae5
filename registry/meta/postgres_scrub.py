"""PostgreSQL: what the scrubber and its reports need."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from registry.meta.base import Reach, ScrubItem, ScrubState
from registry.meta.sqlite_scrub import DAMAGED_SQL, REACH_SQL

_TABLE = {"blob": "repo_blobs", "manifest": "manifests"}


class PostgresScrub:
    _rows: Callable[..., Awaitable[list[Any]]]
    _row: Callable[..., Awaitable[Any]]
    _val: Callable[..., Awaitable[Any]]
    _call: Callable[..., Awaitable[Any]]

    async def checksum_put(self, digest: str, xxh3: str) -> None:
        await self._call("execute", "INSERT INTO checksums (digest, xxh3) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                         digest, xxh3)

    async def checksum_get(self, digest: str) -> str | None:
        return await self._val("SELECT xxh3 FROM checksums WHERE digest = $1", digest)

    async def scrub_items(self, after: tuple[str, str, str] | None, limit: int,
                          repo: str | None = None) -> list[ScrubItem]:
        after = after or ("", "", "")
        rows = await self._rows(
            "SELECT * FROM (SELECT r.name, 'blob' AS kind, b.digest, b.size FROM repo_blobs b "
            "JOIN repositories r ON r.id = b.repo_id UNION ALL SELECT r.name, 'manifest', m.digest, m.size "
            "FROM manifests m JOIN repositories r ON r.id = m.repo_id) q "
            "WHERE ($1::text IS NULL OR name = $1) AND (name, kind, digest) > ($2, $3, $4) "
            "ORDER BY 1, 2, 3 LIMIT $5", repo, *after, limit)
        return [ScrubItem(*r) for r in rows]

    async def scrub_mark(self, repo: str, kind: str, digest: str, damaged: str | None, now: float) -> None:
        await self._call("execute", f"UPDATE {_TABLE[kind]} SET damaged = $3, scrubbed_at = $4 WHERE digest = $2 "
                         "AND repo_id = (SELECT id FROM repositories WHERE name = $1)", repo, digest, damaged, now)

    async def scrub_state(self) -> ScrubState:
        r = await self._row("SELECT cursor_repo, cursor_kind, cursor_digest, pass_started, last_complete "
                            "FROM scrub_state WHERE id = 1")
        if r is None:
            return ScrubState(None, None, None)
        return ScrubState((r[0], r[1], r[2]) if r[0] is not None else None, r[3], r[4])

    async def scrub_save(self, state: ScrubState) -> None:
        c = state.cursor or (None, None, None)
        await self._call(
            "execute",
            "INSERT INTO scrub_state (id, cursor_repo, cursor_kind, cursor_digest, pass_started, last_complete) "
            "VALUES (1, $1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET cursor_repo = excluded.cursor_repo, "
            "cursor_kind = excluded.cursor_kind, cursor_digest = excluded.cursor_digest, "
            "pass_started = excluded.pass_started, last_complete = excluded.last_complete",
            *c, state.pass_started, state.last_complete)

    async def scrub_damaged(self, repo: str | None = None) -> list[Reach]:
        rows = await self._rows(DAMAGED_SQL.replace("$1", "$1::text"), repo)
        return [Reach(*r) for r in rows]

    async def scrub_reach(self, repo: str | None = None) -> list[Reach]:
        if repo is None:
            rows = await self._rows(REACH_SQL.format(where=""))
        else:
            rows = await self._rows(REACH_SQL.format(
                where="WHERE t.repo_id = (SELECT id FROM repositories WHERE name = $1)"), repo)
        return [Reach(*r) for r in rows]
