"""The registry on S3 (a moto server, tests/s3.py): keys in the bucket, shared blobs and their
removal, chunked pushes across parts, interrupted and abandoned uploads, redirects, the read
cache, subpaths mixing a local disk and S3, faults at start-up and while serving, and memory
through a 1 GiB push. Every API test also runs on S3 (the "s3" param of the config fixture)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from registry.app import create_app
from registry.cli import main as cli_main
from registry.keys import SERVICES
from registry.maintenance.gc import collect
from registry.storage.s3 import S3ConfigError
from tests.conftest import Pusher, make_config, sha256
from tests.helpers import assert_error, start_upload, with_query
from tests.s3 import KEY_ID, SECRET, S3, fault_proxy  # noqa: F401  (fixture)

MiB = 1 << 20
PART = 5 * MiB


def s3_config(tmp_path: Path, s3: S3, *, dedupe: bool = True, **driver: Any) -> Any:
    driver.setdefault("chunksize", PART)
    return make_config(tmp_path / "data", storage={"commit": False, "dedupe": dedupe,
                                                   "storage_driver": s3.driver(**driver)})


async def gc_everything(svc: Any) -> Any:
    """A GC pass as if gcDelay and the upload TTL had long passed."""
    return await collect(svc, delete_untagged=True, upload_ttl=0, now=time.time() + 10 * 86400)


# ----------------------------------------------------------------------------- keys and dedupe

async def test_layout_keys_in_the_bucket(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, rootdirectory="reg/v1")))
    push = Pusher(c)
    shared = b"a layer both repositories hold"
    da, body_a = await push.image("lay/a", "v1", layers=[shared, b"only in a"])
    db, _ = await push.image("lay/b", "v1", layers=[shared])
    keys = s3.keys()
    for repo in ("lay/a", "lay/b"):
        assert json.loads(s3.get(f"reg/v1/{repo}/oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(s3.get(f"reg/v1/{repo}/index.json"))
        assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["v1"]
    layer = sha256(shared)[7:]
    assert keys[f"reg/v1/blobs/sha256/{layer}"] == len(shared)  # one object for the registry
    assert not [k for k in keys if k.endswith(layer) and k != f"reg/v1/blobs/sha256/{layer}"]
    assert s3.get(f"reg/v1/lay/a/blobs/sha256/{da[7:]}") == body_a  # manifests stay per repository
    assert f"reg/v1/lay/b/blobs/sha256/{db[7:]}" in keys
    assert not [k for k in keys if not k.startswith("reg/v1/")]
    assert not [k for k in keys if "/_uploads/" in k or "/_trash/" in k]  # nothing left behind
    assert s3.multipart_uploads() == []


async def test_a_shared_blob_goes_with_its_last_holder(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3)))
    push = Pusher(c)
    data = os.urandom(70_000)
    d = await push.blob("own/a", data)
    assert await push.blob("own/b", data) == d
    key = f"blobs/sha256/{d[7:]}"
    assert (await c.delete(f"/v2/own/a/blobs/{d}")).status == 202
    assert key in s3.keys()  # own/b still holds it
    assert await (await c.get(f"/v2/own/b/blobs/{d}")).read() == data
    assert (await c.delete(f"/v2/own/b/blobs/{d}")).status == 202
    assert key not in s3.keys()
    # GC: an unreferenced blob's object goes when its row does
    d2 = await push.blob("own/c", b"unreferenced")
    assert f"blobs/sha256/{d2[7:]}" in s3.keys()
    result = await gc_everything(c.app[SERVICES])
    assert result.blobs_deleted == 1
    assert f"blobs/sha256/{d2[7:]}" not in s3.keys()
    assert not [k for k in s3.keys() if k.startswith("_trash/")]


async def test_dedupe_off_keeps_a_copy_per_repository(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, dedupe=False)))
    push = Pusher(c)
    d = await push.blob("cp/a", b"copied")
    await push.blob("cp/b", b"copied")
    keys = s3.keys()
    assert f"cp/a/blobs/sha256/{d[7:]}" in keys and f"cp/b/blobs/sha256/{d[7:]}" in keys
    assert f"blobs/sha256/{d[7:]}" not in keys
    assert (await c.delete(f"/v2/cp/a/blobs/{d}")).status == 202
    assert f"cp/a/blobs/sha256/{d[7:]}" not in s3.keys()
    assert await (await c.get(f"/v2/cp/b/blobs/{d}")).read() == b"copied"


async def test_mount_links_the_shared_object(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3)))
    d = await Pusher(c).blob("mnt/src", b"mounted")
    before = s3.keys()
    r = await c.post(f"/v2/mnt/dst/blobs/uploads/?mount={d}&from=mnt/src")
    assert r.status == 201
    assert {k for k in s3.keys() if "blobs/" in k} == {k for k in before if "blobs/" in k}  # no copy made
    assert await (await c.get(f"/v2/mnt/dst/blobs/{d}")).read() == b"mounted"


# ----------------------------------------------------------------------------- uploads

async def test_chunked_push_across_parts_survives_a_restart(aiohttp_client, tmp_path, s3):
    cfg = s3_config(tmp_path, s3)
    a = await aiohttp_client(create_app(cfg))
    r = await a.post("/v2/chunk/app/blobs/uploads/")
    assert r.status == 202 and r.headers["OCI-Chunk-Min-Length"] == str(PART)
    loc = r.headers["Location"]
    upload_id = loc.rsplit("/", 1)[1]
    data = os.urandom(12 * MiB + 12345)
    pos = 0
    for _ in range(7):  # 1 MiB chunks, each smaller than a part: spooled on disk, parts when full
        r = await a.patch(loc, data=data[pos:pos + MiB], headers={"Content-Range": f"{pos}-{pos + MiB - 1}"})
        assert r.status == 202 and r.headers["Range"] == f"0-{pos + MiB - 1}"
        assert r.headers["OCI-Chunk-Min-Length"] == str(PART)
        pos += MiB
    keys = s3.keys(f"_uploads/{upload_id}/")
    assert f"_uploads/{upload_id}/state.json" in keys  # the state another process resumes from
    assert len(s3.multipart_uploads()) == 1  # one part sent, the rest spooled
    spool = list((tmp_path / "data" / "_spool").glob("p*/*"))
    assert spool and all(p.stat().st_size < PART for p in spool)  # the tail is on disk, not in memory
    assert not [k for k in s3.keys() if k.startswith("blobs/")]
    await a.close()

    b = await aiohttp_client(create_app(cfg))  # another process: no spool, no running hash
    r = await b.get(loc)
    assert r.status == 204 and r.headers["Range"] == f"0-{pos - 1}"
    r = await b.patch(loc, data=data[pos:], headers={"Content-Range": f"{pos}-{len(data) - 1}"})
    assert r.status == 202
    r = await b.put(with_query(loc, digest=sha256(data)))
    assert r.status == 201, await r.text()
    assert await (await b.get(f"/v2/chunk/app/blobs/{sha256(data)}")).read() == data
    assert not s3.keys("_uploads/") and s3.multipart_uploads() == []


async def test_wrong_digest_after_parts_publishes_nothing(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3)))
    loc = await start_upload(c, "wrong/app")
    data = os.urandom(6 * MiB)
    assert (await c.patch(loc, data=data)).status == 202
    await assert_error(await c.put(with_query(loc, digest=sha256(b"other"))), 400, "DIGEST_INVALID")
    assert not [k for k in s3.keys() if k.startswith("blobs/")]
    assert not s3.keys("_uploads/") and s3.multipart_uploads() == []


async def _cut_off_patch(c: Any, loc: str, body: bytes, announced: int) -> None:
    """A PATCH whose client announces ``announced`` bytes, sends ``body`` and goes away."""
    rd, wr = await asyncio.open_connection(c.server.host, c.server.port)
    head = (f"PATCH {loc} HTTP/1.1\r\nHost: registry\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {announced}\r\n\r\n").encode()
    wr.write(head + body)
    await wr.drain()
    await asyncio.sleep(0.5)
    wr.close()
    await asyncio.sleep(0.5)


async def test_interrupted_upload_leaves_no_blob_and_resumes(aiohttp_client, tmp_path, s3):
    cfg = s3_config(tmp_path, s3)
    c = await aiohttp_client(create_app(cfg))
    loc = await start_upload(c, "cut/app")
    data = os.urandom(8 * MiB)
    await _cut_off_patch(c, loc, data[:6 * MiB + 5], len(data))
    r = await c.get(loc)
    assert r.status == 204
    # What arrived is kept when the server saw the body end early (WriteInterrupted); a handler
    # cancelled with its connection keeps what was recorded before. Either way: resume from there.
    got = (await c.app[SERVICES].meta.upload_get(loc.rsplit("/", 1)[1])).size
    assert got <= 6 * MiB + 5 and r.headers["Range"] == f"0-{max(got - 1, 0)}"
    assert (await c.head(f"/v2/cut/app/blobs/{sha256(data)}")).status == 404
    assert not [k for k in s3.keys() if k.startswith("blobs/")]
    await c.close()
    c = await aiohttp_client(create_app(cfg))  # resumed by another process
    r = await c.patch(loc, data=data[got:], headers={"Content-Range": f"{got}-{len(data) - 1}"})
    assert r.status == 202, await r.text()
    assert (await c.put(with_query(loc, digest=sha256(data)))).status == 201
    assert await (await c.get(f"/v2/cut/app/blobs/{sha256(data)}")).read() == data


async def test_expired_uploads_abort_their_multipart_uploads(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3)))
    loc = await start_upload(c, "old/app")
    assert (await c.patch(loc, data=os.urandom(6 * MiB))).status == 202
    svc = c.app[SERVICES]

    async def body():  # data with no session row: a single-request push cut off by a crash
        yield os.urandom(6 * MiB)
    await svc.storage.upload_write("f" * 32, 0, body(), [])
    assert len(s3.multipart_uploads()) == 2 and s3.keys("_uploads/")
    result = await gc_everything(svc)
    assert result.uploads_deleted == 2
    assert s3.multipart_uploads() == [] and s3.keys("_uploads/") == {}
    assert (await c.get(loc)).status == 404


# ----------------------------------------------------------------------------- pulls

async def test_ranges_streamed_from_the_store(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3)))
    data = os.urandom(3 * MiB)
    d = await Pusher(c).blob("rng/app", data)
    for rng, want in (("bytes=0-9", data[:10]), ("bytes=1000-", data[1000:]), ("bytes=-5", data[-5:]),
                      (f"bytes=10-{10 * MiB}", data[10:])):
        r = await c.get(f"/v2/rng/app/blobs/{d}", headers={"Range": rng})
        assert r.status == 206, rng
        assert await r.read() == want
        assert r.headers["Content-Range"].endswith(f"/{len(data)}")
    r = await c.get(f"/v2/rng/app/blobs/{d}", headers={"Range": f"bytes={len(data)}-"})
    await assert_error(r, 416, "RANGE_INVALID")
    assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    r = await c.get(f"/v2/rng/app/blobs/{d}", headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert r.status == 200 and await r.read() == data
    r = await c.get(f"/v2/rng/app/blobs/{d}")
    assert r.headers["ETag"] == f'"{d[7:]}"' and r.headers["Content-Length"] == str(len(data))


async def test_redirect_to_a_presigned_url(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, redirect=True)))
    data = os.urandom(2 * MiB)
    d = await Pusher(c).blob("redir/app", data)
    r = await c.get(f"/v2/redir/app/blobs/{d}", allow_redirects=False)
    assert r.status == 307
    url = r.headers["Location"]
    assert url.startswith(s3.endpoint) and "X-Amz-Signature=" in url and SECRET not in url
    assert r.headers["Docker-Content-Digest"] == d
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as got:
            assert got.status == 200 and await got.read() == data
        async with http.get(url, headers={"Range": "bytes=100-199"}) as got:
            assert got.status == 206 and await got.read() == data[100:200]
    r = await c.head(f"/v2/redir/app/blobs/{d}")  # HEAD is answered here
    assert r.status == 200 and r.headers["Content-Length"] == str(len(data))
    await assert_error(await c.get(f"/v2/redir/app/blobs/{sha256(b'nope')}"), 404, "BLOB_UNKNOWN")
    # a manifest fetched through the blobs endpoint: its bytes are under the repository's key
    dm, body = await Pusher(c).image("redir/app", "v1")
    r = await c.get(f"/v2/redir/app/blobs/{dm}", allow_redirects=False)
    async with aiohttp.ClientSession() as http:
        async with http.get(r.headers["Location"]) as got:
            assert await got.read() == body


async def test_read_cache_bounded_lru(aiohttp_client, tmp_path, s3):
    cache_dir = tmp_path / "cache"
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, cache_directory=str(cache_dir),
                                                  cache_size=1000_000)))
    push = Pusher(c)
    blobs = [os.urandom(300_000) for _ in range(4)]
    ds = [await push.blob("hot/app", b) for b in blobs]
    cache = c.app[SERVICES].storage.cache

    async def get(i: int, **kw: Any) -> bytes:
        r = await c.get(f"/v2/hot/app/blobs/{ds[i]}", **kw)
        assert r.status in (200, 206)
        return await r.read()
    async def cached(i: int) -> bool:  # the file is renamed in just after the last byte went out
        for _ in range(100):
            if (cache_dir / f"sha256-{ds[i][7:]}").is_file():
                return True
            await asyncio.sleep(0.02)
        return False
    assert await get(0) == blobs[0]  # a miss: streamed from S3, written to the cache on the way
    assert cache.hits == 0 and await cached(0)
    s3.client().delete_object(Bucket=s3.bucket, Key=f"blobs/sha256/{ds[0][7:]}")
    assert await get(0) == blobs[0]  # a hit: served from the local disk
    assert cache.hits == 1
    assert await get(0, headers={"Range": "bytes=5-9"}) == blobs[0][5:10]
    assert await get(1, headers={"Range": "bytes=5-9"}) == blobs[1][5:10]  # a range does not fill it
    assert not (cache_dir / f"sha256-{ds[1][7:]}").exists()
    for i in (1, 2, 3):
        assert await get(i) == blobs[i]
        assert await cached(i)
    # 4 x 300 kB > 1 MB: the least recently used (blob 0, though it was hit) went first
    # (eviction follows the new file's rename: wait for it, within a deadline)
    want = {f"sha256-{d[7:]}" for d in ds[1:]}
    for _ in range(100):
        names = {p.name for p in cache_dir.iterdir()}
        if names == want:
            break
        await asyncio.sleep(0.02)
    assert names == want
    assert cache.total <= 1000_000 and cache.evictions == 1
    big = os.urandom(600_000)  # above half the cache: never cached
    db = await push.blob("hot/app", big)
    assert await (await c.get(f"/v2/hot/app/blobs/{db}")).read() == big
    assert not (cache_dir / f"sha256-{db[7:]}").exists()


# ----------------------------------------------------------------------------- subpaths

async def test_subpaths_mix_a_local_disk_and_s3(aiohttp_client, tmp_path, s3):
    team_root = tmp_path / "team-a-disk"
    cfg = make_config(tmp_path / "data", storage={
        "commit": False, "storage_driver": s3.driver(chunksize=PART),
        "sub_paths": {"/team-a": {"rootDirectory": str(team_root), "commit": False}}})
    c = await aiohttp_client(create_app(cfg))
    push = Pusher(c)
    layer_a, layer_o = b"team a's layer", b"everyone else's layer"
    da, body_a = await push.image("team-a/app", "v1", layers=[layer_a])
    do, body_o = await push.image("other/app", "v1", layers=[layer_o])
    # team-a on the disk, as an OCI layout; nothing of it in the bucket
    assert (team_root / "team-a/app/blobs/sha256" / sha256(layer_a)[7:]).read_bytes() == layer_a
    assert (team_root / "team-a/app/blobs/sha256" / da[7:]).read_bytes() == body_a
    assert json.loads((team_root / "team-a/app/index.json").read_bytes())["manifests"][0]["digest"] == da
    keys = s3.keys()
    assert not [k for k in keys if "team-a" in k or k.endswith(sha256(layer_a)[7:])]
    # the rest in the bucket
    assert f"blobs/sha256/{sha256(layer_o)[7:]}" in keys and "other/app/index.json" in keys
    assert not (team_root / "other").exists()
    # a chunked push to team-a stays on the disk, with no chunk minimum
    r = await c.post("/v2/team-a/app/blobs/uploads/")
    assert "OCI-Chunk-Min-Length" not in r.headers
    loc = r.headers["Location"]
    big = os.urandom(6 * MiB)
    assert (await c.patch(loc, data=big)).status == 202
    assert not s3.keys("_uploads/") and s3.multipart_uploads() == []
    assert (team_root / "_uploads" / loc.rsplit("/", 1)[1]).stat().st_size == len(big)
    assert (await c.put(with_query(loc, digest=sha256(big)))).status == 201
    assert (team_root / "team-a/app/blobs/sha256" / sha256(big)[7:]).stat().st_size == len(big)
    r = await c.post("/v2/other/app/blobs/uploads/")
    assert r.headers["OCI-Chunk-Min-Length"] == str(PART)
    # both pulled through one API; a mount across the two stores copies
    for repo, d, body in (("team-a/app", da, body_a), ("other/app", do, body_o)):
        r = await c.get(f"/v2/{repo}/manifests/v1")
        assert r.status == 200 and await r.read() == body
    assert await (await c.get(f"/v2/other/app/blobs/{sha256(layer_o)}")).read() == layer_o
    r = await c.post(f"/v2/team-a/app/blobs/uploads/?mount={sha256(layer_o)}&from=other/app")
    assert r.status == 201
    assert (team_root / "team-a/app/blobs/sha256" / sha256(layer_o)[7:]).read_bytes() == layer_o
    r = await c.post(f"/v2/other/app/blobs/uploads/?mount={sha256(big)}&from=team-a/app")
    assert r.status == 201
    assert s3.get(f"blobs/sha256/{sha256(big)[7:]}") == big
    r = await c.get("/v2/_catalog")
    assert (await r.json())["repositories"] == ["other/app", "team-a/app"]
    # deletes reach the right store
    assert (await c.delete(f"/v2/team-a/app/blobs/{sha256(big)}")).status == 202
    assert not (team_root / "team-a/app/blobs/sha256" / sha256(big)[7:]).exists()
    assert f"blobs/sha256/{sha256(big)[7:]}" in s3.keys()


# ----------------------------------------------------------------------------- faults

async def _serve_once(tmp_path: Path, driver: dict[str, Any], timeout: float = 60) -> tuple[int, str]:
    """``registry serve`` with this storage driver: (exit status, output) when it stops by itself."""
    conf = tmp_path / "registry.json"
    conf.write_text(json.dumps({"http": {"address": "127.0.0.1", "port": 0},
                                "storage": {"rootDirectory": str(tmp_path / "data"), "storageDriver": driver}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "registry", "serve", "--config", str(conf),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                env=env, cwd=str(Path(__file__).resolve().parent.parent))
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the registry did not stop on a storage it cannot use")
    return proc.returncode or 0, out.decode(errors="replace")


async def test_start_up_stops_on_a_missing_bucket(tmp_path, s3):
    status, out = await _serve_once(tmp_path, s3.file_driver(bucket="no-such-bucket"))
    assert status != 0
    assert "storage.storageDriver.bucket" in out and "no-such-bucket" in out and "does not exist" in out
    assert SECRET not in out and "Traceback" not in out


async def test_start_up_stops_on_an_unreachable_endpoint(tmp_path, s3):
    from tests.s3 import _free_port
    status, out = await _serve_once(tmp_path, s3.file_driver(regionendpoint=f"http://127.0.0.1:{_free_port()}",
                                                             maxAttempts=1, connectTimeout="1s"))
    assert status != 0
    assert "storage.storageDriver.regionendpoint" in out and "cannot reach" in out
    assert SECRET not in out and "Traceback" not in out


async def test_start_up_stops_on_refused_credentials(tmp_path, s3, fault_proxy):
    fault_proxy.deny = True
    status, out = await _serve_once(tmp_path, s3.file_driver(regionendpoint=fault_proxy.url))
    assert status != 0
    assert "storage.storageDriver.accesskey/secretkey" in out and "refused" in out
    assert SECRET not in out and "Traceback" not in out
    with pytest.raises(S3ConfigError, match="accesskey/secretkey"):  # in-process too
        cfg = s3_config(tmp_path, s3, regionendpoint=fault_proxy.url)
        app = create_app(cfg)
        async with _started(app):
            pass


class _started:
    def __init__(self, app: Any):
        from aiohttp import web
        self.runner = web.AppRunner(app)

    async def __aenter__(self) -> None:
        await self.runner.setup()

    async def __aexit__(self, *exc: Any) -> None:
        await self.runner.cleanup()


async def test_default_credential_chain(aiohttp_client, tmp_path, s3, monkeypatch):
    """No accesskey/secretkey: botocore's chain (here: the environment) is used."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, accesskey="", secretkey="")))
    d = await Pusher(c).blob("chain/app", b"via the default chain")
    assert await (await c.get(f"/v2/chain/app/blobs/{d}")).read() == b"via the default chain"


