"""The in-memory store: the default, for one Node (and for tests).

Every method completes without awaiting anything, so each is atomic on the
event loop: the same guarantees the Redis store gets from Lua and MULTI.
Several ``MemoryStore`` objects may share one ``MemoryState`` to stand for
several Nodes inside one process (tests, the demo).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import Conflict, NotFound
from ..theatre import Theatre
from .base import (
    AUDIT_MAX_ENTRIES,
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
    next_fence,
)
from .rules import (
    apply_transition,
    apply_update,
    sort_attendance,
    sort_roster,
    stamp_new_session,
)

#: How often expired revocations, invite counters and idle rate keys are
#: swept, so keys that are never read again do not accumulate.
SWEEP_INTERVAL_S = 30.0


@dataclass
class MemoryState:
    """What the Nodes of one process share. Clocks are injectable for tests."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    theatres: dict[str, Theatre] = field(default_factory=dict)
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    # session id -> (participant id, node id) -> (entry, monotonic expiry)
    presence: dict[str, dict[tuple[str, str], tuple[PresenceEntry, float]]] = field(
        default_factory=dict)
    # invite id -> wall-clock expiry
    revoked: dict[str, float] = field(default_factory=dict)
    revoked_before: dict[str, float] = field(default_factory=dict)
    # invite id -> (redeemers, wall-clock expiry)
    uses: dict[str, tuple[set[str], float]] = field(default_factory=dict)
    # session id -> invite id -> record (expires with record.expires_at)
    invites: dict[str, dict[str, InviteRecord]] = field(default_factory=dict)
    # rate key -> monotonic times of allowed hits, oldest first
    hits: dict[str, deque[float]] = field(default_factory=dict)
    fanout: Fanout = field(default_factory=Fanout)
    # session id -> (holder, monotonic expiry); the last fence of each Session
    leases: dict[str, tuple[Lease, float]] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)
    # session id -> LiveRecording JSON (a copy: callers never share its consent)
    recordings: dict[str, str] = field(default_factory=dict)
    # node id -> (record, monotonic expiry)
    nodes: dict[str, tuple[NodeRecord, float]] = field(default_factory=dict)
    # session id -> (entries sorted by ts, wall-clock expiry)
    audit: dict[str, tuple[list[dict[str, Any]], float]] = field(default_factory=dict)
    # session id -> (participant id -> record, wall-clock expiry or None)
    attendance: dict[str, tuple[dict[str, AttendanceRecord], float | None]] = field(
        default_factory=dict)
    certificates: dict[str, CertificateRecord] = field(default_factory=dict)
    last_sweep: float = 0.0


class _NodeFanout(Fanout):
    """This Node's subscribers, so closing the store ends only its own."""

    def __init__(self, shared: Fanout) -> None:
        super().__init__()
        self._shared = shared

    def subscribe(self, session_id: str, buffer: int) -> EventSubscription:
        sub = EventSubscription(session_id, self, buffer)
        self.subscribers.setdefault(session_id, set()).add(sub)
        self._shared.subscribers.setdefault(session_id, set()).add(sub)
        return sub

    async def detach(self, sub: EventSubscription) -> None:
        self.remove(sub)
        self._shared.remove(sub)

    def end_all(self) -> None:
        for subs in list(self.subscribers.values()):
            for sub in list(subs):
                sub.end()
                self._shared.remove(sub)
        self.subscribers.clear()


