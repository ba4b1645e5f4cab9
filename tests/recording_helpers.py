"""Recordings made without a network: the real ``recorder.Recording`` fed with
synthetic-camera frames (VP8, with the frame counter) and Opus tones (beeps at
chosen moments) at chosen Session-clock times, plus chosen events. Shared by
the review, export and access tests."""

from __future__ import annotations

import fractions
import functools
import json
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
from av import AudioFrame, VideoFrame

from recorder import Recording, SessionInfo
from recorder.export import make_thumbnail
from server.media.plane import Downstream, DropReason, EncodedFrame, Start
from server.publish.synthetic import TheatreRenderer

W, H, FPS = 320, 180, 15
CONSENT = {"recorded_by": "Dr Expert", "recorded_at": "2026-01-05T09:00:00+00:00",
           "scope": "internal_review"}
#: A recording id the access matrix plants in its server's recording root.
PLANTED_ID = "planted-recording-0123456789"
PART = "room.video-000.webm"


class FakeFeed:
    """A Feed as the recorder sees it (the media seam's upstream), driven by the test."""

    def __init__(self, feed_id: str = "room.video", kind: str = "video",
                 mime: str = "video/VP8", rate: int = 90000) -> None:
        self.id = feed_id
        self.kind = kind
        self.mime_type = mime
        self.clock_rate = rate
        self.downstreams: list[Downstream] = []
        self.keyframe_requests = 0

    def attach(self, downstream: Downstream, *, start: Start) -> None:
        self.downstreams.append(downstream)

    def detach(self, downstream: Downstream, reason: DropReason = "closed") -> None:
        if downstream in self.downstreams:
            self.downstreams.remove(downstream)

    def pause(self, downstream: Downstream) -> None:
        pass

    def resume(self, downstream: Downstream) -> None:
        pass

    def request_keyframe(self, requester: str) -> bool:
        self.keyframe_requests += 1
        return True

    def emit(self, data: bytes, pts: int, keyframe: bool, received_at: float) -> None:
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = fractions.Fraction(1, self.clock_rate)
        frame = EncodedFrame(data=data, pts=pts, keyframe=keyframe, received_at=received_at,
                             packet=packet)
        for downstream in list(self.downstreams):
            downstream.deliver(frame)