async def test_transient_errors_are_retried_then_503(aiohttp_client, tmp_path, s3, fault_proxy, caplog):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, regionendpoint=fault_proxy.url, max_attempts=3)))
    push = Pusher(c)
    d = await push.blob("flaky/app", b"first")
    fault_proxy.fail(2, 503, "SlowDown")  # throttling
    d2 = await push.blob("flaky/app", os.urandom(100_000))
    assert fault_proxy.failed == 2
    fault_proxy.fail(2, 500, "InternalError")
    r = await c.get(f"/v2/flaky/app/blobs/{d}")
    assert r.status == 200 and await r.read() == b"first"
    fault_proxy.fail(1, 502, "BadGateway")
    r = await c.get(f"/v2/flaky/app/blobs/{d2}", headers={"Range": "bytes=0-9"})
    assert r.status == 206
    # past the retries: the client gets 503 with the spec's error body and Retry-After
    fault_proxy.fail(1000, 503, "ServiceUnavailable")
    r = await c.get(f"/v2/flaky/app/blobs/{d}")
    await assert_error(r, 503, "UNAVAILABLE")
    assert r.headers["Retry-After"] == "5"
    r = await c.post(f"/v2/flaky/app/blobs/uploads/?digest={sha256(b'later')}", data=b"later")
    await assert_error(r, 503, "UNAVAILABLE")
    loc = await start_upload(c, "flaky/app")  # a session row only: works, then the chunk fails
    await assert_error(await c.patch(loc, data=b"x" * 1000), 503, "UNAVAILABLE")
    fault_proxy.fail(0)
    # it recovers, and the failed push left nothing visible
    assert (await c.head(f"/v2/flaky/app/blobs/{sha256(b'later')}")).status == 404
    assert await push.blob("flaky/app", b"later") == sha256(b"later")
    r = await c.patch(loc, data=b"x" * 1000, headers={"Content-Range": "0-999"})
    assert r.status == 202, await r.text()
    assert (await c.put(with_query(loc, digest=sha256(b"x" * 1000)))).status == 201
    assert SECRET not in caplog.text


