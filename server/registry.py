"""Registry: the Theatres this Node knows and the Sessions live on it.

Sessions hold peer connections, so a live ``Session`` object belongs to one
Node and stays there. What every Node must agree on (which Theatres and
Sessions exist, each Session's state, and which Node holds a live one) lives
in the shared store:

- A live Session is held by one Node at a time through a **lease** in the
  store (``cluster.lease_ttl_s``, renewed every third of it) with a fencing
  token. The Node holding it has the ``Session`` object; every other Node
  sends its callers there (``SessionElsewhere``). A Node that cannot renew
  stops believing it holds the Session once its lease would have expired,
  before any other Node can take it: two Nodes never both think they hold it.
- A Session scheduled in the store becomes live on the Node where its expert
  first joins or publishes, or where an admin starts it (``start``); a live
  Session nobody holds (its Node died, or was stopped longer than the lease)
  is taken by the next Node a participant asks.
- ``Session.end()`` records "ended" in the store (fenced: a Node that lost the
  lease cannot end the Session another Node holds); an admin ending a Session
  held by another Node asks that Node, through the store's events.
- Sessions of the configuration are created once: every Node may have the
  same ``[[sessions]]``; each writes them if absent, and the one that gets the
  lease at start holds them. A configured Session the store says has ended
  stays ended (a Session id names one Session forever, docs/security.md).
- Node shutdown ends the local Sessions (the close cascade) but keeps their
  leases until they expire: the same Node (same ``server.node_id``) restarted
  within ``lease_ttl_s`` takes them back (a new fence fences off its previous
  run); after that, any Node may.
- A Node that learns another Node took one of its Sessions (a renewal says
  the lease is lost) ends its copy as *moved*: participants reconnect and are
  sent to the new holder.

Store writes that follow a local change (``add_theatre``, ``create_session``,
a Session ending) run in the background, in order; media never waits for
shared state, and a write the store refuses is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from .config import Config
from .errors import Conflict, Gone, NotFound, ScrubinError, Unavailable
from .media.peers import PeerFactory
from .session import Session
from .store import Lease, SessionRecord, Store, StoreUnavailable
from .theatre import Theatre, check_name

logger = logging.getLogger(__name__)

#: Event asking the Node that holds a live Session to end it.
END_EVENT = "session_end_requested"
#: Pause before a Session's event watcher subscribes again after an outage.
WATCH_RETRY_S = 2.0
#: A Node stops believing it holds a lease this much before the lease would
#: expire in the store (clock rates differ a little; the store's TTL is
#: counted from when it received the renewal, ours from when we sent it).
LEASE_MARGIN = 0.1


class SessionElsewhere(Conflict):
    """The Session is live and held by another Node (409 ``session_elsewhere``,
    with that Node; a WHIP/WHEP POST gets a 307 to it, a page's websocket joins
    through it)."""

    code = "session_elsewhere"

    def __init__(self, session_id: str, node_id: str, url: str | None) -> None:
        super().__init__(f"session {session_id} is live on node {node_id}; connect there")
        self.session_id = session_id
        self.node_id = node_id
        self.url = url

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "node": {"id": self.node_id, "url": self.url}}


class NodeDraining(Unavailable):
    """This Node is stopping (SIGTERM): it takes no new joins, publications or
    viewers (503 ``node_draining``, with ``node``: another live Node to use,
    when there is one). The caller's fault it is not; retrying there works."""

    code = "node_draining"

    def __init__(self, node: dict[str, str] | None) -> None:
        super().__init__("this Node is shutting down; connect to another Node"
                         + (f" ({node['url']})" if node else ""))
        self.node = node

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "node": self.node}


