"""The Redis store (redis.asyncio): shared state for several Nodes.

Failure model, the reason for most of this file:

- Every call is bounded by ``timeout_s`` (default 1 s): short socket timeouts,
  one immediate retry (so the first call on a pooled connection that died with
  a Redis restart reconnects instead of failing), and an overall deadline.
  Anything that goes wrong becomes ``StoreUnavailable`` (HTTP 503). Nothing
  waits for Redis longer than that, so the live-media path never hangs on it.
- The client reconnects by itself: the pool opens new connections on demand,
  and the event bus's single pub/sub connection is re-established in the
  background with capped backoff, re-subscribing every channel this Node's
  subscribers still listen to. Events published during an outage are lost
  (pub/sub is at most once); presence is rebuilt by ``Presence``'s refresh
  loop and stale entries expire by TTL.

Layout (all under the configurable prefix, default "scrubin:"):

    theatres                      hash   theatre id -> JSON
    sessions                      hash   session id -> JSON
    roster:<sid>                  zset   members ["participant", "node"] by deadline (index)
    presence:<sid>:<member>       string entry JSON, PX ttl
    revoked:<invite id>           string the token's expiry (µs), PX until then
    revoked-before:<sid>          string epoch seconds (only grows)
    invite-uses:<invite id>       set    redeemers, PX until the token expires
    invites:<sid>                 hash   invite id -> record JSON, PX until its last invite expires
    rate:<key>                    zset   allowed hits (µs), PX window
    lease:<sid>                   string holder JSON {node, fence, since}, PX lease TTL
    fence:<sid>                   string the Session's last fence, PX 30 days
    node:<node id>                string NodeRecord JSON, PX heartbeat TTL
    nodes                         set    node ids (index), PX heartbeat TTL
    audit:<sid>                   zset   "<nonce> <entry JSON>" by ts, PX audit keep
    attendance:<sid>              hash   participant id -> record JSON, "~until" -> deadline
                                         ("" = kept), PX until the deadline
    certificate:<id>              string certificate JSON (kept)
    certificates:<sid>            set    certificate ids of the Session
    recordings                    hash   session id -> LiveRecording JSON
    channel events:<sid>          pub/sub, JSON events
    channel bus                   pub/sub, keeps the connection subscribed for heartbeats

Single-instance Redis (or a primary with replicas): the Lua scripts touch
keys of several Sessions at once, which Redis Cluster would refuse.

Time: deadlines (presence, revocations, invites, rate windows) are read from
the store's clock (``clock``, the Node's wall clock by default; Nodes keep
their clocks synchronised, as token expiry already requires), so tests drive
them with a clock of their own. Redis key expiry (PX) only collects garbage
behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import Conflict, NotFound
from ..theatre import Theatre
from .base import (
    AUDIT_MAX_ENTRIES,
    DEFAULT_PREFIX,
    DEFAULT_SUBSCRIPTION_BUFFER,
    AttendanceRecord,
    CertificateRecord,
    EventSubscription,
    Fanout,
    InviteRecord,
    Lease,
    LiveRecording,
    NodeRecord,
    PresenceEntry,
    RevocationCheck,
    SessionRecord,
    SessionState,
    StoreUnavailable,
    check_rate_args,
    check_ttl,
    encode_event,
    lease_lost,
    lineage_ids,
    theatre_from_json,
    theatre_to_json,
)
from .rules import (
    apply_transition,
    apply_update,
    sort_attendance,
    sort_roster,
    stamp_new_session,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The field of an attendance hash holding its deadline (never a participant id:
#: those have no "~").
ATTENDANCE_UNTIL = "~until"
#: Optimistic (WATCH/MULTI) transactions retry this often under contention.
MAX_WATCH_ATTEMPTS = 50
#: A Session's fence counter outlives its lease by far (its clock floor covers
#: a counter that expired anyway).
FENCE_KEEP_MS = 30 * 24 * 3600 * 1000

# Entries and the Session's index (members by deadline on the store's clock)
# in one round trip; the index lives as long as its longest-lived entry
# (PEXPIRE only ever extends it).
ANNOUNCE_LUA = """
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  redis.call('SET', KEYS[i + 1], ARGV[i + 3], 'PX', ttl)
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[i + 2])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return #KEYS / 2
"""

# Live entries of a Session: members past their deadline (their Node stopped
# refreshing) leave the index and lose their entry. Atomic, so an entry
# re-announced meanwhile is never dropped. ARGV[1] prefixes entry keys.
ROSTER_LUA = """
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])) do
  redis.call('DEL', ARGV[1] .. member)
  redis.call('ZREM', KEYS[1], member)