async def test_stalled_store_times_out_then_503(aiohttp_client, tmp_path, s3, fault_proxy):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, regionendpoint=fault_proxy.url, max_attempts=2,
                                                  read_timeout=1)))
    d = await Pusher(c).blob("slow/app", b"slow")
    fault_proxy.stall = 3
    t0 = time.monotonic()
    await assert_error(await c.get(f"/v2/slow/app/blobs/{d}"), 503, "UNAVAILABLE")
    assert time.monotonic() - t0 < 15
    fault_proxy.stall = 0


def test_check_config_masks_the_secret(tmp_path, capsys, s3):
    conf = tmp_path / "r.yaml"
    conf.write_text(json.dumps({"storage": {"storageDriver": s3.file_driver()}}))
    cli_main(["check-config", str(conf)])
    out = capsys.readouterr().out
    driver = json.loads(out)["storage"]["storageDriver"]
    assert driver["secretkey"] == "***" and SECRET not in out and driver["accesskey"] == KEY_ID


@pytest.mark.parametrize("driver, key, expected", [
    ({"name": "s3", "region": "us-east-1"}, "storage.storageDriver.bucket", "missing"),
    ({"name": "s3", "bucket": "b-1"}, "storage.storageDriver.region", "missing"),
    ({"name": "s3", "bucket": "b-1", "region": "r", "chunksize": "4MiB"}, "storage.storageDriver.chunksize",
     "5MiB"),
    ({"name": "s3", "bucket": "b-1", "region": "r", "keyid": "k"}, "storage.storageDriver.keyid", "encrypt"),
    ({"name": "s3", "bucket": "b-1", "region": "r", "accesskey": "a"}, "storage.storageDriver.accesskey",
     "both"),
    ({"name": "gcs"}, "storage.storageDriver.name", "s3"),
    ({"name": "s3", "bucket": "b-1", "region": "r", "partConcurrency": 0},
     "storage.storageDriver.partConcurrency", "1 or more"),
    ({"name": "s3", "bucket": "b-1", "region": "r", "cacheSize": "1GiB"}, "storage.storageDriver.cacheSize",
     "cacheDirectory"),
])
def test_bad_driver_settings_name_the_key(driver, key, expected):
    from registry.config import ConfigError, load
    with pytest.raises(ConfigError) as e:
        load(None, environ={}, overrides={"storage": {"storageDriver": driver}})
    assert str(e.value).startswith(key) and expected in str(e.value)


