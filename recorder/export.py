"""From a Recording's directory to things people open: a thumbnail, one MP4 of a
Feed with its sound (the drawings and step titles burned in), a contact sheet
of the steps.

Decoding is PyAV, drawing OpenCV, encoding H.264 (libx264) and AAC with PyAV.
The Session clock places everything (recorder.recording): a frame at file time
``x`` of a part starting at ``start`` happened at ``start + x``; drawings and
steps come from events.jsonl through recorder.replay, by the same rules as the
player page. What people read is the time since the recording started
(``t - started_t``, :func:`recording_span`): the MP4's own clock, the contact
sheet's captions and the player's times all agree.

Nothing here runs on the event loop: the server calls :func:`make_thumbnail`
in a thread; ``scrubin export`` calls the rest.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import numpy.typing as npt

from .recording import EVENTS, MANIFEST
from .replay import annotations_at, marks, player_events, read_events, step_at

THUMBNAIL = "thumbnail.jpg"
#: Sizes of drawings are given for a picture this many lines high (telestration.js).
REFERENCE_HEIGHT = 720
Image = npt.NDArray[np.uint8]
Progress = Callable[[float, float], None]


class ExportError(Exception):
    """The recording cannot be exported as asked (user's fault: wrong Feed, no video)."""


@dataclass
class RecordingFiles:
    directory: Path
    manifest: dict[str, Any]
    events: list[dict[str, Any]]

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RecordingFiles:
        path = Path(directory)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{path} is not a recording (no readable {MANIFEST}): {exc}") from exc
        return cls(path, manifest, player_events(read_events(path / EVENTS)))

    def feed(self, feed_id: str) -> dict[str, Any]:
        for feed in self.manifest.get("feeds", []):
            if feed.get("id") == feed_id:
                return dict(feed)
        known = ", ".join(f.get("id", "?") for f in self.manifest.get("feeds", []))
        raise ExportError(f"no Feed {feed_id!r} in this recording (Feeds: {known or 'none'})")

    def video_feeds(self) -> list[dict[str, Any]]:
        return [f for f in self.manifest.get("feeds", []) if f.get("kind") == "video"
                and any(p.get("frames") for p in f.get("parts", []))]

    def main_video_feed(self, slots: list[str] | tuple[str, ...] = ()) -> dict[str, Any] | None:
        """The video Feed of the first slot in ``slots`` order (the Theatre's), else
        the first recorded."""
        feeds = self.video_feeds()
        order = {slot: i for i, slot in enumerate(slots)}
        feeds.sort(key=lambda f: order.get(str(f["id"]).split(".")[0], len(order)))
        return feeds[0] if feeds else None

    def parts(self, feed: dict[str, Any]) -> list[tuple[dict[str, Any], Path]]:
        """A Feed's parts with frames, in time order, as paths checked to stay in
        the recording's directory."""
        out = []
        for part in sorted(feed.get("parts", []), key=lambda p: float(p.get("start", 0))):
            name = str(part.get("file", ""))
            if not part.get("frames") or not _safe_name(name):
                continue
            out.append((part, self.directory / name))
        return out


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _safe_name(name: str) -> bool:
    return bool(_NAME.match(name)) and ".." not in name


# -- frames -------------------------------------------------------------------------

def _frames(path: Path) -> Iterator[tuple[float, Image]]:
    """(file time, BGR picture) of every frame of a part; a torn end is tolerated."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            try:
                for frame in container.decode(stream):
                    yield float(frame.time or 0.0), np.asarray(frame.to_ndarray(format="bgr24"),
                                                          dtype=np.uint8)
            except av.error.InvalidDataError:
                return  # the last cluster of a part that was being written
    except (av.error.FileNotFoundError, av.error.InvalidDataError, IndexError):
        return


def _fit(image: Image, width: int, height: int) -> Image:
    """Scale into width×height, letterboxed (a part at another picture size)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((height, width, 3), np.uint8)
    x, y = (width - nw) // 2, (height - nh) // 2
    out[y:y + nh, x:x + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    return out


def feed_pictures(files: RecordingFiles, feed: dict[str, Any]) -> Iterator[tuple[float, Image]]:
    """Every recorded picture of a video Feed, in time order: (Session clock, BGR
    picture at the size :func:`export_feed` encodes, its first part's, even)."""
    parts = files.parts(feed)
    if not parts:
        return
    width, height = int(parts[0][0].get("width") or 0), int(parts[0][0].get("height") or 0)
    for part, path in parts:
        for file_t, image in _frames(path):
            if not (width and height):
                height, width = image.shape[:2]
            width, height = width - width % 2, height - height % 2
            yield float(part["start"]) + file_t, _fit(image, width, height)


def _encode_jpeg(image: Image, quality: int = 85) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ExportError("JPEG encoding failed")
    return bytes(data.tobytes())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# -- drawing (the same shapes as client_web/js/telestration.js) -----------------------

def _bgr(color: Any) -> tuple[int, int, int]:
    text = str(color or "#ff3b30")
    if not re.fullmatch(r"#[0-9a-fA-F]{6}", text):
        text = "#ff3b30"
    r, g, b = int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)
    return b, g, r


def _ascii(text: str) -> str:
    """OpenCV's fonts draw ASCII only."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def draw_shape(image: Image, shape: dict[str, Any], alpha: float = 1.0) -> None:
    """Draw one telestration shape (normalised points) on the whole picture."""
    h, w = image.shape[:2]
    scale = h / REFERENCE_HEIGHT
    width = max(1.5, float(shape.get("width", 4)) * scale)
    thickness = max(1, round(width))
    color = _bgr(shape.get("color"))
    points = [(float(p[0]) * w, float(p[1]) * h) for p in shape.get("points", [])
              if isinstance(p, list) and len(p) == 2]
    if not points:
        return
    target = image if alpha >= 1.0 else image.copy()
    pts = [(round(x), round(y)) for x, y in points]
    kind = shape.get("kind")
    line = cv2.LINE_AA
    if kind == "freehand":
        if len(pts) == 1:
            cv2.circle(target, pts[0], max(1, round(width / 2)), color, -1, line)
        else:
            cv2.polylines(target, [np.array(pts, np.int32)], False, color, thickness, line)
    elif kind == "arrow" and len(points) >= 2:
        (x0, y0), (x1, y1) = points[0], points[-1]
        angle = math.atan2(y1 - y0, x1 - x0)
        head = max(10.0, width * 4)
        cv2.line(target, pts[0], pts[-1], color, thickness, line)
        for side in (-1, 1):
            end = (round(x1 - head * math.cos(angle + side * 0.45)),
                   round(y1 - head * math.sin(angle + side * 0.45)))
            cv2.line(target, pts[-1], end, color, thickness, line)
    elif kind == "circle" and len(points) >= 2:
        (cx, cy), (ex, ey) = points[0], points[-1]
        radius = max(1, round(math.hypot(ex - cx, ey - cy)))
        cv2.circle(target, pts[0], radius, color, thickness, line)
    elif kind == "label":
        text = _ascii(str(shape.get("text", "")))
        size = max(11.0, 26 * scale)
        font_scale = size / 30
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        pad = round(size * 0.3)
        x, y = pts[0]
        box = target.copy()
        cv2.rectangle(box, (x - pad, y - th // 2 - pad), (x + tw + pad, y + th // 2 + pad),
                      (0, 0, 0), -1)
        cv2.addWeighted(box, 0.65, target, 0.35, 0, dst=target)
        cv2.putText(target, text, (x, y + th // 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    color, max(1, round(size / 14)), line)
    if target is not image:
        cv2.addWeighted(target, alpha, image, 1 - alpha, 0, dst=image)


def draw_caption(image: Image, text: str, *, top: bool = True) -> None:
    """A dark band with one line of text (the step title), across the picture."""
    h = image.shape[0]
    size = max(11.0, 24 * h / REFERENCE_HEIGHT)
    font_scale = size / 30
    (_, th), base = cv2.getTextSize(_ascii(text), cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    band = th + base + round(size * 0.6)
    y0 = 0 if top else h - band
    region = image[y0:y0 + band]
    region[:] = (region * 0.35).astype(np.uint8)
    cv2.putText(image, _ascii(text), (round(size * 0.5), y0 + band - base - round(size * 0.3)),
                cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                max(1, round(size / 14)), cv2.LINE_AA)


def burn_in(image: Image, files: RecordingFiles, feed_id: str, t: float) -> None:
    """What a reviewer sees on the player at ``t``: drawings, then the step title."""
    for annotation, alpha in annotations_at(files.events, feed_id, t):
        shape = annotation.get("shape")
        if isinstance(shape, dict):
            draw_shape(image, shape, alpha)
    step = step_at(files.events, t)
    if step:
        draw_caption(image, step)


# -- thumbnail ------------------------------------------------------------------------

def make_thumbnail(directory: str | os.PathLike[str], slots: tuple[str, ...] = (),
                   width: int = 320) -> Path | None:
    """``thumbnail.jpg`` from the first (key) frame of the main video Feed's first
    part; None when there is no video."""
    files = RecordingFiles.load(directory)
    feed = files.main_video_feed(slots)
    if feed is None:
        return None
    for _part, path in files.parts(feed):
        for _t, image in _frames(path):
            h, w = image.shape[:2]
            height = max(2, round(h * width / w))
            thumb = np.asarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA),
                               dtype=np.uint8)
            out = files.directory / THUMBNAIL
            _write_atomic(out, _encode_jpeg(thumb))
            return out
    return None


# -- the recording's own clock ----------------------------------------------------------

def recording_span(files: RecordingFiles) -> tuple[float, float]:
    """(started_t, ended_t) on the Session clock: what the recording covers,
    from consent to its end. Times shown to people are ``t - started_t``."""
    manifest = files.manifest
    ends = [float(p.get("start", 0)) + float(p.get("duration") or 0)
            for f in manifest.get("feeds", []) for p in f.get("parts", []) if p.get("frames")]
    starts = [float(p.get("start", 0)) for f in manifest.get("feeds", [])
              for p in f.get("parts", []) if p.get("frames")]
    started = manifest.get("started_t")
    t0 = float(started) if isinstance(started, (int, float)) else min(starts, default=0.0)
    duration = manifest.get("duration")
    if isinstance(duration, (int, float)):
        return t0, t0 + float(duration)
    return t0, max([t0, *ends])


def clock_label(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``, as every page shows a time (review.js formatDuration)."""
    s = max(0, math.floor(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


# -- one Feed as an MP4, with the sound -----------------------------------------------------

#: A hook on every picture of an export, in place: (BGR image, recording time).
PictureHook = Callable[[Image, float], None]
AUDIO_RATE = 48000
_VIDEO_TB = Fraction(1, 90000)
_AUDIO_TB = Fraction(1, AUDIO_RATE)


@dataclass
class ExportResult:
    path: Path
    frames: int
    duration: float  # seconds: the recording's, from consent to its end
    start: float  # Session clock of the export's 0 (the recording's started_t)
    width: int
    height: int
    first_frame: float = 0.0  # export time of the Feed's first picture
    audio: tuple[str, ...] = ()  # the audio Feeds mixed into its sound
    video_copied: bool = False  # the H.264 as recorded (no re-encoding)


def export_feed(directory: str | os.PathLike[str], feed_id: str, out: str | os.PathLike[str],
                *, progress: Progress | None = None, burn: bool = True,
                audio: bool | Sequence[str] = True, picture: PictureHook | None = None,
                crf: int = 23, preset: str = "veryfast",
                strip_metadata: bool = False) -> ExportResult:
    """One MP4 of ``feed_id`` and the recording's sound, on the recording's own
    clock: time 0 is when the recording started (consent), so every moment is
    where the player and the contact sheet put it.

    Video: an H.264 Feed without burn-in is copied as recorded; otherwise (VP8,
    which MP4 cannot carry, or drawings and step titles burned in, or a
    ``picture`` hook, e.g. de-identification) every recorded frame is decoded
    and encoded again (H.264) at its recorded time. Before the Feed's first
    picture the MP4 shows a black "no picture yet" frame; between parts the
    last picture holds.

    Sound: the audio Feeds (``True``: all of them, e.g. the narration and the
    trainee microphone; or the ids given; ``False``: none) decoded, placed on
    the same clock, mixed and encoded as AAC (what MP4 players play).

    ``strip_metadata``: nothing in the file but pictures and sound: no
    container tags (the muxer's ``encoder``), no encoder idents in the streams
    (FFmpeg's bit-exact mode; x264's settings SEI filtered out), as a
    de-identified export needs.

    ``progress(done_s, total_s)`` as it goes. A failure leaves no file."""
    files = RecordingFiles.load(directory)
    feed = files.feed(feed_id)
    if feed.get("kind") != "video":
        raise ExportError(f"{feed_id} is {feed.get('kind')}; export a video Feed")
    parts = files.parts(feed)
    if not parts:
        raise ExportError(f"{feed_id} has no recorded frames")
    t0, t1 = recording_span(files)
    total = max(t1 - t0, 0.001)
    audio_feeds = _audio_feeds(files, audio)
    copy = (not burn and picture is None and not strip_metadata
            and str(feed.get("codec", "")).lower() == "video/h264"
            and len({(p.get("width"), p.get("height")) for p, _ in parts}) == 1)
    out_path = Path(out)
    options = {"movflags": "+faststart"}
    if strip_metadata:
        options["fflags"] = "+bitexact"  # no "encoder" tag
    container = av.open(str(out_path), "w", format="mp4", options=options)
    stats = _VideoStats()
    try:
        if copy:
            video = _copied_video(container, parts, t0, stats)
        else:
            video = _encoded_video(container, files, feed_id, parts, t0, t1, stats, burn=burn,
                                   picture=picture, crf=crf, preset=preset,
                                   bare=strip_metadata)
        streams: list[Iterator[tuple[float, Any]]] = [video]
        if audio_feeds:
            streams.append(_mixed_audio(container, files, audio_feeds, t0, t1,
                                        bare=strip_metadata))
        muxed = 0
        for at, packet in heapq.merge(*streams, key=lambda item: item[0]):
            container.mux(packet)
            muxed += 1
            if progress is not None and muxed % 30 == 0:
                progress(min(max(at, 0.0), total), total)
        if not stats.frames:
            raise ExportError(f"{feed_id}: no frame could be decoded")
    except BaseException:
        container.close()
        out_path.unlink(missing_ok=True)
        raise
    container.close()
    if progress is not None:
        progress(total, total)
    return ExportResult(out_path, stats.frames, round(t1 - t0, 3), t0, stats.width,
                        stats.height, first_frame=stats.first,
                        audio=tuple(str(f["id"]) for f in audio_feeds), video_copied=copy)


def _audio_feeds(files: RecordingFiles, audio: bool | Sequence[str]) -> list[dict[str, Any]]:
    if audio is False:
        return []
    feeds = [f for f in files.manifest.get("feeds", []) if f.get("kind") == "audio"
             and files.parts(f)]
    if audio is True:
        return feeds
    wanted = list(audio)
    for feed_id in wanted:
        if files.feed(feed_id).get("kind") != "audio":
            raise ExportError(f"{feed_id} is not an audio Feed")
    return [f for f in feeds if f["id"] in wanted]


@dataclass
class _VideoStats:
    frames: int = 0
    width: int = 0
    height: int = 0
    first: float = 0.0


def _copied_video(container: Any, parts: list[tuple[dict[str, Any], Path]], t0: float,
                  stats: _VideoStats) -> Iterator[tuple[float, Any]]:
    """The H.264 packets as recorded, each part placed at its start."""
    stream: Any = None
    last_dts = -1
    for part, path in parts:
        try:
            source = av.open(str(path))
        except (av.error.FFmpegError, OSError):
            continue
        with source:
            src = source.streams.video[0]
            if stream is None:
                stream = container.add_stream_from_template(src)
                stream.time_base = _VIDEO_TB
                stats.width, stats.height = src.codec_context.width, src.codec_context.height
            base = round((float(part["start"]) - t0) / _VIDEO_TB)
            scale = (src.time_base or _VIDEO_TB) / _VIDEO_TB
            try:
                for packet in source.demux(src):
                    if packet.pts is None or packet.dts is None or packet.is_corrupt:
                        continue
                    pts = base + round(packet.pts * scale)
                    dts = max(base + round(packet.dts * scale), last_dts + 1)
                    packet.pts, packet.dts = max(pts, dts), dts
                    packet.time_base, packet.stream = _VIDEO_TB, stream
                    last_dts = dts
                    if not stats.frames:
                        stats.first = float(packet.pts * _VIDEO_TB)
                    stats.frames += 1
                    yield float(dts * _VIDEO_TB), packet
            except av.error.InvalidDataError:
                continue  # the torn end of a part


def _encoded_video(container: Any, files: RecordingFiles, feed_id: str,
                   parts: list[tuple[dict[str, Any], Path]], t0: float, t1: float,
                   stats: _VideoStats, *, burn: bool, picture: PictureHook | None, crf: int,
                   preset: str, bare: bool = False) -> Iterator[tuple[float, Any]]:
    """Every recorded frame decoded, drawn on, encoded (H.264) at its recorded time
    (``bare``: without encoder idents, see :func:`export_feed`)."""
    first = parts[0][0]
    width, height = int(first.get("width") or 0), int(first.get("height") or 0)
    stream: Any = None
    strip: Any = None  # a bitstream filter: x264 writes its version and settings in an SEI
    last_pts = -1

    def packets(encoded: list[Any], final: bool) -> list[Any]:
        if strip is None:
            return encoded
        out = [p for packet in encoded for p in strip.filter(packet)]
        if final:  # the encoder flushed: the filter too
            out += strip.filter(None)
        for packet in out:
            packet.stream = stream
        return out

    def encode(image: Image | None, t: float) -> Iterator[tuple[float, Any]]:
        nonlocal last_pts
        frame = None
        if image is not None:
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            pts = max(round((t - t0) / _VIDEO_TB), last_pts + 1)
            frame.pts, frame.time_base = pts, _VIDEO_TB
            last_pts = pts
        for packet in packets(stream.encode(frame), final=frame is None):
            yield float(packet.dts * _VIDEO_TB) if packet.dts is not None else t - t0, packet

    for part, path in parts:
        for file_t, image in _frames(path):
            t = float(part["start"]) + file_t
            if stream is None:
                if not (width and height):
                    height, width = image.shape[:2]
                width, height = width - width % 2, height - height % 2
                stats.width, stats.height = width, height
                stream = container.add_stream("libx264", rate=30)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.codec_context.time_base = _VIDEO_TB
                stream.options = {"preset": preset, "crf": str(crf)}
                if bare:
                    stream.codec_context.flags |= av.codec.context.Flags.bitexact
                    strip = av.bitstream.BitStreamFilterContext("filter_units=remove_types=6",
                                                                stream)
                if t - t0 >= 0.001:
                    # Nothing from this camera yet: say so rather than start late.
                    blank = np.zeros((height, width, 3), np.uint8)
                    draw_caption(blank, "No picture from this camera yet", top=False)
                    yield from encode(blank, t0)
                stats.first = t - t0
            shown = np.ascontiguousarray(_fit(image, width, height))
            if picture is not None:
                picture(shown, t - t0)
            if burn:
                burn_in(shown, files, feed_id, t)
            stats.frames += 1
            yield from encode(shown, t)
    if stream is not None:
        yield from encode(None, t1)


class _AudioTrack:
    """One audio Feed as samples on the export's clock, read forwards in windows."""

    def __init__(self, parts: list[tuple[dict[str, Any], Path]], t0: float) -> None:
        self._frames = self._decode(parts, t0)
        self._pending: tuple[int, npt.NDArray[np.float32]] | None = None

    @staticmethod
    def _decode(parts: list[tuple[dict[str, Any], Path]], t0: float
                ) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        for part, path in parts:
            base = (float(part["start"]) - t0) * AUDIO_RATE
            expected: int | None = None
            try:
                with av.open(str(path)) as source:
                    for frame in source.decode(audio=0):
                        at = round(base + float(frame.time or 0.0) * AUDIO_RATE)
                        if expected is not None and abs(at - expected) <= 2:
                            at = expected  # contiguous: no rounding clicks
                        for out in resampler.resample(frame):
                            samples = out.to_ndarray().reshape(-1).astype(np.float32)
                            yield at, samples
                            at += samples.size
                        expected = at
            except (av.error.InvalidDataError, av.error.FileNotFoundError, IndexError):
                continue

    def add_to(self, mix: npt.NDArray[np.float32], start: int) -> None:
        """Add this track's samples in [start, start + len(mix)) to ``mix``."""
        end = start + mix.size
        while True:
            if self._pending is None:
                self._pending = next(self._frames, None)
                if self._pending is None:
                    return
            at, samples = self._pending
            if at >= end:
                return
            lo, hi = max(at, start), min(at + samples.size, end)
            if hi > lo:
                mix[lo - start:hi - start] += samples[lo - at:hi - at]
            if at + samples.size > end:
                return
            self._pending = None


def _mixed_audio(container: Any, files: RecordingFiles, feeds: list[dict[str, Any]],
                 t0: float, t1: float, block_s: float = 0.5, bare: bool = False
                 ) -> Iterator[tuple[float, Any]]:
    """The audio Feeds mixed (summed, clipped) into one AAC track from 0 to the end
    (``bare``: without the encoder's ident in the first frame)."""
    stream = container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
    stream.codec_context.time_base = _AUDIO_TB
    if bare:
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
    stream.bit_rate = 128_000
    tracks = [_AudioTrack(files.parts(f), t0) for f in feeds]
    total = max(1, round((t1 - t0) * AUDIO_RATE))
    block = round(block_s * AUDIO_RATE)
    for start in range(0, total, block):
        mix = np.zeros(min(block, total - start), np.float32)
        for track in tracks:
            track.add_to(mix, start)
        np.clip(mix, -1.0, 1.0, out=mix)
        frame = av.AudioFrame.from_ndarray(mix.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, start, _AUDIO_TB
        for packet in stream.encode(frame):
            yield float(packet.pts * _AUDIO_TB), packet
    for packet in stream.encode(None):
        yield float(packet.pts * _AUDIO_TB), packet


# -- contact sheet ----------------------------------------------------------------------

@dataclass(frozen=True)
class SheetTile:
    t: float  # Session clock
    at: float  # time since the recording started
    label: str  # the caption under the picture: "m:ss name"


def contact_sheet(directory: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  feed_id: str | None = None, columns: int = 4, tile_width: int = 320,
                  slots: tuple[str, ...] = ()) -> list[SheetTile]:
    """A JPEG grid: the picture at each procedure step (else each bookmark, else
    eight moments evenly spread), with drawings, and under it the time since the
    recording started (as the player shows it) and the step's name. Returns
    the tiles."""
    files = RecordingFiles.load(directory)
    feed = files.feed(feed_id) if feed_id else files.main_video_feed(slots)
    if feed is None:
        raise ExportError("this recording has no video")
    parts = files.parts(feed)
    if not parts:
        raise ExportError(f"{feed['id']} has no recorded frames")
    started, ended = recording_span(files)
    moments = [(float(m["t"]), str(m.get("name", ""))) for m in marks(files.events, "step")]
    if not moments:
        moments = [(float(m["t"]), str(m.get("name", ""))) for m in
                   marks(files.events, "bookmark")]
    if not moments:
        moments = [(started + (ended - started) * (i + 0.5) / 8, "") for i in range(8)]
    moments.sort()
    # One pass over the parts: the last frame at or before each moment (or the
    # first frame of the Feed, for a moment before it).
    pictures: list[Image | None] = [None] * len(moments)
    index = 0
    previous: Image | None = None
    for part, path in parts:
        for file_t, image in _frames(path):
            t = float(part["start"]) + file_t
            while index < len(moments) and moments[index][0] < t:
                pictures[index] = previous if previous is not None else image
                index += 1
            previous = image
            if index >= len(moments):
                break
    for rest in range(index, len(moments)):
        pictures[rest] = previous
    tiles = []
    shown: list[SheetTile] = []
    feed_name = str(feed["id"])
    for (t, name), picture in zip(moments, pictures, strict=True):
        if picture is None:
            continue
        tile = np.ascontiguousarray(picture.copy())
        for annotation, alpha in annotations_at(files.events, feed_name, t):
            if isinstance(annotation.get("shape"), dict):
                draw_shape(tile, annotation["shape"], alpha)
        h, w = tile.shape[:2]
        tile_height = max(2, round(h * tile_width / w))
        tile = np.asarray(cv2.resize(tile, (tile_width, tile_height),
                                     interpolation=cv2.INTER_AREA), dtype=np.uint8)
        caption = np.zeros((28, tile_width, 3), np.uint8)
        label = f"{clock_label(t - started)} {name}".strip()
        cv2.putText(caption, _ascii(label)[:48], (6, 19),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(np.vstack([tile, caption]))
        shown.append(SheetTile(t, round(t - started, 3), label))
    if not tiles:
        raise ExportError("no picture for any moment")
    tile_h = max(t.shape[0] for t in tiles)
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    gap = 6
    sheet = np.full((rows * (tile_h + gap) + gap, columns * (tile_width + gap) + gap, 3), 24,
                    np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = gap + r * (tile_h + gap), gap + c * (tile_width + gap)
        sheet[y:y + tile.shape[0], x:x + tile_width] = tile
    _write_atomic(Path(out), _encode_jpeg(sheet, 88))
    return shown