end
local out = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local value = redis.call('GET', ARGV[1] .. member)
  if value then table.insert(out, value) else redis.call('ZREM', KEYS[1], member) end
end
return out
"""

# Remove a Session's live recording only if it still names this Recording
# (a Node stopping late never clears one started since).
CLEAR_RECORDING_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
if cjson.decode(raw)['recording_id'] ~= ARGV[2] then return 0 end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# A redeemer already in the set comes back in free; otherwise one more use if
# any is left. Atomic, so 20 simultaneous attempts on a single-use invite
# admit exactly one.
USE_INVITE_LUA = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""

# Revocations only ever get stronger: a later expiry, a later "before".
REVOKE_INVITE_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
return 1
"""

REVOKE_SESSION_LUA = """
local current = redis.call('GET', KEYS[1])
if (not current) or tonumber(current) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# One invite record; the Session's hash lives as long as its longest-lived
# invite (PEXPIRE only ever extends it).
PUT_INVITE_LUA = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""

# Sliding-window log (µs on the store's clock, ARGV[4]). A hit counts for
# [t, t + window); refused hits are not recorded.
RATE_LUA = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local now = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return 1
"""


# Fences are Redis's clock in ms at least, so they keep growing when the
# counters were lost (a Redis restarted empty). Numbers travel as strings
# (cjson would print large ones in exponent form).
_NOW_MS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Free, or held under this Node's own id (an earlier run): a new fence.
# Otherwise the holder, untouched. Returns {holder JSON, PTTL}.
ACQUIRE_LEASE_LUA = _NOW_MS + """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).node ~= ARGV[1] then
  return {current, redis.call('PTTL', KEYS[1])}
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local fence = string.format('%.0f', math.max(last + 1, now_ms))
redis.call('SET', KEYS[2], fence, 'PX', ARGV[3])
local value = cjson.encode({node = ARGV[1], fence = fence,
                            since = string.format('%.0f', now_ms)})
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {value, tonumber(ARGV[2])}
"""

# KEYS: lease, fence pairs; ARGV: node, ttl ms, counter keep ms, then one
# fence per pair. Returns the (1-based) pairs whose lease is lost.
RENEW_LEASES_LUA = _NOW_MS + """
local lost = {}
for i = 1, #KEYS, 2 do
  local n = (i + 1) / 2
  local fence = tonumber(ARGV[3 + n])
  local current = redis.call('GET', KEYS[i])
  if current then
    if tonumber(cjson.decode(current).fence) == fence then
      redis.call('PEXPIRE', KEYS[i], ARGV[2])
    else
      table.insert(lost, n)
    end
  elseif tonumber(redis.call('GET', KEYS[i + 1]) or '0') > fence then
    table.insert(lost, n)
  else
    redis.call('SET', KEYS[i], cjson.encode({node = ARGV[1], fence = ARGV[3 + n],
               since = string.format('%.0f', now_ms)}), 'PX', ARGV[2])
    redis.call('SET', KEYS[i + 1], ARGV[3 + n], 'PX', ARGV[3])
  end
end
return lost
"""

RELEASE_LEASE_LUA = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(cjson.decode(current).fence) == tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# Another live instance under the same id wins (its record comes back);
# otherwise write ours and index it.
HEARTBEAT_LUA = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).instance ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return false
"""

REMOVE_NODE_LUA = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).instance == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
"""

# Live records; ids whose record expired (the Node stopped) leave the index.
LIST_NODES_LUA = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local value = redis.call('GET', ARGV[1] .. id)
  if value then table.insert(out, value) else redis.call('SREM', KEYS[1], id) end
end
return out
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


#: What a revocation held before deadlines were stored (it then lived by PX alone).
_LEGACY_REVOKED = "1"


