"""Admin API (docs/openapi.yaml): Theatres, Sessions, invites; and redeeming
an invite, and the OpenAPI document itself.

Theatre and Session management (list, create) needs a node-wide admin token
(``sid="*"``). Routes under ``/api/admin/sessions/{session}`` also accept an
admin token of that Session. Every change is audited.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from typing import Any, cast

import yaml
from aiohttp import web

from .. import invites, schedule
from ..errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
)
from ..resources import OPENAPI_PATH
from ..roles import PERSON_ROLES, Role
from ..store import SESSION_STATES, InviteRecord, SessionRecord, SessionState
from ..theatre import Theatre, check_name
from ..tokens import MAX_LIFETIME_S, NODE_WIDE, Grant, is_grant_id
from . import revocation
from .common import (
    AUDIT,
    CLOCK,
    CONFIG,
    REGISTRY,
    STORE,
    TOKENS,
    authenticate,
    device_limit,
    read_json,
)

routes = web.RouteTableDef()

TITLE_MAX = 200
NAME_MAX = 100
MAX_SLOTS = 16
#: Longest scheduled Session (minutes).
DURATION_MAX_MIN = 24 * 60
#: Epoch seconds accepted for starts_at: 2000-01-01 … 2100-01-01.
STARTS_AT_RANGE = (946_684_800.0, 4_102_444_800.0)


# -- the OpenAPI document ------------------------------------------------------

_openapi_cache: dict[str, bytes] = {}


def openapi_document() -> dict[str, Any]:
    with open(OPENAPI_PATH, encoding="utf-8") as fh:
        document: dict[str, Any] = yaml.safe_load(fh)
    return document


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The HTTP API, described (no token needed: it holds no secret)."""
    body = _openapi_cache.get("json")
    if body is None:
        body = _openapi_cache["json"] = json.dumps(openapi_document()).encode()
    return web.Response(body=body, content_type="application/json")


# -- input -----------------------------------------------------------------------

async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", code="bad_json")
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))[:200]}",
                         code="bad_request")
    return body


def _text(body: dict[str, Any], key: str, *, limit: int, required: bool = False,
          default: str | None = "") -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(f"{key} is required", code="bad_request")
        return default
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string", code="bad_request")
    value = invites.clean_text(value)
    if len(value) > limit:
        raise BadRequest(f"{key} is longer than {limit} characters", code="bad_request")
    if required and not value:
        raise BadRequest(f"{key} must not be empty", code="bad_request")
    return value


