"""Revocations reach live connections (docs/security.md, "Revocation").

Every request checks revocation itself (``authenticate``). What is already
open (websockets, WHIP publications, WHEP subscriptions) is closed two ways:

- at once, on the Node that revoked and, through the store's event bus, on
  the Node holding the Session (``announce``, ``on_event``);
- by a periodic re-check (``recheck``, every ``auth.recheck_interval_s``) of
  every live connection's grant against the store, because the bus is at most
  once: an event lost in an outage must not leave a revoked viewer watching.
  Grants that expired meanwhile close the same way.

``setup(app)`` adds the re-check as a cleanup_ctx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from aiohttp import web

from ..errors import ScrubinError, Unauthorized
from ..store import RevocationCheck, StoreUnavailable
from ..tokens import Grant
from .common import AUDIT, CONFIG, REGISTRY, SOCKET_GRANTS, STORE, close_socket

logger = logging.getLogger(__name__)

#: Event (on the store's event bus) telling every Node to close what a
#: revocation covers: ``token`` (a grant id, anywhere in a lineage) or
#: ``before`` (tokens of ``scope``, default the event's Session, issued
#: earlier). ``invite`` is the older name of ``token``.
REVOKED_EVENT = "tokens_revoked"
CLOSE_UNAUTHORIZED = 4401

Matcher = Callable[[Grant], bool]


def matcher(event: dict[str, Any], session_id: str) -> Matcher | None:
    """Which grants a ``tokens_revoked`` event covers (None: not such an event)."""
    if event.get("type") != REVOKED_EVENT:
        return None
    token = event.get("token", event.get("invite"))
    before = event.get("before")
    scope = event.get("scope", session_id)

    def revoked(grant: Grant) -> bool:
        if isinstance(token, str) and token in grant.lineage:
            return True
        return (isinstance(before, (int, float)) and not isinstance(before, bool)
                and grant.token_scope == scope and grant.issued_at < before)

    return revoked


def close(app: web.Application, revoked: Matcher, error: ScrubinError,
          why: str = "revoked") -> int:
    """Close this Node's websockets and media of the grants ``revoked`` matches."""
    sockets: weakref.WeakKeyDictionary[Any, Grant] = app[SOCKET_GRANTS]
    closed: dict[Grant, int] = {}
    for ws, grant in list(sockets.items()):
        if ws.closed or not revoked(grant):
            continue
        sockets.pop(ws, None)
        close_socket(app, ws, error, CLOSE_UNAUTHORIZED)
        closed[grant] = closed.get(grant, 0) + 1
    media = 0
    for session in list(app[REGISTRY].sessions.values()):
        media += session.close_revoked(revoked)
    for grant, count in closed.items():
        app[AUDIT].record("connection_closed", session=grant.session_id,
                          participant=grant.participant_id, token=grant.token_id,
                          reason=why, websockets=count)
    if closed or media:
        logger.info("closed %d websockets and %d media connections: grant %s",
                    sum(closed.values()), media, why)
    return sum(closed.values()) + media


def revoked_error() -> Unauthorized:
    return Unauthorized("this token, or the invite or token it comes from, has been revoked",
                        code="token_revoked")


def on_event(app: web.Application, session_id: str, event: dict[str, Any]) -> None:
    """Registry hook for the events of a Session live here."""
    revoked = matcher(event, session_id)
    if revoked is not None:
        close(app, revoked, revoked_error())


async def announce(app: web.Application, session_ids: Iterable[str],
                   what: dict[str, Any]) -> None:
    """Close what a revocation covers: here at once, on other Nodes through
    the events of each Session (best effort: the re-check catches what an
    event misses, within ``auth.recheck_interval_s``)."""
    event = {"type": REVOKED_EVENT, **what}
    for session_id in set(session_ids):
        revoked = matcher(event, session_id)
        assert revoked is not None
        close(app, revoked, revoked_error())
        with contextlib.suppress(ScrubinError):
            await app[STORE].events.publish(session_id, event)


async def recheck(app: web.Application) -> int:
    """One pass: every grant behind a live connection of this Node, checked
    against the store in one round trip; the revoked and the expired close.
    While the store is unreachable only expiry is enforced (media never waits
    for shared state; new requests get 503 meanwhile)."""
    grants: set[Grant] = {g for ws, g in list(app[SOCKET_GRANTS].items()) if not ws.closed}
    for session in list(app[REGISTRY].sessions.values()):
        grants |= session.live_grants()
    if not grants:
        return 0
    now = time.time()
    expired = {g for g in grants if g.expires_at <= now}
    alive = [g for g in grants if g not in expired]
    revoked: set[Grant] = set()
    try:
        flags = await app[STORE].invites.which_revoked(
            [RevocationCheck(g.lineage, g.token_scope, g.issued_at) for g in alive])
        revoked = {g for g, flag in zip(alive, flags, strict=True) if flag}
    except StoreUnavailable:
        pass
    closed = 0
    if revoked:
        closed += close(app, revoked.__contains__, revoked_error())
    if expired:
        closed += close(app, expired.__contains__,
                        Unauthorized("token has expired", code="token_expired"), "expired")
    return closed


async def _recheck_loop(app: web.Application) -> None:
    interval = app[CONFIG].auth.recheck_interval_s
    while True:
        await asyncio.sleep(interval)
        try:
            await recheck(app)
        except Exception:
            logger.exception("revocation re-check failed")


async def _rechecks(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.ensure_future(_recheck_loop(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_rechecks)
    app[REGISTRY].on_event = lambda session_id, event: on_event(app, session_id, event)