def test_settings_reach_the_client(tmp_path):
    """SSE, storage class, timeouts, pool, retries, path style and TLS settings as botocore gets them."""
    from registry.config import load
    from registry.storage.s3 import S3Storage
    cfg = load(None, environ={}, overrides={"storage": {"storageDriver": {
        "name": "s3", "bucket": "b-1", "region": "eu-west-3", "regionendpoint": "minio.example:9000",
        "secure": False, "skipverify": True, "forcepathstyle": True, "encrypt": True, "keyid": "arn:kms:k",
        "storageclass": "STANDARD_IA", "connectTimeout": "3s", "readTimeout": "7s", "maxPoolConnections": 9,
        "maxAttempts": 4, "chunksize": "8MiB", "partConcurrency": 3}}})
    st = S3Storage(cfg.storage.storage_driver, spool_dir=tmp_path)
    assert st.endpoint == "http://minio.example:9000"
    assert st._put_extra == {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:kms:k",
                             "StorageClass": "STANDARD_IA"}
    assert st.part_size == 8 * MiB and st.uploads.concurrency == 3

    async def client_config() -> Any:
        client = await st._get_client()
        try:
            return client.meta.config, client.meta.endpoint_url, client.meta.region_name
        finally:
            await st.close()
    conf, url, region = asyncio.run(client_config())
    assert (conf.connect_timeout, conf.read_timeout, conf.max_pool_connections) == (3, 7, 9)
    assert conf.retries == {"total_max_attempts": 4, "mode": "standard"}
    assert conf.s3["addressing_style"] == "path"
    assert url == "http://minio.example:9000" and region == "eu-west-3"
    aes = load(None, environ={}, overrides={"storage": {"storageDriver": {
        "name": "s3", "bucket": "b-1", "region": "r", "encrypt": True, "storageclass": "NONE"}}})
    assert S3Storage(aes.storage.storage_driver, spool_dir=tmp_path)._put_extra == {"ServerSideEncryption": "AES256"}