class MemoryStore:
    """Implements every store Protocol; ``open_store(None, ...)`` wraps it."""

    kind = "memory"

    def __init__(self, node_id: str, state: MemoryState | None = None,
                 subscription_buffer: int = DEFAULT_SUBSCRIPTION_BUFFER) -> None:
        self.node_id = node_id
        self.state = state if state is not None else MemoryState()
        self._fanout = _NodeFanout(self.state.fanout)
        self._buffer = subscription_buffer
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")

    # -- backend ----------------------------------------------------------
    async def healthy(self) -> bool:
        return not self._closed

    async def aclose(self) -> None:
        self._closed = True
        self._fanout.end_all()

    # -- theatres ---------------------------------------------------------
    async def put_theatre(self, theatre: Theatre) -> None:
        self._check_open()
        self.state.theatres[theatre.id] = theatre

    async def get_theatre(self, theatre_id: str) -> Theatre | None:
        self._check_open()
        return self.state.theatres.get(theatre_id)

    async def list_theatres(self) -> list[Theatre]:
        self._check_open()
        return [self.state.theatres[k] for k in sorted(self.state.theatres)]

    async def delete_theatre(self, theatre_id: str) -> bool:
        self._check_open()
        return self.state.theatres.pop(theatre_id, None) is not None

    # -- sessions ---------------------------------------------------------
    async def create_session(self, record: SessionRecord) -> SessionRecord:
        self._check_open()
        record = stamp_new_session(record, self.node_id, self.state.wall())
        if record.theatre_id not in self.state.theatres:
            raise NotFound(f"no theatre {record.theatre_id!r}", code="unknown_theatre")
        existing = self.state.sessions.get(record.id)
        if existing is not None:
            raise Conflict(f"session {record.id} exists ({existing.state}); a Session id is "
                           "never used again", code="session_exists")
        self.state.sessions[record.id] = record
        return record

    async def get_session(self, session_id: str) -> SessionRecord | None:
        self._check_open()
        return self.state.sessions.get(session_id)

    async def list_sessions(self, state: SessionState | None = None) -> list[SessionRecord]:
        self._check_open()
        records = (self.state.sessions[k] for k in sorted(self.state.sessions))
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
        self._check_open()
        record = self._session(session_id)
        updated = apply_update(record, title=title, procedure=procedure, expert=expert,
                               starts_at=starts_at, ends_at=ends_at)
        self.state.sessions[session_id] = updated
        return updated

    async def set_session_state(self, session_id: str, state: SessionState, *,
                                fence: int | None = None) -> SessionRecord:
        self._check_open()
        record = self._session(session_id)
        if fence is not None and self.state.fences.get(session_id, 0) > fence:
            raise lease_lost(session_id)
        updated = apply_transition(record, state, self.node_id, self.state.wall())
        self.state.sessions[session_id] = updated
        return updated

    async def delete_session(self, session_id: str) -> bool:
        self._check_open()
        return self.state.sessions.pop(session_id, None) is not None

    def _session(self, session_id: str) -> SessionRecord:
        record = self.state.sessions.get(session_id)
        if record is None:
            raise NotFound(f"no session {session_id!r}", code="unknown_session")
        return record

    # -- presence ---------------------------------------------------------
    async def announce(self, entries: Sequence[PresenceEntry], *, ttl_s: float) -> None:
        self._check_open()
        check_ttl(ttl_s)
        expires = self.state.monotonic() + ttl_s
        for entry in entries:
            per_session = self.state.presence.setdefault(entry.session_id, {})
            per_session[(entry.participant_id, entry.node_id)] = (entry, expires)

    async def withdraw(self, session_id: str, participant_id: str, node_id: str) -> None:
        self._check_open()
        per_session = self.state.presence.get(session_id)
        if per_session is not None:
            per_session.pop((participant_id, node_id), None)
            if not per_session:
                del self.state.presence[session_id]

    async def roster(self, session_id: str) -> list[PresenceEntry]:
        self._check_open()
        per_session = self.state.presence.get(session_id, {})
        now = self.state.monotonic()
        for key in [k for k, (_, exp) in per_session.items() if exp <= now]:
            del per_session[key]
        if not per_session:
            self.state.presence.pop(session_id, None)
        return sort_roster(entry for entry, _ in per_session.values())

    # -- invites ----------------------------------------------------------
    async def revoke_invite(self, invite_id: str, *, expires_at: float) -> None:
        self._check_open()
        self._sweep()
        if expires_at > self.state.wall():
            previous = self.state.revoked.get(invite_id, 0.0)
            self.state.revoked[invite_id] = max(previous, expires_at)

    async def revoke_session(self, session_id: str, *, before: float) -> None:
        self._check_open()
        previous = self.state.revoked_before.get(session_id)
        if previous is None or before > previous:
            self.state.revoked_before[session_id] = before

    async def revoked_before(self, session_id: str) -> float | None:
        self._check_open()
        return self.state.revoked_before.get(session_id)

    async def is_revoked(self, token_ids: str | Sequence[str], *, session_id: str,
                         issued_at: float) -> bool:
        self._check_open()
        return self._revoked(RevocationCheck(lineage_ids(token_ids), session_id, issued_at))

    async def which_revoked(self, checks: Sequence[RevocationCheck]) -> list[bool]:
        self._check_open()
        return [self._revoked(check) for check in checks]

    def _revoked(self, check: RevocationCheck) -> bool:
        now = self.state.wall()
        for token_id in check.token_ids:
            expiry = self.state.revoked.get(token_id)
            if expiry is not None and expiry > now:
                return True
        before = self.state.revoked_before.get(check.session_id)
        return before is not None and check.issued_at < before

    async def use_invite(
        self, invite_id: str, *, max_uses: int, expires_at: float, redeemer: str | None = None
    ) -> bool:
        self._check_open()
        if max_uses < 1:
            raise ValueError("max_uses must be ≥ 1")
        self._sweep()
        now = self.state.wall()
        redeemers, expiry = self.state.uses.get(invite_id, (set(), 0.0))
        if expiry <= now:
            redeemers = set()
        if redeemer is not None and redeemer in redeemers:
            return True
        if len(redeemers) >= max_uses:
            return False
        redeemers.add(redeemer if redeemer is not None else f"~{secrets.token_hex(8)}")
        # Kept at least a second, as Redis does, so a use right at expiry counts.
        self.state.uses[invite_id] = (redeemers, max(expires_at, now + 1.0, expiry))
        return True

    async def invite_uses(self, invite_id: str) -> int:
        self._check_open()
        redeemers, expiry = self.state.uses.get(invite_id, (set(), 0.0))
        return len(redeemers) if expiry > self.state.wall() else 0

    async def put_invite(self, record: InviteRecord) -> None:
        self._check_open()
        self._sweep()
        if record.expires_at > self.state.wall():
            self.state.invites.setdefault(record.session_id, {})[record.id] = record

    async def get_invite(self, session_id: str, invite_id: str) -> InviteRecord | None:
        self._check_open()
        record = self.state.invites.get(session_id, {}).get(invite_id)
        return record if record is not None and record.expires_at > self.state.wall() else None

    async def list_invites(self, session_id: str) -> list[InviteRecord]:
        self._check_open()
        now = self.state.wall()
        records = [r for r in self.state.invites.get(session_id, {}).values()
                   if r.expires_at > now]
        return sorted(records, key=lambda r: (r.issued_at, r.id))

    # -- rate limiting ----------------------------------------------------
    async def hit(self, key: str, limit: int, window_s: float) -> bool:
        self._check_open()
        check_rate_args(limit, window_s)
        self._sweep()
        now = self.state.monotonic()
        hits = self.state.hits.setdefault(key, deque())
        # A hit counts for [t, t + window): at exactly t + window it is gone,
        # as in the Redis script.
        while hits and hits[0] <= now - window_s:
            hits.popleft()
        if len(hits) >= limit:
            if not hits:
                del self.state.hits[key]
            return False
        hits.append(now)
        return True

    # -- events -----------------------------------------------------------
    async def publish(self, session_id: str, event: Mapping[str, Any]) -> None:
        self._check_open()
        # Round-trip through JSON so subscribers get what Redis would give
        # them: a fresh dict of JSON types, and TypeError for anything else.
        decoded = json.loads(encode_event(event))
        self.state.fanout.deliver(session_id, decoded)

    async def subscribe(self, session_id: str) -> EventSubscription:
        self._check_open()
        return self._fanout.subscribe(session_id, self._buffer)

    # -- leases -----------------------------------------------------------
    def _live_lease(self, session_id: str) -> Lease | None:
        held = self.state.leases.get(session_id)
        if held is None:
            return None
        lease, expires = held
        now = self.state.monotonic()
        if expires <= now:
            del self.state.leases[session_id]
            return None
        return dataclasses.replace(lease, ttl_s=round(expires - now, 3))

    def _grant_lease(self, session_id: str, fence: int, since: float, ttl_s: float) -> Lease:
        lease = Lease(session_id=session_id, node_id=self.node_id, fence=fence, since=since,
                      ttl_s=ttl_s)
        self.state.leases[session_id] = (lease, self.state.monotonic() + ttl_s)
        self.state.fences[session_id] = max(fence, self.state.fences.get(session_id, 0))
        return lease

    async def acquire_lease(self, session_id: str, *, ttl_s: float) -> Lease:
        self._check_open()
        check_ttl(ttl_s)
        current = self._live_lease(session_id)
        if current is not None and current.node_id != self.node_id:
            return current
        now = self.state.wall()
        fence = next_fence(self.state.fences.get(session_id, 0), now)
        return self._grant_lease(session_id, fence, now, ttl_s)

    async def renew_leases(self, fences: Mapping[str, int], *, ttl_s: float) -> set[str]:
        self._check_open()
        check_ttl(ttl_s)
        lost = set()
        for session_id, fence in fences.items():
            current = self._live_lease(session_id)
            if current is not None:
                if current.fence != fence:
                    lost.add(session_id)
                    continue
                self._grant_lease(session_id, fence, current.since, ttl_s)
            elif self.state.fences.get(session_id, 0) > fence:
                lost.add(session_id)
            else:
                self._grant_lease(session_id, fence, self.state.wall(), ttl_s)
        return lost

    async def release_lease(self, session_id: str, fence: int) -> bool:
        self._check_open()
        current = self._live_lease(session_id)
        if current is None or current.fence != fence:
            return False
        del self.state.leases[session_id]
        return True

    async def get_lease(self, session_id: str) -> Lease | None:
        self._check_open()
        return self._live_lease(session_id)

    # -- live recordings ----------------------------------------------------
    async def put_live_recording(self, record: LiveRecording) -> None:
        self._check_open()
        self.state.recordings[record.session_id] = record.to_json()

    async def get_live_recording(self, session_id: str) -> LiveRecording | None:
        self._check_open()
        raw = self.state.recordings.get(session_id)
        return LiveRecording.from_json(raw) if raw is not None else None

    async def list_live_recordings(self) -> list[LiveRecording]:
        self._check_open()
        return [LiveRecording.from_json(self.state.recordings[k])
                for k in sorted(self.state.recordings)]

    async def clear_live_recording(self, session_id: str, recording_id: str) -> bool:
        self._check_open()
        raw = self.state.recordings.get(session_id)
        if raw is None or LiveRecording.from_json(raw).recording_id != recording_id:
            return False
        del self.state.recordings[session_id]
        return True

    # -- the Node registry ---------------------------------------------------
    async def heartbeat(self, record: NodeRecord, *, ttl_s: float) -> NodeRecord | None:
        self._check_open()
        check_ttl(ttl_s)
        now = self.state.monotonic()
        held = self.state.nodes.get(record.node_id)
        if held is not None and held[1] > now and held[0].instance != record.instance:
            return held[0]
        self.state.nodes[record.node_id] = (record, now + ttl_s)
        return None

    async def remove_node(self, node_id: str, instance: str) -> None:
        self._check_open()
        held = self.state.nodes.get(node_id)
        if held is not None and held[0].instance == instance:
            del self.state.nodes[node_id]

    async def list_nodes(self) -> list[NodeRecord]:
        self._check_open()
        now = self.state.monotonic()
        for node_id in [k for k, (_, exp) in self.state.nodes.items() if exp <= now]:
            del self.state.nodes[node_id]
        return [self.state.nodes[k][0] for k in sorted(self.state.nodes)]

    async def get_node(self, node_id: str) -> NodeRecord | None:
        self._check_open()
        held = self.state.nodes.get(node_id)
        return held[0] if held is not None and held[1] > self.state.monotonic() else None

    # -- the shared audit trail ------------------------------------------------
    async def append_audit(self, entries: Sequence[Mapping[str, Any]], *,
                           keep_s: float) -> None:
        self._check_open()
        check_ttl(keep_s)
        now = self.state.wall()
        for entry in entries:
            session_id = entry.get("session")
            if not isinstance(session_id, str) or not session_id:
                continue
            # Stored as JSON would store it: a fresh dict of JSON types.
            copy = json.loads(encode_event(entry))
            trail, _ = self.state.audit.get(session_id, ([], 0.0))
            bisect.insort(trail, copy, key=lambda e: float(e.get("ts", 0.0)))
            del trail[:-AUDIT_MAX_ENTRIES]
            self.state.audit[session_id] = (trail, now + keep_s)

    async def read_audit(self, session_id: str, *, since: float = 0.0,
                         limit: int = 1000) -> list[dict[str, Any]]:
        self._check_open()
        trail, expires = self.state.audit.get(session_id, ([], 0.0))
        if expires <= self.state.wall():
            return []
        start = bisect.bisect_left(trail, since, key=lambda e: float(e.get("ts", 0.0)))
        return [dict(e) for e in trail[start:][-limit:]] if limit > 0 else []

    # -- attendance and certificates -----------------------------------------
    async def put_attendance(self, records: Sequence[AttendanceRecord], *,
                             keep_s: float | None) -> None:
        self._check_open()
        if keep_s is not None:
            check_ttl(keep_s)
        self._sweep()
        now = self.state.wall()
        expiry = None if keep_s is None else now + keep_s
        for record in records:
            # Stored as JSON would store it, so both backends give back the same.
            copy = AttendanceRecord.from_json(record.to_json())
            rows, old = self.state.attendance.get(record.session_id, ({}, None))
            if old is not None and old <= now:
                rows = {}
            rows[record.participant_id] = copy
            self.state.attendance[record.session_id] = (rows, expiry)

    async def list_attendance(self, session_id: str) -> list[AttendanceRecord]:
        self._check_open()
        rows, expiry = self.state.attendance.get(session_id, ({}, None))
        if expiry is not None and expiry <= self.state.wall():
            return []
        return sort_attendance(rows.values())

    async def delete_attendance(self, session_id: str) -> bool:
        self._check_open()
        rows, expiry = self.state.attendance.pop(session_id, ({}, None))
        return bool(rows) and (expiry is None or expiry > self.state.wall())

    async def put_certificate(self, record: CertificateRecord) -> None:
        self._check_open()
        self.state.certificates[record.id] = CertificateRecord.from_json(record.to_json())

    async def get_certificate(self, certificate_id: str) -> CertificateRecord | None:
        self._check_open()
        return self.state.certificates.get(certificate_id)

    async def list_certificates(self, session_id: str) -> list[CertificateRecord]:
        self._check_open()
        return sorted((c for c in self.state.certificates.values()
                       if c.session_id == session_id), key=lambda c: (c.name, c.id))

    # -- housekeeping -----------------------------------------------------
    def _sweep(self) -> None:
        now_mono = self.state.monotonic()
        if now_mono - self.state.last_sweep < SWEEP_INTERVAL_S:
            return
        self.state.last_sweep = now_mono
        now = self.state.wall()
        for invite_id in [k for k, exp in self.state.revoked.items() if exp <= now]:
            del self.state.revoked[invite_id]
        for invite_id in [k for k, (_, exp) in self.state.uses.items() if exp <= now]:
            del self.state.uses[invite_id]
        for session_id in list(self.state.invites):
            records = self.state.invites[session_id]
            for invite_id in [k for k, r in records.items() if r.expires_at <= now]:
                del records[invite_id]
            if not records:
                del self.state.invites[session_id]
        # Any window is shorter than an hour in practice; a key idle that long
        # holds no hit that still counts.
        for key in [k for k, h in self.state.hits.items() if not h or h[-1] < now_mono - 3600]:
            del self.state.hits[key]
        for session_id in [k for k, (_, exp) in self.state.audit.items() if exp <= now]:
            del self.state.audit[session_id]
        for session_id in [k for k, (_, exp) in self.state.attendance.items()
                           if exp is not None and exp <= now]:
            del self.state.attendance[session_id]
        for session_id in list(self.state.presence):
            per_session = self.state.presence[session_id]
            for pkey in [k for k, (_, exp) in per_session.items() if exp <= now_mono]:
                del per_session[pkey]
            if not per_session:
                del self.state.presence[session_id]
