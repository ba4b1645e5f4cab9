"""Recording: one Session archived as the live path carries it.

Layout, under ``<root>/<recording id>/`` (the id is unguessable)::

    manifest.json     what the recording is: Session, consent, Feeds and their parts
    events.jsonl      one JSON object a line: {"t": seconds, "type": ..., ...}
    <feed>-NNN.webm   parts of a VP8 or Opus Feed      (recorder.writer)
    <feed>-NNN.mp4    parts of an H.264 Feed (fragmented MP4)

One clock, the *Session clock*: seconds since ``origin`` (a
``time.monotonic()`` value; by default the moment :meth:`Recording.start` runs;
pass the Session's own clock zero, ``origin`` and ``origin_unix``, to share the
clock of its interaction events). ``clock_zero_unix`` in the manifest is its
wall time. ``started_t`` is the Session time consent was given (``consent_t``;
by default when :meth:`Recording.start` runs): nothing of any Feed is kept from
before it, and every part starts at or after it. ``ended_t`` is when the
recording stopped; ``duration`` is ``ended_t - started_t``, what every page
shows as the recording's length. Part ``start`` offsets and event ``t`` are on
the Session clock, so a review page plays every Feed and event in sync, and
shows times since ``started_t``.

``manifest.json`` is replaced atomically (temporary file, fsync, rename)
whenever a part is about to be created (the file exists only once the
manifest lists it), closes, or its start moves: after a crash it lists every
finished part with its sha256, and the part that was being written
(``complete: false``), which plays up to its last flushed cluster;
``recorder.repair`` finishes such a recording when the Node starts again.

Moving between Nodes: a Recording whose Session moves to another Node (the
*origin* drained or died) goes on there as the same Recording. The Node that
lets go stops with ``hand_over=True``: every part is closed, the manifest
stays ``recording`` with no end. The Node that takes over constructs it with
``resume=True`` and the same id, root, clock zero and consent: :meth:`start`
waits for the lock (the previous writer closing), finishes a dead writer's
open part (recorder.repair), and continues with new part numbers in the same
directory and the same manifest. ``gaps`` in the manifest lists each span
with no media, ``{"start", "end", "reason": "origin_moved", "from_node",
"to_node"}`` on the Session clock: from the end of the last part written
before the move to the start of the first part after it (``end`` is null
until that part exists; if the recording stops first, its end). Each part
says which ``node`` wrote it.

Errors: a Feed's writer that fails reports a :class:`RecordingError` through
``on_error`` (on the event loop). ``disk_full`` and ``not_writable`` stop the
whole recording (state ``failed``, reported once); other codes stop only that
Feed. The live path never waits for the recorder and never sees its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import functools
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from server.media.plane import DropReason, EncodedFrame, Upstream

from .errors import FATAL_CODES, RecordingError, error_from_exception
from .writer import RECORDABLE, FeedWriter, PartInfo, WriterOptions

logger = logging.getLogger(__name__)

RecordingState = Literal["new", "recording", "stopping", "stopped", "failed"]

MANIFEST = "manifest.json"
EVENTS = "events.jsonl"
FORMAT = "scrubin-recording/1"
#: Events waiting for the disk beyond this are dropped (and logged).
MAX_PENDING_IO = 1000


@dataclass(frozen=True)
class SessionInfo:
    """What the manifest says about the Session being recorded."""

    session_id: str
    theatre: str
    title: str
    expert: str
    procedure: str = ""

    def describe(self) -> dict[str, str]:
        return asdict(self)


#: What the recorder needs of a Feed: the media seam's upstream side.
RecordableFeed = Upstream


class FeedSource(Protocol):
    """What :meth:`Recording.follow` needs of a Session."""

    @property
    def feeds(self) -> Mapping[str, Upstream]: ...

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]: ...


class _Tap:
    """The recorder's downstream on one Feed: frames go to the Feed's writer,
    whose own thread does the disk I/O (``push`` only enqueues)."""

    def __init__(self, feed_id: str, writer: FeedWriter,
                 on_dropped: Callable[[DropReason], None]) -> None:
        self._writer = writer
        self._on_dropped = on_dropped
        self._id = f"recorder:{feed_id}"

    @property
    def downstream_id(self) -> str:
        return self._id

    def deliver(self, frame: EncodedFrame) -> None:
        self._writer.push(frame)

    def dropped(self, reason: DropReason) -> None:
        self._on_dropped(reason)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


def write_atomic(path: Path, data: bytes, *, sync: bool = True, shared: bool = False) -> None:
    """Replace ``path`` with ``data``: a temporary file beside it, fsync, rename,
    fsync of the directory (``sync=False``: no fsync, for files rebuilt from
    others). A failure (a full disk) leaves ``path`` as it was and no temporary
    file behind. ``shared``: several processes replace this file (the index of
    a recordings root shared by Nodes), so the temporary name is this write's
    own; one name for all would let one writer rename another's half-written
    file, or find its own gone."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp" if shared
                         else f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if not sync:
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Attached:
    feed: RecordableFeed
    writer: FeedWriter
    unsubscribe: Callable[[], None] | None


