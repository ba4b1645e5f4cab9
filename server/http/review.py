"""Review API: recording control over HTTP, the library of Recordings, one
Recording for the player, its media (HTTP Range) and thumbnail through signed
URLs bound to the viewer's grant, deletion and legal hold (docs/protocol.md,
"Recording"; docs/security.md, "Recordings";
server/recordings.py does the work).

``setup(app)`` is the one call in ``create_app``: it adds the routes, the
Node's ``Recordings`` (``app[RECORDINGS]``), recording control for every
Session that goes live, and the retention and repair tasks (a cleanup_ctx).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from ..errors import BadRequest, Conflict, Forbidden, Unauthorized
from ..recordings import REVIEWERS, Recordings
from ..roles import Role
from ..session import Session
from .common import AUDIT, CONFIG, NODE_ID, REGISTRY, STORE, authenticate, read_json, session_for

RECORDINGS = web.AppKey("recordings", Recordings)
routes = web.RouteTableDef()


def setup(app: web.Application) -> None:
    recordings = app[RECORDINGS] = Recordings(app[CONFIG], app[AUDIT], store=app[STORE],
                                              node_id=app[NODE_ID])
    app.add_routes(routes)
    registry = app[REGISTRY]
    previous = registry.on_session

    def on_session(session: Session, state: str) -> None:
        if previous is not None:
            previous(session, state)
        if state == "live":
            recordings.attach_session(session)
        elif state == "ended":
            recordings.forget_session(session)

    registry.on_session = on_session
    app.cleanup_ctx.append(_recordings)


async def _recordings(app: web.Application) -> AsyncIterator[None]:
    recordings = app[RECORDINGS]
    # Recordings of live Sessions that another Node continues are not finished here.
    await recordings.load_resumable()
    await asyncio.to_thread(recordings.open)
    # Sessions of the configuration went live before the app had hooks.
    for session in list(app[REGISTRY].sessions.values()):
        recordings.attach_session(session)
    loops = [asyncio.ensure_future(recordings.retention_loop()),
             asyncio.ensure_future(recordings.maintenance_loop())]
    yield
    for loop in loops:
        loop.cancel()
    for loop in loops:
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    await recordings.close()
    # Running recordings stop with their Sessions (Session.end), after this.


def _who(grant_role: Role, participant: str, name: str) -> dict[str, str]:
    return {"id": participant, "name": name or grant_role.value, "role": grant_role.value}


@routes.post("/api/sessions/{session}/recording")
async def start_recording(request: web.Request) -> web.Response:
    """Start recording a live Session (expert, admin), as ``start_recording``."""
    grant = await authenticate(request)
    session = await session_for(request, grant)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("expected {\"consent\": {...}}", code="bad_json")
    reply = await request.app[RECORDINGS].handle(
        session, grant, {"type": "start_recording", "consent": body.get("consent")})
    return web.json_response({"recording": reply["recording"]}, status=201)


@routes.delete("/api/sessions/{session}/recording")
async def stop_recording(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    session = await session_for(request, grant)
    reply = await request.app[RECORDINGS].handle(session, grant, {"type": "stop_recording"})
    return web.json_response({"recording": reply["recording"]})


@routes.get("/api/sessions/{session}/recordings")
async def list_recordings(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    session_id = request.match_info["session"]
    if not grant.covers(session_id):
        raise Forbidden("token is for another session", code="wrong_session")
    if grant.role not in REVIEWERS:
        raise Forbidden("recordings are for reviewers and admins", code="wrong_role")
    recordings = request.app[RECORDINGS]
    await recordings.refresh()  # what other Nodes recorded on the shared root
    expires = recordings.expiry(grant)
    # The library's thumbnails are one "playback" per listing.
    browse = recordings.signer.playback(session_id, grant)
    return web.json_response({
        "recordings": [recordings.listed(e, expires, grant, browse)
                       for e in recordings.for_session(session_id)],
        "expires_at": expires,
    })


@routes.get("/api/recordings/{recording}")
async def get_recording(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    recordings = request.app[RECORDINGS]
    if grant.role not in REVIEWERS:
        raise Forbidden("recordings are for reviewers and admins", code="wrong_role")
    recording_id = request.match_info["recording"]
    await recordings.refresh()
    recordings.check_access(grant, recordings.entry(recording_id))
    # The player renews its URLs with ?playback=: the same playback, not a
    # new viewing (one audit entry per playback and part). Anything else is
    # a new playback.
    playback = request.query.get("playback", "")
    renewing = recordings.signer.is_playback(playback, recording_id, grant)
    if not renewing:
        playback = recordings.signer.playback(recording_id, grant)
    detail = await asyncio.to_thread(recordings.detail, recording_id,
                                     recordings.expiry(grant), grant, playback)
    if not renewing:
        request.app[AUDIT].record("recording_viewed", session=detail["recording"]["session"],
                                  recording=recording_id, participant=grant.participant_id,
                                  role=grant.role.value, name=grant.name, playback=playback,
                                  address=request.remote)
    return web.json_response(detail)


@routes.delete("/api/recordings/{recording}")
async def delete_recording(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    recordings = request.app[RECORDINGS]
    if grant.role is not Role.ADMIN:
        raise Forbidden("only admins delete recordings", code="wrong_role")
    recording_id = request.match_info["recording"]
    await recordings.refresh(missing=recording_id)
    recordings.check_access(grant, recordings.entry(recording_id))
    deleted = await recordings.delete(recording_id, reason="deleted",
                                      by=_who(grant.role, grant.participant_id, grant.name))
    return web.json_response(deleted)


async def _admin_of(request: web.Request) -> tuple[Recordings, str, dict[str, str]]:
    grant = await authenticate(request)
    recordings = request.app[RECORDINGS]
    if grant.role is not Role.ADMIN:
        raise Forbidden("only admins put recordings on legal hold", code="wrong_role")
    recording_id = request.match_info["recording"]
    await recordings.refresh(missing=recording_id)
    recordings.check_access(grant, recordings.entry(recording_id))
    return recordings, recording_id, _who(grant.role, grant.participant_id, grant.name)


@routes.put("/api/recordings/{recording}/hold")
async def hold(request: web.Request) -> web.Response:
    """Legal hold (admin): ``{"reason"}``; retention skips it, deletion refuses."""
    recordings, recording_id, by = await _admin_of(request)
    body = await read_json(request)
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str):
        raise BadRequest("a legal hold needs {\"reason\": \"...\"}", code="bad_hold")
    placed = await recordings.set_hold(recording_id, reason=reason, by=by)
    return web.json_response({"recording": recording_id, "hold": placed})


@routes.delete("/api/recordings/{recording}/hold")
async def release(request: web.Request) -> web.Response:
    recordings, recording_id, by = await _admin_of(request)
    if not recordings.entry(recording_id).get("hold"):
        raise Conflict("this recording is not on legal hold", code="not_on_hold")
    await recordings.set_hold(recording_id, reason=None, by=by)
    return web.json_response({"recording": recording_id, "hold": None})


async def _serve(request: web.Request, name: str) -> web.StreamResponse:
    """A part or thumbnail by signed URL: the signature, then the viewer's
    grant against revocation (every request, Range requests included: a
    revoked reviewer's player stops at its next request), then the file."""
    recordings = request.app[RECORDINGS]
    recording_id = request.match_info["recording"]
    ticket = recordings.signer.check(recording_id, name, request.query)
    if await request.app[STORE].invites.is_revoked(ticket.token_ids, session_id=ticket.scope,
                                                   issued_at=ticket.issued_at):
        raise Unauthorized("the token these media URLs were issued to has been revoked",
                           code="token_revoked")
    await recordings.refresh(missing=recording_id)
    path, content_type = await asyncio.to_thread(recordings.media_path, recording_id, name)
    recordings.audit_media(ticket, recordings.entry(recording_id).get("session"), recording_id,
                           name, request.remote)
    # FileResponse answers Range requests with 206 and Content-Range. Never
    # kept by a browser or proxy cache: health data, and access is per request.
    return web.FileResponse(path, headers={
        "Content-Type": content_type, "Cache-Control": "no-store", "Accept-Ranges": "bytes"})


@routes.get("/api/recordings/{recording}/media/{part}")
async def media(request: web.Request) -> web.StreamResponse:
    return await _serve(request, request.match_info["part"])


@routes.get("/api/recordings/{recording}/thumbnail")
async def thumbnail(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "thumbnail")
