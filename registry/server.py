"""Run the app: listening socket, default executor, signals, graceful shutdown."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiohttp import web

from registry.app import create_app
from registry.config import Config, ConfigError
from registry.keys import OBSERVER, TUNABLES
from registry import reload

log = logging.getLogger("registry")
SHUTDOWN_TIMEOUT = 30.0  # the default of http.shutdownTimeout
SHUTDOWN_GRACE = 1.0  # after the drain: for responses still being written, then requests are cancelled
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


def _on_reload(app: web.Application, running: list[Config], reload_config: Callable[[], Config]) -> None:
    """SIGHUP: re-read the config; apply the safe changes, log them and what needs a restart."""
    try:
        new = reload_config()
    except ConfigError as exc:
        log.error("SIGHUP: the new configuration is not valid, keeping the running one: %s", exc)
        return
    result = reload.apply(running[0], new, app[TUNABLES])
    running[0] = reload.effective(running[0], new, result)
    # Said even when the log level hides info lines: an operator asked for this.
    level = logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING
    log.log(level, "SIGHUP: configuration reloaded: %s", reload.describe(result),
            extra={"applied": sorted(result.applied), "ignored": sorted(result.ignored)})


async def serve(cfg: Config, *, ready_message: bool = True,
                reload_config: Callable[[], Config] | None = None, background: bool = True) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, let requests in flight finish within
    http.shutdownTimeout (then cancel them), and run the app's cleanup. A second signal exits
    at once. SIGHUP calls ``reload_config`` (which re-reads the file the server started with)."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=EXECUTOR_THREADS, thread_name_prefix="io"))
    app = create_app(cfg, background=background)
    timeout = float(cfg.http.shutdown_timeout)
    # aiohttp's own graceful shutdown stops reading from every connection at once, so an upload
    # in flight could never finish: the requests in flight are drained first (see below), and
    # aiohttp's shutdown only gets a short grace for responses still being written.
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=min(timeout, SHUTDOWN_GRACE), read_bufsize=READ_BUFSIZE)
    try:
        await runner.setup()
    except BaseException:  # a cleanup context failed to start: close the ones that did (storage...)
        await runner.cleanup()
        raise
    try:
        site = web.TCPSite(runner, cfg.http.address, cfg.http.port, ssl_context=_ssl_context(cfg),
                           reuse_port=cfg.http.workers > 1, backlog=1024)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    stop = asyncio.Event()

    def on_stop(name: str) -> None:
        if stop.is_set():
            log.warning("%s again: exiting now, without waiting for requests in flight", name)
            logging.shutdown()
            os._exit(1)
        log.info("%s received", name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_stop, sig.name)
    if reload_config is not None:
        signals += (signal.SIGHUP,)
        loop.add_signal_handler(signal.SIGHUP, _on_reload, app, [cfg], reload_config)
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    port = sockets[0].getsockname()[1] if sockets else cfg.http.port
    if ready_message:
        scheme = "https" if cfg.http.tls.cert else "http"
        print(f"registry: serving {scheme}://{cfg.http.address}:{port} from {cfg.root.resolve()}",
              file=sys.stderr, flush=True)
    try:
        await stop.wait()
        observer = app[OBSERVER]
        log.info("shutting down: no longer accepting connections; waiting up to %gs for %d requests in flight",
                 timeout, observer.in_flight)
        await site.stop()  # close the listening socket; open connections go on
        left = await observer.drain(timeout)
        if left:
            log.warning("shutting down: %d requests still in flight after %gs, cancelling them", left, timeout)
        await runner.cleanup()  # close idle connections, run the app's cleanup (stores, background jobs)
        log.info("stopped")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
