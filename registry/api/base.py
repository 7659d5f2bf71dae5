"""GET /v2/: the API version check (end-1)."""
from aiohttp import web


async def version_check(request: web.Request) -> web.Response:
    return web.json_response({})
