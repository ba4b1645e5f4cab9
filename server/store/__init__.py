"""Shared, live state of the Nodes: Sessions, Theatres, presence, invites,
rate limits and Session events.

``open_store`` is the one place the backend is chosen: no Redis URL gives the
in-memory store (one Node), a URL gives the Redis store (several Nodes).
Callers see only the small Protocols in ``base``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import (
    AUDIT_MAX_ENTRIES,
    DEFAULT_PREFIX,
    SESSION_STATES,
    TRANSITIONS,
    AttendanceRecord,
    AuditStore,
    Backend,
    CertificateRecord,
    Event,
    EventBus,
    EventSubscription,
    InviteRecord,
    InviteStore,
    Lease,
    LeaseStore,
    LiveRecording,
    NodeRecord,
    NodeStore,
    PresenceEntry,
    PresenceStore,
    RateLimiter,
    RecordingStateStore,
    RevocationCheck,
    SessionRecord,
    SessionState,
    SessionStore,
    Store,
    StoreUnavailable,
    TheatreStore,
    TrainingStore,
)
from .memory import MemoryState, MemoryStore
from .presence import Presence

__all__ = [
    "AUDIT_MAX_ENTRIES",
    "DEFAULT_PREFIX",
    "SESSION_STATES",
    "TRANSITIONS",
    "AttendanceRecord",
    "AuditStore",
    "Backend",
    "CertificateRecord",
    "Event",
    "EventBus",
    "EventSubscription",
    "InviteRecord",
    "InviteStore",
    "Lease",
    "LeaseStore",
    "LiveRecording",
    "MemoryState",
    "NodeRecord",
    "NodeStore",
    "Presence",
    "PresenceEntry",
    "PresenceStore",
    "RateLimiter",
    "RecordingStateStore",
    "RevocationCheck",
    "SessionRecord",
    "SessionState",
    "SessionStore",
    "Store",
    "StoreUnavailable",
    "TheatreStore",
    "TrainingStore",
    "open_store",
]


def open_store(
    redis_url: str | None,
    *,
    node_id: str,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 1.0,
    memory: MemoryState | None = None,
    clock: Callable[[], float] | None = None,
) -> Store:
    """The Node's store. Nothing is contacted here: a Redis that is down at
    start-up makes calls raise StoreUnavailable (and ``healthy()`` False)
    until it comes up, but does not stop the Node from starting.

    ``redis_url`` None or "" selects memory (``memory`` lets several stores in
    one process share state, e.g. two Nodes in a test). ``prefix`` namespaces
    every Redis key and channel; ``timeout_s`` bounds every Redis call.
    ``clock`` (epoch seconds) is where every deadline is read, the wall clock by
    default; tests pass one they advance (a given ``memory`` keeps its own).
    Close the store (``await store.close()`` or ``async with``) at shutdown.
    ValueError for a malformed URL.
    """
    if not redis_url:
        if memory is None:
            memory = MemoryState() if clock is None else MemoryState(wall=clock, monotonic=clock)
        backend: MemoryStore | RedisStore = MemoryStore(node_id, memory)
    else:
        # Imported here so a memory-only Node never loads redis-py.
        from .redis_store import RedisStore

        backend = RedisStore(redis_url, node_id=node_id, prefix=prefix, timeout_s=timeout_s,
                             clock=clock or time.time)
    return Store(theatres=backend, sessions=backend, presence=backend, invites=backend,
                 rates=backend, events=backend, leases=backend, nodes=backend,
                 audit=backend, training=backend, recordings=backend, backend=backend)
