"""Theatre: an operating room and its named camera slots."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadRequest

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def check_name(kind: str, value: str) -> str:
    """Slot, theatre and session ids appear in URLs: keep them plain."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BadRequest(f"{kind} must match {NAME_RE.pattern}", code=f"bad_{kind}")
    return value


@dataclass(frozen=True)
class Theatre:
    id: str
    name: str
    #: Camera and microphone slots, e.g. ("room", "endoscope", "overhead", "narration").
    slots: tuple[str, ...]

    def __post_init__(self) -> None:
        check_name("theatre", self.id)
        for slot in self.slots:
            check_name("slot", slot)

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "slots": list(self.slots)}