def _number(body: dict[str, Any], key: str, *, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or not low <= value <= high:
        raise BadRequest(f"{key} must be a number from {low:g} to {high:g}", code="bad_request")
    return float(value)


def _integer(body: dict[str, Any], key: str, *, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{key} must be an integer from {low} to {high}", code="bad_request")
    return value


def _slots(body: dict[str, Any]) -> tuple[str, ...]:
    slots = body.get("slots")
    if (not isinstance(slots, list) or not 1 <= len(slots) <= MAX_SLOTS
            or not all(isinstance(s, str) for s in slots)):
        raise BadRequest(f"slots must be a list of 1 to {MAX_SLOTS} slot names",
                         code="bad_slot")
    for slot in slots:
        check_name("slot", slot)
    if len(set(slots)) != len(slots):
        raise BadRequest("slots must be distinct", code="bad_slot")
    return tuple(slots)


def _ends_at(body: dict[str, Any], starts_at: float | None) -> float | None:
    """The scheduled end: ``ends_at``, or ``duration_min`` after ``starts_at``."""
    ends_at = _number(body, "ends_at", low=STARTS_AT_RANGE[0], high=STARTS_AT_RANGE[1])
    duration = _number(body, "duration_min", low=1, high=DURATION_MAX_MIN)
    if ends_at is not None and duration is not None:
        raise BadRequest("give ends_at or duration_min, not both", code="bad_schedule")
    if duration is not None:
        if starts_at is None:
            raise BadRequest("duration_min needs starts_at", code="bad_schedule")
        return starts_at + duration * 60
    if ends_at is not None and starts_at is not None and ends_at <= starts_at:
        raise BadRequest("a Session ends after it starts", code="bad_schedule")
    return ends_at


def _path_name(request: web.Request, kind: str) -> str:
    return check_name(kind, request.match_info[kind])


# -- who may call ------------------------------------------------------------------

async def node_admin(request: web.Request) -> Grant:
    grant = await authenticate(request)
    if grant.role is not Role.ADMIN:
        raise Forbidden("only admins manage theatres and sessions", code="wrong_role")
    if not grant.node_wide:
        raise Forbidden("this needs a node-wide admin token (sid \"*\")", code="wrong_session")
    return grant


async def session_admin(request: web.Request) -> Grant:
    """A node-wide admin token, or an admin token of the Session in the path."""
    grant = await authenticate(request)
    if not grant.covers(request.match_info["session"]):
        raise Forbidden("token is for another session", code="wrong_session")
    if grant.role is not Role.ADMIN:
        raise Forbidden("only admins manage sessions and invites", code="wrong_role")
    return grant


def _audit(request: web.Request, event: str, grant: Grant, **fields: Any) -> None:
    request.app[AUDIT].record(event, by=grant.participant_id, by_name=grant.name,
                              address=request.remote, **fields)


# -- the Node registry ---------------------------------------------------------------

@routes.get("/api/admin/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    await node_admin(request)
    registry = request.app[REGISTRY]
    records = await request.app[STORE].nodes.list_nodes()
    return web.json_response({
        "nodes": [r.describe() for r in records],
        "node": registry.node_id,
        "holds": {sid: fence for sid, fence in registry.fences.items() if registry.holds(sid)},
    })


# -- theatres ----------------------------------------------------------------------

@routes.get("/api/admin/theatres")
async def list_theatres(request: web.Request) -> web.Response:
    await node_admin(request)
    theatres = {t.id: t for t in request.app[REGISTRY].theatres.values()}
    theatres.update({t.id: t for t in await request.app[STORE].theatres.list_theatres()})
    return web.json_response({"theatres": [theatres[k].describe() for k in sorted(theatres)]})


@routes.post("/api/admin/theatres")
async def create_theatre(request: web.Request) -> web.Response:
    grant = await node_admin(request)
    body = await _body(request, {"id", "name", "slots"})
    theatre_id = body.get("id")
    if not isinstance(theatre_id, str):
        raise BadRequest("id is required", code="bad_theatre")
    check_name("theatre", theatre_id)
    name = _text(body, "name", limit=NAME_MAX) or theatre_id
    theatre = Theatre(theatre_id, name, _slots(body))
    registry = request.app[REGISTRY]
    if await registry.get_theatre(theatre_id) is not None:
        raise Conflict(f"theatre {theatre_id} exists", code="theatre_exists")
    await registry.put_theatre(theatre)
    _audit(request, "theatre_created", grant, theatre=theatre.id, slots=list(theatre.slots))
    return web.json_response({"theatre": theatre.describe()}, status=201)


@routes.get("/api/admin/theatres/{theatre}")
async def get_theatre(request: web.Request) -> web.Response:
    await node_admin(request)
    return web.json_response({"theatre": (await _theatre(request)).describe()})


@routes.put("/api/admin/theatres/{theatre}")
async def update_theatre(request: web.Request) -> web.Response:
    grant = await node_admin(request)
    current = await _theatre(request)
    body = await _body(request, {"name", "slots"})
    name = _text(body, "name", limit=NAME_MAX, default=None) or current.name
    slots = _slots(body) if "slots" in body else current.slots
    theatre = Theatre(current.id, name, slots)
    await request.app[REGISTRY].put_theatre(theatre)
    _audit(request, "theatre_updated", grant, theatre=theatre.id, slots=list(theatre.slots))
    return web.json_response({"theatre": theatre.describe()})


@routes.delete("/api/admin/theatres/{theatre}")
async def delete_theatre(request: web.Request) -> web.Response:
    grant = await node_admin(request)
    theatre = await _theatre(request)
    registry = request.app[REGISTRY]
    in_use = [r.id for r in await request.app[STORE].sessions.list_sessions()
              if r.theatre_id == theatre.id and r.state != "ended"]
    in_use += [s.id for s in registry.sessions.values() if s.theatre.id == theatre.id]
    if in_use:
        raise Conflict(f"theatre {theatre.id} has sessions that have not ended: "
                       f"{', '.join(sorted(set(in_use)))[:200]}", code="theatre_in_use")
    await registry.delete_theatre(theatre.id)
    _audit(request, "theatre_deleted", grant, theatre=theatre.id)
    return web.Response(status=204)


async def _theatre(request: web.Request) -> Theatre:
    theatre_id = _path_name(request, "theatre")
    theatre = await request.app[REGISTRY].get_theatre(theatre_id)
    if theatre is None:
        raise NotFound(f"no theatre {theatre_id!r}", code="unknown_theatre")
    return theatre


# -- sessions ----------------------------------------------------------------------

async def _session_view(request: web.Request, record: SessionRecord) -> dict[str, Any]:
    registry = request.app[REGISTRY]
    live = registry.sessions.get(record.id)
    node = record.node_id or None
    if record.state == "live":
        # The Node holding its lease now (None: nobody, until a participant asks).
        lease = await registry.lease(record.id)
        node = lease.node_id if lease is not None else None
    view: dict[str, Any] = {
        "id": record.id, "theatre": record.theatre_id, "title": record.title,
        "procedure": record.procedure, "expert": record.expert,
        "starts_at": record.starts_at,
        # The scheduled end (given, or the start plus [training] default_duration_min).
        "ends_at": schedule.describe_schedule(record, request.app[CONFIG].training,
                                              request.app[CLOCK]())["ends_at"],
        "state": record.state,
        "started_at": record.started_at, "ended_at": record.ended_at,
        "node": node, "feeds": [], "participants": 0,
    }
    if live is not None and live.state == "live":
        view["feeds"] = live.describe()["feeds"]
        view["participants"] = len(live.participants)
    return view


async def _record(request: web.Request) -> SessionRecord:
    session_id = _path_name(request, "session")
    registry = request.app[REGISTRY]
    await registry.flush()
    record = await request.app[STORE].sessions.get_session(session_id)
    if record is None:
        registry.get(session_id)  # 410 for one that ended here
        raise NotFound(f"no session {session_id!r}", code="unknown_session")
    return record


@routes.get("/api/admin/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    await node_admin(request)
    state = request.query.get("state")
    if state is not None and state not in SESSION_STATES:
        raise BadRequest(f"state is one of {', '.join(SESSION_STATES)}", code="bad_query")
    registry = request.app[REGISTRY]
    await registry.flush()
    records = await request.app[STORE].sessions.list_sessions(cast(SessionState | None, state))
    return web.json_response({"sessions": [await _session_view(request, r) for r in records]})


@routes.post("/api/admin/sessions")
async def create_session(request: web.Request) -> web.Response:
    grant = await node_admin(request)
    body = await _body(request, {"id", "theatre", "title", "procedure", "expert", "starts_at",
                                 "ends_at", "duration_min"})
    session_id = body.get("id")
    if session_id is None:
        session_id = f"s-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"
    if not isinstance(session_id, str):
        raise BadRequest("id must be a string", code="bad_session")
    check_name("session", session_id)
    theatre_id = body.get("theatre")
    if not isinstance(theatre_id, str):
        raise BadRequest("theatre is required", code="bad_theatre")
    check_name("theatre", theatre_id)
    title = _text(body, "title", limit=TITLE_MAX, required=True) or ""
    registry = request.app[REGISTRY]
    theatre = await registry.get_theatre(theatre_id)
    if theatre is None:
        raise NotFound(f"no theatre {theatre_id!r}", code="unknown_theatre")
    if registry.sessions.get(session_id) is not None:
        raise Conflict(f"session {session_id} is live", code="session_exists")
    store = request.app[STORE]
    if await store.theatres.get_theatre(theatre_id) is None:
        await store.theatres.put_theatre(theatre)  # a Theatre from this Node's configuration
    starts_at = _number(body, "starts_at", low=STARTS_AT_RANGE[0], high=STARTS_AT_RANGE[1])
    record = await store.sessions.create_session(SessionRecord(
        id=session_id, theatre_id=theatre_id, title=title,
        procedure=_text(body, "procedure", limit=TITLE_MAX) or "",
        expert=_text(body, "expert", limit=NAME_MAX) or "",
        starts_at=starts_at, ends_at=_ends_at(body, starts_at),
        state="scheduled"))
    _audit(request, "session_created", grant, session=record.id, theatre=theatre_id,
           title=record.title, starts_at=record.starts_at, ends_at=record.ends_at)
    return web.json_response({"session": await _session_view(request, record)}, status=201)


@routes.get("/api/admin/sessions/{session}")
async def get_session(request: web.Request) -> web.Response:
    await session_admin(request)
    return web.json_response({"session": await _session_view(request, await _record(request))})


@routes.patch("/api/admin/sessions/{session}")
async def update_session(request: web.Request) -> web.Response:
    grant = await session_admin(request)
    record = await _record(request)
    body = await _body(request, {"title", "procedure", "expert", "starts_at", "ends_at",
                                 "duration_min"})
    if record.state == "ended":
        raise Gone(f"session {record.id} has ended", code="session_ended")
    title = _text(body, "title", limit=TITLE_MAX, default=None)
    if title == "":
        raise BadRequest("title must not be empty", code="bad_request")
    procedure = _text(body, "procedure", limit=TITLE_MAX, default=None)
    starts_at = _number(body, "starts_at", low=STARTS_AT_RANGE[0], high=STARTS_AT_RANGE[1])
    ends_at = _ends_at(body, starts_at if starts_at is not None else record.starts_at)
    # Invites following the schedule read it from this record at every check:
    # moving the Session moves their validity.
    record = await request.app[STORE].sessions.update_session(
        record.id, title=title, procedure=procedure,
        expert=_text(body, "expert", limit=NAME_MAX, default=None),
        starts_at=starts_at, ends_at=ends_at)
    live = request.app[REGISTRY].sessions.get(record.id)
    if live is not None:
        live.title, live.procedure = record.title, record.procedure
    _audit(request, "session_updated", grant, session=record.id,
           fields=sorted(k for k in body if body[k] is not None))
    return web.json_response({"session": await _session_view(request, record)})


@routes.post("/api/admin/sessions/{session}/start")
async def start_session(request: web.Request) -> web.Response:
    grant = await session_admin(request)
    record = await _record(request)
    if record.state == "ended":
        raise Gone(f"session {record.id} has ended", code="session_ended")
    registry = request.app[REGISTRY]
    was_live_here = record.id in registry.sessions
    await registry.start(record.id)
    if not was_live_here:
        _audit(request, "session_started", grant, session=record.id)
    return web.json_response({"session": await _session_view(request, await _record(request))})


@routes.post("/api/admin/sessions/{session}/end")
async def end_session(request: web.Request) -> web.Response:
    grant = await session_admin(request)
    record = await _record(request)
    if record.state != "ended":
        await request.app[REGISTRY].end(record.id, f"ended by {grant.name or 'an admin'}")
        _audit(request, "session_ended_by_admin", grant, session=record.id, was=record.state)
    return web.json_response({"session": await _session_view(request, await _record(request))})


# -- invites -----------------------------------------------------------------------

async def _invite_views(request: web.Request,
                        records: list[InviteRecord]) -> list[dict[str, Any]]:
    store = request.app[STORE]
    if not records:
        return []
    before = await store.invites.revoked_before(records[0].session_id)
    config = request.app[CONFIG]
    session = await store.sessions.get_session(records[0].session_id)
    return [await invites.describe(store, request.app[TOKENS], r, config.base_url,
                                   revoked_before=before, session=session,
                                   training=config.training,
                                   retention_days=config.recording.retention_days)
            for r in records]


@routes.get("/api/admin/sessions/{session}/invites")
async def list_invites(request: web.Request) -> web.Response:
    await session_admin(request)
    record = await _record(request)
    found = await request.app[STORE].invites.list_invites(record.id)
    return web.json_response({"invites": await _invite_views(request, found)})


@routes.post("/api/admin/sessions/{session}/invites")
async def create_invite(request: web.Request) -> web.Response:
    grant = await session_admin(request)
    record = await _record(request)
    if record.state == "ended":
        raise Gone(f"session {record.id} has ended", code="session_ended")
    body = await _body(request, {"role", "name", "ttl_s", "max_uses", "allow_expiring"})
    try:
        role = Role(str(body.get("role")))
        if role not in PERSON_ROLES:
            raise ValueError(role)
    except ValueError:
        raise BadRequest("role is one of "
                         f"{', '.join(r.value for r in Role if r in PERSON_ROLES)}",
                         code="bad_role") from None
    config = request.app[CONFIG]
    ttl = _number(body, "ttl_s", low=invites.MIN_TTL_S, high=invites.MAX_TTL_S)
    devices = config.limits.devices_per_invite
    max_uses = _integer(body, "max_uses", low=1, high=devices)
    invite = invites.new_record(
        session_id=record.id, role=role, name=_text(body, "name", limit=invites.NAME_MAX) or "",
        # None: valid as the Session's schedule says (server/schedule.py).
        ttl_s=ttl,
        # An invite is one person: a few devices, never a class.
        max_uses=max_uses if max_uses is not None else devices,
        created_by=grant.name or grant.participant_id, now=request.app[CLOCK]())
    until = schedule.valid_until(invite, record, config.training,
                                 config.recording.retention_days)
    if (record.starts_at is not None and until <= record.starts_at
            and body.get("allow_expiring") is not True):
        # Warned before it is made: an invite that dies before its Session
        # starts admits nobody (allow_expiring: true makes it anyway).
        hint = ("leave the validity out (it then lasts until the scheduled end)"
                if ttl is not None else
                f"no invite lasts more than {MAX_LIFETIME_S // 86400} days: make it closer "
                "to the Session")
        raise Conflict(f"this invite would expire {_span(record.starts_at - until)} before "
                       f"the Session starts; {hint}, or send allow_expiring",
                       code="invite_expires_early")
    token = await invites.create(request.app[STORE], request.app[TOKENS], invite)
    _audit(request, "invite_created", grant, session=record.id, invite=invite.id,
           role=role.value, name=invite.name, max_uses=invite.max_uses,
           expires_at=invite.expires_at, valid_for=invite.valid_for or "fixed")
    view = (await _invite_views(request, [invite]))[0]
    return web.json_response({"invite": view, "token": token, "link": view["link"],
                              "page": view["page"]}, status=201)


@routes.delete("/api/admin/sessions/{session}/invites/{invite}")
async def revoke_invite(request: web.Request) -> web.Response:
    grant = await session_admin(request)
    record = await _record(request)
    store = request.app[STORE]
    invite = await store.invites.get_invite(record.id, request.match_info["invite"])
    if invite is None:
        raise NotFound("no such invite (or it has expired)", code="unknown_invite")
    await store.invites.revoke_invite(invite.id, expires_at=invite.expires_at)
    if invite.revoked_at is None:
        invite = _revoked(invite)
        await store.invites.put_invite(invite)
        _audit(request, "invite_revoked", grant, session=record.id, invite=invite.id)
    await revocation.announce(request.app, [record.id], {"token": invite.id})
    return web.json_response({"invite": (await _invite_views(request, [invite]))[0]})


@routes.delete("/api/admin/sessions/{session}/invites")
async def revoke_all_invites(request: web.Request) -> web.Response:
    grant = await session_admin(request)
    record = await _record(request)
    before = time.time()
    await request.app[STORE].invites.revoke_session(record.id, before=before)
    _audit(request, "invites_revoked", grant, session=record.id, before=before)
    await revocation.announce(request.app, [record.id], {"before": before})
    return web.json_response({"session": record.id, "revoked_before": before})


# -- any token, one by one ----------------------------------------------------------

@routes.delete("/api/admin/tokens/{token}")
async def revoke_token(request: web.Request) -> web.Response:
    """Revoke one grant by its id (``jti``): a node-wide admin token, a token
    minted with ``scrubin token``, a device or derived token, and everything
    derived from it. The id alone is enough (no token lives longer than
    ``MAX_LIFETIME_S``, so the revocation is kept that long)."""
    grant = await node_admin(request)
    token_id = request.match_info["token"]
    if not is_grant_id(token_id):
        raise BadRequest("a token id is 1–64 printable ASCII characters (the token's jti)",
                         code="bad_request")
    until = time.time() + MAX_LIFETIME_S
    store = request.app[STORE]
    await store.invites.revoke_invite(token_id, expires_at=until)
    _audit(request, "token_revoked", grant, token=token_id)
    live = [r.id for r in await store.sessions.list_sessions("live")]
    await revocation.announce(request.app, [*live, *request.app[REGISTRY].sessions],
                              {"token": token_id})
    return web.json_response({"revoked": token_id, "until": until})


@routes.delete("/api/admin/tokens")
async def revoke_admin_tokens(request: web.Request) -> web.Response:
    """Revoke every node-wide admin token issued until now (the caller's too);
    Session tokens are untouched."""
    grant = await node_admin(request)
    before = time.time()
    store = request.app[STORE]
    await store.invites.revoke_session(NODE_WIDE, before=before)
    _audit(request, "admin_tokens_revoked", grant, before=before)
    live = [r.id for r in await store.sessions.list_sessions("live")]
    await revocation.announce(request.app, [*live, *request.app[REGISTRY].sessions],
                              {"before": before, "scope": NODE_WIDE})
    return web.json_response({"revoked_before": before})


def _revoked(invite: InviteRecord) -> InviteRecord:
    return dataclasses.replace(invite, revoked_at=time.time())


def _span(seconds: float) -> str:
    """"3 h 12 min" for messages."""
    minutes = max(0, int(seconds // 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


# -- redeeming an invite -------------------------------------------------------------

@routes.post("/api/invites/redeem")
async def redeem_invite(request: web.Request) -> web.Response:
    """The join page: an invite (bearer) becomes a personal token for this device."""
    grant = await authenticate(request, redeem=False, capped=True)
    invites.check_redeemable(grant)
    registry = request.app[REGISTRY]
    record = await registry.record(grant.session_id)
    if grant.session_id in registry.ended or (record is not None and record.state == "ended"):
        raise Gone(f"session {grant.session_id} has ended", code="session_ended")
    body = await _body(request, {"device", "name"})
    device = body.get("device")
    if not isinstance(device, str):
        raise BadRequest("device is required", code="bad_request")
    name = _text(body, "name", limit=invites.NAME_MAX) or ""
    token, personal = await invites.redeem(
        request.app[STORE], request.app[TOKENS], grant, device=device, name=name,
        devices=device_limit(request.app, grant))
    request.app[AUDIT].record("invite_redeemed", session=grant.session_id,
                              invite=grant.token_id, token=personal.token_id,
                              participant=personal.participant_id, role=grant.role.value,
                              name=personal.name, expires_at=personal.expires_at,
                              address=request.remote)
    return web.json_response({
        "token": token, "session": grant.session_id,
        "participant": {"id": personal.participant_id, "role": grant.role.value,
                        "name": personal.name},
        "expires_at": personal.expires_at,
        # Relative: the join page continues on the origin it was opened from.
        "page": invites.page_link("", grant.role, token),
    })
