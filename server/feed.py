"""Feed: one incoming camera or audio source of a Session, fanned out encoded.

A Feed is the upstream side of the media seam (``server/media/plane.py``):
frames come in from one publisher, go out to downstreams (viewers, the
recorder, later relays) that the Feed knows only as :class:`Downstream`, and
every keyframe request goes to the publisher through the Feed's
:class:`KeyframePolicy`.

A Feed outlives its publisher's connection: when the publisher drops, the Feed
goes ``down`` and keeps its downstreams for ``feed_grace_s``; a publisher that
reconnects to the same slot re-attaches and viewers resume without reloading,
because the Feed keeps one continuous RTP timeline across publishers. A video
Feed whose publisher is connected but sends no frames is ``stalled``.

Late joiners start from a cache of the last keyframe and the frames after it,
replayed paced; keyframe requests are coalesced, so thirty joins are at most
a couple of requests upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import av
from aiortc import RTCRtpCodecParameters

from .config import LivenessConfig, MediaConfig
from .media.codecs import h264_nal_types, h264_parameter_sets, is_keyframe
from .media.fastpath import shared_packetizer
from .media.h264 import H264Stream
from .media.plane import (
    Downstream,
    DownstreamBehind,
    DownstreamGone,
    DropReason,
    EncodedFrame,
    KeyframePolicy,
    Start,
)

logger = logging.getLogger(__name__)

FeedState = Literal["live", "stalled", "down", "closed"]

#: A cache longer than this (frames) makes a joiner ask for a fresh keyframe.
FRESH_CACHE_FRAMES = 15

#: Spacing between replayed cached frames: a whole GOP sent in one burst
#: overflows the viewer's socket buffers and turns into retransmissions.
REPLAY_SPACING_S = 0.003

#: Gap inserted into the outgoing timeline when a publisher re-attaches.
_REATTACH_STEP = {"video": 3000, "audio": 960}

#: Per viewer, at most one keyframe request (PLI, join, switch) per this many
#: seconds reaches the policy; the Feed-wide interval still applies on top.
PER_REQUESTER_S = 1.0

#: A downstream is dropped as ``blocked`` after this many deliveries in a row
#: over ``liveness.downstream_block_ms``.
BLOCKED_STRIKES = 2


@dataclass(eq=False)
class _Attachment:
    """One downstream of this Feed and where it stands."""

    downstream: Downstream
    requester: str
    paused: bool = False
    needs_keyframe: bool = False
    #: Live frames held while the cache is being replayed to it.
    pending: list[EncodedFrame] | None = None
    replay: asyncio.Task[None] | None = None
    delivered: int = 0
    behind: int = 0
    #: Consecutive deliveries over the block budget.
    slow: int = 0


@dataclass
class FeedStats:
    dropped: dict[str, int] = field(default_factory=dict)
    behind: int = 0


class Feed:
    def __init__(
        self,
        *,
        feed_id: str,
        slot: str,
        kind: str,
        codec: RTCRtpCodecParameters,
        media: MediaConfig,
        liveness: LivenessConfig,
        on_state: Callable[[Feed], None],
        on_closed: Callable[[Feed], None],
        on_dropped: Callable[[Feed, DropReason], None] | None = None,
        layer: str = "full",
    ) -> None:
        self.id = feed_id
        self.slot = slot
        self.kind = kind
        self.codec = codec
        #: "full", or "low" for the lower-quality layer of a camera (its own Feed).
        self.layer = layer
        #: This camera's low layer, when there is one (docs/architecture.md).
        self.low: Feed | None = None
        #: Received bits per second, smoothed (a viewer's layer choice compares
        #: its link against it).
        self.bitrate_bps = 0.0
        self._rate_bytes = 0
        self._rate_since: float | None = None
        self.state: FeedState = "down"
        self.frames_received = 0
        self.bytes_received = 0
        self.stats = FeedStats()
        #: What an H.264 publisher really sends (its SPS), once seen; viewers are
        #: matched against it (server/media/h264.py). Set by the Session.
        self.h264: H264Stream | None = None
        #: ``time.monotonic()`` of the last frame (stall detection).
        self.last_frame_at: float | None = None
        self._media = media
        self._stall_after = liveness.stall_video_s if kind == "video" else liveness.stall_audio_s
        self._block_budget = liveness.downstream_block_ms / 1000
        self._on_state = on_state
        self._on_closed = on_closed
        self._on_dropped = on_dropped
        self._time_base = Fraction(1, codec.clockRate)
        self._attachments: dict[int, _Attachment] = {}
        # The fan-out loop reads this tuple; attach/detach replace it, so a
        # downstream dropped mid-frame cannot disturb the iteration.
        self._fanout: tuple[_Attachment, ...] = ()
        # Continuous outgoing timeline across publishers.
        self._last_in: int | None = None
        self._last_out = 0
        self._rebase = True
        # The publisher's wall clock: (NTP timestamp, pts on our timeline).
        self._ntp_reference: tuple[int, int] | None = None
        # Late-joiner cache: last keyframe and what followed it.
        self._gop: list[EncodedFrame] = []
        self._gop_bytes = 0
        self._grace: asyncio.TimerHandle | None = None
        self.keyframes = KeyframePolicy(
            None, interval_s=media.keyframe_request_interval_ms / 1000,
            per_requester_s=PER_REQUESTER_S, call_later=self._call_later)
        self._packetizer = shared_packetizer(codec) if media.fast_path else None
        self._h264 = codec.mimeType.lower() == "video/h264"
        self._parameter_sets: bytes | None = None

    # -- the seam's Upstream ------------------------------------------------
    @property
    def mime_type(self) -> str:
        return str(self.codec.mimeType)

    @property
    def clock_rate(self) -> int:
        return int(self.codec.clockRate)

    @property
    def keyframe_requests_sent(self) -> int:
        return self.keyframes.stats.sent

    @staticmethod
    def _call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)

    # -- publisher side ---------------------------------------------------
    def connect_publisher(self, request_keyframe: Callable[[], bool]
                          ) -> Callable[[bytes, int], None]:
        """A publisher (first or returning) feeds this Feed; returns its frame sink."""
        if self.state == "closed":
            raise RuntimeError(f"feed {self.id} is closed")
        self.keyframes.connect(request_keyframe if self.kind == "video" else None)
        self._rebase = True
        self._ntp_reference = None
        self.last_frame_at = time.monotonic()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._set_state("live", "publisher connected")
        return self.on_frame

    def publisher_gone(self, *, final: bool, reason: str = "publisher left") -> None:
        """The publisher is gone: for good (``final``) or perhaps for a while."""
        if self.state == "closed":
            return
        self.keyframes.connect(None)
        self._gop.clear()
        self._gop_bytes = 0
        if final:
            self.close(reason)
            return
        self._set_state("down", reason)
        loop = asyncio.get_running_loop()
        self._grace = loop.call_later(self._media.feed_grace_s, self.close,
                                      f"no publisher for {self._media.feed_grace_s:g} s")

    def on_sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> None:
        """The publisher's RTCP sender report: its RTP clock against its wall clock."""
        if self._last_in is None or self._rebase:
            return
        delta = (rtp_timestamp - self._last_in) & 0xFFFFFFFF
        if delta >= 0x80000000:
            delta -= 0x100000000
        self._ntp_reference = (ntp_timestamp, self._last_out + delta)

    def ntp_at(self, pts: int) -> int | None:
        """The publisher's NTP time of the frame at ``pts`` on our timeline."""
        reference = self._ntp_reference
        if reference is None:
            return None
        ntp, at = reference
        return (ntp + ((pts - at) << 32) // self.clock_rate) & 0xFFFFFFFFFFFFFFFF

    def on_frame(self, data: bytes, rtp_timestamp: int) -> None:
        """Called by the receiver tap for every complete encoded frame.

        Runs inside the publisher's receive loop: nothing a downstream does may
        raise out of here (see ``_deliver``), and nothing here may fail either.
        """
        try:
            self._on_frame(data, rtp_timestamp)
        except Exception:  # a bug here must not end the publisher's connection
            logger.exception("feed %s: frame handling failed", self.id)

    def _on_frame(self, data: bytes, rtp_timestamp: int) -> None:
        if self.state == "stalled":
            self._set_state("live", "frames again")
        elif self.state != "live":
            return
        if self._rebase or self._last_in is None:
            out = self._last_out + (_REATTACH_STEP[self.kind] if self.frames_received else 0)
            self._rebase = False
        else:
            delta = (rtp_timestamp - self._last_in) & 0xFFFFFFFF
            if delta >= 0x80000000:
                delta -= 0x100000000  # reordered: a frame from the past
            out = self._last_out + delta
        self._last_in = rtp_timestamp
        self._last_out = max(self._last_out, out)

        now = time.monotonic()
        self.last_frame_at = now
        keyframe = is_keyframe(self.codec.mimeType, data)
        if keyframe and self._h264:
            data = self._with_parameter_sets(data)
        packet = av.Packet(data)
        packet.pts = out
        packet.time_base = self._time_base
        frame = EncodedFrame(data=data, pts=out, keyframe=keyframe, received_at=now,
                             wall=time.time(), packet=packet)
        if self._packetizer is not None:
            # Once per frame for every viewer; also keeps VP8 picture ids
            # continuous for cached frames replayed to late joiners.
            frame.payloads, _ = self._packetizer.pack(packet)
        self.frames_received += 1
        self.bytes_received += len(data)
        self._rate_bytes += len(data)
        if self.kind == "video":
            self._cache(frame)
        for attachment in self._fanout:
            if attachment.paused:
                continue
            if attachment.needs_keyframe:
                if not keyframe:
                    continue
                attachment.needs_keyframe = False
            if attachment.pending is not None:
                self._hold(attachment, frame)
                continue
            self._deliver(attachment, frame)

    def _deliver(self, attachment: _Attachment, frame: EncodedFrame) -> bool:
        """Hand one frame to one downstream, isolated from everyone else."""
        started = time.perf_counter()
        try:
            attachment.downstream.deliver(frame)
        except DownstreamBehind as exc:
            if exc.fatal:
                self._drop(attachment, "behind", exc)
                return False
            attachment.behind += 1
            self.stats.behind += 1
            logger.info("feed %s: %s fell behind (%s)", self.id,
                        attachment.downstream.downstream_id, exc)
            self.keyframes.request(attachment.requester)
            return True
        except DownstreamGone as exc:
            self._drop(attachment, "transport_gone", exc)
            return False
        except Exception as exc:
            logger.exception("feed %s: downstream %s failed", self.id,
                             attachment.downstream.downstream_id)
            self._drop(attachment, "failed", exc)
            return False
        attachment.delivered += 1
        if time.perf_counter() - started <= self._block_budget:
            attachment.slow = 0
            return True
        # One slow call is as likely the whole process being descheduled on a
        # loaded machine (seen in CI: a healthy viewer dropped 0.8 s into a
        # page's life); a downstream that really blocks does it every time.
        attachment.slow += 1
        if attachment.slow < BLOCKED_STRIKES:
            logger.info("feed %s: %s took over %.0f ms once", self.id,
                        attachment.downstream.downstream_id, self._block_budget * 1000)
            return True
        self._drop(attachment, "blocked", None)
        return False

    def _hold(self, attachment: _Attachment, frame: EncodedFrame) -> None:
        assert attachment.pending is not None
        if len(attachment.pending) >= self._media.viewer_queue_frames:
            # The replay is too slow to catch up: restart from a keyframe.
            if attachment.replay is not None:
                attachment.replay.cancel()
            attachment.replay = attachment.pending = None
            attachment.needs_keyframe = self.kind == "video"
            self.keyframes.request(attachment.requester)
            return
        attachment.pending.append(frame)

    def _with_parameter_sets(self, data: bytes) -> bytes:
        """Every H.264 keyframe carries its SPS and PPS: a joiner, or a viewer
        moved here from another layer, can decode it whatever the encoder sent
        before (some send the parameter sets only once, at the start)."""
        sets = h264_parameter_sets(data)
        if sets is not None:
            self._parameter_sets = sets
            return data
        if self._parameter_sets is not None and 5 in h264_nal_types(data):
            return self._parameter_sets + data
        return data

    def _cache(self, frame: EncodedFrame) -> None:
        if frame.keyframe:
            self._gop = [frame]
            self._gop_bytes = frame.size
            return
        if not self._gop:
            return
        self._gop.append(frame)
        self._gop_bytes += frame.size
        if self._gop_bytes > self._media.keyframe_cache_max_bytes:
            # Too long to replay usefully; joiners wait for the requested keyframe.
            self._gop.clear()
            self._gop_bytes = 0
        if len(self._gop) >= self._media.keyframe_cache_max_frames:
            # Keep the cache short so a late joiner's replay stays quick; this
            # also gives recordings a keyframe to seek to every few seconds.
            self.keyframes.request("cache")

    def request_keyframe(self, requester: str) -> bool:
        """Ask the publisher for a keyframe, through the Feed's policy."""
        if self.kind != "video":
            return False
        return self.keyframes.request(requester)

    # -- downstream side --------------------------------------------------
    def attach(self, downstream: Downstream, *, start: Start) -> None:
        """Start delivering to ``downstream`` (see ``plane.Start``)."""
        if self.state == "closed":
            downstream.dropped("feed_closed")
            return
        key = id(downstream)
        if key in self._attachments:
            return
        attachment = _Attachment(downstream, requester=downstream.downstream_id)
        self._attachments[key] = attachment
        self._fanout = tuple(self._attachments.values())
        if self.kind != "video" or start == "now":
            return
        if start == "cache" and self._gop:
            cached = list(self._gop)
            # The keyframe at once (a picture as soon as possible), the rest paced.
            if not self._deliver(attachment, cached[0]):
                return
            if len(cached) > 1:
                attachment.pending = []
                attachment.replay = asyncio.ensure_future(self._replay(attachment, cached[1:]))
            if len(cached) > FRESH_CACHE_FRAMES:
                # The cache gives a picture at once but starts in the past; a
                # fresh keyframe soon after brings the joiner to live.
                self.keyframes.request(attachment.requester)
            return
        # "keyframe", or a cache that is empty: the next keyframe from now on.
        attachment.needs_keyframe = True
        self.keyframes.request(attachment.requester)

    async def _replay(self, attachment: _Attachment, frames: list[EncodedFrame]) -> None:
        for frame in frames:
            await asyncio.sleep(REPLAY_SPACING_S)
            if attachment.pending is None or not self._deliver(attachment, frame):
                return
        while attachment.pending:
            frame = attachment.pending.pop(0)
            if not self._deliver(attachment, frame):
                return
        attachment.pending = None
        attachment.replay = None

    def detach(self, downstream: Downstream, reason: DropReason = "closed") -> None:
        """Stop delivering to ``downstream`` (its owner's choice: not counted as a drop)."""
        attachment = self._attachments.pop(id(downstream), None)
        if attachment is None:
            return
        self._fanout = tuple(self._attachments.values())
        self._release(attachment)

    def pause(self, downstream: Downstream) -> None:
        attachment = self._attachments.get(id(downstream))
        if attachment is not None and not attachment.paused:
            attachment.paused = True
            if attachment.replay is not None:
                attachment.replay.cancel()
            attachment.replay = attachment.pending = None

    def resume(self, downstream: Downstream) -> None:
        attachment = self._attachments.get(id(downstream))
        if attachment is not None and attachment.paused:
            attachment.paused = False
            if self.kind == "video":
                attachment.needs_keyframe = True
                self.keyframes.request(attachment.requester)

    @property
    def downstreams(self) -> list[Downstream]:
        return [a.downstream for a in self._fanout]

    def cached_frames(self) -> list[EncodedFrame]:
        """The last keyframe and the frames after it (video); empty for audio."""
        return list(self._gop)

    def _drop(self, attachment: _Attachment, reason: DropReason,
              error: BaseException | None) -> None:
        if self._attachments.pop(id(attachment.downstream), None) is None:
            return
        self._fanout = tuple(self._attachments.values())
        self._release(attachment)
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        logger.warning("feed %s: dropped downstream %s (%s%s)", self.id,
                       attachment.downstream.downstream_id, reason,
                       f": {error}" if error is not None else "")
        if self._on_dropped is not None:
            self._on_dropped(self, reason)
        try:
            attachment.downstream.dropped(reason)
        except Exception:
            logger.exception("feed %s: downstream %s failed while being dropped", self.id,
                             attachment.downstream.downstream_id)

    def _release(self, attachment: _Attachment) -> None:
        if attachment.replay is not None:
            attachment.replay.cancel()
        attachment.replay = attachment.pending = None
        self.keyframes.forget(attachment.requester)

    # -- liveness ---------------------------------------------------------
    def check_stall(self, now: float) -> None:
        """Liveness tick: a connected publisher that sends no frames is stalled.
        Also where the bitrate is measured (every tick, not every frame)."""
        if self._rate_since is None:
            self._rate_since = now
        elif now - self._rate_since >= 1.0:
            rate = self._rate_bytes * 8 / (now - self._rate_since)
            self.bitrate_bps = rate if not self.bitrate_bps else 0.7 * self.bitrate_bps + 0.3 * rate
            self._rate_bytes, self._rate_since = 0, now
        if self.state != "live" or not self._stall_after or self.last_frame_at is None:
            return
        quiet = now - self.last_frame_at
        if quiet >= self._stall_after:
            self._set_state("stalled", f"no frame for {quiet:.1f} s")

    # -- lifecycle --------------------------------------------------------
    def close(self, reason: str = "closed") -> None:
        """Close this Feed; every downstream is let go (viewers' Subscriptions close)."""
        if self.state == "closed":
            return
        if self._grace is not None:
            self._grace.cancel()
        self._grace = None
        self.keyframes.connect(None)
        self._gop.clear()
        if self.low is not None:
            self.low.close(reason)
        self._set_state("closed", reason)
        attachments, self._attachments, self._fanout = list(self._fanout), {}, ()
        for attachment in attachments:
            self._release(attachment)
            try:
                attachment.downstream.dropped("feed_closed")
            except Exception:
                logger.exception("feed %s: downstream %s failed while closing", self.id,
                                 attachment.downstream.downstream_id)
        self._on_closed(self)

    def _set_state(self, state: FeedState, reason: str) -> None:
        if state != self.state:
            logger.info("feed %s: %s -> %s (%s)", self.id, self.state, state, reason)
            self.state = state
            self._on_state(self)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slot": self.slot,
            "kind": self.kind,
            "codec": self.codec.mimeType,
            "state": self.state,
            **({"layers": ["full", "low"] if self.low is not None and self.low.state == "live"
                else ["full"]} if self.kind == "video" else {}),
        }
