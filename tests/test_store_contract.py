"""One contract for the shared store, run against both backends.

The Redis run uses a real redis-server started by pytest-redis on a free
port (never 6379), never a mock. "Two Nodes" are two stores on the same
backend: two RedisStores on one Redis, or two MemoryStores on one MemoryState.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from pytest_redis import factories
from redis.asyncio import Redis

from server.errors import BadRequest, Conflict, NotFound, Unavailable
from server.roles import Role
from server.store import (
    SESSION_STATES,
    AttendanceRecord,
    CertificateRecord,
    InviteRecord,
    LiveRecording,
    MemoryState,
    NodeRecord,
    Presence,
    PresenceEntry,
    RevocationCheck,
    SessionRecord,
    SessionState,
    Store,
    StoreUnavailable,
    open_store,
)
from server.theatre import Theatre

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# port=None: a free port picked by port-for; the test Redis is never the
# machine's own (6379). (None is documented but missing from the type hint.)
redis_proc = factories.redis_proc(executable=REDIS_SERVER, port=None)  # type: ignore[arg-type]


class FakeClock:
    """The stores' clock here: deadlines pass when a test says so, never by
    waiting, so a loaded machine cannot shift them."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Nodes:
    """A factory of stores ("Nodes") sharing one backend and one clock."""

    kind: str
    prefix: str
    make: Callable[[str], Store]
    clock: FakeClock
    raw: Redis | None = None
    opened: list[Store] = field(default_factory=list)

    def open(self, node_id: str) -> Store:
        store = self.make(node_id)
        self.opened.append(store)
        return store


