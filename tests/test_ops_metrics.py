"""/metrics (issue 8): exact counts after a known sequence of pushes and pulls, bounded
labels, the opt-in repository label and its cap, a registry per app; request ids."""
from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.app import create_app
from registry.metrics import ROUTES
from tests.conftest import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, make_config, sha256
from tests.helpers import start_upload, stream, with_query

REPO = "ops/app"
CONFIG = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
LAYER1 = bytes((i * 7 + 3) % 251 for i in range(100_000))  # above the small-blob size: sent with sendfile
LAYER2_PARTS = [b"a" * 3000, b"b" * 5000]
LAYER2 = b"".join(LAYER2_PARTS)


def cfg_for(tmp_path: Path, **metrics: Any):
    return make_config(tmp_path / "data", storage={"commit": False},
                       extensions={"metrics": metrics} if metrics else {})


@pytest.fixture
async def app_client(aiohttp_client, tmp_path):
    return await aiohttp_client(create_app(cfg_for(tmp_path)))


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}"""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


async def scrape(client, path: str = "/metrics") -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    r = await client.get(path)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(await r.text())


def by(samples: dict[tuple[tuple[str, str], ...], float], **match: str) -> float:
    return sum(v for labels, v in samples.items() if all((k, v2) in labels for k, v2 in match.items()))


class Ledger:
    """What the client saw: requests by (method, route, status), bytes by route."""

    def __init__(self, client):
        self.client = client
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.bytes_in: dict[str, int] = defaultdict(int)
        self.bytes_out: dict[str, int] = defaultdict(int)

    async def call(self, method: str, route: str, path: str, status: int, body: bytes | None = None,
                   body_len: int | None = None, **kw: Any) -> Any:
        r = await self.client.request(method, path, data=body, **kw)
        data = await r.read()
        assert r.status == status, (method, path, r.status, data[:300])
        self.requests[(method, route, str(status))] += 1
        self.bytes_in[route] += body_len if body_len is not None else len(body or b"")
        self.bytes_out[route] += len(data)
        return r


async def test_exact_counts_after_known_pushes_and_pulls(app_client):
    c, led = app_client, Ledger(app_client)
    await led.call("GET", "base", "/v2/", 200)
    # push: two monolithic blobs, one chunked upload, a manifest
    for data in (CONFIG, LAYER1):
        await led.call("POST", "uploads", f"/v2/{REPO}/blobs/uploads/?digest={sha256(data)}", 201, data)
    r = await led.call("POST", "uploads", f"/v2/{REPO}/blobs/uploads/", 202)
    loc = r.headers["Location"]
    pos = 0
    for part in LAYER2_PARTS:
        r = await led.call("PATCH", "uploads", loc, 202, part,
                           headers={"Content-Range": f"{pos}-{pos + len(part) - 1}"})
        pos += len(part)
        loc = r.headers["Location"]
    await led.call("PUT", "uploads", with_query(loc, digest=sha256(LAYER2)), 201)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": sha256(CONFIG), "size": len(CONFIG)},
           "layers": [{"mediaType": OCI_LAYER, "digest": sha256(x), "size": len(x)} for x in (LAYER1, LAYER2)]}
    manifest = json.dumps(doc).encode()
    r = await led.call("PUT", "manifests", f"/v2/{REPO}/manifests/v1", 201, manifest,
                       headers={"Content-Type": OCI_MANIFEST})
    md = r.headers["Docker-Content-Digest"]
    # pull
    for _ in range(2):
        await led.call("GET", "manifests", f"/v2/{REPO}/manifests/v1", 200)
    await led.call("HEAD", "manifests", f"/v2/{REPO}/manifests/{md}", 200)
    r = await led.call("GET", "blobs", f"/v2/{REPO}/blobs/{sha256(LAYER1)}", 200)
    assert r.content_length == len(LAYER1)
    await led.call("GET", "blobs", f"/v2/{REPO}/blobs/{sha256(LAYER1)}", 206, headers={"Range": "bytes=0-999"})
    await led.call("GET", "blobs", f"/v2/{REPO}/blobs/{sha256(CONFIG)}", 200)
    await led.call("HEAD", "blobs", f"/v2/{REPO}/blobs/{sha256(LAYER2)}", 200)
    await led.call("GET", "blobs", f"/v2/{REPO}/blobs/{sha256(b'nothing')}", 404)
    await led.call("GET", "tags", f"/v2/{REPO}/tags/list", 200)
    await led.call("GET", "catalog", "/v2/_catalog", 200)
    await led.call("GET", "referrers", f"/v2/{REPO}/referrers/{md}", 200)
    await led.call("GET", "none", "/no/such/route", 404)
    await led.call("OPTIONS", "none", "/v2/", 405)

    m = await scrape(c)
    # requests: exactly the ones made, nothing else (the scrape itself is counted once it has been answered)
    got = {tuple(dict(k)[x] for x in ("method", "route", "status")): v
           for k, v in m["registry_http_requests_total"].items()}
    assert got == dict(led.requests)
    assert led.requests[("GET", "blobs", "200")] == 2 and led.requests[("PATCH", "uploads", "202")] == 2
    # durations: one observation per request, per route; buckets cumulative up to +Inf
    for route in {k[1] for k in led.requests}:
        n = sum(v for k, v in led.requests.items() if k[1] == route)
        assert by(m["registry_http_request_duration_seconds_count"], route=route) == n, route
        assert by(m["registry_http_request_duration_seconds_bucket"], route=route, le="+Inf") == n
        assert by(m["registry_http_request_duration_seconds_sum"], route=route) > 0
    # bytes: bodies received and sent, by route (a sendfile pull and a range included)
    for route in ROUTES:
        assert by(m["registry_http_request_bytes_total"], route=route) == led.bytes_in.get(route, 0), route
        assert by(m["registry_http_response_bytes_total"], route=route) == led.bytes_out.get(route, 0), route
    assert led.bytes_in["uploads"] == len(CONFIG) + len(LAYER1) + len(LAYER2)
    assert led.bytes_out["blobs"] > len(LAYER1) + 1000 + len(CONFIG)
    # the store, read at scrape time
    assert m["registry_repositories"][()] == 1
    assert m["registry_manifests"][()] == 1
    assert m["registry_tags"][()] == 1
    assert m["registry_blobs"][()] == 3
    assert m["registry_upload_sessions"][()] == 0
    stored = len(CONFIG) + len(LAYER1) + len(LAYER2) + len(manifest)
    assert m["registry_storage_logical_bytes"][()] == stored
    assert m["registry_storage_physical_bytes"][()] == stored
    assert m["registry_uploads_in_progress"][()] == 0
    assert m["registry_http_requests_in_flight"][()] == 1  # the scrape
    assert m["registry_build_info"]
    assert m["process_cpu_seconds_total"][()] > 0  # process metrics, on the app's own registry
    assert m["process_resident_memory_bytes"][()] > 0

    # the first scrape shows up in the second
    m = await scrape(c)
    assert m["registry_http_requests_total"][(("method", "GET"), ("route", "metrics"), ("status", "200"))] == 1


async def test_labels_are_bounded(app_client):
    c = app_client
    for i in range(5):
        await c.get(f"/v2/scan{i}/blobs/{sha256(str(i).encode())}")
        await c.get(f"/v2/scan{i}/manifests/tag{i}")
        await c.get(f"/random/path/{i}")
        await c.request("OPTIONS", "/v2/")
        await c.request("TRACE", f"/v2/scan{i}/tags/list")
    m = await scrape(c)
    samples = [labels for name, series in m.items() if name.startswith("registry_") for labels in series]
    for labels in samples:
        d = dict(labels)
        assert "repository" not in d  # off by default
        assert d.get("route", "base") in ROUTES
        assert d.get("method", "GET") in {"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"}
        assert all("/" not in v for k, v in labels if k != "le"), labels  # never a raw path
    assert by(m["registry_http_requests_total"], method="OPTIONS", route="none", status="405") == 5
    assert by(m["registry_http_requests_total"], method="other", route="none", status="405") == 5
    assert by(m["registry_http_requests_total"], route="none", status="404") == 5
    assert by(m["registry_http_requests_total"], route="blobs", status="404") == 5


def test_unknown_methods_share_one_label():
    """aiohttp refuses made-up method tokens itself; any other method it lets through is "other"."""
    from registry.config import load
    from registry.metrics import Metrics
    m = Metrics(load(None, environ={}))
    for method in ("PROPFIND", "MKCOL", "LOCK", "GET"):
        m.record(method, "base", 405, 0.001, 0, 0, None)
    samples = parse(m.expose()[0].decode())["registry_http_requests_total"]
    assert {dict(k)["method"]: v for k, v in samples.items()} == {"other": 3, "GET": 1}


async def test_repository_labels_opt_in_with_a_cap(aiohttp_client, tmp_path):
    c = await aiohttp_client(create_app(cfg_for(tmp_path, repository_labels=True, max_repositories=2)))
    for repo in ("team/a", "team/b", "team/c", "team/d"):
        data = repo.encode() * 10
        r = await c.post(f"/v2/{repo}/blobs/uploads/?digest={sha256(data)}", data=data)
        assert r.status == 201
    r = await c.get(f"/v2/team/a/blobs/{sha256(b'team/a' * 10)}")
    assert r.status == 200
    r = await c.get("/v2/made-up/blobs/" + sha256(b"x"))  # an error never takes a slot
    assert r.status == 404
    m = await scrape(c)
    reqs = {dict(k)["repository"]: v for k, v in m["registry_repository_requests_total"].items()}
    assert reqs == {"team/a": 2, "team/b": 1, "_other": 3}
    sent = {dict(k)["repository"]: v for k, v in m["registry_repository_response_bytes_total"].items()}
    assert sent["team/a"] == 60
    received = {dict(k)["repository"]: v for k, v in m["registry_repository_request_bytes_total"].items()}
    assert received == {"team/a": 60, "team/b": 60, "_other": 120}


async def test_uploads_in_progress_while_a_chunk_streams(app_client):
    c = app_client
    loc = await start_upload(c, "ops/slow")
    go = asyncio.Event()

    async def body():
        yield b"x" * 1000
        await go.wait()
        yield b"y" * 1000

    patch = asyncio.create_task(c.patch(loc, data=body()))
    for _ in range(200):
        m = await scrape(c)
        if m["registry_uploads_in_progress"][()] == 1:
            break
        await asyncio.sleep(0.01)
    assert m["registry_uploads_in_progress"][()] == 1
    assert m["registry_http_requests_in_flight"][()] == 2  # the PATCH and the scrape
    assert m["registry_upload_sessions"][()] == 1
    go.set()
    r = await patch
    assert r.status == 202 and r.headers["Range"] == "0-1999"
    m = await scrape(c)
    assert m["registry_uploads_in_progress"][()] == 0
    assert m["registry_http_requests_in_flight"][()] == 1


async def test_each_app_has_its_own_registry(aiohttp_client, tmp_path):
    a = await aiohttp_client(create_app(cfg_for(tmp_path / "a")))
    b = await aiohttp_client(create_app(cfg_for(tmp_path / "b")))
    for _ in range(3):
        assert (await a.get("/v2/")).status == 200
    ma, mb = await scrape(a), await scrape(b)
    assert by(ma["registry_http_requests_total"], route="base") == 3
    assert by(mb["registry_http_requests_total"], route="base") == 0


async def test_metrics_path_and_switch(aiohttp_client, tmp_path):
    c = await aiohttp_client(create_app(cfg_for(tmp_path / "a", path="/internal/metrics")))
    assert (await c.get("/metrics")).status == 404
    await scrape(c, "/internal/metrics")
    c = await aiohttp_client(create_app(cfg_for(tmp_path / "b", enable=False)))
    assert (await c.get("/metrics")).status == 404
    assert (await c.get("/v2/")).status == 200  # everything else still works, request ids included
    assert (await c.get("/v2/")).headers["X-Request-Id"]


async def test_openmetrics_when_asked(app_client):
    r = await app_client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await r.text()).rstrip().endswith("# EOF")


# -- request ids


async def test_request_id_generated_returned_and_honoured(app_client):
    c = app_client
    ids = set()
    for path in ("/v2/", "/v2/", f"/v2/{REPO}/blobs/{sha256(b'none')}", "/nowhere"):
        r = await c.get(path)
        rid = r.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", rid), rid
        ids.add(rid)
    assert len(ids) == 4
    r = await c.head(f"/v2/{REPO}/blobs/{sha256(b'none')}")
    assert r.headers["X-Request-Id"]
    r = await c.get("/v2/", headers={"X-Request-Id": "lb-7f3a:42"})
    assert r.headers["X-Request-Id"] == "lb-7f3a:42"
    r = await c.get("/v2/", headers={"X-Request-Id": "x" * 500})  # not sane: replaced
    assert r.headers["X-Request-Id"] != "x" * 500
    r = await c.get("/v2/", headers={"X-Request-Id": "two words"})
    assert r.headers["X-Request-Id"] != "two words"


async def test_documented_and_dashboard_metrics_exist(aiohttp_client, tmp_path):
    """Every metric the README documents and the Grafana dashboard queries is served."""
    root = Path(__file__).resolve().parent.parent
    c = await aiohttp_client(create_app(cfg_for(tmp_path, repository_labels=True)))
    data = b"doc"
    assert (await c.post(f"/v2/doc/a/blobs/uploads/?digest={sha256(data)}", data=data)).status == 201
    await scrape(c)
    names = set(await scrape(c))
    readme = (root / "README.md").read_text().split("## Metrics", 1)[1]
    documented = set(re.findall(r"^\| `((?:registry|process)_[a-z_]+)`", readme, re.M))
    assert len(documented) >= 15
    dashboard = json.loads((root / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried = {n for e in exprs for n in re.findall(r"\b((?:registry|process)_[a-z_]+)", e)}
    assert queried
    for name in documented | queried:
        assert name in names or f"{name}_count" in names, name
    prometheus_example = (root / "deploy" / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in prometheus_example
