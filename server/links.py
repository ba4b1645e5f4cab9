"""What each kind of user needs to join a Session: page links, WHIP and WHEP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .roles import Role
from .session import Session
from .tokens import TokenAuthority


@dataclass(frozen=True)
class SessionShape:
    """What links are made of: a Session's id, its slots and live Feeds (a
    Session held by another Node is known by its description)."""

    id: str
    slots: tuple[str, ...]
    feeds: tuple[str, ...]

    @classmethod
    def of(cls, session: Session) -> SessionShape:
        return cls(session.id, tuple(session.theatre.slots),
                   tuple(f.id for f in session.feeds.values() if f.state != "closed"))

    @classmethod
    def described(cls, description: dict[str, Any]) -> SessionShape:
        return cls(str(description["id"]),
                   tuple(str(s) for s in description.get("theatre", {}).get("slots", ())),
                   tuple(str(f["id"]) for f in description.get("feeds", ())
                         if f.get("state") != "closed"))

#: Mints one token of a Role with a display name; None when the caller may
#: not mint that Role (the derivation table, docs/security.md).
Mint = Callable[[Role, str], str | None]


def session_links(session: Session | SessionShape, tokens: TokenAuthority, base_url: str,
                  ttl_s: float, *, mint: Mint | None = None,
                  media_url: str | None = None) -> dict[str, Any]:
    """Fresh tokens for every entry; the fragment keeps them out of server logs.
    ``mint`` None: root tokens from the signing key (the demo's own links);
    the API passes tokens derived from the caller's. ``media_url``: the Node
    that holds the Session, for WHIP and WHEP (default ``base_url``)."""
    shape = session if isinstance(session, SessionShape) else SessionShape.of(session)
    base = base_url.rstrip("/")
    media = (media_url or base_url).rstrip("/")

    def root(role: Role, name: str) -> str:
        return tokens.issue(shape.id, role, name=name, ttl_s=ttl_s)

    token: Mint = mint if mint is not None else root

    def page(role: Role, page_name: str, name: str) -> str | None:
        minted = token(role, name)
        return None if minted is None else f"{base}/{page_name}#token={minted}"

    return {
        "session": shape.id,
        "expert_page": page(Role.EXPERT, "broadcast.html", "Expert"),
        "trainee_page": page(Role.TRAINEE, "watch.html", "Trainee"),
        "reviewer_page": page(Role.REVIEWER, "library.html", "Reviewer"),
        "whip": [
            {"slot": slot, "url": f"{media}/whip/{shape.id}/{slot}", "bearer_token": bearer}
            for slot in shape.slots
            if (bearer := token(Role.EXPERT, f"Encoder {slot}")) is not None
        ],
        "whep": [
            {"feed": feed, "url": f"{media}/whep/{shape.id}/{feed}", "bearer_token": bearer}
            for feed in shape.feeds
            if (bearer := token(Role.TRAINEE, f"Player {feed}")) is not None
        ],
    }


def format_links(links: dict[str, Any]) -> str:
    lines = [
        f"Session {links['session']}",
        "",
        "  Expert (broadcast page):",
        f"    {links['expert_page'] or '(not yours to hand out)'}",
        "  Trainee (watch page):",
        f"    {links['trainee_page'] or '(not yours to hand out)'}",
        "  Reviewer (recordings library):",
        f"    {links.get('reviewer_page') or '(not yours to hand out)'}",
        "",
        "  WHIP ingest for external encoders (OBS, GStreamer, hardware), one per camera slot:",
    ]
    for entry in links["whip"]:
        lines += [f"    [{entry['slot']}] {entry['url']}",
                  f"        Bearer token: {entry['bearer_token']}"]
    lines += ["", "  WHEP playback, one per live Feed:"]
    if not links["whep"]:
        lines.append("    (no live Feeds yet)")
    for entry in links["whep"]:
        lines += [f"    [{entry['feed']}] {entry['url']}",
                  f"        Bearer token: {entry['bearer_token']}"]
    return "\n".join(lines)
