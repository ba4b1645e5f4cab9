"""Synthetic theatre camera and tone tracks for tests and benchmarks.

The camera renders a busy, moving "surgical field" so encoders do realistic
work, overlays a label, wall clock and counter for humans, and stamps a
:mod:`server.framecode` code so tests can identify every decoded frame and
measure glass-to-glass latency through ``last_stamp_times``.
"""

from __future__ import annotations

import asyncio
import fractions
import functools
import math
import time
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack, VideoStreamTrack
from av import AudioFrame, VideoFrame

from server import framecode

U8Image = npt.NDArray[np.uint8]

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
# Enough history for ~20 s at 30 fps: covers any sane end-to-end latency.
STAMP_HISTORY = 600
# If the event loop stalls this long, skip ahead instead of bursting frames:
# a burst would make pts and wall clock disagree and distort latency numbers.
MAX_LAG_S = 0.25

PixelFormat = Literal["yuv420p", "bgr24"]


def _periodic_noise(
    height: int, width: int, sigma_px: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """Smooth noise in [0, 1] that tiles seamlessly (filtered in the FFT domain)."""
    white = rng.standard_normal((height, width))
    spectrum = np.fft.rfft2(white)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    spectrum *= np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (fy**2 + fx**2))
    field = np.fft.irfft2(spectrum, s=(height, width))
    lo, hi = float(field.min()), float(field.max())
    return ((field - lo) / max(hi - lo, 1e-9)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _backgrounds(width: int, height: int, fh: int, fw: int) -> tuple[U8Image, U8Image]:
    """Drape frame and 2x2-tiled tissue texture; cached because it costs ~100 ms at 720p
    and benchmarks create many cameras of the same size on the event loop."""
    rng = np.random.default_rng(20240611)
    # Static drapes around the field: they let encoders skip blocks like a
    # real camera on a tripod would.
    drape_noise = _periodic_noise(height, width, 2.0, rng)
    drape = np.empty((height, width, 3), np.float32)
    for c, (base, var) in enumerate(((120.0, 30.0), (110.0, 25.0), (40.0, 15.0))):
        drape[:, :, c] = base + var * (drape_noise - 0.5) * 2
    base_img = np.clip(drape, 0, 255).astype(np.uint8)
    base_img.flags.writeable = False  # shared between renderers via the cache

    # The field scrolls, so its texture must tile; keep a 2x2 tiling so any
    # scroll offset is a plain slice (no per-frame np.roll).
    coarse = _periodic_noise(fh, fw, fh / 12.0, rng)
    fine = _periodic_noise(fh, fw, 1.5, rng)
    dark = np.array([25.0, 25.0, 110.0], np.float32)
    light = np.array([130.0, 150.0, 235.0], np.float32)
    tissue = dark + (light - dark) * coarse[:, :, None]
    tissue += (fine[:, :, None] - 0.5) * 70.0
    tex = np.tile(np.clip(tissue, 0, 255).astype(np.uint8), (2, 2, 1))
    tex.flags.writeable = False
    return base_img, tex


class TheatreRenderer:
    """Renders synthetic theatre frames; plain sync code, usable without asyncio.

    Everything expensive (textures, drapes) is precomputed so that a frame is
    one memcpy, one sub-rectangle copy and a handful of cv2 primitives.
    """

    def __init__(self, width: int = 1280, height: int = 720, label: str = "room") -> None:
        if width < 160 or height < 120:
            raise ValueError(f"frame {width}x{height} too small (min 160x120)")
        if width % 2 or height % 2:
            # yuv420p (what every WebRTC encoder wants) needs even dimensions.
            raise ValueError(f"frame {width}x{height} must have even dimensions")
        self.width = width
        self.height = height
        self.label = label
        self._scale = height / 720.0
        # Field rectangle: drapes around it, code strip below it.
        self._fx0, self._fx1 = width // 6, width - width // 6
        self._fy0, self._fy1 = height // 8, framecode.strip_top(height) - height // 16
        self._field_size = (self._fy1 - self._fy0, self._fx1 - self._fx0)
        self._base, self._field_tex = _backgrounds(width, height, *self._field_size)

    def render(self, counter: int, wall_time: float | None = None) -> U8Image:
        """Return a new BGR frame for ``counter`` showing ``wall_time`` (default: now)."""
        if wall_time is None:
            wall_time = time.time()
        w, h, s = self.width, self.height, self._scale
        img = self._base.copy()

        fh, fw = self._field_size
        dy = (counter * 2) % fh
        dx = (counter * 3) % fw
        img[self._fy0 : self._fy1, self._fx0 : self._fx1] = self._field_tex[
            dy : dy + fh, dx : dx + fw
        ]

        t = counter / 30.0
        cx, cy = (self._fx0 + self._fx1) // 2, (self._fy0 + self._fy1) // 2
        # Pooling blood: a slowly wandering, pulsing dark red blob.
        bx = int(cx + 0.25 * fw * math.sin(0.31 * t))
        by = int(cy + 0.2 * fh * math.cos(0.23 * t))
        cv2.circle(img, (bx, by), int(s * (40 + 12 * math.sin(2.1 * t))), (10, 5, 90), -1)
        # A swab: rotating pale quadrilateral.
        ang = 0.4 * t
        sw, sh = 60 * s, 35 * s
        sx, sy = cx - 0.3 * fw * math.cos(0.17 * t), cy + 0.25 * fh * math.sin(0.29 * t)
        corners = np.array(
            [
                (
                    sx + dxs * math.cos(ang) - dys * math.sin(ang),
                    sy + dxs * math.sin(ang) + dys * math.cos(ang),
                )
                for dxs, dys in ((-sw, -sh), (sw, -sh), (sw, sh), (-sw, sh))
            ],
            np.int32,
        )
        cv2.fillConvexPoly(img, corners, (215, 225, 230))
        # Two instruments entering from the sides, tips tracing Lissajous paths.
        for side, phase in ((0, 0.0), (1, 1.7)):
            tip = (
                int(cx + 0.3 * fw * math.sin(0.9 * t + phase)),
                int(cy + 0.3 * fh * math.sin(1.3 * t + 2 * phase)),
            )
            root = (0 if side == 0 else w - 1, int(h * (0.85 if side == 0 else 0.2)))
            cv2.line(img, root, tip, (150, 150, 155), max(2, int(14 * s)))
            cv2.line(img, root, tip, (215, 215, 220), max(1, int(4 * s)))
            cv2.circle(img, tip, max(2, int(9 * s)), (90, 90, 95), -1)

        self._overlay_text(img, counter, wall_time)
        framecode.stamp(img, counter)
        return img

    def _overlay_text(self, img: U8Image, counter: int, wall_time: float) -> None:
        s = self._scale
        font = cv2.FONT_HERSHEY_SIMPLEX
        scale = 0.9 * s
        thick = max(1, int(2 * s))
        lt = time.localtime(wall_time)
        millis = int((wall_time % 1.0) * 1000)
        clock = f"{lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d}.{millis:03d}"
        pad = max(2, int(8 * s))
        line_h = int(36 * s)
        # Opaque box behind the text: keeps it legible after compression.
        # Top right: the pages put their own Feed label top left.
        box_w = int(440 * s)
        x0 = img.shape[1] - box_w
        cv2.rectangle(img, (x0, 0), (img.shape[1], 2 * line_h + 2 * pad), (0, 0, 0), -1)
        cv2.putText(img, self.label, (x0 + pad, line_h), font, scale, (255, 255, 255), thick)
        cv2.putText(
            img, f"{clock}  #{counter}", (x0 + pad, 2 * line_h), font, scale, (255, 255, 255),
            thick,
        )


class SyntheticTheatreCamera(VideoStreamTrack):
    """A real-time paced video track of :class:`TheatreRenderer` frames.

    ``frames_sent`` counts frames returned by :meth:`recv`; frame ``n`` carries
    framecode counter ``n`` (mod 2**24).  ``last_stamp_times[counter]`` is the
    ``time.time()`` at which that frame was handed out (last 600 frames), and
    ``last_due_times[counter]`` the time its timestamp stands for (its slot on
    the fps grid): later than that when the machine is loaded.
    """

    kind = "video"

    def __init__(
        self,
        width: int = 1280,
        height: int = 720,
        fps: float = 30,
        label: str = "room",
        pixel_format: PixelFormat = "yuv420p",
    ) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.renderer = TheatreRenderer(width, height, label)
        self.fps = float(fps)
        self.pixel_format: PixelFormat = pixel_format
        self.frames_sent = 0
        self.last_stamp_times: dict[int, float] = {}
        self.last_due_times: dict[int, float] = {}
        self._t0: float | None = None
        self._slot = 0  # frame slot on the fps grid; runs ahead of frames_sent after stalls

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.time()
        if self._t0 is None:
            self._t0 = now
            self._slot = 0
        else:
            self._slot += 1
            due = self._t0 + self._slot / self.fps
            if now - due > MAX_LAG_S:
                self._slot = int((now - self._t0) * self.fps)
            elif due > now:
                await asyncio.sleep(due - now)

        counter = self.frames_sent & framecode.COUNTER_MASK
        img = self.renderer.render(counter)
        if self.pixel_format == "yuv420p":
            # cv2's I420 is BT.601 limited range like swscale, and doing it here
            # spares each aiortc encoder its own (slower) reformat.
            yuv = np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8)
            frame = VideoFrame.from_ndarray(yuv, format="yuv420p")
        else:
            frame = VideoFrame.from_ndarray(img, format="bgr24")
        frame.pts = round(self._slot * VIDEO_CLOCK_RATE / self.fps)
        frame.time_base = VIDEO_TIME_BASE

        self.last_stamp_times[counter] = time.time()
        self.last_due_times[counter] = self._t0 + self._slot / self.fps
        self.last_stamp_times.pop((counter - STAMP_HISTORY) & framecode.COUNTER_MASK, None)
        self.last_due_times.pop((counter - STAMP_HISTORY) & framecode.COUNTER_MASK, None)
        self.frames_sent += 1
        return frame


