"""Runs background jobs on their interval. A job is a plain async function
returning a result record; the CLI runs the same function once."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Call ``job`` every ``interval()`` seconds (0: never) until stopped; a new
    interval (SIGHUP) takes effect at once through ``wake()``."""

    def __init__(self, name: str, job: Callable[[], Awaitable[Any]], interval: Callable[[], float],
                 on_result: Callable[[Any], None] | None = None):
        self.name = name
        self.job = job
        self.interval = interval
        self.on_result = on_result
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_run = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"periodic-{self.name}")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            interval = self.interval()
            wait = None if interval <= 0 else max(0.0, self.last_run + interval - time.monotonic())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
                continue  # settings changed: recompute the wait
            except asyncio.TimeoutError:
                pass
            self.last_run = time.monotonic()
            try:
                result = await self.job()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed run is logged; the next one is tried on schedule
                log.exception("%s: run failed", self.name)
                continue
            if self.on_result is not None and result is not None:
                self.on_result(result)
