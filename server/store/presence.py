"""This Node's presence: who is connected here, kept alive in the shared store.

The Node is the authority on its own connections, the store only a copy. So
``Presence`` keeps the entries locally and re-writes all of them every
``interval_s`` with a TTL of ``ttl_s``: a write lost to an outage, or a whole
Redis restarted empty, is repaired by the next pass; a Node that dies stops
refreshing and its entries expire. Joins and leaves never raise
StoreUnavailable: being connected to the live media must not depend on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from ..roles import Role
from .base import PresenceEntry, PresenceStore, StoreUnavailable

logger = logging.getLogger(__name__)


class Presence:
    def __init__(
        self,
        store: PresenceStore,
        *,
        node_id: str,
        ttl_s: float = 15.0,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < interval_s < ttl_s:
            raise ValueError("refresh interval must be shorter than the TTL")
        self._store = store
        self.node_id = node_id
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._clock = clock
        # (session id, participant id) -> (entry, open connections)
        self._entries: dict[tuple[str, str], tuple[PresenceEntry, int]] = {}
        # One write at a time, so a refresh in flight cannot re-create an
        # entry that a leave has just withdrawn.
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._in_sync = True
        #: Passes of the refresh loop that reached the store.
        self.refreshes = 0

    def entries(self) -> list[PresenceEntry]:
        return [entry for entry, _ in self._entries.values()]

    async def join(self, session_id: str, participant_id: str, role: Role,
                   name: str) -> PresenceEntry:
        """One more connection of this participant (a second tab counts once)."""
        key = (session_id, participant_id)
        current = self._entries.get(key)
        if current is not None:
            entry, count = current
            self._entries[key] = (entry, count + 1)
            return entry
        entry = PresenceEntry(session_id=session_id, participant_id=participant_id, role=role,
                              name=name, node_id=self.node_id,
                              connected_since=self._clock())
        self._entries[key] = (entry, 1)
        async with self._lock:
            if self._entries.get(key, (None, 0))[0] is entry:
                await self._write(lambda: self._store.announce([entry], ttl_s=self.ttl_s))
        return entry

    async def leave(self, session_id: str, participant_id: str) -> None:
        """One connection fewer; the entry goes with the last one."""
        key = (session_id, participant_id)
        current = self._entries.get(key)
        if current is None:
            return
        entry, count = current
        if count > 1:
            self._entries[key] = (entry, count - 1)
            return
        del self._entries[key]
        async with self._lock:
            if key not in self._entries:  # not re-joined while we waited
                await self._write(lambda: self._store.withdraw(session_id, participant_id,
                                                               self.node_id))

    async def refresh(self) -> bool:
        """Re-write every entry of this Node now; False if the store is down."""
        async with self._lock:
            entries = self.entries()
            if not entries:
                return True
            return await self._write(lambda: self._store.announce(entries, ttl_s=self.ttl_s))

    async def _write(self, call: Callable[[], Awaitable[None]]) -> bool:
        try:
            await call()
        except StoreUnavailable as exc:
            if self._in_sync:
                logger.warning("presence: not written (%s); the refresh loop will retry",
                               exc.message)
            self._in_sync = False
            return False
        return True

    async def run(self) -> None:
        """Refresh forever (until cancelled)."""
        while True:
            was_in_sync = self._in_sync
            if await self.refresh():
                self.refreshes += 1
                if not was_in_sync:
                    logger.info("presence: %d entries re-registered", len(self._entries))
                self._in_sync = True
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"presence-{self.node_id}")

    async def close(self) -> None:
        """Stop refreshing and withdraw this Node's entries (best effort: if the
        store is down they expire by TTL)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        keys = list(self._entries)
        self._entries.clear()
        async with self._lock:
            for session_id, participant_id in keys:
                try:
                    await self._store.withdraw(session_id, participant_id, self.node_id)
                except StoreUnavailable:
                    # Store down: one timeout, not one per entry; TTLs clean up.
                    break

    async def __aenter__(self) -> Presence:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
