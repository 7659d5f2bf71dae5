"""Operations endpoints: GET /healthz (the process is up), GET /readyz (the
metadata store answers and the storage is reachable and writable), GET /metrics
(Prometheus text format; the path is extensions.metrics.path)."""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from registry.errors import RegistryError
from registry.keys import METRICS, SERVICES
from registry.storage.base import NotFound

log = logging.getLogger("registry.api")
CHECK_TIMEOUT = 5.0
PROBE_KEY = "_registry/readyz"


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _check_meta(svc: Any) -> None:
    await svc.meta.repo_exists("readyz")  # a trivial indexed query


def _probe_dir(root: Path) -> None:
    """The storage root exists and a file can be created in it (then removed)."""
    if not root.is_dir():
        raise OSError(f"{root} is not a directory")
    probe = root / f".readyz-{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.unlink(probe)


async def _check_storage(svc: Any) -> None:
    root = svc.storage.local_path("_uploads")
    if root is not None:  # a local disk: the upload area must take new files
        await asyncio.get_running_loop().run_in_executor(None, _probe_dir, Path(root))
        return
    try:  # a remote store: any answer, found or not, shows it is reachable
        await svc.storage.stat(PROBE_KEY)
    except NotFound:
        pass


async def _run_check(name: str, check: Any, svc: Any) -> str | None:
    try:
        await asyncio.wait_for(check(svc), CHECK_TIMEOUT)
    except asyncio.TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g}s"
    except Exception as exc:  # any failure means not ready; the reason goes to the body and the log
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


async def readyz(request: web.Request) -> web.Response:
    svc = request.app.get(SERVICES)
    if svc is None:
        problems = {"registry": "starting"}
    else:
        results = await asyncio.gather(_run_check("meta", _check_meta, svc),
                                       _run_check("storage", _check_storage, svc))
        problems = {k: v for k, v in zip(("meta", "storage"), results) if v is not None}
    if problems:
        log.warning("not ready: %s", "; ".join(f"{k}: {v}" for k, v in problems.items()))
        raise RegistryError("UNAVAILABLE", problems, status=503, headers={"Retry-After": "5"})
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    svc = request.app.get(SERVICES)
    if svc is not None:
        await m.refresh_store(svc.meta)
    body, content_type = m.expose(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})
