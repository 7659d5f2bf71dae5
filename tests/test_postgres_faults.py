"""PostgreSQL faults, for real: a database that is down, hangs, or is newer than the code at
start-up; concurrent migrations; backends killed in the middle of a push; a database that
refuses every connection for a while. Requests that need the database get 503 with the spec's
error body and Retry-After, never 500; the pool comes back by itself; a push that failed
leaves nothing half done."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from conformance._util import run
from conformance.conftest import REPO_ROOT, running_server
from registry.app import create_app
from registry.meta import migrate
from tests.conftest import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, make_config, sha256
from tests.helpers import assert_error, check_error_body, with_query

PASSWORD = "s3cr3t-value"
REF_NAME = "org.opencontainers.image.ref.name"


# ------------------------------------------------------------------ helpers

def _env(**registry: str) -> dict[str, str]:
    """The caller's environment without its REGISTRY_* variables, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"REGISTRY_{k}": v for k, v in registry.items()})
    return env


def _registry(*args: str, env: dict[str, str], timeout: float = 30):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    done = run([sys.executable, "-m", "registry", *args], env=env, timeout=timeout, check=False, cwd=REPO_ROOT)
    return done, time.monotonic() - start


def _pg_env(dsn: str, schema: str) -> dict[str, str]:
    return _env(META_DRIVER="postgres", META_POSTGRES_DSN=dsn, META_POSTGRES_SCHEMA=schema)


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@contextlib.contextmanager
def _silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def _sql(dsn: str, *statements: str) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return [await conn.fetch(s) for s in statements]
        finally:
            await conn.close()
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


# ------------------------------------------------------------------ start-up

