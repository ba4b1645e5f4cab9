"""Logs that say which Session and Participant every line is about.

The ids live in context variables: set once where a request is authenticated,
they follow every task started from there (asyncio copies the context), so
aiortc's own log lines inside a Session carry them too.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

SESSION_ID: ContextVar[str] = ContextVar("scrubin_session_id", default="-")
PARTICIPANT_ID: ContextVar[str] = ContextVar("scrubin_participant_id", default="-")

FORMAT = ("%(asctime)s %(levelname)s %(name)s session=%(session_id)s "
          "participant=%(participant_id)s %(message)s")


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = SESSION_ID.get()
        record.participant_id = PARTICIPANT_ID.get()
        return True


def bind(session_id: str, participant_id: str) -> None:
    SESSION_ID.set(session_id)
    PARTICIPANT_ID.set(participant_id)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aioice logs every candidate pair at INFO.
    logging.getLogger("aioice").setLevel(logging.WARNING)
