"""Redis going away while Nodes use it, and coming back.

A real redis-server of its own (pytest-redis executor, free port), stopped and
started on the same port, or frozen with SIGSTOP to play a Redis that accepts
connections but never answers (a network partition). Callers must get
StoreUnavailable within about a second, never hang; the same store objects
must work again afterwards, with presence rebuilt and events flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor
from redis import Redis

from server.roles import Role
from server.store import (
    EventSubscription,
    NodeRecord,
    Presence,
    PresenceEntry,
    RevocationCheck,
    SessionRecord,
    Store,
    StoreUnavailable,
    open_store,
)
from server.theatre import Theatre

from .test_store_contract import FakeClock

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# Not the contract suite's Redis: this one gets stopped. port=None: any free
# port, never 6379 (documented, though missing from the type hint).
outage_redis_proc = factories.redis_proc(executable=REDIS_SERVER, port=None)  # type: ignore[arg-type]

#: Every store call is bounded by this; the assertions allow scheduling slack.
TIMEOUT_S = 1.0
LIMIT_S = TIMEOUT_S + 0.3

OR1 = Theatre("or1", "Theatre 1", ("room",))


@pytest.fixture
def redis_server(outage_redis_proc: RedisExecutor) -> Iterator[RedisExecutor]:
    assert outage_redis_proc.port != 6379
    # No snapshot on shutdown: a restarted Redis comes back empty, as after a
    # crash or a failover to a fresh instance, so what reappears was rebuilt.
    with Redis(host=outage_redis_proc.host, port=outage_redis_proc.port) as raw:
        raw.config_set("save", "")
        raw.flushall()
    yield outage_redis_proc
    # Whatever the test did, leave it running for the next one.
    if outage_redis_proc.process is not None:
        with_pid = outage_redis_proc.process.pid
        os.kill(with_pid, signal.SIGCONT)
    if not outage_redis_proc.running():
        outage_redis_proc.start()


@pytest.fixture
async def stores(redis_server: RedisExecutor) -> AsyncIterator[tuple[Store, Store]]:
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    prefix = f"outage-{uuid.uuid4().hex[:8]}:"
    a = open_store(url, node_id="node-a", prefix=prefix, timeout_s=TIMEOUT_S)
    b = open_store(url, node_id="node-b", prefix=prefix, timeout_s=TIMEOUT_S)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def roster_ids(store: Store, session_id: str = "s1") -> set[str]:
    try:
        return {e.participant_id for e in await store.presence.roster(session_id)}
    except StoreUnavailable:
        return set()


async def receives(publisher: Store, sub: EventSubscription) -> bool:
    """Publish a marker and see whether ``sub`` gets it (skipping older ones)."""
    marker = {"type": "probe", "id": uuid.uuid4().hex}
    try:
        await publisher.events.publish(sub.session_id, marker)
    except StoreUnavailable:
        return False
    try:
        while (await sub.get(0.3)) != marker:
            pass
    except TimeoutError:
        return False
    return True


def every_call(store: Store) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of each store method."""
    now = time.time()
    record = SessionRecord(id="s2", theatre_id="or1", title="x")
    entry = PresenceEntry(session_id="s1", participant_id="px", role=Role.TRAINEE, name="x",
                          node_id=store.node_id, connected_since=now)
    node = NodeRecord(node_id=store.node_id, instance="i", url="http://127.0.0.1:1")
    return {
        "put_theatre": lambda: store.theatres.put_theatre(OR1),
        "get_theatre": lambda: store.theatres.get_theatre("or1"),
        "list_theatres": lambda: store.theatres.list_theatres(),
        "delete_theatre": lambda: store.theatres.delete_theatre("or1"),
        "create_session": lambda: store.sessions.create_session(record),
        "get_session": lambda: store.sessions.get_session("s1"),
        "list_sessions": lambda: store.sessions.list_sessions(),
        "update_session": lambda: store.sessions.update_session("s1", title="y"),
        "set_session_state": lambda: store.sessions.set_session_state("s1", "ended"),
        "delete_session": lambda: store.sessions.delete_session("s1"),
        "announce": lambda: store.presence.announce([entry], ttl_s=5),
        "withdraw": lambda: store.presence.withdraw("s1", "px", store.node_id),
        "roster": lambda: store.presence.roster("s1"),
        "revoke_invite": lambda: store.invites.revoke_invite("j", expires_at=now + 60),
        "revoke_session": lambda: store.invites.revoke_session("s1", before=now),
        "revoked_before": lambda: store.invites.revoked_before("s1"),
        "is_revoked": lambda: store.invites.is_revoked("j", session_id="s1", issued_at=now),
        "which_revoked": lambda: store.invites.which_revoked(
            [RevocationCheck(("j", "i"), "s1", now)]),
        "use_invite": lambda: store.invites.use_invite("i", max_uses=1, expires_at=now + 60),
        "invite_uses": lambda: store.invites.invite_uses("i"),
        "hit": lambda: store.rates.hit("k", 5, 1.0),
        "acquire_lease": lambda: store.leases.acquire_lease("s1", ttl_s=5),
        "renew_leases": lambda: store.leases.renew_leases({"s1": 1}, ttl_s=5),
        "release_lease": lambda: store.leases.release_lease("s1", 1),
        "get_lease": lambda: store.leases.get_lease("s1"),
        "heartbeat": lambda: store.nodes.heartbeat(node, ttl_s=5),
        "remove_node": lambda: store.nodes.remove_node(store.node_id, "i"),
        "list_nodes": lambda: store.nodes.list_nodes(),
        "get_node": lambda: store.nodes.get_node(store.node_id),
        "append_audit": lambda: store.audit.append_audit(
            [{"ts": now, "session": "s1", "event": "join"}], keep_s=60),
        "read_audit": lambda: store.audit.read_audit("s1"),
        "publish": lambda: store.events.publish("s1", {"type": "x"}),
        "subscribe": lambda: store.events.subscribe("s-new"),
    }


