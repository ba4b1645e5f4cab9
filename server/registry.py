"""Registry: the Theatres this Node knows and the Sessions live on it.

Sessions hold peer connections, so a live Session belongs to one Node; the
shared store that lets several Nodes see each other's Sessions comes in
front of this (issue 3) without changing callers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from .config import Config
from .errors import Conflict, Gone, NotFound
from .media.peers import PeerFactory
from .session import Session
from .theatre import Theatre, check_name

logger = logging.getLogger(__name__)


class Registry:
    def __init__(self, config: Config, peers: PeerFactory, node_id: str) -> None:
        self._config = config
        self._peers = peers
        self._node_id = node_id
        self.theatres: dict[str, Theatre] = {
            t.id: Theatre(t.id, t.name, tuple(t.slots)) for t in config.theatres
        }
        self.sessions: dict[str, Session] = {}
        #: Ids of Sessions that ended on this Node: they answer 410, not 404.
        self.ended: set[str] = set()
        self.totals: Counter[str] = Counter()
        self.on_first_frame: Callable[[float], None] | None = None
        self.on_session: Callable[[Session, str], None] | None = None
        for configured in config.sessions:
            self.create_session(configured.id, configured.theatre, configured.title,
                                configured.procedure)

    def add_theatre(self, theatre: Theatre) -> Theatre:
        if theatre.id in self.theatres and self.theatres[theatre.id] != theatre:
            raise Conflict(f"theatre {theatre.id} exists with other slots", code="theatre_exists")
        self.theatres[theatre.id] = theatre
        return theatre

    def create_session(self, session_id: str, theatre_id: str, title: str,
                       procedure: str = "") -> Session:
        check_name("session", session_id)
        theatre = self.theatres.get(theatre_id)
        if theatre is None:
            raise NotFound(f"no theatre {theatre_id!r}", code="unknown_theatre")
        existing = self.sessions.get(session_id)
        if existing is not None and existing.state == "live":
            raise Conflict(f"session {session_id} is already live", code="session_exists")
        session = Session(session_id=session_id, theatre=theatre, title=title,
                          procedure=procedure, config=self._config, peers=self._peers,
                          node_id=self._node_id, totals=self.totals,
                          on_first_frame=self._first_frame, on_ended=self._ended)
        self.ended.discard(session_id)
        self.sessions[session_id] = session
        if self.on_session is not None:
            self.on_session(session, "live")
        logger.info("session %s created in theatre %s", session_id, theatre_id)
        return session

    def _first_frame(self, seconds: float) -> None:
        if self.on_first_frame is not None:
            self.on_first_frame(seconds)

    def _ended(self, session: Session) -> None:
        # An ended Session holds nothing live; forget it, remember its id.
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.ended.add(session.id)
        if self.on_session is not None:
            self.on_session(session, "ended")

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None and session_id in self.ended:
            raise Gone(f"session {session_id} has ended", code="session_ended")
        if session is None:
            raise NotFound(f"no session {session_id!r}", code="unknown_session")
        return session

    async def close(self) -> None:
        """Node shutdown: end every Session (the whole close cascade)."""
        for session in list(self.sessions.values()):
            await session.end("server shutting down")
