"""JSON API for pages and tools: Session state, ending it, join links."""

from __future__ import annotations

import hmac
import ipaddress
import math

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import BadRequest, Forbidden, Unauthorized
from ..links import SessionShape, session_links
from ..registry import SessionElsewhere
from ..roles import MAY_DERIVE, Role
from ..session import Session
from .common import (
    ACCEPTING,
    AUDIT,
    CLUSTER,
    CONFIG,
    METRICS,
    NODE_ID,
    NODES,
    PEERS,
    REGISTRY,
    SHARED_AUDIT,
    STORE,
    TOKENS,
    authenticate,
    session_for,
)

routes = web.RouteTableDef()


@routes.get("/api/sessions/{session}")
async def get_session(request: web.Request) -> web.Response:
    """Also for a Session not live on this Node (scheduled, or live on
    another Node): then its state and Theatre, without Feeds."""
    grant = await authenticate(request)
    session_id = request.match_info["session"]
    if not grant.covers(session_id):
        raise Forbidden("token is for another session", code="wrong_session")
    return web.json_response({
        "session": await request.app[REGISTRY].describe(session_id),
        "participant": {"id": grant.participant_id, "role": grant.role.value,
                        "name": grant.name},
        "ice_servers": request.app[PEERS].ice_servers_for(grant).servers,
    })


@routes.post("/api/sessions/{session}/end")
async def end_session(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    session = await session_for(request, grant)
    session.check_moderator(grant)
    await session.end(f"ended by {grant.name or grant.role.value}")
    return web.json_response({"session": session.describe()})


@routes.get("/api/sessions/{session}/links")
async def links(request: web.Request) -> web.Response:
    """Tokens derived from the caller's (docs/security.md): only Roles the
    derivation table lets it mint, expiring with it (and with the validity
    of the invite it comes from), revoked with it."""
    grant = await authenticate(request, capped=True)
    config = request.app[CONFIG]
    shape: Session | SessionShape
    media_url = config.base_url
    try:
        shape = session = await session_for(request, grant)
        session.check_moderator(grant)
    except SessionElsewhere as where:
        # Held by another Node: its Feeds from there, WHIP/WHEP on it.
        cluster = request.app[CLUSTER]
        remote = await cluster.attach(where)
        try:
            remote.check_moderator(grant)
            shape = SessionShape.described(remote.describe())
        finally:
            cluster.left(remote)
        media_url = where.url or media_url
    tokens = request.app[TOKENS]

    def mint(role: Role, name: str) -> str | None:
        if role not in MAY_DERIVE[grant.role]:
            return None
        token, derived = tokens.derive(grant, role, session_id=shape.id, name=name,
                                       ttl_s=config.auth.token_ttl_s)
        request.app[AUDIT].record(
            "token_derived", session=shape.id, token=derived.token_id, role=role.value,
            name=name, parent=grant.token_id, person=derived.person_id,
            expires_at=derived.expires_at, by=grant.participant_id, address=request.remote)
        return token

    return web.json_response(session_links(shape, tokens, config.base_url,
                                           config.auth.token_ttl_s, mint=mint,
                                           media_url=media_url))


@routes.get("/api/sessions/{session}/audit")
async def audit(request: web.Request) -> web.Response:
    """The audit trail of one Session, for its admins."""
    grant = await authenticate(request)
    session_id = request.match_info["session"]
    if not grant.covers(session_id):
        raise Forbidden("token is for another session", code="wrong_session")
    if grant.role is not Role.ADMIN:
        raise Forbidden("only admins read the audit trail", code="wrong_role")
    try:
        since = float(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise BadRequest("since and limit are numbers", code="bad_query") from None
    if not (math.isfinite(since) and since >= 0 and 1 <= limit <= 10000):
        raise BadRequest("since is ≥ 0 and limit from 1 to 10000", code="bad_query")
    shared = request.app.get(SHARED_AUDIT)
    if shared is not None:
        # Several Nodes: the Session's trail from all of them, as one.
        entries = await shared.read(session_id, since=since, limit=limit)
    else:
        entries = request.app[AUDIT].read(session=session_id, since=since, limit=limit)
    return web.json_response({"entries": entries})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return web.json_response({"status": "alive"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: accepting joins (not shutting down)."""
    node = request.app[NODE_ID]
    if not request.app[ACCEPTING]["joins"]:
        return web.json_response({"status": "shutting_down", "node": node}, status=503)
    store = request.app[STORE]
    if not await store.healthy():
        return web.json_response({"status": "degraded", "store": store.kind, "node": node},
                                 status=503)
    if not request.app[NODES].in_registry:
        # Another process runs under this node id (or the first heartbeat is due).
        return web.json_response({"status": "not_in_registry", "store": store.kind,
                                  "node": node}, status=503)
    return web.json_response({"status": "ready", "store": store.kind, "node": node})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; counts only, but still not for the open network:
    a configured bearer token, or loopback callers when none is set."""
    expected = request.app[CONFIG].server.metrics_token
    if expected:
        header = request.headers.get("Authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {expected}".encode()):
            raise Unauthorized("metrics need the configured bearer token", code="token_invalid")
    elif not _is_loopback(request.remote):
        raise Forbidden("metrics are served to loopback only unless server.metrics_token is set",
                        code="wrong_role")
    body = request.app[METRICS].scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False
