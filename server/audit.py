"""Append-only audit trail of security-relevant events, as JSON lines on disk.

Hospitals ask who could see what: every join and leave (with Role and
address), publish start and stop, denied attempt and Session state change is
one line. Files rotate by size through the standard library's rotating
handler; nothing is ever rewritten in place.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from pathlib import Path
from typing import Any, Protocol


class AuditTrail(Protocol):
    def record(self, event: str, **fields: Any) -> None: ...

    def read(self, *, session: str | None = None, since: float = 0.0,
             limit: int = 1000) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class JsonlAuditTrail:
    def __init__(self, path: str | Path, *, node_id: str, max_bytes: int = 10 * 1024 * 1024,
                 backups: int = 20) -> None:
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
        self._logger.info(json.dumps(entry, default=str, ensure_ascii=False))
        self._handler.flush()

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
