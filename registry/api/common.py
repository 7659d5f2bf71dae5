"""Small helpers the handlers share: path parameters, pagination, body streams."""
from __future__ import annotations

from typing import AsyncIterator
from urllib.parse import quote

from aiohttp import web

from registry.digest import Digest, parse_digest
from registry.errors import RegistryError
from registry.keys import SERVICES, Services
from registry.reference import check_name

MAX_PAGE = 10000


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def repo_name(request: web.Request) -> str:
    return check_name(request.match_info["name"])


def path_digest(request: web.Request) -> Digest:
    return parse_digest(request.match_info["digest"])


def page_params(request: web.Request) -> tuple[int | None, str | None]:
    n_text, last = request.query.get("n"), request.query.get("last")
    if last is not None and "\x00" in last:  # no name or tag holds a NUL, and no store can compare one
        raise RegistryError("UNSUPPORTED", "last must not contain NUL", status=400)
    if n_text is None or n_text == "":
        return None, last
    if not (n_text.isascii() and n_text.isdigit()):  # "²".isdigit() but int("²") fails
        raise RegistryError("UNSUPPORTED", f"n must be a non-negative integer, not {n_text[:50]!r}", status=400)
    return min(int(n_text), MAX_PAGE), last


def next_link(path: str, n: int, last: str) -> str:
    return f'<{path}?n={n}&last={quote(last, safe="")}>; rel="next"'


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives, without buffering it whole."""
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            if not content.is_eof():  # pragma: no cover - readany returns b"" only at EOF
                continue
            return
        yield chunk


def has_body(request: web.Request) -> bool:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return True
    return request.content_length not in (None, 0)
