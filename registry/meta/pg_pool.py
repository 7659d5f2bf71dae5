"""A small connection pool for the request path's one-statement round trips.

asyncpg's Pool wraps every acquire and release in several awaits and holder
objects: measured here, ``pool.fetchval("SELECT 1")`` costs 63 us of this
process's CPU against 30 us on a held connection, which is a large share of a
manifest GET. This pool hands an idle connection over without awaiting, and a
released one straight to the oldest waiter.

A connection that failed mid-statement in any way other than a server error
(the server went away, a timeout, a cancellation) may be in an unknown
protocol state: it is terminated, never reused; the next acquire opens a
fresh one. Connections hold no session state (no advisory locks: those live
on their own pool), so a released connection needs no reset query.

The server cancels a statement that runs past the timeout (the store sets
``statement_timeout``); for a server that stops answering altogether, a
watchdog terminates connections whose statement got no answer within 1.5
times the timeout plus a second. (asyncpg's per-call ``timeout`` costs a
timer per statement: 15-20 us of CPU each, measured.)
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any, AsyncIterator

import asyncpg

log = logging.getLogger("registry.meta.postgres")

class ConnectionPool:
    def __init__(self, max_size: int, query_timeout: float | None, **connect_kwargs: Any):
        self.max_size = max_size
        self.timeout = query_timeout  # per statement: a server that stops answering fails the request
        self._running: dict[asyncpg.Connection, float] = {}  # statements in flight: when each started
        self._watchdog: asyncio.Task[None] | None = None
        self._connect_kwargs = connect_kwargs
        self._idle: list[asyncpg.Connection] = []
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection | None]] = collections.deque()
        self._size = 0  # open connections, idle or in use, plus those being opened
        self._closed = False

    async def open(self) -> None:
        """Open one connection now, so a server that cannot be reached fails start-up."""
        self._release(await self._connect())
        if self.timeout:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(self.timeout * 1.5 + 1))

    async def _watch(self, limit: float) -> None:
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for conn, started in list(self._running.items()):
                if now - started > limit:
                    log.warning("PostgreSQL did not answer a statement within %gs "
                                "(meta.postgres.queryTimeout and a grace): its connection is dropped", limit)
                    self._running.pop(conn, None)
                    conn.terminate()  # the waiting statement fails as a lost connection: 503

    async def _connect(self) -> asyncpg.Connection:
        self._size += 1
        try:
            return await asyncpg.connect(**self._connect_kwargs)
        except BaseException:
            self._size -= 1
            self._wake_one()
            raise

    def _wake_one(self) -> None:
        """A slot came free: the oldest waiter opens a connection itself."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _acquire(self) -> asyncpg.Connection:
        if self._closed:
            raise asyncpg.InterfaceError("pool is closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._size -= 1
        if self._size < self.max_size:
            return await self._connect()
        fut: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            conn = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result() is not None:
                self._release(fut.result())  # handed over just as we were cancelled
            elif fut.done() and not fut.cancelled():
                self._wake_one()
            raise
        return conn if conn is not None else await self._connect()

    def _release(self, conn: asyncpg.Connection) -> None:
        if self._closed or conn.is_closed():
            self._discard(conn)
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._idle.append(conn)

    def _discard(self, conn: asyncpg.Connection) -> None:
        conn.terminate()
        self._size -= 1
        self._wake_one()

    # For connections that hold session state (advisory locks): the caller hands a connection
    # back with ``give`` only when it left nothing behind, and ``drop``s it otherwise (terminating
    # it ends whatever the session held).
    take = _acquire
    give = _release
    drop = _discard

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await self._acquire()
        try:
            yield conn
        except asyncpg.PostgresError:
            self._settle(conn)
            raise
        except BaseException:
            self._discard(conn)
            raise
        else:
            self._settle(conn)

    def _settle(self, conn: asyncpg.Connection) -> None:
        """A connection left inside a transaction by its user goes, it is not handed on."""
        if conn.is_in_transaction():
            self._discard(conn)
        else:
            self._release(conn)

    async def run(self, method: str, sql: str, *args: Any) -> Any:
        """One statement: ``fetch``, ``fetchrow``, ``fetchval`` or ``execute``."""
        async with self.acquire() as conn:
            self._running[conn] = time.monotonic()
            try:
                return await getattr(conn, method)(sql, *args)
            finally:
                self._running.pop(conn, None)

    async def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        idle, self._idle = self._idle, []
        for conn in idle:
            self._size -= 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
            if not conn.is_closed():
                conn.terminate()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(asyncpg.InterfaceError("pool is closed"))