class Recording:
    """Archives the Feeds attached to it; see the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        session: SessionInfo,
        consent: Mapping[str, Any],
        on_error: Callable[[RecordingError], None] | None = None,
        *,
        options: WriterOptions | None = None,
        recording_id: str | None = None,
        origin: float | None = None,
        origin_unix: float | None = None,
        consent_t: float | None = None,
        resume: bool = False,
        node: str | None = None,
        lock_wait_s: float = 15.0,
    ) -> None:
        if recording_id is None:
            recording_id = secrets.token_urlsafe(18)
        elif not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", recording_id):
            raise ValueError("a recording id is 16-64 URL-safe characters")
        try:
            json.dumps(dict(consent))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"consent record is not JSON: {exc}") from None
        self.id = recording_id
        self.directory = Path(root) / recording_id
        self.session = session
        self.consent = dict(consent)
        self.state: RecordingState = "new"
        self.errors: list[RecordingError] = []
        self.origin: float | None = origin  # time.monotonic() of Session clock 0
        self.clock_zero: float | None = origin_unix  # time.time() of Session clock 0
        self.started_t: float | None = consent_t  # Session clock: consent, the start
        self.started_at: float | None = None  # time.time() of started_t
        self.ended_t: float | None = None
        self.ended_at: float | None = None
        self.duration: float | None = None
        #: Did the last write of manifest.json succeed (False: a full disk)?
        self.manifest_saved = False
        self._on_error = on_error
        self._options = options or WriterOptions()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._attached: dict[str, _Attached] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        # Shared with writer threads and the I/O thread: guarded by _lock.
        self._lock = threading.Lock()
        self._feeds: dict[str, dict[str, Any]] = {}
        self._parts: dict[str, dict[int, dict[str, Any]]] = {}
        self._counters: dict[str, Iterator[int]] = {}
        self._manifest_pending = False
        self._prepared = False  # the directory exists: the manifest can be written
        self._pending_io = 0
        # Manifest and events are written by one thread, in order.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recording-io")
        self._events_fd: int | None = None
        self._stopped: asyncio.Future[None] | None = None
        #: Continue the Recording already in ``directory`` (see the module docstring).
        self.resume = resume
        self.node = node
        self._lock_wait_s = lock_wait_s
        #: Spans without media because the Session moved between Nodes.
        self.gaps: list[dict[str, Any]] = []
        #: The first part number this Node wrote, per Feed (resumed: the open gap ends
        #: where the first of them starts).
        self._first_index: dict[str, int] = {}
        #: Stopped to be continued on another Node: the manifest stays "recording".
        self.handed_over = False
        #: Finished parts of the writer before (resume: a dead Node's open part).
        self.repaired: list[dict[str, Any]] = []
        self._carried: dict[str, Any] = {}
        self._earlier_errors: list[dict[str, Any]] = []

    # -- clock --------------------------------------------------------------
    def session_time(self, monotonic: float | None = None) -> float:
        """Seconds on the Session clock (now, or at a ``time.monotonic()`` value)."""
        if self.origin is None:
            return 0.0
        return (time.monotonic() if monotonic is None else monotonic) - self.origin

    def _elapsed(self) -> float:
        if self.started_t is None:
            return 0.0
        end = self.ended_t if self.ended_t is not None else self.session_time()
        return max(0.0, end - self.started_t)

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        """Create the directory and the manifest. Failure is reported through
        ``on_error`` (state ``failed``), not raised."""
        if self.state != "new":
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        now_mono, now_unix = time.monotonic(), time.time()
        if self.origin is None:
            self.origin = now_mono
        if self.clock_zero is None:
            self.clock_zero = now_unix - (now_mono - self.origin)
        if self.resume:
            try:
                await self._loop.run_in_executor(self._io, self._prepare_resume)
            except Exception as exc:
                self._fatal(error_from_exception(exc, path=str(self.directory)))
                return
            self._prepared = True
            self.state = "recording"
            gap = self.gaps[-1]
            self.add_event({"type": "recording_resumed", "recording": self.id,
                            "session": self.session.session_id, "node": self.node,
                            "gap_start": gap["start"]})
            return
        consent_given = self.started_t is not None
        if self.started_t is None:
            self.started_t = round(now_mono - self.origin, 3)  # for now: see below
        self.started_at = self.clock_zero + self.started_t
        try:
            await self._loop.run_in_executor(self._io, self._prepare)
        except Exception as exc:
            self._fatal(error_from_exception(exc, path=str(self.directory)))
            return
        self._prepared = True
        self.state = "recording"
        if not consent_given:
            # The recording starts now, when the Feeds can be attached (the caller
            # attaches them before it awaits anything): a disk slow to create the
            # directory must not leave a gap between started_t and the media.
            self.started_t = round(self.session_time(), 3)
            self.started_at = self.clock_zero + self.started_t
            self._schedule_manifest()
        self.add_event({"type": "recording_started", "recording": self.id,
                        "session": self.session.session_id})

    def _prepare(self) -> None:
        self.directory.mkdir(mode=0o750, parents=True)
        self._events_fd = os.open(self.directory / EVENTS,
                                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        # Held while the recording runs (the kernel lets go if the process dies):
        # recorder.repair never touches a recording someone is writing.
        fcntl.flock(self._events_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._write_manifest()

    def _prepare_resume(self) -> None:
        """Take the Recording over from the Node that wrote it before."""
        from .repair import RepairReport, finish_parts, remove_temporary

        self._events_fd = os.open(self.directory / EVENTS, os.O_RDWR | os.O_APPEND)
        deadline = time.monotonic() + self._lock_wait_s
        while True:
            try:
                fcntl.flock(self._events_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # The Node before is still closing its parts (it let the Session go first).
                if time.monotonic() > deadline:
                    os.close(self._events_fd)
                    self._events_fd = None
                    raise RecordingError("stalled", "another Node is still writing this "
                                         "recording") from None
                time.sleep(0.05)
        remove_temporary(self.directory)
        manifest = json.loads((self.directory / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("id") != self.id:
            raise RecordingError("not_writable", "the manifest names another recording")
        report = RepairReport(self.id, "resumed")
        ends = finish_parts(self.directory, manifest, report)
        self.repaired = report.parts
        previous = manifest.get("node")
        with self._lock:
            self.consent = dict(manifest.get("consent") or self.consent)
            if isinstance(manifest.get("clock_zero_unix"), (int, float)):
                self.clock_zero = float(manifest["clock_zero_unix"])
            if isinstance(manifest.get("started_t"), (int, float)):
                self.started_t = float(manifest["started_t"])
            assert self.clock_zero is not None and self.started_t is not None
            self.started_at = self.clock_zero + self.started_t
            self._earlier_errors = [e for e in manifest.get("errors") or []
                                    if isinstance(e, dict)]
            for feed in manifest.get("feeds", []):
                feed_id = str(feed["id"])
                parts = {int(p["index"]): p for p in feed.get("parts", [])}
                self._feeds[feed_id] = {k: v for k, v in feed.items() if k != "parts"}
                self._parts[feed_id] = parts
                start = max(parts, default=-1) + 1
                self._counters[feed_id] = itertools.count(start)
                self._first_index[feed_id] = start
            self.gaps = [g for g in manifest.get("gaps") or [] if isinstance(g, dict)]
            # From the last media written before the move (never before consent).
            self.gaps.append({"start": round(max([self.started_t, *ends]), 3), "end": None,
                              "reason": "origin_moved", "from_node": previous,
                              "to_node": self.node})
        if manifest.get("repaired") is not None:
            self._carried = {"repaired": manifest["repaired"]}
        self._write_manifest()

    async def stop(self, timeout: float = 10.0, *, hand_over: bool = False) -> dict[str, Any]:
        """Close every part, write the final manifest; returns it. ``hand_over``:
        the Session goes on on another Node, which continues this Recording
        (the manifest stays ``recording``, with no end)."""
        if self._stopped is None:  # never started
            self.state = "stopped"
            self._io.shutdown(wait=False)
            return self.manifest()
        if self.state in ("stopping", "stopped") or self._stopped.done():
            await asyncio.shield(self._stopped)
            return self.manifest()
        failed = self.state == "failed"
        self.handed_over = hand_over and not failed
        if not failed:
            self.state = "stopping"
        await asyncio.gather(*(self.detach(feed_id, timeout=timeout)
                               for feed_id in list(self._attached)))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.ended_t = round(self.session_time(), 3)
        assert self.clock_zero is not None
        self.ended_at = self.clock_zero + self.ended_t
        self.duration = self._elapsed()
        if self.handed_over:
            self.ended_t = self.ended_at = self.duration = None
            self.add_event({"type": "recording_handed_over", "node": self.node})
        elif not failed:
            self.add_event({"type": "recording_stopped"})
        if self.state == "stopping":
            self.state = "stopped"
        self._schedule_manifest()
        self._submit(self._close_events)
        try:
            await asyncio.wait_for(asyncio.to_thread(self._io.shutdown, True), timeout)
        except TimeoutError:
            self._record_error(RecordingError(
                "stalled", f"the recording's files were not written within {timeout:g} s"))
        self._stopped.set_result(None)
        return self.manifest()

    def _close_events(self) -> None:
        if self._events_fd is not None:
            fd, self._events_fd = self._events_fd, None
            os.close(fd)

    # -- Feeds ----------------------------------------------------------------
    def attach(self, feed: RecordableFeed) -> FeedWriter | None:
        """Record ``feed`` from its next key frame. Returns its writer, or None when
        the recording is not running or cannot record the Feed's codec."""
        if self.state != "recording" or self.origin is None:
            return None
        current = self._attached.get(feed.id)
        if current is not None:
            if current.feed is feed:
                return current.writer
            # A new Feed object under the same id (the old one closed): new writer.
            self._release_later(current.feed)
        mime = feed.mime_type
        if mime.lower() not in RECORDABLE:
            logger.warning("recording %s: cannot record %s (%s)", self.id, feed.id, mime)
            return None
        with self._lock:
            self._feeds.setdefault(feed.id, {"id": feed.id, "kind": feed.kind, "codec": mime})
            self._parts.setdefault(feed.id, {})
            counter = self._counters.setdefault(feed.id, itertools.count())
        requester = f"recorder:{self.id}:{feed.id}"
        writer = FeedWriter(
            feed_id=feed.id, kind=feed.kind, mime_type=mime, clock_rate=feed.clock_rate,
            directory=self.directory, origin=self.origin,
            on_part=functools.partial(self._part_changed, feed.id),
            on_error=functools.partial(self._writer_failed, feed.id),
            request_keyframe=functools.partial(feed.request_keyframe, requester),
            options=self._options,
            allocate_index=functools.partial(self._next_index, counter),
            not_before=self.started_t if self.started_t is not None else float("-inf"),
            list_part=functools.partial(self._list_part, feed.id))
        writer.start()
        tap = _Tap(feed.id, writer, functools.partial(self._tap_dropped, feed))
        # From the next keyframe: nothing cached from before the recording started.
        feed.attach(tap, start="keyframe")
        self._attached[feed.id] = _Attached(feed, writer, functools.partial(feed.detach, tap))
        self.add_event({"type": "feed_attached", "feed": feed.id, "codec": mime})
        return writer

    def _tap_dropped(self, feed: RecordableFeed, reason: DropReason) -> None:
        """The Feed let go of our tap (it closed, or our writer misbehaved)."""
        attached = self._attached.get(feed.id)
        if attached is not None and attached.feed is feed:
            attached.unsubscribe = None  # the Feed already let go
            if reason != "feed_closed":
                logger.warning("recording %s: %s stopped feeding the recorder (%s)", self.id,
                               feed.id, reason)
            self._release_later(feed)

    def _next_index(self, counter: Iterator[int]) -> int:
        with self._lock:
            return next(counter)

    async def detach(self, feed: RecordableFeed | str, timeout: float = 10.0) -> None:
        """Stop recording a Feed (by object or id): its open part is closed and listed."""
        attached = self._release(feed)
        if attached is not None:
            await self._finish(attached, timeout)

    def _release(self, feed: RecordableFeed | str) -> _Attached | None:
        """Synchronously let go of a Feed: no frame reaches its writer after this."""
        feed_id = feed if isinstance(feed, str) else feed.id
        attached = self._attached.get(feed_id)
        if attached is None or (not isinstance(feed, str) and attached.feed is not feed):
            return None
        del self._attached[feed_id]
        self._unlisten(attached)
        attached.writer.stop()
        return attached

    def _release_later(self, feed: RecordableFeed | str) -> None:
        attached = self._release(feed)
        if attached is not None:
            self._track(self._finish(attached))

    async def _finish(self, attached: _Attached, timeout: float = 10.0) -> None:
        await attached.writer.wait_closed(timeout)
        feed_id = attached.feed.id
        with self._lock:
            self._feeds[feed_id]["stats"] = attached.writer.stats.describe()
        self._schedule_manifest()
        if self.state in ("recording", "stopping"):
            self.add_event({"type": "feed_detached", "feed": feed_id})

    def follow(self, session: FeedSource, *, events: bool = True) -> Callable[[], None]:
        """Attach the Session's live Feeds now and whenever one appears or comes
        back as a new Feed; detach Feeds that close. With ``events``, the
        Session's events go to events.jsonl too, as they are: ``interaction``
        (drawings, steps, questions, chat...: everything a recorder is told),
        participants joining and leaving, Feeds going live/down/closed, the end.
        Returns an unfollow. Stopping the recording stays the caller's job."""
        feed_states: dict[str, str] = {}
        for feed in list(session.feeds.values()):
            state = getattr(feed, "state", "live")
            if state != "closed":
                feed_states[feed.id] = state
                self.attach(feed)

        def on_event(event: Mapping[str, Any]) -> None:
            kind = event.get("type")
            if kind == "feed":
                feed_id = str(event["feed"]["id"])
                state = str(event["feed"]["state"])
                if state == "closed":
                    self._release_later(feed_id)
                else:
                    found = session.feeds.get(feed_id)
                    if found is not None and state == "live":
                        self.attach(found)
                if events and feed_states.get(feed_id) != state:
                    self._add_session_event({"type": "feed_state", "feed": feed_id,
                                             "state": state})
                feed_states[feed_id] = state
            elif events and kind == "interaction":
                # Stored once, with the Session clock stamp it was made with: the
                # time the live pages showed is the time the recording keeps.
                message = event.get("message")
                stamp = message.get("t") if isinstance(message, Mapping) else None
                self._add_session_event(event if not isinstance(stamp, (int, float))
                                        else {**event, "t": stamp})
            elif events and kind in ("participant_joined", "participant_left",
                                     "session_ended"):
                self._add_session_event(event)

        return session.listen(on_event)

    def _add_session_event(self, event: Mapping[str, Any]) -> None:
        try:
            self.add_event(event)
        except ValueError as exc:
            logger.warning("recording %s: event not recorded: %s", self.id, exc)

    @property
    def writers(self) -> dict[str, FeedWriter]:
        return {feed_id: a.writer for feed_id, a in self._attached.items()}

    def _unlisten(self, attached: _Attached) -> None:
        if attached.unsubscribe is not None:
            with contextlib.suppress(ValueError):  # already removed
                attached.unsubscribe()
            attached.unsubscribe = None

    def _track(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- events -------------------------------------------------------------
    def add_event(self, event: Mapping[str, Any]) -> bool:
        """Append ``{"t": Session clock seconds, "type": ..., ...}`` to events.jsonl.

        ``t`` defaults to now. Returns False if the event was not recorded
        (recording not running, or the disk is far behind)."""
        if not isinstance(event.get("type"), str):
            raise ValueError("an event needs a string 'type'")
        if self.state not in ("recording", "stopping"):
            return False
        t = event.get("t")
        record = {"t": round(float(t) if t is not None else self.session_time(), 3),
                  **{k: v for k, v in event.items() if k != "t"}}
        try:
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event is not JSON: {exc}") from None
        if self._pending_io >= MAX_PENDING_IO:
            logger.warning("recording %s: disk behind, dropping event %s", self.id,
                           record["type"])
            return False
        return self._submit(self._append_event, line.encode())

    def _append_event(self, data: bytes) -> None:
        if self._events_fd is None:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._events_fd, view):]

    # -- manifest -------------------------------------------------------------
    def _list_part(self, feed_id: str, info: PartInfo, timeout: float = 10.0) -> None:
        """From a writer thread: a part is about to be created. Returns once the
        manifest on disk lists it (raises what writing it raised)."""
        with self._lock:
            self._parts[feed_id][info.index] = self._describe_part(feed_id, info)
        try:
            future = self._io.submit(self._write_manifest)
        except RuntimeError:  # shut down: the recording is over
            raise RecordingError("stalled", "the recording has stopped", feed_id=feed_id
                                 ) from None
        try:
            future.result(timeout)
        except TimeoutError:
            raise RecordingError("stalled", f"the manifest was not written within "
                                 f"{timeout:g} s", feed_id=feed_id) from None

    def _part_changed(self, feed_id: str, info: PartInfo) -> None:
        """From a writer thread: a part opened or closed."""
        with self._lock:
            self._parts[feed_id][info.index] = self._describe_part(feed_id, info)
        self._schedule_manifest()

    def _schedule_manifest(self) -> None:
        with self._lock:
            if self._manifest_pending or not self._prepared:
                return
            self._manifest_pending = True
        self._submit(self._write_manifest)

    def _write_manifest(self) -> None:
        with self._lock:
            self._manifest_pending = False
            text = json.dumps(self._manifest_locked(), indent=2, ensure_ascii=False)
        try:
            write_atomic(self.directory / MANIFEST, (text + "\n").encode())
        except BaseException:
            self.manifest_saved = False
            raise
        self.manifest_saved = True

    def manifest(self) -> dict[str, Any]:
        """The manifest as it stands (what manifest.json will say)."""
        with self._lock:
            return self._manifest_locked()

    def _describe_part(self, feed_id: str, info: PartInfo) -> dict[str, Any]:
        self._first_index.setdefault(feed_id, info.index)
        described = info.describe()
        if self.node is not None:
            described["node"] = self.node
        return described

    def _gaps_locked(self) -> list[dict[str, Any]]:
        """The gaps, the open one ending where this Node's first part starts."""
        out = [dict(g) for g in self.gaps]
        if out and out[-1].get("end") is None:
            starts = [float(p["start"]) for feed_id, parts in self._parts.items()
                      for index, p in parts.items()
                      if index >= self._first_index.get(feed_id, 1 << 30)]
            if starts:
                out[-1]["end"] = round(max(min(starts), float(out[-1]["start"])), 3)
            elif self.ended_t is not None and not self.handed_over:
                out[-1]["end"] = round(max(self.ended_t, float(out[-1]["start"])), 3)
        return out

    def _manifest_locked(self) -> dict[str, Any]:
        feeds = []
        for feed_id, entry in self._feeds.items():
            parts = [self._parts[feed_id][i] for i in sorted(self._parts[feed_id])]
            feeds.append({**entry, "parts": parts})
        return {
            "format": FORMAT,
            "id": self.id,
            "session": self.session.describe(),
            "consent": self.consent,
            "state": "recording" if self.handed_over else self.state,
            "node": self.node,
            "clock": "Session clock: seconds since clock_zero_unix; part 'start' and "
                     "event 't' are on it; the recording covers started_t to ended_t",
            "clock_zero_unix": self.clock_zero,
            "started": _iso(self.started_at),
            "started_t": self.started_t,
            "ended": _iso(self.ended_at),
            "ended_t": self.ended_t,
            "duration": None if self.duration is None else round(self.duration, 3),
            "feeds": feeds,
            "gaps": self._gaps_locked(),
            "events": EVENTS,
            "errors": self._earlier_errors + [e.describe() for e in list(self.errors)],
            **self._carried,
        }

    def describe(self) -> dict[str, Any]:
        """A short status for the websocket / expert page."""
        with self._lock:
            parts = {f: len(p) for f, p in self._parts.items()}
        return {
            "id": self.id,
            "state": self.state,
            "started": _iso(self.started_at),
            "duration": round(self._elapsed(), 1),
            "feeds": [{"id": f, "parts": n,
                       "recording": f in self._attached
                       and self._attached[f].writer.state == "running"}
                      for f, n in parts.items()],
            "error": self.errors[0].describe() if self.errors else None,
        }

    # -- I/O thread and errors ------------------------------------------------
    def _submit(self, fn: Callable[..., None], *args: Any) -> bool:
        with self._lock:
            self._pending_io += 1
        try:
            future = self._io.submit(fn, *args)
        except RuntimeError:  # shut down
            with self._lock:
                self._pending_io -= 1
            return False
        future.add_done_callback(self._io_done)
        return True

    def _io_done(self, future: Future[None]) -> None:
        with self._lock:
            self._pending_io -= 1
        exc = future.exception()
        if exc is None:
            return
        error = error_from_exception(exc, path=str(self.directory))
        loop = self._loop
        if loop is None:
            logger.error("recording %s: %s", self.id, error)
            return
        with contextlib.suppress(RuntimeError):  # loop closed
            loop.call_soon_threadsafe(self._io_failed, error)

    def _io_failed(self, error: RecordingError) -> None:
        if self.state == "failed":
            logger.warning("recording %s: after failure: %s", self.id, error)
            return
        self._fatal(error)

    def _writer_failed(self, feed_id: str, error: RecordingError) -> None:
        """On the loop: a writer stopped on an error."""
        attached = self._attached.get(feed_id)
        if attached is not None:
            self._unlisten(attached)
        if error.code in FATAL_CODES:
            if self.state == "failed":
                self._record_error(error)
            else:
                self._fatal(error)
            return
        self._record_error(error)
        self.add_event({"type": "recording_error", **error.describe()})
        self._report(error)

    def _fatal(self, error: RecordingError) -> None:
        """Nothing more can be written: stop every writer, tell once."""
        logger.error("recording %s failed: %s", self.id, error)
        self._record_error(error)
        self.state = "failed"
        for attached in self._attached.values():
            self._unlisten(attached)
            attached.writer.stop()
        self._schedule_manifest()  # best effort: lists the error if the disk lets us
        self._report(error)

    def _record_error(self, error: RecordingError) -> None:
        self.errors.append(error)

    def _report(self, error: RecordingError) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(error)
        except Exception:
            logger.exception("recording %s: error callback failed", self.id)