async def test_sse_and_storage_class_are_sent(aiohttp_client, tmp_path, s3):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, encrypt=True, storageclass="STANDARD_IA")))
    d = await Pusher(c).blob("sse/app", os.urandom(6 * MiB))  # parts, completion, copy
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"blobs/sha256/{d[7:]}")
    assert head["ServerSideEncryption"] == "AES256" and head["StorageClass"] == "STANDARD_IA"


# ----------------------------------------------------------------------------- memory

def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_1gib_push_keeps_server_memory_flat(tmp_path, s3):
    """A real server process pushes 1 GiB to S3 (monolithic, streamed; then chunked in one PATCH):
    its peak RSS (VmHWM) grows by less than 64 MiB."""
    import http.client
    from conformance.conftest import running_server
    size, block = 1 << 30, os.urandom(MiB)

    def body(tag: bytes) -> Any:
        for i in range(size // MiB):
            yield tag + i.to_bytes(8, "big") + block[9:]
    digests = {}
    for tag in (b"m", b"c"):
        h = hashlib.sha256()
        for piece in body(tag):
            h.update(piece)
        digests[tag] = "sha256:" + h.hexdigest()
    conf = tmp_path / "registry.json"
    conf.write_text(json.dumps({"http": {"address": "127.0.0.1", "port": 0}, "log": {"level": "warning"},
                                "storage": {"rootDirectory": str(tmp_path / "data"), "commit": False,
                                            "storageDriver": s3.file_driver(chunksize="16MiB",
                                                                            partConcurrency=4)}}))
    with running_server(tmp_path / "data", tmp_path / "server.log", conf) as srv:
        assert srv.http("POST", f"/v2/mem/app/blobs/uploads/?digest={sha256(b'warm')}", b"warm").status == 201
        assert srv.http("GET", f"/v2/mem/app/blobs/{sha256(b'warm')}").status == 200
        before = _vm_hwm(srv.proc.pid)
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=600)
        conn.request("POST", f"/v2/mem/app/blobs/uploads/?digest={digests[b'm']}", body=body(b"m"),
                     headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        assert r.status == 201, r.read()
        r.read()
        mono = time.monotonic() - t0
        loc = srv.http("POST", "/v2/mem/app/blobs/uploads/").headers["Location"]
        conn.request("PATCH", loc, body=body(b"c"), headers={"Content-Length": str(size),
                                                             "Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        assert r.status == 202, r.read()
        r.read()
        assert srv.http("PUT", with_query(loc, digest=digests[b"c"])).status == 201
        after = _vm_hwm(srv.proc.pid)
        took = time.monotonic() - t0
        head = s3.client().head_object(Bucket=s3.bucket, Key=f"blobs/sha256/{digests[b'm'][7:]}")
        assert head["ContentLength"] == size
        print(f"\n1 GiB monolithic push in {mono:.1f}s, chunked in {took - mono:.1f}s; VmHWM "
              f"{before / MiB:.1f} MiB -> {after / MiB:.1f} MiB (+{(after - before) / MiB:.1f} MiB)")
        assert after - before < 64 * MiB, (before, after)


# ----------------------------------------------------------------------------- races, scrub, readiness

async def test_removal_puts_a_shared_object_back_when_a_holder_appears(aiohttp_client, tmp_path, s3, monkeypatch):
    """remove_content sets the object aside, then finds a repository holding the digest again (a push
    or mount linked it meanwhile): the object is restored, nothing is lost."""
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3)))
    svc = c.app[SERVICES]
    d = await Pusher(c).blob("race/a", b"contended")
    assert await svc.meta.blob_unlink("race/a", d)
    answers = iter([None, ("race/b", 9)])  # before the set-aside: nobody; after it: a new holder
    monkeypatch.setattr(svc.meta, "blob_holder", lambda digest: _answer(next(answers)))
    from registry.digest import parse_digest
    await svc.blobs.remove_content("race/a", parse_digest(d))
    assert s3.get(f"blobs/sha256/{d[7:]}") == b"contended"
    assert not [k for k in s3.keys() if k.startswith("_trash/")]


