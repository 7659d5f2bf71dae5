"""The outermost middleware: request id, metrics and the access log.

It gives each request an id (an incoming ``X-Request-Id`` is kept when it is
sane), returns it in the ``X-Request-Id`` header, and, once the handler has
answered, records the request in the metrics and writes one access-log line.
A response held in memory is as good as sent at that point; a file sent with
sendfile (a blob pull) takes its time afterwards, so the middleware sends
that one itself (``prepare`` and ``write_eof``) before it measures, and
aiohttp's own send that follows finds nothing left to do.

Hot path: a perf_counter pair, a header lookup, a cached route label, the
cached metric children (registry/metrics.py) and, only when the
``registry.access`` logger is enabled, one log record.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
from time import perf_counter
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource

from registry.logs import ACCESS_LOGGER
from registry.metrics import Metrics, route_family

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = web.RequestKey("request_id", str)
_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}").fullmatch
_QUIET_ROUTES = frozenset({"healthz", "readyz", "metrics"})  # probes and scrapes log at debug level
_UPLOAD_METHODS = frozenset({"POST", "PATCH", "PUT"})
access_log = logging.getLogger(ACCESS_LOGGER)
log = logging.getLogger("registry.api")


class Observer:
    """The middleware's state: requests in flight (for shutdown and the gauges) and the route labels."""

    def __init__(self, metrics: Metrics | None, metrics_path: str):
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.in_flight = 0
        self.uploads_in_progress = 0
        self.draining = False  # shutting down: every response closes its connection
        self._routes: dict[AbstractResource | None, str] = {None: "none"}
        self._prefix = os.urandom(6).hex()
        self._ids = itertools.count(1)
        if metrics is not None:
            metrics.track_in_flight(lambda: self.in_flight, lambda: self.uploads_in_progress)

    async def drain(self, timeout: float) -> int:
        """Shutdown: wait up to ``timeout`` seconds for the requests in flight to be answered
        (while their connections keep reading: an upload can finish). Returns how many remain."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))
        return self.in_flight

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids):x}"

    def route_of(self, request: web.Request) -> str:
        resource = request.match_info.route.resource
        label = self._routes.get(resource)
        if label is None:
            label = self._routes[resource] = route_family(resource.canonical, self.metrics_path)  # type: ignore[union-attr]
        return label

    def middleware(self) -> Any:
        metrics = self.metrics
        record = metrics.record if metrics is not None else None
        new_id, route_of = self.new_id, self.route_of

        @web.middleware
        async def observe(request: web.Request, handler: Any) -> web.StreamResponse:
            start = perf_counter()
            rid = request.headers.get(REQUEST_ID_HEADER)
            if rid is None or not _SANE_ID(rid):
                rid = new_id()
            request[REQUEST_ID] = rid
            route = route_of(request)
            method = request.method
            upload = route == "uploads" and method in _UPLOAD_METHODS
            self.in_flight += 1
            if upload:
                self.uploads_in_progress += 1
            status, resp = 500, None
            try:
                try:
                    resp = await handler(request)
                except web.HTTPException as exc:  # a redirect or an error no inner middleware rendered
                    status = exc.status
                    exc.headers[REQUEST_ID_HEADER] = rid
                    raise
                except asyncio.CancelledError:
                    status = 499  # the client went away, or shutdown cancelled the handler
                    raise
                resp.headers[REQUEST_ID_HEADER] = rid
                if self.draining:
                    resp.force_close()
                if type(resp) is web.FileResponse:  # sendfile: the time and bytes that matter come after
                    await _send(request, resp)  # (and the status: 206, 304, 416 are decided there)
                status = resp.status
                return resp
            finally:
                self.in_flight -= 1
                if upload:
                    self.uploads_in_progress -= 1
                seconds = perf_counter() - start
                bytes_in = request.content.total_bytes
                bytes_out = _bytes_out(method, resp) if resp is not None else 0
                if record is not None:
                    record(method, route, status, seconds, bytes_in, bytes_out,
                           request.match_info.get("name") if route != "none" else None)
                level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO
                if access_log.isEnabledFor(level):
                    _access_line(level, request, rid, route, status, seconds, bytes_in, bytes_out, resp)

        return observe


class _SentFileResponse(web.FileResponse):
    """A FileResponse whose second ``prepare`` is a no-op, as StreamResponse's is: the
    middleware sends it, then aiohttp calls ``prepare`` and ``write_eof`` again."""

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self.prepared:
            return self._payload_writer
        return await super().prepare(request)


async def _send(request: web.Request, resp: web.FileResponse) -> None:
    """Send a file response now (aiohttp's send afterwards finds it done)."""
    resp.__class__ = _SentFileResponse
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        pass  # the client went away mid-response: aiohttp notices again and drops the connection
    except Exception:
        # Headers may be out already: no error response is possible, only closing the connection.
        log.exception("sending the response to %s %s failed", request.method, request.path)
        resp.force_close()
        if request.transport is not None:
            request.transport.close()


def _bytes_out(method: str, resp: web.StreamResponse) -> int:
    if method == "HEAD" or resp.status in (204, 304):
        return 0
    n = resp.content_length  # sendfile bytes never pass through the writer's counters
    return n if n is not None else resp.body_length


def _access_line(level: int, request: web.Request, rid: str, route: str, status: int, seconds: float,
                 bytes_in: int, bytes_out: int, resp: web.StreamResponse | None) -> None:
    mi = request.match_info
    repository = mi.get("name") if route != "none" else None
    digest = resp.headers.get("Docker-Content-Digest") if resp is not None else None
    if digest is None:
        digest = mi.get("digest") or request.query.get("digest")
        ref = mi.get("reference")
        if digest is None and ref is not None and ":" in ref:
            digest = ref
    duration_ms = round(seconds * 1000, 3)
    path = request.path
    access_log.log(level, "%s %s %d %dB %.1fms", request.method, path, status, bytes_out, duration_ms,
                   extra={"request_id": rid, "method": request.method, "path": path,
                          "query": request.query_string or None, "route": route, "repository": repository,
                          "digest": digest, "status": status, "bytes_in": bytes_in, "bytes_out": bytes_out,
                          "duration_ms": duration_ms, "remote": request.remote})
