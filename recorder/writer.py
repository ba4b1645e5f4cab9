"""FeedWriter: one Feed's encoded frames remuxed, as they are, into short parts.

No decoding, no encoding: each frame the live path already carries becomes one
container block. VP8 and Opus go to WebM, H.264 to fragmented MP4 (or
Matroska). A part is one file that plays on its own even if the process is
killed mid-write: clusters/fragments are at most ``cluster_ms`` long and are
flushed as they close (plus ``fsync`` every ``fsync_s`` against power loss).

A new part starts when the Feed's first decodable frame arrives, when the
picture size (VP8 key frame header, H.264 SPS) changes, when the Feed comes
back after a gap (its frames arrive far later than their timestamps predict),
after ``idle_close_s`` without frames, and every ``part_max_s``. Video parts
always begin with a key frame: frames before one are skipped and one is asked
for.

Session clock: a part's frames keep the Feed's own timestamp spacing (no
arrival jitter in the file); the part is placed on the Session clock at
``start`` seconds, the smallest ``received_at - origin - (pts - first_pts) /
clock_rate`` over its frames, i.e. the least-delayed arrival. The file's first
frame is at 0, so a frame at file time ``x`` happened at ``start + x``. The
open part's ``start`` is reported again whenever it moves by
``start_update_s``, so a manifest left by a crash places it as well as a
finished one.

Consent-exact start: nothing of a Feed is kept from before ``not_before``
(the Session time consent was given). The frames of a Feed's first part are
held for ``settle_s`` before anything is written, which is long enough to
know where they sit on the Session clock; frames from before ``not_before``
are then dropped (video up to the next key frame: a key frame that was on
its way when consent was given is not kept, the one asked for is), and no
part's ``start`` ever moves before ``not_before``.

A part is listed (``list_part``, which returns once the manifest says so on
disk) before its file is created: a crash never leaves a file the manifest
does not know.

Threads: :meth:`FeedWriter.push` is the Feed's frame listener and runs on the
event loop; it only enqueues (bounded: when the disk cannot keep up, frames are
dropped and video waits for the next key frame). All file I/O runs in the
writer's own thread. ``on_part`` is called from that thread; ``on_error``,
keyframe requests and the end of the writer are marshalled to the loop. The
live path never waits for the recorder and never sees its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import itertools
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av

from server.media.plane import EncodedFrame

from .bitstream import (
    NAL_IDR,
    NAL_PPS,
    NAL_SPS,
    h264_nal_type,
    h264_nal_units,
    h264_sps_frame_size,
    ogg_opus_stream,
    opus_packet_samples,
    vp8_frame_size,
)
from .errors import RecordingError, error_from_exception

logger = logging.getLogger(__name__)

WriterState = Literal["new", "running", "closing", "closed", "failed"]

#: Codecs the recorder can archive (lower-case MIME types, as in server.media.codecs).
RECORDABLE = {"video/vp8", "video/h264", "audio/opus"}


@dataclass(frozen=True)
class WriterOptions:
    #: A part is cut at the first key frame after this many seconds.
    part_max_s: float = 300.0
    #: Longest Matroska cluster / MP4 fragment: what a SIGKILL can lose at most.
    cluster_ms: int = 500
    #: Frames waiting for the disk; beyond it frames are dropped.
    queue_frames: int = 512
    #: A key frame arriving this much later (or earlier) than the part's timeline
    #: predicts starts a new part: the Feed dropped and came back.
    gap_s: float = 1.0
    #: Close the open part after this long without frames (publisher gone).
    idle_close_s: float = 3.0
    #: fsync the open part at most this often (0: never; SIGKILL is safe without).
    fsync_s: float = 1.0
    h264_container: Literal["mp4", "mkv"] = "mp4"
    #: While waiting for a key frame, ask the Feed again this often.
    keyframe_retry_s: float = 1.0
    #: A Feed's first frames are held this long before its first part is
    #: written, to place them on the Session clock (see the module docstring).
    settle_s: float = 0.5
    #: The open part's start is reported again when it moves this much: what a
    #: crash can misplace a part by.
    start_update_s: float = 0.0005


@dataclass(frozen=True)
class _Format:
    extension: str
    container: str
    options: dict[str, str]


def container_format(mime_type: str, options: WriterOptions) -> _Format:
    mime = mime_type.lower()
    flush = {"flush_packets": "1"}
    matroska = {"cluster_time_limit": str(options.cluster_ms),
                "cluster_size_limit": str(8 * 1024 * 1024), **flush}
    if mime in ("video/vp8", "audio/opus"):
        return _Format("webm", "webm", matroska)
    if mime == "video/h264":
        if options.h264_container == "mkv":
            return _Format("mkv", "matroska", matroska)
        return _Format("mp4", "mp4", {
            "movflags": "empty_moov+default_base_moof+frag_keyframe",
            "frag_duration": str(options.cluster_ms * 1000), **flush})
    raise ValueError(f"cannot record {mime_type}")


@dataclass
class PartInfo:
    """One file of a Feed's recording, as the manifest lists it."""

    index: int
    file: str
    codec: str
    reason: str  # why it started: start, gap, resolution, parameters, rotation, resume
    start: float  # Session clock, seconds
    duration: float = 0.0
    frames: int = 0
    bytes: int = 0
    sha256: str | None = None
    complete: bool = False
    ended_by: str | None = None  # stop, idle, error, or the next part's reason
    width: int | None = None
    height: int | None = None
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index, "file": self.file, "codec": self.codec,
            "start": round(self.start, 4), "duration": round(self.duration, 4),
            "frames": self.frames, "bytes": self.bytes, "sha256": self.sha256,
            "complete": self.complete, "reason": self.reason, "ended_by": self.ended_by,
        }
        if self.width is not None:
            out["width"], out["height"] = self.width, self.height
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class WriterStats:
    frames_in: int = 0
    bytes_in: int = 0
    frames_written: int = 0
    payload_bytes_written: int = 0  # frame data muxed
    file_bytes: int = 0  # closed parts, container overhead included
    dropped_queue_full: int = 0
    skipped_before_keyframe: int = 0
    dropped_out_of_order: int = 0
    skipped_before_consent: int = 0
    parts: int = 0

    def describe(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Entry:
    """A frame that can start a part, and what its part must share with it."""

    data: bytes  # H.264: parameter sets prepended when the frame lacked them
    key: object  # equal keys can share a part
    width: int | None = None
    height: int | None = None


@dataclass
class _Held:
    """A frame held while a Feed's first part settles."""

    data: bytes
    pts: int
    now: float  # Session clock of its arrival
    entry: _Entry | None


@dataclass
class _OpenPart:
    info: PartInfo
    path: Path
    fh: _PartFile
    container: Any  # av OutputContainer
    stream: Any
    first_pts: int
    key: object
    offset: float
    last_pts: int = 0
    last_step: int = 0
    last_sync: float = field(default_factory=time.monotonic)
    keyframe_requested: bool = False


_STOP = object()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o640)