class RedisStore:
    """Implements every store Protocol over one Redis; ``open_store`` wraps it."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 1.0,
        subscription_buffer: int = DEFAULT_SUBSCRIPTION_BUFFER,
        heartbeat_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError("timeout_s must be a positive number of seconds")
        self.node_id = node_id
        #: Epoch seconds; every deadline is read from it.
        self.clock = clock
        self.prefix = prefix
        self.timeout_s = timeout_s
        # Two socket attempts (the retry) must fit in the overall deadline.
        per_socket = timeout_s / 2
        try:
            self._redis: Redis = Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=per_socket,
                socket_connect_timeout=per_socket,
                retry=Retry(NoBackoff(), 1),
                # Shows which Node a connection belongs to in CLIENT LIST.
                client_name=re.sub(r"[^A-Za-z0-9_.-]", "_", f"scrubin-{node_id}")[:64],
            )
        except ValueError as exc:
            raise ValueError(f"bad Redis URL: {exc}") from exc
        self._announce = self._redis.register_script(ANNOUNCE_LUA)
        self._roster = self._redis.register_script(ROSTER_LUA)
        self._use_invite = self._redis.register_script(USE_INVITE_LUA)
        self._revoke_invite = self._redis.register_script(REVOKE_INVITE_LUA)
        self._revoke_session = self._redis.register_script(REVOKE_SESSION_LUA)
        self._put_invite = self._redis.register_script(PUT_INVITE_LUA)
        self._rate = self._redis.register_script(RATE_LUA)
        self._acquire_lease = self._redis.register_script(ACQUIRE_LEASE_LUA)
        self._renew_leases = self._redis.register_script(RENEW_LEASES_LUA)
        self._release_lease = self._redis.register_script(RELEASE_LEASE_LUA)
        self._clear_recording = self._redis.register_script(CLEAR_RECORDING_LUA)
        self._heartbeat = self._redis.register_script(HEARTBEAT_LUA)
        self._remove_node = self._redis.register_script(REMOVE_NODE_LUA)
        self._list_nodes = self._redis.register_script(LIST_NODES_LUA)
        self._closed = False
        self._available = True
        self._bus = _Bus(self, subscription_buffer, heartbeat_s)

    # -- keys -------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @staticmethod
    def _member(participant_id: str, node_id: str) -> str:
        # JSON keeps any participant or node id unambiguous inside one member.
        return json.dumps([participant_id, node_id], separators=(",", ":"))

    # -- the one way to talk to Redis ------------------------------------
    async def _op(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await call()
        except TimeoutError as exc:
            _cancelled_meanwhile(task, cancelling)
            raise self._unavailable(what, f"no answer within {self.timeout_s:g} s") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            _cancelled_meanwhile(task, cancelling)
            raise self._unavailable(what, str(exc) or type(exc).__name__) from exc
        except RedisError as exc:
            _cancelled_meanwhile(task, cancelling)
            # Not a lost connection (OOM, READONLY replica, a script error):
            # still not the caller's fault, but worth a traceback.
            logger.error("store: redis refused %s", what, exc_info=True)
            raise self._unavailable(what, str(exc)) from exc
        _cancelled_meanwhile(task, cancelling)
        if not self._available:
            self._available = True
            logger.info("store: redis reachable again")
        return result

    def _unavailable(self, what: str, why: str) -> StoreUnavailable:
        # One warning per outage, not one per call.
        if self._available:
            self._available = False
            logger.warning("store: redis unavailable (%s: %s)", what, why)
        else:
            logger.debug("store: %s failed: %s", what, why)
        # The message reaches clients (503 body): no addresses or internals.
        return StoreUnavailable(f"shared state is unavailable ({what}); retry shortly")

    # -- backend ----------------------------------------------------------
    async def healthy(self) -> bool:
        try:
            return bool(await self._op("ping", self._redis.ping))
        except StoreUnavailable:
            return False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._bus.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

    # -- theatres ---------------------------------------------------------
    async def put_theatre(self, theatre: Theatre) -> None:
        data = theatre_to_json(theatre)
        await self._op("put_theatre",
                       lambda: self._redis.hset(self._key("theatres"), theatre.id, data))

    async def get_theatre(self, theatre_id: str) -> Theatre | None:
        raw = await self._op("get_theatre",
                             lambda: self._redis.hget(self._key("theatres"), theatre_id))
        return theatre_from_json(raw) if raw else None

    async def list_theatres(self) -> list[Theatre]:
        raw = await self._op("list_theatres", lambda: self._redis.hvals(self._key("theatres")))
        return sorted((theatre_from_json(r) for r in raw), key=lambda t: t.id)

    async def delete_theatre(self, theatre_id: str) -> bool:
        n = await self._op("delete_theatre",
                           lambda: self._redis.hdel(self._key("theatres"), theatre_id))
        return bool(n)

    # -- sessions ---------------------------------------------------------
    async def create_session(self, record: SessionRecord) -> SessionRecord:
        record = stamp_new_session(record, self.node_id, self.clock())

        def make(current: SessionRecord | None) -> SessionRecord:
            if current is not None:
                raise Conflict(f"session {record.id} exists ({current.state}); a Session id "
                               "is never used again", code="session_exists")
            return record

        return await self._modify_session("create_session", record.id, make,
                                          theatre_id=record.theatre_id)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        raw = await self._op("get_session",
                             lambda: self._redis.hget(self._key("sessions"), session_id))
        return SessionRecord.from_json(raw) if raw else None

    async def list_sessions(self, state: SessionState | None = None) -> list[SessionRecord]:
        raw = await self._op("list_sessions", lambda: self._redis.hvals(self._key("sessions")))
        records = sorted((SessionRecord.from_json(r) for r in raw), key=lambda r: r.id)
        return [r for r in records if state is None or r.state == state]

    async def update_session(
        self,
        session_id: str,
        *,
        title: str | None = None,
        procedure: str | None = None,
        expert: str | None = None,
        starts_at: float | None = None,
        ends_at: float | None = None,
    ) -> SessionRecord:
        def make(current: SessionRecord | None) -> SessionRecord:
            return apply_update(_existing(session_id, current), title=title,
                                procedure=procedure, expert=expert, starts_at=starts_at,
                                ends_at=ends_at)

        return await self._modify_session("update_session", session_id, make)

    async def set_session_state(self, session_id: str, state: SessionState, *,
                                fence: int | None = None) -> SessionRecord:
        def make(current: SessionRecord | None) -> SessionRecord:
            return apply_transition(_existing(session_id, current), state, self.node_id,
                                    self.clock())

        return await self._modify_session("set_session_state", session_id, make,
                                          fence=fence)

    async def delete_session(self, session_id: str) -> bool:
        n = await self._op("delete_session",
                           lambda: self._redis.hdel(self._key("sessions"), session_id))
        return bool(n)

    async def _modify_session(
        self,
        what: str,
        session_id: str,
        make: Callable[[SessionRecord | None], SessionRecord],
        *,
        theatre_id: str | None = None,
        fence: int | None = None,
    ) -> SessionRecord:
        """Read-modify-write one Session under WATCH: two Nodes racing to start
        it cannot both win (the loser re-reads and gets Conflict). With
        ``fence``, a lease acquired meanwhile makes it Conflict too."""
        sessions = self._key("sessions")
        theatres = self._key("theatres")
        counter = self._key("fence", session_id)

        async def attempt() -> SessionRecord:
            for _ in range(MAX_WATCH_ATTEMPTS):
                async with self._redis.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(sessions, theatres, counter)
                        if fence is not None and int(await pipe.get(counter) or 0) > fence:
                            raise lease_lost(session_id)
                        raw = await pipe.hget(sessions, session_id)
                        updated = make(SessionRecord.from_json(raw) if raw else None)
                        if theatre_id is not None and not await pipe.hexists(
                                theatres, theatre_id):
                            raise NotFound(f"no theatre {theatre_id!r}", code="unknown_theatre")
                        pipe.multi()
                        pipe.hset(sessions, session_id, updated.to_json())
                        await pipe.execute()
                        return updated
                    except WatchError:
                        continue
            raise StoreUnavailable(f"{what}: too much contention on sessions")

        return await self._op(what, attempt)

    # -- presence ---------------------------------------------------------
    async def announce(self, entries: Sequence[PresenceEntry], *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        if not entries:
            return
        keys: list[str] = []
        args: list[str | int] = [_ms(ttl_s), _us(self.clock() + ttl_s)]
        for entry in entries:
            member = self._member(entry.participant_id, entry.node_id)
            keys += [self._key("roster", entry.session_id),
                     self._key("presence", entry.session_id, member)]
            args += [member, entry.to_json()]
        await self._op("announce", lambda: self._announce(keys=keys, args=args))

    async def withdraw(self, session_id: str, participant_id: str, node_id: str) -> None:
        member = self._member(participant_id, node_id)

        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("presence", session_id, member))
                pipe.zrem(self._key("roster", session_id), member)
                await pipe.execute()

        await self._op("withdraw", run)

    async def roster(self, session_id: str) -> list[PresenceEntry]:
        index = self._key("roster", session_id)
        entry_prefix = self._key("presence", session_id, "")
        raw = await self._op("roster", lambda: self._roster(
            keys=[index], args=[entry_prefix, _us(self.clock())]))
        entries = []
        for value in raw:
            try:
                entries.append(PresenceEntry.from_json(value))
            except (ValueError, KeyError, TypeError):
                logger.warning("store: unreadable presence entry in %s", index)
        return sort_roster(entries)

    # -- invites ----------------------------------------------------------
    async def revoke_invite(self, invite_id: str, *, expires_at: float) -> None:
        remaining = expires_at - self.clock()
        if remaining <= 0:
            return  # the token is already refused as expired
        key = self._key("revoked", invite_id)
        await self._op("revoke_invite", lambda: self._revoke_invite(
            keys=[key], args=[_ms(remaining), _us(expires_at)]))

    async def revoke_session(self, session_id: str, *, before: float) -> None:
        key = self._key("revoked-before", session_id)
        await self._op("revoke_session",
                       lambda: self._revoke_session(keys=[key], args=[repr(float(before))]))

    async def revoked_before(self, session_id: str) -> float | None:
        raw = await self._op("revoked_before",
                             lambda: self._redis.get(self._key("revoked-before", session_id)))
        return float(raw) if raw is not None else None

    async def is_revoked(self, token_ids: str | Sequence[str], *, session_id: str,
                         issued_at: float) -> bool:
        check = RevocationCheck(lineage_ids(token_ids), session_id, issued_at)
        return (await self._which_revoked("is_revoked", [check]))[0]

    async def which_revoked(self, checks: Sequence[RevocationCheck]) -> list[bool]:
        return await self._which_revoked("which_revoked", checks)

    async def _which_revoked(self, what: str, checks: Sequence[RevocationCheck]) -> list[bool]:
        """Every grant's ids and Session in one MGET."""
        if not checks:
            return []
        keys: dict[str, int] = {}
        for check in checks:
            for token_id in check.token_ids:
                keys.setdefault(self._key("revoked", token_id), len(keys))
            keys.setdefault(self._key("revoked-before", check.session_id), len(keys))
        names = list(keys)
        values = await self._op(what, lambda: self._redis.mget(names))
        out = []
        now_us = _us(self.clock())

        def live(value: bytes | str | None) -> bool:
            # A revocation lasts until the token would have expired anyway.
            if isinstance(value, bytes):
                value = value.decode()
            return value is not None and (value == _LEGACY_REVOKED or int(value) > now_us)

        for check in checks:
            revoked = any(live(values[keys[self._key("revoked", t)]]) for t in check.token_ids)
            before = values[keys[self._key("revoked-before", check.session_id)]]
            out.append(revoked or (before is not None and check.issued_at < float(before)))
        return out

    async def use_invite(
        self, invite_id: str, *, max_uses: int, expires_at: float, redeemer: str | None = None
    ) -> bool:
        if max_uses < 1:
            raise ValueError("max_uses must be ≥ 1")
        # Anonymous uses are distinct members, so each one counts.
        who = redeemer if redeemer is not None else f"~{secrets.token_hex(8)}"
        ttl = _ms(max(expires_at - self.clock(), 1.0))
        key = self._key("invite-uses", invite_id)
        allowed = await self._op("use_invite", lambda: self._use_invite(
            keys=[key], args=[who, max_uses, ttl]))
        return bool(allowed)

    async def invite_uses(self, invite_id: str) -> int:
        n = await self._op("invite_uses",
                           lambda: self._redis.scard(self._key("invite-uses", invite_id)))
        return int(n)

    async def put_invite(self, record: InviteRecord) -> None:
        remaining = record.expires_at - self.clock()
        if remaining <= 0:
            return
        key = self._key("invites", record.session_id)
        data = record.to_json()
        await self._op("put_invite", lambda: self._put_invite(
            keys=[key], args=[record.id, data, _ms(remaining)]))

    async def get_invite(self, session_id: str, invite_id: str) -> InviteRecord | None:
        raw = await self._op("get_invite", lambda: self._redis.hget(
            self._key("invites", session_id), invite_id))
        if not raw:
            return None
        record = InviteRecord.from_json(raw)
        return record if record.expires_at > self.clock() else None

    async def list_invites(self, session_id: str) -> list[InviteRecord]:
        raw = await self._op("list_invites", lambda: self._redis.hvals(
            self._key("invites", session_id)))
        now = self.clock()
        records = []
        for value in raw:
            try:
                record = InviteRecord.from_json(value)
            except (ValueError, KeyError, TypeError):
                logger.warning("store: unreadable invite record of session %s", session_id)
                continue
            if record.expires_at > now:
                records.append(record)
        return sorted(records, key=lambda r: (r.issued_at, r.id))

    # -- leases -----------------------------------------------------------
    def _lease_from(self, session_id: str, raw: str, pttl: int) -> Lease:
        holder = json.loads(raw)
        return Lease(session_id=session_id, node_id=str(holder["node"]),
                     fence=int(holder["fence"]), since=int(holder["since"]) / 1000,
                     ttl_s=max(0.0, pttl / 1000))

    async def acquire_lease(self, session_id: str, *, ttl_s: float) -> Lease:
        check_ttl(ttl_s)
        keys = [self._key("lease", session_id), self._key("fence", session_id)]
        raw, pttl = await self._op("acquire_lease", lambda: self._acquire_lease(
            keys=keys, args=[self.node_id, _ms(ttl_s), FENCE_KEEP_MS]))
        return self._lease_from(session_id, raw, int(pttl))

    async def renew_leases(self, fences: Mapping[str, int], *, ttl_s: float) -> set[str]:
        check_ttl(ttl_s)
        if not fences:
            return set()
        ids = list(fences)
        keys = [k for sid in ids for k in (self._key("lease", sid), self._key("fence", sid))]
        args: list[str | int] = [self.node_id, _ms(ttl_s), FENCE_KEEP_MS,
                                 *(str(int(fences[sid])) for sid in ids)]
        lost = await self._op("renew_leases", lambda: self._renew_leases(keys=keys, args=args))
        return {ids[int(n) - 1] for n in lost}

    async def release_lease(self, session_id: str, fence: int) -> bool:
        key = self._key("lease", session_id)
        released = await self._op("release_lease", lambda: self._release_lease(
            keys=[key], args=[str(int(fence))]))
        return bool(released)

    async def get_lease(self, session_id: str) -> Lease | None:
        key = self._key("lease", session_id)

        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                return list(await pipe.execute())

        raw, pttl = await self._op("get_lease", read)
        if raw is None or int(pttl) <= 0:
            return None
        return self._lease_from(session_id, raw, int(pttl))

    # -- live recordings ----------------------------------------------------
    async def put_live_recording(self, record: LiveRecording) -> None:
        data = record.to_json()
        await self._op("put_live_recording", lambda: self._redis.hset(
            self._key("recordings"), record.session_id, data))

    async def get_live_recording(self, session_id: str) -> LiveRecording | None:
        raw = await self._op("get_live_recording", lambda: self._redis.hget(
            self._key("recordings"), session_id))
        return LiveRecording.from_json(raw) if raw else None

    async def list_live_recordings(self) -> list[LiveRecording]:
        raw = await self._op("list_live_recordings",
                             lambda: self._redis.hvals(self._key("recordings")))
        records = []
        for value in raw:
            try:
                records.append(LiveRecording.from_json(value))
            except (ValueError, KeyError, TypeError):
                logger.warning("store: unreadable live recording record")
        return sorted(records, key=lambda r: r.session_id)

    async def clear_live_recording(self, session_id: str, recording_id: str) -> bool:
        key = self._key("recordings")
        cleared = await self._op("clear_live_recording", lambda: self._clear_recording(
            keys=[key], args=[session_id, recording_id]))
        return bool(cleared)

    # -- the Node registry ---------------------------------------------------
    async def heartbeat(self, record: NodeRecord, *, ttl_s: float) -> NodeRecord | None:
        check_ttl(ttl_s)
        keys = [self._key("node", record.node_id), self._key("nodes")]
        other = await self._op("heartbeat", lambda: self._heartbeat(
            keys=keys, args=[record.instance, record.to_json(), _ms(ttl_s), record.node_id]))
        return NodeRecord.from_json(other) if other else None

    async def remove_node(self, node_id: str, instance: str) -> None:
        keys = [self._key("node", node_id), self._key("nodes")]
        await self._op("remove_node", lambda: self._remove_node(
            keys=keys, args=[instance, node_id]))

    async def list_nodes(self) -> list[NodeRecord]:
        raw = await self._op("list_nodes", lambda: self._list_nodes(
            keys=[self._key("nodes")], args=[self._key("node", "")]))
        records = []
        for value in raw:
            try:
                records.append(NodeRecord.from_json(value))
            except (ValueError, KeyError, TypeError):
                logger.warning("store: unreadable node record")
        return sorted(records, key=lambda r: r.node_id)

    async def get_node(self, node_id: str) -> NodeRecord | None:
        raw = await self._op("get_node", lambda: self._redis.get(self._key("node", node_id)))
        return NodeRecord.from_json(raw) if raw else None

    # -- the shared audit trail ------------------------------------------------
    async def append_audit(self, entries: Sequence[Mapping[str, Any]], *,
                           keep_s: float) -> None:
        check_ttl(keep_s)
        by_key: dict[str, dict[str, float]] = {}
        for entry in entries:
            session_id = entry.get("session")
            if not isinstance(session_id, str) or not session_id:
                continue
            # A nonce keeps two identical entries (same second, same fields) apart.
            member = f"{secrets.token_hex(4)} {encode_event(entry)}"
            by_key.setdefault(self._key("audit", session_id), {})[member] = float(
                entry.get("ts", 0.0))
        if not by_key:
            return

        async def write() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, members in by_key.items():
                    pipe.zadd(key, members)
                    pipe.zremrangebyrank(key, 0, -AUDIT_MAX_ENTRIES - 1)
                    pipe.pexpire(key, _ms(keep_s))
                await pipe.execute()

        await self._op("append_audit", write)

    async def read_audit(self, session_id: str, *, since: float = 0.0,
                         limit: int = 1000) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        key = self._key("audit", session_id)
        raw = await self._op("read_audit", lambda: self._redis.zrevrangebyscore(
            key, "+inf", since, start=0, num=limit))
        entries = []
        for member in reversed(raw):
            try:
                entries.append(json.loads(str(member).split(" ", 1)[1]))
            except (ValueError, IndexError):
                logger.warning("store: unreadable audit entry of session %s", session_id)
        return entries

    # -- attendance and certificates -----------------------------------------
    async def put_attendance(self, records: Sequence[AttendanceRecord], *,
                             keep_s: float | None) -> None:
        if keep_s is not None:
            check_ttl(keep_s)
        by_key: dict[str, dict[Any, Any]] = {}
        for record in records:
            by_key.setdefault(self._key("attendance", record.session_id), {})[
                record.participant_id] = record.to_json()
        if not by_key:
            return
        until = "" if keep_s is None else repr(self.clock() + keep_s)

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key, fields in by_key.items():
                    fields[ATTENDANCE_UNTIL] = until
                    pipe.hset(key, mapping=fields)
                    if keep_s is None:
                        pipe.persist(key)
                    else:
                        pipe.pexpire(key, _ms(keep_s))
                await pipe.execute()

        await self._op("put_attendance", write)

    async def list_attendance(self, session_id: str) -> list[AttendanceRecord]:
        raw = await self._op("list_attendance", lambda: self._redis.hgetall(
            self._key("attendance", session_id)))
        until = raw.pop(ATTENDANCE_UNTIL, "")
        if until and float(until) <= self.clock():
            return []
        records = []
        for value in raw.values():
            try:
                records.append(AttendanceRecord.from_json(value))
            except (ValueError, KeyError, TypeError):
                logger.warning("store: unreadable attendance record of session %s", session_id)
        return sort_attendance(records)

    async def delete_attendance(self, session_id: str) -> bool:
        present = bool(await self.list_attendance(session_id))
        await self._op("delete_attendance", lambda: self._redis.delete(
            self._key("attendance", session_id)))
        return present

    async def put_certificate(self, record: CertificateRecord) -> None:
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key("certificate", record.id), record.to_json())
                pipe.sadd(self._key("certificates", record.session_id), record.id)
                await pipe.execute()

        await self._op("put_certificate", write)

    async def get_certificate(self, certificate_id: str) -> CertificateRecord | None:
        raw = await self._op("get_certificate", lambda: self._redis.get(
            self._key("certificate", certificate_id)))
        return CertificateRecord.from_json(raw) if raw else None

    async def list_certificates(self, session_id: str) -> list[CertificateRecord]:
        ids = sorted(str(i) for i in await self._op(
            "list_certificates",
            lambda: self._redis.smembers(self._key("certificates", session_id))))
        if not ids:
            return []
        raw = await self._op("list_certificates", lambda: self._redis.mget(
            [self._key("certificate", i) for i in ids]))
        records = [CertificateRecord.from_json(r) for r in raw if r]
        return sorted(records, key=lambda c: (c.name, c.id))

    # -- rate limiting ----------------------------------------------------
    async def hit(self, key: str, limit: int, window_s: float) -> bool:
        check_rate_args(limit, window_s)
        if limit == 0:
            return False
        rkey = self._key("rate", key)
        window_us = max(1, round(window_s * 1_000_000))
        now_us = _us(self.clock())
        allowed = await self._op("hit", lambda: self._rate(
            keys=[rkey], args=[limit, window_us, secrets.token_hex(8), now_us]))
        return bool(allowed)

    # -- events -----------------------------------------------------------
    def _channel(self, session_id: str) -> str:
        return self._key("events", session_id)

    async def publish(self, session_id: str, event: Mapping[str, Any]) -> None:
        data = encode_event(event)
        channel = self._channel(session_id)
        await self._op("publish", lambda: self._redis.publish(channel, data))

    async def subscribe(self, session_id: str) -> EventSubscription:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        return await self._bus.subscribe(session_id)


