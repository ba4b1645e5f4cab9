"""The live teaching state of a Session across Nodes.

One Node holds a live Session (its lease, server/registry.py): its ``Session``
is the one authority for the media, the interaction state (drawings, steps,
questions, chat, hands, microphone, sterile focus), the roster and the
recording. A page may still be connected to another Node: a **member** of the
Session there. Both sides talk over the Session's channel of the store's
EventBus:

- the holder's ``Hub`` relays every Session event its participants see
  (``cluster.event``, with the lease's fence), answers forwarded requests
  (``cluster.request`` -> ``cluster.reply``) and counts the members of other
  Nodes in its roster (``cluster.member``, and the store's presence entries,
  re-read every ``store.presence_interval_s``, for what an event lost);
- a member Node's ``RemoteSession`` stands in for the ``Session`` for its
  websockets: it asks the holder for a snapshot when the first one joins,
  mirrors what it is told, and forwards every interaction, recording and
  ``end_session`` request, answering the websocket with the holder's reply.

Media never crosses here: publishing happens on the holding Node, and so
does subscribing, where pages move by themselves (the ``welcome`` names the
Node that serves them) and WHIP/WHEP clients are redirected; but with edges
(server/edge.py) a trainee's page may stay, and its Node relays the Feeds it
watches from the holder over WHEP. When the holder changes or
its Node goes, members are told to reconnect (``session_moved``) and are
routed anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .errors import Forbidden, ScrubinError, Unavailable
from .participant import Participant
from .registry import SessionElsewhere
from .roles import MODERATORS, Role
from .session import Event, Session, notify
from .store import EventSubscription, PresenceEntry, Store, StoreUnavailable
from .tokens import Grant

logger = logging.getLogger(__name__)

OWNER = "cluster.owner"
EVENT = "cluster.event"
REQUEST = "cluster.request"
REPLY = "cluster.reply"
MEMBER = "cluster.member"

#: Session events members see; the rest (a Subscription's layer, its closing)
#: concern connections that only exist on the holding Node.
RELAYED = frozenset({"participant_joined", "participant_left", "interaction", "feed",
                     "recording", "slot_taken_over", "media_dropped", "session_ended",
                     "session_moved"})
#: Websocket messages that need the Session's media: only on the holding Node.
MEDIA_MESSAGES = frozenset({"publish", "unpublish", "subscribe", "unsubscribe", "set_layer",
                            "pause", "resume"})
#: A member the holder has not yet seen in the presence entries is kept this
#: long (its join event may be ahead of its presence write).
MEMBER_GRACE_S = 10.0
#: A member Node keeps its stand-in this long after its last member left.
IDLE_REMOTE_S = 5.0

#: Answers a forwarded request on the holding Node (server/http/ws.py).
Answer = Callable[[Session, Grant, dict[str, Any]], Awaitable[dict[str, Any]]]


def grant_to_wire(grant: Grant) -> dict[str, Any]:
    data = dataclasses.asdict(grant)
    data["role"] = grant.role.value
    data["parents"] = list(grant.parents)
    return data


def grant_from_wire(data: Any) -> Grant:
    if not isinstance(data, dict):
        raise ValueError("grant must be an object")
    names = {f.name for f in dataclasses.fields(Grant)}
    fields = {k: v for k, v in data.items() if k in names}
    fields["role"] = Role(fields["role"])
    fields["parents"] = tuple(fields.get("parents", ()))
    return Grant(**fields)


def roster_view(participants: Iterable[Participant]) -> dict[str, Any]:
    people = list(participants)
    return {"roster": [p.describe() for p in people],
            "viewers": sum(1 for p in people if p.role == Role.TRAINEE)}


class _Outbox:
    """Publishes a Session's cluster messages one at a time, in order (the
    bus keeps the order of one publisher)."""

    def __init__(self, publish: Callable[[dict[str, Any]], Awaitable[None]], what: str) -> None:
        self._publish = publish
        self._what = what
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def put(self, message: dict[str, Any]) -> None:
        self._queue.put_nowait(message)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            message = await self._queue.get()
            if message is None:
                return
            try:
                await self._publish(message)
            except StoreUnavailable:
                pass  # at most once: members resynchronise (snapshot, presence)
            except Exception:
                logger.exception("cluster: %s could not publish", self._what)

    async def close(self) -> None:
        """Send what is queued, then stop."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclasses.dataclass