async def assert_unavailable_quickly(store: Store, names: list[str] | None = None) -> None:
    calls = every_call(store)
    for name in names or list(calls):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await calls[name]()
        elapsed = time.monotonic() - started
        assert elapsed < LIMIT_S, f"{name} took {elapsed:.2f} s"
    started = time.monotonic()
    assert await store.healthy() is False
    assert time.monotonic() - started < LIMIT_S


async def test_redis_stopped_and_started_again(redis_server: RedisExecutor,
                                               stores: tuple[Store, Store]) -> None:
    a, b = stores
    presence = Presence(a.presence, node_id="node-a", ttl_s=2.0, interval_s=0.2)
    async with presence:
        await a.theatres.put_theatre(OR1)
        await a.sessions.create_session(SessionRecord(id="s1", theatre_id="or1", title="x"))
        await presence.join("s1", "p1", Role.EXPERT, "Ada")
        remote = await b.events.subscribe("s1")
        local = await a.events.subscribe("s1")
        assert await receives(a, remote) and await receives(b, local)
        assert await roster_ids(b) == {"p1"}

        await asyncio.to_thread(redis_server.stop)

        await assert_unavailable_quickly(a)
        await assert_unavailable_quickly(b, ["roster", "publish", "subscribe"])
        # Joining the live media does not depend on Redis: no error, no hang.
        started = time.monotonic()
        await presence.join("s1", "p2", Role.TRAINEE, "Tom")
        await presence.leave("s1", "p1")
        await presence.join("s1", "p1", Role.EXPERT, "Ada")
        assert time.monotonic() - started < 3 * LIMIT_S
        # A Node that starts while Redis is down starts all the same.
        late = open_store(f"redis://{redis_server.host}:{redis_server.port}/0",
                          node_id="node-c", prefix=a.backend.prefix,  # type: ignore[attr-defined]
                          timeout_s=TIMEOUT_S)
        await assert_unavailable_quickly(late, ["roster", "subscribe"])

        await asyncio.to_thread(redis_server.start)

        # The same store objects reconnect by themselves.
        await eventually(a.healthy)
        await eventually(b.healthy)
        # Redis came back empty; the refresh loop has put this Node's people back.
        await eventually(lambda: _equals(roster_ids(b), {"p1", "p2"}))
        assert await b.theatres.get_theatre("or1") is None  # proof it was emptied
        await a.theatres.put_theatre(OR1)
        assert await b.theatres.get_theatre("or1") == OR1
        assert await b.rates.hit("k", 1, 5.0) and not await a.rates.hit("k", 1, 5.0)
        # Subscriptions opened before the outage receive again, both ways.
        await eventually(lambda: receives(a, remote))
        await eventually(lambda: receives(b, local))
        async with await late.events.subscribe("s1") as fresh:
            assert await receives(b, fresh)
        assert await roster_ids(late) == {"p1", "p2"}
        await late.close()
        await remote.close()
        await local.close()
    # Closing the Presence withdrew this Node's entries.
    assert await roster_ids(b) == set()


