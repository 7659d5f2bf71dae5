"""Logs (issue 8): JSON lines (time, level, logger, message, extra fields), text on a
terminal, one access-log line per request with its id, repository, digest, status, bytes
and duration; SIGHUP's reload logic (applied vs needs-a-restart)."""
from __future__ import annotations

import io
import json
import logging

import pytest

from registry import logs, reload
from registry.app import create_app
from registry.config import load
from registry.keys import TUNABLES
from tests.conftest import make_config, sha256

ACCESS_FIELDS = {"request_id", "method", "path", "repository", "digest", "status", "bytes_in", "bytes_out",
                 "duration_ms"}


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines(restore_logging):
    out = io.StringIO()
    logs.setup_logging("debug", "json", out)
    log = logging.getLogger("registry.test")
    log.info("pushed %s", "x", extra={"repository": "a/b", "size": 3, "obj": object()})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["level"] == "info" and first["logger"] == "registry.test" and first["message"] == "pushed x"
    assert first["repository"] == "a/b" and first["size"] == 3 and first["obj"].startswith("<object")
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_text_on_a_terminal_json_otherwise(restore_logging):
    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True
    tty = TTY()
    logs.setup_logging("info", "auto", tty)
    logging.getLogger("registry.test").warning("hello %d", 1, extra={"repository": "a b"})
    line = tty.getvalue()
    assert " WARNING " in line and "registry.test: hello 1" in line and 'repository="a b"' in line
    pipe = io.StringIO()
    logs.setup_logging("info", "auto", pipe)
    logging.getLogger("registry.test").warning("hello")
    assert json.loads(pipe.getvalue())["message"] == "hello"
    assert len([h for h in logging.getLogger().handlers if isinstance(h, logs._Handler)]) == 1


def test_level_is_respected_and_can_change(restore_logging):
    out = io.StringIO()
    logs.setup_logging("warning", "json", out)
    log = logging.getLogger("registry.test")
    log.info("hidden")
    logs.set_level("debug")
    log.debug("shown")
    assert [json.loads(x)["message"] for x in out.getvalue().splitlines()] == ["shown"]
    with pytest.raises(ValueError):
        logs.set_level("loud")


async def test_one_access_line_per_request(aiohttp_client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="registry.access")
    c = await aiohttp_client(create_app(make_config(tmp_path / "data", storage={"commit": False})))
    data = b"layer bytes" * 100
    d = sha256(data)
    r = await c.post(f"/v2/ops/logs/blobs/uploads/?digest={d}", data=data, headers={"X-Request-Id": "push-1"})
    assert r.status == 201
    r = await c.get(f"/v2/ops/logs/blobs/{d}")
    pull_id = r.headers["X-Request-Id"]
    assert await r.read() == data
    await c.get("/v2/ops/logs/manifests/nope")
    await c.get("/healthz")

    records = [r for r in caplog.records if r.name == "registry.access"]
    assert len(records) == 4
    push, pull, missing, probe = records
    for rec in records:
        assert ACCESS_FIELDS <= set(vars(rec)), vars(rec)
        assert rec.duration_ms > 0
    assert (push.request_id, push.method, push.path, push.repository, push.digest, push.status, push.bytes_in,
            push.bytes_out, push.levelno) == ("push-1", "POST", "/v2/ops/logs/blobs/uploads/", "ops/logs", d, 201,
                                               len(data), 0, logging.INFO)
    assert push.query == f"digest={d}"
    assert (pull.request_id, pull.method, pull.repository, pull.digest, pull.status, pull.bytes_in,
            pull.bytes_out) == (pull_id, "GET", "ops/logs", d, 200, 0, len(data))
    assert (missing.status, missing.repository, missing.digest) == (404, "ops/logs", None)
    assert missing.bytes_out > 0  # the JSON error body
    assert probe.path == "/healthz" and probe.levelno == logging.DEBUG  # probes stay out of info logs


def test_json_access_line_is_one_object(restore_logging):
    out = io.StringIO()
    logs.setup_logging("info", "json", out)
    logging.getLogger("registry.access").info("GET /v2/ 200", extra={
        "request_id": "r1", "method": "GET", "path": "/v2/", "repository": None, "digest": None, "status": 200,
        "bytes_in": 0, "bytes_out": 2, "duration_ms": 0.2})
    doc = json.loads(out.getvalue())
    assert ACCESS_FIELDS <= set(doc) and doc["logger"] == "registry.access"


# -- what SIGHUP applies


def test_reload_applies_safe_keys_and_lists_the_rest(restore_logging):
    logs.setup_logging("info", "json", io.StringIO())
    old = load(None, environ={})
    tunables = reload.Tunables.from_config(old)
    seen = []
    tunables.subscribe(lambda t: seen.append(t.gc_interval))
    new = load(None, environ={"REGISTRY_LOG_LEVEL": "debug", "REGISTRY_STORAGE_GCINTERVAL": "2h",
                              "REGISTRY_EXTENSIONS_SCRUB_BYTESPERSECOND": "10MiB",
                              "REGISTRY_STORAGE_DEDUPE": "false", "REGISTRY_HTTP_PORT": "6000",
                              "REGISTRY_META_POSTGRES_PASSWORD": "s3cret"})
    result = reload.apply(old, new, tunables)
    assert set(result.applied) == {"log.level", "storage.gcInterval", "extensions.scrub.bytesPerSecond"}
    assert set(result.ignored) == {"storage.dedupe", "http.port", "meta.postgres.password"}
    assert logging.getLogger().level == logging.DEBUG
    assert tunables.gc_interval == 7200 and tunables.scrub.bytes_per_second == 10 << 20
    assert tunables.generation == 1 and seen == [7200]
    text = reload.describe(result)
    assert "log.level: 'info' -> 'debug'" in text and "needs a restart" in text and "http.port" in text
    assert "s3cret" not in text and "'***'" in text
    # the running config keeps what needs a restart: a second reload reports it again, applies nothing new
    running = reload.effective(old, new, result)
    assert running.log.level == "debug" and running.storage.dedupe is True and running.http.port == 5000
    again = reload.apply(running, new, tunables)
    assert not again.applied and set(again.ignored) == set(result.ignored)
    assert tunables.generation == 1


async def test_app_holds_tunables(aiohttp_client, tmp_path):
    app = create_app(make_config(tmp_path / "data", storage={"gc_interval": 600}))
    assert app[TUNABLES].gc_interval == 600 and app[TUNABLES].scrub.enable is True
