"""GET /v2/_catalog with n/last pagination."""
from __future__ import annotations

from aiohttp import web

from registry.api.common import next_link, page_params, services


async def catalog(request: web.Request) -> web.Response:
    n, last = page_params(request)
    repos = await services(request).meta.catalog(None if n is None else n + 1, last)
    headers = {}
    if n is not None and len(repos) > n:
        repos = repos[:n]
        if repos:  # n=0: an empty page, nothing to continue from
            headers["Link"] = next_link("/v2/_catalog", n, repos[-1])
    return web.json_response({"repositories": repos}, headers=headers)