def _cancelled_meanwhile(task: asyncio.Task[Any] | None, cancelling: int) -> None:
    """redis-py sometimes swallows a cancellation that arrives while a command
    is in flight; the caller asked to stop (e.g. the watcher of a Session that
    ended), so it stops rather than carry on waiting forever."""
    if task is not None and task.cancelling() > cancelling:
        raise asyncio.CancelledError


def _existing(session_id: str, record: SessionRecord | None) -> SessionRecord:
    if record is None:
        raise NotFound(f"no session {session_id!r}", code="unknown_session")
    return record


class _Bus(Fanout):
    """One pub/sub connection per Node, shared by all its subscribers.

    A background reader owns the connection: it subscribes every channel with
    local subscribers, hands messages to them, pings when idle (a Redis that
    stopped answering without closing the socket is noticed within
    ~3 heartbeats) and, when the connection is lost, opens a new one with
    capped backoff and subscribes again.
    """

    def __init__(self, store: RedisStore, buffer: int, heartbeat_s: float) -> None:
        super().__init__()
        self._store = store
        self._redis = store._redis
        self._buffer = buffer
        self._heartbeat_s = heartbeat_s
        self._events_prefix = store._key("events", "")
        self._control = store._key("bus")
        self._pubsub: PubSub | None = None
        # Serialises commands on the pub/sub connection (reader's initial
        # SUBSCRIBE, subscribers', pings) so only one connection is opened and
        # a channel's SUBSCRIBE/UNSUBSCRIBE reach Redis in the order decided.
        self._lock = asyncio.Lock()
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def subscribe(self, session_id: str) -> EventSubscription:
        channel = self._store._channel(session_id)
        # Registered before asking Redis, so a reconnecting reader includes it.
        sub = self.add(session_id, self._buffer)
        self._ensure_reader()
        if channel in self._confirmed:
            return sub
        try:
            await self._store._op("subscribe", lambda: self._confirm(channel))
        except BaseException:
            await self.detach(sub)
            raise
        return sub

    async def _confirm(self, channel: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(future)
        try:
            async with self._lock:
                # Not connected: the reader subscribes every local channel
                # when it connects, and confirms this one then.
                if self._pubsub is not None:
                    await self._pubsub.subscribe(channel)
            await future
        finally:
            waiters = self._waiters.get(channel, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(channel, None)

    async def detach(self, sub: EventSubscription) -> None:
        if not self.remove(sub):
            return
        channel = self._store._channel(sub.session_id)
        # Best effort: a failure leaves Redis sending us a channel nobody
        # reads, which costs little and ends with the connection.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._store.timeout_s), self._lock:
                if sub.session_id in self.subscribers or self._pubsub is None:
                    return  # someone subscribed again meanwhile, or offline
                self._confirmed.discard(channel)
                await self._pubsub.unsubscribe(channel)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="store-event-bus")

    async def _read(self) -> None:
        backoff = 0.05
        lost = False
        while not self._closed:
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(self._store.timeout_s), self._lock:
                    self._pubsub = pubsub
                    channels = [self._store._channel(s) for s in self.subscribers]
                    await pubsub.subscribe(self._control, *channels)
                if lost:
                    logger.info("store: event bus reconnected (%d channels)", len(channels))
                    lost = False
                backoff = 0.05
                await self._pump(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if not lost:
                    logger.warning("store: event bus lost redis (%s); reconnecting",
                                   str(exc) or type(exc).__name__)
                lost = True
            except Exception:
                # A bug must not silently end delivery for every subscriber:
                # log it and start over on a fresh connection.
                logger.exception("store: event bus reader failed; reconnecting")
                lost = True
            finally:
                self._pubsub = None
                self._confirmed.clear()
                self._fail_waiters()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _pump(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_heard = last_ping = loop.time()
        tick = min(self._heartbeat_s / 2, 0.25)
        while True:
            message = await pubsub.get_message(timeout=tick)
            now = loop.time()
            if message is not None:
                last_heard = now
                self._handle(message)
            elif now - last_heard > 3 * self._heartbeat_s:
                raise RedisConnectionError("no answer to pub/sub heartbeats")
            if now - last_ping >= self._heartbeat_s:
                last_ping = now
                async with asyncio.timeout(self._store.timeout_s), self._lock:
                    await pubsub.ping()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if kind == "subscribe" and isinstance(channel, str):
            self._confirmed.add(channel)
            for future in self._waiters.pop(channel, []):
                if not future.done():
                    future.set_result(None)
        elif kind == "message" and isinstance(channel, str):
            if not channel.startswith(self._events_prefix):
                return
            try:
                event = json.loads(message["data"])
            except (TypeError, ValueError):
                logger.warning("store: dropped a malformed event on %s", channel)
                return
            self.deliver(channel[len(self._events_prefix):], event)
        # "unsubscribe" needs nothing: ``detach`` already forgot the channel,
        # and a SUBSCRIBE sent after it is confirmed by its own message.

    def _fail_waiters(self) -> None:
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(StoreUnavailable("the event bus lost redis"))
        self._waiters.clear()

    async def aclose(self) -> None:
        self._closed = True
        self.end_all()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
