"""The recorder archives what the live path carries: real server, real parts.

Parts are decoded with PyAV (and probed with ffprobe when installed); the
synthetic cameras' frame counters tell which source frame each recorded
frame is, and their stamp times where it belongs on the Session clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame

from recorder import FeedWriter, Recording, RecordingError, SessionInfo, WriterOptions
from recorder.bitstream import (
    h264_nal_type,
    h264_nal_units,
    h264_sps_frame_size,
    opus_packet_samples,
    vp8_frame_size,
)
from recorder.repair import RecordingBusy, repair
from server import framecode
from server.publish.synthetic import SyntheticTheatreCamera, SyntheticTone, TheatreRenderer
from server.roles import Role

from .conftest import Server, client_pc, offer_sdp, wait_for, whep_subscribe, whip_publish
from .recording_helpers import FakeFeed

pytestmark = pytest.mark.slow

W, H, FPS = 320, 180, 15
REPO = Path(__file__).resolve().parent.parent
FFPROBE = shutil.which("ffprobe") or (
    "/usr/bin/ffprobe" if os.path.exists("/usr/bin/ffprobe") else None)
CONSENT = {"patient": "written consent on file", "staff": ["Dr Expert", "scrub nurse"],
           "recorded_by": "test"}


# -- helpers ----------------------------------------------------------------------

def session_info(server: Server) -> SessionInfo:
    session = server.session()
    return SessionInfo(session_id=session.id, theatre=session.theatre.id, title=session.title,
                       expert="Dr Expert", procedure=session.procedure)


async def wait_feeds(server: Server, *feed_ids: str) -> None:
    session = server.session()

    def flowing() -> str:
        missing = [f for f in feed_ids if f not in session.feeds
                   or session.feeds[f].frames_received == 0]
        return f"no frames yet on {missing}" if missing else ""

    await wait_for(flowing, timeout=15)


def decode_video(path: Path) -> list[tuple[float, int | None, tuple[int, int]]]:
    """(file time, frame counter, size) of every frame of a part."""
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            counter = framecode.read(frame.to_ndarray(format="bgr24"))
            out.append((float(frame.time or 0.0), counter, (frame.width, frame.height)))
    return out


def decode_audio(path: Path) -> tuple[float, np.ndarray]:
    """(file time of the first sample, mono float samples at 48 kHz)."""
    chunks = []
    first: float | None = None
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            if first is None:
                first = float(frame.time or 0.0)
            chunks.append(frame.to_ndarray().reshape(-1, frame.samples)[0])
    return first or 0.0, np.concatenate(chunks) if chunks else np.zeros(0)


def ffprobe(path: Path) -> dict[str, Any]:
    assert FFPROBE is not None
    result = subprocess.run(
        [FFPROBE, "-v", "error", "-count_frames", "-show_entries",
         "stream=codec_name,width,height,nb_read_frames:format=duration", "-of", "json",
         str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr
    return dict(json.loads(result.stdout))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def feed_entry(manifest: dict[str, Any], feed_id: str) -> dict[str, Any]:
    entries = [f for f in manifest["feeds"] if f["id"] == feed_id]
    assert entries, f"{feed_id} not in manifest: {[f['id'] for f in manifest['feeds']]}"
    return dict(entries[0])


def check_parts_listed(directory: Path, manifest: dict[str, Any]) -> None:
    """Every part file is in the manifest, with its size and sha256."""
    listed = {p["file"]: p for f in manifest["feeds"] for p in f["parts"]}
    on_disk = {p.name for p in directory.iterdir()
               if p.name not in ("manifest.json", "events.jsonl")}
    assert on_disk == set(listed), (on_disk, set(listed))
    for name, part in listed.items():
        assert part["complete"], part
        assert part["bytes"] == (directory / name).stat().st_size
        assert part["sha256"] == sha256(directory / name)


def recorded_counters(directory: Path, parts: list[dict[str, Any]]
                      ) -> list[tuple[float, int, dict[str, Any]]]:
    """(Session clock time, counter, part) of every readable recorded frame."""
    out = []
    for part in parts:
        frames = decode_video(directory / part["file"])
        assert len(frames) == part["frames"], (part, len(frames))
        for t, counter, _ in frames:
            if counter is not None:
                out.append((part["start"] + t, counter, part))
    return out


class CounterWatcher:
    """Decodes a viewer's track and keeps the counters it reads."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.counters: list[int] = []
        self.task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                counter = framecode.read(frame.to_ndarray(format="bgr24"))
                if counter is not None:
                    self.counters.append(counter)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# -- (a) two cameras and a microphone, in sync ---------------------------------------