class SyntheticTone(MediaStreamTrack):
    """A real-time paced audio track: a quiet sine with a loud beep each second.

    Beeps start on whole seconds of wall-clock time (``time.time()``) of the
    nominal sample time, so they can be lined up with the camera's clock
    overlay / stamp times for A/V-sync checks.
    """

    kind = "audio"

    def __init__(
        self,
        sample_rate: int = 48_000,
        channels: int = 1,
        frequency: float = 440.0,
        beep_frequency: float = 1_000.0,
        beep_ms: float = 50.0,
        ptime_ms: float = 20.0,
    ) -> None:
        super().__init__()
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        self.sample_rate = sample_rate
        self.channels = channels
        self.frequency = frequency
        self.beep_frequency = beep_frequency
        self.beep_s = beep_ms / 1000.0
        self.samples_per_frame = round(sample_rate * ptime_ms / 1000.0)
        self.frames_sent = 0
        self._t0: float | None = None
        self._next_sample = 0

    def _samples(self, start: int, wall_start: float) -> npt.NDArray[np.int16]:
        n = np.arange(start, start + self.samples_per_frame, dtype=np.int64)
        # Phase from integer sample index keeps precision over long runs.
        tone = 0.1 * np.sin(2 * np.pi * ((n * self.frequency / self.sample_rate) % 1.0))
        offsets = np.arange(self.samples_per_frame) / self.sample_rate
        in_beep = ((wall_start + offsets) % 1.0) < self.beep_s
        beep = 0.5 * np.sin(2 * np.pi * ((n * self.beep_frequency / self.sample_rate) % 1.0))
        pcm = np.round((tone + np.where(in_beep, beep, 0.0)) * 32767).astype(np.int16)
        if self.channels == 2:
            pcm = np.repeat(pcm, 2)  # packed s16: L R L R ...
        return pcm

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.time()
        if self._t0 is None:
            self._t0 = now
        else:
            due = self._t0 + self._next_sample / self.sample_rate
            if now - due > MAX_LAG_S:
                # Skip the gap rather than burst: pts jumps, as after real packet loss.
                self._next_sample = int((now - self._t0) * self.sample_rate)
            elif due > now:
                await asyncio.sleep(due - now)

        start = self._next_sample
        pcm = self._samples(start, self._t0 + start / self.sample_rate)
        frame = AudioFrame.from_ndarray(
            pcm.reshape(1, -1), format="s16", layout="mono" if self.channels == 1 else "stereo"
        )
        frame.sample_rate = self.sample_rate
        frame.pts = start
        frame.time_base = fractions.Fraction(1, self.sample_rate)
        self._next_sample += self.samples_per_frame
        self.frames_sent += 1
        return frame
