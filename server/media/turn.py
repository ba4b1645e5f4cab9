"""The ICE servers a client is given, with its own short-lived TURN credentials.

TURN uses coturn's shared-secret scheme (``use-auth-secret`` with
``static-auth-secret``; draft-uberti-behave-turn-rest): the username is
``<expiry, Unix seconds>:<participant id>`` and the credential is
base64(HMAC-SHA1(secret, username)). coturn recomputes the credential from
the username, so nothing is stored or sent to the TURN server, and it refuses
a username whose expiry has passed when a client allocates a relay. An
allocation made before the expiry keeps working: coturn keeps the key it
checked for the allocation's own refreshes (coturn 4.6.1,
``check_stun_auth``/``get_user_key``), so a credential only has to outlive
the moment a peer connection is set up, not the Session.

Pure helpers here, beside the one stateful class (``ClientIceServers``):
minting, the RFC 9725 ``Link`` header form and its parsing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import IceServer, TurnConfig
from ..roles import VIEWERS
from ..tokens import Grant

#: What coturn accepts in a username, kept narrow: a participant id outside it
#: is replaced by its digest (coturn refuses quotes, spaces and backslashes).
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TURN_URL = re.compile(r"(turns?):([^?]+)(?:\?transport=(udp|tcp))?")


def turn_username(expires_at: int, participant_id: str) -> str:
    if not _SAFE_ID.fullmatch(participant_id):
        participant_id = hashlib.sha256(participant_id.encode()).hexdigest()[:24]
    return f"{expires_at}:{participant_id}"


def turn_credential(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def turn_transport(url: str) -> str | None:
    """"udp", "tcp" or "tls" for a TURN URL (the way a client reaches the
    TURN server), None for anything else."""
    match = _TURN_URL.fullmatch(url.strip())
    if match is None:
        return None
    scheme, _, transport = match.groups()
    if scheme == "turns":
        return "tls" if transport in (None, "tcp") else None
    return transport or "udp"


@dataclass(frozen=True)
class ClientIce:
    """ICE servers for one client, as RTCIceServer dictionaries."""

    servers: list[dict[str, object]]
    #: When the TURN credentials in ``servers`` stop being accepted for new
    #: allocations; None when there are none.
    expires_at: float | None = None


class ClientIceServers:
    """What each Participant is told to use: the configured static servers
    (STUN, or a TURN server with its own fixed account) and, when a TURN
    secret is configured, TURN URLs with credentials of its own.

    Roles without live media (reviewers) get nothing: they have no use for a
    relay, and every credential handed out is one that could leak."""

    def __init__(self, static: list[IceServer], turn: TurnConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self._static = static
        self._turn = turn
        self._clock = clock

    def for_grant(self, grant: Grant) -> ClientIce:
        if grant.role not in VIEWERS:
            return ClientIce([])
        servers: list[dict[str, object]] = []
        for server in self._static:
            entry: dict[str, object] = {"urls": list(server.urls)}
            if server.username is not None:
                entry["username"] = server.username
                entry["credential"] = server.credential or ""
            servers.append(entry)
        if not self._turn.urls or not self._turn.secret:
            return ClientIce(servers)
        # Never beyond the token: a credential must not outlive the access it serves.
        expires_at = math.floor(min(self._clock() + self._turn.credential_ttl_s,
                                    grant.expires_at))
        username = turn_username(expires_at, grant.participant_id)
        servers.append({"urls": list(self._turn.urls), "username": username,
                        "credential": turn_credential(self._turn.secret, username)})
        return ClientIce(servers, float(expires_at))


# -- RFC 9725 section 4.6: ICE servers as Link headers ---------------------------
def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def link_headers(servers: Iterable[dict[str, object]]) -> list[str]:
    """One ``Link: <url>; rel="ice-server"`` value per URL, with the
    credentials as ``username``/``credential``/``credential-type`` parameters."""
    values = []
    for server in servers:
        urls = server.get("urls", [])
        for url in [urls] if isinstance(urls, str) else list(urls):  # type: ignore[call-overload]
            value = f'<{url}>; rel="ice-server"'
            if "username" in server:
                value += (f"; username={_quoted(str(server['username']))}"
                          f"; credential={_quoted(str(server.get('credential', '')))}"
                          '; credential-type="password"')
            values.append(value)
    return values


_LINK = re.compile(r'\s*<([^>]*)>((?:\s*;\s*[A-Za-z0-9_-]+\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^;,]*))*)')
_PARAM = re.compile(r'\s*;\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,]*)')


def parse_link_headers(values: Iterable[str]) -> list[dict[str, object]]:
    """The ``rel="ice-server"`` links of ``Link`` header values (one or many
    per value, comma-separated) as RTCIceServer dictionaries."""
    servers: list[dict[str, object]] = []
    for value in values:
        position = 0
        while position < len(value):
            match = _LINK.match(value, position)
            if match is None:
                break
            position = match.end()
            while position < len(value) and value[position] in ", ":
                position += 1
            params = {}
            for name, raw in _PARAM.findall(match.group(2)):
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[name.lower()] = raw.strip()
            if params.get("rel") != "ice-server":
                continue
            entry: dict[str, object] = {"urls": [match.group(1)]}
            if "username" in params:
                entry["username"] = params["username"]
                entry["credential"] = params.get("credential", "")
            servers.append(entry)
    return servers
