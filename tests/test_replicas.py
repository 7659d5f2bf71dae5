"""Stateless replicas: several ``registry serve`` processes sharing one PostgreSQL schema and one
data directory behave as one registry. Push through A, pull through B and C; an upload
started on A, continued on B and finished on C; two replicas racing to move one tag; a delete
seen everywhere at once; a replica killed with SIGKILL in the middle of uploads and started
again. Then, in-process, each piece of per-process memory (upload hashers and locks, layout
state) is checked against a second replica changing things behind its back."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import asyncpg
import pytest

from conformance._util import Response
from conformance.conftest import Server, running_server
from registry.app import create_app
from registry.keys import SERVICES
from tests.conftest import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, make_config, sha256
from tests.helpers import assert_error, check_error_body, with_query

REF_NAME = "org.opencontainers.image.ref.name"


# ------------------------------------------------------------------ a cluster of real processes

class Cluster:
    """Replicas started from one config file (one schema, one root); each can be killed alone."""

    def __init__(self, tmp: Path, dsn: str, schema: str):
        self.dsn, self.schema = dsn, schema
        self.tmp = tmp
        self.root = tmp / "data"
        self.config = tmp / "registry.json"
        self.config.write_text(json.dumps({
            "http": {"address": "127.0.0.1", "port": 0},
            "storage": {"rootDirectory": str(self.root), "commit": False},
            "meta": {"driver": "postgres", "postgres": {"dsn": dsn, "schema": schema, "poolSize": 4,
                                                         "applicationName": f"reg-{schema}"}},
            "log": {"level": "warning"}}))
        self.started = 0
        self.exits: dict[int, Callable[..., Any]] = {}

    def start(self, n: int) -> list[Server]:
        """n replicas, started at the same time."""
        cms = [running_server(self.root, self.tmp / f"replica-{self.started + i}.log", self.config)
               for i in range(n)]
        self.started += n
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(cm.__enter__) for cm in cms]
        servers = []
        for cm, f in zip(cms, futures):
            with contextlib.suppress(Exception):
                srv = f.result()
                self.exits[srv.proc.pid] = cm.__exit__
                servers.append(srv)
        for f in futures:
            f.result()  # the first start-up failure, if any (the others are stopped by close())
        return servers

    def kill(self, srv: Server) -> None:
        """SIGKILL, no goodbye; the process is reaped (and its log checked) by running_server."""
        os.killpg(srv.proc.pid, signal.SIGKILL)
        os.waitid(os.P_PID, srv.proc.pid, os.WEXITED | os.WNOWAIT)
        self.exits.pop(srv.proc.pid)(None, None, None)

    def sql(self, statement: str, *args: Any) -> str:
        """One statement on the cluster's schema, from outside the registry."""
        async def go() -> str:
            conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
            try:
                return await conn.execute(statement, *args)
            finally:
                await conn.close()
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, go()).result()

    def close(self) -> None:
        errors = []
        for pid in list(self.exits):
            try:
                self.exits.pop(pid)(None, None, None)
            except BaseException as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def cluster(tmp_path: Path, pg_dsn: str, pg_schema: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, pg_dsn, pg_schema)
    try:
        yield c
    finally:
        c.close()


def _ok(r: Response, status: int) -> Response:
    assert r.status == status, (r.status, r.body[:500])
    return r


def _error(r: Response, status: int, code: str) -> None:
    assert r.status == status, (r.status, r.body[:500])
    assert check_error_body(r.body)[0]["code"] == code, r.body


def push_blob(srv: Server, repo: str, data: bytes) -> str:
    digest = sha256(data)
    _ok(srv.http("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", data), 201)
    return digest


