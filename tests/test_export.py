"""Exports of a Recording: one MP4 of a Feed with its sound and the drawings and
step titles burned in, a contact sheet of the steps, the thumbnail; and the
replay rules they share with the player. Every export is on the recording's
own clock: 0 is when it started (consent)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from recorder.export import ExportError, clock_label, contact_sheet, export_feed, make_thumbnail
from recorder.replay import annotations_at, marks, player_events, step_at
from server import framecode
from server.cli import main as scrubin

from .recording_helpers import FPS, H, W, build_recording, circle, interaction, mark

FFPROBE = shutil.which("ffprobe")

START_T = 1.0
GREEN_BGR = (88, 209, 48)  # #30d158
#: The rightmost point of the circle (centre 0.5, 0.45, radius 0.15), in pixels.
ON_CIRCLE = (round(0.65 * W), round(0.45 * H))


def is_green(pixel: np.ndarray) -> bool:
    b, g, r = (int(v) for v in pixel)
    return g > 150 and r < 120 and b < 150


def decoded(path: Path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as container:
        return [(float(f.time or 0.0), f.to_ndarray(format="bgr24"))
                for f in container.decode(video=0)]


def near(image: np.ndarray, point: tuple[int, int], span: int = 3) -> list[np.ndarray]:
    x, y = point
    return [image[j, i] for j in range(y - span, y + span + 1)
            for i in range(x - span, x + span + 1)]


def decoded_audio(path: Path) -> tuple[float, np.ndarray]:
    """(time of the first sample, mono samples at 48 kHz) of an MP4's sound."""
    chunks, first = [], None
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            if first is None:
                first = float(frame.time or 0.0)
            chunks.append(frame.to_ndarray().reshape(-1, frame.samples).mean(axis=0))
    return first or 0.0, np.concatenate(chunks)


def onsets(samples: np.ndarray, frequency: float, rate: int = 48000) -> list[float]:
    """Where beeps of ``frequency`` start (seconds from the first sample): the
    tone's energy in 5 ms windows, against the other beep's."""
    window = rate // 200
    n = samples.size // window
    blocks = samples[:n * window].reshape(n, window)
    phase = np.exp(-2j * np.pi * frequency * np.arange(window) / rate)
    energy = np.abs(blocks @ phase) / window
    loud = energy > 0.1
    return [i * window / rate for i in range(1, n) if loud[i] and not loud[i - 1]]


