"""PostgreSQL metadata store on asyncpg, shared by replicas.

Each operation is one round trip: single statements, data-modifying CTEs, or
a server-side function (registry_manifest_put) for the manifest push. asyncpg
prepares and caches every statement per connection. Connection failures
become MetaError (the API answers 503 with Retry-After); the pool replaces
broken connections by itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator

import asyncpg

from registry.config import PostgresConfig
from registry.meta import migrate
from registry.meta.pg_batch import Batcher
from registry.meta.pg_pool import ConnectionPool
from registry.meta.base import BadReferences, BlobStat, LayoutEntry, Manifest, MetaError, Upload
from registry.meta.postgres_gc import PostgresGC
from registry.meta.postgres_lookups import MANIFEST_COLS, PostgresLookups
from registry.meta.postgres_scrub import PostgresScrub
from registry.meta.postgres_dedupe import PostgresDedupe

MIGRATION_LOCK = 0x7265_6769_7374  # an arbitrary advisory lock key: "regist"

_TRANSIENT = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
              asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
              # asyncpg's own protocol state after the server killed a connection mid-operation
              # ("cannot switch to state ...; another operation is in progress"): the pool replaces it.
              asyncpg.InternalClientError)


def _manifest(row: Any, o: int = 0) -> Manifest:
    """A Manifest from MANIFEST_COLS starting at column ``o``."""
    return Manifest(digest=row[o], media_type=row[o + 1], size=row[o + 2], payload=bytes(row[o + 3]),
                    subject=row[o + 4], artifact_type=row[o + 5],
                    annotations=json.loads(row[o + 6]) if row[o + 6] else None, review_after=row[o + 7])


def connect_kwargs(cfg: PostgresConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"timeout": cfg.connect_timeout,
                          "server_settings": {"search_path": cfg.schema, "application_name": cfg.application_name}}
    if cfg.dsn:
        kw["dsn"] = cfg.dsn
    else:
        kw.update(host=cfg.host, port=cfg.port, user=cfg.user, database=cfg.database,
                  password=cfg.password or None)
    kw["ssl"] = cfg.sslmode
    return kw


def _describe(exc: BaseException) -> str:
    """The reason of a failure, without connection parameters (no password can leak)."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__ + (f": {exc}" if isinstance(exc, asyncpg.InterfaceError) else "")