@pytest.fixture(params=["memory", "redis"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    clock = FakeClock()
    if request.param == "memory":
        state = MemoryState(wall=clock, monotonic=clock)
        result = Nodes("memory", prefix,
                       lambda node: open_store(None, node_id=node, memory=state), clock)
    else:
        proc = request.getfixturevalue("redis_proc")
        assert proc.port != 6379
        url = f"redis://{proc.host}:{proc.port}/0"
        result = Nodes("redis", prefix,
                       lambda node: open_store(url, node_id=node, prefix=prefix, clock=clock),
                       clock, raw=Redis(host=proc.host, port=proc.port, decode_responses=True))
    try:
        yield result
    finally:
        for store in result.opened:
            await store.close()
        if result.raw is not None:
            keys = [k async for k in result.raw.scan_iter(match=prefix + "*")]
            if keys:
                await result.raw.delete(*keys)
            await result.raw.aclose()


@pytest.fixture
async def store(nodes: Nodes) -> Store:
    return nodes.open("node-a")


OR1 = Theatre("or1", "Theatre 1", ("room", "endoscope"))


def entry(session: str, participant: str, node: str = "node-a", *, role: Role = Role.TRAINEE,
          name: str = "", since: float = 1000.0) -> PresenceEntry:
    return PresenceEntry(session_id=session, participant_id=participant, role=role,
                         name=name or participant, node_id=node, connected_since=since)


async def elapse(nodes: Nodes, seconds: float) -> None:
    """Time passes for the stores: the fake clock moves; Redis expires keys by
    its own clock, so there the time also really passes."""
    nodes.clock.advance(seconds)
    if nodes.kind == "redis":
        await asyncio.sleep(seconds)


async def eventually(check: Callable[[], object], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# -- the bundle ----------------------------------------------------------------


async def test_open_store_picks_the_backend(nodes: Nodes, store: Store) -> None:
    assert store.kind == nodes.kind
    assert store.node_id == "node-a"
    assert await store.healthy()


def test_open_store_without_url_is_memory() -> None:
    assert open_store(None, node_id="n").kind == "memory"
    assert open_store("", node_id="n").kind == "memory"


def test_open_store_rejects_a_bad_url() -> None:
    with pytest.raises(ValueError):
        open_store("http://example.invalid/", node_id="n")


def test_store_unavailable_is_a_503_of_the_server() -> None:
    error = StoreUnavailable("redis is down")
    assert isinstance(error, Unavailable)
    assert error.to_dict() == {"code": "store_unavailable", "message": "redis is down",
                               "fault": "server", "status": 503}


async def test_closed_store_is_unhealthy_and_refuses_calls(store: Store) -> None:
    sub = await store.events.subscribe("s1")
    await store.close()
    assert not await store.healthy()
    with pytest.raises(StoreUnavailable):
        await store.theatres.list_theatres()
    with pytest.raises(StoreUnavailable):
        await store.rates.hit("k", 1, 1.0)
    with pytest.raises(StoreUnavailable):
        await store.events.subscribe("s1")
    # Subscriptions end with their store, and so do its background tasks.
    assert [e async for e in sub] == []
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("store-")]
    await store.close()  # idempotent


# -- theatres ------------------------------------------------------------------


async def test_a_cancelled_call_is_cancelled(store: Store) -> None:
    """A task cancelled while a store call is in flight stops there: redis-py
    swallows some such cancellations, which left a Session's watcher waiting
    forever after its Session ended."""
    for i in range(60):
        async def call() -> None:
            await store.sessions.get_session("s1")
            await asyncio.sleep(30)

        task = asyncio.ensure_future(call())
        await asyncio.sleep(0.0003 * (i % 12))
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        assert done and task.cancelled(), f"attempt {i}: the cancellation was lost"


async def test_theatres(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    assert await store.theatres.get_theatre("or1") is None
    assert await store.theatres.list_theatres() == []
    await store.theatres.put_theatre(OR1)
    await store.theatres.put_theatre(Theatre("a0", "Annex", ("room",)))
    assert await other.theatres.get_theatre("or1") == OR1
    assert [t.id for t in await other.theatres.list_theatres()] == ["a0", "or1"]
    renamed = Theatre("or1", "Theatre One", ("room", "endoscope", "overhead"))
    await other.theatres.put_theatre(renamed)
    assert await store.theatres.get_theatre("or1") == renamed
    assert await store.theatres.delete_theatre("or1") is True
    assert await store.theatres.delete_theatre("or1") is False
    assert [t.id for t in await store.theatres.list_theatres()] == ["a0"]


# -- sessions ------------------------------------------------------------------


async def test_session_lifecycle(nodes: Nodes, store: Store) -> None:
    await store.theatres.put_theatre(OR1)
    scheduled = SessionRecord(id="s1", theatre_id="or1", title="Cholecystectomy",
                              procedure="lap chole", expert="Dr Ada", starts_at=1_900_000_000.0)
    created = await store.sessions.create_session(scheduled)
    assert created == scheduled
    assert created.state == "scheduled" and created.node_id == "" and created.started_at is None

    other = nodes.open("node-b")
    assert await other.sessions.get_session("s1") == created
    assert await other.sessions.get_session("nope") is None

    updated = await other.sessions.update_session("s1", title="Lap chole", expert="Dr Bo")
    assert (updated.title, updated.expert, updated.procedure) == ("Lap chole", "Dr Bo",
                                                                  "lap chole")
    assert updated.starts_at == 1_900_000_000.0
    assert await store.sessions.get_session("s1") == updated

    nodes.clock.advance(5)
    live = await store.sessions.set_session_state("s1", "live")
    assert live.state == "live" and live.node_id == "node-a"
    assert live.started_at == nodes.clock()
    assert live.title == "Lap chole"

    ended = await other.sessions.set_session_state("s1", "ended")
    assert ended.state == "ended" and ended.ended_at is not None
    assert ended.started_at == live.started_at and ended.node_id == "node-a"
    assert await store.sessions.get_session("s1") == ended

    assert await store.sessions.delete_session("s1") is True
    assert await store.sessions.delete_session("s1") is False
    assert await store.sessions.get_session("s1") is None


async def test_session_refusals(store: Store) -> None:
    with pytest.raises(NotFound) as unknown_theatre:
        await store.sessions.create_session(SessionRecord(id="s1", theatre_id="or9", title="x"))
    assert unknown_theatre.value.code == "unknown_theatre"
    await store.theatres.put_theatre(OR1)
    await store.sessions.create_session(SessionRecord(id="s1", theatre_id="or1", title="x"))
    with pytest.raises(Conflict) as exists:
        await store.sessions.create_session(SessionRecord(id="s1", theatre_id="or1", title="y"))
    assert exists.value.code == "session_exists"
    with pytest.raises(NotFound) as unknown:
        await store.sessions.set_session_state("s2", "live")
    assert unknown.value.code == "unknown_session"
    with pytest.raises(NotFound):
        await store.sessions.update_session("s2", title="y")
    with pytest.raises(ValueError):
        await store.sessions.create_session(
            SessionRecord(id="s3", theatre_id="or1", title="x", state="ended"))

    await store.sessions.set_session_state("s1", "live")
    bad_moves: tuple[SessionState, ...] = ("live", "scheduled")
    for bad in bad_moves:
        with pytest.raises(Conflict) as transition:
            await store.sessions.set_session_state("s1", bad)
        assert transition.value.code == "bad_transition"
    await store.sessions.set_session_state("s1", "ended")
    for bad in SESSION_STATES:
        with pytest.raises(Conflict):
            await store.sessions.set_session_state("s1", bad)
    # An ended Session's id names that Session forever: never a second one
    # (old tokens, invites and recordings name it), scheduled or live.
    for state in ("scheduled", "live"):
        with pytest.raises(Conflict) as reused:
            await store.sessions.create_session(
                SessionRecord(id="s1", theatre_id="or1", title="second", state=state))
        assert reused.value.code == "session_exists"
    record = await store.sessions.get_session("s1")
    assert record is not None and record.state == "ended" and record.title == "x"


async def test_scheduled_session_can_be_cancelled(store: Store) -> None:
    await store.theatres.put_theatre(OR1)
    await store.sessions.create_session(SessionRecord(id="s1", theatre_id="or1", title="x"))
    cancelled = await store.sessions.set_session_state("s1", "ended")
    assert cancelled.state == "ended" and cancelled.started_at is None


async def test_list_sessions_by_state(store: Store) -> None:
    await store.theatres.put_theatre(OR1)
    for sid in ("c", "a", "b"):
        await store.sessions.create_session(SessionRecord(id=sid, theatre_id="or1", title=sid))
    await store.sessions.set_session_state("b", "live")
    await store.sessions.set_session_state("c", "ended")
    assert [r.id for r in await store.sessions.list_sessions()] == ["a", "b", "c"]
    assert [r.id for r in await store.sessions.list_sessions("scheduled")] == ["a"]
    assert [r.id for r in await store.sessions.list_sessions("live")] == ["b"]
    assert [r.id for r in await store.sessions.list_sessions("ended")] == ["c"]


async def test_two_nodes_starting_one_session_one_wins(nodes: Nodes, store: Store) -> None:
    others = [nodes.open(f"node-{i}") for i in range(5)]
    await store.theatres.put_theatre(OR1)
    await store.sessions.create_session(SessionRecord(id="s1", theatre_id="or1", title="x"))
    results = await asyncio.gather(
        *(s.sessions.set_session_state("s1", "live") for s in [store, *others] * 2),
        return_exceptions=True)
    winners = [r for r in results if isinstance(r, SessionRecord)]
    assert len(winners) == 1
    assert all(isinstance(r, Conflict) for r in results if r not in winners)
    stored = await store.sessions.get_session("s1")
    assert stored is not None and stored.node_id == winners[0].node_id


# -- presence ------------------------------------------------------------------


async def test_presence_announce_roster_withdraw(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    await store.presence.announce(
        [entry("s1", "p2", since=1002.0, role=Role.EXPERT, name="Dr Ada"),
         entry("s1", "p1", since=1001.0), entry("s2", "p9")], ttl_s=10)
    await other.presence.announce([entry("s1", "p1", node="node-b", since=1003.0)], ttl_s=10)

    roster = await other.presence.roster("s1")
    assert [(e.participant_id, e.node_id) for e in roster] == [
        ("p1", "node-a"), ("p2", "node-a"), ("p1", "node-b")]
    assert roster[1] == entry("s1", "p2", since=1002.0, role=Role.EXPERT, name="Dr Ada")
    assert [e.participant_id for e in await store.presence.roster("s2")] == ["p9"]
    assert await store.presence.roster("s3") == []

    # Re-announcing replaces the entry (a rename, say) instead of adding one.
    await store.presence.announce([entry("s1", "p2", since=1002.0, name="Ada L")], ttl_s=10)
    assert [e.name for e in await store.presence.roster("s1")] == ["p1", "Ada L", "p1"]

    await store.presence.withdraw("s1", "p1", "node-a")
    await store.presence.withdraw("s1", "p1", "node-a")  # idempotent
    assert [(e.participant_id, e.node_id) for e in await store.presence.roster("s1")] == [
        ("p2", "node-a"), ("p1", "node-b")]
    await store.presence.announce([], ttl_s=10)  # nothing to do


async def test_presence_expires_unless_refreshed(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    await store.presence.announce([entry("s1", "dead")], ttl_s=15)
    await other.presence.announce([entry("s1", "alive", node="node-b")], ttl_s=15)
    nodes.clock.advance(14.999)
    assert len(await store.presence.roster("s1")) == 2, "alive until its deadline"
    for _ in range(3):
        await other.presence.announce([entry("s1", "alive", node="node-b")], ttl_s=15)
        nodes.clock.advance(10)
    assert [e.participant_id for e in await store.presence.roster("s1")] == ["alive"]
    nodes.clock.advance(5)  # exactly at the deadline: gone, as a hit leaves its window
    assert await store.presence.roster("s1") == []


async def test_presence_rejects_a_bad_ttl(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.presence.announce([entry("s1", "p1")], ttl_s=0)


async def test_presence_helper_refcounts_and_refreshes(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    presence = Presence(store.presence, node_id="node-a", ttl_s=30.0, interval_s=0.05)
    with pytest.raises(ValueError):
        Presence(store.presence, node_id="node-a", ttl_s=1, interval_s=1)
    async with presence:
        first = await presence.join("s1", "p1", Role.TRAINEE, "Tom")
        again = await presence.join("s1", "p1", Role.TRAINEE, "Tom")  # a second tab
        assert first is again and first.node_id == "node-a"
        await presence.join("s1", "p2", Role.EXPERT, "Ada")
        assert {e.participant_id for e in await other.presence.roster("s1")} == {"p1", "p2"}

        await presence.leave("s1", "p1")  # one tab closed: still here
        assert {e.participant_id for e in await other.presence.roster("s1")} == {"p1", "p2"}
        await presence.leave("s1", "p1")
        assert {e.participant_id for e in await other.presence.roster("s1")} == {"p2"}
        await presence.leave("s1", "nobody")

        # Lost from the store (an outage, a Redis restarted empty): the loop
        # writes it back; and it outlives its TTL because it is refreshed.
        await other.presence.withdraw("s1", "p2", "node-a")
        await eventually(lambda: other.presence.roster("s1"))
        # Three TTLs pass on the stores' clock, a refresh after each third of one.
        await other.presence.announce([entry("s1", "once", node="node-b")], ttl_s=30)
        for _ in range(9):
            nodes.clock.advance(10)
            done = presence.refreshes
            await eventually(lambda done=done: presence.refreshes > done)
        assert [e.name for e in await other.presence.roster("s1")] == ["Ada"]
        assert [e.participant_id for e in presence.entries()] == ["p2"]
    # Closing withdraws this Node's entries at once rather than by TTL.
    assert await other.presence.roster("s1") == []


async def test_presence_refresh_rewrites_everything(store: Store) -> None:
    presence = Presence(store.presence, node_id="node-a", ttl_s=30, interval_s=10)
    await presence.join("s1", "p1", Role.TRAINEE, "Tom")
    await presence.join("s2", "p2", Role.TRAINEE, "Ann")
    await store.presence.withdraw("s1", "p1", "node-a")
    await store.presence.withdraw("s2", "p2", "node-a")
    assert await presence.refresh() is True
    assert [e.participant_id for e in await store.presence.roster("s1")] == ["p1"]
    assert [e.participant_id for e in await store.presence.roster("s2")] == ["p2"]
    await presence.close()


# -- invites -------------------------------------------------------------------


async def test_invite_revocation(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    now = time.time()
    assert not await store.invites.is_revoked("jti-1", session_id="s1", issued_at=now)
    await store.invites.revoke_invite("jti-1", expires_at=now + 60)
    assert await other.invites.is_revoked("jti-1", session_id="s1", issued_at=now)
    assert not await other.invites.is_revoked("jti-2", session_id="s1", issued_at=now)
    # A token that has expired already is refused anyway: nothing to keep.
    await store.invites.revoke_invite("jti-old", expires_at=now - 1)
    assert not await store.invites.is_revoked("jti-old", session_id="s1", issued_at=now)


async def test_revoking_an_ancestor_revokes_the_lineage(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    now = nodes.clock()
    device = ("dev-1", "invite-1")  # a device token, then the invite it came from
    derived = ("links-1", "dev-1", "invite-1")
    assert not await store.invites.is_revoked(derived, session_id="s1", issued_at=now)
    await store.invites.revoke_invite("dev-1", expires_at=now + 60)
    # The device and what was derived from it, on every Node; not the invite.
    assert await other.invites.is_revoked(device, session_id="s1", issued_at=now)
    assert await other.invites.is_revoked(derived, session_id="s1", issued_at=now)
    assert not await other.invites.is_revoked(("invite-1",), session_id="s1", issued_at=now)
    assert not await other.invites.is_revoked(("dev-2", "invite-1"), session_id="s1",
                                              issued_at=now)
    await store.invites.revoke_invite("invite-1", expires_at=now + 60)
    assert await other.invites.is_revoked(("dev-2", "invite-1"), session_id="s1",
                                          issued_at=now)


async def test_which_revoked_answers_many_grants_at_once(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    now = nodes.clock()
    assert await store.invites.which_revoked([]) == []
    await store.invites.revoke_invite("gone", expires_at=now + 60)
    await store.invites.revoke_session("s2", before=now)
    checks = [RevocationCheck(("a", "gone"), "s1", now),     # an ancestor revoked
              RevocationCheck(("b", "kept"), "s1", now),     # nothing revoked
              RevocationCheck(("c",), "s2", now - 1),        # its Session's tokens before now
              RevocationCheck(("d",), "s2", now + 1),        # issued after that
              RevocationCheck(("gone",), "*", now)]          # a node-wide token by id
    assert await other.invites.which_revoked(checks) == [True, False, True, False, True]
    for check, expected in zip(checks, [True, False, True, False, True], strict=True):
        assert await store.invites.is_revoked(check.token_ids, session_id=check.session_id,
                                              issued_at=check.issued_at) == expected


async def test_invite_revocation_is_forgotten_when_the_token_expires(
        nodes: Nodes, store: Store) -> None:
    now = nodes.clock()
    await store.invites.revoke_invite("jti-1", expires_at=now + 30)
    # Revoking again with an earlier expiry does not shorten it.
    await store.invites.revoke_invite("jti-1", expires_at=now + 10)
    nodes.clock.advance(20)
    assert await store.invites.is_revoked("jti-1", session_id="s1", issued_at=now)
    nodes.clock.advance(9.999)
    assert await store.invites.is_revoked("jti-1", session_id="s1", issued_at=now)
    nodes.clock.advance(0.002)
    assert not await store.invites.is_revoked("jti-1", session_id="s1", issued_at=now)


async def test_session_revoked_before(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    assert await store.invites.revoked_before("s1") is None
    await store.invites.revoke_session("s1", before=1000.5)
    assert await other.invites.revoked_before("s1") == 1000.5
    assert await other.invites.is_revoked("j", session_id="s1", issued_at=1000.0)
    assert not await other.invites.is_revoked("j", session_id="s1", issued_at=1000.5)
    assert not await other.invites.is_revoked("j", session_id="s1", issued_at=1001.0)
    assert not await other.invites.is_revoked("j", session_id="s2", issued_at=1.0)
    # Only ever forward: a delayed, older revocation cannot un-revoke.
    await other.invites.revoke_session("s1", before=999.0)
    assert await store.invites.revoked_before("s1") == 1000.5
    await other.invites.revoke_session("s1", before=2000.25)
    assert await store.invites.revoked_before("s1") == 2000.25
    assert await store.invites.is_revoked("j", session_id="s1", issued_at=1500.0)


async def test_single_use_invite_under_concurrency(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    expires = time.time() + 60
    results = await asyncio.gather(*(
        (store if i % 2 else other).invites.use_invite("inv-1", max_uses=1, expires_at=expires)
        for i in range(20)))
    assert results.count(True) == 1
    assert await store.invites.invite_uses("inv-1") == 1


async def test_invite_max_uses_and_redeemers(store: Store) -> None:
    expires = time.time() + 60
    results = await asyncio.gather(*(
        store.invites.use_invite("inv-3", max_uses=3, expires_at=expires) for _ in range(20)))
    assert results.count(True) == 3
    assert await store.invites.invite_uses("inv-3") == 3
    assert await store.invites.invite_uses("unused") == 0

    # The same redeemer (a page reload) is let in again without using it up.
    assert await store.invites.use_invite("inv-r", max_uses=2, expires_at=expires,
                                          redeemer="device-a")
    assert await store.invites.use_invite("inv-r", max_uses=2, expires_at=expires,
                                          redeemer="device-a")
    assert await store.invites.invite_uses("inv-r") == 1
    assert await store.invites.use_invite("inv-r", max_uses=2, expires_at=expires,
                                          redeemer="device-b")
    assert not await store.invites.use_invite("inv-r", max_uses=2, expires_at=expires,
                                              redeemer="device-c")
    assert not await store.invites.use_invite("inv-r", max_uses=2, expires_at=expires)
    assert await store.invites.use_invite("inv-r", max_uses=2, expires_at=expires,
                                          redeemer="device-b")
    with pytest.raises(ValueError):
        await store.invites.use_invite("inv-x", max_uses=0, expires_at=expires)


async def test_single_use_with_redeemers_under_concurrency(store: Store) -> None:
    expires = time.time() + 60
    results = await asyncio.gather(*(
        store.invites.use_invite("inv-1", max_uses=1, expires_at=expires, redeemer=f"d{i}")
        for i in range(20)))
    assert results.count(True) == 1


async def test_invite_records_are_listed_per_session_until_they_expire(
        nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    now = nodes.clock()

    def record(invite_id: str, session: str = "s1", *, at: float = now,
               lasts: float = 60.0) -> InviteRecord:
        return InviteRecord(id=invite_id, session_id=session, role=Role.TRAINEE,
                            name="Ana <b>", participant_id=f"p-{invite_id}", issued_at=at,
                            expires_at=now + lasts, max_uses=3, created_by="Admin")

    assert await store.invites.list_invites("s1") == []
    await store.invites.put_invite(record("i2", at=now + 1))
    await store.invites.put_invite(record("i1"))
    await store.invites.put_invite(record("i3", "s2"))
    await store.invites.put_invite(record("short", lasts=30))
    await store.invites.put_invite(record("past", lasts=-1))  # stores nothing
    listed = await other.invites.list_invites("s1")
    assert [r.id for r in listed] == ["i1", "short", "i2"]  # oldest first, then by id
    assert listed[0] == record("i1")  # every field round-trips
    assert await other.invites.get_invite("s1", "i1") == record("i1")
    assert await other.invites.get_invite("s2", "i1") is None
    assert await other.invites.get_invite("s1", "past") is None
    revoked = dataclasses.replace(record("i1"), revoked_at=now + 2)
    await other.invites.put_invite(revoked)
    assert await store.invites.get_invite("s1", "i1") == revoked
    nodes.clock.advance(30)
    assert [r.id for r in await store.invites.list_invites("s1")] == ["i1", "i2"]
    assert await store.invites.get_invite("s1", "short") is None
    assert [r.id for r in await store.invites.list_invites("s2")] == ["i3"]


# -- rate limiting -------------------------------------------------------------


async def test_rate_limit_boundaries(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    window = 60.0
    assert [await store.rates.hit("ip:1", 3, window) for _ in range(3)] == [True] * 3
    # The limit is shared by every Node.
    assert await other.rates.hit("ip:1", 3, window) is False
    assert await store.rates.hit("ip:1", 3, window) is False
    assert await store.rates.hit("ip:2", 3, window) is True  # keys are independent
    nodes.clock.advance(59.999)
    assert await store.rates.hit("ip:1", 3, window) is False
    nodes.clock.advance(0.001)  # a hit counts for [t, t + window)
    assert [await other.rates.hit("ip:1", 3, window) for _ in range(4)] == [True] * 3 + [False]


async def test_rate_limit_window_slides(nodes: Nodes, store: Store) -> None:
    window = 60.0
    assert await store.rates.hit("k", 2, window)
    nodes.clock.advance(35)
    assert await store.rates.hit("k", 2, window)
    assert not await store.rates.hit("k", 2, window)
    # The first hit leaves the window; the second still counts: one slot.
    nodes.clock.advance(25)
    assert await store.rates.hit("k", 2, window)
    assert not await store.rates.hit("k", 2, window)


async def test_rate_limit_refused_hits_do_not_count(nodes: Nodes, store: Store) -> None:
    window = 60.0
    assert await store.rates.hit("k", 1, window)
    for _ in range(5):
        assert not await store.rates.hit("k", 1, window)
        nodes.clock.advance(10)
    nodes.clock.advance(10)  # 60 s after the only allowed hit
    assert await store.rates.hit("k", 1, window)


async def test_rate_limit_under_concurrency(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    results = await asyncio.gather(*((store if i % 2 else other).rates.hit("k", 5, 10.0)
                                     for i in range(20)))
    assert results.count(True) == 5


async def test_rate_limit_arguments(store: Store) -> None:
    assert await store.rates.hit("k", 0, 1.0) is False
    for limit, window in ((-1, 1.0), (1, 0.0), (1, -1.0), (1, float("inf"))):
        with pytest.raises(ValueError):
            await store.rates.hit("k", limit, window)


# -- events --------------------------------------------------------------------


async def test_events_reach_every_node(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    async with await other.events.subscribe("s1") as remote, \
            await store.events.subscribe("s1") as local, \
            await store.events.subscribe("s2") as elsewhere:
        events = [{"type": "participant_joined", "participant": {"id": f"p{i}", "n": i}}
                  for i in range(5)]
        for event in events:
            await store.events.publish("s1", event)
        await other.events.publish("s2", {"type": "chat", "text": "héllo ✓"})
        assert [await remote.get(2) for _ in events] == events  # in publish order
        assert [await local.get(2) for _ in events] == events
        assert await elsewhere.get(2) == {"type": "chat", "text": "héllo ✓"}
        with pytest.raises(TimeoutError):
            await elsewhere.get(0.2)


async def test_events_after_unsubscribe(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    first = await other.events.subscribe("s1")
    second = await other.events.subscribe("s1")
    await store.events.publish("s1", {"n": 1})
    assert await first.get(2) == {"n": 1} and await second.get(2) == {"n": 1}
    await first.close()
    assert first.closed
    await store.events.publish("s1", {"n": 2})
    assert await second.get(2) == {"n": 2}  # the Node still listens for the other
    with pytest.raises(StopAsyncIteration):
        await first.get(0.2)
    await second.close()
    await store.events.publish("s1", {"n": 3})  # nobody listening: fine
    # Subscribing again after the last one left works (Redis: a fresh SUBSCRIBE).
    async with await other.events.subscribe("s1") as third:
        await store.events.publish("s1", {"n": 4})
        assert await third.get(2) == {"n": 4}


async def test_subscribe_resubscribe_churn(nodes: Nodes, store: Store) -> None:
    # Subscriptions opened and closed concurrently must each get what is
    # published after they were opened.
    other = nodes.open("node-b")

    async def one(i: int) -> None:
        async with await other.events.subscribe("s1") as sub:
            marker = {"i": i}
            await store.events.publish("s1", marker)
            while (await sub.get(3)) != marker:
                pass

    for _ in range(3):
        await asyncio.gather(*(one(i) for i in range(10)))


async def test_events_must_be_json(store: Store) -> None:
    with pytest.raises(TypeError):
        await store.events.publish("s1", {"when": object()})
    with pytest.raises(ValueError):
        await store.events.publish("s1", {"x": float("nan")})


async def test_slow_subscriber_is_cut_off_not_buffered_forever(nodes: Nodes) -> None:
    store = nodes.open("node-a")
    # A small buffer to make the point; the default is 1024.
    backend = store.backend
    if nodes.kind == "memory":
        backend._buffer = 3  # type: ignore[attr-defined]
    else:
        backend._bus._buffer = 3  # type: ignore[attr-defined]
    sub = await store.events.subscribe("s1")
    for i in range(5):
        await store.events.publish("s1", {"n": i})
    received = []
    with pytest.raises(StopAsyncIteration):
        while True:
            received.append(await sub.get(2))
    assert received == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert sub.overflowed
    await sub.close()


# -- leases --------------------------------------------------------------------


async def test_one_node_holds_a_lease_however_many_race_for_it(nodes: Nodes,
                                                                store: Store) -> None:
    others = [nodes.open(f"node-{i}") for i in range(5)]
    results = await asyncio.gather(
        *(s.leases.acquire_lease("s1", ttl_s=10) for s in [store, *others] * 2))
    holders = {(lease.node_id, lease.fence) for lease in results}
    assert len({node for node, _ in holders}) == 1
    held = await store.leases.get_lease("s1")
    assert held is not None and (held.node_id, held.fence) in holders
    assert 9 < held.ttl_s <= 10
    # Whoever holds it, the others are told so and change nothing.
    again = await others[0].leases.acquire_lease("s1", ttl_s=10)
    if again.node_id != "node-0":
        assert (again.node_id, again.fence) == (held.node_id, held.fence)
    assert await store.leases.get_lease("other") is None


async def test_a_lease_expires_unless_renewed_and_fences_only_grow(nodes: Nodes,
                                                                   store: Store) -> None:
    other = nodes.open("node-b")
    mine = await store.leases.acquire_lease("s1", ttl_s=0.6)
    assert mine.node_id == "node-a" and mine.fence > 0
    for _ in range(3):
        await elapse(nodes, 0.3)
        assert await store.leases.renew_leases({"s1": mine.fence}, ttl_s=0.6) == set()
        refused = await other.leases.acquire_lease("s1", ttl_s=0.6)
        assert (refused.node_id, refused.fence) == ("node-a", mine.fence)
    await elapse(nodes, 0.8)  # no renewal: it expires
    assert await store.leases.get_lease("s1") is None
    theirs = await other.leases.acquire_lease("s1", ttl_s=5)
    assert theirs.node_id == "node-b" and theirs.fence > mine.fence
    # The old holder learns it lost the lease; it cannot release theirs.
    assert await store.leases.renew_leases({"s1": mine.fence}, ttl_s=5) == {"s1"}
    assert not await store.leases.release_lease("s1", mine.fence)
    held = await store.leases.get_lease("s1")
    assert held is not None and held.node_id == "node-b"
    # Released, the next holder's fence is larger still.
    assert await other.leases.release_lease("s1", theirs.fence)
    assert await store.leases.get_lease("s1") is None
    assert (await store.leases.acquire_lease("s1", ttl_s=5)).fence > theirs.fence


async def test_an_expired_lease_nobody_took_is_renewed_by_its_holder(nodes: Nodes,
                                                                     store: Store) -> None:
    other = nodes.open("node-b")
    mine = await store.leases.acquire_lease("s1", ttl_s=0.3)
    theirs = await other.leases.acquire_lease("s2", ttl_s=0.3)
    await elapse(nodes, 0.5)
    # One round trip for every lease of a Node; s2 was never this Node's.
    assert await store.leases.renew_leases({"s1": mine.fence, "s2": theirs.fence - 1},
                                           ttl_s=5) == {"s2"}
    held = await store.leases.get_lease("s1")
    assert held is not None and (held.node_id, held.fence) == ("node-a", mine.fence)
    assert await store.leases.get_lease("s2") is None


async def test_a_node_restarted_under_its_own_id_takes_its_lease_back(nodes: Nodes,
                                                                       store: Store) -> None:
    other = nodes.open("node-b")
    first = await store.leases.acquire_lease("s1", ttl_s=10)
    restarted = nodes.open("node-a")
    again = await restarted.leases.acquire_lease("s1", ttl_s=10)
    assert again.node_id == "node-a" and again.fence > first.fence
    # The earlier run is fenced off; another Node still cannot take it.
    assert await store.leases.renew_leases({"s1": first.fence}, ttl_s=10) == {"s1"}
    assert (await other.leases.acquire_lease("s1", ttl_s=10)).fence == again.fence
    assert await restarted.leases.renew_leases({"s1": again.fence}, ttl_s=10) == set()


async def test_a_deposed_holder_cannot_end_the_session(nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    await store.theatres.put_theatre(OR1)
    await store.sessions.create_session(SessionRecord(id="s1", theatre_id="or1", title="x",
                                                      state="live"))
    mine = await store.leases.acquire_lease("s1", ttl_s=0.3)
    await elapse(nodes, 0.5)
    theirs = await other.leases.acquire_lease("s1", ttl_s=10)
    with pytest.raises(Conflict) as refused:
        await store.sessions.set_session_state("s1", "ended", fence=mine.fence)
    assert refused.value.code == "lease_lost"
    assert (await store.sessions.get_session("s1")).state == "live"  # type: ignore[union-attr]
    ended = await other.sessions.set_session_state("s1", "ended", fence=theirs.fence)
    assert ended.state == "ended"


@pytest.mark.parametrize("nodes", ["redis"], indirect=True)
async def test_fences_keep_growing_after_redis_lost_its_keys(nodes: Nodes,
                                                             store: Store) -> None:
    raw = nodes.raw
    assert raw is not None
    other = nodes.open("node-b")
    first = await store.leases.acquire_lease("s1", ttl_s=10)
    # The lease, its counter, everything: as after a restart without persistence.
    await raw.delete(*[k async for k in raw.scan_iter(match=nodes.prefix + "*")])
    # Its holder, renewing, gets it back as it was: nobody took it meanwhile.
    assert await store.leases.renew_leases({"s1": first.fence}, ttl_s=0.3) == set()
    await elapse(nodes, 0.5)
    await raw.delete(*[k async for k in raw.scan_iter(match=nodes.prefix + "*")])
    theirs = await other.leases.acquire_lease("s1", ttl_s=10)
    assert theirs.node_id == "node-b" and theirs.fence > first.fence
    assert await store.leases.renew_leases({"s1": first.fence}, ttl_s=10) == {"s1"}


# -- the Node registry -------------------------------------------------------------


def node_record(node: str, instance: str = "i1", **load: float) -> NodeRecord:
    return NodeRecord(node_id=node, instance=instance, url=f"http://{node}.example:8080",
                      media_addresses=("10.0.0.1",), udp_ports="40000-40099",
                      load=load or {"sessions": 1.0}, started_at=1000.0, heartbeat_at=1001.5)


async def test_nodes_heartbeat_into_the_registry_and_leave_it(nodes: Nodes,
                                                              store: Store) -> None:
    other = nodes.open("node-b")
    a = node_record("node-a", sessions=2, cpu=0.25)
    assert await store.nodes.heartbeat(a, ttl_s=0.6) is None
    assert await other.nodes.heartbeat(node_record("node-b"), ttl_s=30) is None
    assert [n.node_id for n in await other.nodes.list_nodes()] == ["node-a", "node-b"]
    assert await other.nodes.get_node("node-a") == a
    assert a.describe()["media"] == {"addresses": ["10.0.0.1"], "udp_ports": "40000-40099"}
    for _ in range(3):  # heartbeats keep it
        await elapse(nodes, 0.3)
        assert await store.nodes.heartbeat(a, ttl_s=0.6) is None
    assert await other.nodes.get_node("node-a") is not None
    await elapse(nodes, 0.8)  # a Node that stops beating is gone
    assert [n.node_id for n in await other.nodes.list_nodes()] == ["node-b"]
    assert await other.nodes.get_node("node-a") is None
    await other.nodes.remove_node("node-b", "i1")
    assert await store.nodes.list_nodes() == []


async def test_two_processes_never_share_a_node_id(nodes: Nodes, store: Store) -> None:
    running = node_record("node-a", "first")
    assert await store.nodes.heartbeat(running, ttl_s=30) is None
    second = nodes.open("node-a")
    assert await second.nodes.heartbeat(node_record("node-a", "second"), ttl_s=30) == running
    await second.nodes.remove_node("node-a", "second")  # not its record: nothing happens
    assert await store.nodes.get_node("node-a") == running
    await store.nodes.remove_node("node-a", "first")
    assert await second.nodes.heartbeat(node_record("node-a", "second"), ttl_s=30) is None
    found = await store.nodes.get_node("node-a")
    assert found is not None and found.instance == "second"


# -- the shared audit trail --------------------------------------------------------


async def test_a_sessions_audit_trail_reads_as_one_from_every_node(nodes: Nodes,
                                                                   store: Store) -> None:
    other = nodes.open("node-b")
    join = {"ts": 1.0, "node": "node-a", "event": "join", "session": "s1", "participant": "p1"}
    await store.audit.append_audit([join, {**join, "ts": 3.0, "event": "leave"}], keep_s=60)
    await other.audit.append_audit([
        {"ts": 2.0, "node": "node-b", "event": "join", "session": "s1", "participant": "p2"},
        {"ts": 2.5, "node": "node-b", "event": "node_started"},  # no Session: not shared
        {"ts": 2.0, "node": "node-b", "event": "join", "session": "s2"},
        join,  # the same entry twice is two entries
    ], keep_s=60)
    for reader in (store, other):
        trail = await reader.audit.read_audit("s1")
        assert [(e["ts"], e["node"], e["event"]) for e in trail] == [
            (1.0, "node-a", "join"), (1.0, "node-a", "join"), (2.0, "node-b", "join"),
            (3.0, "node-a", "leave")]
        assert trail[0] == join
    assert [e["ts"] for e in await other.audit.read_audit("s1", since=2.0)] == [2.0, 3.0]
    assert [e["ts"] for e in await other.audit.read_audit("s1", limit=2)] == [2.0, 3.0]
    assert await store.audit.read_audit("s1", limit=0) == []
    assert [e["session"] for e in await store.audit.read_audit("s2")] == ["s2"]
    assert await store.audit.read_audit("nope") == []


async def test_a_sessions_audit_trail_is_kept_for_its_time(nodes: Nodes, store: Store) -> None:
    await store.audit.append_audit([{"ts": 1.0, "event": "join", "session": "s1"}],
                                   keep_s=0.3)
    assert len(await store.audit.read_audit("s1")) == 1
    await elapse(nodes, 0.5)
    assert await store.audit.read_audit("s1") == []


async def test_rescheduling_keeps_the_length_unless_a_new_end_is_given(store: Store) -> None:
    await store.theatres.put_theatre(OR1)
    await store.sessions.create_session(SessionRecord(
        id="s1", theatre_id="or1", title="T", starts_at=1_900_000_000.0,
        ends_at=1_900_003_600.0))
    moved = await store.sessions.update_session("s1", starts_at=1_900_086_400.0)
    assert (moved.starts_at, moved.ends_at) == (1_900_086_400.0, 1_900_090_000.0)
    longer = await store.sessions.update_session("s1", ends_at=1_900_097_200.0)
    assert longer.ends_at == 1_900_097_200.0 and longer.starts_at == 1_900_086_400.0
    with pytest.raises(BadRequest):
        await store.sessions.update_session("s1", ends_at=1_900_000_000.0)
    assert await store.sessions.get_session("s1") == longer


async def test_attendance_is_shared_replaced_per_participant_and_kept_for_its_time(
        nodes: Nodes, store: Store) -> None:
    first = AttendanceRecord(session_id="s1", participant_id="p1", role=Role.TRAINEE,
                             name="Zoë Ngô", intervals=((10.0, 70.0), (80.0, None)),
                             main_camera_s=55.5, steps=("Trocars", "Dissection"),
                             questions=("Why the clip?",))
    second = AttendanceRecord(session_id="s1", participant_id="p0", role=Role.EXPERT,
                              name="Dr Grey", intervals=((20.0, None),))
    await store.training.put_attendance([first, second], keep_s=0.5)
    other = nodes.open("node-b")
    assert await other.training.list_attendance("s1") == [first, second]
    assert await other.training.list_attendance("s2") == []
    replaced = dataclasses.replace(first, intervals=((10.0, 70.0), (80.0, 95.0)),
                                   main_camera_s=60.0)
    await other.training.put_attendance([replaced], keep_s=0.5)
    assert await store.training.list_attendance("s1") == [replaced, second]
    await elapse(nodes, 0.7)
    assert await store.training.list_attendance("s1") == []
    await store.training.put_attendance([first], keep_s=None)
    await elapse(nodes, 0.7)
    assert await store.training.list_attendance("s1") == [first]
    assert await other.training.delete_attendance("s1") is True
    assert await store.training.list_attendance("s1") == []
    assert await store.training.delete_attendance("s1") is False


async def test_certificates_are_kept_found_by_id_and_listed_per_session(
        nodes: Nodes, store: Store) -> None:
    cert = CertificateRecord(id="a" * 40, session_id="s1", participant_id="p1",
                             name="Zoë Ngô", title="Lap chole", procedure="cholecystectomy",
                             expert="Dr Grey", date="2026-05-01", minutes=95,
                             issued_at=1_900_000_000.0, issued_by="Ada")
    other_cert = dataclasses.replace(cert, id="b" * 40, name="Alex", participant_id="p2")
    elsewhere = dataclasses.replace(cert, id="c" * 40, session_id="s2")
    for record in (cert, other_cert, elsewhere):
        await store.training.put_certificate(record)
    other = nodes.open("node-b")
    assert await other.training.get_certificate("a" * 40) == cert
    assert await other.training.get_certificate("d" * 40) is None
    assert await other.training.list_certificates("s1") == [other_cert, cert]
    revoked = dataclasses.replace(cert, revoked_at=1_900_000_100.0)
    await other.training.put_certificate(revoked)
    assert await store.training.get_certificate("a" * 40) == revoked
    assert await store.training.list_certificates("s1") == [other_cert, revoked]


def live_recording(session_id: str, recording_id: str, node_id: str) -> LiveRecording:
    return LiveRecording(
        session_id=session_id, recording_id=recording_id,
        consent={"recorded_by": "Dr Grey", "recorded_at": "2026-12-04T10:00:00+00:00",
                 "scope": "internal_review", "started_by": {"id": "e1", "role": "expert"}},
        clock_zero_unix=1_700_000_000.25, started_t=12.5, node_id=node_id, since=1.0)


async def test_a_live_recording_is_seen_by_every_node_until_it_is_cleared(
        nodes: Nodes, store: Store) -> None:
    other = nodes.open("node-b")
    assert await other.recordings.get_live_recording("s1") is None
    assert await other.recordings.list_live_recordings() == []
    first = live_recording("s1", "r" * 24, "node-a")
    await store.recordings.put_live_recording(first)
    await store.recordings.put_live_recording(live_recording("s2", "q" * 24, "node-a"))
    seen = await other.recordings.get_live_recording("s1")
    assert seen == first and seen is not first
    assert seen.consent["started_by"] == {"id": "e1", "role": "expert"}
    assert [r.session_id for r in await other.recordings.list_live_recordings()] == ["s1", "s2"]
    # The Node that takes the Session over writes itself in as the recorder.
    moved = dataclasses.replace(first, node_id="node-b", since=2.0)
    await other.recordings.put_live_recording(moved)
    assert await store.recordings.get_live_recording("s1") == moved
    # Cleared only by naming the Recording it holds.
    assert not await store.recordings.clear_live_recording("s1", "x" * 24)
    assert await store.recordings.get_live_recording("s1") == moved
    assert not await store.recordings.clear_live_recording("nope", "r" * 24)
    assert await store.recordings.clear_live_recording("s1", "r" * 24)
    assert await other.recordings.get_live_recording("s1") is None
    assert not await other.recordings.clear_live_recording("s1", "r" * 24)
    assert [r.session_id for r in await store.recordings.list_live_recordings()] == ["s2"]


# -- Redis specifics -----------------------------------------------------------


@pytest.mark.parametrize("nodes", ["redis"], indirect=True)
async def test_redis_keys_and_channels_carry_the_prefix(nodes: Nodes, store: Store) -> None:
    raw = nodes.raw
    assert raw is not None
    now = nodes.clock()  # the store's clock: expiries are set against it
    await store.theatres.put_theatre(OR1)
    await store.sessions.create_session(SessionRecord(id="s1", theatre_id="or1", title="x"))
    await store.presence.announce([entry("s1", "p1")], ttl_s=30)
    await store.invites.revoke_invite("j1", expires_at=now + 30)
    await store.invites.revoke_session("s1", before=now)
    await store.invites.use_invite("i1", max_uses=1, expires_at=now + 30)
    await store.invites.put_invite(InviteRecord(
        id="i1", session_id="s1", role=Role.TRAINEE, name="", participant_id="p",
        issued_at=now, expires_at=now + 30))
    await store.rates.hit("ip:1", 1, 30)
    await store.recordings.put_live_recording(live_recording("s1", "r" * 24, "node-a"))
    async with await store.events.subscribe("s1"):
        channels = [str(c) for c in await raw.pubsub_channels()]
        assert channels and all(c.startswith(nodes.prefix) for c in channels)
    keys = [str(k) async for k in raw.scan_iter()]
    assert len(keys) >= 9
    assert all(k.startswith(nodes.prefix) for k in keys), keys
    # Everything that is not configuration expires by itself.
    for key in keys:
        if key.split(":", 1)[1].startswith(("theatres", "sessions", "revoked-before",
                                                 "recordings")):
            continue
        assert 0 < await raw.pttl(key) <= 30_000, key


async def test_redis_store_when_nothing_listens() -> None:
    from aiohttp.test_utils import unused_port

    store = open_store(f"redis://127.0.0.1:{unused_port()}/0", node_id="n", timeout_s=0.5)
    try:
        started = time.monotonic()
        assert not await store.healthy()
        with pytest.raises(StoreUnavailable):
            await store.sessions.list_sessions()
        with pytest.raises(StoreUnavailable):
            await store.events.subscribe("s1")
        with pytest.raises(StoreUnavailable):
            await store.rates.hit("k", 1, 1.0)
        assert time.monotonic() - started < 3
    finally:
        await store.close()
