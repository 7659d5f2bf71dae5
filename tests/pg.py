"""A PostgreSQL server for the tests, for real.

The DSN comes from REGISTRY_TEST_POSTGRES_DSN (default: the machine's server on
127.0.0.1:5432, database ``test``). When nothing answers there, a throwaway
cluster is started from the installed PostgreSQL binaries (initdb/pg_ctl);
only when there are none do the PostgreSQL tests skip, saying why. Every test
gets its own schema, dropped afterwards, so runs never collide.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from typing import Iterator

import pytest

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _run(coro_fn, *args):  # type: ignore[no-untyped-def]
    """Run a coroutine to completion on a private loop in another thread
    (fixtures here may be resolved while the test's own loop is running)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn(*args))).result()


async def _reachable(dsn: str) -> str | None:
    import asyncpg
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except Exception as exc:  # any failure means: not usable
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _throwaway_cluster() -> tuple[str, callable] | None:  # type: ignore[valid-type]
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if not initdb:
        return None
    pg_ctl = os.path.join(os.path.dirname(initdb), "pg_ctl")
    tmp = tempfile.mkdtemp(prefix="registry-pg-")
    data = os.path.join(tmp, "data")
    port = _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(tmp, "postgres")
    subprocess.run([*as_user, initdb, "-D", data, "-A", "trust", "-U", "postgres"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([*as_user, pg_ctl, "-D", data, "-w", "-l", os.path.join(tmp, "log"), "-o",
                    f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1", "start"], check=True,
                   stdout=subprocess.DEVNULL)

    def stop() -> None:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    dsn = os.environ.get("REGISTRY_TEST_POSTGRES_DSN", DEFAULT_DSN)
    why = _run(_reachable, dsn)
    if why is None:
        yield dsn
        return
    started = _throwaway_cluster()
    if started is None:
        pytest.skip(f"no PostgreSQL at {dsn} ({why}) and no initdb to start one: install postgresql")
    dsn, stop = started
    try:
        yield dsn
    finally:
        stop()


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name; dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema

    async def drop() -> None:
        import asyncpg
        conn = await asyncpg.connect(pg_dsn)
        try:
            # A connection an app left mid-query (a task not stopped before its pool closed)
            # would block the drop for ever: end whatever still holds locks in this schema,
            # and say so, since that is a bug of the code under test.
            leaked = await conn.fetch(
                "SELECT DISTINCT l.pid, a.query FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()", schema)
            for pid, query in leaked:
                print(f"\nwarning: connection {pid} still held locks in {schema}: {query[:120]!r}",
                      file=sys.stderr)
                await conn.execute("SELECT pg_terminate_backend($1)", pid)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    _run(drop)