@functools.lru_cache(maxsize=8)
def encode_vp8(count: int, first_counter: int = 0, gop: int = 15,
               label: str = "room", codec: str = "vp8") -> list[tuple[bytes, bool]]:
    """``count`` VP8 (or H.264, Annex B) frames of the synthetic camera; frame i
    shows counter ``first_counter + i``. (Cached: do not modify the list.)"""
    renderer = TheatreRenderer(W, H, label=label)
    h264 = codec == "h264"
    context = av.CodecContext.create("libx264" if h264 else "libvpx", "w")
    context.width, context.height, context.pix_fmt = W, H, "yuv420p"
    context.time_base = fractions.Fraction(1, 90000)
    context.gop_size = gop
    if not h264:
        context.bit_rate = 600_000
    # x264 at a constant quality: with a bit rate its first frames are too coarse
    # for the frame counter to be read.
    context.options = ({"tune": "zerolatency", "preset": "ultrafast", "profile": "baseline",
                        "crf": "20"} if h264 else {"deadline": "realtime", "cpu-used": "8"})
    out = []
    for i in range(count):
        frame = VideoFrame.from_ndarray(renderer.render(first_counter + i, 0.0),
                                        format="bgr24").reformat(format="yuv420p")
        frame.pts = i * (90000 // FPS)
        for packet in context.encode(frame):
            out.append((bytes(packet), bool(packet.is_keyframe)))
    for packet in context.encode():
        out.append((bytes(packet), bool(packet.is_keyframe)))
    return out


def encode_picture(image: np.ndarray, count: int, gop: int = 15,
                   bit_rate: int = 2_500_000) -> list[tuple[bytes, bool]]:
    """``count`` VP8 frames of one still picture (BGR), at a rate that keeps it
    close to the original."""
    h, w = image.shape[:2]
    context = av.CodecContext.create("libvpx", "w")
    context.width, context.height, context.pix_fmt = w, h, "yuv420p"
    context.time_base = fractions.Fraction(1, 90000)
    context.gop_size = gop
    context.bit_rate = bit_rate
    context.options = {"deadline": "realtime", "cpu-used": "8"}
    out = []
    for i in range(count):
        frame = VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")
        frame.pts = i * (90000 // FPS)
        out += [(bytes(p), bool(p.is_keyframe)) for p in context.encode(frame)]
    out += [(bytes(p), bool(p.is_keyframe)) for p in context.encode()]
    return out


@functools.lru_cache(maxsize=8)
def encode_opus(seconds: float, beeps: tuple[float, ...] = (), frequency: float = 1000.0,
                beep_s: float = 0.1) -> list[bytes]:
    """20 ms Opus packets (48 kHz, stereo) of a quiet tone with loud beeps of
    ``frequency`` starting at ``beeps`` (seconds from the first sample)."""
    context = av.CodecContext.create("libopus", "w")
    context.sample_rate, context.layout, context.format = 48000, "stereo", "s16"
    context.bit_rate = 64000
    n = np.arange(round(seconds * 48000))
    pcm = 0.02 * np.sin(2 * np.pi * 300 * n / 48000)
    for beep in beeps:
        inside = (n >= beep * 48000) & (n < (beep + beep_s) * 48000)
        pcm = np.where(inside, 0.6 * np.sin(2 * np.pi * frequency * n / 48000), pcm)
    samples = np.round(pcm * 32767).astype(np.int16)
    out = []
    for i in range(0, samples.size - 959, 960):
        block = np.repeat(samples[i:i + 960], 2).reshape(1, -1)
        frame = AudioFrame.from_ndarray(block, format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, i
        out += [bytes(p) for p in context.encode(frame)]
    out += [bytes(p) for p in context.encode(None)]
    return out


async def build_recording(root: str | Path, session_id: str = "or1-live", *,
                          seconds: float = 4.0, start_t: float = 1.0,
                          events: list[dict[str, Any]] = (),  # type: ignore[assignment]
                          recording_id: str | None = None,
                          consent: dict[str, str] | None = None,
                          thumbnail: bool = True,
                          feeds: tuple[tuple[str, int], ...] = (("room.video", 0),),
                          h264: tuple[str, ...] = (),
                          audio: tuple[tuple[str, tuple[float, ...], float], ...] = (),
                          consent_t: float = 0.0,
                          pictures: dict[str, np.ndarray] | None = None) -> Recording:
    """A stopped Recording: for each of ``feeds`` (id, first counter), VP8
    frames (H.264 for the Feeds in ``h264``) captured from Session time
    ``start_t`` at 15 fps for ``seconds`` (frame i shows counter first + i;
    a Feed in ``pictures`` shows that still picture instead, at its size);
    for each of ``audio`` (id, beep times on the Session clock, frequency),
    Opus from ``start_t`` for ``seconds``; and ``events`` (each with its
    ``t``). Consent (``started_t``) at ``consent_t``; the recording stops a
    quarter of a second after the media ends."""
    # Encoded first: the recording's length is the media's, however slow the encoder.
    encoded = {}
    for feed_id, first in feeds:
        if pictures and feed_id in pictures:
            encoded[feed_id] = encode_picture(pictures[feed_id], round(seconds * FPS))
        else:
            encoded[feed_id] = encode_vp8(round(seconds * FPS), first,
                                          label=feed_id.split(".")[0],
                                          codec="h264" if feed_id in h264 else "vp8")
    # The Session clock started long enough ago that the media is in the past.
    span = start_t + seconds + 0.25
    recording = Recording(root, SessionInfo(session_id, "or1", "Cholecystectomy", "Dr Expert",
                                            "Laparoscopic cholecystectomy"),
                          {**(consent or CONSENT), "started_by": {"name": "test"}},
                          recording_id=recording_id, origin=time.monotonic() - span,
                          consent_t=consent_t)
    await recording.start()
    origin = recording.origin
    assert origin is not None
    for feed_id, _first in feeds:
        feed = FakeFeed(feed_id, mime="video/H264" if feed_id in h264 else "video/VP8")
        recording.attach(feed)
        for i, (data, key) in enumerate(encoded[feed_id]):
            feed.emit(data, 1000 + i * (90000 // FPS), key, origin + start_t + i / FPS)
    for feed_id, beeps, frequency in audio:
        feed = FakeFeed(feed_id, kind="audio", mime="audio/opus", rate=48000)
        recording.attach(feed)
        packets = encode_opus(seconds, tuple(b - start_t for b in beeps), frequency)
        for i, data in enumerate(packets):
            feed.emit(data, 5000 + i * 960, True, origin + start_t + i * 0.02)
    for event in events:
        recording.add_event(event)
    await recording.stop()
    if thumbnail:
        make_thumbnail(recording.directory, ("room",))
    return recording


async def build_moved_recording(root: str | Path, session_id: str = "or1-live", *,
                                before: tuple[float, float] = (1.0, 2.0),
                                after: tuple[float, float] = (6.0, 2.0),
                                consent_t: float = 0.5,
                                first_after: int = 1000) -> Recording:
    """A stopped Recording whose Session moved between Nodes, as the recorder
    writes it (``Recording.stop(hand_over=True)`` on ``node-a``, then
    ``Recording(resume=True)`` on ``node-b``): room.video from Session time
    ``before[0]`` for ``before[1]`` s (counter from 0), then from ``after[0]`` for
    ``after[1]`` s (counter from ``first_after``), one gap between. Returns the
    second Node's Recording (its manifest is the final one)."""
    first_frames = encode_vp8(round(before[1] * FPS), 0)
    second_frames = encode_vp8(round(after[1] * FPS), first_after)
    span = after[0] + after[1] + 0.25
    origin, origin_unix = time.monotonic() - span, time.time() - span
    info = SessionInfo(session_id, "or1", "Cholecystectomy", "Dr Expert",
                       "Laparoscopic cholecystectomy")
    consent = {**CONSENT, "started_by": {"name": "test"}}
    recording_id = None
    for node, start_t, frames in (("node-a", before[0], first_frames),
                                  ("node-b", after[0], second_frames)):
        recording = Recording(root, info, consent, recording_id=recording_id, origin=origin,
                              origin_unix=origin_unix, consent_t=consent_t, node=node,
                              resume=recording_id is not None)
        await recording.start()
        assert recording.state == "recording", recording.errors
        recording_id = recording.id
        feed = FakeFeed()
        recording.attach(feed)
        for i, (data, key) in enumerate(frames):
            feed.emit(data, 1000 + i * (90000 // FPS), key, origin + start_t + i / FPS)
        await recording.stop(hand_over=node == "node-a")
    make_thumbnail(recording.directory, ("room",))
    return recording


def interaction(message: dict[str, Any]) -> dict[str, Any]:
    """An interaction message as the recorder stores it (Recording.follow)."""
    return {"type": "interaction", "to": None, "message": message, "t": message["t"]}


def circle(t: float, feed: str = "room.video", *, center: tuple[float, float] = (0.5, 0.45),
           radius: float = 0.15, color: str = "#30d158", fade_s: float = 60.0,
           annotation_id: str = "a1") -> dict[str, Any]:
    shape = {"kind": "circle", "color": color, "width": 8,
             "points": [list(center), [center[0] + radius, center[1]]]}
    annotation = {"id": annotation_id, "feed": feed, "shape": shape, "pinned": False,
                  "fade_s": fade_s, "t": t, "expires_t": t + fade_s,
                  "by": {"id": "e", "name": "Dr Expert"}, "media": {}}
    return interaction({"type": "annotation", "annotation": annotation, "t": t})


def mark(t: float, name: str, kind: str = "step", mark_id: str = "m1",
         current: str | None = None) -> dict[str, Any]:
    entry = {"id": mark_id, "kind": kind, "name": name, "t": t,
             "by": {"id": "e", "name": "Dr Expert"}}
    return interaction({"type": "mark", "mark": entry, "t": t,
                        "current_step": current if current is not None
                        else (name if kind == "step" else None),
                        "steps": []})


def age_recording(directory: Path, days: float) -> None:
    """Pretend the recording was made ``days`` ago (for retention)."""
    import datetime

    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)
    manifest["started"] = then.isoformat(timespec="milliseconds")
    manifest["ended"] = (then + datetime.timedelta(seconds=manifest.get("duration") or 0)
                         ).isoformat(timespec="milliseconds")
    manifest_path.write_text(json.dumps(manifest, indent=2))
