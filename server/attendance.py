"""Attendance: who was in a Session, when, and what they actually received
(docs/protocol.md, "Attendance and certificates").

One ``Tracker`` per live Session, on the Node that holds it, fed by:

- presence: the Session's ``participant_joined`` / ``participant_left``
  events (every websocket, whichever Node it is on, joins the holding Node's
  Session), giving each Participant's join and leave intervals;
- the media plane: every ``attendance_sample_s`` the Tracker reads the
  ``frames_forwarded`` counter of every Subscription to the *main camera*
  (the video Feed of the Theatre's first camera slot); a Subscription whose
  counter moved since the last sample was receiving it for that interval.
  A page that is open but whose video does not arrive counts as present, not
  as receiving;
- the teaching state: each procedure step marked while a Participant is
  present (and the step under way when they join), and the questions they ask.

Only people count: Participants of ``Role.RELAY`` (a Node pulling Feeds for
an edge) are left out. Records go to the store (``Store.training``) as they
change and when the Session ends; a Node that takes the Session over starts
from them. They are kept as long as recordings are (``recording.
retention_days``), or ``[training] attendance_keep_days``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from aiohttp import web

from .config import Config
from .roles import PERSON_ROLES, Role
from .session import Session
from .store import AttendanceRecord, Store, StoreUnavailable

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


def keep_s(config: Config) -> float | None:
    """How long a Session's attendance is kept after its last write (None: for ever)."""
    days = config.training.attendance_keep_days or config.recording.retention_days
    return days * 86400 if days > 0 else None


def main_camera_slot(session: Session) -> str | None:
    return session.theatre.slots[0] if session.theatre.slots else None


def present_s(record: AttendanceRecord, start: float | None, end: float) -> float:
    """Seconds present within [start, end] (intervals may overlap: two tabs)."""
    spans = sorted((max(a, start) if start is not None else a, min(b if b is not None else end,
                                                                   end))
                   for a, b in record.intervals)
    total, reach = 0.0, float("-inf")
    for a, b in spans:
        a = max(a, reach)
        if b > a:
            total += b - a
            reach = b
    return total


@dataclasses.dataclass
class _Row:
    participant_id: str
    role: Role
    name: str
    intervals: list[list[float | None]] = dataclasses.field(default_factory=list)
    main_camera_s: float = 0.0
    steps: list[str] = dataclasses.field(default_factory=list)
    questions: list[str] = dataclasses.field(default_factory=list)
    question_ids: set[str] = dataclasses.field(default_factory=set)
    connections: int = 0

    @classmethod
    def restored(cls, record: AttendanceRecord) -> _Row:
        return cls(record.participant_id, record.role, record.name,
                   [[a, b] for a, b in record.intervals], record.main_camera_s,
                   list(record.steps), list(record.questions))

    def record(self, session_id: str) -> AttendanceRecord:
        return AttendanceRecord(
            session_id=session_id, participant_id=self.participant_id, role=self.role,
            name=self.name, intervals=tuple((float(a or 0.0), b) for a, b in self.intervals),
            main_camera_s=round(self.main_camera_s, 3), steps=tuple(self.steps),
            questions=tuple(self.questions))


class Tracker:
    """The attendance of one live Session (see the module docstring)."""

    def __init__(self, session: Session, *, clock: Clock) -> None:
        self.session = session
        self._clock = clock
        self._rows: dict[str, _Row] = {}
        self._last_frames: dict[str, int] = {}
        self._last_sample: float | None = None
        self.dirty = False

    # -- feeding ------------------------------------------------------------
    def restore(self, records: Iterable[AttendanceRecord]) -> None:
        """Start from what an earlier holder of the Session stored."""
        for record in records:
            if record.participant_id not in self._rows:
                row = _Row.restored(record)
                # Whoever was connected there is not connected here (yet).
                now = self._clock()
                for interval in row.intervals:
                    if interval[1] is None:
                        interval[1] = now
                self._rows[record.participant_id] = row

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("participant_joined", "participant_left"):
            who = event.get("participant")
            if isinstance(who, dict):
                self._presence(who, joined=kind == "participant_joined")
        elif kind == "interaction":
            message = event.get("message")
            if isinstance(message, dict):
                self._teaching(message)

    def _row(self, participant_id: str, role: Role, name: str) -> _Row | None:
        if role not in PERSON_ROLES:
            return None
        row = self._rows.get(participant_id)
        if row is None:
            row = self._rows[participant_id] = _Row(participant_id, role, name)
        elif name:
            row.name = name
        return row

    def _presence(self, who: dict[str, Any], *, joined: bool) -> None:
        try:
            role = Role(str(who.get("role")))
        except ValueError:
            return
        row = self._row(str(who.get("id")), role, str(who.get("name", "")))
        if row is None:
            return
        now = self._clock()
        if joined:
            row.connections += 1
            if row.connections == 1:
                row.intervals.append([now, None])
                step = self.session.interaction.current_step
                if step and (not row.steps or row.steps[-1] != step):
                    row.steps.append(step)
        else:
            row.connections = max(0, row.connections - 1)
            if row.connections == 0:
                self._close_open(row, now)
        self.dirty = True

    def _teaching(self, message: dict[str, Any]) -> None:
        if message.get("type") == "mark":
            mark = message.get("mark")
            if not isinstance(mark, dict) or mark.get("kind") != "step":
                return
            name = str(mark.get("name", ""))
            for row in self._rows.values():
                if row.connections > 0 and (not row.steps or row.steps[-1] != name):
                    row.steps.append(name)
            self.dirty = True
        elif message.get("type") == "question":
            question = message.get("question")
            if not isinstance(question, dict):
                return
            author = question.get("author")
            qid = str(question.get("id", ""))
            asker = self._rows.get(str(author.get("id"))) if isinstance(author, dict) else None
            if asker is not None and qid and qid not in asker.question_ids:
                asker.question_ids.add(qid)
                asker.questions.append(str(question.get("text", "")))
                self.dirty = True

    def sample(self) -> None:
        """Credit the time since the last sample to everyone whose main-camera
        Subscription forwarded frames meanwhile."""
        now = self._clock()
        elapsed = 0.0 if self._last_sample is None else max(0.0, now - self._last_sample)
        self._last_sample = now
        slot = main_camera_slot(self.session)
        seen: dict[str, int] = {}
        receiving: set[str] = set()
        for sub in list(self.session.subscriptions.values()):
            feed = self.session.feeds.get(sub.feed_id)
            if feed is None or feed.kind != "video" or feed.slot != slot:
                continue
            grant = sub.grant
            role = getattr(grant, "role", None)
            if role is not None and role not in PERSON_ROLES:
                continue
            seen[sub.id] = sub.frames_forwarded
            if sub.frames_forwarded > self._last_frames.get(sub.id, 0):
                receiving.add(sub.participant_id)
                if sub.participant_id not in self._rows and grant is not None:
                    # A WHEP player without a page: receiving, never "joined".
                    self._row(sub.participant_id, grant.role, grant.name or grant.role.value)
        self._last_frames = seen
        for participant_id in receiving:
            row = self._rows.get(participant_id)
            if row is not None and elapsed > 0:
                row.main_camera_s += elapsed
                self.dirty = True

    def finish(self) -> None:
        """The Session ended here: everyone still connected leaves now."""
        self.sample()
        now = self._clock()
        for row in self._rows.values():
            row.connections = 0
            self._close_open(row, now)
        self.dirty = True

    @staticmethod
    def _close_open(row: _Row, now: float) -> None:
        for interval in row.intervals:
            if interval[1] is None:
                interval[1] = now

    def records(self) -> list[AttendanceRecord]:
        return [row.record(self.session.id) for row in self._rows.values()]


