"""Feed: one incoming camera or audio source of a Session, fanned out encoded.

A Feed outlives its publisher's connection: when the publisher drops, the Feed
goes ``down`` and keeps its Subscriptions for ``feed_grace_s``; a publisher that
reconnects to the same slot re-attaches and viewers resume without reloading,
because the Feed keeps one continuous RTP timeline across publishers.

Late joiners start from a cache of the last keyframe and the frames after it;
keyframe requests to the publisher are rate-limited and coalesced, so thirty
joins are at most a couple of requests upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Literal

import av
from aiortc import RTCRtpCodecParameters

from .config import MediaConfig
from .media.codecs import is_keyframe
from .media.fastpath import shared_packetizer
from .subscription import EncodedFrame, Subscription

logger = logging.getLogger(__name__)

FeedState = Literal["live", "down", "closed"]

#: A cache longer than this (frames) makes a joiner ask for a fresh keyframe.
FRESH_CACHE_FRAMES = 15

#: Gap inserted into the outgoing timeline when a publisher re-attaches.
_REATTACH_STEP = {"video": 3000, "audio": 960}


class Feed:
    def __init__(
        self,
        *,
        feed_id: str,
        slot: str,
        kind: str,
        codec: RTCRtpCodecParameters,
        media: MediaConfig,
        on_state: Callable[[Feed], None],
        on_closed: Callable[[Feed], None],
    ) -> None:
        self.id = feed_id
        self.slot = slot
        self.kind = kind
        self.codec = codec
        self.state: FeedState = "down"
        self.frames_received = 0
        self.bytes_received = 0
        self.keyframe_requests_sent = 0
        self.subscriptions: dict[str, Subscription] = {}
        self._media = media
        self._on_state = on_state
        self._on_closed = on_closed
        self._time_base = Fraction(1, codec.clockRate)
        self._upstream_keyframe: Callable[[], bool] | None = None
        # Continuous outgoing timeline across publishers.
        self._last_in: int | None = None
        self._last_out = 0
        self._rebase = True
        # Late-joiner cache: last keyframe and what followed it.
        self._gop: list[EncodedFrame] = []
        self._gop_bytes = 0
        # Upstream keyframe requests: at most one per interval, later ones coalesce.
        self._last_request = -1e9
        self._deferred_request: asyncio.TimerHandle | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._frame_listeners: list[Callable[[EncodedFrame], None]] = []
        self._packetizer = shared_packetizer(codec) if media.fast_path else None

    # -- publisher side ---------------------------------------------------
    def attach(self, request_keyframe: Callable[[], bool]) -> Callable[[bytes, int], None]:
        """A publisher (first or returning) feeds this Feed; returns its frame sink."""
        if self.state == "closed":
            raise RuntimeError(f"feed {self.id} is closed")
        self._upstream_keyframe = request_keyframe
        self._rebase = True
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._set_state("live")
        return self.on_frame

    def detach(self, *, final: bool) -> None:
        """The publisher is gone: for good (``final``) or perhaps for a while."""
        if self.state == "closed":
            return
        self._upstream_keyframe = None
        self._gop.clear()
        self._gop_bytes = 0
        if final:
            self.close()
            return
        self._set_state("down")
        loop = asyncio.get_running_loop()
        self._grace = loop.call_later(self._media.feed_grace_s, self.close)

    def on_frame(self, data: bytes, rtp_timestamp: int) -> None:
        """Called by the receiver tap for every complete encoded frame."""
        if self.state != "live":
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

        keyframe = is_keyframe(self.codec.mimeType, data)
        packet = av.Packet(data)
        packet.pts = out
        packet.time_base = self._time_base
        frame = EncodedFrame(packet=packet, keyframe=keyframe, size=len(data),
                             received_at=time.monotonic(), pts=out)
        if self._packetizer is not None:
            # Once per frame for every viewer; also keeps VP8 picture ids
            # continuous for cached frames replayed to late joiners.
            frame.payloads, _ = self._packetizer.pack(packet)
        self.frames_received += 1
        self.bytes_received += len(data)
        if self.kind == "video":
            self._cache(frame)
        for subscription in self.subscriptions.values():
            subscription.deliver(frame)
        for listener in self._frame_listeners:
            try:
                listener(frame)
            except Exception:  # a consumer's bug must not stop the live path
                logger.exception("feed %s: frame listener failed", self.id)

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
            self.request_keyframe()

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe, at most once per interval."""
        if self.kind != "video" or self._upstream_keyframe is None:
            return
        interval = self._media.keyframe_request_interval_ms / 1000
        now = time.monotonic()
        wait = self._last_request + interval - now
        if wait > 0:
            if self._deferred_request is None:
                loop = asyncio.get_running_loop()
                self._deferred_request = loop.call_later(wait, self._send_deferred)
            return
        self._last_request = now
        if self._upstream_keyframe():
            self.keyframe_requests_sent += 1

    def _send_deferred(self) -> None:
        self._deferred_request = None
        self.request_keyframe()

    # -- viewer side ------------------------------------------------------
    def add_subscription(self, subscription: Subscription) -> None:
        self.subscriptions[subscription.id] = subscription
        if self.kind == "video" and len(self._gop) > FRESH_CACHE_FRAMES:
            # The cache gives a picture at once but starts in the past; a fresh
            # keyframe soon after brings the joiner to live.
            self.request_keyframe()
        if self.kind != "video" or subscription.fast:
            return  # a fast-path viewer starts from the cache once connected
        if self._gop:
            subscription.prime(list(self._gop))
        else:
            self.request_keyframe()

    def cached_frames(self) -> list[EncodedFrame]:
        """The last keyframe and the frames after it (video); empty for audio."""
        return list(self._gop)

    def remove_subscription(self, subscription: Subscription) -> None:
        self.subscriptions.pop(subscription.id, None)

    def add_frame_listener(self, listener: Callable[[EncodedFrame], None], *,
                           replay_cache: bool = False) -> Callable[[], None]:
        """In-process consumers of encoded frames (the recorder); returns an
        unsubscribe. ``replay_cache`` first hands over the cached keyframe and
        what followed, so a consumer need not wait for the next keyframe."""
        if replay_cache:
            for frame in list(self._gop):
                listener(frame)
        self._frame_listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._frame_listeners:
                self._frame_listeners.remove(listener)

        return unsubscribe

    # -- lifecycle --------------------------------------------------------
    def close(self) -> None:
        """Close this Feed and, in cascade, every Subscription to it."""
        if self.state == "closed":
            return
        for handle in (self._grace, self._deferred_request):
            if handle is not None:
                handle.cancel()
        self._grace = self._deferred_request = None
        self._upstream_keyframe = None
        self._gop.clear()
        self._set_state("closed")
        for subscription in list(self.subscriptions.values()):
            subscription.close()
        self._on_closed(self)

    def _set_state(self, state: FeedState) -> None:
        if state != self.state:
            self.state = state
            self._on_state(self)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slot": self.slot,
            "kind": self.kind,
            "codec": self.codec.mimeType,
            "state": self.state,
            "viewers": len(self.subscriptions),
        }
