"""A pre-encoded VP8 stream and a publisher track that replays it in real time.

Encoding 720p30 live on a 2-core machine would take most of a core away from the
server being measured, so the synthetic theatre camera is encoded once (cached
in the temp directory) and replayed as ``av.Packet``s: aiortc's RTCRtpSender only
packetizes those.

Frame ``i`` of the stream carries framecode counter ``i``. A keyframe request
(PLI/FIR) makes the replay jump back to frame 0, the stream's keyframe, so every
bitstream a viewer receives is exactly what the encoder produced (no drift) and
keyframes cost what a real encoder's do.
"""

from __future__ import annotations

import asyncio
import fractions
import hashlib
import os
import pickle
import tempfile
import time
from collections import deque
from dataclasses import dataclass

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server.publish.synthetic import TheatreRenderer

VIDEO_TIME_BASE = fractions.Fraction(1, 90_000)
MAX_LAG_S = 0.25
CACHE_VERSION = 1


@dataclass
class EncodedStream:
    width: int
    height: int
    fps: float
    bitrate: int
    frames: list[bytes]  # frames[0] is the only keyframe

    @property
    def mean_bitrate(self) -> float:
        """Bits per second of the plain sequence (one keyframe per len(frames))."""
        return sum(len(f) for f in self.frames) * 8 * self.fps / len(self.frames)

    @property
    def keyframe_bytes(self) -> int:
        return len(self.frames[0])

    @property
    def delta_bytes_mean(self) -> float:
        return sum(len(f) for f in self.frames[1:]) / max(1, len(self.frames) - 1)


def _encoder(width: int, height: int, fps: float, bitrate: int) -> av.CodecContext:
    # aiortc's own Vp8Encoder settings (realtime CBR), at the target bitrate.
    codec = av.CodecContext.create("libvpx", "w")
    codec.width = width
    codec.height = height
    codec.bit_rate = bitrate
    codec.pix_fmt = "yuv420p"
    codec.framerate = fractions.Fraction(int(fps), 1)
    codec.time_base = fractions.Fraction(1, int(fps))
    codec.gop_size = 3000
    codec.qmin = 2
    codec.qmax = 56
    codec.options = {
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
    codec.thread_count = 2
    return codec


def encode_stream(width: int = 1280, height: int = 720, fps: float = 30,
                  bitrate: int = 1_500_000, seconds: float = 10.0) -> EncodedStream:
    """Render and encode ``seconds`` of the synthetic theatre; cached on disk."""
    count = int(seconds * fps)
    key = hashlib.sha1(f"{CACHE_VERSION}-{width}-{height}-{fps}-{bitrate}-{count}-"
                       f"{av.__version__}".encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"scrubin-bench-vp8-{key}.pkl")
    try:
        with open(path, "rb") as fh:
            stream = pickle.load(fh)
        if isinstance(stream, EncodedStream) and len(stream.frames) == count:
            return stream
    except (OSError, pickle.PickleError, EOFError, AttributeError):
        pass
    renderer = TheatreRenderer(width, height, label="bench")
    codec = _encoder(width, height, fps, bitrate)
    frames: list[bytes] = []
    for i in range(count):
        img = renderer.render(i, wall_time=1_700_000_000 + i / fps)
        yuv = np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = i
        frame.time_base = codec.time_base
        packets = codec.encode(frame)
        data = b"".join(bytes(p) for p in packets)
        if not data:
            raise RuntimeError(f"encoder produced no data for frame {i}")
        frames.append(data)
    codec.encode(None)  # flush (lag-in-frames 0: nothing pending)
    if frames[0][0] & 0x01:
        raise RuntimeError("first encoded frame is not a keyframe")
    stream = EncodedStream(width, height, fps, bitrate, frames)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        pickle.dump(stream, fh)
    os.replace(tmp, path)
    return stream


class StampBook:
    """Wall-clock send times per framecode counter (a counter repeats on replay)."""

    def __init__(self, history: int = 4) -> None:
        self._times: dict[int, deque[float]] = {}
        self._history = history

    def record(self, counter: int, when: float) -> None:
        times = self._times.get(counter)
        if times is None:
            times = self._times[counter] = deque(maxlen=self._history)
        times.append(when)

    def lookup(self, counter: int, decoded_at: float) -> float | None:
        """The latest send time of ``counter`` not after ``decoded_at``."""
        best = None
        for when in self._times.get(counter, ()):
            if when <= decoded_at and (best is None or when > best):
                best = when
        return best


class PacketReplayTrack(MediaStreamTrack):
    """Replays an :class:`EncodedStream` at its frame rate as ``av.Packet``s."""

    kind = "video"

    def __init__(self, stream: EncodedStream, stamps: StampBook) -> None:
        super().__init__()
        self._stream = stream
        self.stamps = stamps
        self._index = 0
        self._slot = 0
        self._t0: float | None = None
        self._want_keyframe = False
        self.frames_sent = 0
        self.keyframes_sent = 0
        self.keyframe_requests = 0
        self.skipped_slots = 0
        self._last_sent: float | None = None
        self.max_gap = 0.0  # longest time between two frames handed to the sender

    def take_max_gap(self) -> float:
        gap, self.max_gap = self.max_gap, 0.0
        return gap

    def request_keyframe(self) -> None:
        """Patched in as the sender's ``_send_keyframe`` (PLI/FIR from the remote)."""
        self.keyframe_requests += 1
        self._want_keyframe = True

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.time()
        fps = self._stream.fps
        if self._t0 is None:
            self._t0 = now
            self._slot = 0
        else:
            self._slot += 1
            due = self._t0 + self._slot / fps
            if now - due > MAX_LAG_S:
                slot = int((now - self._t0) * fps)
                self.skipped_slots += slot - self._slot
                self._slot = slot
            elif due > now:
                await asyncio.sleep(due - now)
        if self._want_keyframe or self._index >= len(self._stream.frames):
            self._want_keyframe = False
            self._index = 0
        counter = self._index
        data = self._stream.frames[counter]
        self._index += 1
        packet = av.Packet(data)
        packet.pts = round(self._slot * 90_000 / fps)
        packet.time_base = VIDEO_TIME_BASE
        if counter == 0:
            self.keyframes_sent += 1
        self.frames_sent += 1
        now = time.time()
        if self._last_sent is not None:
            self.max_gap = max(self.max_gap, now - self._last_sent)
        self._last_sent = now
        self.stamps.record(counter, now)
        return packet
