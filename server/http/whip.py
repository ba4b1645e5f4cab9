"""WHIP ingest (RFC 9725) per camera slot; WHEP egress per Feed (``/whep/s/room.video``)
and per camera slot (``/whep/s/room``: the camera and the narration on one connection).

Resources live at ``<endpoint>/<resource id>``; ids are random, and only the
token's Participant (or a moderator) may DELETE them. A DELETE made with the same
token soon after the resource ended by itself (clients often close their peer
connection first) is answered 200: the client's intent is met.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from ..errors import BadRequest, Forbidden, NotFound
from ..media.layers import Preference
from ..media.turn import link_headers
from ..roles import MODERATORS, PUBLISHERS
from ..tokens import Grant
from .common import (
    PEERS,
    audit_grant,
    audit_publication,
    authenticate,
    cors_headers,
    read_sdp,
    require_store,
    session_for,
    subscribe,
    subscribe_slot,
)

routes = web.RouteTableDef()

NO_TRICKLE = {"Allow": "DELETE, OPTIONS"}


_cors = cors_headers


def _created(request: web.Request, grant: Grant, answer: str, resource: str) -> web.Response:
    headers = CIMultiDict({
        "Location": f"{request.path.rstrip('/')}/{resource}",
        "ETag": f'"{resource}"',
        **_cors(request),
    })
    # RFC 9725 section 4.6: the ICE servers this client may use, its own TURN
    # credentials included (docs/protocol.md says how a client uses them).
    for link in link_headers(request.app[PEERS].ice_servers_for(grant).servers):
        headers.add("Link", link)
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers=headers)


@routes.options("/whip/{session}/{slot}")
@routes.options("/whep/{session}/{feed}")
@routes.options("/whip/{session}/{slot}/{resource}")
@routes.options("/whep/{session}/{feed}/{resource}")
async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Accept-Post": "application/sdp",
                                             "Allow": "POST, DELETE, OPTIONS",
                                             **_cors(request)})


@routes.post("/whip/{session}/{slot}")
async def whip_publish(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    # The expert's first publication brings a scheduled Session live here.
    session = await session_for(request, grant, start=grant.role in PUBLISHERS)
    offer = await read_sdp(request)
    await require_store(request.app)
    takeover = request.query.get("takeover", "") in ("1", "true")
    answer, ingest = await session.publish(grant, request.match_info["slot"], offer,
                                           via="whip", takeover=takeover)
    audit_publication(request.app, ingest, grant, request.remote, via="whip")
    return _created(request, grant, answer, ingest.id)


@routes.delete("/whip/{session}/{slot}/{resource}")
async def whip_delete(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    session = await session_for(request, grant)
    resource, slot = request.match_info["resource"], request.match_info["slot"]
    ingest = session.ingests.get(resource)
    if ingest is None and session.recently_ended(resource, f"whip:{slot}", grant):
        return web.Response(status=200, headers=_cors(request))
    if ingest is None or ingest.slot != slot:
        raise NotFound("no such WHIP resource", code="unknown_resource")
    await session.unpublish(grant, ingest.id)
    audit_grant(request.app, "publish_stop", grant, request.remote, slot=ingest.slot, via="whip")
    return web.Response(status=200, headers=_cors(request))


#: ``?layer=`` of a WHEP POST: which layer of a camera the player gets ("auto":
#: its link decides; an edge Node pulls "full" and "low" as two streams).
LAYERS = ("auto", "full", "low")


def _layer(request: web.Request) -> Preference:
    layer = request.query.get("layer", "auto")
    if layer == "auto":
        return "auto"
    if layer == "full":
        return "full"
    if layer == "low":
        return "low"
    raise BadRequest(f"layer must be one of {', '.join(LAYERS)}", code="bad_query")


@routes.post("/whep/{session}/{feed}")
async def whep_subscribe(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    layer = _layer(request)
    session = await session_for(request, grant)
    offer = await read_sdp(request)
    await require_store(request.app)
    target = request.match_info["feed"]
    if "." not in target:  # a slot name (Feed ids are <slot>.<kind>)
        answer, view = await subscribe_slot(request.app, session, grant, target, offer)
        for subscription in view.subscriptions:
            subscription.set_preference(layer)  # audio ignores it
        audit_grant(request.app, "subscribe", grant, request.remote, slot=view.slot,
                    feeds=[s.feed_id for s in view.subscriptions], via="whep")
        return _created(request, grant, answer, view.id)
    answer, subscription = await subscribe(request.app, session, grant, target, offer)
    subscription.set_preference(layer)
    audit_grant(request.app, "subscribe", grant, request.remote, feed=subscription.feed_id,
                via="whep")
    return _created(request, grant, answer, subscription.id)


@routes.delete("/whep/{session}/{feed}/{resource}")
async def whep_delete(request: web.Request) -> web.Response:
    grant = await authenticate(request)
    session = await session_for(request, grant)
    resource, target = request.match_info["resource"], request.match_info["feed"]
    view = session.slot_views.get(resource)
    if view is not None and view.slot == target:
        await session.unsubscribe_slot(grant, view.id)
        audit_grant(request.app, "unsubscribe", grant, request.remote, slot=view.slot,
                    via="whep")
        return web.Response(status=200, headers=_cors(request))
    subscription = session.subscriptions.get(resource)
    if subscription is None and session.recently_ended(resource, f"whep:{target}", grant):
        return web.Response(status=200, headers=_cors(request))
    if subscription is None or subscription.feed_id != target:
        raise NotFound("no such WHEP resource", code="unknown_resource")
    if subscription.participant_id != grant.participant_id and grant.role not in MODERATORS:
        raise Forbidden("this subscription belongs to someone else", code="not_owner")
    await session.unsubscribe(grant, subscription.id)
    audit_grant(request.app, "unsubscribe", grant, request.remote, feed=subscription.feed_id,
                via="whep")
    return web.Response(status=200, headers=_cors(request))


@routes.patch("/whip/{session}/{slot}/{resource}")
@routes.patch("/whep/{session}/{feed}/{resource}")
async def no_trickle(request: web.Request) -> web.Response:
    # Answers carry every candidate; trickle and ICE restart are refused
    # deliberately (RFC 9725 section 4.3.1 allows 405).
    grant = await authenticate(request)
    if not grant.covers(request.match_info["session"]):
        raise Forbidden("token is for another session", code="wrong_session")
    raise web.HTTPMethodNotAllowed("PATCH", ["DELETE", "OPTIONS"], headers=NO_TRICKLE)
