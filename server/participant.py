"""Participant: someone in a Session, with a Role."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .roles import Role


@dataclass
class Participant:
    id: str
    role: Role
    name: str
    node_id: str
    joined_at: float = field(default_factory=time.time)
    #: Open signalling connections (a participant may have two tabs).
    connections: int = 0

    def describe(self) -> dict[str, object]:
        # Names are data, never markup: clients render them as text.
        return {"id": self.id, "role": self.role.value, "name": self.name}