class _PartFile(io.FileIO):
    """A part's file that remembers a failed write: FFmpeg's I/O layer ignores
    short writes and some errors (a trailer written to a full disk), which
    would leave a part that looks finished but lacks its last frames."""

    error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                written = super().write(view)
                if not written:
                    raise OSError(errno.EIO, "short write")
                view = view[written:]
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise
        return total

    def check(self) -> None:
        """Raise the first write error, if any."""
        if self.error is not None:
            raise self.error


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeedWriter:
    """Archives one Feed into ``directory`` as ``<feed>-NNN.<ext>`` parts."""

    def __init__(
        self,
        *,
        feed_id: str,
        kind: str,
        mime_type: str,
        clock_rate: int,
        directory: Path,
        origin: float,
        on_part: Callable[[PartInfo], None],
        on_error: Callable[[RecordingError], None],
        request_keyframe: Callable[[], object] | None = None,
        options: WriterOptions | None = None,
        allocate_index: Callable[[], int] | None = None,
        not_before: float = float("-inf"),
        list_part: Callable[[PartInfo], None] | None = None,
    ) -> None:
        if mime_type.lower() not in RECORDABLE:
            raise ValueError(f"cannot record {mime_type}")
        self.feed_id = feed_id
        self.kind = kind
        self.mime_type = mime_type
        self.state: WriterState = "new"
        self.error: RecordingError | None = None
        self.stats = WriterStats()
        self._mime = mime_type.lower()
        self._rate = clock_rate
        self._time_base = Fraction(1, clock_rate)
        self._directory = Path(directory)
        self._origin = origin
        self._on_part = on_part
        self._list_part = list_part
        self._not_before = not_before
        self._on_error = on_error
        self._request_keyframe = request_keyframe
        self._options = options or WriterOptions()
        self._format = container_format(mime_type, self._options)
        self._stem = re.sub(r"[^A-Za-z0-9._-]", "_", feed_id)
        # Part numbers: the Recording's, so a Feed attached again never reuses one.
        self._allocate_index = allocate_index or itertools.count().__next__
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] | None = None
        # Loop side.
        self._resync = False
        self._last_drop_log = 0.0
        # Writer thread side.
        self._part: _OpenPart | None = None
        self._sps: bytes | None = None
        self._pps: bytes | None = None
        self._sps_sizes: dict[bytes, tuple[int, int]] = {}
        self._last_keyframe_ask = -1e9
        self._next_reason = "start"
        # Frames of the first part, held until they are placed (None: placed).
        self._lead: list[_Held] | None = []

    # -- event loop side ----------------------------------------------------
    def start(self) -> None:
        """Start the writer thread; call on the event loop."""
        if self.state != "new":
            return
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self.state = "running"
        self._thread = threading.Thread(target=self._run, name=f"recorder-{self._stem}",
                                        daemon=True)
        self._thread.start()
        self._ask_keyframe()

    def push(self, frame: EncodedFrame) -> None:
        """The Feed's frame listener: never blocks, never raises."""
        if self.state != "running":
            return
        try:
            self.stats.frames_in += 1
            self.stats.bytes_in += frame.size
            if self._resync and not frame.keyframe:
                self.stats.dropped_queue_full += 1
                return
            if self._queue.qsize() >= self._options.queue_frames:
                self._overflow()
                return
            self._queue.put_nowait((frame.packet, frame.packet.pts, frame.keyframe,
                                    frame.received_at))
            self._resync = False
        except Exception:  # the live path must not see recorder bugs
            logger.exception("recorder %s: dropping a frame", self.feed_id)

    def _overflow(self) -> None:
        self.stats.dropped_queue_full += 1
        now = time.monotonic()
        if now - self._last_drop_log > 5:
            self._last_drop_log = now
            logger.warning("recorder %s: disk too slow, dropping frames (%d so far)",
                           self.feed_id, self.stats.dropped_queue_full)
        if self.kind == "video":
            self._resync = True
            self._ask_keyframe()

    def _ask_keyframe(self) -> None:
        if self._request_keyframe is not None and self.kind == "video":
            try:
                self._request_keyframe()
            except Exception:
                logger.exception("recorder %s: keyframe request failed", self.feed_id)

    def stop(self) -> None:
        """Write what is queued, close the open part, end the thread."""
        if self.state == "running":
            self.state = "closing"
            self._queue.put_nowait(_STOP)
        elif self.state == "new":
            self.state = "closed"

    async def wait_closed(self, timeout: float = 10.0) -> bool:
        """True once the writer thread has ended; False if it is stuck (disk hung)."""
        if self._done is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except TimeoutError:
            self._fail(RecordingError("stalled", f"writing did not finish within {timeout:g} s",
                                      feed_id=self.feed_id))
            return False
        return True

    async def close(self, timeout: float = 10.0) -> bool:
        self.stop()
        return await self.wait_closed(timeout)

    def _fail(self, error: RecordingError) -> None:
        if self.error is not None:
            return
        self.error = error
        self.state = "failed"
        try:
            self._on_error(error)
        except Exception:
            logger.exception("recorder %s: error callback failed", self.feed_id)

    def _finished(self) -> None:
        if self.state != "failed":
            self.state = "closed"
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _to_loop(self, callback: Callable[..., object], *args: Any) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(callback, *args)

    # -- writer thread --------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                waiting = self._part is not None or bool(self._lead)
                timeout = self._options.idle_close_s if waiting else None
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    if self._lead:  # the Feed went quiet while its first part settled
                        self._release_lead()
                        continue
                    self._close_part("idle")
                    self._next_reason = "resume"
                    continue
                if item is _STOP:
                    break
                self._handle(*item)
            self._release_lead(final=True)
            self._close_part("stop")
        except Exception as exc:
            path = str(self._part.path) if self._part is not None else str(self._directory)
            error = error_from_exception(exc, feed_id=self.feed_id, path=path)
            logger.error("recorder %s: %s (%s)", self.feed_id, error, path)
            self._abort_part(error)
            self._to_loop(self._fail, error)
        finally:
            self._to_loop(self._finished)

    def _handle(self, packet: av.Packet, pts: int, keyframe: bool, received_at: float) -> None:
        data = bytes(packet)
        now = received_at - self._origin
        entry = self._entry_point(data) if keyframe or self.kind == "audio" else None
        if self._lead is not None:
            self._hold(_Held(data, pts, now, entry))
            return
        self._take(data, pts, now, entry)

    def _take(self, data: bytes, pts: int, now: float, entry: _Entry | None) -> None:
        part = self._part
        if part is not None:
            if pts <= part.last_pts:
                # A frame from the past (reordered upstream): files need rising timestamps.
                self.stats.dropped_out_of_order += 1
                return
            reason = self._cut_reason(part, pts, now, entry)
            if reason is not None:
                self._close_part(reason)
                self._next_reason = reason
                part = None
        if part is None:
            if entry is None:
                self.stats.skipped_before_keyframe += 1
                self._want_keyframe()
                return
            part = self._open_part(entry, pts, now)
            data = entry.data
        self._write(part, data, pts, now, entry is not None)

    # -- the first part: consent-exact --------------------------------------------
    def _hold(self, held: _Held) -> None:
        lead = self._lead
        assert lead is not None
        if not lead:
            if held.entry is None:
                self.stats.skipped_before_keyframe += 1
                self._want_keyframe()
                return
        elif held.pts <= lead[-1].pts:
            self.stats.dropped_out_of_order += 1
            return
        lead.append(held)
        if held.now - lead[0].now >= self._options.settle_s:
            self._release_lead()

    def _release_lead(self, *, final: bool = False) -> None:
        """Place the held frames, drop those from before ``not_before``, write the rest."""
        lead = self._lead
        if lead is None:
            return
        self._lead = None
        if not lead:
            return
        base = lead[0]
        # Least-delayed arrival: where the first held frame was captured, at the latest.
        offset = min(h.now - (h.pts - base.pts) / self._rate for h in lead)
        first = next((i for i, h in enumerate(lead) if h.entry is not None
                      and offset + (h.pts - base.pts) / self._rate >= self._not_before), None)
        if first is None:
            # Everything held was captured before consent (a key frame on its way
            # then): wait for the next key frame, the one asked for at the start.
            self.stats.skipped_before_consent += len(lead)
            if not final:
                self._lead = []
                self._want_keyframe(force=True)
            return
        self.stats.skipped_before_consent += first
        kept = lead[first:]
        entry = kept[0].entry
        assert entry is not None
        part = self._open_part(entry, kept[0].pts,
                               offset + (kept[0].pts - base.pts) / self._rate)
        self._write(part, entry.data, kept[0].pts, kept[0].now, True)
        for held in kept[1:]:
            self._take(held.data, held.pts, held.now, held.entry)

    def _entry_point(self, data: bytes) -> _Entry | None:
        """How ``data`` can start a part, or None if it cannot."""
        if self._mime == "video/vp8":
            size = vp8_frame_size(data)
            if size is None:
                return None
            return _Entry(data, size, *size)
        if self._mime == "video/h264":
            units = h264_nal_units(data)
            types = [h264_nal_type(u) for u in units]
            for unit, nal_type in zip(units, types, strict=True):
                if nal_type == NAL_SPS:
                    self._sps = unit
                elif nal_type == NAL_PPS:
                    self._pps = unit
            if NAL_IDR not in types or self._sps is None or self._pps is None:
                return None
            if NAL_SPS not in types or NAL_PPS not in types:
                data = b"\x00\x00\x00\x01" + self._sps + b"\x00\x00\x00\x01" + self._pps + data
            size = self._sps_sizes.get(self._sps)
            if size is None:
                try:
                    size = h264_sps_frame_size(self._sps)
                except ValueError:
                    logger.warning("recorder %s: unreadable SPS", self.feed_id)
                    return None
                self._sps_sizes = {self._sps: size}
            return _Entry(data, self._sps, *size)
        return _Entry(data, None)

    def _cut_reason(self, part: _OpenPart, pts: int, now: float,
                    entry: _Entry | None) -> str | None:
        elapsed = (pts - part.first_pts) / self._rate
        if entry is None:
            if elapsed >= self._options.part_max_s and not part.keyframe_requested:
                part.keyframe_requested = True
                self._want_keyframe(force=True)
            return None
        lateness = now - (part.offset + elapsed)
        if abs(lateness) > self._options.gap_s:
            return "gap"
        if entry.key != part.key:
            if (entry.width, entry.height) != (part.info.width, part.info.height):
                return "resolution"
            return "parameters"  # H.264: a new SPS, same picture size
        if elapsed >= self._options.part_max_s:
            return "rotation"
        return None

    def _want_keyframe(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_keyframe_ask >= self._options.keyframe_retry_s:
            self._last_keyframe_ask = now
            self._to_loop(self._ask_keyframe)

    def _open_part(self, entry: _Entry, pts: int, start: float) -> _OpenPart:
        index = self._allocate_index()
        name = f"{self._stem}-{index:03d}.{self._format.extension}"
        path = self._directory / name
        start = max(start, self._not_before)
        info = PartInfo(index=index, file=name, codec=self.mime_type, reason=self._next_reason,
                        start=start, width=entry.width, height=entry.height)
        self._next_reason = "start"
        if self._list_part is not None:
            self._list_part(replace(info))  # in the manifest on disk before the file exists
        fh = _PartFile(path, "wb", opener=_private_opener)
        try:
            container = av.open(fh, "w", format=self._format.container,
                                options=self._format.options)
            stream = self._add_stream(container, entry)
        except BaseException:
            fh.close()
            raise
        if self._options.fsync_s > 0:
            _fsync_dir(self._directory)
        part = _OpenPart(info=info, path=path, fh=fh, container=container, stream=stream,
                         first_pts=pts, key=entry.key, offset=start, last_pts=pts - 1)
        self._part = part
        if self._list_part is None:
            self._notify(part.info)
        return part

    def _add_stream(self, container: Any, entry: _Entry) -> Any:
        if self._mime == "audio/opus":
            # Matroska needs the OpusHead; FFmpeg's Ogg parser makes the template.
            with av.open(io.BytesIO(ogg_opus_stream(entry.data)), format="ogg") as template:
                stream = container.add_stream_from_template(template.streams.audio[0])
        else:
            # Packets are muxed as they are; there is no encoder behind this stream.
            # H.264 extradata (SPS/PPS) is taken from the first packet by PyAV.
            stream = container.add_mux_stream(self._mime.split("/")[1], width=entry.width,
                                              height=entry.height)
        stream.time_base = self._time_base
        return stream

    def _write(self, part: _OpenPart, data: bytes, pts: int, now: float, entry: bool) -> None:
        elapsed = (pts - part.first_pts) / self._rate
        offset = now - elapsed
        if part.offset - self._options.gap_s < offset < part.offset:
            # Arrived with less delay than any frame before it (never before consent).
            part.offset = max(offset, self._not_before)
            if part.info.start - part.offset >= self._options.start_update_s:
                part.info.start = part.offset
                self._notify(part.info)
        packet = av.Packet(data)
        packet.pts = packet.dts = pts - part.first_pts
        packet.time_base = self._time_base
        packet.stream = part.stream
        if self.kind == "audio":
            packet.duration = opus_packet_samples(data)
            packet.is_keyframe = True
        elif entry:
            packet.is_keyframe = True
        part.container.mux(packet)
        part.fh.check()
        if self.kind == "audio":
            part.last_step = opus_packet_samples(data) or part.last_step
        elif part.info.frames:
            part.last_step = pts - part.last_pts
        part.last_pts = pts
        part.info.frames += 1
        self.stats.frames_written += 1
        self.stats.payload_bytes_written += len(data)
        if self._options.fsync_s > 0:
            clock = time.monotonic()
            if clock - part.last_sync >= self._options.fsync_s:
                part.last_sync = clock
                os.fsync(part.fh.fileno())

    def _close_part(self, ended_by: str) -> None:
        part = self._part
        if part is None:
            return
        # On failure the part stays open for _abort_part: listed, not complete.
        part.container.close()
        part.fh.check()
        if self._options.fsync_s > 0:
            os.fsync(part.fh.fileno())
        size = os.fstat(part.fh.fileno()).st_size
        self._part = None
        part.fh.close()
        info = part.info
        info.start = part.offset
        info.duration = (part.last_pts - part.first_pts + max(part.last_step, 0)) / self._rate
        info.bytes = size
        info.sha256 = sha256_file(part.path)
        info.complete = True
        info.ended_by = ended_by
        self.stats.file_bytes += size
        self.stats.parts += 1
        self._notify(info)

    def _abort_part(self, error: RecordingError) -> None:
        part = self._part
        if part is None:
            return
        self._part = None
        with contextlib.suppress(Exception):
            part.container.close()
        with contextlib.suppress(Exception):
            part.fh.close()
        info = part.info
        info.start = part.offset
        info.duration = (part.last_pts - part.first_pts) / self._rate
        with contextlib.suppress(OSError):
            info.bytes = part.path.stat().st_size
        info.ended_by = "error"
        info.error = error.code
        self._notify(info)

    def _notify(self, info: PartInfo) -> None:
        try:
            self._on_part(replace(info))
        except Exception:
            logger.exception("recorder %s: part callback failed", self.feed_id)