class PostgresMeta(PostgresLookups, PostgresGC, PostgresScrub, PostgresDedupe):
    def __init__(self, cfg: PostgresConfig):
        self.cfg = cfg
        self.pool: ConnectionPool | None = None
        self.lock_pool: ConnectionPool | None = None
        self._batchers: dict[str, Batcher[Any]] = {}
        self.lock_conflicts = 0  # statements PostgreSQL aborted to break a deadlock (then run again)

    # -- pool and migrations
    async def open(self) -> None:
        try:
            kw = connect_kwargs(self.cfg)
            # Generic plans from the first run: every statement here is a lookup on unique keys
            # or a bounded range, and the batch lookups (arrays of any length) otherwise get
            # planned again at each run, which costs more than running them.
            kw["server_settings"]["plan_cache_mode"] = "force_generic_plan"
            if self.cfg.query_timeout:  # the server cancels (and rolls back) a statement that waits too long
                kw["server_settings"]["statement_timeout"] = str(int(float(self.cfg.query_timeout) * 1000))
            self.pool = ConnectionPool(self.cfg.pool_size, self.cfg.query_timeout or None, **kw)
            await self.pool.open()
            # Advisory locks are held on connections of their own: a lock holder that waited
            # for a query connection from the same pool could deadlock. No statement timeout:
            # waiting for a lock another replica holds (a GC pass) may take long.
            self.lock_pool = ConnectionPool(max(2, self.cfg.pool_size // 2), None, **connect_kwargs(self.cfg))
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise MetaError(f"cannot connect to PostgreSQL at {self.cfg.where()}: {_describe(exc)}") from None
        try:
            await self.migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for b in self._batchers.values():
            await b.close()
        self._batchers.clear()
        for pool in (self.pool, self.lock_pool):
            if pool is not None:
                await pool.close()
        self.pool = self.lock_pool = None

    async def migrate(self) -> int:
        """Apply pending migrations under an advisory lock (replicas may start together)."""
        # A connection of its own: no statement timeout for a long migration or the wait for
        # another replica's.
        try:
            conn = await asyncpg.connect(**connect_kwargs(self.cfg))
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise MetaError(f"cannot connect to PostgreSQL at {self.cfg.where()}: {_describe(exc)}") from None
        try:
            return await self._migrate(conn)
        finally:
            await conn.close()

    async def _migrate(self, conn: asyncpg.Connection) -> int:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            if self.cfg.schema != "public":
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.cfg.schema}"')
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                               "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            have = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            if have and max(have) > migrate.latest("postgres"):
                raise migrate.SchemaTooNew(migrate.too_new_message(max(have), "postgres"))
            for version, name, sql in migrate.migrations("postgres"):
                if version in have:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                                       version, name, time.time())
            return max(have | {v for v, _, _ in migrate.migrations("postgres")})
        except asyncpg.PostgresError as exc:
            raise MetaError(f"migrating PostgreSQL at {self.cfg.where()}: {_describe(exc)}") from None
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    async def _lock_conn(self) -> asyncpg.Connection:
        if self.lock_pool is None:
            raise MetaError("metadata store not open")
        try:
            return await self.lock_pool.take()
        except _TRANSIENT as exc:
            raise MetaError(f"PostgreSQL at {self.cfg.where()} unavailable: {_describe(exc)}") from None

    def _lock_done(self, conn: asyncpg.Connection, clean: bool) -> None:
        """A lock connection goes back only when its lock was released; otherwise it is
        terminated, which releases the lock server-side."""
        assert self.lock_pool is not None
        if clean:
            self.lock_pool.give(conn)
        else:
            self.lock_pool.drop(conn)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """A session advisory lock, held on a connection of the lock pool while the caller works."""
        name = f"{self.cfg.schema}/{name}"  # scoped by schema: advisory locks are database-wide
        conn = await self._lock_conn()
        clean = False
        try:
            try:
                await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", name)
            except (*_TRANSIENT, asyncpg.PostgresError) as exc:
                raise MetaError(f"PostgreSQL lock {name!r}: {_describe(exc)}") from None
            try:
                yield
            finally:
                with contextlib.suppress(*_TRANSIENT, asyncpg.PostgresError):
                    await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", name)
                    clean = True
        finally:
            self._lock_done(conn, clean)

    @contextlib.asynccontextmanager
    async def layout_rewrite(self, repo: str) -> AsyncIterator[list[LayoutEntry]]:
        """Two round trips on a lock connection: lock and read, then mark what was read
        as synced and unlock (registry_layout_begin/_end)."""
        name = f"{self.cfg.schema}/layout:{repo}"
        conn = await self._lock_conn()
        clean = False
        try:
            try:
                rows = await conn.fetch("SELECT * FROM registry_layout_begin($1, $2)", repo, name)
            except (*_TRANSIENT, asyncpg.PostgresError) as exc:
                raise MetaError(f"PostgreSQL at {self.cfg.where()}: {_describe(exc)}") from None
            changes: list[int] = []
            entries = []
            for r in rows:
                if r[1] is None:
                    changes = list(r[5])
                else:
                    entries.append(LayoutEntry(tag=r[0], digest=r[1], media_type=r[2], size=r[3],
                                               artifact_type=r[4]))
            entries.sort(key=lambda e: (e.tag is not None, e.tag or "", e.digest))
            yield entries
            try:
                await conn.execute("SELECT registry_layout_end($1, $2)", name, changes)
            except (*_TRANSIENT, asyncpg.PostgresError) as exc:
                raise MetaError(f"PostgreSQL at {self.cfg.where()}: {_describe(exc)}") from None
            clean = True
        finally:
            self._lock_done(conn, clean)

    async def schema_version(self) -> int:
        return await self._val("SELECT coalesce(max(version), 0) FROM schema_migrations")

    # -- one round trip each
    async def _call(self, method: str, sql: str, *args: Any) -> Any:
        if self.pool is None:
            raise MetaError("metadata store not open")
        for attempt in range(4):
            try:
                return await self.pool.run(method, sql, *args)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                self.lock_conflicts += 1
                if attempt == 3:  # two pushes locking the same rows in opposite orders: run it again
                    raise MetaError("PostgreSQL: repeated lock conflicts") from None
            except _TRANSIENT as exc:
                raise MetaError(f"PostgreSQL at {self.cfg.where()} unavailable: {_describe(exc)}") from None
            except asyncpg.PostgresError as exc:
                raise MetaError(f"PostgreSQL: {_describe(exc)}") from None

    async def _rows(self, sql: str, *args: Any) -> list[Any]:
        return await self._call("fetch", sql, *args)

    async def _row(self, sql: str, *args: Any) -> Any:
        return await self._call("fetchrow", sql, *args)

    async def _val(self, sql: str, *args: Any) -> Any:
        return await self._call("fetchval", sql, *args)

    # -- blobs
    async def blob_size(self, repo: str, digest: str) -> int | None:
        return await self._val(
            "SELECT b.size FROM repo_blobs b JOIN repositories r ON r.id = b.repo_id WHERE r.name = $1 "
            "AND b.digest = $2 UNION ALL SELECT m.size FROM manifests m JOIN repositories r ON r.id = m.repo_id "
            "WHERE r.name = $1 AND m.digest = $2 LIMIT 1", repo, digest)

    async def blob_stat(self, repo: str, digest: str) -> BlobStat | None:
        rows = await self._batched("blob_stat").rows((repo, digest))
        return BlobStat(rows[0][1], rows[0][2], rows[0][3]) if rows else None

    async def touch(self, repo: str, kind: str, digest: str, review_after: float) -> bool:
        return bool(await self._batched("touch_blob" if kind == "blob" else "touch_manifest").rows(
            (repo, digest, review_after)))

    async def blob_holder(self, digest: str) -> tuple[str, int] | None:
        row = await self._row("SELECT r.name, b.size FROM repo_blobs b JOIN repositories r ON r.id = b.repo_id "
                              "WHERE b.digest = $1 LIMIT 1", digest)
        return (row[0], row[1]) if row else None

    async def blob_link(self, repo: str, digest: str, size: int, review_after: float,
                        checksum: str | None = None) -> None:
        now = time.time()
        await self._call("execute",
                         "WITH c AS (INSERT INTO checksums (digest, xxh3) SELECT $2, $6 WHERE $6::text IS NOT NULL "
                         "ON CONFLICT DO NOTHING) "
                         "INSERT INTO repo_blobs (repo_id, digest, size, created_at, review_after) "
                         "VALUES (registry_repo_id($1, $4), $2, $3, $4, $5) ON CONFLICT (repo_id, digest) "
                         "DO UPDATE SET review_after = greatest(repo_blobs.review_after, excluded.review_after)",
                         repo, digest, size, now, review_after, checksum)

    async def blob_unlink(self, repo: str, digest: str) -> bool:
        return await self._val(
            "WITH d AS (DELETE FROM repo_blobs WHERE digest = $2 AND repo_id = "
            "(SELECT id FROM repositories WHERE name = $1) RETURNING 1) SELECT count(*) > 0 FROM d", repo, digest)

    # -- manifests and tags
    async def manifest_put(self, repo: str, m: Manifest, tags: list[str], review_after: float) -> None:
        row = await self._row(
            "SELECT missing, wrong_size FROM registry_manifest_put($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
            "$12, $13, $14)", repo, m.digest, m.media_type, m.size, m.payload, m.subject, m.artifact_type,
            json.dumps(m.annotations) if m.annotations else None, [r.digest for r in m.refs],
            [r.kind for r in m.refs], [r.size for r in m.refs], list(tags), time.time(), review_after)
        if row[0] or row[1]:
            raise BadReferences(list(row[0]), list(row[1]))

    async def manifest_get(self, repo: str, reference: str) -> Manifest | None:
        rows = await self._batched("by_digest" if ":" in reference else "by_tag").rows((repo, reference))
        return _manifest(rows[0], 1) if rows else None

    async def manifest_delete(self, repo: str, digest: str, requeue_at: float | None = None) -> bool:
        return await self._val("SELECT registry_manifest_delete($1, $2, $3)", repo, digest,
                               time.time() if requeue_at is None else requeue_at)

    async def tag_delete(self, repo: str, tag: str, requeue_at: float | None = None) -> bool:
        return await self._val("SELECT registry_tag_delete($1, $2, $3)", repo, tag,
                               time.time() if requeue_at is None else requeue_at)

    async def tags(self, repo: str, n: int | None, last: str | None) -> list[str] | None:
        rows = await self._batched("tags").rows((repo, last or "", n))
        return list(rows[0][1]) if rows else None

    async def referrers(self, repo: str, subject: str, artifact_type: str | None) -> list[Manifest]:
        rows = await self._rows(
            f"SELECT {MANIFEST_COLS} FROM manifests m JOIN repositories r ON r.id = m.repo_id WHERE r.name = $1 "
            "AND m.subject = $2 AND ($3::text IS NULL OR m.artifact_type = $3) ORDER BY m.created_at, m.digest",
            repo, subject, artifact_type)
        return [_manifest(r) for r in rows]

    async def catalog(self, n: int | None, last: str | None) -> list[str]:
        rows = await self._rows("SELECT name FROM repositories WHERE name > $1 ORDER BY name LIMIT $2",
                                last or "", n)
        return [r[0] for r in rows]

    async def repo_exists(self, repo: str) -> bool:
        return bool(await self._val("SELECT count(*) > 0 FROM repositories WHERE name = $1", repo))

    async def layout_entries(self, repo: str) -> list[LayoutEntry]:
        rows = await self._rows(
            "SELECT t.name, m.digest, m.media_type, m.size, m.artifact_type FROM tags t "
            "JOIN repositories r ON r.id = t.repo_id JOIN manifests m ON m.repo_id = t.repo_id "
            "AND m.digest = t.digest WHERE r.name = $1 "
            "UNION ALL SELECT NULL, m.digest, m.media_type, m.size, m.artifact_type FROM manifests m "
            "JOIN repositories r ON r.id = m.repo_id WHERE r.name = $1 "
            "AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo_id = m.repo_id AND t.digest = m.digest) "
            "AND NOT EXISTS (SELECT 1 FROM manifest_refs x WHERE x.repo_id = m.repo_id AND x.child = m.digest "
            "AND x.kind = 'manifest') ORDER BY 1 NULLS FIRST, 2", repo)
        return [LayoutEntry(tag=r[0], digest=r[1], media_type=r[2], size=r[3], artifact_type=r[4]) for r in rows]

    async def layout_stale(self) -> list[str]:
        return [r[0] for r in await self._rows("SELECT r.name FROM repositories r WHERE EXISTS "
                                               "(SELECT 1 FROM layout_changes c WHERE c.repo_id = r.id)")]

    # -- upload sessions
    async def upload_create(self, upload_id: str, repo: str) -> None:
        now = time.time()
        await self._call("execute", "INSERT INTO uploads (id, repo, size, created_at, updated_at) "
                         "VALUES ($1, $2, 0, $3, $3)", upload_id, repo, now)

    async def upload_get(self, upload_id: str) -> Upload | None:
        row = await self._row("SELECT id, repo, size, created_at, updated_at FROM uploads WHERE id = $1", upload_id)
        return Upload(*row) if row else None

    async def upload_lease(self, upload_id: str, size: int, writer: str, until: float, now: float) -> bool:
        status = await self._call("execute", "UPDATE uploads SET writer = $3, lease_until = $4 WHERE id = $1 "
                                  "AND size = $2 AND (writer IS NULL OR writer = $3 OR lease_until < $5)",
                                  upload_id, size, writer, until, now)
        return status.endswith(" 1")

    async def upload_set_size(self, upload_id: str, old: int, new: int, writer: str | None = None) -> bool:
        status = await self._call("execute", "UPDATE uploads SET size = $3, updated_at = $4, writer = NULL, "
                                  "lease_until = NULL WHERE id = $1 AND size = $2 "
                                  "AND ($5::text IS NULL OR writer = $5)", upload_id, old, new, time.time(), writer)
        return status.endswith(" 1")

    async def upload_delete(self, upload_id: str) -> bool:
        status = await self._call("execute", "DELETE FROM uploads WHERE id = $1", upload_id)
        return status.endswith(" 1")
