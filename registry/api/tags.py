"""GET /v2/<name>/tags/list with n/last pagination (end-8a, end-8b)."""
from __future__ import annotations

from aiohttp import web

from registry.api.common import next_link, page_params, repo_name, services


async def list_tags(request: web.Request) -> web.Response:
    repo = repo_name(request)
    n, last = page_params(request)
    tags = await services(request).manifests.tags(repo, None if n is None else n + 1, last)
    headers = {}
    if n is not None and len(tags) > n:
        tags = tags[:n]
        if tags:  # n=0: an empty page, nothing to continue from
            headers["Link"] = next_link(f"/v2/{repo}/tags/list", n, tags[-1])
    return web.json_response({"name": repo, "tags": tags}, headers=headers)
