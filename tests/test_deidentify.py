"""De-identified exports, offline: a Recording of a real photograph with a face
(scikit-image's astronaut) and a patient's name burned into a monitor; after
de-identification the face and the name are gone (measured), the rest of the
picture is as a plain re-encoding leaves it, the drawings' shapes stay without
their text, only the narration is heard, and the file carries no metadata.
Then the artefact on disk (pending review, interrupted, cancelled) and
``scrubin export --deidentify``."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from recorder import deidentified
from recorder.deidentify import (
    MASK_BGR,
    DeidentifyOptions,
    FaceTrack,
    Region,
    deidentify_feed,
    regions,
)
from recorder.export import ExportError, export_feed
from server.cli import main as scrubin
from server.config import ConfigError, load_config
from server.deidentified import options_from

from .deidentify_helpers import (
    CONFIG,
    FACE,
    FACE_AREA,
    MONITOR,
    MONITOR_REGION,
    NAME,
    ROI_REGION,
    box,
    decoded,
    difference,
    face_recording,
    outside,
    pixels,
    sharpness,
)
from .recording_helpers import H, W, build_recording, circle, interaction, mark
from .test_export import decoded_audio, is_green, near, onsets

FFPROBE = shutil.which("ffprobe")
NARRATION, TRAINEE = (1.0, 2.0), (1.5,)
SOUND = (("narration.audio", NARRATION, 1000.0), ("trainee-mic.audio", TRAINEE, 2000.0))


def options(**choices: Any) -> DeidentifyOptions:
    return options_from(load_config(None, env={}, deidentify=CONFIG).deidentify, **choices)


def plain(directory: Path, out: Path) -> list[tuple[float, np.ndarray]]:
    """The same camera re-encoded with nothing hidden: what re-encoding alone changes."""
    export_feed(directory, "room.video", out, burn=False, audio=False,
                picture=lambda image, t: None)
    return decoded(out)


def ffprobe(path: Path) -> dict[str, Any]:
    assert FFPROBE is not None
    return dict(json.loads(subprocess.run(
        [FFPROBE, "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=30, check=True).stdout))


def middle(frames: list[tuple[float, np.ndarray]]) -> np.ndarray:
    return frames[len(frames) // 2][1]


async def test_the_face_and_the_name_are_hidden_and_nothing_else_changes(tmp_path: Path) -> None:
    recording = await face_recording(tmp_path / "rec", audio=SOUND)
    out = tmp_path / "room.mp4"
    seen: list[tuple[float, float]] = []
    result = deidentify_feed(recording.directory, "room.video", out, options(),
                             progress=lambda done, total: seen.append((done, total)))
    # The face was found in every picture searched, and blurred in every frame.
    assert result.faces_searched and result.detections >= 6
    assert result.detections_with_faces == result.detections
    assert result.frames_blurred == result.frames == 30
    assert result.audio == () and not result.conservative
    with av.open(str(out)) as container:
        assert not container.streams.audio  # narration dropped, the rest never kept
    # Progress rose to the end (the face pass, then the encoding).
    assert seen and seen[-1][0] == pytest.approx(seen[-1][1])
    assert all(a[0] <= b[0] + 1e-9 for a, b in itertools.pairwise(seen))

    source = decoded(recording.directory / "room.video-000.webm")[15][1]
    hidden = middle(decoded(out))
    reencoded = middle(plain(recording.directory, tmp_path / "plain.mp4"))
    assert hidden.shape == source.shape == (360, 640, 3)
    # The face: far from the original, its detail gone (a plain re-encoding keeps it).
    assert difference(box(hidden, FACE), box(source, FACE)).mean() > 25
    assert sharpness(box(hidden, FACE)) < 0.05 * sharpness(box(source, FACE))
    assert sharpness(box(reencoded, FACE)) > 0.5 * sharpness(box(source, FACE))
    # The monitor: painted over, the white letters gone.
    monitor = box(hidden, MONITOR).astype(np.int16)
    assert box(source, MONITOR).max() > 200
    assert np.abs(monitor - np.array(MASK_BGR)).max() < 16
    # Everything else: changed no more than by re-encoding alone.
    rest = outside(source.shape, FACE_AREA, pixels(MONITOR_REGION, margin=8))
    assert rest.mean() > 0.7
    changed = difference(hidden, source)[rest]
    baseline = difference(reencoded, source)[rest]
    assert changed.mean() < 4 and changed.mean() < baseline.mean() + 0.5, (
        changed.mean(), baseline.mean())
    assert np.percentile(changed, 99.5) < np.percentile(baseline, 99.5) + 8


async def test_conservative_mode_blurs_all_but_the_regions_of_interest(tmp_path: Path) -> None:
    recording = await face_recording(tmp_path / "rec")
    out = tmp_path / "room.mp4"
    result = deidentify_feed(recording.directory, "room.video", out,
                             options(conservative=True))
    assert result.conservative
    source = decoded(recording.directory / "room.video-000.webm")[15][1]
    hidden = middle(decoded(out))
    reencoded = middle(plain(recording.directory, tmp_path / "plain.mp4"))
    roi = pixels(ROI_REGION)
    inside = ~outside(source.shape, roi)
    around = outside(source.shape, pixels(ROI_REGION, margin=4), pixels(MONITOR_REGION))
    # Outside the region of interest: the textured background is a blur.
    assert difference(hidden, source)[around].mean() > 20
    assert sharpness(box(hidden, (360, 140, 640, 180))) < 0.05 * sharpness(
        box(source, (360, 140, 640, 180)))
    # Inside it: as re-encoding leaves it.
    kept = difference(hidden, source)[inside]
    assert kept.mean() < difference(reencoded, source)[inside].mean() + 0.5
    # The face (outside the region) and the monitor are hidden all the same.
    assert sharpness(box(hidden, FACE)) < 0.05 * sharpness(box(source, FACE))
    assert np.abs(box(hidden, MONITOR).astype(np.int16) - np.array(MASK_BGR)).max() < 16


async def test_only_the_narration_is_heard_and_no_metadata_is_left(tmp_path: Path) -> None:
    recording = await face_recording(tmp_path / "rec", audio=SOUND, seconds=3.0)
    out = tmp_path / "room.mp4"
    result = deidentify_feed(recording.directory, "room.video", out, options(narration=True))
    assert result.audio == ("narration.audio",)
    first, samples = decoded_audio(out)
    heard = [round(first + t, 2) for t in onsets(samples, 1000)]
    assert heard == [round(b - recording.started_t, 2) for b in NARRATION]
    assert onsets(samples, 2000) == []  # the trainee's question is not in it

    # Nothing in the file but pictures and sound; a plain export has the usual tags.
    reference = tmp_path / "plain.mp4"
    export_feed(recording.directory, "room.video", reference, audio=["narration.audio"])
    assert b"Lavf" in reference.read_bytes() and b"x264" in reference.read_bytes()
    data = out.read_bytes()
    for marker in (b"Lavf", b"Lavc", b"x264", b"libx264", b"Cholecystectomy", b"Dr Expert",
                   recording.id.encode(), b"or1-live", NAME.encode()):
        assert marker not in data, marker
    with av.open(str(out)) as container:
        assert set(container.metadata) <= {"major_brand", "minor_version", "compatible_brands"}
        for stream in container.streams:
            assert set(stream.metadata) <= {"language", "handler_name", "vendor_id"}
            assert stream.metadata.get("handler_name") in (None, "VideoHandler",
                                                           "SoundHandler")
    if FFPROBE:
        info = ffprobe(out)
        assert set(info["format"].get("tags", {})) <= {"major_brand", "minor_version",
                                                       "compatible_brands"}
        assert "encoder" not in json.dumps(info)
        assert [s["codec_name"] for s in info["streams"]] == ["h264", "aac"]


async def test_drawn_shapes_are_burned_in_and_their_text_is_not(tmp_path: Path) -> None:
    label = {"id": "a2", "feed": "room.video", "t": 1.2, "expires_t": None, "pinned": True,
             "shape": {"kind": "label", "text": "Mrs Smith's bile duct", "color": "#30d158",
                       "points": [[0.1, 0.8]]}, "by": {"id": "e", "name": "Dr Expert"}}
    events = [circle(1.2), interaction({"type": "annotation", "annotation": label, "t": 1.2}),
              mark(1.1, "Dissection of Mrs Smith")]
    recording = await build_recording(tmp_path / "rec", seconds=2, start_t=1.0, events=events)
    out = tmp_path / "room.mp4"
    deidentify_feed(recording.directory, "room.video", out,
                    DeidentifyOptions(face_slots=()))
    source = decoded(recording.directory / "room.video-000.webm")
    t, hidden = decoded(out)[-5]
    original = source[-5][1]
    assert t > 0.5
    assert any(is_green(p) for p in near(hidden, (round(0.65 * W), round(0.45 * H))))
    # No label box at the bottom left, no step title band at the top.
    for area in ((0, round(0.7 * H), W // 2, H), (0, 0, W, 24)):
        assert difference(box(hidden, area), box(original, area)).mean() < 6, area
    # Without drawings: not even the circle.
    bare = tmp_path / "bare.mp4"
    deidentify_feed(recording.directory, "room.video", bare,
                    DeidentifyOptions(face_slots=(), drawings=False))
    assert not any(is_green(p) for p in near(decoded(bare)[-5][1],
                                             (round(0.65 * W), round(0.45 * H))))


def test_a_face_is_blurred_from_before_to_after_each_sighting() -> None:
    track = FaceTrack(hold_s=0.5)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25):
        track.add(t, [(0.1, 0.1, 0.2, 0.2)] if t in (0.5, 1.0) else [])
    assert track.detections == 6 and track.with_faces == 2
    assert track.at(-0.05) == [] and track.at(1.6) == []
    # Before it was first found, through the detection that missed it, after the last.
    assert all(track.at(t) for t in (0.05, 0.3, 0.6, 0.75, 1.25, 1.5))


def test_regions_are_fractions_inside_the_picture() -> None:
    assert Region.of([0.5, 0, 0.5, 0.25]).pixels(640, 360) == (320, 0, 640, 90)
    assert regions({"room": [[0, 0, 1, 1]]})["room"][0].pixels(3, 3) == (0, 0, 3, 3)
    for bad in ([0.5, 0, 0.6, 0.2], [0, 0, 0, 1], [-0.1, 0, 0.5, 0.5], [0, 0, 1], "abcd",
                [0, 0, "x", 1], [float("nan"), 0, 1, 1]):
        with pytest.raises(ValueError):
            Region.of(bad)  # type: ignore[arg-type]
    for section in ({"masks": {"room": [[0.5, 0, 0.6, 0.2]]}}, {"keep": {"room": [[0, 0]]}},
                    {"sign_off_roles": ["trainee"]}, {"sign_off_roles": []},
                    {"detect_hz": 0}, {"masks": "room"}):
        with pytest.raises(ConfigError):
            load_config(None, env={}, deidentify=section)
    config = load_config(None, env={"SCRUBIN_DEIDENTIFY_MASKS": json.dumps(
        {"endoscope": [[0, 0, 1, 0.1]]})})
    assert config.deidentify.masks == {"endoscope": [[0.0, 0.0, 1.0, 0.1]]}


async def test_the_artefact_is_pending_review_until_reviewed(tmp_path: Path) -> None:
    recording = await face_recording(tmp_path / "rec", seconds=1.0)
    by = {"id": "admin-1", "name": "Admin", "role": "admin"}
    record, claim = deidentified.create(recording.directory, options(), requested_by=by,
                                        via="test")
    directory = deidentified.export_directory(recording.directory, record["id"])
    assert record["state"] == "queued" and record["feeds"] == ["room.video"]
    assert deidentified.locked(directory)  # claimed from its creation
    assert deidentified.settle(directory)["state"] == "queued"
    seen: list[float] = []
    record = deidentified.make(recording.directory, claim, options(),
                               progress=lambda done, total: seen.append(done / total))
    assert not deidentified.locked(directory)
    assert record["state"] == "pending_review" and seen[-1] == pytest.approx(1.0)
    [item] = record["files"]
    assert item["file"] == "room.video.mp4" and item["faces"]["with_faces"] > 0
    assert deidentified.inventory(directory)[-1]["sha256"] == item["sha256"]
    assert json.loads((directory / "export.json").read_text())["state"] == "pending_review"
    signed = deidentified.review(directory, "signed_off", by=by, note="checked", playback="p")
    assert signed["state"] == "signed_off" and signed["review"]["by"] == by
    with pytest.raises(deidentified.ExportState):
        deidentified.review(directory, "rejected", by=by, note="too late")

    # A maker that died: queued or running, nobody holding the lock, is failed.
    lost, claim = deidentified.create(recording.directory, options(), requested_by=by,
                                      via="test")
    claim.release()
    lost_dir = deidentified.export_directory(recording.directory, lost["id"])
    assert deidentified.settle(lost_dir)["state"] == "failed"
    assert "interrupted" in deidentified.load(lost_dir)["error"]
    # Cancelled on the way: failed, no media file left.
    stopped, claim = deidentified.create(recording.directory, options(), requested_by=by,
                                         via="test")
    with pytest.raises(deidentified.ExportCancelled):
        deidentified.make(recording.directory, claim, options(), cancelled=lambda: True)
    stopped_dir = deidentified.export_directory(recording.directory, stopped["id"])
    assert deidentified.load(stopped_dir)["state"] == "failed"
    assert not list(stopped_dir.glob("*.mp4*"))
    with pytest.raises(ExportError, match=r"no recorded camera endoscope\.video"):
        deidentified.create(recording.directory, options(), requested_by=by, via="test",
                            feeds=["endoscope.video"])
    files, gone = deidentified.remove(directory)
    assert gone and {f["file"] for f in files} >= {"export.json", "room.video.mp4"}


async def test_cli_makes_an_export_pending_review_and_audits_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recording = await face_recording(tmp_path / "rec", seconds=1.0,
                                     audio=(SOUND[0],))
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "scrubin.toml"
    config.write_text(f'[audit]\npath = "{audit}"\n\n[deidentify]\nface_slots = ["room"]\n'
                      f'masks = {{ room = [{MONITOR_REGION}] }}\n')
    directory = str(recording.directory)
    assert scrubin(["export", directory, "--deidentify", "--config", str(config),
                    "--keep-narration"]) == 0
    captured = capsys.readouterr()
    assert "export: 100.0%|" in captured.err  # the progress bar, ending full
    assert "pending review" in captured.out
    assert "room.video.mp4: 640x360, 15 frames, narration, faces in" in captured.out
    [made] = deidentified.directories(recording.directory)
    record = deidentified.load(made)
    assert record["state"] == "pending_review" and record["requested"]["via"] == "cli"
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events] == ["deidentified_requested", "deidentified_finished"]
    assert events[1]["files"][0]["sha256"] == record["files"][0]["sha256"]
    assert events[0]["export"] == record["id"] and events[0]["session"] == "or1-live"

    assert scrubin(["export", directory, "--deidentify"]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert scrubin(["export", directory, "--deidentify", "--config", str(config),
                    "--out", str(tmp_path / "x.mp4")]) == 2
    assert "until an admin signs it off" in capsys.readouterr().err
    assert scrubin(["export", directory, "--deidentify", "--config", str(config),
                    "--feed", "endoscope.video"]) == 2
    assert "no recorded camera endoscope.video" in capsys.readouterr().err
