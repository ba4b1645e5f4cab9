"""De-identification benchmark: the cost per minute of 720p video.

    .venv/bin/python -m bench.deidentify [--seconds 20] [--json PATH]

A Recording of one 720p30 VP8 room camera (the synthetic theatre camera, which
moves, with scikit-image's astronaut photograph pasted in as a face and a
patient monitor with a name) is made once; then, in this process, each way of
exporting it runs on the same Recording:

* ``re-encode``: decoded and encoded again as H.264 with nothing hidden (the
  baseline: what any export that touches the pictures costs);
* ``faces (frontal)``: masks, and frontal faces searched 4 times a second;
* ``faces (frontal + profiles)``: the default;
* ``conservative``: the default, and everything outside a region of interest
  blurred.

Figures: CPU seconds (all threads of this process) and wall seconds per minute
of video, and each against the baseline; the faces found. The machine may be
shared: the ratios (same process, same input, one after the other) are the
figures to compare, the absolute ones move with the load.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from recorder import Recording, SessionInfo
from recorder.deidentify import DeidentifyOptions, Region, deidentify_feed
from recorder.export import export_feed
from server.media.plane import EncodedFrame
from server.publish.synthetic import TheatreRenderer

from .recorder import TIME_BASE, BenchFeed

W, H, FPS = 1280, 720, 30
MONITOR = Region(0.62, 0.04, 0.36, 0.22)
ROI = Region(0.55, 0.35, 0.45, 0.65)


def scene(frames: int) -> list[np.ndarray]:
    """The moving synthetic theatre with a face and a monitor on it."""
    try:
        from skimage import data
    except ImportError as exc:  # a test dependency
        raise SystemExit("bench.deidentify needs scikit-image (the test extras)") from exc
    face = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (560, 560),
                      interpolation=cv2.INTER_AREA)
    renderer = TheatreRenderer(W, H, label="room")
    out = []
    for i in range(frames):
        image = np.ascontiguousarray(renderer.render(i, i / FPS))
        x = 40 + int(30 * np.sin(i / 20))  # the person moves a little
        image[100:660, x:x + 560] = face
        cv2.rectangle(image, (800, 30), (1250, 180), (12, 12, 12), -1)
        cv2.putText(image, "DOE, JANE  MRN 0042-17", (815, 120), cv2.FONT_HERSHEY_SIMPLEX,
                    1.0, (255, 255, 255), 2, cv2.LINE_AA)
        out.append(image)
    return out


class _Feed(BenchFeed):
    """A Feed stand-in whose frames arrive when the bench says (not now)."""

    def emit_at(self, data: bytes, pts: int, keyframe: bool, received_at: float) -> None:
        packet = av.Packet(data)
        packet.pts, packet.time_base = pts, TIME_BASE
        frame = EncodedFrame(data=data, pts=pts, keyframe=keyframe, received_at=received_at,
                             packet=packet)
        for downstream in self.downstreams:
            downstream.deliver(frame)


async def make_recording(root: Path, seconds: float) -> Path:
    context = av.CodecContext.create("libvpx", "w")
    context.width, context.height, context.pix_fmt = W, H, "yuv420p"
    context.time_base = fractions.Fraction(1, 90000)
    context.bit_rate, context.gop_size = 2_500_000, 300
    context.options = {"deadline": "realtime", "cpu-used": "8"}
    packets = []
    for i, image in enumerate(scene(round(seconds * FPS))):
        frame = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")
        frame.pts = i * (90000 // FPS)
        packets += [(bytes(p), bool(p.is_keyframe)) for p in context.encode(frame)]
    packets += [(bytes(p), bool(p.is_keyframe)) for p in context.encode()]
    span = seconds + 0.5
    recording = Recording(root, SessionInfo("bench", "or1", "Bench", "Dr Bench"),
                          {"scope": "internal_review"}, origin=time.monotonic() - span,
                          consent_t=0.0)
    await recording.start()
    assert recording.origin is not None
    feed = _Feed("room.video")
    recording.attach(feed)
    for i, (data, key) in enumerate(packets):
        feed.emit_at(data, 1000 + i * (90000 // FPS), key, recording.origin + 0.1 + i / FPS)
        if i % 10 == 9:
            await asyncio.sleep(0.02)  # the writer's queue is bounded: let it write
    await recording.stop()
    return recording.directory


def measure(name: str, run: Callable[[], Any]) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = run()
    return {"name": name, "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall, "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-deidentify-"))
    try:
        directory = asyncio.run(make_recording(work, args.seconds))
        masks = {"room": (MONITOR,)}
        cases: list[tuple[str, Callable[[Path], Any]]] = [
            ("re-encode", lambda out: export_feed(directory, "room.video", out, burn=False,
                                                  audio=False,
                                                  picture=lambda image, t: None)),
            ("faces (frontal)", lambda out: deidentify_feed(
                directory, "room.video", out,
                DeidentifyOptions(masks=masks, face_slots=("room",), profile_faces=False))),
            ("faces (frontal + profiles)", lambda out: deidentify_feed(
                directory, "room.video", out,
                DeidentifyOptions(masks=masks, face_slots=("room",)))),
            ("conservative", lambda out: deidentify_feed(
                directory, "room.video", out,
                DeidentifyOptions(masks=masks, face_slots=("room",), conservative=True,
                                  keep={"room": (ROI,)}))),
        ]
        rows = []
        for i, (name, run) in enumerate(cases):
            out = work / f"out-{i}.mp4"
            rows.append(measure(name, lambda run=run, out=out: run(out)))  # type: ignore[misc]
        minutes = args.seconds / 60
        base = rows[0]
        print(f"de-identifying {args.seconds:g} s of {W}x{H} at {FPS} fps (VP8 in, H.264 out), "
              "per minute of video:")
        print(f"{'':28} {'CPU-s/min':>10} {'x base':>7} {'wall-s/min':>11} {'x base':>7}  faces")
        report = []
        for row in rows:
            result = row["result"]
            faces = (f"{result.detections_with_faces}/{result.detections} pictures, "
                     f"{result.frames_blurred}/{result.frames} frames blurred"
                     if hasattr(result, "detections") else "-")
            cpu, wall = row["cpu_s"] / minutes, row["wall_s"] / minutes
            print(f"{row['name']:28} {cpu:10.1f} {row['cpu_s'] / base['cpu_s']:7.2f} "
                  f"{wall:11.1f} {row['wall_s'] / base['wall_s']:7.2f}  {faces}")
            report.append({"case": row["name"], "cpu_s_per_min": round(cpu, 2),
                           "wall_s_per_min": round(wall, 2),
                           "cpu_vs_reencode": round(row["cpu_s"] / base["cpu_s"], 3),
                           "wall_vs_reencode": round(row["wall_s"] / base["wall_s"], 3),
                           "faces": faces})
        if args.json:
            args.json.write_text(json.dumps({"seconds": args.seconds, "width": W, "height": H,
                                             "fps": FPS, "cases": report}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
