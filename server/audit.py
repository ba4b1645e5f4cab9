"""Append-only audit trail of security-relevant events, as JSON lines on disk.

Hospitals ask who could see what: every join and leave (with Role and
address), publish start and stop, denied attempt and Session state change is
one line. Files rotate by size through the standard library's rotating
handler; nothing is ever rewritten in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .store import AuditStore, StoreUnavailable

logger = logging.getLogger(__name__)


class AuditTrail(Protocol):
    def record(self, event: str, **fields: Any) -> None: ...

    def read(self, *, session: str | None = None, since: float = 0.0,
             limit: int = 1000) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class JsonlAuditTrail:
    def __init__(self, path: str | Path, *, node_id: str, max_bytes: int = 10 * 1024 * 1024,
                 backups: int = 20) -> None:
        #: Also given every entry (the shared trail of several Nodes).
        self.forward: Callable[[dict[str, Any]], None] | None = None
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._node_id = node_id
        # A private logger (not in the logging tree) so application log
        # configuration can never silence or reroute the audit trail.
        self._logger = logging.Logger(f"scrubin.audit.{id(self)}")
        self._logger.propagate = False
        self._handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger.addHandler(self._handler)
        os.chmod(self.path, 0o600)

    def record(self, event: str, **fields: Any) -> None:
        entry = {"ts": round(time.time(), 3), "node": self._node_id, "event": event, **fields}
        line = json.dumps(entry, default=str, ensure_ascii=False)
        self._logger.info(line)
        self._handler.flush()
        if self.forward is not None and entry.get("session"):
            self.forward(json.loads(line))  # what the file holds: JSON types only

    def read(self, *, session: str | None = None, since: float = 0.0,
             limit: int = 1000) -> list[dict[str, Any]]:
        """Newest last; across rotated files."""
        rotated = sorted(self.path.parent.glob(self.path.name + ".*"),
                         key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
                         reverse=True)
        files = [*rotated, self.path]
        out: list[dict[str, Any]] = []
        for file in files:
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("ts", 0) < since:
                    continue
                if session is not None and entry.get("session") != session:
                    continue
                out.append(entry)
        return out[-limit:]

    def close(self) -> None:
        self._logger.removeHandler(self._handler)
        self._handler.close()


class SharedAudit:
    """Copies every Session's audit entries into the shared store, so that a
    Session's trail reads as one through the API whichever Nodes served it.

    The file stays the Node's own record. Entries are sent in batches (every
    ``interval_s``); while the store is unreachable they wait, at most
    ``max_pending`` (the oldest go first, said once in the log).
    """

    def __init__(self, store: AuditStore, *, keep_s: float, interval_s: float = 0.5,
                 max_pending: int = 10_000) -> None:
        self._store = store
        self._keep_s = keep_s
        self._interval_s = interval_s
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_pending)
        self._dropping = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def add(self, entry: dict[str, Any]) -> None:
        if len(self._pending) == self._pending.maxlen and not self._dropping:
            self._dropping = True
            logger.warning("audit: the shared trail is behind; oldest entries dropped from it "
                           "(each Node's file keeps them)")
        self._pending.append(entry)

    async def flush(self) -> bool:
        """Send what is pending; False if the store did not take it."""
        async with self._lock:
            while self._pending:
                batch = list(self._pending)[:500]
                try:
                    await self._store.append_audit(batch, keep_s=self._keep_s)
                except StoreUnavailable:
                    return False
                for _ in batch:
                    self._pending.popleft()
                self._dropping = False
            return True

    async def read(self, session_id: str, *, since: float, limit: int) -> list[dict[str, Any]]:
        await self.flush()
        return await self._store.read_audit(session_id, since=since, limit=limit)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
