"""Invites: one person, invited by an admin to one Session in one Role.

An invite is a token (``server.tokens``, kind ``invite``) whose ``jti`` is the
invite id, with ``max_uses``: how many devices may redeem it (at most
``limits.devices_per_invite``); its record in the store lets admins list it,
copy its link again and revoke it. People open the invite's *join link*
(``/join.html#token=…``): the page asks for a display name if the invite
carries none, and redeems the invite for a personal device token (its own
Participant id, the invite's Role and Session, parent and person the invite,
expiry min(the invite's, the Role's cap)) which the watch or broadcast page
then uses. Each device that redeems an invite is one use; the same device
redeeming again, or reloading the page, is not another. Only invites are
redeemed. Revoking the invite revokes every token redeemed or derived from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import unicodedata
from typing import Any

from . import schedule
from .config import TrainingConfig
from .errors import BadRequest, Forbidden, Unauthorized
from .roles import Role
from .store import InviteRecord, SessionRecord, Store
from .tokens import MAX_LIFETIME_S, NODE_WIDE, Grant, TokenAuthority

#: The page each Role's people use; reviewers see recordings, not the live Session.
PAGES: dict[Role, str] = {
    Role.EXPERT: "broadcast.html",
    Role.TRAINEE: "watch.html",
    Role.ADMIN: "watch.html",
    Role.RECORDER: "watch.html",
    Role.REVIEWER: "library.html",
}
MIN_TTL_S = 60
MAX_TTL_S = MAX_LIFETIME_S
NAME_MAX = 64


def clean_text(value: str) -> str:
    """Text as data: no control or format characters, single spaces. Never
    markup: pages render it as text, so "<b>" stays four characters."""
    kept = "".join(" " if ch.isspace() else ch for ch in value
                   if unicodedata.category(ch)[0] != "C" or ch.isspace())
    return " ".join(kept.split())


def clean_name(value: str) -> str:
    """A display name: clean text, at most 64 characters."""
    return clean_text(value)[:NAME_MAX]


def page_link(base_url: str, role: Role, token: str) -> str | None:
    page = PAGES.get(role)
    return f"{base_url.rstrip('/')}/{page}#token={token}" if page else None


def join_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/join.html#token={token}"


def sign(tokens: TokenAuthority, record: InviteRecord) -> str:
    """The invite's token, from its record (the same claims every time)."""
    return tokens.issue(record.session_id, record.role, name=record.name,
                        participant_id=record.participant_id, now=record.issued_at,
                        token_id=record.id, max_uses=record.max_uses,
                        expires_at=record.expires_at, kind="invite")


def new_record(*, session_id: str, role: Role, name: str, ttl_s: float | None,
               max_uses: int | None, created_by: str, now: float) -> InviteRecord:
    """An invite not stored yet. ``ttl_s`` None: valid as the Session's
    schedule says (server/schedule.py), the token's ``exp`` only a ceiling;
    otherwise for ``ttl_s`` seconds."""
    if ttl_s is None:
        valid_for, expires_at = schedule.default_validity(role), schedule.ceiling(now)
    else:
        valid_for, expires_at = "", float(int(now + ttl_s))
    return InviteRecord(
        id=secrets.token_hex(12), session_id=session_id, role=role, name=clean_name(name),
        participant_id=secrets.token_hex(6), issued_at=now,
        expires_at=expires_at, max_uses=max_uses, created_by=created_by,
        valid_for=valid_for)


async def create(store: Store, tokens: TokenAuthority, record: InviteRecord) -> str:
    """Store ``record`` (from ``new_record``); its token."""
    await store.invites.put_invite(record)
    return sign(tokens, record)


