"""De-identified exports over HTTP: asked for (admins), listed, opened in the
player, their files through signed URLs bound to the viewer's grant, signed
off or rejected, deleted; and the ones shared for teaching
(docs/protocol.md, "De-identified exports"; server/deidentified.py does the
work).

``setup(app)`` is the one call in ``create_app``, after the review API's: the
routes, the Node's ``DeidentifiedExports`` (``app[EXPORTS]``), and its
cleanup_ctx (exports a stopped process left unfinished are failed at start;
the ones being made are cancelled at shutdown).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from ..deidentified import DeidentifiedExports, subject
from ..errors import Forbidden, Unauthorized
from ..recordings import REVIEWERS
from .common import AUDIT, CONFIG, STORE, authenticate, read_json
from .review import RECORDINGS

EXPORTS = web.AppKey("deidentified_exports", DeidentifiedExports)
routes = web.RouteTableDef()


def setup(app: web.Application) -> None:
    exports = app[EXPORTS] = DeidentifiedExports(app[CONFIG], app[RECORDINGS], app[AUDIT])
    app[RECORDINGS].before_delete.append(exports.cancel_for)
    app.add_routes(routes)
    app.cleanup_ctx.append(_exports)


async def _exports(app: web.Application) -> AsyncIterator[None]:
    # After the review API's: the index of Recordings is open.
    await asyncio.to_thread(app[EXPORTS].open)
    yield
    await app[EXPORTS].close()


@routes.post("/api/recordings/{recording}/exports")
async def request_export(request: web.Request) -> web.Response:
    """A de-identified export of a Recording (admins): 202, made in the background."""
    grant = await authenticate(request)
    body = await read_json(request)
    summary = await request.app[EXPORTS].request(request.match_info["recording"], grant, body)
    return web.json_response({"export": summary}, status=202)


@routes.get("/api/sessions/{session}/exports")
async def list_exports(request: web.Request) -> web.Response:
    """Every de-identified export of the Session's Recordings, with its state
    and progress (its reviewers and admins)."""
    grant = await authenticate(request)
    session_id = request.match_info["session"]
    if not grant.covers(session_id):
        raise Forbidden("token is for another session", code="wrong_session")
    if grant.role not in REVIEWERS:
        raise Forbidden("de-identified exports are for reviewers and admins", code="wrong_role")
    return web.json_response({"exports": await request.app[EXPORTS].for_session(session_id)})


@routes.get("/api/exports/shared")
async def shared_exports(request: web.Request) -> web.Response:
    """The signed-off exports shared with this reviewer, whatever its Session."""
    grant = await authenticate(request)
    return web.json_response({"exports": await request.app[EXPORTS].shared(grant)})


@routes.get("/api/recordings/{recording}/exports/{export}")
async def get_export(request: web.Request) -> web.Response:
    """One export for the player (signed URLs; ``?playback=`` renews them)."""
    grant = await authenticate(request)
    if grant.role not in REVIEWERS:
        raise Forbidden("de-identified exports are for reviewers and admins", code="wrong_role")
    detail, _ = await request.app[EXPORTS].detail(
        request.match_info["recording"], request.match_info["export"], grant,
        request.query.get("playback", ""))
    return web.json_response(detail)


@routes.post("/api/recordings/{recording}/exports/{export}/review")
async def review_export(request: web.Request) -> web.Response:
    """Sign off or reject, after watching it in the player."""
    grant = await authenticate(request)
    if grant.role not in REVIEWERS:
        raise Forbidden("de-identified exports are reviewed by admins or reviewers",
                        code="wrong_role")
    body = await read_json(request)
    summary = await request.app[EXPORTS].review(
        request.match_info["recording"], request.match_info["export"], grant, body)
    return web.json_response({"export": summary})


@routes.delete("/api/recordings/{recording}/exports/{export}")
async def delete_export(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    deleted = await request.app[EXPORTS].delete(
        request.match_info["recording"], request.match_info["export"], grant)
    return web.json_response(deleted)


@routes.get("/api/recordings/{recording}/exports/{export}/media/{file}")
async def export_media(request: web.Request) -> web.StreamResponse:
    """A file of an export by signed URL: the signature, the viewer's grant
    against revocation (every request), whether it may still have it, then the
    file (HTTP Range)."""
    exports = request.app[EXPORTS]
    recordings = request.app[RECORDINGS]
    recording_id, export_id = request.match_info["recording"], request.match_info["export"]
    name = request.match_info["file"]
    ticket = recordings.signer.check(subject(recording_id, export_id), name, request.query)
    if await request.app[STORE].invites.is_revoked(ticket.token_ids, session_id=ticket.scope,
                                                   issued_at=ticket.issued_at):
        raise Unauthorized("the token these media URLs were issued to has been revoked",
                           code="token_revoked")
    path = await exports.media_path(recording_id, export_id, name, ticket)
    exports.served(ticket, recording_id, export_id, name, request.remote)
    return web.FileResponse(path, headers={
        "Content-Type": "video/mp4", "Cache-Control": "no-store", "Accept-Ranges": "bytes"})
