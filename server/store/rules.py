"""Rules both backends apply the same way, so the contract cannot drift."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from ..errors import BadRequest, Conflict
from .base import TRANSITIONS, AttendanceRecord, PresenceEntry, SessionRecord, SessionState


def stamp_new_session(record: SessionRecord, node_id: str, now: float) -> SessionRecord:
    if record.state == "ended":
        raise ValueError("a new session is scheduled or live, not ended")
    if record.state == "live":
        return dataclasses.replace(record, started_at=record.started_at or now,
                                   ended_at=None, node_id=node_id)
    return dataclasses.replace(record, started_at=None, ended_at=None, node_id="")


def apply_update(record: SessionRecord, *, title: str | None, procedure: str | None,
                 expert: str | None, starts_at: float | None,
                 ends_at: float | None = None) -> SessionRecord:
    changes: dict[str, Any] = {}
    if title is not None:
        changes["title"] = title
    if procedure is not None:
        changes["procedure"] = procedure
    if expert is not None:
        changes["expert"] = expert
    if starts_at is not None:
        changes["starts_at"] = starts_at
        if ends_at is None and record.starts_at is not None and record.ends_at is not None:
            # Rescheduled: it keeps its length unless a new end is given.
            changes["ends_at"] = record.ends_at + (starts_at - record.starts_at)
    if ends_at is not None:
        changes["ends_at"] = ends_at
    updated = dataclasses.replace(record, **changes)
    if (updated.ends_at is not None and updated.starts_at is not None
            and updated.ends_at <= updated.starts_at):
        raise BadRequest("a Session ends after it starts", code="bad_schedule")
    return updated


def apply_transition(record: SessionRecord, state: SessionState, node_id: str,
                     now: float) -> SessionRecord:
    if state not in TRANSITIONS.get(record.state, frozenset()):
        raise Conflict(f"session {record.id} is {record.state}; it cannot become {state}",
                       code="bad_transition")
    if state == "live":
        return dataclasses.replace(record, state=state, started_at=now, node_id=node_id)
    return dataclasses.replace(record, state=state, ended_at=now)


def sort_roster(entries: Iterable[PresenceEntry]) -> list[PresenceEntry]:
    return sorted(entries, key=lambda e: (e.connected_since, e.participant_id, e.node_id))


def sort_attendance(records: Iterable[AttendanceRecord]) -> list[AttendanceRecord]:
    return sorted(records, key=lambda r: (r.intervals[0][0] if r.intervals else 0.0,
                                          r.participant_id))