class Registry:
    def __init__(self, config: Config, peers: PeerFactory, node_id: str,
                 store: Store | None = None, *,
                 node_url: Callable[[str], Awaitable[str | None]] | None = None) -> None:
        self._config = config
        self._peers = peers
        self._node_id = node_id
        self._store = store
        #: A Node's public URL from the Node registry (None: not in it).
        self._node_url = node_url
        self._lease_ttl_s = config.cluster.lease_ttl_s
        self.theatres: dict[str, Theatre] = {}
        self.sessions: dict[str, Session] = {}
        #: Ids of Sessions that ended on this Node: they answer 410, not 404.
        self.ended: set[str] = set()
        #: The fence of each Session's lease this Node holds, and until when
        #: (monotonic) it may believe it still holds it.
        self.fences: dict[str, int] = {}
        self._held_until: dict[str, float] = {}
        self.totals: Counter[str] = Counter()
        self.on_first_frame: Callable[[float], None] | None = None
        #: Media-plane events for /metrics ("feed", state), ("drop", reason)...
        self.on_media_count: Callable[[str, str], None] | None = None
        #: The Node's liveness task: Feeds register their stall checks there.
        self.watch_stream: Callable[[Callable[[float], None]], Callable[[], None]] | None = None
        self.on_session: Callable[[Session, str], None] | None = None
        #: Every other event of the store's bus for a Session live here.
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        self._writes = asyncio.Lock()
        self._starting = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._write_tasks: set[asyncio.Task[Any]] = set()
        self._deferred: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._watchers: dict[str, asyncio.Task[None]] = {}
        #: Sessions made live by ``create_session`` whose lease is being taken.
        self._claims: dict[str, asyncio.Task[None]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._closing = False
        #: Draining (SIGTERM): every join is refused with ``NodeDraining``
        #: naming what this callable says (another live Node, or None).
        self.draining: Callable[[], dict[str, str] | None] | None = None
        for t in config.theatres:
            self.add_theatre(Theatre(t.id, t.name, tuple(t.slots)))

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def store(self) -> Store | None:
        return self._store

    # -- theatres ---------------------------------------------------------
    def add_theatre(self, theatre: Theatre) -> Theatre:
        """A Theatre of this Node (configuration, tests); also written to the store."""
        if theatre.id in self.theatres and self.theatres[theatre.id] != theatre:
            raise Conflict(f"theatre {theatre.id} exists with other slots", code="theatre_exists")
        self.theatres[theatre.id] = theatre
        if self._store is not None:
            store = self._store
            self._write(f"theatre {theatre.id}", lambda: store.theatres.put_theatre(theatre))
        return theatre

    async def get_theatre(self, theatre_id: str) -> Theatre | None:
        if self._store is not None:
            found = await self._store.theatres.get_theatre(theatre_id)
            if found is not None:
                return found
        return self.theatres.get(theatre_id)

    async def put_theatre(self, theatre: Theatre) -> None:
        """Create or replace (admin API). Live Sessions keep the slots they
        started with; new Sessions get these."""
        if self._store is not None:
            await self._store.theatres.put_theatre(theatre)
        self.theatres[theatre.id] = theatre

    async def delete_theatre(self, theatre_id: str) -> bool:
        existed = self.theatres.pop(theatre_id, None) is not None
        if self._store is not None:
            existed = await self._store.theatres.delete_theatre(theatre_id) or existed
        return existed

    # -- leases -----------------------------------------------------------
    def holds(self, session_id: str) -> bool:
        """This Node holds the Session's lease now (it may act as its owner)."""
        if self._store is None or self._store.kind == "memory":
            # One Node: nobody else could hold it (its lease is kept all the same).
            return session_id in self.sessions
        return self._held_until.get(session_id, 0.0) > time.monotonic()

    def _hold(self, session_id: str, fence: int, since: float) -> None:
        self.fences[session_id] = fence
        self._held_until[session_id] = since + self._lease_ttl_s * (1 - LEASE_MARGIN)

    def _unhold(self, session_id: str) -> None:
        self.fences.pop(session_id, None)
        self._held_until.pop(session_id, None)

    async def _elsewhere(self, lease: Lease) -> ScrubinError:
        url = await self._node_url(lease.node_id) if self._node_url is not None else None
        if url is None:
            # Held by a Node that is not (or no longer) in the registry: it is
            # restarting, or its lease expires within lease_ttl_s.
            return Unavailable(f"session {lease.session_id} is held by node {lease.node_id}, "
                               "which does not answer now; try again shortly",
                               code="session_moving")
        return SessionElsewhere(lease.session_id, lease.node_id, url)

    async def _acquire(self, session_id: str) -> Lease:
        assert self._store is not None
        asked = time.monotonic()
        lease = await self._store.leases.acquire_lease(session_id, ttl_s=self._lease_ttl_s)
        if lease.node_id == self._node_id:
            self._hold(session_id, lease.fence, asked)
        return lease

    async def _keep_leases(self) -> None:
        """Renew every lease this Node holds, every third of the TTL, in one
        round trip; end what was lost as moved."""
        assert self._store is not None
        store = self._store
        while not self._closing:
            await asyncio.sleep(self._lease_ttl_s / 3)
            held = {sid: fence for sid, fence in self.fences.items() if sid in self.sessions}
            if not held:
                continue
            asked = time.monotonic()
            try:
                lost = await store.leases.renew_leases(held, ttl_s=self._lease_ttl_s)
            except StoreUnavailable:
                lapsed = [sid for sid in held if not self.holds(sid)]
                if lapsed:
                    logger.warning("lease of %s not renewed in time: not acting as its holder "
                                   "until the store answers", ", ".join(lapsed))
                continue
            for session_id, fence in held.items():
                if session_id in lost:
                    self._lost(session_id)
                elif self.fences.get(session_id) == fence:
                    self._hold(session_id, fence, asked)

    def _lost(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        self._unhold(session_id)
        if session is not None and session.state == "live":
            logger.warning("session %s: another Node holds it now; ending it here", session_id)
            self.spawn(session.end("this Session moved to another Node", moved=True))

    # -- sessions ---------------------------------------------------------
    def create_session(self, session_id: str, theatre_id: str, title: str,
                       procedure: str = "") -> Session:
        """A Session live on this Node at once (the demo, tests); recorded as
        live in the store and its lease taken in the background (requests for
        it wait for that). If another Node holds its lease, it ends here."""
        check_name("session", session_id)
        if session_id in self.ended:
            # A Session id names one Session forever (docs/security.md).
            raise Gone(f"session {session_id} has ended; its id is not used again",
                       code="session_ended")
        theatre = self.theatres.get(theatre_id)
        if theatre is None:
            raise NotFound(f"no theatre {theatre_id!r}", code="unknown_theatre")
        existing = self.sessions.get(session_id)
        if existing is not None and existing.state == "live":
            raise Conflict(f"session {session_id} is already live", code="session_exists")
        session = self._activate(session_id, theatre, title, procedure)
        if self._store is not None and not _loop_running():
            self._deferred.append((f"session {session_id} live", lambda: self._claim(session)))
        elif self._store is not None:
            claim = self.spawn(self._claim(session))
            self._claims[session_id] = claim
            claim.add_done_callback(lambda _: self._claims.pop(session_id, None))
        return session

    async def _claim(self, session: Session) -> None:
        await self._run_write(f"session {session.id} live", lambda: self._record_live(session))
        if session.state != "live":
            return
        try:
            lease = await self._acquire(session.id)
        except StoreUnavailable as exc:
            logger.warning("session %s: lease not taken yet (%s)", session.id, exc.message)
            return
        if lease.node_id != self._node_id:
            logger.warning("session %s is held by node %s; not here", session.id, lease.node_id)
            await session.end("this Session is held by another Node", moved=True)

    def _activate(self, session_id: str, theatre: Theatre, title: str,
                  procedure: str) -> Session:
        session = Session(session_id=session_id, theatre=theatre, title=title,
                          procedure=procedure, config=self._config, peers=self._peers,
                          node_id=self._node_id, totals=self.totals,
                          on_first_frame=self._first_frame, on_ended=self._ended,
                          count=self._media_count, watch_stream=self.watch_stream)
        self.ended.discard(session_id)
        self.sessions[session_id] = session
        if self.on_session is not None:
            self.on_session(session, "live")
        if self._store is not None and _loop_running():
            self._spawn(self._watch(session), watcher_of=session_id)
        logger.info("session %s live in theatre %s", session_id, theatre.id)
        return session

    def detached(self, session_id: str, theatre: Theatre, title: str,
                 procedure: str = "") -> Session:
        """A Session object for media only, neither registered here nor leased:
        an edge Node's local copy of a Session held elsewhere, whose Feeds are
        relayed from the holder (server/edge.py). Its Feeds and Subscriptions
        count in this Node's metrics and liveness like any other."""
        return Session(session_id=session_id, theatre=theatre, title=title,
                       procedure=procedure, config=self._config, peers=self._peers,
                       node_id=self._node_id, totals=self.totals,
                       on_first_frame=self._first_frame, count=self._media_count,
                       watch_stream=self.watch_stream)

    def _media_count(self, what: str, label: str) -> None:
        if self.on_media_count is not None:
            self.on_media_count(what, label)

    def _first_frame(self, seconds: float) -> None:
        if self.on_first_frame is not None:
            self.on_first_frame(seconds)

    def _ended(self, session: Session) -> None:
        # An ended Session holds nothing live; forget it, remember its id
        # (unless it moved: it lives on elsewhere).
        fence = self.fences.get(session.id)
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self._unhold(session.id)
            if not session.moved:
                self.ended.add(session.id)
        watcher = self._watchers.pop(session.id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if self.on_session is not None:
            self.on_session(session, "ended")
        if self._store is not None and not session.moved and not self._closing:
            self._write(f"session {session.id} ended",
                        lambda: self._end_record(session.id, fence))

    def get(self, session_id: str) -> Session:
        """The Session live on this Node (no store lookup)."""
        session = self.sessions.get(session_id)
        if session is None and session_id in self.ended:
            raise Gone(f"session {session_id} has ended", code="session_ended")
        if session is None:
            raise NotFound(f"no session {session_id!r}", code="unknown_session")
        return session

    async def record(self, session_id: str) -> SessionRecord | None:
        """The Session as every Node sees it (None without a store or if unknown)."""
        if self._store is None:
            return None
        return await self._store.sessions.get_session(session_id)

    async def lease(self, session_id: str) -> Lease | None:
        """Who holds the Session now (None: nobody, or no store)."""
        if self._store is None:
            return None
        return await self._store.leases.get_lease(session_id)

    async def resolve(self, session_id: str, *, start: bool = False) -> Session:
        """The live Session for a join or a request. ``start``: the caller may
        bring a scheduled Session live (its expert joining or publishing).

        404 unknown_session, 410 session_ended, 409 session_not_started (a
        scheduled Session, not started by this caller), 409 session_elsewhere
        (``SessionElsewhere``: held by another Node), 503 if the store is
        unreachable or the Node that holds it does not answer; 503
        node_draining while this Node drains."""
        if self.draining is not None:
            raise NodeDraining(self.draining())
        claim = self._claims.get(session_id)
        if claim is not None:
            await asyncio.shield(claim)
        local = self.sessions.get(session_id)
        if local is not None and self.holds(session_id):
            return local
        if self._store is None:
            return self.get(session_id)
        if local is not None:
            # Ours, but its lease is not confirmed (the store did not answer
            # the last renewals): no Node may act as its holder now.
            raise StoreUnavailable(f"session {session_id}: confirming which Node holds it; "
                                   "retry shortly")
        record = await self._store.sessions.get_session(session_id)
        if record is None:
            return self.get(session_id)
        if record.state == "ended":
            raise Gone(f"session {session_id} has ended", code="session_ended")
        if record.state == "scheduled" and not start:
            raise Conflict(f"session {session_id} has not started yet; you join as soon as "
                           "it does", code="session_not_started")
        lease = await self._store.leases.get_lease(session_id)
        if lease is not None and lease.node_id != self._node_id:
            raise await self._elsewhere(lease)
        # Scheduled and started by this caller, live and held by nobody, or
        # held by this Node's previous run: this Node takes it.
        return await self.start(session_id)

    async def start(self, session_id: str) -> Session:
        """Bring a scheduled Session live on this Node, or take a live one
        nobody holds (resumed); the live Session if this Node holds it."""
        if self.draining is not None:
            raise NodeDraining(self.draining())
        async with self._starting:
            local = self.sessions.get(session_id)
            if local is not None and self.holds(session_id):
                return local
            if self._store is None:
                return self.get(session_id)
            record = await self._store.sessions.get_session(session_id)
            if record is None:
                return self.get(session_id)
            if record.state == "ended":
                raise Gone(f"session {session_id} has ended", code="session_ended")
            if record.state == "live" and session_id in self.ended:
                # Ended here while the store was unreachable: not a Session to
                # resume. Record the end again.
                self._write(f"session {session_id} ended",
                            lambda: self._end_record(session_id, None))
                raise Gone(f"session {session_id} has ended", code="session_ended")
            theatre = await self.get_theatre(record.theatre_id)
            if theatre is None:
                raise Conflict(f"theatre {record.theatre_id!r} of session {session_id} no "
                               "longer exists", code="unknown_theatre")
            lease = await self._acquire(session_id)
            if lease.node_id != self._node_id:
                raise await self._elsewhere(lease)
            if record.state == "scheduled":
                try:
                    record = await self._store.sessions.set_session_state(
                        session_id, "live", fence=lease.fence)
                except ScrubinError:
                    await self._release(session_id, lease.fence)
                    raise
            if local is not None:
                # Our own copy from before the lease lapsed: it may be stale.
                self._unhold(session_id)
                await local.end("this Session is taken up again", moved=True)
                self._hold(session_id, lease.fence, time.monotonic())
            return self._activate(record.id, theatre, record.title, record.procedure)

    async def _release(self, session_id: str, fence: int) -> None:
        self._unhold(session_id)
        if self._store is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._store.leases.release_lease(session_id, fence)

    async def end(self, session_id: str, reason: str) -> SessionRecord | None:
        """End a Session wherever it is (admin API): here through the close
        cascade, on the Node that holds it by asking it, and in the store
        either way. Ending an ended Session is not an error."""
        local = self.sessions.get(session_id)
        if local is not None:
            await local.end(reason)
            await self.flush()
        if self._store is None:
            if local is None:
                self.get(session_id)
            return None
        record = await self._store.sessions.get_session(session_id)
        if record is None:
            if local is None:
                self.get(session_id)
            return None
        if record.state != "ended":
            lease = await self._store.leases.get_lease(session_id)
            with contextlib.suppress(Conflict):
                record = await self._store.sessions.set_session_state(session_id, "ended")
            if lease is not None and lease.node_id != self._node_id:
                await self._store.events.publish(session_id, {
                    "type": END_EVENT, "reason": reason, "node": self._node_id})
        return await self._store.sessions.get_session(session_id) or record

    async def describe(self, session_id: str) -> dict[str, Any]:
        """What ``Session.describe`` says, also for a Session that is not live
        here (scheduled, or live on another Node): then without Feeds."""
        local = self.sessions.get(session_id)
        if local is not None:
            return local.describe()
        record = await self.record(session_id)
        if record is None:
            self.get(session_id)
            raise NotFound(f"no session {session_id!r}", code="unknown_session")
        if record.state == "ended":
            raise Gone(f"session {session_id} has ended", code="session_ended")
        theatre = await self.get_theatre(record.theatre_id)
        return {
            "id": record.id, "title": record.title, "procedure": record.procedure,
            "state": record.state, "starts_at": record.starts_at,
            "theatre": theatre.describe() if theatre is not None else
            {"id": record.theatre_id, "name": record.theatre_id, "slots": []},
            "feeds": [],
        }

    # -- store writes -----------------------------------------------------
    async def _record_live(self, session: Session) -> None:
        store = self._store
        assert store is not None
        record = SessionRecord(id=session.id, theatre_id=session.theatre.id,
                               title=session.title, procedure=session.procedure, state="live")
        try:
            await store.sessions.create_session(record)
        except NotFound:
            # A Theatre only this Node knew (added without the store).
            await store.theatres.put_theatre(session.theatre)
            await store.sessions.create_session(record)
        except Conflict:
            existing = await store.sessions.get_session(session.id)
            if existing is not None and existing.state == "ended":
                # A Session id names one Session forever (old tokens, invites
                # and recordings name it).
                logger.warning("session %s ended before this Node started; it stays ended "
                               "(give it a new id)", session.id)
                await session.end("this Session has ended")
            elif existing is not None and existing.state == "scheduled":
                await store.sessions.set_session_state(session.id, "live")

    async def _open_configured(self) -> None:
        """Each configured Session: created in the store once (whichever Node
        comes first), held by the Node that gets its lease."""
        store = self._store
        assert store is not None
        for configured in self._config.sessions:
            theatre = self.theatres.get(configured.theatre)
            if theatre is None:
                continue
            record = SessionRecord(id=configured.id, theatre_id=configured.theatre,
                                   title=configured.title, procedure=configured.procedure,
                                   state="live")
            try:
                try:
                    await store.sessions.create_session(record)
                except Conflict:
                    existing = await store.sessions.get_session(configured.id)
                    if existing is not None and existing.state == "ended":
                        logger.warning("session %s ended before this Node started; it stays "
                                       "ended (give the configuration a new id)", configured.id)
                        self.ended.add(configured.id)
                        continue
                await self.start(configured.id)
            except SessionElsewhere as where:
                logger.info("session %s is held by node %s", configured.id, where.node_id)
            except (StoreUnavailable, ScrubinError) as exc:
                logger.warning("session %s: not opened here (%s)", configured.id, exc.message)

    async def _end_record(self, session_id: str, fence: int | None) -> None:
        store = self._store
        assert store is not None
        record = await store.sessions.get_session(session_id)
        if record is None or record.state != "live":
            return
        try:
            if fence is None:
                lease = await store.leases.get_lease(session_id)
                if lease is not None and lease.node_id != self._node_id:
                    return  # someone else's incarnation now
                await store.sessions.set_session_state(session_id, "ended")
            else:
                await store.sessions.set_session_state(session_id, "ended", fence=fence)
                await store.leases.release_lease(session_id, fence)
        except Conflict as exc:
            logger.info("session %s: not recorded as ended (%s)", session_id, exc.message)

    def _write(self, what: str, op: Callable[[], Awaitable[None]]) -> None:
        if not _loop_running():
            # Built outside the event loop (configuration): written by open().
            self._deferred.append((what, op))
            return
        task = self.spawn(self._run_write(what, op))
        self._write_tasks.add(task)
        task.add_done_callback(self._write_tasks.discard)

    async def _run_write(self, what: str, op: Callable[[], Awaitable[None]]) -> None:
        async with self._writes:
            try:
                await op()
            except (StoreUnavailable, ScrubinError) as exc:
                logger.warning("store: could not record %s: %s", what, exc.message)
            except Exception:
                logger.exception("store: recording %s failed", what)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """A background task of this Node, awaited at shutdown."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn(self, coro: Awaitable[None], *, watcher_of: str) -> None:
        self._watchers[watcher_of] = self.spawn(coro)

    async def open(self) -> None:
        """App start: write what was created before the loop ran; keep leases."""
        deferred, self._deferred = self._deferred, []
        for what, op in deferred:
            await self._run_write(what, op)
        for session in list(self.sessions.values()):
            if self._store is not None and session.id not in self._watchers:
                self._spawn(self._watch(session), watcher_of=session.id)
        if self._store is not None:
            self._keeper = self.spawn(self._keep_leases())

    async def open_configured(self) -> None:
        """App start, once every hook is in place: the Sessions of the
        configuration (see ``_open_configured``)."""
        if self._store is not None:
            await self._open_configured()

    async def flush(self) -> None:
        """Wait for the store writes (and lease claims) queued so far."""
        pending = [*self._write_tasks, *self._claims.values()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _watch(self, session: Session) -> None:
        """End the local Session when an admin on another Node ends it; hand
        every other event to ``on_event``."""
        store = self._store
        assert store is not None
        while session.state == "live" and not self._closing:
            try:
                subscription = await store.events.subscribe(session.id)
            except StoreUnavailable:
                await asyncio.sleep(WATCH_RETRY_S)
                continue
            reason = None
            try:
                # Anything said while not subscribed shows in the record.
                with contextlib.suppress(StoreUnavailable):
                    record = await store.sessions.get_session(session.id)
                    if (record is not None and record.state == "ended"
                            and (record.ended_at or 0) >= session.created_at):
                        reason = "ended by an admin"
                if reason is None:
                    self._event(session.id, {"type": "subscribed"})
                    async for event in subscription:
                        if event.get("type") == END_EVENT:
                            reason = str(event.get("reason") or "ended by an admin")
                            break
                        self._event(session.id, event)
            finally:
                await subscription.close()
            if reason is not None:
                await session.end(reason)
                return
            if session.state == "live" and not self._closing:
                await asyncio.sleep(WATCH_RETRY_S)

    def _event(self, session_id: str, event: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(session_id, event)
        except Exception:
            logger.exception("session %s: event handler failed", session_id)

    async def hand_over(self, successor: Callable[[], dict[str, str] | None]) -> None:
        """Draining: refuse every join from now on, and give every Session held
        here up at once: its lease released (fenced), then the Session ended
        as *moved* (participants are told to reconnect, and ``successor`` is
        where; the next Node asked takes the lease at once instead of after
        ``lease_ttl_s``)."""
        self.draining = successor
        for session in list(self.sessions.values()):
            fence = self.fences.get(session.id)
            if fence is not None:
                await self._release(session.id, fence)
            else:
                self._unhold(session.id)
            await session.end("this Node is shutting down; the Session continues on "
                              "another Node", moved=True)

    async def close(self) -> None:
        """Node shutdown: end every Session here (the whole close cascade) as
        moved; their leases expire by themselves, so this Node takes them back
        if it is back within ``lease_ttl_s``."""
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
        for session in list(self.sessions.values()):
            await session.end("server shutting down", moved=True)
        for task in list(self._watchers.values()):
            task.cancel()
        self._watchers.clear()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
