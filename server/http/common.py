"""Pieces every HTTP route shares: app keys, errors as JSON, auth, headers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from .. import invites as invite_rules
from .. import logs
from ..audit import JsonlAuditTrail, SharedAudit
from ..cluster import Cluster
from ..config import Config
from ..edge import Edges
from ..errors import (
    BadRequest,
    Conflict,
    Forbidden,
    RequestTimeout,
    ScrubinError,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)
from ..media.liveness import Liveness
from ..media.peers import PeerFactory
from ..metrics import Metrics
from ..nodes import Nodes
from ..registry import Registry, SessionElsewhere
from ..roles import Role
from ..session import Ingest, Session, SlotView
from ..store import Presence, RateLimiter, Store, StoreUnavailable
from ..subscription import Subscription
from ..tokens import Grant, TokenAuthority

logger = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
#: Epoch seconds: token expiry, invite validity, attendance (tests inject one).
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
TOKENS = web.AppKey("tokens", TokenAuthority)
REGISTRY = web.AppKey("registry", Registry)
PEERS = web.AppKey("peers", PeerFactory)
LIVENESS = web.AppKey("liveness", Liveness)
NODE_ID = web.AppKey("node_id", str)
WEBSOCKETS: web.AppKey[weakref.WeakSet[Any]] = web.AppKey("websockets")
ACCEPTING = web.AppKey("accepting", dict[str, bool])
METRICS = web.AppKey("metrics", Metrics)
AUDIT = web.AppKey("audit", JsonlAuditTrail)
STORE = web.AppKey("store", Store)
PRESENCE = web.AppKey("presence", Presence)
NODES = web.AppKey("nodes", Nodes)
CLUSTER = web.AppKey("cluster", Cluster)
#: Sessions held elsewhere whose Feeds this Node relays to its own viewers.
EDGES = web.AppKey("edges", Edges)
#: Set when several Nodes share a store: every Session's trail, read as one.
SHARED_AUDIT = web.AppKey("shared_audit", SharedAudit)


class DeploymentOrigins:
    """The origins of this deployment's Nodes (this one, ``server.node_urls``
    and every Node in the Node registry): the pages' Content-Security-Policy
    lets them connect there, and CORS lets their pages call WHIP/WHEP."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.origins: frozenset[str] = frozenset()
        self.csp = ""
        self.update([])

    def update(self, node_urls: list[str]) -> None:
        """The Node registry's URLs changed."""
        urls = [self._config.base_url, *self._config.server.node_urls, *node_urls]
        self.origins = frozenset(o for o in (_origin(u) for u in urls) if o is not None)
        self.csp = content_security_policy(self._config, node_urls)