# -- the Node's trackers ---------------------------------------------------------

TRACKERS: web.AppKey[dict[str, Tracker]] = web.AppKey("attendance_trackers")


def setup(app: web.Application, *, store: Callable[[], Store], clock: Clock) -> None:
    """A Tracker for every Session that goes live here; sampling and writing
    in one task (a cleanup_ctx)."""
    from .http.common import CONFIG, REGISTRY

    trackers: dict[str, Tracker] = {}
    app[TRACKERS] = trackers
    registry = app[REGISTRY]
    config: Config = app[CONFIG]
    previous = registry.on_session
    unlisten: dict[str, Callable[[], None]] = {}
    pending: set[asyncio.Task[None]] = set()

    async def write(records: list[AttendanceRecord]) -> bool:
        if not records:
            return True
        try:
            await store().training.put_attendance(records, keep_s=keep_s(config))
            return True
        except StoreUnavailable as exc:
            logger.warning("attendance not written yet: %s", exc.message)
            return False

    async def restore(tracker: Tracker) -> None:
        with contextlib.suppress(StoreUnavailable):
            tracker.restore(await store().training.list_attendance(tracker.session.id))

    def on_session(session: Session, state: str) -> None:
        if previous is not None:
            previous(session, state)
        if state == "live":
            tracker = trackers[session.id] = Tracker(session, clock=clock)
            unlisten[session.id] = session.listen(tracker.on_event)
            for participant in list(session.participants.values()):
                tracker.on_event({"type": "participant_joined",
                                  "participant": participant.describe()})
            _spawn(restore(tracker))
        elif state == "ended":
            ended = trackers.pop(session.id, None)
            stop = unlisten.pop(session.id, None)
            if stop is not None:
                stop()
            if ended is not None:
                ended.finish()
                _spawn(_final(ended))

    async def _final(tracker: Tracker) -> None:
        for _ in range(3):
            if await write(tracker.records()):
                return
            await asyncio.sleep(1)

    def _spawn(coro: Any) -> None:
        try:
            task = asyncio.ensure_future(coro)
        except RuntimeError:
            coro.close()
            return
        pending.add(task)
        task.add_done_callback(pending.discard)

    registry.on_session = on_session

    async def loop() -> None:
        while True:
            await asyncio.sleep(config.training.attendance_sample_s)
            for tracker in list(trackers.values()):
                try:
                    tracker.sample()
                    if tracker.dirty:
                        tracker.dirty = not await write(tracker.records())
                except Exception:
                    logger.exception("attendance of %s: sampling failed", tracker.session.id)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if pending:
            await asyncio.wait(set(pending), timeout=3)

    app.cleanup_ctx.append(ctx)


# -- reading ---------------------------------------------------------------------

CSV_FIELDS = ("participant", "role", "name", "joined", "left", "present_min",
              "main_camera_min", "share", "steps", "questions", "certificate")


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The attendance as CSV (one line per Participant; intervals as
    "joined–left" pairs separated by "; ")."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_FIELDS)
    for row in rows:
        intervals = row["intervals"]
        writer.writerow([
            row["participant"], row["role"], _cell(row["name"]),
            intervals[0][0] if intervals else "",
            intervals[-1][1] if intervals and intervals[-1][1] is not None else "",
            row["present_min"], row["main_camera_min"], row["share"],
            _cell(" | ".join(row["steps"])), _cell(" | ".join(row["questions"])),
            row.get("certificate") or ""])
    return out.getvalue()


def _cell(text: str) -> str:
    # A cell a spreadsheet would run as a formula ("=HYPERLINK(…)") is quoted as text.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
