"""Websocket signalling for the browser pages (docs/protocol.md, "Websocket")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from .. import logs
from ..cluster import RemoteSession
from ..edge import EdgeSession
from ..errors import BadRequest, Conflict, Forbidden, ScrubinError, TooManyRequests
from ..interaction import MIC_SLOT, visible_to
from ..media.turn import ClientIce
from ..recordings import MESSAGE_TYPES as RECORDING_MESSAGES
from ..registry import SessionElsewhere
from ..roles import EDGE_ROLES, PUBLISHERS, ROSTER_READERS, VIEWERS, Role
from ..session import Event, Ingest, Session
from ..subscription import Subscription
from ..tokens import Grant
from .common import (
    ACCEPTING,
    AUDIT,
    CLUSTER,
    CONFIG,
    EDGES,
    MESSAGE_RATES,
    NODES,
    PEERS,
    PRESENCE,
    REGISTRY,
    SOCKET_GRANTS,
    STORE,
    WEBSOCKETS,
    audit_grant,
    audit_publication,
    authenticate,
    count_refusal,
    refused_auth,
    require_store,
    subscribe,
)
from .review import RECORDINGS

logger = logging.getLogger(__name__)

#: The socket's own requests (interaction and recording messages are handled by
#: their modules); docs/protocol.md lists them all, a test holds both together.
SOCKET_MESSAGES = frozenset({"ping", "publish", "unpublish", "subscribe", "unsubscribe",
                             "set_layer", "pause", "resume", "end_session"})

HELLO_TIMEOUT_S = 10.0
CLOSE_PROTOCOL = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TIMEOUT = 4408
#: RFC 6455 "try again later": shared state is unreachable, the Session has
#: not started yet, or too many failed logins: the client retries.
CLOSE_TRY_AGAIN = 1013
#: RFC 6455 policy violation: kept sending far over the message rate.
CLOSE_POLICY = 1008
#: Fresh TURN credentials are sent when this share of the last ones' lifetime is left.
ICE_REFRESH_AT = 0.5
#: The person already has ``limits.websockets_per_person`` sockets open.
CLOSE_TOO_MANY = 4409
#: Requests on a viewer's own Subscriptions: answered by the Node that serves
#: its media (the holder, or the edge it was placed on).
VIEWER_MEDIA = frozenset({"subscribe", "unsubscribe", "set_layer", "pause", "resume"})
#: What an edge's media copy of a Session tells a socket itself (the rest of
#: the Session's events come from the holder).
EDGE_EVENTS = frozenset({"layer", "subscription_closed"})


class Connection:
    """One signalling socket of one Participant, and what it created. Its
    Session is held here (``Session``) or by another Node (``RemoteSession``:
    requests go there; media requests are refused, but a viewer's own on an
    edge, where ``edge`` relays the Session's Feeds, server/edge.py)."""

    def __init__(self, app: web.Application, ws: web.WebSocketResponse,
                 session: Session | RemoteSession, grant: Grant,
                 edge: EdgeSession | None = None) -> None:
        self.app = app
        self.ws = ws
        self.session = session
        self.grant = grant
        self.edge = edge
        #: The Session continues elsewhere: close so that the page reconnects.
        self.moved = False
        self.ingests: dict[str, Ingest] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        #: When a message was last queued for the page (see keepalive()).
        self.sent_at = time.monotonic()
        self.address: str | None = None

    def audit(self, event: str, **fields: Any) -> None:
        audit_grant(self.app, event, self.grant, self.address, via="websocket", **fields)

    def send(self, message: dict[str, Any] | None) -> None:
        self.sent_at = time.monotonic()
        self.outbox.put_nowait(message)

    async def keepalive(self, every_s: float) -> None:
        """A ``keepalive`` whenever nothing else was sent for ``every_s``: the
        page's proof that this Node lives (docs/protocol.md, "Failover"). A task
        of its own, so that a request that takes long (forwarded to the holder,
        an edge's first pull) does not silence the socket."""
        while True:
            quiet = time.monotonic() - self.sent_at
            if quiet >= every_s:
                self.send({"type": "keepalive"})
                quiet = 0.0
            await asyncio.sleep(every_s - quiet)

    async def writer(self) -> None:
        while True:
            message = await self.outbox.get()
            if message is None or self.ws.closed:
                break
            try:
                await self.ws.send_json(message)
            except (ConnectionError, RuntimeError):
                return
        if self.moved and not self.ws.closed:
            # Reconnecting finds the Node that holds the Session now.
            await self.ws.close(code=WSCloseCode.SERVICE_RESTART, message=b"session moved")
        elif self.session.state == "ended" and not self.ws.closed:
            # session_ended was the last message: close with 1000 now, even while
            # the handler waits in receive() (close() wakes it up).
            await self.ws.close(code=WSCloseCode.OK, message=b"session ended")

    def roster_message(self) -> dict[str, Any]:
        viewers = sum(1 for p in self.session.participants.values() if p.role == Role.TRAINEE)
        participants = self.session.roster() if self.grant.role in ROSTER_READERS else []
        return {"type": "roster", "participants": participants, "viewers": viewers}

    def on_event(self, event: Event) -> None:
        kind = event["type"]
        if kind in ("participant_joined", "participant_left"):
            self.send(self.roster_message())
            if self.grant.role in ROSTER_READERS:
                # Join and leave notices for the expert's page (toasts).
                self.send({"type": "presence", "participant": event["participant"],
                           "event": "joined" if kind == "participant_joined" else "left",
                           "t": self.session.interaction.now()})
        elif kind == "interaction":
            if visible_to(event.get("to"), self.grant.role, self.grant.participant_id):
                self.send(event["message"])
        elif kind in ("feed", "recording"):
            self.send(event)
        elif kind == "slot_taken_over":
            if self.ingests.pop(event["ingest"], None) is not None:
                # This page published the slot: it must not publish it again by itself.
                self.send({"type": "publication_ended", "slot": event["slot"],
                           "reason": "taken_over", "by": event["by"]})
            elif self.grant.role in ROSTER_READERS:
                self.send({"type": "slot_taken_over", "slot": event["slot"],
                           "from": event["from"], "by": event["by"]})
        elif kind == "publication_refused":
            # Its publisher (a page) and the experts learn why a slot's media was refused.
            if self.ingests.pop(event["ingest"], None) is not None or (
                    self.grant.role in ROSTER_READERS):
                self.send({"type": "publication_refused", "slot": event["slot"],
                           "code": event["code"], "message": event["message"]})
        elif kind == "layer":
            if event["subscription"] in self.subscriptions:
                self.send({"type": "layer", "subscription": event["subscription"],
                           "feed": event["feed"], "layer": event["layer"]})
        elif kind == "subscription_closed":
            # Only the socket that made it; closed by its owner it needs no notice.
            if self.subscriptions.pop(event["subscription"], None) is not None and (
                    event["reason"] not in ("closed",)):
                self.send({"type": "subscription_closed", "subscription": event["subscription"],
                           "feed": event["feed"], "reason": event["reason"]})
        elif kind == "media_dropped":
            if self.grant.role in ROSTER_READERS:
                # The expert sees who dropped, and why.
                self.send({"type": "presence", "event": "dropped",
                           "participant": {"id": event["participant_id"],
                                           "name": event["name"]},
                           "role": event["role"], "slot": event.get("slot"),
                           "feed": event.get("feed"), "reason": event["reason"],
                           "t": self.session.interaction.now()})
        elif kind == "session_ended":
            self.send(event)
            self.send(None)
        elif kind == "session_moved":
            self.moved = True
            self.send(going_away(self.app, str(event.get("reason") or "")))
            self.send(None)

    async def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        kind = message.get("type")
        if not isinstance(kind, str):
            # Before any set lookup: a list or an object as the type is the
            # client's mistake, not a server error.
            raise BadRequest("type must be a string", code="unknown_type")
        session, grant = self.session, self.grant
        if kind == "ping":
            return {"type": "pong"}
        if isinstance(session, RemoteSession):
            if self.edge is not None and kind in VIEWER_MEDIA:
                # An edge: this Node relays the Feeds and serves the viewer.
                return await self.viewer_media(self.edge.session, message, self.edge)
            if self.edge is not None and kind in ("publish", "unpublish") and (
                    message.get("slot") == MIC_SLOT):
                # Its voice goes to the holder directly; only the signalling hops.
                return await session.forward_mic(grant, message)
            # Held by another Node: it answers (media: 409 with the Node to use).
            return await session.forward(grant, message)
        if kind in VIEWER_MEDIA:
            return await self.viewer_media(session, message)
        if kind == "publish":
            slot = _field(message, "slot")
            takeover = message.get("takeover", False)
            if not isinstance(takeover, bool):
                raise BadRequest("takeover must be true or false", code="bad_message")
            answer, ingest = await session.publish(grant, slot, _field(message, "sdp"),
                                                   via="page", takeover=takeover)
            for old in [i for i in self.ingests.values() if i.slot == slot]:
                self.ingests.pop(old.id, None)
            self.ingests[ingest.id] = ingest
            audit_publication(self.app, ingest, grant, self.address, via="websocket")
            return {"type": "answer", "slot": slot, "sdp": answer,
                    "feeds": [f.id for f in ingest.feeds]}
        if kind == "unpublish":
            slot = _field(message, "slot")
            await session.close_slot(grant, slot)
            for ingest in [i for i in self.ingests.values() if i.slot == slot]:
                self.ingests.pop(ingest.id, None)
            self.audit("publish_stop", slot=slot)
            return {"type": "ok"}
        if isinstance(kind, str) and kind in RECORDING_MESSAGES:  # start/stop_recording
            return await self.app[RECORDINGS].handle(session, grant, message)
        if isinstance(kind, str) and kind in session.interaction.message_types:
            # Drawings, steps, questions, chat, hands, microphone, sterile focus.
            return session.interaction.handle(grant, message)
        raise BadRequest(f"unknown message type {kind!r}", code="unknown_type")

    async def viewer_media(self, session: Session, message: dict[str, Any],
                           edge: EdgeSession | None = None) -> dict[str, Any]:
        """This socket's own Subscriptions: on the holder's Session, or on an
        edge's media copy of it (the same code: a Session either way)."""
        kind, grant = message.get("type"), self.grant
        if kind == "subscribe":
            feed_id, sdp = _field(message, "feed"), _field(message, "sdp")
            if edge is not None:
                await edge.feed(feed_id)  # pulled from the holder once for this Node
            answer, subscription = await subscribe(self.app, session, grant, feed_id, sdp)
            self.subscriptions[subscription.id] = subscription
            self.audit("subscribe", feed=feed_id)
            return {"type": "answer", "feed": feed_id, "subscription": subscription.id,
                    "sdp": answer}
        if kind == "unsubscribe":
            subscription_id = _field(message, "subscription")
            self.subscriptions.pop(subscription_id, None)
            await session.unsubscribe(grant, subscription_id)
            return {"type": "ok"}
        if kind == "set_layer":
            target = self.subscriptions.get(_field(message, "subscription"))
            if target is None:
                raise BadRequest("no such subscription on this connection",
                                 code="unknown_resource")
            layer = message.get("layer")
            if layer not in ("auto", "full", "low"):
                raise BadRequest("layer must be auto, full or low", code="bad_message")
            target.set_preference(layer)
            return {"type": "ok", "layer": target.layer}
        if kind in ("pause", "resume"):
            # A hidden video: stop sending it without tearing its connection down.
            target = self.subscriptions.get(_field(message, "subscription"))
            if target is None:
                raise BadRequest("no such subscription on this connection",
                                 code="unknown_resource")
            if kind == "pause":
                target.pause()
            else:
                target.resume()
            return {"type": "ok"}
        raise BadRequest(f"unknown message type {kind!r}", code="unknown_type")

    async def close_resources(self) -> None:
        """The socket is gone: its viewers' connections go with it; its
        publications wait for the expert's page to come back and re-publish."""
        for subscription in list(self.subscriptions.values()):
            await subscription.close()
        if not isinstance(self.session, Session):
            return
        for ingest in list(self.ingests.values()):
            if not ingest.closed and self.session.ingests.get(ingest.id) is ingest:
                self.session.ingests.pop(ingest.id, None)
                await ingest.close(final=False)


async def answer_forwarded(app: web.Application, session: Session, grant: Grant,
                           message: dict[str, Any]) -> dict[str, Any]:
    """A request of a page connected to another Node, for a Session held here
    (server/cluster.py): what ``Connection.handle`` does for it, but media."""
    if grant.session_id != session.id:
        raise Forbidden("token is for another session", code="wrong_session")
    kind = message.get("type")
    if kind == "publish" and message.get("slot") == MIC_SLOT:
        # The trainee microphone of a page an edge serves (RemoteSession.forward_mic).
        answer, ingest = await session.publish(grant, MIC_SLOT, _field(message, "sdp"),
                                               via="page")
        audit_publication(app, ingest, grant, None, via="websocket")
        return {"type": "answer", "slot": MIC_SLOT, "sdp": answer,
                "feeds": [f.id for f in ingest.feeds]}
    if kind == "unpublish" and message.get("slot") == MIC_SLOT:
        await session.close_slot(grant, MIC_SLOT)
        audit_grant(app, "publish_stop", grant, None, slot=MIC_SLOT, via="websocket")
        return {"type": "ok"}
    if kind == "end_session":
        session.check_moderator(grant)
        app[REGISTRY].spawn(session.end(f"ended by {grant.name or grant.role.value}"))
        return {"type": "ok"}
    if isinstance(kind, str) and kind in RECORDING_MESSAGES:
        return await app[RECORDINGS].handle(session, grant, message)
    if isinstance(kind, str) and kind in session.interaction.message_types:
        return session.interaction.handle(grant, message)
    raise BadRequest(f"unknown message type {kind!r}", code="unknown_type")


def going_away(app: web.Application, reason: str) -> dict[str, Any]:
    """The ``going_away`` message: reconnect. A draining Node names the Node
    to reconnect to (``node``); otherwise ``node`` is null and the page comes
    back to the Node it used, which routes it."""
    nodes = app[NODES]
    return {"type": "going_away", "reason": reason,
            "node": nodes.successor() if nodes.draining else None}


def _field(message: dict[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"message needs a string field {name!r}", code="bad_message")
    return value


async def _hello(ws: web.WebSocketResponse, request: web.Request
                 ) -> tuple[Grant, Any, bool] | None:
    """The authenticated grant, the hello's ``id`` and whether it asked for
    ``keepalive`` messages."""
    try:
        msg = await ws.receive(timeout=HELLO_TIMEOUT_S)
    except TimeoutError:
        await ws.close(code=CLOSE_TIMEOUT, message=b"no hello")
        return None
    if msg.type != WSMsgType.TEXT:
        await ws.close(code=CLOSE_PROTOCOL, message=b"expected a hello message")
        return None
    try:
        hello = json.loads(msg.data)
    except (ValueError, RecursionError):
        await ws.close(code=CLOSE_PROTOCOL, message=b"bad JSON")
        return None
    if not isinstance(hello, dict) or hello.get("type") != "hello":
        await ws.close(code=CLOSE_PROTOCOL, message=b"first message must be hello")
        return None
    try:
        grant = await authenticate(request, str(hello.get("token", "")))
    except ScrubinError as exc:
        exc = await refused_auth(request.app, exc, request.remote)
        count_refusal(request.app, exc, joining=False)
        if exc.status < 500:
            request.app[AUDIT].record("denied", code=exc.code, path="/ws",
                                      address=request.remote)
        await ws.send_json({"type": "error", "error": exc.to_dict(), "id": hello.get("id")})
        await ws.close(code=_refusal_close_code(exc), message=exc.code.encode())
        return None
    return grant, hello.get("id"), hello.get("keepalive") is True


def _refusal_close_code(exc: ScrubinError) -> int:
    if exc.status >= 500 or exc.status == 429 or exc.code == "session_not_started":
        return CLOSE_TRY_AGAIN
    if exc.code == "too_many_connections":
        return CLOSE_TOO_MANY
    return CLOSE_UNAUTHORIZED if exc.status == 401 else CLOSE_FORBIDDEN


def _claim_socket(app: web.Application, ws: web.WebSocketResponse, grant: Grant) -> None:
    """Count the socket against its person (an invite and all its devices, or
    a root token and what was derived from it), then register it, with no
    await between: 300 copies of one token get ``websockets_per_person``."""
    sockets = app[SOCKET_GRANTS]
    cap = app[CONFIG].limits.websockets_per_person
    mine = sum(1 for other, g in list(sockets.items()) if not other.closed
               and g.session_id == grant.session_id and g.person_id == grant.person_id)
    if mine >= cap:
        raise Conflict(f"at most {cap} open connections per person; close another tab or "
                       "device first", code="too_many_connections")
    sockets[ws] = grant


async def websocket(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    # A page that stops answering pings is gone within 1.5 heartbeats.
    ws = web.WebSocketResponse(max_msg_size=config.limits.ws_max_message_bytes,
                               heartbeat=config.liveness.ws_heartbeat_s)
    await ws.prepare(request)
    if not request.app[ACCEPTING]["joins"]:
        await ws.send_json(going_away(request.app, "this Node is shutting down"))
        await ws.close(code=WSCloseCode.GOING_AWAY)
        return ws
    hello = await _hello(ws, request)
    if hello is None:
        return ws
    grant, hello_id, wants_keepalive = hello
    logs.bind(grant.session_id, grant.participant_id)
    try:
        if grant.role not in VIEWERS:
            raise Forbidden(f"role {grant.role.value} has no live access", code="wrong_role")
        if grant.node_wide:
            raise Forbidden("a node-wide admin token joins no Session; use a Session's token",
                            code="wrong_session")
        # The expert joining brings a scheduled Session live on this Node.
        session: Session | RemoteSession
        try:
            session = await request.app[REGISTRY].resolve(grant.session_id,
                                                           start=grant.role in PUBLISHERS)
        except SessionElsewhere as where:
            # Held by another Node: joined through it; the welcome tells the
            # page where to connect for its media.
            session = await request.app[CLUSTER].attach(where)
        await require_store(request.app)
        _claim_socket(request.app, ws, grant)
        participant = session.join(grant)
    except ScrubinError as exc:
        request.app[SOCKET_GRANTS].pop(ws, None)
        count_refusal(request.app, exc, joining=True)
        if exc.status < 500:
            audit_grant(request.app, "denied", grant, request.remote, code=exc.code, path="/ws")
        await ws.send_json({"type": "error", "error": exc.to_dict(), "id": hello_id})
        await ws.close(code=_refusal_close_code(exc), message=exc.code.encode())
        return ws

    serving = _serving(request.app, grant, session)
    edge: EdgeSession | None = None
    if isinstance(session, RemoteSession) and serving["id"] == request.app[NODES].node_id:
        edge = request.app[EDGES].session_for(session)
    connection = Connection(request.app, ws, session, grant, edge)
    connection.address = request.remote
    audit_grant(request.app, "join", grant, request.remote, via="websocket")
    presence = request.app[PRESENCE]
    await presence.join(session.id, participant.id, grant.role, participant.name)
    request.app[WEBSOCKETS].add(ws)
    rate = request.app[MESSAGE_RATES].acquire(session.id, participant.id)
    stop_listening = session.listen(connection.on_event)
    stop_edge = (edge.session.listen(lambda event: connection.on_event(event)
                                     if event.get("type") in EDGE_EVENTS else None)
                 if edge is not None else (lambda: None))
    welcome = connection.roster_message()
    ice = request.app[PEERS].ice_servers_for(grant)
    nodes = request.app[NODES]
    here = {"id": nodes.node_id, "url": nodes.url}
    connection.send({
        "type": "welcome", "id": hello_id, "participant": participant.describe(),
        "session": session.describe(), "participants": welcome["participants"],
        "viewers": welcome["viewers"], "ice_servers": ice.servers,
        # Is it being recorded?
        "recording": (request.app[RECORDINGS].status(session) if isinstance(session, Session)
                      else session.recording),
        # The Node that serves this page's media: a page on another Node
        # connects there (docs/protocol.md, "Several Nodes").
        "node": here,
        "serving": serving,
        # Where to reconnect if this Node stops answering (any of them routes).
        "nodes": nodes.serving(),
    })
    writer = asyncio.ensure_future(connection.writer())
    refresher = asyncio.ensure_future(_refresh_ice_servers(connection, ice))
    keeper = (asyncio.ensure_future(connection.keepalive(config.liveness.ws_keepalive_s))
              if wants_keepalive else None)
    try:
        async for msg in ws:
            verdict = rate.take()
            if verdict != "ok":
                if await _refuse_for_rate(connection, verdict, msg.data):
                    break
                continue
            if msg.type != WSMsgType.TEXT:
                if msg.type == WSMsgType.ERROR:
                    break
                connection.send({"type": "error", "error": BadRequest(
                    "only JSON text messages", code="bad_message").to_dict()})
                continue
            await _dispatch(connection, msg.data)
            if writer.done():
                break
    finally:
        refresher.cancel()
        if keeper is not None:
            keeper.cancel()
        request.app[SOCKET_GRANTS].pop(ws, None)
        stop_listening()
        stop_edge()
        request.app[MESSAGE_RATES].release(session.id, participant.id)
        connection.send(None)
        with contextlib.suppress(Exception):
            await writer
        await connection.close_resources()
        session.leave(participant.id)
        if isinstance(session, RemoteSession):
            request.app[CLUSTER].left(session)
        await presence.leave(session.id, participant.id)
        audit_grant(request.app, "leave", grant, request.remote, via="websocket")
        if session.state == "ended" and not ws.closed:
            await ws.close(code=WSCloseCode.OK, message=b"session ended")
    return ws


def _serving(app: web.Application, grant: Grant, session: Session | RemoteSession
             ) -> dict[str, Any]:
    """The Node that serves this page's media. The holder, but for trainees
    when edges are on (``cluster.edges``): then the Node they joined, unless its
    Subscriptions exceed the least-loaded live Node's by
    ``cluster.placement_margin`` (that Node then; an edge relays the Feeds)."""
    nodes, cluster = app[NODES], app[CONFIG].cluster
    here = {"id": nodes.node_id, "url": nodes.url}
    holder = here if isinstance(session, Session) else {
        "id": session.holder, "url": session.holder_url}
    if not cluster.edges or grant.role not in EDGE_ROLES or app[STORE].kind == "memory":
        return holder
    loads = nodes.current_load()
    # Ties stay here: a page is moved only for a real difference.
    least = min(loads, key=lambda node: (loads[node], node != nodes.node_id, node))
    url = nodes.url_of(least)
    if loads[nodes.node_id] - loads[least] <= cluster.placement_margin or url is None:
        return here
    return {"id": least, "url": url}


async def _refresh_ice_servers(connection: Connection, ice: ClientIce) -> None:
    """New TURN credentials before the last ones expire, for the peer
    connections a page sets up later (a new Feed, a reconnect). Connections
    already up keep their relays. Nothing to refresh once the credentials
    last as long as the token."""
    peers = connection.app[PEERS]
    while ice.expires_at is not None and ice.expires_at < connection.grant.expires_at:
        lifetime = ice.expires_at - time.time()
        await asyncio.sleep(max(1.0, lifetime * (1 - ICE_REFRESH_AT)))
        ice = peers.ice_servers_for(connection.grant)
        connection.send({"type": "ice_servers", "ice_servers": ice.servers})


async def _refuse_for_rate(connection: Connection, verdict: str, data: Any) -> bool:
    """429 for a message over the Participant's rate (with its id, so the
    client's request fails at once); True once the socket is closed for it."""
    reply: dict[str, Any] = {"type": "error", "error": TooManyRequests(
        "too many messages; slow down", code="rate_limited").to_dict()}
    with contextlib.suppress(ValueError, TypeError, AttributeError, RecursionError):
        request_id = json.loads(data).get("id")
        if isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
            reply["id"] = request_id
    connection.send(reply)
    if verdict != "close":
        return False
    connection.audit("denied", code="rate_limited", request="websocket")
    connection.send(None)
    await connection.ws.close(code=CLOSE_POLICY, message=b"rate_limited")
    return True


async def _dispatch(connection: Connection, data: str) -> None:
    request_id: Any = None
    message_type: Any = None
    try:
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            raise BadRequest("message is not valid JSON", code="bad_json") from None
        if not isinstance(message, dict):
            raise BadRequest("message must be a JSON object", code="bad_message")
        request_id = message.get("id")
        message_type = message.get("type")
        if not isinstance(request_id, (str, int, type(None))) or isinstance(request_id, bool):
            request_id = None
            raise BadRequest("id must be a string or a number", code="bad_message")
        session = connection.session
        if message.get("type") == "end_session" and isinstance(session, Session):
            # Reply first: ending the Session closes this socket's outbox.
            session.check_moderator(connection.grant)
            connection.send({"type": "ok", "id": request_id})
            grant = connection.grant
            await session.end(f"ended by {grant.name or grant.role.value}")
            return
        reply = await connection.handle(message)
    except ScrubinError as exc:
        count_refusal(connection.app, exc, joining=message_type in ("publish", "subscribe"))
        if exc.status in (401, 403):
            connection.audit("denied", code=exc.code, request=str(message_type))
        reply = {"type": "error", "error": exc.to_dict()}
    except Exception:
        logger.exception("websocket message failed")
        reply = {"type": "error", "error": {"code": "internal", "message": "internal error",
                                            "fault": "server", "status": 500}}
    if request_id is not None:
        reply["id"] = request_id
    connection.send(reply)