async def test_redis_that_stops_answering(redis_server: RedisExecutor,
                                          stores: tuple[Store, Store]) -> None:
    """SIGSTOP: connections are accepted by the kernel but nothing answers,
    which is what a partition or a stuck Redis looks like. Timeouts, not
    refused connections, must bound every call."""
    a, b = stores
    presence = Presence(a.presence, node_id="node-a", ttl_s=3.0, interval_s=0.2)
    async with presence:
        await presence.join("s1", "p1", Role.EXPERT, "Ada")
        remote = await b.events.subscribe("s1")
        assert await receives(a, remote)
        assert redis_server.process is not None
        pid = redis_server.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await assert_unavailable_quickly(
                a, ["get_session", "set_session_state", "use_invite", "publish", "subscribe"])
            started = time.monotonic()
            await presence.join("s1", "p2", Role.TRAINEE, "Tom")
            assert time.monotonic() - started < 2 * LIMIT_S
        finally:
            os.kill(pid, signal.SIGCONT)
        await eventually(a.healthy)
        await eventually(lambda: _equals(roster_ids(b), {"p1", "p2"}))
        await eventually(lambda: receives(a, remote))
        await remote.close()


async def test_presence_of_a_dead_node_expires(redis_server: RedisExecutor) -> None:
    # Deadlines on a clock of the test's own: only the refresh loops run in real time.
    clock = FakeClock()
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    prefix = f"outage-{uuid.uuid4().hex[:8]}:"
    a = open_store(url, node_id="node-a", prefix=prefix, timeout_s=TIMEOUT_S, clock=clock)
    b = open_store(url, node_id="node-b", prefix=prefix, timeout_s=TIMEOUT_S, clock=clock)
    dying = Presence(a.presence, node_id="node-a", ttl_s=15, interval_s=0.05)
    alive = Presence(b.presence, node_id="node-b", ttl_s=15, interval_s=0.05)

    async def refreshed(presence: Presence) -> None:
        done = presence.refreshes
        await eventually(lambda: _true(presence.refreshes > done))

    try:
        async with alive:
            dying.start()
            await dying.join("s1", "ghost", Role.TRAINEE, "Ghost")
            await alive.join("s1", "p1", Role.TRAINEE, "Tom")
            assert await roster_ids(b) == {"ghost", "p1"}
            # The Node dies: its loop stops without withdrawing anything.
            assert dying._task is not None
            dying._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dying._task
            clock.advance(10)
            await refreshed(alive)
            assert await roster_ids(b) == {"ghost", "p1"}, "within its TTL"
            clock.advance(10)
            await refreshed(alive)
            assert await roster_ids(b) == {"p1"}, "past its TTL, never refreshed"
    finally:
        await a.close()
        await b.close()


async def _true(value: bool) -> bool:
    return value


async def _equals(value: Awaitable[set[str]], expected: set[str]) -> bool:
    return await value == expected
