"""JSON API for pages and tools: Session state, ending it, join links."""

from __future__ import annotations

from aiohttp import web

from ..links import session_links
from .common import CONFIG, PEERS, TOKENS, bearer_grant, session_for

routes = web.RouteTableDef()


@routes.get("/api/sessions/{session}")
async def get_session(request: web.Request) -> web.Response:
    grant = bearer_grant(request)
    session = session_for(request, grant)
    return web.json_response({
        "session": session.describe(),
        "participant": {"id": grant.participant_id, "role": grant.role.value,
                        "name": grant.name},
        "ice_servers": request.app[PEERS].ice_servers,
    })


@routes.post("/api/sessions/{session}/end")
async def end_session(request: web.Request) -> web.Response:
    grant = bearer_grant(request)
    session = session_for(request, grant)
    session.check_moderator(grant)
    await session.end(f"ended by {grant.name or grant.role.value}")
    return web.json_response({"session": session.describe()})


@routes.get("/api/sessions/{session}/links")
async def links(request: web.Request) -> web.Response:
    grant = bearer_grant(request)
    session = session_for(request, grant)
    session.check_moderator(grant)
    config = request.app[CONFIG]
    return web.json_response(session_links(session, request.app[TOKENS], config.base_url,
                                           config.auth.token_ttl_s))


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})
