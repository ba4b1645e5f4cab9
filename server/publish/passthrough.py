"""An encoded-video track from a file or IP camera, forwarded without decoding.

aiortc's MediaPlayer(decode=False) hands MP4/Matroska H.264 on in its stored
(length-prefixed) form, which aiortc's packetizer cannot split, and restarts
timestamps when it loops. This track converts to Annex-B with FFmpeg's
``h264_mp4toannexb`` filter, keeps one increasing timeline across loops and
reconnects, paces packets in real time, and reopens a dropped RTSP source.

After every open it forwards nothing before the source's first keyframe: a
camera that comes back mid-GOP would otherwise send seconds of P-frames no
viewer can decode. A lost camera is retried at least once a second, so its
picture is back about a keyframe interval after it returns. H.264 with
B-frames is refused (WebRTC players cannot show them). Only video passes
through: a camera's audio (AAC, usually) is out of scope; the narration slot
carries the sound.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.bitstream import BitStreamFilterContext

from ..media.codecs import is_keyframe
from ..media.h264 import has_b_slices

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, 90000)


class SourceError(Exception):
    """The source cannot be opened or holds no forwardable video."""


class BFramesError(SourceError):
    """The source's H.264 has B-frames: forwarding it would reach no player."""


def b_frames_message(url: str) -> str:
    return (f"{url} sends H.264 with B-frames, which WebRTC players cannot show: turn "
            "B-frames off in the camera (Baseline, or Main/High without B-frames) or "
            "publish with --transcode")


class EncodedVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, url: str, *, options: dict[str, str] | None = None,
                 loop: bool = True, reopen: bool = True, max_reopen_backoff_s: float = 1.0
                 ) -> None:
        super().__init__()
        self.url = url
        self.options = options or {}
        self.loop = loop
        self.reopen = reopen
        self.max_reopen_backoff_s = max_reopen_backoff_s
        self.codec = ""
        self.packets_sent = 0
        self._container: Any = None
        self._stream: Any = None
        self._bsf: BitStreamFilterContext | None = None
        self._pending: list[av.Packet] = []
        # Timeline: source pts are mapped onto 90 kHz, shifted past every loop/reopen.
        self._offset = 0
        self._last_out = -1
        self._first_in: int | None = None
        self._wall_start: float | None = None
        #: Set on every open: drop packets until the source's first keyframe.
        self._await_keyframe = True
        self.packets_skipped = 0
        self.reopens = 0
        #: Why the track stopped by itself, if it did.
        self.error: str | None = None
        self._open()

    def _open(self) -> None:
        try:
            self._container = av.open(self.url, options=self.options, timeout=5)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self.url}: {exc}") from exc
        videos = [s for s in self._container.streams if s.type == "video"]
        if not videos:
            raise SourceError(f"{self.url} has no video stream")
        self._stream = videos[0]
        self.codec = str(self._stream.codec_context.name)
        if self.codec not in ("h264", "vp8"):
            raise SourceError(f"{self.url} is {self.codec}; only H.264 and VP8 pass through")
        if self.codec == "h264" and self._stream.codec_context.has_b_frames:
            self._container.close()
            raise BFramesError(b_frames_message(self.url))
        self._bsf = (BitStreamFilterContext("h264_mp4toannexb", self._stream)
                     if self.codec == "h264" else None)
        self._first_in = None
        self._await_keyframe = True

    def _read(self) -> av.Packet | None:
        """Blocking: the next Annex-B packet, or None at the end of the source."""
        while not self._pending:
            try:
                packet = next(self._container.demux(self._stream))
            except (StopIteration, av.FFmpegError, OSError) as exc:
                if isinstance(exc, av.FFmpegError):
                    logger.warning("source %s: %s", self.url, exc)
                return None
            if packet.size == 0:
                return None
            if packet.pts is None:
                continue
            self._pending = list(self._bsf.filter(packet)) if self._bsf else [packet]
            if self._await_keyframe:
                keyframes = [p for p in self._pending
                             if is_keyframe(f"video/{self.codec}", bytes(p))]
                if not keyframes:
                    self.packets_skipped += len(self._pending)
                    self._pending = []
                    continue
                self._await_keyframe = False
                self._pending = self._pending[self._pending.index(keyframes[0]):]
        packet = self._pending.pop(0)
        if self.codec == "h264" and has_b_slices(bytes(packet)):
            raise BFramesError(b_frames_message(self.url))
        return packet

    def _restart(self) -> bool:
        """End of file or a dropped stream: loop or reopen, keeping the timeline."""
        self._offset = self._last_out + 3000
        if self.loop and self._container.duration is not None:
            self._container.seek(0)
            self._pending.clear()
            self._first_in = None
            self._wall_start = None
            return True
        if not self.reopen:
            return False
        # A camera is back within a second of returning: retry at most that far apart.
        backoff = min(0.25, self.max_reopen_backoff_s)
        while self.readyState == "live":
            try:
                self._container.close()
                self._open()
                self._wall_start = None
                self.reopens += 1
                return True
            except BFramesError:
                raise
            except SourceError as exc:
                logger.warning("reopening %s in %.2fs: %s", self.url, backoff, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_reopen_backoff_s)
        return False

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            packet = await asyncio.to_thread(self._read)
            while packet is None:
                if not await asyncio.to_thread(self._restart):
                    self.stop()
                    raise MediaStreamError
                packet = await asyncio.to_thread(self._read)
        except BFramesError as exc:
            logger.error("%s", exc)
            self.error = str(exc)
            self.stop()
            raise MediaStreamError from None
        tb = packet.time_base or self._stream.time_base
        pts = int(packet.pts or 0)
        if self._first_in is None:
            self._first_in = pts
        elapsed = (pts - self._first_in) * tb
        out = self._offset + int(elapsed / VIDEO_TIME_BASE)
        out = max(out, self._last_out + 1)
        self._last_out = out
        # Real-time pacing: files would otherwise be sent as fast as they read.
        now = time.monotonic()
        if self._wall_start is None:
            self._wall_start = now - float(elapsed)
        delay = self._wall_start + float(elapsed) - now
        if delay > 0:
            await asyncio.sleep(delay)
        forwarded = av.Packet(bytes(packet))
        forwarded.pts = out
        forwarded.time_base = VIDEO_TIME_BASE
        self.packets_sent += 1
        return forwarded

    def stop(self) -> None:
        super().stop()
        if self._container is not None:
            try:
                self._container.close()
            except av.FFmpegError:
                pass
