"""A Session's schedule, and how long its invites are valid (docs/security.md,
"Invites follow the schedule").

A Session has a scheduled start (``starts_at``) and end (``ends_at``, or the
start plus ``[training] default_duration_min``). Invites made without an
explicit validity follow that schedule: valid from creation until the
scheduled end plus ``invite_margin_min`` (``valid_for="schedule"``);
reviewer invites until ``review_window_days`` after the end, never past the
recordings' retention (``valid_for="review"``). Their token's ``exp`` is only
a ceiling (the longest a token lives): the validity is computed again from the
Session's record at every check, so rescheduling moves it.
"""

from __future__ import annotations

from .config import TrainingConfig
from .roles import Role
from .store import InviteRecord, SessionRecord
from .tokens import MAX_LIFETIME_S

DAY_S = 86400.0


def scheduled_start(session: SessionRecord, fallback: float) -> float:
    """The planned start; an ad-hoc Session's actual start, else ``fallback``."""
    if session.starts_at is not None:
        return session.starts_at
    return session.started_at if session.started_at is not None else fallback


def scheduled_end(session: SessionRecord, training: TrainingConfig, fallback: float) -> float:
    """The planned end: ``ends_at``, or the start plus the default duration."""
    if session.ends_at is not None:
        return session.ends_at
    return scheduled_start(session, fallback) + training.default_duration_min * 60


def review_window_s(training: TrainingConfig, retention_days: float) -> float:
    days = training.review_window_days
    if retention_days > 0:
        days = min(days, retention_days)
    return days * DAY_S


def default_validity(role: Role) -> str:
    return "review" if role is Role.REVIEWER else "schedule"


def ceiling(issued_at: float) -> float:
    """The ``exp`` of an invite that follows its Session's schedule: as late as
    any token may live, so the Session can be moved within it."""
    return float(int(issued_at + MAX_LIFETIME_S))


def valid_until(invite: InviteRecord, session: SessionRecord | None,
                training: TrainingConfig, retention_days: float) -> float:
    """When ``invite`` stops admitting anyone, from the Session's record now."""
    if not invite.valid_for or session is None:
        return invite.expires_at
    if session.state == "live":
        # A Session running over its schedule keeps its people: valid while
        # it is live (within the ceiling), the margin counted from its end.
        return invite.expires_at
    if session.state == "ended" and session.ended_at is not None:
        end = session.ended_at
    else:
        end = scheduled_end(session, training, invite.issued_at)
    if invite.valid_for == "review":
        until = end + review_window_s(training, retention_days)
    else:
        until = end + training.invite_margin_min * 60
    return min(invite.expires_at, until)


def describe_schedule(session: SessionRecord, training: TrainingConfig,
                      now: float) -> dict[str, float | None]:
    """The start and end the admin page and CLI show (ad hoc: from now)."""
    return {"starts_at": session.starts_at,
            "ends_at": scheduled_end(session, training, now)
            if session.starts_at is not None or session.started_at is not None
            or session.ends_at is not None else None}
