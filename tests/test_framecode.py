"""Frame counter code: survives real encoders, rejects non-codes; synthetic tracks."""

from __future__ import annotations

import fractions
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any, cast

import av
import cv2
import numpy as np
import numpy.typing as npt
import pytest
from av.video.codeccontext import VideoCodecContext

from server import framecode
from server.publish.synthetic import SyntheticTheatreCamera, SyntheticTone, TheatreRenderer

Image = npt.NDArray[Any]
FPS = 30
N_FRAMES = 60


@pytest.fixture(scope="module")
def renderer() -> TheatreRenderer:
    return TheatreRenderer(1280, 720, "test theatre")


def _encoder(codec: str, width: int, height: int, bitrate: int) -> VideoCodecContext:
    """Encoder configured like aiortc's, so the test sees production-like artefacts."""
    ctx = cast(VideoCodecContext, av.CodecContext.create(codec, "w"))
    ctx.width = width
    ctx.height = height
    ctx.pix_fmt = "yuv420p"
    ctx.bit_rate = bitrate
    ctx.time_base = fractions.Fraction(1, FPS)
    ctx.framerate = fractions.Fraction(FPS, 1)
    if codec == "libvpx":
        ctx.gop_size = 3000
        ctx.qmin = 2
        ctx.qmax = 56
        ctx.options = {
            "bufsize": str(bitrate),
            "cpu-used": "-6",
            "deadline": "realtime",
            "lag-in-frames": "0",
            "minrate": str(bitrate),
            "maxrate": str(bitrate),
            "noise-sensitivity": "4",
            "overshoot-pct": "15",
            "partitions": "0",
            "static-thresh": "1",
            "undershoot-pct": "100",
        }
    else:
        ctx.options = {"level": "31", "tune": "zerolatency"}
        ctx.profile = "Baseline"
    return ctx


def _roundtrip(
    frames: list[Image], codec: str, width: int, height: int, bitrate: int
) -> Iterator[Image]:
    enc = _encoder(codec, width, height, bitrate)
    dec = av.CodecContext.create("vp8" if codec == "libvpx" else "h264", "r")
    packets = []
    for i, img in enumerate(frames):
        small = np.asarray(
            cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA), dtype=np.uint8
        )
        frame = av.VideoFrame.from_ndarray(small, format="bgr24").reformat(format="yuv420p")
        frame.pts = i
        frame.time_base = fractions.Fraction(1, FPS)
        packets.extend(enc.encode(frame))
    packets.extend(enc.encode(None))
    for packet in packets:
        for decoded in dec.decode(packet):
            yield decoded.to_ndarray(format="bgr24")


@pytest.mark.parametrize(
    ("codec", "width", "height", "bitrate"),
    [
        ("libvpx", 640, 360, 300_000),
        ("libvpx", 1280, 720, 300_000),
        ("libvpx", 320, 180, 150_000),
        ("libx264", 640, 360, 300_000),
    ],
)
def test_counters_survive_encoding(
    renderer: TheatreRenderer, codec: str, width: int, height: int, bitrate: int
) -> None:
    # Big, non-sequential counters exercise high bits too.
    counters = [(i * 2_654_435 + 17) & framecode.COUNTER_MASK for i in range(N_FRAMES)]
    frames = [renderer.render(c) for c in counters]
    decoded = [framecode.read(img) for img in _roundtrip(frames, codec, width, height, bitrate)]
    assert decoded == counters


