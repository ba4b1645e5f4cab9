"""Signed, expiring tokens scoped to one Session and one Role (JWT, HS256).

The key id travels in the header so keys rotate: the first configured key
signs, every configured key verifies.

An invite is a token whose ``jti`` is the invite id (tokens redeemed from one
invite keep it, so revoking the invite revokes them all), optionally limited
to ``max_uses`` Participants. ``sid="*"`` is a node-wide admin token: only
the admin Role may carry it (docs/protocol.md, "Tokens").
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass

import jwt

from .errors import Unauthorized
from .roles import Role

ISSUER = "scrubin"
#: ``sid`` of a node-wide admin token (manages Theatres and Sessions).
NODE_WIDE = "*"


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
    #: Set on invites: how many Participants may redeem it.
    max_uses: int | None = None

    @property
    def node_wide(self) -> bool:
        return self.session_id == NODE_WIDE

    def covers(self, session_id: str) -> bool:
        """Scoped to this Session, or a node-wide admin token."""
        return self.session_id == session_id or (self.node_wide and self.role is Role.ADMIN)


class TokenAuthority:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            # A single-node demo without configured keys still gets real
            # signatures; its tokens die with the process.
            keys = [f"ephemeral:{secrets.token_urlsafe(48)}"]
        self._keys: dict[str, str] = {}
        for entry in keys:
            kid, _, secret = entry.partition(":")
            self._keys[kid] = secret
        self._signing_kid = keys[0].partition(":")[0]

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
    ) -> str:
        """``expires_at`` (epoch seconds) overrides ``ttl_s``; ``token_id`` is the
        invite id (``jti``), fresh when None."""
        if session_id == NODE_WIDE and role is not Role.ADMIN:
            raise ValueError("only admin tokens may be node-wide")
        if max_uses is not None and max_uses < 1:
            raise ValueError("max_uses must be ≥ 1")
        issued = time.time() if now is None else now
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sid": session_id,
            "role": role.value,
            "sub": participant_id or uuid.uuid4().hex[:12],
            "name": name[:64],
            # Fractions kept: "revoke every token issued before t" must not
            # catch a token issued in the same second after it.
            "iat": issued,
            "exp": int(expires_at if expires_at is not None else issued + ttl_s),
            "jti": token_id or uuid.uuid4().hex,
        }
        if max_uses is not None:
            claims["max_uses"] = max_uses
        return jwt.encode(claims, self._keys[self._signing_kid], algorithm="HS256",
                          headers={"kid": self._signing_kid})

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
            claims = jwt.decode(token, key, algorithms=["HS256"], issuer=ISSUER,
                                options={"require": ["exp", "sid", "role", "sub", "jti"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token has expired", code="token_expired") from None
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
        issued_at = claims.get("iat", 0.0)
        if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)):
            issued_at = 0.0  # treated as issued long ago: any revocation covers it
        return Grant(
            session_id=session_id,
            role=role,
            participant_id=str(claims["sub"]),
            name=str(claims.get("name", "")),
            expires_at=float(claims["exp"]),
            token_id=str(claims["jti"]),
            issued_at=float(issued_at),
            max_uses=max_uses,
        )
