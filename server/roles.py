"""Roles and what each may do. Every route and message checks one of these."""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Role(enum.StrEnum):
    EXPERT = "expert"
    TRAINEE = "trainee"
    REVIEWER = "reviewer"
    RECORDER = "recorder"
    ADMIN = "admin"
    #: Not a person: a Node pulling a Session's Feeds to serve them to its own
    #: viewers (an edge, docs/architecture.md "Edges"). Minted by Nodes only,
    #: for WHEP only.
    RELAY = "relay"


#: Roles people hold: invites, links, ``scrubin token`` and the admin API
#: deal in these only.
PERSON_ROLES = frozenset(r for r in Role if r is not Role.RELAY)


#: May publish Feeds into a Session's camera slots.
PUBLISHERS = frozenset({Role.EXPERT})
#: May watch live Feeds. Reviewers see recordings only.
VIEWERS = frozenset({Role.EXPERT, Role.TRAINEE, Role.RECORDER, Role.ADMIN})
#: May subscribe to a live Feed's media (WHEP): the viewers and edge Nodes.
MEDIA_VIEWERS = VIEWERS | {Role.RELAY}
#: Whose pages an edge Node serves media to itself (experts, recorders and
#: admins keep theirs on the Node that holds the Session: they publish, record
#: or moderate there).
EDGE_ROLES = frozenset({Role.TRAINEE})
#: May end a Session and mint links for it.
MODERATORS = frozenset({Role.EXPERT, Role.ADMIN})
#: May see the list of who is watching, with names.
ROSTER_READERS = frozenset({Role.EXPERT, Role.ADMIN})

#: The derivation table (docs/security.md): which Roles a token of each Role
#: may mint tokens of (``GET /api/sessions/{session}/links``). An expert hands
#: out its own page, encoder (WHIP) and player (WHEP) tokens, never a
#: reviewer's (recordings) or an admin's.
MAY_DERIVE: Mapping[Role, frozenset[Role]] = {
    Role.ADMIN: PERSON_ROLES,
    Role.EXPERT: frozenset({Role.EXPERT, Role.TRAINEE}),
    Role.TRAINEE: frozenset(),
    Role.REVIEWER: frozenset(),
    Role.RECORDER: frozenset(),
    Role.RELAY: frozenset(),
}
