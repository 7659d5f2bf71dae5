"""Structured logs: one JSON object per line (time, level, logger, message and
any ``extra`` fields), or a readable text line on a terminal.

``setup_logging`` installs one handler on the root logger; ``set_level`` and
``set_format`` change it in place (SIGHUP). Access-log lines come from the
request middleware (registry/api/observe.py) on the ``registry.access`` logger.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

ACCESS_LOGGER = "registry.access"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}
# Attributes every LogRecord has: anything else on a record came in through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def level_number(name: str) -> int:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r} (expected one of {', '.join(LEVELS)})") from None


_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-01-02T03:04:05.678Z (the seconds part is cached)."""
    global _second
    sec = int(created)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{int((created - sec) * 1000):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


# One encoder for every line: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(default=str, separators=(",", ":"), check_circular=False).encode


class JSONFormatter(logging.Formatter):
    """One JSON object per line; values that are not JSON types are written with str()."""

    def format(self, record: logging.LogRecord) -> str:
        d = record.__dict__
        out: dict[str, Any] = {"time": _timestamp(record.created), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        for k, v in d.items():  # the extra= fields, in the order given
            if k not in _STANDARD and k[0] != "_":
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _encode(out)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items() if v is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


def make_formatter(fmt: str, stream: IO[str] | None = None) -> logging.Formatter:
    """``json``, ``text``, or ``auto``: text when the stream is a terminal, JSON otherwise."""
    fmt = fmt.lower()
    if fmt == "auto":
        isatty = getattr(stream or sys.stderr, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    return TextFormatter() if fmt == "text" else JSONFormatter()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs (so a second call replaces it, not adds one)."""


def setup_logging(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None) -> logging.Handler:
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt, handler.stream))
    root.addHandler(handler)
    root.setLevel(level_number(level))
    # Neither format prints the thread, process or source line of a call: skip collecting them
    # (the logging docs' "Optimization" knobs); each record costs microseconds less.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
    # aiohttp's own access log is off (ours is registry.access); its other loggers follow the root level.
    return handler


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level_number(level))


def set_format(fmt: str) -> None:
    for h in logging.getLogger().handlers:
        if isinstance(h, _Handler):
            h.setFormatter(make_formatter(fmt, h.stream))


def current_level() -> str:
    return logging.getLevelName(logging.getLogger().level).lower()
