"""Every error leaves as the spec's JSON body: RegistryError, aiohttp's own HTTP
errors (unknown route, wrong method, oversized body) and anything unexpected."""
from __future__ import annotations

import logging

from aiohttp import web

from registry.errors import RegistryError
from registry.meta.base import MetaError
from registry.storage.base import StorageError

log = logging.getLogger("registry.api")
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_HTTP_CODES = {404: ("UNSUPPORTED", "no such endpoint"), 405: ("UNSUPPORTED", "method not allowed"),
               413: ("SIZE_INVALID", "request body too large")}


def render(err: RegistryError) -> web.Response:
    headers = {**API_VERSION, **err.headers}
    return web.Response(status=err.status, body=err.body(), content_type="application/json", headers=headers)


@web.middleware
async def errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        return await handler(request)
    except RegistryError as err:
        if request.method == "HEAD":
            return web.Response(status=err.status, headers={**API_VERSION, **err.headers})
        return render(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, detail = _HTTP_CODES.get(exc.status, ("UNSUPPORTED", exc.reason))
        return render(RegistryError(code, detail, status=exc.status))
    except MetaError as exc:
        log.error("metadata store failed on %s %s: %s", request.method, request.path, exc)
        return render(RegistryError("UNAVAILABLE", "the metadata store is unavailable", status=503,
                                    headers={"Retry-After": "5"}))
    except StorageError as exc:
        log.error("storage failed on %s %s: %s", request.method, request.path, exc)
        return render(RegistryError("UNAVAILABLE", "the storage backend is unavailable", status=503,
                                    headers={"Retry-After": "5"}))
    except Exception:  # a bug: log it whole, answer without the traceback
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render(RegistryError("UNKNOWN", "internal error; see the server log", status=500))
