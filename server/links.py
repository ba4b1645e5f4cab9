"""What each kind of user needs to join a Session: page links, WHIP and WHEP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .roles import Role
from .session import Session
from .tokens import TokenAuthority

#: Mints one token of a Role with a display name; None when the caller may
#: not mint that Role (the derivation table, docs/security.md).
Mint = Callable[[Role, str], str | None]


def session_links(session: Session, tokens: TokenAuthority, base_url: str,
                  ttl_s: float, *, mint: Mint | None = None) -> dict[str, Any]:
    """Fresh tokens for every entry; the fragment keeps them out of server logs.
    ``mint`` None: root tokens from the signing key (the demo's own links);
    the API passes tokens derived from the caller's."""
    base = base_url.rstrip("/")

    def root(role: Role, name: str) -> str:
        return tokens.issue(session.id, role, name=name, ttl_s=ttl_s)

    token: Mint = mint if mint is not None else root

    def page(role: Role, page_name: str, name: str) -> str | None:
        minted = token(role, name)
        return None if minted is None else f"{base}/{page_name}#token={minted}"

    return {
        "session": session.id,
        "expert_page": page(Role.EXPERT, "broadcast.html", "Expert"),
        "trainee_page": page(Role.TRAINEE, "watch.html", "Trainee"),
        "reviewer_page": page(Role.REVIEWER, "library.html", "Reviewer"),
        "whip": [
            {"slot": slot, "url": f"{base}/whip/{session.id}/{slot}", "bearer_token": bearer}
            for slot in session.theatre.slots
            if (bearer := token(Role.EXPERT, f"Encoder {slot}")) is not None
        ],
        "whep": [
            {"feed": feed.id, "url": f"{base}/whep/{session.id}/{feed.id}",
             "bearer_token": bearer}
            for feed in session.feeds.values() if feed.state != "closed"
            if (bearer := token(Role.TRAINEE, f"Player {feed.id}")) is not None
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
