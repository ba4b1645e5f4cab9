"""The shared-state contract: small Protocols, the records they carry, one error.

Everything several Nodes must agree on goes through these interfaces; the
in-memory and the Redis implementation pass the same contract suite
(tests/test_store_contract.py). Each Protocol is a handful of methods so a
caller depends only on the slice it uses (``Store.presence``, ``Store.rates``…).

Every method may raise ``StoreUnavailable`` (the backend is unreachable or
closed). Callers on the live-media path catch it and carry on: media never
waits for shared state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, get_args

from ..errors import Conflict, Unavailable
from ..roles import Role
from ..theatre import Theatre, check_name

SessionState = Literal["scheduled", "live", "ended"]
SESSION_STATES: tuple[SessionState, ...] = get_args(SessionState)

#: The only moves a Session makes; "scheduled → ended" is a cancellation.
TRANSITIONS: Mapping[SessionState, frozenset[SessionState]] = {
    "scheduled": frozenset({"live", "ended"}),
    "live": frozenset({"ended"}),
    "ended": frozenset(),
}

Event = dict[str, Any]

DEFAULT_PREFIX = "scrubin:"

#: Entries kept per Session in the shared audit trail.
AUDIT_MAX_ENTRIES = 100_000


def lease_lost(session_id: str) -> Conflict:
    return Conflict(f"session {session_id} is held by another Node now", code="lease_lost")


class StoreUnavailable(Unavailable):
    """Shared state cannot be reached now (503, the server's fault, retry later)."""

    code = "store_unavailable"


# -- records ---------------------------------------------------------------


@dataclass(frozen=True)
class SessionRecord:
    """A Session as every Node sees it (the live objects stay on their Node)."""

    id: str
    theatre_id: str
    title: str
    procedure: str = ""
    #: Display name of the expert who leads it.
    expert: str = ""
    #: Planned start, seconds since the epoch (None: unscheduled / ad hoc).
    starts_at: float | None = None
    state: SessionState = "scheduled"
    started_at: float | None = None
    ended_at: float | None = None
    #: The Node that holds the live Session's peer connections ("" until live).
    node_id: str = ""
    #: Planned end, seconds since the epoch (None: the start plus
    #: ``[training] default_duration_min``, server/schedule.py).
    ends_at: float | None = None

    def __post_init__(self) -> None:
        check_name("session", self.id)
        check_name("theatre", self.theatre_id)
        if self.state not in SESSION_STATES:
            raise ValueError(f"unknown session state {self.state!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionRecord:
        return cls(**_known_fields(cls, json.loads(raw)))


@dataclass(frozen=True)
class LiveRecording:
    """A live Session's recording, as every Node sees it: written by the Node
    that records it when it starts, removed when it stops (by a person, a
    failure, or the Session ending for good), kept when the Session moves to
    another Node, which continues the same Recording under the same consent
    (server/recordings.py)."""

    session_id: str
    recording_id: str
    #: The consent record as the manifest has it (who, when, scope, note,
    #: started_by, auto).
    consent: Mapping[str, Any]
    #: Wall time of Session clock 0, which the Recording is timed on.
    clock_zero_unix: float
    #: Session clock of consent: nothing before it is recorded.
    started_t: float
    #: The Node recording it now.
    node_id: str
    #: Wall time it was written.
    since: float

    def __post_init__(self) -> None:
        check_name("session", self.session_id)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["consent"] = dict(self.consent)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> LiveRecording:
        return cls(**_known_fields(cls, json.loads(raw)))


@dataclass(frozen=True)
class PresenceEntry:
    """One participant connected to one Node. The same participant on two
    Nodes (two tabs through different Nodes) is two entries."""

    session_id: str
    participant_id: str
    role: Role
    name: str
    node_id: str
    #: Seconds since the epoch.
    connected_since: float

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["role"] = self.role.value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> PresenceEntry:
        data = _known_fields(cls, json.loads(raw))
        data["role"] = Role(data["role"])
        return cls(**data)


@dataclass(frozen=True)
class InviteRecord:
    """What an admin handed out: enough to list, re-issue and revoke an invite.

    The token itself is not stored; it is signed again from these claims when
    an admin asks for the link once more."""

    id: str
    session_id: str
    role: Role
    #: Display name carried by the invite ("" = asked when it is redeemed).
    name: str
    #: The ``sub`` claim of the invite token itself.
    participant_id: str
    issued_at: float
    expires_at: float
    #: None: any number of Participants.
    max_uses: int | None = None
    #: Who created it (the admin's display name or participant id).
    created_by: str = ""
    revoked_at: float | None = None
    #: "" : valid until ``expires_at``. "schedule": until the Session's
    #: scheduled end plus a margin; "review": for a review window after it
    #: (server/schedule.py), read from the Session's record at every check, so
    #: rescheduling moves it. ``expires_at`` (the token's ``exp``) is then only
    #: the ceiling.
    valid_for: str = ""

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["role"] = self.role.value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> InviteRecord:
        data = _known_fields(cls, json.loads(raw))
        data["role"] = Role(data["role"])
        return cls(**data)


@dataclass(frozen=True)
class AttendanceRecord:
    """One Participant's attendance of one Session (server/attendance.py)."""

    session_id: str
    participant_id: str
    role: Role
    name: str
    #: [joined, left] pairs, epoch seconds; left None while still connected.
    intervals: tuple[tuple[float, float | None], ...] = ()
    #: Seconds they were receiving the main camera (frames reaching them).
    main_camera_s: float = 0.0
    #: Procedure steps marked while they were present, in order.
    steps: tuple[str, ...] = ()
    #: The questions they asked.
    questions: tuple[str, ...] = ()

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["role"] = self.role.value
        data["intervals"] = [list(i) for i in self.intervals]
        data["steps"] = list(self.steps)
        data["questions"] = list(self.questions)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> AttendanceRecord:
        data = _known_fields(cls, json.loads(raw))
        data["role"] = Role(data["role"])
        data["intervals"] = tuple((float(a), None if b is None else float(b))
                                  for a, b in data.get("intervals", ()))
        data["steps"] = tuple(str(x) for x in data.get("steps", ()))
        data["questions"] = tuple(str(x) for x in data.get("questions", ()))
        return cls(**data)


@dataclass(frozen=True)
class CertificateRecord:
    """A certificate of attendance (server/certificates.py): exactly what the
    PDF says and the public verification answers, plus who issued it and
    whether it was revoked."""

    #: The verification id: 160 random bits, hex.
    id: str
    session_id: str
    participant_id: str
    name: str
    title: str
    procedure: str
    expert: str
    #: The Session's date, YYYY-MM-DD (UTC).
    date: str
    minutes: int
    issued_at: float
    issued_by: str = ""
    revoked_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> CertificateRecord:
        return cls(**_known_fields(cls, json.loads(raw)))


@dataclass(frozen=True)
class Lease:
    """Which Node holds a live Session now (its peer connections, its state).

    ``fence`` grows with every acquisition, so anything the holder writes or
    publishes can be told apart from what an earlier holder did."""

    session_id: str
    node_id: str
    fence: int
    #: When this holder acquired it, seconds since the epoch.
    since: float
    #: Seconds left before it expires unless renewed (as of the read).
    ttl_s: float


@dataclass(frozen=True)
class NodeRecord:
    """One running Node, as the other Nodes find it in the registry."""

    node_id: str
    #: Random per process start: two processes never share a ``node_id``.
    instance: str
    #: Where pages, the API and WHIP/WHEP reach this Node (its public URL).
    url: str
    #: Addresses its peer connections are reached at (ICE host candidates) and
    #: the UDP ports they use ("" = ephemeral).
    media_addresses: tuple[str, ...] = ()
    udp_ports: str = ""
    #: Sessions held, websockets, Subscriptions, Feeds, CPU share of one core.
    load: Mapping[str, float] = dataclasses.field(default_factory=dict)
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    #: Stopping (SIGTERM): takes no new joins; nobody is sent there.
    draining: bool = False

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["media_addresses"] = list(self.media_addresses)
        data["load"] = dict(self.load)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> NodeRecord:
        data = _known_fields(cls, json.loads(raw))
        data["media_addresses"] = tuple(str(a) for a in data.get("media_addresses", ()))
        data["load"] = {str(k): float(v) for k, v in dict(data.get("load", {})).items()}
        return cls(**data)

    def describe(self) -> dict[str, Any]:
        return {"id": self.node_id, "url": self.url,
                "media": {"addresses": list(self.media_addresses), "udp_ports": self.udp_ports},
                "load": dict(self.load), "started_at": self.started_at,
                "heartbeat_at": self.heartbeat_at, "draining": self.draining}


@dataclass(frozen=True)
class RevocationCheck:
    """Is this grant revoked? Its lineage (its id, then its ancestors'), the
    Session its token was issued for ("*" for node-wide admin tokens) and its
    ``iat``."""

    token_ids: tuple[str, ...]
    session_id: str
    issued_at: float


def lineage_ids(token_ids: str | Sequence[str]) -> tuple[str, ...]:
    # A bare string is one id, not a sequence of one-character ids.
    return (token_ids,) if isinstance(token_ids, str) else tuple(token_ids)


def theatre_to_json(theatre: Theatre) -> str:
    return json.dumps({"id": theatre.id, "name": theatre.name, "slots": list(theatre.slots)},
                      separators=(",", ":"))


def theatre_from_json(raw: str | bytes) -> Theatre:
    data = json.loads(raw)
    return Theatre(str(data["id"]), str(data["name"]), tuple(str(s) for s in data["slots"]))


def _known_fields(cls: type[Any], data: Any) -> dict[str, Any]:
    # A newer Node may have written fields this one does not know: ignore them
    # rather than fail a rolling upgrade.
    if not isinstance(data, dict):
        raise ValueError(f"stored {cls.__name__} is not an object")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def encode_event(event: Mapping[str, Any]) -> str:
    """Events cross Nodes as JSON; both backends encode so both fail alike
    (TypeError) on a value JSON cannot carry."""
    return json.dumps(event, separators=(",", ":"), allow_nan=False)


def check_rate_args(limit: int, window_s: float) -> None:
    if limit < 0:
        raise ValueError("limit must be ≥ 0")
    if not (window_s > 0 and math.isfinite(window_s)):
        raise ValueError("window_s must be a positive number of seconds")


def next_fence(last: int, now_s: float) -> int:
    """The fence after ``last``: never below the clock in milliseconds, so it
    still grows when a store lost its counters (a Redis restarted empty)."""
    return max(last + 1, int(now_s * 1000))


def check_ttl(ttl_s: float) -> None:
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError("ttl_s must be a positive number of seconds")


# -- the Protocols ---------------------------------------------------------


class TheatreStore(Protocol):
    async def put_theatre(self, theatre: Theatre) -> None:
        """Create or replace."""

    async def get_theatre(self, theatre_id: str) -> Theatre | None: ...

    async def list_theatres(self) -> list[Theatre]:
        """Sorted by id."""

    async def delete_theatre(self, theatre_id: str) -> bool:
        """True if it existed."""


class SessionStore(Protocol):
    async def create_session(self, record: SessionRecord) -> SessionRecord:
        """Store a new "scheduled" or "live" Session (a live one is stamped with
        this Node and the start time). Raises NotFound (unknown_theatre) and
        Conflict (session_exists) if any Session ever had this id: an ended
        one included, since tokens, invites and recordings name a Session by
        its id (docs/security.md)."""

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def list_sessions(self, state: SessionState | None = None) -> list[SessionRecord]:
        """Sorted by id, optionally only those in ``state``."""

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
        """Change the descriptive fields (None leaves a field as it is),
        atomically. A new ``starts_at`` without ``ends_at`` moves a planned
        end along (the Session keeps its length); an end not after the start
        is BadRequest (bad_schedule). NotFound if unknown."""

    async def set_session_state(self, session_id: str, state: SessionState, *,
                                fence: int | None = None) -> SessionRecord:
        """Move along scheduled → live → ended (or scheduled → ended),
        atomically: of two Nodes starting the same Session one wins, the other
        gets Conflict (bad_transition). "live" records this Node and
        ``started_at``, "ended" records ``ended_at``. NotFound if unknown.
        With ``fence`` (a lease holder's), only if no lease was acquired for
        the Session after it: Conflict (lease_lost) otherwise."""

    async def delete_session(self, session_id: str) -> bool:
        """True if it existed."""


class PresenceStore(Protocol):
    async def announce(self, entries: Sequence[PresenceEntry], *, ttl_s: float) -> None:
        """Write (or re-write) entries; each disappears ``ttl_s`` after its last
        announce unless announced again. See ``Presence`` for the refresh loop."""

    async def withdraw(self, session_id: str, participant_id: str, node_id: str) -> None: ...

    async def roster(self, session_id: str) -> list[PresenceEntry]:
        """Live entries of every Node, oldest connection first."""


class InviteStore(Protocol):
    async def revoke_invite(self, invite_id: str, *, expires_at: float) -> None:
        """Refuse this grant (an invite, or any token by its ``jti``) and
        everything derived from it, from now on. Remembered until
        ``expires_at`` (the token's own expiry, epoch seconds), after which the
        token is refused anyway; a past ``expires_at`` stores nothing."""

    async def revoke_session(self, session_id: str, *, before: float) -> None:
        """Refuse every token of the Session issued before ``before`` (epoch
        seconds). Only ever moves forward: a smaller value is ignored."""

    async def revoked_before(self, session_id: str) -> float | None: ...

    async def is_revoked(self, token_ids: str | Sequence[str], *, session_id: str,
                         issued_at: float) -> bool:
        """Both checks in one round trip: any id of the grant's lineage (its
        own, its invite's, its parents'), or its Session's "revoked before"
        (``issued_at < before``)."""

    async def which_revoked(self, checks: Sequence[RevocationCheck]) -> list[bool]:
        """``is_revoked`` for many grants in one round trip (the periodic
        re-check of live connections), in order."""

    async def use_invite(
        self, invite_id: str, *, max_uses: int, expires_at: float, redeemer: str | None = None
    ) -> bool:
        """Count one use, atomically across Nodes; False once ``max_uses`` are
        taken. A ``redeemer`` (e.g. a device id) that already used the invite is
        let in again without using it up, so reloading the page is not a second
        use; None counts every call. The count is kept until ``expires_at``."""

    async def invite_uses(self, invite_id: str) -> int: ...

    async def put_invite(self, record: InviteRecord) -> None:
        """Create or replace the record of an invite; it is kept until the
        invite expires (``record.expires_at``), then forgotten."""

    async def get_invite(self, session_id: str, invite_id: str) -> InviteRecord | None:
        """None if unknown or expired."""

    async def list_invites(self, session_id: str) -> list[InviteRecord]:
        """The Session's unexpired invites, oldest first."""


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window_s: float) -> bool:
        """Sliding window: True if fewer than ``limit`` hits were allowed for
        ``key`` in the last ``window_s`` seconds (and count this one). Refused
        hits are not counted, so a client that backs off gets in again."""


class EventBus(Protocol):
    async def publish(self, session_id: str, event: Mapping[str, Any]) -> None:
        """Deliver to every subscriber of the Session on every Node (this one
        included), in publish order per publisher. At most once: subscribers
        cut off by an outage miss what was published meanwhile. TypeError if
        the event is not JSON."""

    async def subscribe(self, session_id: str) -> EventSubscription:
        """Every event published after this returns is delivered. Close it
        (``async with``) when done."""


class LeaseStore(Protocol):
    """One owner per live Session, with a fencing token.

    A lease expires ``ttl_s`` after its last renewal. The fence of every
    acquisition is larger than any before it for that Session, even after a
    Redis that lost its data (it is never below the store's clock in
    milliseconds)."""

    async def acquire_lease(self, session_id: str, *, ttl_s: float) -> Lease:
        """Take the lease if it is free, or held under this Node's own id (an
        earlier run of this Node: the new fence fences it off). Otherwise the
        holder's lease comes back unchanged: check ``lease.node_id``."""

    async def renew_leases(self, fences: Mapping[str, int], *, ttl_s: float) -> set[str]:
        """Extend every lease this Node holds (Session id -> its fence) in one
        round trip. A lease that expired meanwhile is taken back if nobody
        acquired it since. Returns the Sessions whose lease is lost (someone
        else acquired it after this fence)."""

    async def release_lease(self, session_id: str, fence: int) -> bool:
        """Give it up now (True) if this fence still holds it."""

    async def get_lease(self, session_id: str) -> Lease | None:
        """The current holder, None if nobody holds it."""


class RecordingStateStore(Protocol):
    """The recording state of live Sessions (``LiveRecording``), one per Session."""

    async def put_live_recording(self, record: LiveRecording) -> None:
        """Write it (replacing what the Session had)."""

    async def get_live_recording(self, session_id: str) -> LiveRecording | None: ...

    async def list_live_recordings(self) -> list[LiveRecording]:
        """Every live Session's recording, sorted by Session id."""

    async def clear_live_recording(self, session_id: str, recording_id: str) -> bool:
        """Remove it if it still names ``recording_id`` (True): a Node that
        stops late never clears a Recording started since."""


class NodeStore(Protocol):
    """The registry of running Nodes: each writes its record every heartbeat."""

    async def heartbeat(self, record: NodeRecord, *, ttl_s: float) -> NodeRecord | None:
        """Write this Node's record; it disappears ``ttl_s`` after the last
        heartbeat. If another live process (another ``instance``) holds the
        same ``node_id``, nothing is written and its record comes back."""

    async def remove_node(self, node_id: str, instance: str) -> None:
        """Leave the registry now (only this instance's record)."""

    async def list_nodes(self) -> list[NodeRecord]:
        """Live Nodes, sorted by id."""

    async def get_node(self, node_id: str) -> NodeRecord | None: ...


class AuditStore(Protocol):
    """One audit trail per Session, whichever Nodes wrote to it."""

    async def append_audit(self, entries: Sequence[Mapping[str, Any]], *,
                           keep_s: float) -> None:
        """Add entries (each with ``ts`` and ``session``; others are ignored).
        A Session's trail is kept ``keep_s`` after its last entry, at most
        ``AUDIT_MAX_ENTRIES`` entries (the oldest go first)."""

    async def read_audit(self, session_id: str, *, since: float = 0.0,
                         limit: int = 1000) -> list[dict[str, Any]]:
        """The newest ``limit`` entries with ``ts >= since``, oldest first."""


class TrainingStore(Protocol):
    """Attendance and certificates of attendance, whichever Node held the Session."""

    async def put_attendance(self, records: Sequence[AttendanceRecord], *,
                             keep_s: float | None) -> None:
        """Create or replace these Participants' records; a Session's records
        are kept ``keep_s`` after the last write (None: until deleted)."""

    async def list_attendance(self, session_id: str) -> list[AttendanceRecord]:
        """Sorted by first join, then participant id."""

    async def delete_attendance(self, session_id: str) -> bool:
        """True if there was any."""

    async def put_certificate(self, record: CertificateRecord) -> None:
        """Create or replace (a revocation is a replacement); kept until deleted."""

    async def get_certificate(self, certificate_id: str) -> CertificateRecord | None: ...

    async def list_certificates(self, session_id: str) -> list[CertificateRecord]:
        """Sorted by name, then id."""


class Backend(Protocol):
    kind: str
    node_id: str

    async def healthy(self) -> bool: ...

    async def aclose(self) -> None: ...


# -- subscriptions (shared by both backends) -------------------------------

#: Events buffered per subscriber before it is cut off as too slow.
DEFAULT_SUBSCRIPTION_BUFFER = 1024


class EventSubscription:
    """Events of one Session for one local consumer: ``async for event in sub``.

    Iteration ends when the subscription is closed, when its store closes, or
    when the consumer falls ``buffer`` events behind (``overflowed`` is then
    True: resubscribe and re-read the state you derive from events). Events are
    shared between local subscribers: treat them as read-only.
    """

    def __init__(self, session_id: str, owner: Fanout, buffer: int) -> None:
        self.session_id = session_id
        self.overflowed = False
        self._owner = owner
        self._buffer = buffer
        self._queue: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._ended = False
        self._detached = False

    @property
    def closed(self) -> bool:
        return self._ended

    def deliver(self, event: Event) -> None:
        if self._ended:
            return
        if len(self._queue) >= self._buffer:
            # Cut a slow consumer off rather than buffer without bound; it is
            # told (overflowed) instead of silently missing events.
            self.overflowed = True
            self.end()
            return
        self._queue.append(event)
        self._wakeup.set()

    def end(self) -> None:
        """Stop after the buffered events (no more are accepted)."""
        self._ended = True
        self._wakeup.set()

    async def close(self) -> None:
        self.end()
        self._queue.clear()
        if not self._detached:
            self._detached = True
            await self._owner.detach(self)

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; TimeoutError after ``timeout`` s, StopAsyncIteration
        if the subscription has ended."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


class Fanout:
    """Local subscribers by Session; a backend feeds it (memory: directly,
    Redis: from its one pub/sub connection)."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[EventSubscription]] = {}

    def add(self, session_id: str, buffer: int) -> EventSubscription:
        sub = EventSubscription(session_id, self, buffer)
        self.subscribers.setdefault(session_id, set()).add(sub)
        return sub

    def remove(self, sub: EventSubscription) -> bool:
        """Forget ``sub``; True if it was the Session's last local subscriber."""
        subs = self.subscribers.get(sub.session_id)
        if subs is None:
            return False
        subs.discard(sub)
        if subs:
            return False
        del self.subscribers[sub.session_id]
        return True

    async def detach(self, sub: EventSubscription) -> None:
        self.remove(sub)

    def deliver(self, session_id: str, event: Event) -> None:
        for sub in list(self.subscribers.get(session_id, ())):
            sub.deliver(event)

    def end_all(self) -> None:
        for subs in list(self.subscribers.values()):
            for sub in list(subs):
                sub.end()
        self.subscribers.clear()


# -- the bundle --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Store:
    """Everything live and shared, one attribute per concern. Built only by
    ``server.store.open_store``."""

    theatres: TheatreStore
    sessions: SessionStore
    presence: PresenceStore
    invites: InviteStore
    rates: RateLimiter
    events: EventBus
    leases: LeaseStore
    nodes: NodeStore
    audit: AuditStore
    training: TrainingStore
    recordings: RecordingStateStore
    backend: Backend

    @property
    def kind(self) -> str:
        """"memory" or "redis"."""
        return self.backend.kind

    @property
    def node_id(self) -> str:
        return self.backend.node_id

    async def healthy(self) -> bool:
        """For /readyz: the backend answers now (bounded by the store timeout)."""
        return await self.backend.healthy()

    async def close(self) -> None:
        """Ends every subscription and releases connections; later calls raise
        StoreUnavailable."""
        await self.backend.aclose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