async def publish_h264(http: aiohttp.ClientSession, server: Server, slot: str,
                       camera: MediaStreamTrack) -> tuple[RTCPeerConnection, str]:
    """whip_publish, with the video offered as H.264 only."""
    pc = client_pc()
    transceiver = pc.addTransceiver(camera, direction="sendonly")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                     if c.mimeType == "video/H264"])
    sdp = await offer_sdp(pc)
    async with http.post(f"{server.base_url}/whip/or1-live/{slot}", data=sdp,
                         headers={"Authorization": f"Bearer {server.token(Role.EXPERT)}",
                                  "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        assert response.status == 201, body
        location = response.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc, f"{server.base_url}{location}"


async def test_recording_two_cameras_and_tone_plays_in_sync(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        tmp_path: Path) -> None:
    room = SyntheticTheatreCamera(W, H, FPS, label="room")
    endoscope = SyntheticTheatreCamera(W, H, FPS, label="endoscope")
    tone = SyntheticTone()
    # Both cameras start together: publish concurrently.
    (pc1, _), (pc2, _) = await asyncio.gather(
        whip_publish(http, server, "room", [room, tone]),
        publish_h264(http, server, "endoscope", endoscope))
    peers += [pc1, pc2]
    await wait_feeds(server, "room.video", "room.audio", "endoscope.video")

    errors: list[RecordingError] = []
    recording = Recording(tmp_path, session_info(server), CONSENT, errors.append)
    await recording.start()
    assert recording.state == "recording"
    unfollow = recording.follow(server.session())
    assert set(recording.writers) == {"room.video", "room.audio", "endoscope.video"}
    recording.add_event({"type": "annotation", "text": "calot's triangle", "by": "Dr Expert"})
    await asyncio.sleep(6)
    unfollow()
    manifest = await recording.stop()
    assert not errors
    assert recording.state == "stopped"

    directory = tmp_path / recording.id
    on_disk = json.loads((directory / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["session"] == {"session_id": "or1-live", "theatre": "or1",
                                   "title": "Cholecystectomy", "expert": "Dr Expert",
                                   "procedure": ""}
    assert manifest["consent"] == CONSENT
    assert manifest["state"] == "stopped"
    assert len(recording.id) >= 24
    check_parts_listed(directory, manifest)
    wall = manifest["duration"]
    assert abs(wall - 6) < 0.5, wall

    latencies: dict[str, list[float]] = {}
    # stamp time (wall) -> recorded time (Session clock), per camera
    timings: dict[str, list[tuple[float, float]]] = {}
    started = manifest["clock_zero_unix"]
    for feed_id, camera, codec in (("room.video", room, "vp8"),
                                   ("endoscope.video", endoscope, "h264")):
        entry = feed_entry(manifest, feed_id)
        assert entry["codec"].lower() == f"video/{codec}"
        assert all(p["file"].endswith(".webm" if codec == "vp8" else ".mp4")
                   for p in entry["parts"])
        parts = entry["parts"]
        assert parts and parts[0]["reason"] == "start"
        assert all(p["width"] == W and p["height"] == H for p in parts)
        # The recorded duration covers the wall time (less the wait for a key frame).
        covered = sum(p["duration"] for p in parts)
        assert abs(covered - wall) < 1.0, (covered, wall)
        assert parts[0]["start"] < 1.0
        recorded = recorded_counters(directory, parts)
        counters = [c for _, c, _ in recorded]
        # Every frame from the first key frame on, in order: the recorder drops none.
        assert len(counters) == sum(p["frames"] for p in parts), "unreadable frame counters"
        assert counters == list(range(counters[0], counters[0] + len(counters))), counters
        # Where each frame sits on the Session clock vs when the camera made it.
        timings[feed_id] = [(camera.last_stamp_times[c], t) for t, c, _ in recorded
                            if c in camera.last_stamp_times]
        assert len(timings[feed_id]) >= len(counters) * 0.9
        latencies[feed_id] = [t - (stamp - started) for stamp, t in timings[feed_id]]
        # A frame is placed where the camera made it (stamps are late when the
        # publisher's loop stalls, hence the percentiles).
        deciles = statistics.quantiles(latencies[feed_id], n=10)
        assert -0.1 < deciles[0] and deciles[-1] < 0.3, latencies[feed_id]
        if FFPROBE:
            for part in parts:
                probe = ffprobe(directory / part["file"])
                stream = probe["streams"][0]
                assert stream["codec_name"] == codec
                assert (stream["width"], stream["height"]) == (W, H)
                assert int(stream["nb_read_frames"]) == part["frames"]
                assert abs(float(probe["format"]["duration"]) - part["duration"]) < 0.15
    # The two cameras stay in sync on the Session clock: frames the cameras made
    # at the same moment (stamp times within half a frame) are recorded at the
    # same Session time, within 100 ms.
    endoscope_stamps = np.array([stamp for stamp, _ in timings["endoscope.video"]])
    skews = []
    for stamp, t in timings["room.video"]:
        nearest = int(np.argmin(np.abs(endoscope_stamps - stamp)))
        other_stamp, other_t = timings["endoscope.video"][nearest]
        if abs(other_stamp - stamp) < 0.5 / FPS:
            skews.append(abs((t - other_t) - (stamp - other_stamp)))
    assert len(skews) >= 30, skews
    assert statistics.median(skews) <= 0.1 and sum(s <= 0.1 for s in skews) >= 0.9 * len(
        skews), skews

    # Audio: one Opus part; its beeps (on whole wall-clock seconds) line up with video.
    audio = feed_entry(manifest, "room.audio")
    assert audio["codec"] == "audio/opus"
    assert abs(sum(p["duration"] for p in audio["parts"]) - wall) < 1.0
    beep_latencies = []
    for part in audio["parts"]:
        first, samples = decode_audio(directory / part["file"])
        assert abs(len(samples) / 48000 - part["duration"]) < 0.1
        loud = np.flatnonzero(np.abs(samples) > 0.3)
        onsets = [i for i, gap in zip(loud, np.diff(loud, prepend=-48000), strict=True)
                  if gap > 4800]
        for onset in onsets:
            at = part["start"] + first + onset / 48000
            wall_at = started + at
            beep_latencies.append(wall_at - round(wall_at))
        if FFPROBE:
            probe = ffprobe(directory / part["file"])
            assert probe["streams"][0]["codec_name"] == "opus"
    assert len(beep_latencies) >= 4, beep_latencies
    av_skew = statistics.median(beep_latencies) - statistics.median(latencies["room.video"])
    assert abs(av_skew) <= 0.1, (beep_latencies, av_skew)

    events = [json.loads(line) for line in
              (directory / "events.jsonl").read_text().splitlines()]
    types_ = [e["type"] for e in events]
    assert types_[0] == "recording_started" and types_[-1] == "recording_stopped"
    assert "annotation" in types_ and types_.count("feed_attached") == 3
    assert all(isinstance(e["t"], float | int) for e in events)
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)


# -- (c) an unwritable directory stops the recording, not the live path ----------

async def test_unwritable_directory_reports_not_writable_and_live_flows_on(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        tmp_path: Path) -> None:
    camera = SyntheticTheatreCamera(W, H, FPS, label="room")
    publisher, _ = await whip_publish(http, server, "room", [camera, SyntheticTone()])
    peers.append(publisher)
    await wait_feeds(server, "room.video", "room.audio")
    viewer, _, track = await whep_subscribe(http, server, "room.video", "video")
    peers.append(viewer)
    watcher = CounterWatcher(await asyncio.wait_for(track, 10))

    # 1. The root is not a directory at all: start() reports it.
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    errors: list[RecordingError] = []
    broken = Recording(not_a_dir / "recordings", session_info(server), CONSENT, errors.append)
    await broken.start()
    assert broken.state == "failed"
    assert [e.code for e in errors] == ["not_writable"]
    assert str(tmp_path) not in errors[0].message
    assert broken.attach(server.session().feeds["room.video"]) is None
    await broken.stop()

    # 2. The directory goes away while recording: the next part cannot be opened.
    errors.clear()
    recording = Recording(tmp_path / "ok", session_info(server), CONSENT, errors.append,
                          options=WriterOptions(part_max_s=1.0))
    await recording.start()
    recording.follow(server.session())
    await asyncio.sleep(1.5)
    directory = recording.directory
    moved = tmp_path / "moved"
    directory.rename(moved)
    directory.write_text("not a directory any more")
    await wait_for(lambda: "" if errors else "no error yet", timeout=10)
    assert errors[0].code == "not_writable"
    assert recording.state == "failed"
    assert len(errors) == 1  # reported once for the recording
    feed = server.session().feeds["room.video"]
    # The recorder let go of the Feed; the viewer is still served.
    assert not [d for d in feed.downstreams if d.downstream_id.startswith("recorder:")]
    await recording.stop()
    # What was finished before stays listed in the last manifest written.
    manifest = json.loads((moved / "manifest.json").read_text())
    assert manifest["feeds"] and manifest["feeds"][0]["parts"]

    # The live path never noticed.
    before = len(watcher.counters)
    await wait_for(lambda: "" if len(watcher.counters) >= before + FPS
                   else f"{len(watcher.counters) - before} frames since the error")
    await watcher.stop()
    assert feed.state == "live"
    steps = [b - a for a, b in itertools.pairwise(watcher.counters)]
    assert steps.count(1) >= len(steps) * 0.9, steps


# -- (d) new parts: resolution change, Feed drop and return -------------------------

class SwitchingCamera(SyntheticTheatreCamera):
    """Changes its picture size after ``switch_after`` frames."""

    def __init__(self, switch_after: int, size: tuple[int, int]) -> None:
        super().__init__(W, H, FPS, label="room")
        self.switch_after = switch_after
        self.size = size

    async def recv(self) -> VideoFrame:
        if self.frames_sent == self.switch_after:
            self.renderer = TheatreRenderer(*self.size, label="room")
        return await super().recv()


async def test_resolution_change_and_feed_return_start_new_parts(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        tmp_path: Path) -> None:
    first = SwitchingCamera(switch_after=int(FPS * 2.5), size=(256, 144))
    publisher, _ = await whip_publish(http, server, "room", [first])
    await wait_feeds(server, "room.video")
    session = server.session()
    feed = session.feeds["room.video"]
    errors: list[RecordingError] = []
    # The Session clock started 100 s before the recording (e.g. the Session's own).
    recording = Recording(tmp_path, session_info(server), CONSENT, errors.append,
                          origin=time.monotonic() - 100)
    await recording.start()
    recording.follow(session)
    await wait_for(lambda: "" if first.frames_sent > FPS * 4 else "camera not switched yet")

    # The publisher drops without a goodbye and comes back 2 s later.
    await publisher.close()
    await wait_for(lambda: "" if feed.state == "down" else f"feed is {feed.state}")
    dropped_at = recording.session_time()
    await asyncio.sleep(1.5)
    second = SyntheticTheatreCamera(W, H, FPS, label="room")
    second.frames_sent = 1000  # its counters are far from the first camera's
    publisher2, _ = await whip_publish(http, server, "room", [second])
    peers.append(publisher2)
    await wait_for(lambda: "" if feed.state == "live" else f"feed is {feed.state}")
    returned_at = recording.session_time()
    await asyncio.sleep(2.5)
    manifest = await recording.stop()
    assert not errors

    directory = recording.directory
    check_parts_listed(directory, manifest)
    parts = feed_entry(manifest, "room.video")["parts"]
    assert [p["reason"] for p in parts][:2] == ["start", "resolution"], parts
    # Back within gap_s..idle_close_s: "gap"; later than that the part closed idle.
    assert len(parts) == 3 and parts[2]["reason"] in ("gap", "resume"), parts
    assert [(p["width"], p["height"]) for p in parts] == [(W, H), (256, 144), (W, H)]
    assert parts[0]["ended_by"] == "resolution"
    assert parts[1]["ended_by"] in ("gap", "idle")
    for part, size in zip(parts, [(W, H), (256, 144), (W, H)], strict=True):
        frames = decode_video(directory / part["file"])
        assert {s for _, _, s in frames} == {size}
        counters = [c for _, c, _ in frames]
        assert None not in counters
        assert counters == list(range(counters[0], counters[0] + len(counters)))
    # Each part sits where it happened: the gap shows, nothing overlaps.
    assert parts[0]["start"] + parts[0]["duration"] <= parts[1]["start"] + 0.05
    assert parts[1]["start"] + parts[1]["duration"] <= dropped_at + 0.15
    assert returned_at - 0.1 <= parts[2]["start"] <= returned_at + 1.5
    assert 100 <= manifest["started_t"] < 101 and 100 < parts[0]["start"] < 102
    events = [json.loads(line) for line in
              (directory / "events.jsonl").read_text().splitlines()]
    assert [e["state"] for e in events if e["type"] == "feed_state"] == ["down", "live"]
    assert decode_video(directory / parts[2]["file"])[0][1] >= 1000


# -- units: codec headers, disk full, queue overflow -----------------------------

def _encode(codec: str, sizes: list[tuple[int, int]], per_size: int = 8,
            options: dict[str, str] | None = None) -> list[tuple[bytes, bool]]:
    out = []
    for width, height in sizes:
        renderer = TheatreRenderer(width, height)
        context = av.CodecContext.create(codec, "w")
        context.width, context.height, context.pix_fmt = width, height, "yuv420p"
        context.time_base = fractions.Fraction(1, 90000)
        context.gop_size = 4
        if options:
            context.options = options
        for i in range(per_size):
            frame = VideoFrame.from_ndarray(renderer.render(i), format="bgr24").reformat(
                format="yuv420p")
            frame.pts = i * 6000
            for packet in context.encode(frame):
                out.append((bytes(packet), bool(packet.is_keyframe)))
    return out


def test_picture_size_is_read_from_vp8_and_h264_headers() -> None:
    sizes = [(320, 180), (1280, 720), (330, 186)]
    vp8 = _encode("libvpx", sizes, per_size=1)
    assert [vp8_frame_size(data) for data, _ in vp8] == sizes
    h264 = _encode("libx264", sizes, per_size=1,
                   options={"tune": "zerolatency", "preset": "ultrafast"})
    for (data, _), size in zip(h264, sizes, strict=True):
        sps = [u for u in h264_nal_units(data) if h264_nal_type(u) == 7]
        assert h264_sps_frame_size(sps[0]) == size
    assert vp8_frame_size(vp8[0][0][:5]) is None
    assert opus_packet_samples(bytes([0xFC, 0])) == 960  # CELT 20 ms, one frame
    assert opus_packet_samples(bytes([0x4B, 0x83])) == 3 * 960  # SILK 20 ms x 3 (code 3)


async def test_h264_resolution_change_and_disk_full(tmp_path: Path) -> None:
    frames = _encode("libx264", [(320, 180), (256, 144)],
                     options={"tune": "zerolatency", "preset": "ultrafast",
                              "profile": "baseline"})
    errors: list[RecordingError] = []
    recording = Recording(tmp_path, SessionInfo("s", "or1", "t", "e"), {}, errors.append)
    await recording.start()
    feed = FakeFeed("endoscope.video", "video", "video/H264", 90000)
    recording.attach(feed)
    t0 = time.monotonic()
    for i, (data, key) in enumerate(frames):
        feed.emit(data, 1000 + i * 6000, key, t0 + i / 15)
    manifest = await recording.stop()
    assert not errors
    parts = feed_entry(manifest, "endoscope.video")["parts"]
    assert [(p["width"], p["height"], p["reason"]) for p in parts] == [
        (320, 180, "start"), (256, 144, "resolution")]
    check_parts_listed(recording.directory, manifest)
    for part, size in zip(parts, [(320, 180), (256, 144)], strict=True):
        assert part["file"].endswith(".mp4")
        decoded = decode_video(recording.directory / part["file"])
        assert len(decoded) == 8 and {s for _, _, s in decoded} == {size}
        assert [c for _, c, _ in decoded] == list(range(8))

    # A full disk: the part's file is /dev/full.
    errors.clear()
    full = Recording(tmp_path, SessionInfo("s", "or1", "t", "e"), {}, errors.append)
    await full.start()
    (full.directory / "room.video-000.webm").symlink_to("/dev/full")
    vp8 = FakeFeed("room.video", "video", "video/VP8", 90000)
    writer = full.attach(vp8)
    assert isinstance(writer, FeedWriter)
    for i, (data, key) in enumerate(_encode("libvpx", [(320, 180)], per_size=30)):
        vp8.emit(data, i * 6000, key, time.monotonic())
    await wait_for(lambda: "" if errors else "no error yet")
    assert [e.code for e in errors] == ["disk_full"]
    assert errors[0].feed_id == "room.video" and writer.state == "failed"
    assert full.state == "failed" and not vp8.downstreams
    await full.stop()


async def test_parts_rotate_on_key_frames_and_tile_the_session_clock(tmp_path: Path) -> None:
    frames = _encode("libvpx", [(320, 180)], per_size=40)  # a key frame every 4 frames
    recording = Recording(tmp_path, SessionInfo("s", "or1", "t", "e"), {},
                          options=WriterOptions(part_max_s=0.9, idle_close_s=0.3))
    await recording.start()
    feed = FakeFeed("room.video", "video", "video/VP8", 90000)
    recording.attach(feed)
    origin = recording.origin
    assert origin is not None
    rng = np.random.default_rng(5)
    # Captured at 2.0 s + i/15 on the Session clock; arrivals late by 0-30 ms of
    # jitter, and the first key frame (big) 60 ms late.
    for i, (data, key) in enumerate(frames[:30]):
        delay = 0.06 if i == 0 else float(rng.uniform(0, 0.03))
        feed.emit(data, 777 + i * 6000, key, origin + 2.0 + i / 15 + delay)
    await asyncio.sleep(0.6)  # the Feed pauses longer than idle_close_s, then resumes
    for i, (data, key) in enumerate(frames[30:], start=30):
        feed.emit(data, 777 + i * 6000, key, origin + 10.0 + (i - 30) / 15)
    manifest = await recording.stop()
    parts = feed_entry(manifest, "room.video")["parts"]
    # Rotation waits for the first key frame after 0.9 s (frame 16); the pause
    # closes the second part; the third starts at the next key frame (frame 32).
    assert [(p["reason"], p["ended_by"], p["frames"]) for p in parts] == [
        ("start", "rotation", 16), ("rotation", "idle", 14), ("resume", "stop", 8)], parts
    # Jitter does not move a part: it starts where its first frame was captured.
    assert abs(parts[0]["start"] - 2.0) < 0.005, parts[0]
    # A rotated part starts where the previous one ended.
    assert abs(parts[0]["start"] + parts[0]["duration"] - parts[1]["start"]) < 0.005
    assert abs(parts[2]["start"] - (10.0 + 2 / 15)) < 0.005
    check_parts_listed(recording.directory, manifest)


async def test_a_slow_disk_drops_frames_not_the_loop(tmp_path: Path) -> None:
    frames = _encode("libvpx", [(320, 180)], per_size=40)
    recording = Recording(tmp_path, SessionInfo("s", "or1", "t", "e"), {},
                          options=WriterOptions(queue_frames=4, fsync_s=0))
    await recording.start()
    feed = FakeFeed("room.video", "video", "video/VP8", 90000)
    writer = recording.attach(feed)
    assert writer is not None
    # A disk that stalls: the writer thread waits on the gate for every frame.
    gate = threading.Event()
    handle = writer._handle

    def slow_handle(*args: Any) -> None:
        gate.wait()
        handle(*args)

    writer._handle = slow_handle  # type: ignore[method-assign,assignment]
    t0 = time.monotonic()
    started = time.perf_counter()
    for i, (data, key) in enumerate(frames):
        feed.emit(data, i * 6000, key, t0 + i / 15)
    assert time.perf_counter() - started < 0.05  # push() never waits for the writer
    gate.set()
    manifest = await recording.stop()
    stats = feed_entry(manifest, "room.video")["stats"]
    assert stats["frames_in"] == 40
    assert stats["dropped_queue_full"] >= 30
    # Every frame is accounted for. Which of the few queued behind the stall are
    # written depends on where the writer thread was when the disk stalled: a
    # delta frame after a cut waits for a key frame, and the first part holds
    # frames to place them against consent.
    other = (stats["skipped_before_keyframe"] + stats["skipped_before_consent"]
             + stats["dropped_out_of_order"])
    assert stats["frames_written"] >= 1 and other <= 4, stats
    assert stats["frames_written"] + stats["dropped_queue_full"] + other == 40, stats
    # What was written still decodes: drops wait for the next key frame.
    for part in feed_entry(manifest, "room.video")["parts"]:
        decoded = decode_video(recording.directory / part["file"])
        assert len(decoded) == part["frames"]
    assert feed.keyframe_requests >= 1


async def test_repair_leaves_alone_a_recording_being_written(tmp_path: Path) -> None:
    """A running Recording holds its lock: repair (another Node starting on the
    same disk, say) does not touch it; once it stops, there is nothing to do.
    A crashed one with a torn last event line gets the line cut."""
    recording = Recording(tmp_path, SessionInfo("s", "or1", "t", "e"), {})
    await recording.start()
    feed = FakeFeed("room.video", "video", "video/VP8", 90000)
    writer = recording.attach(feed)
    assert writer is not None
    t0 = time.monotonic()
    for i, (data, key) in enumerate(_encode("libvpx", [(320, 180)], per_size=20)):
        feed.emit(data, i * 6000, key, t0 + i / 15)
    # Every frame accounted for (written, or dropped: the 20 arrive at once and
    # a loaded machine's writer may not keep up, CI saw 16 written) and the
    # manifest on disk saying so.
    def settled() -> str:
        on_disk = json.loads((recording.directory / "manifest.json").read_text())
        stats = writer.stats
        accounted = (stats.frames_written + stats.dropped_queue_full
                     + stats.dropped_out_of_order + stats.skipped_before_keyframe)
        if accounted != 20 or not on_disk["feeds"] or not on_disk["feeds"][0]["parts"]:
            return f"{stats.describe()}"
        return "manifest pending" if recording._manifest_pending else ""

    await wait_for(settled)
    # What an interrupted write leaves, under a name the Recording's own
    # manifest writes never use: one of them may still come (a part's figures)
    # and would rename ".manifest.json.tmp" away (CI, under load).
    stray = recording.directory / ".manifest.json.4242-0badf00d.tmp"
    stray.write_bytes(b"")
    with pytest.raises(RecordingBusy):
        await asyncio.to_thread(repair, recording.directory)
    assert stray.exists()  # not touched
    manifest = await recording.stop()
    assert await asyncio.to_thread(repair, recording.directory) is None
    assert not stray.exists()
    assert json.loads((recording.directory / "manifest.json").read_text()) == json.loads(
        json.dumps(manifest))

    # As a crash leaves it: state "recording", the part unfinished, a torn line.
    crashed = {**manifest, "state": "recording", "ended_t": None, "duration": None}
    part = crashed["feeds"][0]["parts"][0]
    crashed["feeds"][0]["parts"][0] = {**part, "complete": False, "sha256": None}
    (recording.directory / "manifest.json").write_text(json.dumps(crashed))
    events = recording.directory / "events.jsonl"
    events.write_text(events.read_text() + '{"t": 1.0, "type": "interac')
    report = await asyncio.to_thread(repair, recording.directory)
    assert report is not None and report.state == "interrupted"
    assert [p["file"] for p in report.parts] == [part["file"]]
    assert report.parts[0]["frames"] == part["frames"] == writer.stats.frames_written > 0
    lines = (recording.directory / "events.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert json.loads(lines[-1])["type"] == "recording_interrupted"
