"""Pieces every HTTP route shares: app keys, errors as JSON, auth, headers."""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import logs
from ..audit import JsonlAuditTrail
from ..config import Config
from ..errors import BadRequest, ScrubinError, Unauthorized, UnsupportedMediaType
from ..media.peers import PeerFactory
from ..metrics import Metrics
from ..registry import Registry
from ..session import Session
from ..store import Presence, Store, StoreUnavailable
from ..tokens import Grant, TokenAuthority

logger = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
TOKENS = web.AppKey("tokens", TokenAuthority)
REGISTRY = web.AppKey("registry", Registry)
PEERS = web.AppKey("peers", PeerFactory)
NODE_ID = web.AppKey("node_id", str)
WEBSOCKETS: web.AppKey[weakref.WeakSet[Any]] = web.AppKey("websockets")
ACCEPTING = web.AppKey("accepting", dict[str, bool])
METRICS = web.AppKey("metrics", Metrics)
AUDIT = web.AppKey("audit", JsonlAuditTrail)
STORE = web.AppKey("store", Store)
PRESENCE = web.AppKey("presence", Presence)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = ("default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob: mediastream:; "
       "img-src 'self' data: blob:; style-src 'self'; script-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def error_response(error: ScrubinError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error.to_dict(), status=error.status, headers=headers)


#: Documented codes (docs/protocol.md, "Errors") for refusals aiohttp raises itself.
HTTP_CODES = {413: "too_large"}


def cors_headers(request: web.Request) -> dict[str, str]:
    """CORS grant for WHIP/WHEP, only to configured origins; errors carry it too so
    browser clients can read why they were refused."""
    if not request.path.startswith(("/whip/", "/whep/")):
        return {}
    origin = request.headers.get("Origin")
    allowed = request.app[CONFIG].server.cors_origins
    if origin and ("*" in allowed or origin in allowed):
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "POST, DELETE, PATCH, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
            "Access-Control-Expose-Headers": "Location, ETag, Link, Accept-Post",
            "Vary": "Origin",
        }
    return {}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the documented error object."""
    try:
        return await handler(request)
    except ScrubinError as exc:
        count_refusal(request.app, exc, joining=request.path.startswith(("/whip/", "/whep/")))
        if exc.status in (401, 403):
            request.app[AUDIT].record("denied", code=exc.code, method=request.method,
                                      path=request.path, address=request.remote,
                                      session=request.match_info.get("session"))
        if exc.status >= 500:
            logger.error("%s %s: %s", request.method, request.path, exc.message)
        return error_response(exc, headers=cors_headers(request))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        fault = "protocol" if exc.status in (400, 405, 413, 415) else "user"
        # aiohttp's own refusals (e.g. client_max_size) use the documented codes.
        code = HTTP_CODES.get(exc.status, exc.reason.lower().replace(" ", "_"))
        body = {"code": code, "message": exc.reason, "fault": fault, "status": exc.status}
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return web.json_response(body, status=exc.status,
                                 headers={**headers, **cors_headers(request)})
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        body = {"code": "internal", "message": "internal server error", "fault": "server",
                "status": 500}
        return web.json_response(body, status=500)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    response.headers.setdefault("Permissions-Policy",
                                "camera=(self), microphone=(self), geolocation=()")
    if request.secure:
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if request.path.startswith(("/js/", "/css/")):
        # Revalidate: a deploy must not mix cached modules with new pages.
        response.headers.setdefault("Cache-Control", "no-cache")
    ctype = response.headers.get("Content-Type", "")
    if ctype.startswith("text/html"):
        response.headers["Content-Security-Policy"] = CSP
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def count_refusal(app: web.Application, error: ScrubinError, *, joining: bool) -> None:
    metrics = app[METRICS]
    if error.status in (401, 403):
        metrics.auth_denials.labels(error.code).inc()
    if joining:
        metrics.join_failures.labels(error.code).inc()


def audit_grant(app: web.Application, event: str, grant: Grant, address: str | None,
                **fields: Any) -> None:
    app[AUDIT].record(event, session=grant.session_id, participant=grant.participant_id,
                      role=grant.role.value, name=grant.name, address=address, **fields)


async def require_store(app: web.Application) -> None:
    """New joins wait for shared state; media already flowing does not."""
    if not await app[STORE].healthy():
        raise StoreUnavailable("shared state is unreachable; joins resume when it is back")


def bearer_grant(request: web.Request) -> Grant:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send 'Authorization: Bearer <token>'", code="token_missing")
    grant = request.app[TOKENS].verify(token.strip())
    logs.bind(grant.session_id, grant.participant_id)
    return grant


def session_for(request: web.Request, grant: Grant) -> Session:
    """The Session named in the path, if the token is scoped to it."""
    from ..errors import Forbidden

    session_id = request.match_info["session"]
    if grant.session_id != session_id:
        raise Forbidden("token is for another session", code="wrong_session")
    return request.app[REGISTRY].get(session_id)


async def read_sdp(request: web.Request) -> str:
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != "application/sdp":
        raise UnsupportedMediaType("send the offer as Content-Type: application/sdp")
    raw = await request.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("SDP must be UTF-8", code="sdp_malformed") from None


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise BadRequest("body is not valid JSON", code="bad_json") from None
