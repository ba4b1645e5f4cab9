"""Signed, expiring tokens scoped to one Session and one Role (JWT, HS256).

The key id travels in the header so keys rotate: the first configured key
signs, every configured key verifies.
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


@dataclass(frozen=True)
class Grant:
    """What a verified token allows: one Role in one Session."""

    session_id: str
    role: Role
    participant_id: str
    name: str
    expires_at: float
    token_id: str


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
    ) -> str:
        issued = time.time() if now is None else now
        claims = {
            "iss": ISSUER,
            "sid": session_id,
            "role": role.value,
            "sub": participant_id or uuid.uuid4().hex[:12],
            "name": name[:64],
            "iat": int(issued),
            "exp": int(issued + ttl_s),
            "jti": uuid.uuid4().hex,
        }
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
        return Grant(
            session_id=str(claims["sid"]),
            role=role,
            participant_id=str(claims["sub"]),
            name=str(claims.get("name", "")),
            expires_at=float(claims["exp"]),
            token_id=str(claims["jti"]),
        )
