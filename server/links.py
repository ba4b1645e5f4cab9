"""What each kind of user needs to join a Session: page links, WHIP and WHEP."""

from __future__ import annotations

from typing import Any

from .roles import Role
from .session import Session
from .tokens import TokenAuthority


def session_links(session: Session, tokens: TokenAuthority, base_url: str,
                  ttl_s: float) -> dict[str, Any]:
    """Fresh tokens for every entry; the fragment keeps them out of server logs."""
    base = base_url.rstrip("/")

    def token(role: Role, name: str) -> str:
        return tokens.issue(session.id, role, name=name, ttl_s=ttl_s)

    expert = token(Role.EXPERT, "Expert")
    return {
        "session": session.id,
        "expert_page": f"{base}/broadcast.html#token={expert}",
        "trainee_page": f"{base}/watch.html#token={token(Role.TRAINEE, 'Trainee')}",
        "reviewer_page": f"{base}/library.html#token={token(Role.REVIEWER, 'Reviewer')}",
        "whip": [
            {"slot": slot, "url": f"{base}/whip/{session.id}/{slot}",
             "bearer_token": token(Role.EXPERT, f"Encoder {slot}")}
            for slot in session.theatre.slots
        ],
        "whep": [
            {"feed": feed.id, "url": f"{base}/whep/{session.id}/{feed.id}",
             "bearer_token": token(Role.TRAINEE, f"Player {feed.id}")}
            for feed in session.feeds.values() if feed.state != "closed"
        ],
    }


def format_links(links: dict[str, Any]) -> str:
    lines = [
        f"Session {links['session']}",
        "",
        "  Expert (broadcast page):",
        f"    {links['expert_page']}",
        "  Trainee (watch page):",
        f"    {links['trainee_page']}",
        "  Reviewer (recordings library):",
        f"    {links.get('reviewer_page', '(not offered by this server)')}",
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
