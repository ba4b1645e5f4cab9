"""Signed, expiring tokens scoped to one Session and one Role (JWT, HS256),
and the grant model behind them (docs/security.md).

The key id travels in the header so keys rotate: the first configured key
signs, every configured key verifies.

Every token is a grant, of one of four kinds (claim ``knd``):

- ``root``: minted with the signing key itself (``scrubin token``,
  ``scrubin admin-token``, the demo). ``sid="*"`` is a node-wide admin token:
  only the admin Role may carry it.
- ``invite``: a person, created through the admin API; ``jti`` is the invite
  id, ``max_uses`` how many devices may redeem it.
- ``device``: an invite redeemed on one device (``POST /api/invites/redeem``).
- ``derived``: minted from another token by ``GET /api/sessions/{s}/links``,
  as the derivation table (``roles.MAY_DERIVE``) allows.

Device and derived tokens name their ancestors (``par``, nearest first) and
the person they count against (``per``: the invite, or the root they come
from); they expire at min(parent's expiry, their Role's cap). Revoking any
ancestor revokes them: every check looks at the whole lineage.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import jwt

from .errors import Forbidden, Unauthorized
from .roles import MAY_DERIVE, Role

ISSUER = "scrubin"
#: ``sid`` of a node-wide admin token (manages Theatres and Sessions).
NODE_WIDE = "*"
GrantKind = Literal["root", "invite", "device", "derived"]
KINDS: tuple[GrantKind, ...] = ("root", "invite", "device", "derived")
#: At most this many ancestors: admin → expert → its encoder's token, plus a margin.
MAX_DEPTH = 4
#: No token lives longer than this (the longest invite); a token claiming a
#: longer life is refused, and a revocation by id is remembered this long.
MAX_LIFETIME_S = 30 * 24 * 3600
#: Grant ids (``jti``, ``par``, ``per``) are short printable ASCII.
ID_MAX = 64


@dataclass(frozen=True)
class Grant:
    """What a verified token allows: one Role in one Session."""

    session_id: str
    role: Role
    participant_id: str
    name: str
    expires_at: float
    token_id: str
    #: Seconds since the epoch, with fractions (per-Session revocation compares it).
    issued_at: float = 0.0
    #: Set on invites: how many devices may redeem it.
    max_uses: int | None = None
    kind: GrantKind = "root"
    #: Ancestor grant ids, nearest first (device and derived tokens).
    parents: tuple[str, ...] = ()
    #: The person this grant counts against ("" for a root: itself).
    person: str = ""
    #: The ``sid`` the token was issued for, when the Grant was re-scoped to
    #: the Session of a route (a node-wide admin token on a Session route).
    scope: str = ""

    @property
    def node_wide(self) -> bool:
        return self.session_id == NODE_WIDE

    @property
    def lineage(self) -> tuple[str, ...]:
        """This grant's id and its ancestors': revoking any of them revokes it."""
        return (self.token_id, *self.parents)

    @property
    def person_id(self) -> str:
        """Whom per-person limits count against: the invite for everything
        redeemed or derived from one, otherwise the root grant."""
        return self.person or self.token_id

    @property
    def token_scope(self) -> str:
        """The ``sid`` of the token itself ("*" for node-wide admin tokens)."""
        return self.scope or self.session_id

    def covers(self, session_id: str) -> bool:
        """Scoped to this Session, or a node-wide admin token."""
        return self.session_id == session_id or (self.node_wide and self.role is Role.ADMIN)


class TokenAuthority:
    def __init__(self, keys: list[str], caps: Mapping[Role, float] | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        #: Epoch seconds, where issuing and expiry read the time (tests inject one).
        self.clock = clock
        if not keys:
            # A single-node demo without configured keys still gets real
            # signatures; its tokens die with the process.
            keys = [f"ephemeral:{secrets.token_urlsafe(48)}"]
        self._keys: dict[str, str] = {}
        for entry in keys:
            kid, _, secret = entry.partition(":")
            self._keys[kid] = secret
        self._signing_kid = keys[0].partition(":")[0]
        self._caps = {role: min(float(s), MAX_LIFETIME_S) for role, s in (caps or {}).items()}

    def cap(self, role: Role) -> float:
        """Longest life of a device or derived token of ``role`` (seconds)."""
        return self._caps.get(role, MAX_LIFETIME_S)

    def issue(
        self,
        session_id: str,
        role: Role,
        *,
        name: str = "",
        ttl_s: float = 3600,
        participant_id: str | None = None,
        now: float | None = None,
        token_id: str | None = None,
        max_uses: int | None = None,
        expires_at: float | None = None,
        kind: GrantKind = "root",
        parents: tuple[str, ...] = (),
        person: str = "",
    ) -> str:
        """``expires_at`` (epoch seconds) overrides ``ttl_s``; ``token_id`` is the
        invite id (``jti``), fresh when None. Roots and invites come from here;
        device and derived tokens from ``personal`` and ``derive``."""
        if session_id == NODE_WIDE and role is not Role.ADMIN:
            raise ValueError("only admin tokens may be node-wide")
        if max_uses is not None and max_uses < 1:
            raise ValueError("max_uses must be ≥ 1")
        if kind not in KINDS or len(parents) > MAX_DEPTH:
            raise ValueError("bad grant kind or lineage")
        issued = self.clock() if now is None else now
        expires = int(expires_at if expires_at is not None else issued + ttl_s)
        if expires - issued > MAX_LIFETIME_S:
            raise ValueError(f"no token lives longer than {MAX_LIFETIME_S} s")
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sid": session_id,
            "role": role.value,
            "sub": participant_id or uuid.uuid4().hex[:12],
            "name": name[:64],
            # Fractions kept: "revoke every token issued before t" must not
            # catch a token issued in the same second after it.
            "iat": issued,
            "exp": expires,
            "jti": token_id or uuid.uuid4().hex,
        }
        if max_uses is not None:
            claims["max_uses"] = max_uses
        if kind != "root":
            claims["knd"] = kind
        if parents:
            claims["par"] = list(parents)
        if person:
            claims["per"] = person
        return jwt.encode(claims, self._keys[self._signing_kid], algorithm="HS256",
                          headers={"kid": self._signing_kid})

    def derive(self, parent: Grant, role: Role, *, session_id: str | None = None,
               name: str = "", ttl_s: float | None = None) -> tuple[str, Grant]:
        """A token minted from ``parent`` (``/links``), as the derivation table
        allows: 403 ``wrong_role`` otherwise."""
        if role not in MAY_DERIVE[parent.role]:
            raise Forbidden(f"role {parent.role.value} may not mint {role.value} tokens",
                            code="wrong_role")
        return self._child(parent, role, kind="derived", session_id=session_id, name=name,
                           ttl_s=ttl_s, participant_id=None)

    def personal(self, invite: Grant, *, participant_id: str,
                 name: str) -> tuple[str, Grant]:
        """The token of one device that redeemed ``invite`` (403
        ``not_an_invite`` for any other kind of token)."""
        if invite.kind != "invite":
            raise Forbidden("only an invite can be redeemed; open the invite's join link",
                            code="not_an_invite")
        return self._child(invite, invite.role, kind="device", session_id=None, name=name,
                           ttl_s=None, participant_id=participant_id)

    def _child(self, parent: Grant, role: Role, *, kind: GrantKind, session_id: str | None,
               name: str, ttl_s: float | None,
               participant_id: str | None) -> tuple[str, Grant]:
        if len(parent.lineage) > MAX_DEPTH:
            raise Forbidden("this token was itself derived too many times to mint more",
                            code="derivation_too_deep")
        scope = parent.token_scope
        sid = session_id or parent.session_id
        if sid == NODE_WIDE or (scope != NODE_WIDE and sid != scope):
            raise Forbidden("a derived token is for the parent token's Session",
                            code="wrong_session")
        now = self.clock()
        life = self.cap(role) if ttl_s is None else min(ttl_s, self.cap(role))
        expires = min(parent.expires_at, now + life)
        if expires <= now + 1:
            raise Unauthorized("token has expired", code="token_expired")
        token = self.issue(sid, role, name=name, participant_id=participant_id, now=now,
                           expires_at=expires, kind=kind, parents=parent.lineage,
                           person=parent.person_id)
        return token, self.verify(token)

    def verify(self, token: str) -> Grant:
        if not token:
            raise Unauthorized("a token is required", code="token_missing")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("token is malformed", code="token_invalid") from None
        key = self._keys.get(str(header.get("kid", "")))
        if key is None:
            raise Unauthorized("token was signed with an unknown key", code="token_invalid")
        try:
            # Expiry is checked below on this authority's clock.
            claims = jwt.decode(token, key, algorithms=["HS256"], issuer=ISSUER,
                                options={"require": ["exp", "iat", "sid", "role", "sub",
                                                     "jti"],
                                         "verify_exp": False, "verify_iat": False})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token is invalid: {exc}", code="token_invalid") from None
        try:
            role = Role(claims["role"])
        except ValueError:
            raise Unauthorized("token names an unknown role", code="token_invalid") from None
        session_id = str(claims["sid"])
        if session_id == NODE_WIDE and role is not Role.ADMIN:
            raise Unauthorized("only admin tokens may be node-wide", code="token_invalid")
        max_uses = claims.get("max_uses")
        if max_uses is not None and (isinstance(max_uses, bool) or not isinstance(max_uses, int)
                                     or max_uses < 1):
            raise Unauthorized("token has a bad max_uses claim", code="token_invalid")
        issued_at = claims["iat"]
        expires_at = claims["exp"]
        if (isinstance(issued_at, bool) or not isinstance(issued_at, (int, float))
                or isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))
                or expires_at - issued_at > MAX_LIFETIME_S + 1):
            raise Unauthorized("token claims a life longer than any token has",
                               code="token_invalid")
        if expires_at <= self.clock():
            raise Unauthorized("token has expired", code="token_expired")
        kind = claims.get("knd", "root")
        parents = claims.get("par", [])
        person = claims.get("per", "")
        token_id = claims["jti"]
        if (kind not in KINDS or not isinstance(parents, list) or len(parents) > MAX_DEPTH
                or not all(is_grant_id(p) for p in parents) or not is_grant_id(token_id)
                or not (person == "" or is_grant_id(person))
                or (kind in ("device", "derived")) != bool(parents)
                or (max_uses is not None and kind != "invite")):
            raise Unauthorized("token has a bad grant claim", code="token_invalid")
        return Grant(
            session_id=session_id,
            role=role,
            participant_id=str(claims["sub"]),
            name=str(claims.get("name", "")),
            expires_at=float(expires_at),
            token_id=token_id,
            issued_at=float(issued_at),
            max_uses=max_uses,
            kind=kind,
            parents=tuple(parents),
            person=person,
        )


def is_grant_id(value: object) -> bool:
    """A grant id (``jti``, ``par``, ``per``): 1–64 printable ASCII characters."""
    return (isinstance(value, str) and 0 < len(value) <= ID_MAX and value.isascii()
            and value.isprintable())
