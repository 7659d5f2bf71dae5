"""SQLite: what GC needs. Collection runs as one writer operation per batch,
so it is serialized with every manifest push (BEGIN IMMEDIATE): a row GC has
decided to delete can no longer be referenced, and a referenced row is never
deleted."""
from __future__ import annotations

import sqlite3
from typing import Any, Callable, Iterable

from registry.meta.base import NEVER, Candidate, Upload

_TABLE = {"blob": "repo_blobs", "manifest": "manifests"}


def bump_layout(conn: sqlite3.Connection, rid: int) -> None:
    conn.execute("UPDATE repositories SET layout_gen = layout_gen + 1 WHERE id = ?", (rid,))


def requeue(conn: sqlite3.Connection, rid: int, kind: str, digests: Iterable[str], at: float) -> None:
    """Put rows back in GC's queue, due no earlier than ``at``."""
    conn.executemany(
        f"UPDATE {_TABLE[kind]} SET review_after = CASE WHEN review_after >= ? THEN ? "
        "ELSE max(review_after, ?) END WHERE repo_id = ? AND digest = ?",
        [(NEVER, at, at, rid, d) for d in digests])


def delete_manifest(conn: sqlite3.Connection, rid: int, digest: str, requeue_at: float) -> bool:
    """Delete a manifest (its tags and references go with it) and queue what it
    referred to and what refers to it as subject."""
    children = conn.execute("SELECT child, kind FROM manifest_refs WHERE repo_id = ? AND parent = ?",
                            (rid, digest)).fetchall()
    referrers = [r[0] for r in conn.execute("SELECT digest FROM manifests WHERE repo_id = ? AND subject = ?",
                                            (rid, digest))]
    conn.execute("DELETE FROM tags WHERE repo_id = ? AND digest = ?", (rid, digest))
    if conn.execute("DELETE FROM manifests WHERE repo_id = ? AND digest = ?", (rid, digest)).rowcount == 0:
        return False
    conn.execute("DELETE FROM manifest_refs WHERE repo_id = ? AND parent = ?", (rid, digest))
    requeue(conn, rid, "blob", [c for c, k in children if k == "blob"], requeue_at)
    requeue(conn, rid, "manifest", [c for c, k in children if k == "manifest"] + referrers, requeue_at)
    bump_layout(conn, rid)
    return True


def _collect_one(conn: sqlite3.Connection, rid: int, c: Candidate, now: float, delete_untagged: bool,
                 dry_run: bool, requeue_at: float) -> bool:
    table = _TABLE[c.kind]
    row = conn.execute(f"SELECT review_after{', subject' if c.kind == 'manifest' else ''} FROM {table} "
                       "WHERE repo_id = ? AND digest = ?", (rid, c.digest)).fetchone()
    if row is None or row[0] > now:  # gone, or postponed since it was listed
        return False

    def exists(sql: str, *args: Any) -> bool:
        return conn.execute(f"SELECT EXISTS ({sql})", args).fetchone()[0] == 1

    if c.kind == "blob":
        in_use = exists("SELECT 1 FROM manifest_refs WHERE repo_id = ? AND child = ? AND kind = 'blob'",
                        rid, c.digest)
    else:
        subject = row[1]
        in_use = (exists("SELECT 1 FROM tags WHERE repo_id = ? AND digest = ?", rid, c.digest)
                  or exists("SELECT 1 FROM manifest_refs WHERE repo_id = ? AND child = ? AND kind = 'manifest'",
                            rid, c.digest)
                  or (subject is not None and exists("SELECT 1 FROM manifests WHERE repo_id = ? AND digest = ?",
                                                     rid, subject))
                  or (subject is None and not delete_untagged))
    if in_use:
        if not dry_run:
            conn.execute(f"UPDATE {table} SET review_after = ? WHERE repo_id = ? AND digest = ?",
                         (NEVER, rid, c.digest))
        return False
    if not dry_run:
        if c.kind == "blob":
            conn.execute("DELETE FROM repo_blobs WHERE repo_id = ? AND digest = ?", (rid, c.digest))
        else:
            delete_manifest(conn, rid, c.digest, requeue_at)
    return True


class SQLiteGC:
    _read: Callable[..., list[tuple[Any, ...]]]
    _write: Callable[..., Any]

    async def gc_candidates(self, now: float, limit: int, repo: str | None = None,
                            after: tuple[float, str, str, str] | None = None) -> list[Candidate]:
        after = after or (float("-inf"), "", "", "")
        rows = self._read(
            "SELECT * FROM (SELECT b.review_after, r.name, 'blob' AS kind, b.digest, b.size FROM repo_blobs b "
            "JOIN repositories r ON r.id = b.repo_id WHERE b.review_after <= ? "
            "UNION ALL SELECT m.review_after, r.name, 'manifest', m.digest, m.size FROM manifests m "
            "JOIN repositories r ON r.id = m.repo_id WHERE m.review_after <= ?) "
            "WHERE (? IS NULL OR name = ?) AND (review_after, name, kind, digest) > (?, ?, ?, ?) "
            "ORDER BY review_after, name, kind, digest LIMIT ?",
            (now, now, repo, repo, *after, limit))
        return [Candidate(repo=r[1], kind=r[2], digest=r[3], size=r[4], review_after=r[0]) for r in rows]

    async def gc_collect(self, batch: list[Candidate], now: float, delete_untagged: bool,
                         dry_run: bool = False, requeue_at: float | None = None) -> list[Candidate]:
        requeue = now if requeue_at is None else requeue_at

        def op(conn: sqlite3.Connection) -> list[Candidate]:
            ids: dict[str, int | None] = {}
            deleted = []
            for c in batch:
                if c.repo not in ids:
                    row = conn.execute("SELECT id FROM repositories WHERE name = ?", (c.repo,)).fetchone()
                    ids[c.repo] = row[0] if row else None
                rid = ids[c.repo]
                if rid is not None and _collect_one(conn, rid, c, now, delete_untagged, dry_run, requeue):
                    deleted.append(c)
            return deleted
        return await self._write(op)

    async def gc_pending(self, now: float) -> int:
        return self._read("SELECT (SELECT count(*) FROM repo_blobs WHERE review_after <= ?) + "
                          "(SELECT count(*) FROM manifests WHERE review_after <= ?)", (now, now))[0][0]

    async def digest_held(self, digest: str) -> bool:
        return bool(self._read("SELECT EXISTS (SELECT 1 FROM repo_blobs WHERE digest = ?) "
                               "OR EXISTS (SELECT 1 FROM manifests WHERE digest = ?)", (digest, digest))[0][0])

    async def uploads_expired(self, before: float, limit: int) -> list[Upload]:
        rows = self._read("SELECT id, repo, size, created_at, updated_at FROM uploads WHERE updated_at < ? "
                          "ORDER BY updated_at LIMIT ?", (before, limit))
        return [Upload(*r) for r in rows]
