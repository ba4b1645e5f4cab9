"""Replaying a Recording's events: what was on screen at a Session-clock time.

``events.jsonl`` keeps every Session event the recorder was told, as it was
told: interaction messages (drawings, steps, questions, chat...) wrapped as
``{"t", "type": "interaction", "to", "message"}``, plus the recorder's own
(``recording_started``, ``feed_state``...). :func:`player_events` flattens them
into what a player or an export needs: one object per event, ``type`` the
message's type, ``t`` the Session clock of the change, sorted by ``t``.

The same rules as the live pages (client_web/js/telestration.js): a drawing
shows from its ``t`` until ``expires_t`` (``null``: pinned), fading out over
its last second; ``annotations_cleared`` removes the drawings of its Feed (or
of all Feeds); the current step is the ``current_step`` of the last ``mark``.
client_web/js/player.js implements the same in the browser.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Drawings fade out over their last second (FADE_TAIL_MS in telestration.js).
FADE_TAIL_S = 1.0
#: Events a player shows or needs, by their flattened type.
PLAYER_TYPES = frozenset({
    "annotation", "annotations_cleared", "mark", "question", "questions", "chat", "sterile",
    "mic", "feed_state", "recording_started", "recording_stopped", "recording_error",
    "session_ended", "participant_joined", "participant_left",
})


def read_events(path: Path, limit: int = 100_000) -> list[dict[str, Any]]:
    """The lines of an events.jsonl (a torn last line after a crash is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if len(out) >= limit:
                    logger.warning("%s: more than %d events; the rest is not read", path, limit)
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("type"), str):
                    out.append(event)
    except FileNotFoundError:
        pass
    return out


def _number(value: Any, default: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default


def player_events(raw: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten and sort (see the module docstring); unknown types are left out."""
    out = []
    for index, event in enumerate(raw):
        t = _number(event.get("t"), 0.0)
        if event.get("type") == "interaction" and isinstance(event.get("message"), dict):
            message = event["message"]
            flat = {**message, "t": _number(message.get("t"), t)}
        else:
            flat = {**event, "t": t}
        if flat.get("type") in PLAYER_TYPES:
            flat["_order"] = index
            out.append(flat)
    out.sort(key=lambda e: (e["t"], e["_order"]))
    for event in out:
        del event["_order"]
    return out


def _until(events: Iterable[dict[str, Any]], t: float) -> Iterator[dict[str, Any]]:
    for event in events:
        if event["t"] > t:
            return
        yield event


def annotations_at(events: list[dict[str, Any]], feed_id: str,
                   t: float) -> list[tuple[dict[str, Any], float]]:
    """(annotation, opacity) of every drawing on ``feed_id`` showing at ``t``."""
    current: dict[str, dict[str, Any]] = {}
    for event in _until(events, t):
        if event["type"] == "annotation" and isinstance(event.get("annotation"), dict):
            annotation = event["annotation"]
            current[str(annotation.get("id"))] = annotation
        elif event["type"] == "annotations_cleared":
            cleared = event.get("feed")
            for key in [k for k, a in current.items()
                        if cleared is None or a.get("feed") == cleared]:
                del current[key]
    out = []
    for annotation in current.values():
        if annotation.get("feed") != feed_id:
            continue
        expires = annotation.get("expires_t")
        if expires is None:
            out.append((annotation, 1.0))
            continue
        left = _number(expires, 0.0) - t
        if left > 0:
            out.append((annotation, min(1.0, left / FADE_TAIL_S)))
    return out


def step_at(events: list[dict[str, Any]], t: float) -> str | None:
    """The procedure step current at ``t`` (None before the first)."""
    step = None
    for event in _until(events, t):
        if event["type"] == "mark":
            value = event.get("current_step")
            step = value if isinstance(value, str) else step
    return step


def marks(events: list[dict[str, Any]], kind: str | None = None) -> list[dict[str, Any]]:
    """Steps and bookmarks (``{"id","kind","name","t","by"}``), in time order."""
    out = []
    for event in events:
        mark = event.get("mark")
        if event["type"] == "mark" and isinstance(mark, dict) and (
                kind is None or mark.get("kind") == kind):
            out.append({**mark, "t": _number(mark.get("t"), event["t"])})
    return out