def probe(path: Path) -> dict[str, Any]:
    assert FFPROBE is not None
    result = subprocess.run([FFPROBE, "-v", "error", "-show_entries",
                             "stream=codec_name,codec_type,sample_rate:format=duration",
                             "-of", "json", str(path)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return dict(json.loads(result.stdout))


async def test_export_burns_in_drawings_and_steps(tmp_path: Path) -> None:
    events = [mark(1.5, "Port placement"), circle(2.0, fade_s=2.0),
              mark(3.5, "Exposure", mark_id="m2")]
    recording = await build_recording(tmp_path / "rec", seconds=6, start_t=START_T,
                                      events=events)
    manifest = recording.manifest()
    assert manifest["started_t"] == 0.0 and manifest["duration"] >= 7.25
    out = tmp_path / "room.mp4"
    progress: list[tuple[float, float]] = []
    result = export_feed(recording.directory, "room.video", out,
                         progress=lambda done, total: progress.append((done, total)))
    assert result.frames == 6 * FPS and (result.width, result.height) == (W, H)
    assert result.start == 0.0 and result.duration == manifest["duration"]
    assert result.first_frame == START_T and not result.video_copied and result.audio == ()
    assert progress[-1] == (result.duration, result.duration)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(progress))

    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert not container.streams.audio  # this recording has no sound
        assert container.duration is not None
        duration = container.duration / 1e6
    assert abs(duration - (START_T + 6.0)) < 0.1, duration
    frames = decoded(out)
    # Time 0 is the recording's start: "no picture yet" until the camera's first frame.
    assert len(frames) == 6 * FPS + 1
    assert frames[0][0] == 0.0 and framecode.read(frames[0][1]) is None
    assert frames[0][1][: H // 2].max() < 30  # black, a caption at the bottom
    frames = frames[1:]
    # Each exported frame is the recorded frame of its moment (counter i at 1 + i/FPS).
    for index in (0, 29, 89):
        t, image = frames[index]
        assert abs(t - (START_T + index / FPS)) < 0.01
        assert framecode.read(image) == index

    def at(t: float) -> np.ndarray:
        return frames[int((t - START_T) * FPS + 1e-6)][1]

    # The circle: absent before 2.0, drawn from 2.0, faded out after 4.0.
    assert not any(is_green(p) for p in near(at(1.8), ON_CIRCLE))
    assert sum(is_green(p) for p in near(at(2.5), ON_CIRCLE)) >= 5
    assert sum(is_green(p) for p in near(at(2.9), ON_CIRCLE)) >= 5
    assert not any(is_green(p) for p in near(at(4.3), ON_CIRCLE))
    # Not at the centre of the circle (it is a ring).
    assert not any(is_green(p) for p in near(at(2.5), (round(0.5 * W), round(0.45 * H))))

    # The step title: a dark band with white text across the top, from 1.5 s.
    def band(image: np.ndarray) -> tuple[float, int]:
        top = image[:16, : W // 2]
        return float(top.mean()), int((top.min(axis=2) > 200).sum())

    before, during = band(at(1.2)), band(at(2.5))
    assert during[0] < before[0] and during[1] > 10, (before, during)
    assert band(at(4.0))[1] > 10

    # Without burn-in: the pictures as recorded.
    plain = tmp_path / "plain.mp4"
    export_feed(recording.directory, "room.video", plain, burn=False)
    assert not any(is_green(p) for p in near(decoded(plain)[int(1.5 * FPS)][1], ON_CIRCLE))


async def test_export_carries_narration_and_trainee_microphone_in_sync(tmp_path: Path) -> None:
    """Two audio Feeds (beeps at known Session times, 1 kHz and 2 kHz), an H.264
    camera; consent at 0.5 s. The MP4's clock is the recording's: a beep at
    Session time b is heard at b - 0.5, the frame of Session time t is shown at
    t - 0.5, and both Feeds are heard."""
    narration, trainee = (1.5, 3.5, 5.5), (2.5, 4.5)
    recording = await build_recording(
        tmp_path / "rec", seconds=6, start_t=START_T, consent_t=0.5,
        feeds=(("endoscope.video", 0),), h264=("endoscope.video",),
        audio=(("room.audio", narration, 1000.0), ("trainee-mic.audio", trainee, 2000.0)))
    manifest = recording.manifest()
    assert manifest["started_t"] == 0.5
    assert {f["id"] for f in manifest["feeds"]} == {"endoscope.video", "room.audio",
                                                   "trainee-mic.audio"}
    for copy in (False, True):  # burned in (H.264 again), or the H.264 as recorded
        out = tmp_path / f"case-{copy}.mp4"
        result = export_feed(recording.directory, "endoscope.video", out, burn=not copy)
        assert result.video_copied is copy
        assert set(result.audio) == {"room.audio", "trainee-mic.audio"}
        if FFPROBE:
            info = probe(out)
            kinds = {s["codec_type"]: s for s in info["streams"]}
            assert kinds["video"]["codec_name"] == "h264"
            assert kinds["audio"]["codec_name"] == "aac"
            assert kinds["audio"]["sample_rate"] == "48000"
        first, samples = decoded_audio(out)
        assert abs(first) < 0.03
        heard = {f: [round(first + o, 3) for o in onsets(samples, f)] for f in (1000, 2000)}
        # Each beep where it was made, on the recording's clock (within 10 ms).
        for frequency, beeps in ((1000, narration), (2000, trainee)):
            assert len(heard[frequency]) == len(beeps), heard
            for at, beep in zip(heard[frequency], beeps, strict=True):
                assert abs(at - (beep - 0.5)) <= 0.01, (frequency, heard)
        # The picture of the same moments: the frame shown at export time x is the
        # one captured at Session time x + 0.5.
        frames = [(t, framecode.read(image)) for t, image in decoded(out)]
        pictures = [(t, c) for t, c in frames if c is not None]
        assert len(pictures) == 6 * FPS
        for t, counter in pictures[::10]:
            assert abs(t + 0.5 - (START_T + counter / FPS)) < 0.01, (t, counter)
        assert abs(pictures[0][0] - (START_T - 0.5)) < 0.01

    # Only the narration; or no sound at all.
    only = tmp_path / "narration.mp4"
    assert export_feed(recording.directory, "endoscope.video", only,
                       audio=["room.audio"]).audio == ("room.audio",)
    _, samples = decoded_audio(only)
    assert onsets(samples, 2000) == [] and len(onsets(samples, 1000)) == 3
    silent = tmp_path / "silent.mp4"
    export_feed(recording.directory, "endoscope.video", silent, audio=False)
    with av.open(str(silent)) as container:
        assert not container.streams.audio
    with pytest.raises(ExportError, match="not an audio Feed"):
        export_feed(recording.directory, "endoscope.video", tmp_path / "x.mp4",
                    audio=["endoscope.video"])
    assert not (tmp_path / "x.mp4").exists()


async def test_cli_export_contact_sheet_and_refusals(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Consent 20 s into the Session: captions are times since the recording started.
    events = [mark(21.5, "Port placement"), circle(22.0), mark(23.0, "Exposure", mark_id="m2"),
              mark(25.5, "Closure", mark_id="m3")]
    recording = await build_recording(tmp_path / "rec", seconds=5, start_t=21.0,
                                      consent_t=20.0, events=events,
                                      audio=(("room.audio", (22.0,), 1000.0),))
    directory = str(recording.directory)
    out, sheet = tmp_path / "out.mp4", tmp_path / "sheet.jpg"
    assert scrubin(["export", directory, "--feed", "room.video", "--out", str(out),
                    "--contact-sheet", str(sheet)]) == 0
    captured = capsys.readouterr()
    # A progress bar on the terminal (stderr), ending full.
    assert "export: 100.0%|" in captured.err and "██████████|" in captured.err
    assert recording.duration is not None and recording.duration > 6.25
    assert f"wrote {out}: {5 * FPS} frames, {recording.duration:.1f} s" in captured.out
    assert "sound: room.audio" in captured.out
    assert "3 pictures" in captured.out
    assert "  0:01 Port placement\n  0:03 Exposure\n  0:05 Closure" in captured.out
    image = cv2.imread(str(sheet))
    assert image is not None
    # Three tiles of 320 px side by side, each a picture and a caption.
    assert image.shape[1] == 3 * 320 + 4 * 6 and image.shape[0] > 180
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 5 * FPS + 1  # + "no picture yet"
        assert container.streams.audio[0].codec_context.name == "aac"
    tiles = contact_sheet(directory, tmp_path / "again.jpg")
    assert [(t.at, t.label) for t in tiles] == [
        (1.5, "0:01 Port placement"), (3.0, "0:03 Exposure"), (5.5, "0:05 Closure")]
    assert [clock_label(x) for x in (0, 59.999, 60, 3600 + 61.2)] == [
        "0:00", "0:59", "1:00", "1:01:01"]

    assert scrubin(["export", directory, "--feed", "room.audio", "--out", str(out)]) == 2
    assert "room.audio is audio; export a video Feed" in capsys.readouterr().err
    assert scrubin(["export", directory, "--feed", "endoscope.video", "--out", str(out)]) == 2
    assert "no Feed 'endoscope.video'" in capsys.readouterr().err
    assert scrubin(["export", directory]) == 2
    assert scrubin(["export", directory, "--out", str(out)]) == 2
    assert scrubin(["export", str(tmp_path), "--feed", "room.video", "--out", str(out)]) == 2
    assert "not a recording" in capsys.readouterr().err
    with pytest.raises(ExportError):
        export_feed(tmp_path, "room.video", tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


async def test_thumbnail_is_the_main_cameras_first_picture(tmp_path: Path) -> None:
    recording = await build_recording(tmp_path, seconds=1, thumbnail=False,
                                      feeds=(("endoscope.video", 500), ("room.video", 0)))
    path = make_thumbnail(recording.directory, ("room", "endoscope"))
    assert path is not None and path.name == "thumbnail.jpg"
    image = cv2.imread(str(path))
    assert image.shape[1] == 320
    assert framecode.read(image) == 0  # the room camera's first frame
    path = make_thumbnail(recording.directory, ("endoscope", "room"))
    assert path is not None and framecode.read(cv2.imread(str(path))) == 500


def test_replay_rules() -> None:
    a1 = circle(1.0, annotation_id="a1", fade_s=3.0)
    a2 = circle(2.0, annotation_id="a2", feed="endoscope.video", fade_s=3.0)
    pinned = circle(1.5, annotation_id="a3", fade_s=3.0)
    pinned["message"]["annotation"] = {**pinned["message"]["annotation"], "pinned": True,
                                       "expires_t": None}
    unpinned = interaction({"type": "annotation", "t": 6.0, "annotation": {
        **pinned["message"]["annotation"], "pinned": False, "expires_t": 9.0}})
    cleared = interaction({"type": "annotations_cleared", "t": 8.0, "feed": "room.video",
                           "by": None, "reason": "cleared"})
    raw = [{"t": 0.1, "type": "recording_started"}, mark(4.0, "Exposure"), cleared, unpinned,
           a2, pinned, a1, mark(0.5, "Port placement", mark_id="m0"),
           mark(5.0, "Look", kind="bookmark", mark_id="m5", current="Exposure"),
           {"t": 1.0, "type": "feed_attached", "feed": "room.video"}]
    events = player_events(raw)
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    assert {e["type"] for e in events} == {"recording_started", "mark", "annotation",
                                           "annotations_cleared"}

    def shown(feed: str, t: float) -> dict[str, float]:
        return {a["id"]: round(alpha, 2) for a, alpha in annotations_at(events, feed, t)}

    assert shown("room.video", 0.9) == {}
    assert shown("room.video", 1.2) == {"a1": 1.0}
    assert shown("room.video", 3.5) == {"a1": 0.5, "a3": 1.0}  # a1 fades over its last second
    assert shown("room.video", 4.5) == {"a3": 1.0}  # pinned stays
    assert shown("room.video", 7.0) == {"a3": 1.0}  # unpinned at 6: fades from there
    assert shown("room.video", 8.1) == {}  # cleared
    assert shown("endoscope.video", 2.5) == {"a2": 1.0}
    assert step_at(events, 0.4) is None
    assert step_at(events, 4.5) == "Exposure"
    assert step_at(events, 5.5) == "Exposure"  # a bookmark keeps the step
    assert [m["name"] for m in marks(events)] == ["Port placement", "Exposure", "Look"]
    assert [m["name"] for m in marks(events, "bookmark")] == ["Look"]
