"""The real server process (issue 8): each example config serves; SIGTERM stops accepting,
lets requests in flight finish and exits 0; an upload interrupted by shutdown resumes
after a restart; SIGHUP re-reads the config file and changes the log level."""
from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import sha256
from tests.helpers import with_query

EXAMPLES = Path(__file__).resolve().parent.parent / "config"
READY = re.compile(r"registry: serving (https?)://(\S+):(\d+) from (.+)$")
DATA = bytes((i * 13 + 5) % 256 for i in range(300_000))


class Server:
    """``python -m registry serve`` in a subprocess; stderr is collected line by line."""

    def __init__(self, root: Path, config: Path | None = None, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()):
        base = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        cmd = [sys.executable, "-m", "registry", "serve", "--root", str(root), "--port", "0",
               "--address", "127.0.0.1", *args]
        if config is not None:
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**base, **(env or {})})
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = 0
        deadline = time.monotonic() + 30
        while not self.port:
            line = self.next_line(deadline - time.monotonic())
            if line is None:
                raise AssertionError(f"server exited before serving:\n{self.text()}")
            m = READY.search(line)
            if m:
                self.port = int(m.group(3))
        self.url = f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def next_line(self, timeout: float) -> str | None:
        try:
            line = self._q.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            raise AssertionError(f"no output within {timeout:.0f}s:\n{self.text()}") from None
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(self, pattern: str, timeout: float = 15) -> str:
        for line in self.lines:
            if re.search(pattern, line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(deadline - time.monotonic())
            if line is None:
                raise AssertionError(f"exited without logging {pattern!r}:\n{self.text()}")
            if re.search(pattern, line):
                return line

    def drain(self, seconds: float = 0.3) -> None:
        """Collect what was logged in the next moment."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                return
            self.lines.append(line)

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def text(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self.drain(0.2)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(*a: Any, **kw: Any) -> Server:
        s = Server(*a, **kw)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


# -- each example config


@pytest.mark.parametrize("name", ["embedded.yaml", "s3-postgres.yaml", "replicas.yaml"])
async def test_example_config_serves(name, servers, tmp_path, request):
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    env = {}
    if doc.get("meta", {}).get("driver") == "postgres":
        # the file's host is an example; the test's server comes in as the environment would bring it
        env = {"REGISTRY_META_POSTGRES_DSN": request.getfixturevalue("pg_dsn"),
               "REGISTRY_META_POSTGRES_SCHEMA": request.getfixturevalue("pg_schema"),
               "REGISTRY_META_POSTGRES_SSLMODE": "disable"}
    s = servers(tmp_path / "data", EXAMPLES / name, env=env)
    async with aiohttp.ClientSession() as http:
        async with http.get(s.url + "/v2/") as r:
            assert r.status == 200
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        async with http.post(f"{s.url}/v2/ex/app/blobs/uploads/?digest={sha256(b'hello')}", data=b"hello") as r:
            assert r.status == 201, await r.text()
        async with http.get(f"{s.url}/v2/ex/app/blobs/{sha256(b'hello')}") as r:
            assert await r.read() == b"hello"
        async with http.get(s.url + "/readyz") as r:
            assert r.status == 200
        async with http.get(s.url + doc["extensions"]["metrics"]["path"]) as r:
            assert r.status == 200 and "registry_http_requests_total" in await r.text()
    s.signal(signal.SIGTERM)
    assert s.wait() == 0, s.text()
    if doc["log"]["format"] == "json":  # stderr is a pipe here, so "auto" is JSON too
        assert any(d.get("logger") == "registry.access" for d in s.json_lines())


# -- SIGTERM


async def test_sigterm_during_a_chunked_upload_then_resume_after_restart(servers, tmp_path):
    root = tmp_path / "data"
    s = servers(root)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/v2/sig/term/blobs/uploads/") as r:
            assert r.status == 202
            loc = r.headers["Location"]
        async with http.patch(s.url + loc, data=DATA[:100_000], headers={"Content-Range": "0-99999"}) as r:
            assert r.status == 202 and r.headers["Range"] == "0-99999"
    s.signal(signal.SIGTERM)
    assert s.wait() == 0, s.text()
    s.wait_for("shutting down")
    s.wait_for("stopped")

    s2 = servers(root)
    async with aiohttp.ClientSession() as http:
        async with http.get(s2.url + loc) as r:
            assert r.status == 204
            assert r.headers["Range"] == "0-99999"
        async with http.patch(s2.url + loc, data=DATA[100_000:200_000],
                              headers={"Content-Range": "100000-199999"}) as r:
            assert r.status == 202 and r.headers["Range"] == "0-199999"
        async with http.put(with_query(s2.url + loc, digest=sha256(DATA)), data=DATA[200_000:]) as r:
            assert r.status == 201, await r.text()
            assert r.headers["Docker-Content-Digest"] == sha256(DATA)
        async with http.get(f"{s2.url}/v2/sig/term/blobs/{sha256(DATA)}") as r:
            body = await r.read()
            assert r.status == 200 and body == DATA and sha256(body) == r.headers["Docker-Content-Digest"]


async def test_sigterm_lets_a_request_in_flight_finish_and_refuses_new_ones(servers, tmp_path):
    root = tmp_path / "data"
    s = servers(root)
    go = asyncio.Event()

    async def body():
        yield DATA[:50_000]
        await go.wait()
        yield DATA[50_000:120_000]

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/v2/sig/flight/blobs/uploads/") as r:
            loc = r.headers["Location"]
        patch = asyncio.create_task(http.patch(s.url + loc, data=body()))
        await asyncio.sleep(0.5)  # the PATCH is being received
        s.signal(signal.SIGTERM)
        await asyncio.to_thread(s.wait_for, "shutting down.* 1 requests in flight")
        # the listening socket is closed: a new connection is refused
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as other:
                await other.get(s.url + "/v2/")
        go.set()
        r = await patch
        assert r.status == 202 and r.headers["Range"] == "0-119999"
        r.release()
    assert await asyncio.to_thread(s.wait) == 0, s.text()

    s2 = servers(root)
    async with aiohttp.ClientSession() as http:
        async with http.get(s2.url + loc) as r:
            assert r.headers["Range"] == "0-119999"
        async with http.put(with_query(s2.url + loc, digest=sha256(DATA)), data=DATA[120_000:]) as r:
            assert r.status == 201, await r.text()


async def test_shutdown_timeout_cancels_a_stalled_upload_which_resumes_after_restart(servers, tmp_path):
    """A client that stops sending cannot hold the shutdown beyond http.shutdownTimeout; the chunk
    it left unfinished is dropped, and the upload resumes from the last complete one."""
    root = tmp_path / "data"
    s = servers(root, env={"REGISTRY_HTTP_SHUTDOWNTIMEOUT": "1s"})
    stall = asyncio.Event()

    async def body():
        yield DATA[50_000:60_000]
        await stall.wait()  # never set: the client hangs mid-chunk

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/v2/sig/stall/blobs/uploads/") as r:
            loc = r.headers["Location"]
        async with http.patch(s.url + loc, data=DATA[:50_000]) as r:
            assert r.headers["Range"] == "0-49999"
        patch = asyncio.create_task(http.patch(s.url + loc, data=body()))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        s.signal(signal.SIGTERM)
        assert await asyncio.to_thread(s.wait) == 0, s.text()
        assert time.monotonic() - started < 10
        patch.cancel()
        try:
            await patch
        except (asyncio.CancelledError, aiohttp.ClientError):
            pass

    s2 = servers(root)
    async with aiohttp.ClientSession() as http:
        async with http.get(s2.url + loc) as r:
            assert r.status == 204 and r.headers["Range"] == "0-49999"
        async with http.put(with_query(s2.url + loc, digest=sha256(DATA)), data=DATA[50_000:]) as r:
            assert r.status == 201, await r.text()
        async with http.get(f"{s2.url}/v2/sig/stall/blobs/{sha256(DATA)}") as r:
            assert await r.read() == DATA


# -- SIGHUP


async def test_sighup_changes_the_log_level(servers, tmp_path):
    cfg_path = write_config(tmp_path / "registry.yaml", {"log": {"level": "warning", "format": "json"},
                                                          "storage": {"commit": False, "gcInterval": "24h"}})
    s = servers(tmp_path / "data", cfg_path)
    async with aiohttp.ClientSession() as http:
        async with http.get(s.url + "/v2/", headers={"X-Request-Id": "before-hup"}) as r:
            assert r.status == 200
    s.drain(0.5)
    assert "before-hup" not in s.text()  # warning level: no access lines

    write_config(cfg_path, {"log": {"level": "info", "format": "json"},
                            "storage": {"commit": False, "gcInterval": "2h", "dedupe": False}})
    s.signal(signal.SIGHUP)
    line = json.loads(s.wait_for("configuration reloaded"))
    assert line["applied"] == ["log.level", "storage.gcInterval"]
    assert line["ignored"] == ["storage.dedupe"]
    assert "'warning' -> 'info'" in line["message"] and "needs a restart" in line["message"]

    async with aiohttp.ClientSession() as http:
        async with http.get(s.url + "/v2/", headers={"X-Request-Id": "after-hup"}) as r:
            assert r.status == 200
    access = json.loads(s.wait_for("after-hup"))
    assert access["logger"] == "registry.access" and access["level"] == "info"
    assert access["request_id"] == "after-hup" and access["status"] == 200 and access["path"] == "/v2/"

    # a broken file: logged, the running config stays, the server keeps serving
    cfg_path.write_text("log: {level: loud}\n")
    s.signal(signal.SIGHUP)
    err = json.loads(s.wait_for("not valid"))
    assert err["level"] == "error" and "log.level" in err["message"]
    async with aiohttp.ClientSession() as http:
        async with http.get(s.url + "/v2/", headers={"X-Request-Id": "still-" + uuid.uuid4().hex[:6]}) as r:
            assert r.status == 200
    s.wait_for("still-")
    s.signal(signal.SIGTERM)
    assert s.wait() == 0


async def test_a_second_signal_exits_at_once(servers, tmp_path):
    s = servers(tmp_path / "data")  # shutdownTimeout: the default 30s
    stall = asyncio.Event()

    async def body():
        yield b"x" * 1000
        await stall.wait()

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/v2/sig/twice/blobs/uploads/") as r:
            loc = r.headers["Location"]
        patch = asyncio.create_task(http.patch(s.url + loc, data=body()))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        s.signal(signal.SIGTERM)
        await asyncio.to_thread(s.wait_for, "shutting down")
        s.signal(signal.SIGINT)
        assert await asyncio.to_thread(s.wait) == 1
        assert time.monotonic() - started < 10
        assert "SIGINT again: exiting now" in s.text()
        patch.cancel()
        try:
            await patch
        except (asyncio.CancelledError, aiohttp.ClientError):
            pass