async def _answer(value: Any) -> Any:
    return value


async def test_scrub_reads_blobs_from_the_bucket(aiohttp_client, tmp_path, s3):
    from registry.maintenance.scrub import scrub
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3)))
    push = Pusher(c)
    good = await push.blob("scrub/app", os.urandom(200_000))
    bad = await push.blob("scrub/app", os.urandom(100_000))
    s3.client().put_object(Bucket=s3.bucket, Key=f"blobs/sha256/{bad[7:]}", Body=os.urandom(100_000))
    result = await scrub(c.app[SERVICES])
    assert [f.digest for f in result.damaged] == [bad], result.damaged
    assert (await c.get(f"/v2/scrub/app/blobs/{good}")).status == 200
    await assert_error(await c.get(f"/v2/scrub/app/blobs/{bad}"), 404, "BLOB_UNKNOWN")  # not served


async def test_readiness_follows_the_store(aiohttp_client, tmp_path, s3, fault_proxy):
    c = await aiohttp_client(create_app(s3_config(tmp_path, s3, regionendpoint=fault_proxy.url, max_attempts=1)))
    assert (await c.get("/readyz")).status == 200
    fault_proxy.fail(10, 503)
    r = await c.get("/readyz")
    assert r.status == 503 and "storage" in (await r.json())["errors"][0]["detail"]