@pytest.mark.parametrize("how", ["parts", "dsn"])
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_database_down_at_start(tmp_path: Path, how: str, command: str) -> None:
    with _closed_port() as port:
        if how == "parts":
            env = _env(META_DRIVER="postgres", META_POSTGRES_HOST="127.0.0.1", META_POSTGRES_PORT=str(port),
                       META_POSTGRES_PASSWORD=PASSWORD, META_POSTGRES_DATABASE="test")
        else:
            env = _env(META_DRIVER="postgres",
                       META_POSTGRES_DSN=f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/test")
        extra = ["--port", "0", "--address", "127.0.0.1"] if command == "serve" else []
        done, took = _registry(command, "--root", str(tmp_path / "data"), *extra, env=env)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert took < 10, f"took {took:.1f}s to give up"
    assert f"127.0.0.1:{port}" in out, out
    assert PASSWORD not in out, out
    assert "Traceback" not in out, out
    assert "registry: serving" not in out


def test_database_silent_at_start_times_out(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers: connectTimeout, then a clear error."""
    with _silent_port() as port:
        env = _env(META_DRIVER="postgres", META_POSTGRES_HOST="127.0.0.1", META_POSTGRES_PORT=str(port),
                   META_POSTGRES_PASSWORD=PASSWORD, META_POSTGRES_CONNECTTIMEOUT="1s")
        done, took = _registry("serve", "--root", str(tmp_path / "data"), "--port", "0", env=env)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert took < 10, f"took {took:.1f}s to give up"
    assert f"127.0.0.1:{port}" in out and PASSWORD not in out and "Traceback" not in out, out


def test_migrate_applies_the_schema_once(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    env = _pg_env(pg_dsn, pg_schema)
    latest = migrate.latest("postgres")
    done, _ = _registry("migrate", "--root", str(tmp_path / "data"), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"version {latest}" in done.stdout
    q = f'SELECT version, name, applied_at FROM "{pg_schema}".schema_migrations ORDER BY version'
    first = [tuple(r) for r in _sql(pg_dsn, q)[0]]
    assert [v for v, _, _ in first] == [v for v, _, _ in migrate.migrations("postgres")]
    tables = {r[0] for r in _sql(pg_dsn, "SELECT table_name FROM information_schema.tables "
                                          f"WHERE table_schema = '{pg_schema}'")[0]}
    assert {"repositories", "manifests", "tags", "uploads", "repo_blobs"} <= tables

    done, _ = _registry("migrate", "--root", str(tmp_path / "data"), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"version {latest}" in done.stdout
    assert [tuple(r) for r in _sql(pg_dsn, q)[0]] == first, "a migration was applied again"


def test_schema_newer_than_the_code_is_refused(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    env = _pg_env(pg_dsn, pg_schema)
    done, _ = _registry("migrate", "--root", str(tmp_path / "data"), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    _sql(pg_dsn, f"INSERT INTO \"{pg_schema}\".schema_migrations VALUES (9999, 'from_the_future', 0)")
    for command, extra in (("serve", ["--port", "0", "--address", "127.0.0.1"]), ("migrate", [])):
        done, took = _registry(command, "--root", str(tmp_path / "data"), *extra, env=env)
        out = done.stdout + done.stderr
        assert done.returncode != 0, out
        assert took < 15
        assert "9999" in out and "newer" in out, out
        assert "Traceback" not in out and "registry: serving" not in out, out
    # nothing was applied or removed
    versions = [r[0] for r in _sql(pg_dsn, f'SELECT version FROM "{pg_schema}".schema_migrations '
                                           "ORDER BY version")[0]]
    assert versions == [v for v, _, _ in migrate.migrations("postgres")] + [9999]


def test_servers_starting_together_on_an_empty_schema(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """Four servers race to migrate one empty schema: the advisory lock lets each come up."""
    root = tmp_path / "data"
    config = tmp_path / "registry.json"
    config.write_text(json.dumps({
        "http": {"address": "127.0.0.1", "port": 0},
        "storage": {"rootDirectory": str(root), "commit": False},
        "meta": {"driver": "postgres", "postgres": {"dsn": pg_dsn, "schema": pg_schema, "poolSize": 2}},
        "log": {"level": "warning"}}))
    cms = [running_server(root, tmp_path / f"s{i}.log", config) for i in range(4)]
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(len(cms)) as pool:
            futures = [pool.submit(cm.__enter__) for cm in cms]
        servers = []
        for cm, f in zip(cms, futures):
            with contextlib.suppress(Exception):
                servers.append(f.result())
                stack.push(cm.__exit__)
        for f in futures:
            f.result()  # re-raise the first start-up failure, if any
        versions = [r[0] for r in _sql(pg_dsn, f'SELECT version FROM "{pg_schema}".schema_migrations '
                                               "ORDER BY version")[0]]
        assert versions == [v for v, _, _ in migrate.migrations("postgres")]
        blob = b"shared by all"
        r = servers[0].http("POST", f"/v2/race/app/blobs/uploads/?digest={sha256(blob)}", blob)
        assert r.status == 201, r.body
        for srv in servers[1:]:
            assert srv.http("GET", f"/v2/race/app/blobs/{sha256(blob)}").body == blob


# ------------------------------------------------------------------ lost while serving

class Proxy:
    """A TCP proxy in front of PostgreSQL that the test can cut: ``down()`` drops every
    connection and refuses new ones; ``up()`` accepts again on the same port."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.conns):
            w.transport.abort()
        self.conns.clear()
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.conns |= {writer, uw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()
                self.conns.discard(dst)
        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))


def _via(dsn: str, port: int) -> str:
    u = urlsplit(dsn)
    netloc = (u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else "") + f"127.0.0.1:{port}"
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def _app_name(schema: str) -> str:
    return f"reg-{schema}"


def _config(root: Path, dsn: str, schema: str, pool: int = 3):  # type: ignore[no-untyped-def]
    return make_config(root, storage={"commit": False},
                       meta={"driver": "postgres", "postgres": {
                           "dsn": dsn, "schema": schema, "pool_size": pool, "connect_timeout": 2,
                           "application_name": _app_name(schema)}})


@pytest.fixture
async def admin(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _terminate_all(admin: asyncpg.Connection, schema: str) -> int:
    """Kill every backend of this test's registry (and only those)."""
    rows = await admin.fetch("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = $1 AND pid <> pg_backend_pid()", _app_name(schema))
    return len(rows)


async def _blocked_backend(admin: asyncpg.Connection, schema: str, query: str, timeout: float = 10) -> int:
    """The pid of this test's registry backend waiting on a lock in a statement containing
    ``query`` (background jobs of the same registry may be waiting too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = await admin.fetchval("SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
                                   "AND wait_event_type = 'Lock' AND strpos(query, $2) > 0",
                                   _app_name(schema), query)
        if pid:
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError("the registry never waited on the lock")


@contextlib.asynccontextmanager
async def _table_locked(dsn: str, schema: str, table: str) -> AsyncIterator[None]:
    """Writers of ``table`` wait (readers do not) until the block ends."""
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f'LOCK TABLE "{schema}".{table} IN EXCLUSIVE MODE')
        try:
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def _assert_503(r: Any) -> None:
    body = await r.read()
    assert r.status == 503, (r.method, r.url, r.status, body[:500])
    assert r.headers.get("Retry-After", "").isdigit(), r.headers
    if r.method != "HEAD":
        errs = check_error_body(body)
        assert errs[0]["code"] == "UNAVAILABLE", errs


class Image:
    """One image's bytes: config, layer, manifest."""

    def __init__(self, name: str, layer_size: int = 3000):
        self.config = json.dumps({"architecture": "amd64", "os": "linux", "name": name}).encode()
        self.layer = (name.encode() * (layer_size // len(name) + 1))[:layer_size]
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(self.config), "size": len(self.config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha256(self.layer), "size": len(self.layer)}]}).encode()
        self.digest = sha256(self.manifest)


async def _push_blobs(client: Any, repo: str, img: Image) -> None:
    for data in (img.config, img.layer):
        r = await client.post(f"/v2/{repo}/blobs/uploads/?digest={sha256(data)}", data=data)
        assert r.status == 201, await r.text()


async def _put_manifest(client: Any, repo: str, ref: str, img: Image) -> Any:
    return await client.put(f"/v2/{repo}/manifests/{ref}", data=img.manifest,
                            headers={"Content-Type": OCI_MANIFEST})


def _index_tags(root: Path, repo: str) -> dict[str, str]:
    doc = json.loads((root / repo / "index.json").read_bytes())
    return {m["annotations"][REF_NAME]: m["digest"] for m in doc["manifests"] if REF_NAME in m.get("annotations", {})}


async def test_backend_killed_in_the_middle_of_a_manifest_push(aiohttp_client, tmp_path, pg_dsn, pg_schema, admin):
    """The manifest push's transaction is killed while it waits inside: 503, and nothing of it stays."""
    root = tmp_path / "data"
    client = await aiohttp_client(create_app(_config(root, pg_dsn, pg_schema)))
    old, new = Image("old"), Image("new")
    await _push_blobs(client, "kill/app", old)
    await _push_blobs(client, "kill/app", new)
    r = await _put_manifest(client, "kill/app", "v1", old)
    assert r.status == 201

    async with _table_locked(pg_dsn, pg_schema, "tags"):
        put = asyncio.ensure_future(_put_manifest(client, "kill/app", "v1", new))
        pid = await _blocked_backend(admin, pg_schema, "registry_manifest_put")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    r = await put  # the database is fine again by the time the registry answers
    await _assert_503(r)

    # Nothing of the failed push: not the manifest, not the tag move, not in index.json.
    await assert_error(await client.get(f"/v2/kill/app/manifests/{new.digest}"), 404, "MANIFEST_UNKNOWN")
    r = await client.get("/v2/kill/app/manifests/v1")
    assert r.status == 200 and await r.read() == old.manifest
    assert _index_tags(root, "kill/app") == {"v1": old.digest}
    assert new.digest not in (root / "kill/app/index.json").read_text()

    # The pool replaced the killed connection: the retry goes through, first time.
    r = await _put_manifest(client, "kill/app", "v1", new)
    assert r.status == 201, await r.text()
    r = await client.get("/v2/kill/app/manifests/v1")
    assert await r.read() == new.manifest
    assert _index_tags(root, "kill/app") == {"v1": new.digest}


async def test_statement_waiting_past_the_query_timeout(aiohttp_client, tmp_path, pg_dsn, pg_schema, admin):
    """A database that holds a statement (here: behind a lock) fails the request after
    meta.postgres.queryTimeout with 503 instead of hanging it; the server cancels the statement,
    so nothing of the push is applied, not even once the lock goes."""
    root = tmp_path / "data"
    cfg = _config(root, pg_dsn, pg_schema)
    cfg = cfg.replace(meta={"driver": "postgres", "postgres": {**_pg_fields(cfg), "query_timeout": 1}})
    client = await aiohttp_client(create_app(cfg))
    old, new = Image("old"), Image("new")
    await _push_blobs(client, "slow/app", old)
    await _push_blobs(client, "slow/app", new)
    assert (await _put_manifest(client, "slow/app", "v1", old)).status == 201

    async with _table_locked(pg_dsn, pg_schema, "tags"):
        start = time.monotonic()
        r = await _put_manifest(client, "slow/app", "v1", new)
        waited = time.monotonic() - start
        await _assert_503(r)
        assert 0.9 < waited < 5, waited
        r = await client.get("/v2/slow/app/tags/list")  # readers are not blocked meanwhile
        assert r.status == 200
    await asyncio.sleep(0.2)
    await assert_error(await client.get(f"/v2/slow/app/manifests/{new.digest}"), 404, "MANIFEST_UNKNOWN")
    r = await client.get("/v2/slow/app/manifests/v1")
    assert await r.read() == old.manifest
    assert (await _put_manifest(client, "slow/app", "v1", new)).status == 201


def _pg_fields(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict
    return asdict(cfg.meta.postgres)


async def test_backend_killed_in_the_middle_of_an_upload(aiohttp_client, tmp_path, pg_dsn, pg_schema, admin):
    """A chunk whose length could not be recorded is not acknowledged, and the session goes on
    from the last acknowledged byte; a finish whose blob row could not be written leaves the
    blob invisible and the session open for a retry."""
    root = tmp_path / "data"
    client = await aiohttp_client(create_app(_config(root, pg_dsn, pg_schema)))
    data = os.urandom(300_000)
    digest = sha256(data)
    r = await client.post("/v2/kill/up/blobs/uploads/")
    assert r.status == 202
    loc = r.headers["Location"]
    r = await client.patch(loc, data=data[:100_000], headers={"Content-Range": "0-99999"})
    assert r.status == 202

    # The chunk is streaming in (the session is being written) when its length cannot be
    # recorded: the connection recording it is killed.
    release = asyncio.Event()

    async def chunk():  # type: ignore[no-untyped-def]
        yield data[100_000:101_000]
        await release.wait()
        yield data[101_000:200_000]
    patch = asyncio.ensure_future(client.patch(loc, data=chunk(), headers={"Content-Range": "100000-199999"}))
    await asyncio.sleep(0.2)  # the PATCH is in, waiting for the rest of its body
    async with _table_locked(pg_dsn, pg_schema, "uploads"):
        release.set()
        pid = await _blocked_backend(admin, pg_schema, "UPDATE uploads")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    r = await patch
    await _assert_503(r)
    r = await client.get(loc)
    assert r.status == 204 and r.headers["Range"] == "0-99999"  # the chunk was not acknowledged
    r = await client.patch(loc, data=data[100_000:200_000], headers={"Content-Range": "100000-199999"})
    assert r.status == 202 and r.headers["Range"] == "0-199999"

    async with _table_locked(pg_dsn, pg_schema, "repo_blobs"):
        put = asyncio.ensure_future(client.put(with_query(loc, digest=digest), data=data[200_000:]))
        pid = await _blocked_backend(admin, pg_schema, "INSERT INTO repo_blobs")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    r = await put
    await _assert_503(r)
    assert (await client.head(f"/v2/kill/up/blobs/{digest}")).status == 404
    r = await client.get(loc)
    assert r.status == 204 and r.headers["Range"] == "0-299999"  # the body was recorded; the blob was not

    r = await client.put(with_query(loc, digest=digest))
    assert r.status == 201, await r.text()
    r = await client.get(f"/v2/kill/up/blobs/{digest}")
    assert r.status == 200 and await r.read() == data
    await assert_error(await client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_database_refusing_connections_for_a_while(aiohttp_client, tmp_path, pg_dsn, pg_schema):
    """Every connection dropped and new ones refused: each request needing the database gets
    503 + Retry-After at once; when the database is back, the next requests just work."""
    u = urlsplit(pg_dsn)
    proxy = Proxy(u.hostname or "127.0.0.1", u.port or 5432)
    await proxy.up()
    root = tmp_path / "data"
    try:
        client = await aiohttp_client(create_app(_config(root, _via(pg_dsn, proxy.port), pg_schema)))
        img, img2 = Image("up"), Image("down")
        await _push_blobs(client, "outage/app", img)
        await _push_blobs(client, "outage/app", img2)
        assert (await _put_manifest(client, "outage/app", "v1", img)).status == 201

        await proxy.down()
        for _ in range(2):  # not only the first request after the loss
            started = time.monotonic()
            await _assert_503(await client.get("/v2/outage/app/manifests/v1"))
            await _assert_503(await client.head(f"/v2/outage/app/blobs/{sha256(img.layer)}"))
            await _assert_503(await client.get(f"/v2/outage/app/blobs/{sha256(img.layer)}"))
            await _assert_503(await _put_manifest(client, "outage/app", "v2", img2))
            await _assert_503(await client.post("/v2/outage/app/blobs/uploads/"))
            await _assert_503(await client.get("/v2/outage/app/tags/list"))
            await _assert_503(await client.get("/v2/_catalog"))
            await _assert_503(await client.delete(f"/v2/outage/app/manifests/{img.digest}"))
            assert time.monotonic() - started < 5, "requests waited for a database that refuses"
        await _assert_503(await client.get("/readyz"))

        await proxy.up()
        r = await client.get("/v2/outage/app/manifests/v1")
        assert r.status == 200 and await r.read() == img.manifest
        await assert_error(await client.get("/v2/outage/app/manifests/v2"), 404, "MANIFEST_UNKNOWN")
        assert (await _put_manifest(client, "outage/app", "v2", img2)).status == 201
        r = await client.get("/v2/outage/app/tags/list")
        assert (await r.json())["tags"] == ["v1", "v2"]
        assert _index_tags(root, "outage/app") == {"v1": img.digest, "v2": img2.digest}
        assert (await client.get("/readyz")).status == 200
    finally:
        if proxy.server is not None:
            await proxy.down()


async def test_backends_killed_again_and_again_during_pushes(aiohttp_client, tmp_path, pg_dsn, pg_schema, admin):
    """Every registry backend is terminated every few milliseconds while a client that retries
    on 503 (as clients do) pushes images. No answer is ever anything but the expected one or a
    503 with Retry-After; afterwards every image is whole and index.json agrees with the tags."""
    root = tmp_path / "data"
    client = await aiohttp_client(create_app(_config(root, pg_dsn, pg_schema, pool=2)))
    seen: dict[int, int] = {}
    restarts: list[str] = []

    async def call(expect: set[int], method: str, url: str, retry: bool = True, **kw: Any) -> Any:
        """One request, retried while it answers 503 (unless told not to); any other status
        not expected fails the test."""
        for _ in range(200):
            r = await client.request(method, url, **kw)
            seen[r.status] = seen.get(r.status, 0) + 1
            if r.status != 503:
                assert r.status in expect, (method, url, r.status, (await r.read())[:500])
                return r
            await _assert_503(r)
            if not retry:
                return r
            await asyncio.sleep(0.005)
        raise AssertionError(f"{method} {url}: 503 for ever")

    async def chunked_upload(repo: str, data: bytes) -> None:
        """A careful client: after any failure it asks where the session stands, and goes on
        from there. A session still held by a write the database lost under it (its lease
        could not be given back while the database was away) answers 416; like real clients,
        this one then starts the blob over in a new session."""
        digest = sha256(data)
        step = 40_000
        for _ in range(10):
            loc = (await call({202}, "POST", f"/v2/{repo}/blobs/uploads/")).headers["Location"]
            while True:
                r = await call({204, 404}, "GET", loc)
                if r.status == 404:  # a finish that answered 503 had gone through
                    break
                have = int(r.headers["Range"].split("-")[1]) + 1 if r.headers["Range"] != "0-0" else 0
                if len(data) - have > step:
                    r = await call({202, 416}, "PATCH", loc, retry=False, data=data[have:have + step],
                                   headers={"Content-Range": f"{have}-{have + step - 1}"})
                else:
                    r = await call({201, 416}, "PUT", with_query(loc, digest=digest), retry=False,
                                   data=data[have:])
                    if r.status == 201:
                        break
                if r.status == 416:
                    body = await r.json()
                    assert "another request is writing" in body["errors"][0]["detail"], body
                    restarts.append(loc)
                    break
            if r.status != 416:
                break
        r = await call({200}, "GET", f"/v2/{repo}/blobs/{digest}")
        assert await r.read() == data

    images = []
    stop = asyncio.Event()

    async def chaos() -> int:
        kills = 0
        while not stop.is_set():
            kills += await _terminate_all(admin, pg_schema)
            await asyncio.sleep(random.uniform(0.01, 0.08))  # a manifest push takes several round trips
        return kills

    killer = asyncio.ensure_future(chaos())
    try:
        for i in range(12):
            repo = f"chaos/app{i % 3}"
            img = Image(f"chaos-{i}", layer_size=120_000 + i)
            await call({201}, "POST", f"/v2/{repo}/blobs/uploads/?digest={sha256(img.config)}", data=img.config)
            await chunked_upload(repo, img.layer)
            await call({201}, "PUT", f"/v2/{repo}/manifests/t{i}", data=img.manifest,
                       headers={"Content-Type": OCI_MANIFEST})
            r = await call({200}, "GET", f"/v2/{repo}/manifests/t{i}")
            assert await r.read() == img.manifest
            images.append((repo, f"t{i}", img))
    finally:
        stop.set()
        kills = await killer
    assert kills > 0
    assert seen.get(503, 0) > 0, f"no request hit a killed connection: {seen}"
    assert 500 not in seen

    await asyncio.sleep(0.05)
    for repo, tag, img in images:  # the database is back: first tries succeed
        r = await client.get(f"/v2/{repo}/manifests/{tag}")
        assert r.status == 200 and await r.read() == img.manifest
        r = await client.get(f"/v2/{repo}/blobs/{sha256(img.layer)}")
        assert r.status == 200 and await r.read() == img.layer
    for repo in sorted({repo for repo, _, _ in images}):
        r = await client.get(f"/v2/{repo}/tags/list")
        tags = (await r.json())["tags"]
        want = {tag: img.digest for rr, tag, img in images if rr == repo}
        assert sorted(tags) == sorted(want)
        assert _index_tags(root, repo) == want
    conn = admin
    broken = await conn.fetchval(f'SELECT count(*) FROM "{pg_schema}".tags t LEFT JOIN "{pg_schema}".manifests m '
                                 "ON m.repo_id = t.repo_id AND m.digest = t.digest WHERE m.digest IS NULL")
    assert broken == 0


async def test_pushes_and_tag_deletes_racing_on_the_same_tags_never_deadlock(pg_dsn, pg_schema):
    """Pushes moving tags between manifests (each one's tags pointing at the other's manifest)
    and tag deletes, all at once: every statement locks tags by name, then manifests by
    digest, so PostgreSQL never has to break a deadlock (each costs a second and a retry)."""
    from registry.config import PostgresConfig
    from registry.meta.base import Manifest, Ref
    from registry.meta.postgres import PostgresMeta

    store = PostgresMeta(PostgresConfig(dsn=pg_dsn, schema=pg_schema, pool_size=8))
    await store.open()
    try:
        blob, later = "sha256:" + "b" * 64, time.time() + 3600
        await store.blob_link("r", blob, 5, later)
        ms = [Manifest(digest=f"sha256:{i + 1:064x}", media_type=OCI_MANIFEST, size=2, payload=b"{}",
                       subject=None, artifact_type=None, annotations=None, refs=[Ref(blob, "blob", 5)])
              for i in range(4)]
        tags = [f"t{i}" for i in range(4)]
        for m in ms:
            await store.manifest_put("r", m, [], later)

        async def pusher(w: int) -> None:
            for k in range(40):
                await store.manifest_put("r", ms[(w + k) % 4], [tags[(w + 2 * k) % 4], tags[(w + 2 * k + 1) % 4]],
                                         later)

        async def deleter(w: int) -> None:
            for k in range(40):
                await store.tag_delete("r", tags[(w + k) % 4])
                await asyncio.sleep(0)

        start = time.monotonic()
        await asyncio.gather(*(pusher(w) for w in range(4)), deleter(0), deleter(2))
        assert store.lock_conflicts == 0, f"{store.lock_conflicts} deadlocks broken by PostgreSQL"
        assert time.monotonic() - start < 20
        for t in await store.tags("r", None, None) or []:
            assert (await store.manifest_get("r", t)) is not None
    finally:
        await store.close()
