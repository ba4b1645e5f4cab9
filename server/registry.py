"""Registry: the Theatres this Node knows and the Sessions live on it.

Sessions hold peer connections, so a live ``Session`` object belongs to one
Node and stays here. What every Node must agree on (which Theatres and
Sessions exist, and each Session's state) lives in the shared store:

- A Session scheduled in the store becomes live on this Node when its expert
  first joins or publishes here, or when an admin starts it (``start``).
- ``Session.end()`` records "ended" in the store; an admin ending a Session
  live on another Node asks that Node, through the store's events, to end it.
- Theatres and Sessions from the configuration are live at start, and written
  to the store like the others; a configured Session the store says has ended
  stays ended (a Session id names one Session forever, docs/security.md).
- Node shutdown ends the local Sessions (the close cascade) but leaves them
  "live" in the store: the same Node (same ``server.node_id``) resumes one
  when its participants reconnect.

Store writes that follow a local change (``add_theatre``, ``create_session``,
a Session ending) run in the background, in order; media never waits for
shared state, and a write the store refuses is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from .config import Config
from .errors import Conflict, Gone, NotFound, ScrubinError
from .media.peers import PeerFactory
from .session import Session
from .store import SessionRecord, Store, StoreUnavailable
from .theatre import Theatre, check_name

logger = logging.getLogger(__name__)

#: Event asking the Node that holds a live Session to end it.
END_EVENT = "session_end_requested"
#: Pause before a Session's event watcher subscribes again after an outage.
WATCH_RETRY_S = 2.0


class Registry:
    def __init__(self, config: Config, peers: PeerFactory, node_id: str,
                 store: Store | None = None) -> None:
        self._config = config
        self._peers = peers
        self._node_id = node_id
        self._store = store
        self.theatres: dict[str, Theatre] = {}
        self.sessions: dict[str, Session] = {}
        #: Ids of Sessions that ended on this Node: they answer 410, not 404.
        self.ended: set[str] = set()
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
        self._closing = False
        for t in config.theatres:
            self.add_theatre(Theatre(t.id, t.name, tuple(t.slots)))
        for configured in config.sessions:
            self.create_session(configured.id, configured.theatre, configured.title,
                                configured.procedure)

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

    # -- sessions ---------------------------------------------------------
    def create_session(self, session_id: str, theatre_id: str, title: str,
                       procedure: str = "") -> Session:
        """A Session live on this Node at once (configuration, the demo, tests);
        recorded as live in the store in the background."""
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
        if self._store is not None:
            self._write(f"session {session_id} live", lambda: self._record_live(session))
        return session

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
            # Outside the loop (configuration): open() starts the watcher.
            self._spawn(self._watch(session), watcher_of=session_id)
        logger.info("session %s live in theatre %s", session_id, theatre.id)
        return session

    def _media_count(self, what: str, label: str) -> None:
        if self.on_media_count is not None:
            self.on_media_count(what, label)

    def _first_frame(self, seconds: float) -> None:
        if self.on_first_frame is not None:
            self.on_first_frame(seconds)

    def _ended(self, session: Session) -> None:
        # An ended Session holds nothing live; forget it, remember its id.
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.ended.add(session.id)
        watcher = self._watchers.pop(session.id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if self.on_session is not None:
            self.on_session(session, "ended")
        if self._store is not None and not self._closing:
            self._write(f"session {session.id} ended", lambda: self._record_ended(session))

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

    async def resolve(self, session_id: str, *, start: bool = False) -> Session:
        """The live Session for a join or a request. ``start``: the caller may
        bring a scheduled Session live (its expert joining or publishing).

        404 unknown_session, 410 session_ended, 409 session_not_started (a
        scheduled Session, not started by this caller), 409 session_elsewhere
        (live on another Node), 503 if the store is unreachable."""
        local = self.sessions.get(session_id)
        if local is not None or self._store is None:
            return local if local is not None else self.get(session_id)
        record = await self._store.sessions.get_session(session_id)
        if record is None:
            return self.get(session_id)
        if record.state == "ended":
            raise Gone(f"session {session_id} has ended", code="session_ended")
        if record.state == "live" and record.node_id != self._node_id:
            raise _elsewhere(record)
        if record.state == "scheduled" and not start:
            raise Conflict(f"session {session_id} has not started yet; you join as soon as "
                           "it does", code="session_not_started")
        # Scheduled and started by this caller, or live here before this
        # Node restarted (resumed).
        return await self.start(session_id)

    async def start(self, session_id: str) -> Session:
        """Bring a scheduled Session live on this Node (or resume one the store
        says is live here); the live Session if it already is."""
        async with self._starting:
            local = self.sessions.get(session_id)
            if local is not None:
                return local
            if self._store is None:
                return self.get(session_id)
            record = await self._store.sessions.get_session(session_id)
            if record is None:
                return self.get(session_id)
            if record.state == "ended":
                raise Gone(f"session {session_id} has ended", code="session_ended")
            if record.state == "live" and record.node_id != self._node_id:
                raise _elsewhere(record)
            if record.state == "live" and session_id in self.ended:
                # Ended here while the store was unreachable: not a Session to
                # resume. Record the end again.
                self._write(f"session {session_id} ended", lambda: self._end_record(session_id))
                raise Gone(f"session {session_id} has ended", code="session_ended")
            theatre = await self.get_theatre(record.theatre_id)
            if theatre is None:
                raise Conflict(f"theatre {record.theatre_id!r} of session {session_id} no "
                               "longer exists", code="unknown_theatre")
            if record.state == "scheduled":
                record = await self._store.sessions.set_session_state(session_id, "live")
            return self._activate(record.id, theatre, record.title, record.procedure)

    async def end(self, session_id: str, reason: str) -> SessionRecord | None:
        """End a Session wherever it is (admin API): here through the close
        cascade, on another Node by asking it, and in the store either way.
        Ending an ended Session is not an error."""
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
            was = record
            with contextlib.suppress(Conflict):
                record = await self._store.sessions.set_session_state(session_id, "ended")
            if was.state == "live" and was.node_id != self._node_id:
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
                # A configured Session keeps its identity until it ends; after
                # that its id is never a new Session (old tokens, invites and
                # recordings name it).
                logger.warning("session %s ended before this Node started; it stays ended "
                               "(give the configuration a new id)", session.id)
                await session.end("this Session has ended")
            elif existing is not None and existing.state == "scheduled":
                await store.sessions.set_session_state(session.id, "live")
            elif existing is not None and existing.node_id != self._node_id:
                logger.warning("session %s is live here and, says the store, on node %s",
                               session.id, existing.node_id)

    async def _record_ended(self, session: Session) -> None:
        await self._end_record(session.id)

    async def _end_record(self, session_id: str) -> None:
        store = self._store
        assert store is not None
        record = await store.sessions.get_session(session_id)
        # Only the incarnation that was live here: not one scheduled since.
        if record is None or record.state != "live" or record.node_id != self._node_id:
            return
        with contextlib.suppress(Conflict):
            await store.sessions.set_session_state(session_id, "ended")

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
        """App start: write what the configuration created before the loop ran."""
        deferred, self._deferred = self._deferred, []
        for what, op in deferred:
            await self._run_write(what, op)
        for session in list(self.sessions.values()):
            if self._store is not None and session.id not in self._watchers:
                self._spawn(self._watch(session), watcher_of=session.id)

    async def flush(self) -> None:
        """Wait for the store writes queued so far."""
        pending = list(self._write_tasks)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _watch(self, session: Session) -> None:
        """End the local Session when an admin on another Node ends it."""
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

    async def close(self) -> None:
        """Node shutdown: end every Session (the whole close cascade); the store
        keeps them live so this Node resumes them when it comes back."""
        self._closing = True
        for session in list(self.sessions.values()):
            await session.end("server shutting down")
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


def _elsewhere(record: SessionRecord) -> Conflict:
    return Conflict(f"session {record.id} is live on node {record.node_id}; connect there",
                    code="session_elsewhere")
