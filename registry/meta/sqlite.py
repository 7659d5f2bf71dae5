"""SQLite metadata store, the embedded default.

Reads run on the event loop on their own connection: in WAL mode they never
wait for a writer, and an indexed lookup costs microseconds, less than a
thread hop. Writes go to one writer thread, which runs whatever is queued in a
single transaction (group commit): each operation in its own savepoint, one
fsync for the lot. Several processes may share the file; SQLite's lock (with
a busy timeout) serializes their writers.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import zlib
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

from registry.meta import migrate
from registry.meta.base import (NEVER, BadReferences, BlobStat, Counts, GenerationLayout, LayoutEntry, Manifest,
                                 MetaError, NamedLocks, Ref, Upload)
from registry.meta.sqlite_gc import SQLiteGC, bump_layout, delete_manifest, requeue
from registry.meta.sqlite_scrub import SQLiteScrub
from registry.meta.sqlite_dedupe import SQLiteDedupe

T = TypeVar("T")
MAX_BATCH = 512

_MANIFEST_COLS = ("m.digest, m.media_type, m.size, m.payload, m.subject, m.artifact_type, m.annotations, "
                  "m.review_after")


def _manifest(row: tuple[Any, ...]) -> Manifest:
    return Manifest(digest=row[0], media_type=row[1], size=row[2], payload=bytes(row[3]), subject=row[4],
                    artifact_type=row[5], annotations=json.loads(row[6]) if row[6] else None,
                    review_after=row[7])


def _repo_id(conn: sqlite3.Connection, repo: str, create: bool) -> int | None:
    row = conn.execute("SELECT id FROM repositories WHERE name = ?", (repo,)).fetchone()
    if row:
        return row[0]
    if not create:
        return None
    return conn.execute("INSERT INTO repositories (name, created_at) VALUES (?, ?)",
                        (repo, time.time())).lastrowid


class SQLiteMeta(SQLiteGC, SQLiteScrub, SQLiteDedupe, GenerationLayout):
    def __init__(self, path: str | Path, *, durable: bool = True):
        self.path = Path(path)
        self.durable = durable
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self._local_locks = NamedLocks()

    # -- connections and the writer thread
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
        return conn

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._writer, args=(ready,), name="sqlite-writer", daemon=True)
        self._thread.start()
        await ready
        await self._write(self._migrate)
        self._reader = self._connect()
        self._reader.execute("PRAGMA query_only = ON")
        self._lock_fd = os.open(self.path.with_name(self.path.name + ".locks"), os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """A byte-range lock on one shared file: worker processes on this host exclude
        each other; within a process, an asyncio lock of the same name comes first."""
        assert self._lock_fd is not None, "store not open"
        offset = zlib.crc32(name.encode())
        loop = asyncio.get_running_loop()
        async with self._local_locks.hold(name):
            await loop.run_in_executor(None, fcntl.lockf, self._lock_fd, fcntl.LOCK_EX, 1, offset)
            try:
                yield
            finally:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, offset)

    async def close(self) -> None:
        if self._thread:
            self._q.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        if self._reader:
            self._reader.close()
            self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _writer(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
            conn.execute("PRAGMA journal_mode = WAL")
        except Exception as exc:  # report to open(), then stop
            loop.call_soon_threadsafe(_settle, [(ready, None, MetaError(f"sqlite {self.path}: {exc}"))])
            return
        loop.call_soon_threadsafe(_settle, [(ready, None, None)])
        stop = False
        while not stop:
            batch = [self._q.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                stop = True
                batch = [b for b in batch if b is not None]
            if batch:
                loop.call_soon_threadsafe(_settle, self._run_batch(conn, batch))
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Any]) -> list[Any]:
        results = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((fut, fn(conn), None))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, None, exc if not isinstance(exc, sqlite3.Error) else MetaError(str(exc))))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(fut, None, MetaError(f"metadata store: {exc}")) for _, fut in batch]
        return results

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._q.put((fn, fut))
        return await fut

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._reader is not None, "store not open"
        try:
            return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise MetaError(f"metadata store: {exc}") from None

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                     "name TEXT NOT NULL, applied_at REAL NOT NULL)")
        have = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        top = migrate.latest("sqlite")
        if have and max(have) > top:
            raise migrate.SchemaTooNew(migrate.too_new_message(max(have), "sqlite"))
        for version, name, sql in migrate.migrations("sqlite"):
            if version in have:
                continue
            for stmt in migrate.statements(sql):
                conn.execute(stmt)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))

    async def schema_version(self) -> int:
        return self._read("SELECT coalesce(max(version), 0) FROM schema_migrations")[0][0]

    # -- blobs
    async def blob_size(self, repo: str, digest: str) -> int | None:
        rows = self._read(
            "SELECT b.size FROM repo_blobs b JOIN repositories r ON r.id = b.repo_id "
            "WHERE r.name = ? AND b.digest = ? "
            "UNION ALL SELECT m.size FROM manifests m JOIN repositories r ON r.id = m.repo_id "
            "WHERE r.name = ? AND m.digest = ? LIMIT 1", (repo, digest, repo, digest))
        return rows[0][0] if rows else None

    async def blob_stat(self, repo: str, digest: str) -> BlobStat | None:
        rows = self._read(
            "SELECT b.size, b.review_after, b.damaged FROM repo_blobs b JOIN repositories r ON r.id = b.repo_id "
            "WHERE r.name = ? AND b.digest = ? "
            "UNION ALL SELECT m.size, ?, NULL FROM manifests m JOIN repositories r ON r.id = m.repo_id "
            "WHERE r.name = ? AND m.digest = ? LIMIT 1", (repo, digest, NEVER, repo, digest))
        return BlobStat(*rows[0]) if rows else None

    async def touch(self, repo: str, kind: str, digest: str, review_after: float) -> bool:
        table = "repo_blobs" if kind == "blob" else "manifests"

        def write(conn: sqlite3.Connection) -> bool:
            conn.execute(f"UPDATE {table} SET review_after = ? WHERE digest = ? AND review_after < ? "
                         "AND review_after < ? AND repo_id = (SELECT id FROM repositories WHERE name = ?)",
                         (review_after, digest, review_after, NEVER, repo))
            return conn.execute(f"SELECT 1 FROM {table} WHERE digest = ? AND repo_id = "
                                "(SELECT id FROM repositories WHERE name = ?)", (digest, repo)).fetchone() is not None
        return await self._write(write)

    async def blob_holder(self, digest: str) -> tuple[str, int] | None:
        rows = self._read("SELECT r.name, b.size FROM repo_blobs b JOIN repositories r ON r.id = b.repo_id "
                          "WHERE b.digest = ? LIMIT 1", (digest,))
        return (rows[0][0], rows[0][1]) if rows else None

    async def blob_link(self, repo: str, digest: str, size: int, review_after: float,
                        checksum: str | None = None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            rid = _repo_id(conn, repo, True)
            if checksum is not None:
                conn.execute("INSERT OR IGNORE INTO checksums (digest, xxh3) VALUES (?, ?)", (digest, checksum))
            conn.execute("INSERT INTO repo_blobs (repo_id, digest, size, created_at, review_after) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT (repo_id, digest) DO UPDATE SET "
                         "review_after = max(review_after, excluded.review_after)",
                         (rid, digest, size, time.time(), review_after))
        await self._write(op)

    async def blob_unlink(self, repo: str, digest: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM repo_blobs WHERE digest = ? AND repo_id = "
                                "(SELECT id FROM repositories WHERE name = ?)", (digest, repo)).rowcount > 0
        return await self._write(op)

    # -- manifests and tags
    async def manifest_put(self, repo: str, m: Manifest, tags: list[str], review_after: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            rid = _repo_id(conn, repo, True)
            missing, wrong = [], []
            for ref in m.refs:
                table = "repo_blobs" if ref.kind == "blob" else "manifests"
                row = conn.execute(f"SELECT size FROM {table} WHERE repo_id = ? AND digest = ?",
                                   (rid, ref.digest)).fetchone()
                if row is None:
                    missing.append(ref.digest)
                elif row[0] != ref.size:
                    wrong.append(f"{ref.digest} is {row[0]} bytes, not {ref.size}")
            if missing or wrong:
                raise BadReferences(missing, wrong)
            now = time.time()
            conn.execute(
                "INSERT INTO manifests (repo_id, digest, media_type, size, payload, subject, artifact_type, "
                "annotations, created_at, review_after) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (repo_id, digest) DO UPDATE SET review_after = max(review_after, excluded.review_after)",
                (rid, m.digest, m.media_type, m.size, m.payload, m.subject, m.artifact_type,
                 json.dumps(m.annotations) if m.annotations else None, now, review_after))
            conn.executemany("INSERT OR IGNORE INTO manifest_refs (repo_id, parent, child, kind) "
                             "VALUES (?, ?, ?, ?)", [(rid, m.digest, r.digest, r.kind) for r in m.refs])
            if tags:  # a manifest a tag moves away from may now be unused
                marks = ",".join("?" * len(tags))
                moved = [r[0] for r in conn.execute(
                    f"SELECT digest FROM tags WHERE repo_id = ? AND name IN ({marks}) AND digest <> ?",
                    (rid, *tags, m.digest))]
                requeue(conn, rid, "manifest", moved, review_after)
            bump_layout(conn, rid)
            conn.executemany("INSERT INTO tags (repo_id, name, digest, updated_at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest, "
                             "updated_at = excluded.updated_at", [(rid, tag, m.digest, now) for tag in tags])
        await self._write(op)

    async def manifest_get(self, repo: str, reference: str) -> Manifest | None:
        if ":" in reference:
            rows = self._read(f"SELECT {_MANIFEST_COLS} FROM manifests m JOIN repositories r ON r.id = m.repo_id "
                              "WHERE r.name = ? AND m.digest = ?", (repo, reference))
        else:
            rows = self._read(f"SELECT {_MANIFEST_COLS} FROM tags t JOIN repositories r ON r.id = t.repo_id "
                              "JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest "
                              "WHERE r.name = ? AND t.name = ?", (repo, reference))
        return _manifest(rows[0]) if rows else None

    async def manifest_delete(self, repo: str, digest: str, requeue_at: float | None = None) -> bool:
        at = time.time() if requeue_at is None else requeue_at

        def op(conn: sqlite3.Connection) -> bool:
            rid = _repo_id(conn, repo, False)
            return rid is not None and delete_manifest(conn, rid, digest, at)
        return await self._write(op)

    async def tag_delete(self, repo: str, tag: str, requeue_at: float | None = None) -> bool:
        at = time.time() if requeue_at is None else requeue_at

        def op(conn: sqlite3.Connection) -> bool:
            rid = _repo_id(conn, repo, False)
            if rid is None:
                return False
            row = conn.execute("DELETE FROM tags WHERE name = ? AND repo_id = ? RETURNING digest",
                               (tag, rid)).fetchone()
            if row is None:
                return False
            bump_layout(conn, rid)
            requeue(conn, rid, "manifest", [row[0]], at)
            return True
        return await self._write(op)

    async def tags(self, repo: str, n: int | None, last: str | None) -> list[str] | None:
        rid = self._read("SELECT id FROM repositories WHERE name = ?", (repo,))
        if not rid:
            return None
        rows = self._read("SELECT name FROM tags WHERE repo_id = ? AND name > ? ORDER BY name LIMIT ?",
                          (rid[0][0], last or "", -1 if n is None else n))
        return [r[0] for r in rows]

    async def referrers(self, repo: str, subject: str, artifact_type: str | None) -> list[Manifest]:
        sql = (f"SELECT {_MANIFEST_COLS} FROM manifests m JOIN repositories r ON r.id = m.repo_id "
               "WHERE r.name = ? AND m.subject = ?")
        params: tuple[Any, ...] = (repo, subject)
        if artifact_type is not None:
            sql += " AND m.artifact_type = ?"
            params += (artifact_type,)
        return [_manifest(r) for r in self._read(sql + " ORDER BY m.created_at, m.digest", params)]

    async def catalog(self, n: int | None, last: str | None) -> list[str]:
        rows = self._read("SELECT name FROM repositories WHERE name > ? ORDER BY name LIMIT ?",
                          (last or "", -1 if n is None else n))
        return [r[0] for r in rows]

    async def repo_exists(self, repo: str) -> bool:
        return bool(self._read("SELECT 1 FROM repositories WHERE name = ?", (repo,)))

    async def layout_generation(self, repo: str) -> int:
        rows = self._read("SELECT layout_gen FROM repositories WHERE name = ?", (repo,))
        return rows[0][0] if rows else 0

    async def layout_synced(self, repo: str, generation: int) -> None:
        await self._write(lambda conn: conn.execute(
            "UPDATE repositories SET layout_synced = max(layout_synced, ?) WHERE name = ?",
            (generation, repo)) and None)

    async def layout_stale(self) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM repositories WHERE layout_gen > layout_synced")]

    async def layout_entries(self, repo: str) -> list[LayoutEntry]:
        rows = self._read(
            "SELECT t.name, m.digest, m.media_type, m.size, m.artifact_type FROM tags t "
            "JOIN repositories r ON r.id = t.repo_id JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest "
            "WHERE r.name = ? "
            "UNION ALL SELECT NULL, m.digest, m.media_type, m.size, m.artifact_type FROM manifests m "
            "JOIN repositories r ON r.id = m.repo_id WHERE r.name = ? "
            "AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo_id = m.repo_id AND t.digest = m.digest) "
            "AND NOT EXISTS (SELECT 1 FROM manifest_refs x WHERE x.repo_id = m.repo_id AND x.child = m.digest "
            "AND x.kind = 'manifest') ORDER BY 1, 2", (repo, repo))
        return [LayoutEntry(tag=r[0], digest=r[1], media_type=r[2], size=r[3], artifact_type=r[4]) for r in rows]

    # -- upload sessions
    async def upload_create(self, upload_id: str, repo: str) -> None:
        now = time.time()
        await self._write(lambda conn: conn.execute(
            "INSERT INTO uploads (id, repo, size, created_at, updated_at) VALUES (?, ?, 0, ?, ?)",
            (upload_id, repo, now, now)) and None)

    async def upload_get(self, upload_id: str) -> Upload | None:
        rows = self._read("SELECT id, repo, size, created_at, updated_at FROM uploads WHERE id = ?", (upload_id,))
        return Upload(*rows[0]) if rows else None

    async def upload_lease(self, upload_id: str, size: int, writer: str, until: float, now: float) -> bool:
        return await self._write(lambda conn: conn.execute(
            "UPDATE uploads SET writer = ?, lease_until = ? WHERE id = ? AND size = ? "
            "AND (writer IS NULL OR writer = ? OR lease_until < ?)",
            (writer, until, upload_id, size, writer, now)).rowcount > 0)

    async def upload_set_size(self, upload_id: str, old: int, new: int, writer: str | None = None) -> bool:
        return await self._write(lambda conn: conn.execute(
            "UPDATE uploads SET size = ?, updated_at = ?, writer = NULL, lease_until = NULL "
            "WHERE id = ? AND size = ? AND (? IS NULL OR writer = ?)",
            (new, time.time(), upload_id, old, writer, writer)).rowcount > 0)

    async def upload_delete(self, upload_id: str) -> bool:
        return await self._write(lambda conn: conn.execute(
            "DELETE FROM uploads WHERE id = ?", (upload_id,)).rowcount > 0)

    # -- operations (issue 8)
    async def counts(self) -> Counts:
        """Store-wide totals for /metrics. These scan whole tables, so they run in a worker
        thread on a connection of their own, never on the event loop's reader."""
        if self._reader is None:
            raise MetaError("metadata store: not open")

        def run() -> Counts:
            conn = self._connect()
            try:
                conn.execute("PRAGMA query_only = ON")
                repos, manifests, tags, uploads, blob_bytes, manifest_bytes = conn.execute(
                    "SELECT (SELECT count(*) FROM repositories), (SELECT count(*) FROM manifests), "
                    "(SELECT count(*) FROM tags), (SELECT count(*) FROM uploads), "
                    "(SELECT coalesce(sum(size), 0) FROM repo_blobs), "
                    "(SELECT coalesce(sum(size), 0) FROM manifests)").fetchone()
                blobs, unique_blob_bytes = conn.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM "
                    "(SELECT max(size) AS size FROM repo_blobs GROUP BY digest)").fetchone()
                unique_manifest_bytes = conn.execute(
                    "SELECT coalesce(sum(size), 0) FROM "
                    "(SELECT max(size) AS size FROM manifests GROUP BY digest)").fetchone()[0]
            except sqlite3.Error as exc:
                raise MetaError(f"metadata store: {exc}") from None
            finally:
                conn.close()
            return Counts(repositories=repos, manifests=manifests, tags=tags, blobs=blobs, uploads=uploads,
                          logical_bytes=blob_bytes + manifest_bytes,
                          unique_bytes=unique_blob_bytes + unique_manifest_bytes)
        return await asyncio.get_running_loop().run_in_executor(None, run)


def _settle(results: list[Any]) -> None:
    for fut, value, exc in results:
        if fut.cancelled():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


__all__ = ["SQLiteMeta", "Ref"]