@pytest.mark.parametrize("counter", [0, 1, 0x800000, 0xABCDEF, framecode.COUNTER_MASK])
@pytest.mark.parametrize(("width", "height"), [(160, 120), (640, 480), (1920, 1080)])
def test_roundtrip_raw_and_rescaled(counter: int, width: int, height: int) -> None:
    rng = np.random.default_rng(counter)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    framecode.stamp(img, counter)
    assert framecode.read(img) == counter
    for size in ((width * 2, height * 2), (max(80, width // 2), max(60, height // 2)), (333, 251)):
        scaled = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
        assert framecode.read(scaled) == counter, size
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=width / 200)
    assert framecode.read(blurred) == counter


def test_counter_wraps_at_24_bits() -> None:
    img = np.zeros((120, 160, 3), np.uint8)
    framecode.stamp(img, (1 << 24) + 5)
    assert framecode.read(img) == 5


def test_channel_orders_and_rgba_buffer(renderer: TheatreRenderer) -> None:
    bgr = renderer.render(424242)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgba = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert framecode.read(rgb) == 424242
    assert framecode.read(rgba) == 424242
    assert framecode.read(grey) == 424242
    assert framecode.read_rgba(rgba.tobytes(), 1280, 720) == 424242
    # Browsers may hand back transparent-black alpha; alpha must be ignored.
    rgba[:, :, 3] = 0
    assert framecode.read(rgba) == 424242


def test_absent_code_reads_none(renderer: TheatreRenderer) -> None:
    assert framecode.read(np.zeros((720, 1280, 3), np.uint8)) is None
    assert framecode.read(np.full((720, 1280, 3), 255, np.uint8)) is None
    rng = np.random.default_rng(7)
    for _ in range(20):
        noise = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
        assert framecode.read(noise) is None
    # Bars that look like a code but carry a wrong checksum.
    img = renderer.render(1234)
    data_cell = framecode.DATA_FIRST_CELL + framecode.COUNTER_BITS - 1  # counter LSB
    x0, x1 = framecode.cell_x(data_cell, 1280), framecode.cell_x(data_cell + 1, 1280)
    img[framecode.strip_top(720) :, x0:x1] = 255 - img[framecode.strip_top(720) :, x0:x1]
    assert framecode.read(img) is None
    # Camera frame with the strip covered by picture content.
    img = renderer.render(1234)
    img[framecode.strip_top(720) :] = img[: 720 - framecode.strip_top(720)]
    assert framecode.read(img) is None


def test_tiny_or_bad_frames() -> None:
    with pytest.raises(ValueError):
        framecode.stamp(np.zeros((100, 100, 3), np.uint8), 1)
    assert framecode.read(np.zeros((8, 8, 3), np.uint8)) is None


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_js_reader_matches_python(renderer: TheatreRenderer) -> None:
    # Run the documented JS port against the same pixels, so browser tests can trust it.
    cases: list[tuple[Image, int | None]] = []
    for counter, size in ((77, (640, 360)), (0xABCDEF, (333, 187)), (5, (1280, 720))):
        img = cv2.resize(renderer.render(counter), size, interpolation=cv2.INTER_AREA)
        cases.append((img, counter))
    cases.append((np.zeros((180, 320, 3), np.uint8), None))
    results = []
    for img, _ in cases:
        rgba = cv2.cvtColor(img, cv2.COLOR_BGR2RGBA)
        h, w = rgba.shape[:2]
        script = (
            framecode.JS_READER
            + "const fs = require('fs'); const buf = fs.readFileSync(0);"
            + f"const r = framecodeRead({{width: {w}, height: {h}, data: buf}});"
            + "process.stdout.write(JSON.stringify(r));"
        )
        out = subprocess.run(
            ["node", "-e", script], input=rgba.tobytes(), capture_output=True, check=True
        )
        results.append(None if out.stdout == b"null" else int(out.stdout))
    assert results == [expected for _, expected in cases]


@pytest.mark.asyncio
async def test_camera_track_paces_and_stamps() -> None:
    cam = SyntheticTheatreCamera(width=320, height=180, fps=30, label="cam")
    frames = [await cam.recv() for _ in range(5)]
    pts = [f.pts for f in frames]
    assert pts == [0, 3000, 6000, 9000, 12000]
    assert all(f.time_base == fractions.Fraction(1, 90_000) for f in frames)
    assert all((f.width, f.height, f.format.name) == (320, 180, "yuv420p") for f in frames)
    assert [framecode.read(f.to_ndarray(format="bgr24")) for f in frames] == [0, 1, 2, 3, 4]
    assert cam.frames_sent == 5
    assert sorted(cam.last_stamp_times) == [0, 1, 2, 3, 4]
    times = [cam.last_stamp_times[i] for i in range(5)]
    # Real-time pacing: 4 frame intervals at 30 fps, with scheduler slack.
    assert 4 / 30 - 0.01 <= times[-1] - times[0] <= 4 / 30 + 0.1
    cam.stop()


@pytest.mark.asyncio
async def test_camera_stamp_history_is_bounded() -> None:
    cam = SyntheticTheatreCamera(width=160, height=120, fps=100_000, pixel_format="bgr24")
    for _ in range(650):
        await cam.recv()
    assert len(cam.last_stamp_times) == 600
    assert min(cam.last_stamp_times) == 50
    cam.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("channels", [1, 2])
async def test_tone_track_yields_20ms_frames(channels: int) -> None:
    tone = SyntheticTone(channels=channels)
    frames = [await tone.recv() for _ in range(5)]
    for i, f in enumerate(frames):
        assert isinstance(f, av.AudioFrame)
        assert f.samples == 960
        assert f.sample_rate == 48_000
        assert f.format.name == "s16"
        assert len(f.layout.channels) == channels
        assert f.pts == i * 960
        assert f.time_base == fractions.Fraction(1, 48_000)
        pcm = f.to_ndarray()
        assert pcm.shape == (1, 960 * channels)
        assert int(np.abs(pcm).max()) > 1000  # not silence
    tone.stop()