def _origin(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.hostname or parts.hostname in ("0.0.0.0", "::"):
        return None
    return f"{parts.scheme}://{parts.netloc}"


#: The pages' Content-Security-Policy and CORS origins, from the configuration
#: and the Node registry.
CSP = web.AppKey("csp", DeploymentOrigins)


class AuthGuard:
    """Failed authentications per client address (docs/protocol.md, "Limits").

    Failures are counted in the shared store, so every Node sees them. Once
    an address is over the limit, this Node answers its failures with 429 for
    the rest of the window without going further (no store lookups for
    forgeries). A token that verifies still gets in: one client presenting bad
    tokens behind a hospital NAT must not lock out everyone else behind it
    (behind a reverse proxy, ``server.trusted_proxies`` gives each client its
    own address). Successful requests are never counted.
    """

    WINDOW_S = 60.0
    #: Bound on remembered addresses (expired blocks are dropped first).
    MAX_BLOCKED = 10_000

    def __init__(self, rates: RateLimiter, limit: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rates = rates
        self._limit = limit
        self._clock = clock
        self._blocked: dict[str, float] = {}

    def blocked(self, address: str | None) -> bool:
        key = address or "unknown"
        until = self._blocked.get(key)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._blocked[key]
        return False

    def check(self, address: str | None) -> None:
        if self.blocked(address):
            raise rate_limited()

    async def failed(self, address: str | None) -> bool:
        """Count one failure; True when it puts the address over the limit."""
        key = address or "unknown"
        try:
            allowed = await self._rates.hit(f"auth-failures:{key}", self._limit, self.WINDOW_S)
        except StoreUnavailable:
            return False
        if allowed:
            return False
        now = self._clock()
        if len(self._blocked) >= self.MAX_BLOCKED:
            for stale in [k for k, until in self._blocked.items() if until <= now]:
                del self._blocked[stale]
            if len(self._blocked) >= self.MAX_BLOCKED:
                self._blocked.pop(next(iter(self._blocked)))
        self._blocked[key] = now + self.WINDOW_S
        return True


AUTH_GUARD = web.AppKey("auth_guard", AuthGuard)


class MessageRate:
    """Websocket messages of one Participant (all its sockets on this Node):
    a token bucket of ``burst`` refilled at ``per_second``. A refused message
    is a strike; strikes fade at half the rate, so a client that keeps
    sending at twice the rate or more collects ``burst`` strikes and is
    disconnected, while one that backs off after a 429 is not."""

    def __init__(self, per_second: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_second
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._strikes = 0.0
        self._last = clock()
        self.users = 0

    def take(self) -> str:
        """"ok", "refuse" (answer 429) or "close" (disconnect)."""
        now = self._clock()
        elapsed, self._last = now - self._last, now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._strikes = max(0.0, self._strikes - elapsed * self._rate / 2)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return "ok"
        self._strikes += 1.0
        return "close" if self._strikes >= self._burst else "refuse"


class MessageRates:
    """One ``MessageRate`` per Participant while it has sockets here."""

    def __init__(self, per_second: float, burst: int) -> None:
        self._per_second = per_second
        self._burst = burst
        self._rates: dict[tuple[str, str], MessageRate] = {}

    def acquire(self, session_id: str, participant_id: str) -> MessageRate:
        rate = self._rates.get((session_id, participant_id))
        if rate is None:
            rate = self._rates[(session_id, participant_id)] = MessageRate(
                self._per_second, self._burst)
        rate.users += 1
        return rate

    def release(self, session_id: str, participant_id: str) -> None:
        rate = self._rates.get((session_id, participant_id))
        if rate is not None:
            rate.users -= 1
            if rate.users <= 0:
                del self._rates[(session_id, participant_id)]


MESSAGE_RATES = web.AppKey("message_rates", MessageRates)
#: Subscriptions being negotiated, per (Session, person): counted against the
#: cap while their answer is computed, so concurrent requests cannot pass it.
PENDING_SUBSCRIPTIONS: web.AppKey[Counter[tuple[str, str]]] = web.AppKey(
    "pending_subscriptions")
#: The Grant behind each open websocket, so revocations close them.
SOCKET_GRANTS: web.AppKey[weakref.WeakKeyDictionary[Any, Grant]] = web.AppKey("socket_grants")


def close_socket(app: web.Application, ws: web.WebSocketResponse, error: ScrubinError,
                 code: int) -> None:
    """Close a websocket from outside its handler: the error first, as a
    message, then the close frame. (aiohttp tears the connection down right
    after a close sent from another task, so a client may see 1006 instead of
    ``code``; browsers report the code of the close frame they received.)"""
    if ws.closed:
        return

    async def close() -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_json({"type": "error", "error": error.to_dict()})
        await ws.close(code=code, message=error.code.encode())

    app[REGISTRY].spawn(close())

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

def content_security_policy(config: Config, node_urls: list[str] | None = None) -> str:
    """The pages' policy. ``connect-src``: this deployment's own origins only
    (this Node's, every Node's in ``server.node_urls`` and ``node_urls`` (the
    Node registry's), with their ws/wss equivalents), never ``ws:`` or
    ``wss:`` to any host."""
    origins: list[str] = []
    for url in (config.base_url, *config.server.node_urls, *(node_urls or [])):
        parts = urlsplit(url)
        if not parts.hostname or parts.hostname in ("0.0.0.0", "::"):
            continue  # a listening address, not an origin: 'self' covers it
        socket = "wss" if parts.scheme == "https" else "ws"
        for origin in (f"{parts.scheme}://{parts.netloc}", f"{socket}://{parts.netloc}"):
            if origin not in origins:
                origins.append(origin)
    return ("default-src 'self'; connect-src " + " ".join(["'self'", *origins])
            + "; media-src 'self' blob: mediastream:; img-src 'self' data: blob:; "
              "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
              "frame-ancestors 'none'; form-action 'self'")


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
    if origin and ("*" in allowed or origin in allowed or origin in request.app[CSP].origins):
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
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
        if isinstance(exc, SessionElsewhere) and exc.url and _initial_post(request):
            # RFC 9725: a WHIP (and here WHEP) client is sent to the Node that
            # holds the Session on its first POST; later requests (DELETE) go
            # to the resource URL it got there.
            return web.json_response(exc.to_dict(), status=307, headers={
                "Location": exc.url.rstrip("/") + request.path_qs, **cors_headers(request)})
        exc = await refused_auth(request.app, exc, request.remote)
        count_refusal(request.app, exc, joining=request.path.startswith(("/whip/", "/whep/")))
        if exc.status in (401, 403):
            request.app[AUDIT].record("denied", code=exc.code, method=request.method,
                                      path=request.path, address=request.remote,
                                      session=request.match_info.get("session"))
        if exc.status >= 500:
            logger.error("%s %s: %s", request.method, request.path, exc.message)
        headers = cors_headers(request)
        if exc.status == 429:
            headers["Retry-After"] = str(int(AuthGuard.WINDOW_S))
        response = error_response(exc, headers=headers)
        if exc.status == 408:
            response.force_close()  # what is left of a slow body is not waited for
        return response
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


def _initial_post(request: web.Request) -> bool:
    """The POST that creates a WHIP or WHEP resource."""
    return request.method == "POST" and request.path.startswith(("/whip/", "/whep/")) and (
        "resource" not in request.match_info)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address_in(address: str | None, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in net for net in networks)


def forwarded_middleware(trusted: list[str]) -> Middleware:
    """The client's address and scheme behind reverse proxies: X-Forwarded-For
    and X-Forwarded-Proto count only when the connection comes from one of
    ``server.trusted_proxies``; the client is the rightmost address in
    X-Forwarded-For that is not itself a trusted proxy. Everything downstream
    (the failed-auth limit, the audit trail, HSTS, the /metrics loopback rule)
    then sees the real client and scheme."""
    networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in trusted]

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not networks or not _address_in(request.remote, networks):
            return await handler(request)
        client = request.remote
        hops = [hop.strip() for line in request.headers.getall("X-Forwarded-For", [])
                for hop in line.split(",") if hop.strip()]
        for hop in reversed(hops):
            try:
                client = str(ipaddress.ip_address(hop))
            except ValueError:
                break  # garbage from further out: the last good hop stands
            if not _address_in(client, networks):
                break
        changes: dict[str, Any] = {"remote": client}
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
        if proto in ("http", "https"):
            changes["scheme"] = proto
        return await handler(request.clone(**changes))

    return forwarded


@web.middleware
async def own_resource_urls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With several Nodes, a WHIP/WHEP resource lives on the Node that made it:
    its ``Location`` names that Node's own URL, so a DELETE reaches it even
    when the POST came through a shared port or a load balancer."""
    response = await handler(request)
    location = response.headers.get("Location", "")
    if (response.status == 201 and location.startswith("/")
            and request.path.startswith(("/whip/", "/whep/"))
            and request.app[STORE].kind != "memory"):
        response.headers["Location"] = request.app[NODES].url + location
    return response


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
        response.headers["Content-Security-Policy"] = request.app[CSP].csp
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


#: Background checks for a publication's first media (audit_publication).
PUBLICATION_WATCHES: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("publication_watches")

#: How often a new publication is checked for media until some arrives.
MEDIA_CHECK_S = 0.1


def audit_publication(app: web.Application, ingest: Ingest, grant: Grant,
                      address: str | None, *, via: str) -> None:
    """Audit a publication when its media first flows (``publish_start``), or as
    ``publish_no_media`` if its connection ends before any arrived.

    An answered offer only means the offer was acceptable: a publisher whose ICE
    never connects would otherwise leave one "publish start" per retry
    (docs/protocol.md, "Audit trail"). Media is seen at the peer connection
    (an RTP source heard by a receiver), not in the Feed, so this stays apart
    from the media plane.
    """
    watches = app[PUBLICATION_WATCHES]
    task = asyncio.ensure_future(_audit_when_media_flows(app, ingest, grant, address, via))
    watches.add(task)
    task.add_done_callback(watches.discard)


async def _audit_when_media_flows(app: web.Application, ingest: Ingest, grant: Grant,
                                  address: str | None, via: str) -> None:
    loop = asyncio.get_running_loop()
    answered = loop.time()
    pc = ingest.pc
    while pc.connectionState not in ("failed", "closed"):
        if any(receiver.getSynchronizationSources() for receiver in pc.getReceivers()):
            audit_grant(app, "publish_start", grant, address, slot=ingest.slot,
                        feeds=[f.id for f in ingest.feeds], via=via,
                        after_s=round(loop.time() - answered, 3))
            return
        await asyncio.sleep(MEDIA_CHECK_S)
    audit_grant(app, "publish_no_media", grant, address, slot=ingest.slot, via=via,
                connection=pc.connectionState, ice=pc.iceConnectionState)


async def require_store(app: web.Application) -> None:
    """New joins wait for shared state; media already flowing does not."""
    if not await app[STORE].healthy():
        raise StoreUnavailable("shared state is unreachable; joins resume when it is back")


async def refused_auth(app: web.Application, error: ScrubinError,
                       address: str | None) -> ScrubinError:
    """Count a 401 against the caller's address; the failure that crosses the
    limit is answered 429 instead."""
    if error.status == 401 and await app[AUTH_GUARD].failed(address):
        return rate_limited()
    return error


def rate_limited() -> TooManyRequests:
    return TooManyRequests("too many failed authentications from this address; "
                           "try again in a minute", code="rate_limited")


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send 'Authorization: Bearer <token>'", code="token_missing")
    return token.strip()


async def authenticate(request: web.Request, token: str | None = None, *,
                       redeem: bool = True, capped: bool = False) -> Grant:
    """The one place a token becomes a Grant, for every bearer route and the
    websocket hello (``token`` given): signature and expiry (401; 429 once the
    address is over the failed-auth limit), revocation of the token or of any
    grant it comes from (its invite, its parents), or of its Session's tokens
    (401 token_revoked), and, for an invite used directly, one of its device
    uses (403 invite_used_up; ``redeem=False`` leaves that to the caller). A
    node-wide admin token on a route with ``{session}`` comes back scoped to
    that Session (``Grant.scope`` keeps "*"). An invite past its validity
    (the Session's schedule as stored now, server/schedule.py), or a token
    from one, is 401 token_expired; ``capped`` returns the grant with its
    ``expires_at`` at most that validity, for minting tokens from it. The
    store being unreachable is a 503: a revocation is never skipped."""
    app = request.app
    blocked = app[AUTH_GUARD].blocked(request.remote)
    try:
        grant = app[TOKENS].verify(bearer_token(request) if token is None else token)
    except Unauthorized:
        if blocked:
            raise rate_limited() from None
        raise
    if grant.role is Role.RELAY and not request.path.startswith("/whep/"):
        # A Node's pull credential plays Feeds (WHEP) and nothing else.
        raise Forbidden("a relay token is for WHEP only", code="wrong_role")
    invites = app[STORE].invites
    if await invites.is_revoked(grant.lineage, session_id=grant.session_id,
                                issued_at=grant.issued_at):
        raise Unauthorized("this token, or the invite or token it comes from, has been revoked",
                           code="token_revoked")
    config = app[CONFIG]
    valid = await invite_rules.check_valid(app[STORE], grant, config.training,
                                      config.recording.retention_days, app[CLOCK]())
    if capped:
        grant = valid
    if redeem and grant.kind == "invite" and not await invites.use_invite(
            grant.token_id, max_uses=device_limit(app, grant), expires_at=grant.expires_at,
            redeemer=grant.participant_id):
        raise Forbidden("this invite has been used on as many devices as it allows",
                        code="invite_used_up")
    path_session = request.match_info.get("session")
    if grant.node_wide and path_session:
        grant = dataclasses.replace(grant, session_id=path_session, scope=grant.session_id)
    logs.bind(grant.session_id, grant.participant_id)
    return grant


def device_limit(app: web.Application, invite: Grant) -> int:
    """Devices that may use an invite: its ``max_uses``, never more than
    ``limits.devices_per_invite`` (an invite is one person)."""
    cap = app[CONFIG].limits.devices_per_invite
    return min(invite.max_uses or cap, cap)


async def session_for(request: web.Request, grant: Grant, *, start: bool = False) -> Session:
    """The live Session named in the path, if the token covers it; ``start``
    lets this request bring a scheduled Session live (its expert publishing)."""
    session_id = request.match_info["session"]
    if not grant.covers(session_id):
        raise Forbidden("token is for another session", code="wrong_session")
    return await request.app[REGISTRY].resolve(session_id, start=start)


_T = TypeVar("_T")


async def subscribe(app: web.Application, session: Session, grant: Grant, feed_id: str,
                    offer: str) -> tuple[str, Subscription]:
    """``Session.subscribe`` within the per-person cap
    (``limits.max_subscriptions_per_participant`` counts every device of an
    invite and everything derived from one token together)."""
    return await _within_cap(app, session, grant, 1,
                             lambda: session.subscribe(grant, feed_id, offer))


async def subscribe_slot(app: web.Application, session: Session, grant: Grant, slot: str,
                         offer: str) -> tuple[str, SlotView]:
    """``Session.subscribe_slot`` (a camera and its narration: two Subscriptions)
    within the same per-person cap."""
    return await _within_cap(app, session, grant, 2,
                             lambda: session.subscribe_slot(grant, slot, offer))


async def _within_cap(app: web.Application, session: Session, grant: Grant, count: int,
                      make: Callable[[], Awaitable[_T]]) -> _T:
    if grant.role is Role.RELAY:
        return await make()  # an edge Node, not a person (docs/security.md)
    cap = app[CONFIG].limits.max_subscriptions_per_participant
    pending = app[PENDING_SUBSCRIPTIONS]
    key = (session.id, grant.person_id)
    live = sum(1 for s in session.subscriptions.values()
               if s.grant is not None and s.grant.person_id == grant.person_id)
    if live + pending[key] + count > cap:
        raise Conflict(f"at most {cap} subscriptions per person (an invite's devices "
                       "together)", code="too_many_subscriptions")
    pending[key] += count
    try:
        return await make()
    finally:
        pending[key] -= count
        if pending[key] <= 0:
            del pending[key]


async def read_body(request: web.Request) -> bytes:
    """The whole body, within ``limits.body_timeout_s`` (aiohttp has no read
    timeout: a client trickling its body would hold the connection); a slow
    one is a 408 and the connection closes."""
    try:
        async with asyncio.timeout(request.app[CONFIG].limits.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time",
                             code="request_timeout") from None


async def read_sdp(request: web.Request) -> str:
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != "application/sdp":
        raise UnsupportedMediaType("send the offer as Content-Type: application/sdp")
    raw = await read_body(request)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("SDP must be UTF-8", code="sdp_malformed") from None


async def read_json(request: web.Request) -> Any:
    raw = await read_body(request)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser goes ("[[[[…").
        raise BadRequest("body is not valid JSON", code="bad_json") from None
