"""GET /_registry/scrub: the last scrub findings as JSON, per repository and tag."""
from __future__ import annotations

from aiohttp import web

from registry.api.common import services
from registry.maintenance.scrub import report
from registry.reference import check_name


async def scrub_report(request: web.Request) -> web.Response:
    svc = services(request)
    repo = request.query.get("repo")
    rows = await report(svc, check_name(repo) if repo else None)
    state = await svc.meta.scrub_state()
    return web.json_response({
        "lastCompletePass": state.last_complete,
        "passInProgress": state.pass_started is not None,
        "affected": sum(1 for r in rows if r["status"] != "ok"),
        "scrubResult": [{"repository": r["repository"], "tag": r["tag"], "status": r["status"],
                         "affectedBlob": r["affected_blob"], "error": r["error"]} for r in rows],
    })