def image(name: str, layer: bytes) -> tuple[bytes, bytes, bytes]:
    """(config, layer, manifest) of a one-layer image."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "name": name}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}]}).encode()
    return config, layer, manifest


def push_manifest(srv: Server, repo: str, ref: str, body: bytes) -> str:
    r = _ok(srv.http("PUT", f"/v2/{repo}/manifests/{ref}", body, {"Content-Type": OCI_MANIFEST}), 201)
    assert r.headers["Docker-Content-Digest"] == sha256(body)
    return sha256(body)


def push_image(srv: Server, repo: str, tag: str, name: str, layer: bytes) -> tuple[str, bytes, bytes, bytes]:
    config, layer, manifest = image(name, layer)
    push_blob(srv, repo, config)
    push_blob(srv, repo, layer)
    return push_manifest(srv, repo, tag, manifest), config, layer, manifest


def index_tags(root: Path, repo: str) -> dict[str, str]:
    doc = json.loads((root / repo / "index.json").read_bytes())
    out: dict[str, str] = {}
    for m in doc["manifests"]:
        tag = (m.get("annotations") or {}).get(REF_NAME)
        if tag is not None:
            assert tag not in out, f"tag {tag} twice in index.json: {doc}"
            out[tag] = m["digest"]
    return out


def range_of(r: Response) -> int:
    """The number of bytes an upload holds, from its Range header."""
    return int(r.headers["Range"].split("-")[1]) + 1


class SlowRequest:
    """A request whose body the test sends piece by piece (so it can be cut halfway)."""

    def __init__(self, srv: Server, method: str, path: str, length: int, headers: dict[str, str]):
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        head = [f"{method} {path} HTTP/1.1", f"Host: {srv.host}", f"Content-Length: {length}",
                "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def status(self) -> int:
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return int(data.split(b" ", 2)[1])

    def close(self) -> None:
        self.sock.close()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def upload_file_size(root: Path, location: str) -> int:
    try:
        return (root / "_uploads" / location.rsplit("/", 1)[1]).stat().st_size
    except FileNotFoundError:
        return -1


# ------------------------------------------------------------------ three replicas

def test_push_on_one_pull_on_the_others(cluster: Cluster) -> None:
    a, b, c = cluster.start(3)
    repo = "team/app/api"
    digest, config, layer, manifest = push_image(a, repo, "v1", "one", os.urandom(200_000))
    for srv in (b, c):
        r = _ok(srv.http("GET", f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST}), 200)
        assert r.body == manifest and r.headers["Docker-Content-Digest"] == digest
        assert _ok(srv.http("GET", f"/v2/{repo}/manifests/{digest}"), 200).body == manifest
        assert _ok(srv.http("HEAD", f"/v2/{repo}/manifests/v1"), 200).headers["Docker-Content-Digest"] == digest
        for blob in (config, layer):
            assert _ok(srv.http("GET", f"/v2/{repo}/blobs/{sha256(blob)}"), 200).body == blob
            assert _ok(srv.http("HEAD", f"/v2/{repo}/blobs/{sha256(blob)}"), 200).headers["Content-Length"] \
                == str(len(blob))
    assert index_tags(cluster.root, repo) == {"v1": digest}
    assert (cluster.root / repo / "oci-layout").is_file()

    # Deleted on A: gone on B and C at once.
    _ok(a.http("DELETE", f"/v2/{repo}/manifests/{digest}"), 202)
    for srv in (b, c):
        _error(srv.http("GET", f"/v2/{repo}/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")
        _error(srv.http("GET", f"/v2/{repo}/manifests/v1"), 404, "MANIFEST_UNKNOWN")
        assert _ok(srv.http("GET", f"/v2/{repo}/tags/list"), 200).json()["tags"] == []
    assert index_tags(cluster.root, repo) == {}

    # The catalog and the tag lists, built through different replicas, read the same everywhere.
    for i, srv in enumerate((a, b, c, a, b, c)):
        push_image(srv, f"cat/r{i % 4}", f"t{i}", f"cat-{i}", f"layer {i}".encode())
    listings = []
    for srv in (a, b, c):
        full = _ok(srv.http("GET", "/v2/_catalog"), 200).json()["repositories"]
        paged, url = [], "/v2/_catalog?n=2"
        while url:
            r = _ok(srv.http("GET", url), 200)
            paged += r.json()["repositories"]
            link = r.headers.get("Link")
            url = link.split(">")[0].lstrip("<") if link else None
        assert paged == full
        tags = {repo: _ok(srv.http("GET", f"/v2/{repo}/tags/list"), 200).json()["tags"] for repo in full}
        listings.append((full, tags))
    assert listings[0] == listings[1] == listings[2]
    full, tags = listings[0]
    assert full == ["cat/r0", "cat/r1", "cat/r2", "cat/r3", repo]
    assert tags["cat/r0"] == ["t0", "t4"] and tags["cat/r3"] == ["t3"]


@pytest.mark.parametrize("alg", ["sha256", "sha512"])
def test_upload_started_on_a_continued_on_b_finished_on_c(cluster: Cluster, alg: str) -> None:
    a, b, c = cluster.start(3)
    repo = "chunks/app"
    data = os.urandom(700_000)
    digest = f"{alg}:" + hashlib.new(alg, data).hexdigest()
    loc = _ok(a.http("POST", f"/v2/{repo}/blobs/uploads/"), 202).headers["Location"]
    r = _ok(b.http("PATCH", loc, data[:250_000], {"Content-Range": "0-249999"}), 202)
    assert r.headers["Range"] == "0-249999"
    for srv in (a, b, c):
        assert _ok(srv.http("GET", loc), 204).headers["Range"] == "0-249999"
    r = _ok(b.http("PATCH", loc, data[250_000:500_000], {"Content-Range": "250000-499999"}), 202)
    r = _ok(c.http("PUT", with_query(loc, digest=digest), data[500_000:]), 201)
    assert r.headers["Docker-Content-Digest"] == digest
    for srv in (a, b, c):
        assert _ok(srv.http("GET", f"/v2/{repo}/blobs/{digest}"), 200).body == data
        _error(srv.http("GET", loc), 404, "BLOB_UPLOAD_UNKNOWN")

    # The same path with a digest that does not match: refused on C, and nothing becomes visible.
    other = os.urandom(300_000)
    loc = _ok(a.http("POST", f"/v2/{repo}/blobs/uploads/"), 202).headers["Location"]
    _ok(b.http("PATCH", loc, other[:200_000], {"Content-Range": "0-199999"}), 202)
    wrong = f"{alg}:" + hashlib.new(alg, other[:200_000]).hexdigest()  # what a stale hasher would say
    _error(c.http("PUT", with_query(loc, digest=wrong), other[200_000:]), 400, "DIGEST_INVALID")
    for srv in (a, b, c):
        for d in (wrong, sha256(other)):
            assert srv.http("HEAD", f"/v2/{repo}/blobs/{d}").status == 404
        _error(srv.http("GET", loc), 404, "BLOB_UPLOAD_UNKNOWN")
    assert not list((cluster.root / "_uploads").iterdir())


def test_replicas_racing_to_move_one_tag(cluster: Cluster) -> None:
    a, b, c = cluster.start(3)
    repo = "race/app"
    config, layer, _ = image("race", b"race layer")
    push_blob(a, repo, config)
    push_blob(a, repo, layer)
    bodies = []
    for i in range(100):
        doc = json.loads(image("race", b"race layer")[2])
        doc["annotations"] = {"n": str(i)}
        bodies.append(json.dumps(doc).encode())
    pushed = {sha256(body) for body in bodies}

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: (a if i % 2 else b).http(
            "PUT", f"/v2/{repo}/manifests/latest", bodies[i], {"Content-Type": OCI_MANIFEST}), range(100)))
    assert [r.status for r in results] == [201] * 100, [r.body for r in results if r.status != 201][:3]

    seen = {srv.http("GET", f"/v2/{repo}/manifests/latest").headers["Docker-Content-Digest"] for srv in (a, b, c)}
    assert len(seen) == 1, seen
    tag_digest = seen.pop()
    assert tag_digest in pushed
    body = _ok(c.http("GET", f"/v2/{repo}/manifests/latest"), 200).body
    assert sha256(body) == tag_digest  # complete, and the one the tag names
    for srv in (a, b, c):
        assert _ok(srv.http("GET", f"/v2/{repo}/tags/list"), 200).json()["tags"] == ["latest"]
    # index.json agrees: the tag once, on the same digest; every other push listed untagged.
    assert index_tags(cluster.root, repo) == {"latest": tag_digest}
    listed = {m["digest"] for m in json.loads((cluster.root / repo / "index.json").read_bytes())["manifests"]}
    assert listed == pushed


def test_replica_killed_during_uploads_loses_nothing_acknowledged(cluster: Cluster) -> None:
    a, b = cluster.start(2)
    root = cluster.root
    acked: list[tuple[str, str, str, bytes, bytes]] = []
    failures: list[str] = []
    stop = threading.Event()

    def pusher(srv: Server, name: str, die_ok: bool) -> None:
        i = 0
        while not stop.is_set():
            repo, tag = f"kill/{name}", f"t{i}"
            try:
                digest, config, layer, manifest = push_image(srv, repo, tag, f"{name}-{i}", os.urandom(20_000 + i))
            except OSError:  # the replica died under us: what it did not acknowledge does not count
                if not die_ok:
                    failures.append(f"{name}: connection failed")
                return
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
                return
            acked.append((repo, tag, digest, layer, manifest))
            i += 1

    ack1, ack2 = 1 << 20, 600_000
    data1, data2 = os.urandom(ack1 + (3 << 20)), os.urandom(ack2 + (3 << 20))
    loc1 = _ok(a.http("POST", "/v2/kill/big/blobs/uploads/"), 202).headers["Location"]
    loc2 = _ok(a.http("POST", "/v2/kill/big/blobs/uploads/"), 202).headers["Location"]
    _ok(b.http("PATCH", loc1, data1[:ack1], {"Content-Range": f"0-{ack1 - 1}"}), 202)
    _ok(b.http("PATCH", loc2, data2[:ack2], {"Content-Range": f"0-{ack2 - 1}"}), 202)

    threads = [threading.Thread(target=pusher, args=(a, "via-a", False)),
               threading.Thread(target=pusher, args=(b, "via-b", True))]
    slow = []
    try:
        for t in threads:
            t.start()
        # Two chunks in flight on B, each with some of its bytes already in the upload file.
        for loc, ack, data in ((loc1, ack1, data1), (loc2, ack2, data2)):
            req = SlowRequest(b, "PATCH", loc, 3 << 20, {"Content-Range": f"{ack}-{ack + (3 << 20) - 1}"})
            slow.append(req)
            req.send(data[ack:ack + (5 << 19)])
            wait_for(lambda: upload_file_size(root, loc) > ack, "the chunk to reach the upload file")
        time.sleep(0.3)
        cluster.kill(b)
        time.sleep(0.3)  # A goes on alone (B's dead connections and locks must not hold it up)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for req in slow:
            req.close()
    assert not failures, failures
    assert {repo for repo, *_ in acked} == {"kill/via-a", "kill/via-b"}

    # Neither chunk in flight was acknowledged, and the sessions say so, everywhere.
    (b2,) = cluster.start(1)
    for srv in (a, b2):
        assert _ok(srv.http("GET", loc1), 204).headers["Range"] == f"0-{ack1 - 1}"
        assert _ok(srv.http("GET", loc2), 204).headers["Range"] == f"0-{ack2 - 1}"
    # The dead writer's lease on each session (one writer at a time, across replicas) runs out
    # by itself; a client retrying before then is told another request is writing. Let that
    # time pass at once.
    r = b2.http("PATCH", loc1, b"")  # an empty chunk: does nothing, once the session is free
    assert r.status in (202, 416), r.body
    if r.status == 416:
        assert b"another request is writing" in r.body, r.body
        assert cluster.sql("UPDATE uploads SET lease_until = 0 WHERE lease_until IS NOT NULL") == "UPDATE 2"
    # One session goes on from the acknowledged length...
    rest = data1[ack1:ack1 + 100_000]
    r = _ok(b2.http("PUT", with_query(loc1, digest=sha256(data1[:ack1] + rest)), rest,
                    {"Content-Range": f"{ack1}-{ack1 + len(rest) - 1}"}), 201)
    assert _ok(a.http("GET", f"/v2/kill/big/blobs/{r.headers['Docker-Content-Digest']}"), 200).body \
        == data1[:ack1] + rest
    # ...the other ends right there: the blob is what was acknowledged, not a byte more.
    d2 = sha256(data2[:ack2])
    _ok(a.http("PUT", with_query(loc2, digest=d2)), 201)
    for srv in (a, b2):
        r = _ok(srv.http("GET", f"/v2/kill/big/blobs/{d2}"), 200)
        assert len(r.body) == ack2 and r.body == data2[:ack2]
        assert srv.http("HEAD", f"/v2/kill/big/blobs/{d2}").headers["Content-Length"] == str(ack2)

    # Every push that was acknowledged, by either replica, is there, through both.
    for repo in ("kill/via-a", "kill/via-b"):
        mine = {tag: digest for r_, tag, digest, _, _ in acked if r_ == repo}
        for srv in (a, b2):
            assert set(_ok(srv.http("GET", f"/v2/{repo}/tags/list"), 200).json()["tags"]) >= set(mine)
        on_disk = index_tags(root, repo)
        assert {t: on_disk.get(t) for t in mine} == mine
    for repo, tag, digest, layer, manifest in acked:
        for srv in (a, b2):
            assert _ok(srv.http("GET", f"/v2/{repo}/manifests/{tag}"), 200).body == manifest
        assert _ok(b2.http("GET", f"/v2/{repo}/blobs/{sha256(layer)}"), 200).body == layer


# ------------------------------------------------------------------ what a replica keeps in memory

@pytest.fixture
def two_apps(aiohttp_client, tmp_path: Path, pg_dsn: str, pg_schema: str):  # type: ignore[no-untyped-def]
    """Two applications in this process on one schema and one root: replicas whose memory the
    test can look into."""
    cfg = make_config(tmp_path / "data", storage={"commit": False},
                      meta={"driver": "postgres", "postgres": {"dsn": pg_dsn, "schema": pg_schema, "pool_size": 3}})

    async def make():  # type: ignore[no-untyped-def]
        return await aiohttp_client(create_app(cfg)), await aiohttp_client(create_app(cfg))
    return make


class ReadBack:
    """Counts how often an app reads an upload back to hash it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client: Any):
        self.calls = 0
        storage = client.app[SERVICES].storage
        original = storage.upload_read

        def spy(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            return original(*args, **kw)
        monkeypatch.setattr(storage, "upload_read", spy)


async def test_stale_hasher_is_not_used_after_another_replica_appended(two_apps, monkeypatch) -> None:
    """A holds the running hash of a session; B appends a chunk; back on A, the hash it holds
    is for fewer bytes than the session has: A must read the upload back and hash it again."""
    a, b = await two_apps()
    hashers = a.app[SERVICES].uploads._hashers
    reads = ReadBack(monkeypatch, a)
    data = os.urandom(300_000)
    r = await a.post("/v2/mem/app/blobs/uploads/")
    loc = r.headers["Location"]
    upload_id = loc.rsplit("/", 1)[1]
    assert (await a.patch(loc, data=data[:100_000], headers={"Content-Range": "0-99999"})).status == 202
    assert hashers[upload_id][1] == 100_000  # A holds the hash of the first 100000 bytes
    assert (await b.patch(loc, data=data[100_000:200_000], headers={"Content-Range": "100000-199999"})).status == 202

    # A finish that names the digest of what A hashed (with no body) is refused: A noticed.
    await assert_error(await a.put(with_query(loc, digest=sha256(data[:100_000]))), 400, "DIGEST_INVALID")
    assert reads.calls == 1
    assert (await b.head(f"/v2/mem/app/blobs/{sha256(data[:100_000])}")).status == 404

    # Again, finished properly on A: A appends the last chunk, rehashes, and the digest holds.
    r = await a.post("/v2/mem/app/blobs/uploads/")
    loc = r.headers["Location"]
    assert (await a.patch(loc, data=data[:100_000], headers={"Content-Range": "0-99999"})).status == 202
    assert (await b.patch(loc, data=data[100_000:200_000], headers={"Content-Range": "100000-199999"})).status == 202
    r = await a.put(with_query(loc, digest=sha256(data)), data=data[200_000:])
    assert r.status == 201, await r.text()
    assert reads.calls == 2
    r = await b.get(f"/v2/mem/app/blobs/{sha256(data)}")
    assert await r.read() == data


async def test_valid_hasher_is_used_without_reading_back(two_apps, monkeypatch) -> None:
    """The other side of the size check: another replica only looked at the session (status,
    HEAD); A's hash is still good and A finishes without reading the upload back."""
    a, b = await two_apps()
    reads = ReadBack(monkeypatch, a)
    data = os.urandom(200_000)
    loc = (await a.post("/v2/mem/app/blobs/uploads/")).headers["Location"]
    assert (await a.patch(loc, data=data[:100_000], headers={"Content-Range": "0-99999"})).status == 202
    r = await b.get(loc)
    assert r.status == 204 and r.headers["Range"] == "0-99999"
    assert (await b.head(f"/v2/mem/app/blobs/{sha256(data)}")).status == 404
    r = await a.put(with_query(loc, digest=sha256(data)), data=data[100_000:])
    assert r.status == 201, await r.text()
    assert reads.calls == 0
    assert (await (await b.get(f"/v2/mem/app/blobs/{sha256(data)}")).read()) == data


async def test_concurrent_chunks_on_two_replicas_never_commit_a_corrupt_blob(two_apps) -> None:
    """A client retries a chunk on B while its first try is still streaming into A (a load
    balancer timeout, say). Per-process locks do not see each other. Whichever chunk the
    registry acknowledges (one at most: both start at the same offset), that chunk must be
    what the upload holds, and the blob published under its digest must be exactly those bytes."""
    a, b = await two_apps()
    prefix, x, y = os.urandom(100_000), os.urandom(200_000), os.urandom(150_000)
    loc = (await b.post("/v2/mem/race/blobs/uploads/")).headers["Location"]  # B holds the running hash
    assert (await b.patch(loc, data=prefix, headers={"Content-Range": "0-99999"})).status == 202
    release = asyncio.Event()

    async def slow_x():  # type: ignore[no-untyped-def]
        yield x[:1000]
        await release.wait()
        yield x[1000:]
    first = asyncio.ensure_future(a.patch(loc, data=slow_x()))
    await asyncio.sleep(0.2)  # A is inside the PATCH, waiting for the rest of x
    second = await b.patch(loc, data=y, headers={"Content-Range": "100000-249999"})
    release.set()
    first = await first
    assert {first.status, second.status} <= {202, 416}, (first.status, second.status)
    acked = [chunk for r, chunk in ((first, x), (second, y)) if r.status == 202]
    assert len(acked) == 1, (first.status, second.status)
    want = prefix + acked[0]
    r = await a.get(loc)
    assert r.headers["Range"] == f"0-{len(want) - 1}"

    r = await b.put(with_query(loc, digest=sha256(want)))
    assert r.status == 201, f"the acknowledged chunk was lost: {r.status} {await r.text()}"
    got = await (await a.get(f"/v2/mem/race/blobs/{sha256(want)}")).read()
    assert sha256(got) == sha256(want), "a blob was committed whose bytes do not match its digest"


async def test_index_json_is_never_written_from_a_stale_view(two_apps, tmp_path) -> None:
    """Layout state is per process; what goes into index.json is read from the shared store."""
    a, b = await two_apps()
    root = tmp_path / "data"
    cfg, layer, _ = image("idx", b"idx layer")
    for data in (cfg, layer):
        assert (await a.post(f"/v2/mem/idx/blobs/uploads/?digest={sha256(data)}", data=data)).status == 201
    bodies = []
    for i in range(3):
        doc = json.loads(image("idx", b"idx layer")[2])
        doc["annotations"] = {"n": str(i)}
        bodies.append(json.dumps(doc).encode())
    hdrs = {"Content-Type": OCI_MANIFEST}
    assert (await a.put("/v2/mem/idx/manifests/t1", data=bodies[0], headers=hdrs)).status == 201
    assert index_tags(root, "mem/idx") == {"t1": sha256(bodies[0])}
    assert (await b.delete("/v2/mem/idx/manifests/t1")).status == 202  # the tag only
    assert index_tags(root, "mem/idx") == {}
    assert (await a.put("/v2/mem/idx/manifests/t2", data=bodies[1], headers=hdrs)).status == 201
    assert index_tags(root, "mem/idx") == {"t2": sha256(bodies[1])}
    assert (await b.put("/v2/mem/idx/manifests/t2", data=bodies[2], headers=hdrs)).status == 201
    assert (await a.delete(f"/v2/mem/idx/manifests/{sha256(bodies[0])}")).status == 202
    assert index_tags(root, "mem/idx") == {"t2": sha256(bodies[2])}
    listed = {m["digest"] for m in json.loads((root / "mem/idx/index.json").read_bytes())["manifests"]}
    assert listed == {sha256(bodies[1]), sha256(bodies[2])}


async def test_sessions_finished_elsewhere_are_not_kept_in_memory(two_apps) -> None:
    """Sessions started (or continued) on A and finished on B: A must not keep their hashers
    and locks for ever (a replica behind a round-robin balancer would grow without end). The
    hashers kept are bounded; one that was dropped costs a read-back, never a wrong answer."""
    a, b = await two_apps()
    uploads = a.app[SERVICES].uploads
    uploads.max_cached_hashers = 3
    for i in range(10):
        data = os.urandom(10_000)
        loc = (await a.post("/v2/mem/leak/blobs/uploads/")).headers["Location"]
        assert (await a.patch(loc, data=data[:5000], headers={"Content-Range": "0-4999"})).status == 202
        assert (await b.put(with_query(loc, digest=sha256(data)), data=data[5000:])).status == 201
    assert len(uploads._locks) == 0
    assert len(uploads._hashers) <= 3

    sessions = []
    for i in range(6):  # more open sessions than A keeps hashers for
        data = os.urandom(10_000)
        loc = (await a.post("/v2/mem/leak/blobs/uploads/")).headers["Location"]
        assert (await a.patch(loc, data=data[:5000], headers={"Content-Range": "0-4999"})).status == 202
        sessions.append((loc, data))
    assert len(uploads._hashers) == 3 and len(uploads._locks) == 0
    for loc, data in sessions:
        r = await a.put(with_query(loc, digest=sha256(data)), data=data[5000:])
        assert r.status == 201, await r.text()
        assert await (await b.get(f"/v2/mem/leak/blobs/{sha256(data)}")).read() == data
    assert not uploads._hashers and not uploads._locks


async def test_bytes_never_acknowledged_are_not_published(two_apps, tmp_path) -> None:
    """A replica killed while writing a chunk leaves bytes past the recorded length in the
    upload file. A finish without a body (its digest over what was acknowledged) must publish
    exactly the acknowledged bytes, even when the finishing replica's hash is still good."""
    a, b = await two_apps()
    data = os.urandom(150_000)
    loc = (await a.post("/v2/mem/tail/blobs/uploads/")).headers["Location"]
    assert (await a.patch(loc, data=data[:100_000], headers={"Content-Range": "0-99999"})).status == 202
    with open(tmp_path / "data" / "_uploads" / loc.rsplit("/", 1)[1], "ab") as f:
        f.write(data[100_000:])  # what a dying writer got onto disk and never recorded
    for srv in (a, b):
        assert (await srv.get(loc)).headers["Range"] == "0-99999"
    digest = sha256(data[:100_000])
    r = await a.put(with_query(loc, digest=digest))
    assert r.status == 201, await r.text()
    for srv in (a, b):
        r = await srv.get(f"/v2/mem/tail/blobs/{digest}")
        assert r.status == 200 and await r.read() == data[:100_000]
