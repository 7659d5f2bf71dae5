"""Run the app: listening socket, default executor, signals, graceful shutdown."""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from registry.app import create_app
from registry.config import Config

log = logging.getLogger("registry")
SHUTDOWN_TIMEOUT = 30.0
# Blocking file work (fsync above all) runs here; a large pool lets many pushes fsync at once.
EXECUTOR_THREADS = 64
# Request bodies are read in pieces up to this size: fewer wake-ups per GiB pushed.
READ_BUFSIZE = 1 << 20


def _ssl_context(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.http.tls.cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.http.tls.cert, cfg.http.tls.key)
    return ctx


async def serve(cfg: Config, *, ready_message: bool = True) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=EXECUTOR_THREADS, thread_name_prefix="io"))
    app = create_app(cfg)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT,
                           read_bufsize=READ_BUFSIZE)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.http.address, cfg.http.port, ssl_context=_ssl_context(cfg),
                           reuse_port=cfg.http.workers > 1, backlog=1024)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    port = sockets[0].getsockname()[1] if sockets else cfg.http.port
    if ready_message:
        scheme = "https" if cfg.http.tls.cert else "http"
        print(f"registry: serving {scheme}://{cfg.http.address}:{port} from {cfg.root.resolve()}",
              file=sys.stderr, flush=True)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
