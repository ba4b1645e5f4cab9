"""Quality layers of a camera: choosing one per viewer, and making a low one.

A camera may reach viewers as two layers, each its own Feed (docs/architecture.md,
"The media seam"): the full layer and a low one (≈ 320×180, 15 fps, ≤ 250
kbit/s, same codec). The broadcast page publishes both; for an encoder that
sends one, the server can make the low layer (``LowLayerMaker``: decoded once
and encoded once per Feed, never per viewer).

Each viewer's Subscription receives one layer on one outgoing stream and moves
between them at keyframes. :class:`LayerController` decides from the viewer's
own feedback (receiver-report loss, REMB, RTT) with hysteresis: down quickly
when the link cannot carry the full layer, up again only after a quiet spell,
waiting longer each time an attempt fails.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import av

logger = logging.getLogger(__name__)

Layer = Literal["full", "low"]
Preference = Literal["auto", "full", "low"]
LAYERS: tuple[Layer, ...] = ("full", "low")


@dataclass
class LayerController:
    """Per viewer: which layer its link carries. Plain logic on an injected clock."""

    #: Fraction of packets lost (0–1) in a receiver report that means "too much".
    loss_down: float = 0.08
    #: Reports in a row over ``loss_down`` before moving down (one bad report is noise).
    bad_reports: int = 2
    #: Loss under this counts as clean.
    loss_clean: float = 0.02
    #: Clean seconds on the low layer before trying the full one again.
    up_after_s: float = 6.0
    #: Each failed attempt (down again within ``probation_s``) doubles the wait, up to this.
    max_up_after_s: float = 60.0
    probation_s: float = 10.0
    #: REMB under this share of the full layer's bitrate means it will not fit.
    remb_margin: float = 0.85
    clock: Callable[[], float] = time.monotonic
    layer: Layer = "full"
    _bad: int = 0
    _clean_since: float | None = None
    _went_up_at: float | None = None
    _wait: float = field(default=0.0)
    switches: int = 0

    def __post_init__(self) -> None:
        self._wait = self.up_after_s

    def start(self, layer: Layer) -> None:
        self.layer = layer
        self._bad = 0
        self._clean_since = self.clock() if layer == "low" else None

    def on_report(self, loss: float, remb_bps: float | None = None,
                  full_bps: float | None = None) -> Layer | None:
        """One receiver report (and the latest REMB); returns a layer to move to."""
        now = self.clock()
        # Right after moving up, a receiver's REMB still reflects the low layer it
        # was receiving (it ramps up over seconds): only loss judges the attempt.
        settling = self._went_up_at is not None and now - self._went_up_at < self.probation_s
        too_slow = (not settling and remb_bps is not None and full_bps is not None
                    and full_bps > 0 and remb_bps < full_bps * self.remb_margin)
        if self.layer == "full":
            self._bad = self._bad + 1 if loss > self.loss_down or too_slow else 0
            if self._bad >= self.bad_reports:
                if self._went_up_at is not None and now - self._went_up_at < self.probation_s:
                    # The last attempt at the full layer failed: wait longer next time.
                    self._wait = min(self._wait * 2, self.max_up_after_s)
                self._went_up_at = None
                return self._move("low", now)
            if self._went_up_at is not None and now - self._went_up_at >= self.probation_s:
                self._went_up_at = None
                self._wait = self.up_after_s  # the full layer held: the next wait is short
            return None
        # On the low layer a receiver's REMB cannot say more than ~1.5x what it
        # receives (receive-side estimation is capped by the incoming rate), so
        # it cannot tell whether the full layer would fit: only loss counts, and
        # a failed attempt at the full layer makes the next wait longer.
        if loss > self.loss_clean:
            self._clean_since = None
            return None
        if self._clean_since is None:
            self._clean_since = now
        if now - self._clean_since >= self._wait:
            self._went_up_at = now
            return self._move("full", now)
        return None

    def _move(self, layer: Layer, now: float) -> Layer:
        self.layer = layer
        self._bad = 0
        self._clean_since = now if layer == "low" else None
        self.switches += 1
        return layer


class LowLayerMaker:
    """A downstream of a full video Feed that publishes its low layer.

    Decodes every frame once, keeps ``fps`` of them, scales to ``width``×``height``
    and encodes once, in its own thread; encoded frames go into the low Feed on
    the event loop. A bounded queue stands between: when the thread falls behind,
    frames are dropped up to the next keyframe of the full layer (asked for).
    """

    QUEUE = 8

    def __init__(self, *, feed_id: str, mime_type: str,
                 request_full_keyframe: Callable[[], object], width: int = 320,
                 height: int = 180, fps: float = 15.0, bitrate: int = 250_000) -> None:
        self.feed_id = feed_id
        self._mime = mime_type.lower()
        self._sink: Callable[[bytes, int], None] | None = None
        self._request_full_keyframe = request_full_keyframe
        self._size = (width, height)
        self._interval = 90_000 / fps
        self._bitrate = bitrate
        self._queue: queue.Queue[tuple[bytes, int, bool] | None] = queue.Queue(self.QUEUE)
        self._resync = True
        self._force_keyframe = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        #: Thread CPU seconds spent decoding, scaling and encoding (for /metrics, bench).
        self.cpu_s = 0.0

    @property
    def downstream_id(self) -> str:
        return f"low-layer:{self.feed_id}"

    def start(self, sink: Callable[[bytes, int], None]) -> None:
        """Run; encoded frames go to ``sink`` (the low Feed's publisher side)."""
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"low-layer-{self.feed_id}",
                                        daemon=True)
        self._thread.start()

    def request_keyframe(self) -> bool:
        """The low Feed's keyframe policy asks (a viewer switched down, joined...)."""
        self._force_keyframe.set()
        return True

    def deliver(self, frame: Any) -> None:
        self.frames_in += 1
        if self._resync:
            if not frame.keyframe:
                return
            self._resync = False
        try:
            self._queue.put_nowait((frame.data, frame.pts, frame.keyframe))
        except queue.Full:
            self.frames_dropped += 1
            self._resync = True
            self._request_full_keyframe()

    def dropped(self, reason: str) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                while True:  # make room for the stop marker; what is dropped is moot
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break
                self._queue.put_nowait(None)
            self._thread = None

    def _encoder(self) -> Any:
        name = "libvpx" if self._mime == "video/vp8" else "libx264"
        encoder: Any = av.CodecContext.create(name, "w")
        encoder.width, encoder.height = self._size
        encoder.pix_fmt = "yuv420p"
        encoder.time_base = Fraction(1, 90_000)
        encoder.bit_rate = self._bitrate
        if name == "libvpx":
            encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                               "error-resilient": "1", "auto-alt-ref": "0",
                               "kf-max-dist": "300"}
        else:
            encoder.profile = "baseline"
            encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "bframes": "0",
                               "repeat-headers": "1"}
        return encoder

    def _run(self) -> None:
        try:
            decoder: Any = av.CodecContext.create(
                "vp8" if self._mime == "video/vp8" else "h264", "r")
            encoder = self._encoder()
            next_due: float | None = None
            while True:
                item = self._queue.get()
                if item is None:
                    break
                data, pts, _keyframe = item
                started = time.thread_time()
                try:
                    frames = decoder.decode(av.Packet(data))
                except av.error.FFmpegError:
                    self._resync = True
                    continue
                for picture in frames:
                    if next_due is not None and pts < next_due - self._interval / 2:
                        continue  # frame-rate decimation
                    next_due = pts + self._interval if next_due is None else max(
                        next_due + self._interval, pts)
                    small = picture.reformat(width=self._size[0], height=self._size[1],
                                             format="yuv420p")
                    small.pts = pts
                    small.time_base = Fraction(1, 90_000)
                    if self._force_keyframe.is_set():
                        self._force_keyframe.clear()
                        small.pict_type = av.video.frame.PictureType.I
                    for packet in encoder.encode(small):
                        self._emit(bytes(packet), int(packet.pts if packet.pts is not None
                                                      else pts))
                self.cpu_s += time.thread_time() - started
        except Exception:
            logger.exception("low layer of %s failed", self.feed_id)

    def _emit(self, data: bytes, pts: int) -> None:
        self.frames_out += 1
        if self._sink is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._sink, data, pts & 0xFFFFFFFF)
