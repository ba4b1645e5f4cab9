"""Framecoded media for the interop tests: what independent clients send, and reading
back what they decoded.

Every frame carries the synthetic camera's frame counter (server/framecode.py), so a
test can tell which frames arrived, in which order, and that they decoded cleanly.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from server import framecode
from server.publish.synthetic import TheatreRenderer

WIDTH, HEIGHT, FPS = 320, 240, 30


def write_y4m(path: Path, frames: int, *, first: int = 0) -> Path:
    """Raw I420 frames (YUV4MPEG2) counting from ``first``: GStreamer's y4mdec reads it."""
    renderer = TheatreRenderer(WIDTH, HEIGHT, label="interop")
    with av.open(str(path), "w", format="yuv4mpegpipe") as out:
        stream = out.add_stream("rawvideo", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for n in range(first, first + frames):
            frame = av.VideoFrame.from_ndarray(renderer.render(n, 0.0), format="bgr24")
            frame.pts = n - first
            for packet in stream.encode(frame.reformat(format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_h264(path: Path, frames: int, *, bframes: int = 0, gop: int = 30,
               profile: str = "baseline") -> Path:
    """H.264 in MP4 from libx264, with or without B-frames (a hardware encoder's High)."""
    renderer = TheatreRenderer(WIDTH, HEIGHT, label="camera")
    options = {"preset": "ultrafast", "profile": profile, "bf": str(bframes), "g": str(gop),
               "keyint_min": str(gop), "sc_threshold": "0"}
    if not bframes:
        options["tune"] = "zerolatency"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options=options)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = Fraction(1, FPS)
        for n in range(frames):
            frame = av.VideoFrame.from_ndarray(renderer.render(n, 0.0), format="bgr24")
            frame.pts = n
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def gray_counters(path: Path, width: int = WIDTH, height: int = HEIGHT) -> list[int | None]:
    """The frame counter of every frame a player wrote to ``path`` as raw GRAY8."""
    if not path.exists():
        return []
    data = np.fromfile(path, dtype=np.uint8)
    frames = len(data) // (width * height)
    images = data[: frames * width * height].reshape(frames, height, width)
    return [framecode.read(image) for image in images]


def read_counter(frame: av.VideoFrame) -> int | None:
    return framecode.read(np.asarray(frame.to_ndarray(format="gray")))