async def describe(store: Store, tokens: TokenAuthority, record: InviteRecord, base_url: str,
                   *, revoked_before: float | None, session: SessionRecord | None = None,
                   training: TrainingConfig | None = None,
                   retention_days: float = 0.0) -> dict[str, Any]:
    revoked = record.revoked_at is not None or (
        revoked_before is not None and record.issued_at < revoked_before)
    until = record.expires_at
    start: float | None = None
    if session is not None and training is not None:
        until = schedule.valid_until(record, session, training, retention_days)
        start = session.starts_at
    uses = await store.invites.invite_uses(record.id)
    seats = record.max_uses
    view: dict[str, Any] = {
        "id": record.id, "session": record.session_id, "role": record.role.value,
        "name": record.name, "issued_at": record.issued_at,
        # When it stops admitting anyone, as the Session's schedule says now.
        "expires_at": until, "valid_for": record.valid_for or "fixed",
        # Seconds from the scheduled start to the expiry (negative: it expires
        # before the Session starts); None for an unscheduled Session.
        "expires_after_start_s": None if start is None else until - start,
        "expires_before_start": start is not None and until <= start,
        "max_uses": record.max_uses, "uses": uses,
        "seats": {"taken": uses, "available": None if seats is None else max(0, seats - uses)},
        "created_by": record.created_by, "revoked": revoked, "revoked_at": record.revoked_at,
        "token": None, "link": None, "page": None,
    }
    if not revoked:
        token = sign(tokens, record)
        view.update(token=token, link=join_link(base_url, token),
                    page=page_link(base_url, record.role, token))
    return view


async def invite_valid_until(store: Store, grant: Grant, training: TrainingConfig,
                             retention_days: float) -> float | None:
    """When the invite ``grant`` comes from (itself, or the invite a device or
    derived token counts against) stops admitting anyone, read from the store
    now: None when the grant comes from no invite the store knows (a root
    token, or one minted from it)."""
    if grant.kind == "root" or grant.token_scope == NODE_WIDE:
        return None
    invite_id = grant.token_id if grant.kind == "invite" else grant.person
    if not invite_id:
        return None
    record = await store.invites.get_invite(grant.token_scope, invite_id)
    if record is None or not record.valid_for:
        return None
    session = await store.sessions.get_session(record.session_id)
    return schedule.valid_until(record, session, training, retention_days)


async def check_valid(store: Store, grant: Grant, training: TrainingConfig,
                      retention_days: float, now: float) -> Grant:
    """401 ``token_expired`` once the invite behind ``grant`` is past its
    validity (the Session's schedule, as stored now). Returns the grant with
    ``expires_at`` at most that validity: what a token minted from it may
    live to, so no device or derived token outlives its invite."""
    until = await invite_valid_until(store, grant, training, retention_days)
    if until is None:
        return grant
    if until <= now:
        raise Unauthorized("this invite is no longer valid (it was valid until the Session's "
                           "scheduled end and its margin)", code="token_expired")
    return dataclasses.replace(grant, expires_at=min(grant.expires_at, until))


def participant_for(invite_id: str, device: str) -> str:
    """One Participant per invite and device: the same device gets the same
    id back (a reload or a second redemption is not another use)."""
    return hashlib.sha256(f"{invite_id}\x00{device}".encode()).hexdigest()[:12]


def check_redeemable(grant: Grant) -> None:
    if grant.node_wide:
        raise Forbidden("a node-wide admin token is not an invite", code="wrong_session")
    if grant.kind != "invite":
        # Any other token redeemed would be a new Participant per "device":
        # copies of one token past every per-person limit.
        raise Forbidden("only an invite can be redeemed; open the invite's join link",
                        code="not_an_invite")


async def redeem(store: Store, tokens: TokenAuthority, grant: Grant, *, device: str,
                 name: str, devices: int) -> tuple[str, Grant]:
    """A personal token for one device, from an invite (``grant``) that at most
    ``devices`` devices may redeem: (token, its Grant)."""
    check_redeemable(grant)
    if not (16 <= len(device) <= 128) or not device.isascii() or not device.isprintable():
        raise BadRequest("device must be 16–128 printable ASCII characters", code="bad_request")
    participant_id = participant_for(grant.token_id, device)
    if not await store.invites.use_invite(grant.token_id, max_uses=devices,
                                          expires_at=grant.expires_at, redeemer=participant_id):
        raise Forbidden("this invite has been used on as many devices as it allows",
                        code="invite_used_up")
    return tokens.personal(grant, participant_id=participant_id,
                           name=grant.name or clean_name(name))