class _Member:
    participant_id: str
    node_id: str
    since: float


class Hub:
    """The holding Node's side of one live Session."""

    def __init__(self, session: Session, *, node_id: str, fence: Callable[[], int | None],
                 publish: Callable[[dict[str, Any]], Awaitable[None]], answer: Answer,
                 recording: Callable[[Session], dict[str, Any]]) -> None:
        self.session = session
        self._node_id = node_id
        self._fence = fence
        self._answer = answer
        self._recording = recording
        self._outbox = _Outbox(publish, f"session {session.id}")
        self._members: dict[tuple[str, str], _Member] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unlisten = session.listen(self._relay)
        self._outbox.put({"type": OWNER, "node": node_id, "fence": fence()})

    # -- to the members ----------------------------------------------------
    def _relay(self, event: Event) -> None:
        kind = event.get("type")
        if kind not in RELAYED:
            return
        if kind in ("participant_joined", "participant_left"):
            event = {**event, **roster_view(self.session.participants.values()),
                     "t": self.session.interaction.now()}
        self._outbox.put({"type": EVENT, "node": self._node_id, "fence": self._fence(),
                          "event": event})

    def snapshot(self) -> dict[str, Any]:
        return {"session": self.session.describe(),
                **roster_view(self.session.participants.values()),
                "recording": self._recording(self.session),
                "t": self.session.interaction.now(), "fence": self._fence()}

    # -- from the members --------------------------------------------------
    def on_message(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == MEMBER:
            self._member(event)
        elif kind == REQUEST:
            task = asyncio.ensure_future(self._request(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _member(self, event: dict[str, Any]) -> None:
        node = event.get("node")
        person = event.get("participant")
        if not isinstance(node, str) or node == self._node_id or not isinstance(person, dict):
            return
        try:
            participant_id, role = str(person["id"]), Role(person["role"])
            name = str(person.get("name") or role.value)
        except (KeyError, ValueError):
            return
        if event.get("op") == "join":
            self._add(participant_id, role, name, node)
        elif event.get("op") == "leave":
            self._remove(participant_id, node)

    def _add(self, participant_id: str, role: Role, name: str, node: str) -> None:
        key = (participant_id, node)
        if key in self._members or self.session.state != "live":
            return
        self._members[key] = _Member(participant_id, node, time.monotonic())
        self.session.join_member(participant_id, role, name, node_id=node)

    def _remove(self, participant_id: str, node: str) -> None:
        if self._members.pop((participant_id, node), None) is not None:
            self.session.leave(participant_id)

    def nodes_gone(self, nodes: set[str]) -> None:
        for participant_id, node in [k for k in self._members if k[1] in nodes]:
            self._remove(participant_id, node)

    def reconcile(self, entries: list[PresenceEntry], alive: Callable[[str], bool]) -> None:
        """The presence entries are what every Node says is connected: add the
        members an event missed, drop the ones whose Node stopped saying so."""
        present = {(e.participant_id, e.node_id): e for e in entries
                   if e.node_id != self._node_id and alive(e.node_id)}
        for (participant_id, node), entry in present.items():
            self._add(participant_id, entry.role, entry.name, node)
        now = time.monotonic()
        for key, member in list(self._members.items()):
            if key not in present and (now - member.since > MEMBER_GRACE_S
                                       or not alive(member.node_id)):
                self._remove(*key)

    async def _request(self, event: dict[str, Any]) -> None:
        node, rid = event.get("node"), event.get("rid")
        if not isinstance(node, str) or not isinstance(rid, str):
            return
        message = event.get("message")
        try:
            if not isinstance(message, dict):
                raise ValueError("message must be an object")
            if message.get("type") == "snapshot":
                reply = {"type": "snapshot", **self.snapshot()}
            else:
                grant = grant_from_wire(event.get("grant"))
                reply = await self._answer(self.session, grant, message)
        except ScrubinError as exc:
            reply = {"type": "error", "error": exc.to_dict()}
        except (ValueError, TypeError, KeyError):
            reply = {"type": "error", "error": {"code": "bad_message", "fault": "protocol",
                                                "message": "malformed forwarded request",
                                                "status": 400}}
        except Exception:
            logger.exception("session %s: forwarded request failed", self.session.id)
            reply = {"type": "error", "error": {"code": "internal", "fault": "server",
                                                "message": "internal error", "status": 500}}
        self._outbox.put({"type": REPLY, "node": self._node_id, "to": node, "rid": rid,
                          "fence": self._fence(), "reply": reply})

    async def close(self) -> None:
        self._unlisten()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._outbox.close()


class _Clock:
    """The holder's Session clock, as a member Node estimates it."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def set(self, t: float) -> None:
        self._t0 = time.monotonic() - t

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 3)


class RemoteSession:
    """A Session held by another Node, as this Node's websockets see it.

    Has what ``server/http/ws.py`` uses of a ``Session``: ``id``, ``state``,
    ``participants`` (the holder's roster), ``roster()``, ``describe()``,
    ``listen()``, ``join()``, ``leave()``, ``interaction.now()``,
    ``check_moderator()``; ``forward()`` sends everything else to the holder."""

    def __init__(self, session_id: str, *, node_id: str, holder: str, url: str | None,
                 store: Store, timeout_s: float,
                 on_bus_event: Callable[[str, dict[str, Any]], None],
                 on_closed: Callable[[RemoteSession], None]) -> None:
        self.id = session_id
        self.state = "live"
        self.moved = False
        self.holder = holder
        self.holder_url = url
        self.fence = 0
        self.recording: dict[str, Any] = {"type": "recording", "state": "off", "since": None}
        self.participants: dict[str, Participant] = {}
        self.interaction = _Clock()
        self._node_id = node_id
        self._store = store
        self._timeout_s = timeout_s
        self._on_bus_event = on_bus_event
        self._on_closed = on_closed
        self._description: dict[str, Any] = {"id": session_id, "feeds": []}
        self._listeners: set[Callable[[Event], None]] = set()
        # Local connections per participant (their websockets on this Node).
        self._connections: dict[str, int] = {}
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._rids = itertools.count(1)
        self._subscription: EventSubscription | None = None
        self._reader: asyncio.Task[None] | None = None
        self._outbox = _Outbox(lambda m: store.events.publish(session_id, m),
                               f"session {session_id} (member)")
        self._closing = False

    # -- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        """Subscribe, then ask the holder where things stand."""
        self._subscription = await self._store.events.subscribe(self.id)
        self._reader = asyncio.ensure_future(self._read(self._subscription))
        snapshot = await self._ask(None, {"type": "snapshot"})
        self._apply_snapshot(snapshot)

    def _apply_snapshot(self, snapshot: dict[str, Any]) -> None:
        if isinstance(snapshot.get("session"), dict):
            self._description = snapshot["session"]
        self._set_roster(snapshot.get("roster"))
        if isinstance(snapshot.get("t"), (int, float)):
            self.interaction.set(float(snapshot["t"]))
        if isinstance(snapshot.get("recording"), dict):
            self.recording = snapshot["recording"]
        if isinstance(snapshot.get("fence"), int):
            self.fence = max(self.fence, snapshot["fence"])

    async def _read(self, subscription: EventSubscription) -> None:
        try:
            async for event in subscription:
                self._on_message(event)
        except Exception:
            logger.exception("session %s: member reader failed", self.id)
        if not self._closing:
            # Cut off (too slow, or the store closed): what we mirror may be
            # stale; the members reconnect and start afresh.
            self.moved_away("lost track of the Session's events")

    def _on_message(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        node = event.get("node")
        fence = event.get("fence")
        if kind == REPLY:
            if event.get("to") == self._node_id:
                future = self._pending.pop(str(event.get("rid")), None)
                if future is not None and not future.done():
                    reply = event.get("reply")
                    future.set_result(reply if isinstance(reply, dict) else {})
            return
        if kind in (OWNER, EVENT):
            if not isinstance(fence, int) or fence < self.fence:
                return  # from a holder fenced off since
            if node != self.holder or (self.fence and fence > self.fence):
                # Another Node, or the same one restarted: a new incarnation.
                self.moved_away(f"node {node} holds the Session now")
                return
            self.fence = fence
            if kind == EVENT and isinstance(event.get("event"), dict):
                self._apply(event["event"])
            return
        if kind in (REQUEST, MEMBER):
            return
        # Revocations and the like, for this Node's connections.
        self._on_bus_event(self.id, event)

    def _apply(self, event: Event) -> None:
        kind = event.get("type")
        if kind in ("participant_joined", "participant_left"):
            self._set_roster(event.get("roster"))
        elif kind == "feed" and isinstance(event.get("feed"), dict):
            feed = event["feed"]
            feeds = [f for f in self._description.get("feeds", []) if f.get("id") != feed["id"]]
            if feed.get("state") != "closed":
                feeds.append(feed)
            self._description = {**self._description, "feeds": feeds}
        elif kind == "recording":
            self.recording = event
        elif kind in ("session_ended", "session_moved"):
            self.state = "ended"
            self.moved = kind == "session_moved"
        self._emit(event)
        if self.state == "ended":
            self._closed()

    def _set_roster(self, roster: Any) -> None:
        if not isinstance(roster, list):
            return
        people: dict[str, Participant] = {}
        for entry in roster:
            try:
                people[str(entry["id"])] = Participant(
                    id=str(entry["id"]), role=Role(entry["role"]), name=str(entry["name"]),
                    node_id="")
            except (KeyError, TypeError, ValueError):
                continue
        self.participants = people

    def moved_away(self, reason: str) -> None:
        """The holder changed or went: every member reconnects (and is routed
        to whoever holds the Session then)."""
        if self.state != "live":
            return
        logger.info("session %s: %s; members reconnect", self.id, reason)
        self.state = "ended"
        self.moved = True
        self._emit({"type": "session_moved", "reason": reason})
        self._closed()

    def _closed(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable("the Session moved; reconnecting",
                                                 code="session_moving"))
        self._pending.clear()
        self._on_closed(self)

    async def close(self) -> None:
        """The last member left (or the Node stops)."""
        self._closing = True
        if self.state == "live":
            self.state = "ended"
        if self._subscription is not None:
            await self._subscription.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._outbox.close()
        for future in self._pending.values():
            if not future.done():
                future.cancel()

    # -- what a websocket uses -----------------------------------------------
    def listen(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def _emit(self, event: Event) -> None:
        notify(self._listeners, event, self.id)

    def describe(self) -> dict[str, Any]:
        return {**self._description, "state": self.state}

    def roster(self) -> list[dict[str, object]]:
        return [p.describe() for p in self.participants.values()]

    def join(self, grant: Grant) -> Participant:
        if self.state != "live":
            raise Unavailable("the Session moved; reconnect", code="session_moving")
        count = self._connections.get(grant.participant_id, 0) + 1
        self._connections[grant.participant_id] = count
        participant = Participant(id=grant.participant_id, role=grant.role,
                                  name=grant.name or grant.role.value, node_id=self._node_id)
        if count == 1:
            self._outbox.put({"type": MEMBER, "node": self._node_id, "op": "join",
                              "participant": participant.describe()})
        return participant

    def leave(self, participant_id: str) -> None:
        count = self._connections.get(participant_id, 0) - 1
        if count > 0:
            self._connections[participant_id] = count
            return
        self._connections.pop(participant_id, None)
        if self.state == "live":
            self._outbox.put({"type": MEMBER, "node": self._node_id, "op": "leave",
                              "participant": {"id": participant_id, "role": "trainee"}})

    @property
    def members(self) -> int:
        return len(self._connections)

    def check_moderator(self, grant: Grant) -> None:
        if grant.session_id != self.id:
            raise Forbidden("token is for another session", code="wrong_session")
        if grant.role not in MODERATORS:
            raise Forbidden(f"role {grant.role.value} may not end the session",
                            code="wrong_role")

    def elsewhere(self) -> SessionElsewhere:
        return SessionElsewhere(self.id, self.holder, self.holder_url)

    async def forward(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        """A websocket request, answered by the holding Node. Media requests
        are refused here (409 session_elsewhere, with the Node to move to)."""
        if message.get("type") in MEDIA_MESSAGES:
            raise self.elsewhere()
        reply = await self._ask(grant, message)
        if reply.get("type") == "error" and isinstance(reply.get("error"), dict):
            raise _Replied(reply["error"])
        return reply

    async def forward_mic(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        """The trainee microphone of a page an edge serves (server/edge.py): its
        ``publish``/``unpublish`` is answered by the holder (whose answer names the
        holder's ICE candidates: the browser sends its voice there directly)."""
        reply = await self._ask(grant, message)
        if reply.get("type") == "error" and isinstance(reply.get("error"), dict):
            raise _Replied(reply["error"])
        return reply

    async def _ask(self, grant: Grant | None, message: dict[str, Any]) -> dict[str, Any]:
        if self.state != "live":
            raise Unavailable("the Session moved; reconnecting", code="session_moving")
        rid = f"{next(self._rids)}-{secrets.token_hex(4)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        payload = {k: v for k, v in message.items() if k != "id"}
        self._outbox.put({"type": REQUEST, "node": self._node_id, "rid": rid,
                          "grant": grant_to_wire(grant) if grant is not None else None,
                          "message": payload})
        try:
            async with asyncio.timeout(self._timeout_s):
                return await future
        except TimeoutError:
            raise Unavailable(f"node {self.holder}, which holds this Session, did not answer; "
                              "try again", code="node_unreachable") from None
        finally:
            self._pending.pop(rid, None)


class _Replied(ScrubinError):
    """An error the holding Node answered, passed on as it was."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message", "")), code=str(error.get("code", "error")))
        self.status = int(error.get("status", 400))
        fault = error.get("fault")
        self.fault = fault if fault in ("user", "protocol", "server") else "server"
        self._error = error

    def to_dict(self) -> dict[str, Any]:
        return dict(self._error)


class Cluster:
    """This Node's hubs (Sessions it holds) and remote Sessions (members here
    of Sessions held elsewhere)."""

    def __init__(self, store: Store, *, node_id: str, answer: Answer,
                 fence: Callable[[str], int | None], alive: Callable[[str], bool],
                 recording: Callable[[Session], dict[str, Any]],
                 timeout_s: float, reconcile_s: float) -> None:
        self._store = store
        self._node_id = node_id
        self._answer = answer
        self._recording = recording
        self._fence = fence
        self._alive = alive
        self._timeout_s = timeout_s
        self._reconcile_s = reconcile_s
        self.hubs: dict[str, Hub] = {}
        self.remote: dict[str, RemoteSession] = {}
        self._opening: dict[str, asyncio.Task[RemoteSession]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconciler: asyncio.Task[None] | None = None
        self._closing = False
        self._idle: set[asyncio.Task[None]] = set()
        #: Told when a stand-in closes (an edge ends its media copy then).
        self.on_remote_closed: list[Callable[[RemoteSession], None]] = []
        #: Bus events that are not cluster messages (revocations…).
        self.on_bus_event: Callable[[str, dict[str, Any]], None] = lambda sid, event: None

    # -- the holding side --------------------------------------------------
    def session_changed(self, session: Session, state: str) -> None:
        """Registry hook: a Session went live here, or ended here."""
        if self._store.kind == "memory":
            return  # one Node: nobody to relay to
        if state == "live":
            old = self.hubs.pop(session.id, None)
            if old is not None:
                self._spawn(old.close())
            self.hubs[session.id] = Hub(
                session, node_id=self._node_id, fence=lambda: self._fence(session.id),
                publish=lambda m: self._store.events.publish(session.id, m),
                answer=self._answer, recording=self._recording)
        elif state == "ended":
            hub = self.hubs.get(session.id)
            if hub is not None and hub.session is session:
                del self.hubs[session.id]
                self._spawn(hub.close())

    def on_event(self, session_id: str, event: dict[str, Any]) -> None:
        """Registry hook: an event of a Session held here."""
        hub = self.hubs.get(session_id)
        if hub is not None and event.get("type") in (MEMBER, REQUEST):
            hub.on_message(event)
        elif event.get("type") not in (OWNER, EVENT, REPLY, MEMBER, REQUEST):
            self.on_bus_event(session_id, event)

    def nodes_gone(self, nodes: set[str]) -> None:
        for hub in list(self.hubs.values()):
            hub.nodes_gone(nodes)
        for remote in list(self.remote.values()):
            if remote.holder in nodes:
                remote.moved_away(f"node {remote.holder} is gone")

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_s)
            for session_id, hub in list(self.hubs.items()):
                try:
                    entries = await self._store.presence.roster(session_id)
                except StoreUnavailable:
                    break
                if self.hubs.get(session_id) is hub:
                    hub.reconcile(entries, self._alive)

    # -- the member side ---------------------------------------------------
    async def attach(self, where: SessionElsewhere) -> RemoteSession:
        """This Node's stand-in for a Session held elsewhere (one per Session,
        shared by its websockets here). 503 if the holder does not answer."""
        remote = self.remote.get(where.session_id)
        if remote is not None and remote.state == "live" and remote.holder == where.node_id:
            return remote
        opening = self._opening.get(where.session_id)
        if opening is None:
            opening = asyncio.ensure_future(self._open(where))
            self._opening[where.session_id] = opening
            opening.add_done_callback(lambda _: self._opening.pop(where.session_id, None))
        return await asyncio.shield(opening)

    async def _open(self, where: SessionElsewhere) -> RemoteSession:
        remote = RemoteSession(where.session_id, node_id=self._node_id, holder=where.node_id,
                               url=where.url, store=self._store, timeout_s=self._timeout_s,
                               on_bus_event=self.on_bus_event, on_closed=self._forget)
        try:
            await remote.open()
        except BaseException:
            await remote.close()
            raise
        old = self.remote.get(where.session_id)
        self.remote[where.session_id] = remote
        if old is not None:
            old.moved_away(f"node {where.node_id} holds the Session now")
        return remote

    def _forget(self, remote: RemoteSession) -> None:
        if self.remote.get(remote.id) is remote:
            del self.remote[remote.id]
        for listener in list(self.on_remote_closed):
            try:
                listener(remote)
            except Exception:
                logger.exception("session %s: a stand-in listener failed", remote.id)
        self._spawn(remote.close())

    def left(self, remote: RemoteSession) -> None:
        """A member's websocket closed: the stand-in closes a little after the
        last one (a page reloading comes straight back)."""
        if remote.members == 0 and remote.state == "live":
            task = asyncio.ensure_future(self._close_idle(remote))
            self._idle.add(task)
            task.add_done_callback(self._idle.discard)

    async def _close_idle(self, remote: RemoteSession) -> None:
        await asyncio.sleep(IDLE_REMOTE_S)
        if remote.members == 0 and remote.state == "live" and not self._closing:
            remote.state = "ended"
            self._forget(remote)

    # -- lifecycle -----------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        self._reconciler = asyncio.ensure_future(self._reconcile_loop())

    def hand_over(self) -> None:
        """This Node drains: its members of Sessions held elsewhere reconnect
        (to another Node: ``going_away`` names it)."""
        for remote in list(self.remote.values()):
            remote.moved_away("this Node is shutting down")

    async def close(self) -> None:
        self._closing = True
        for task in list(self._idle):
            task.cancel()
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        for remote in list(self.remote.values()):
            remote.moved_away("server shutting down")
        for hub in list(self.hubs.values()):
            self._spawn(hub.close())
        self.hubs.clear()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

