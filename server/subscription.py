"""Subscription: one Feed delivered to one viewer, without decoding.

A Subscription owns the viewer's peer connection and a ForwardTrack whose
``recv()`` returns the Feed's encoded frames as ``av.Packet``; aiortc's
RTCRtpSender then only packetizes them. Closing a Subscription closes its peer
connection; nothing it started outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .media.fastpath import FastSender

logger = logging.getLogger(__name__)

#: Spacing between replayed cached frames: a whole GOP sent in one burst
#: overflows the viewer's socket buffers and turns into retransmissions.
REPLAY_SPACING_S = 0.003


@dataclass(slots=True)
class EncodedFrame:
    """One complete encoded frame on its Feed's continuous timeline.

    ``packet`` is shared by every Subscription of the Feed: senders only read it.
    """

    packet: av.Packet
    keyframe: bool
    size: int
    received_at: float
    #: The Feed's continuous RTP timeline (the packet's pts).
    pts: int = 0
    #: RTP payloads, packetized once by the Feed for every fast-path viewer.
    payloads: list[bytes] = field(default_factory=list)


class ForwardTrack(MediaStreamTrack):
    """A track whose frames are already encoded: aiortc's sender packs, not encodes."""

    def __init__(self, kind: str, on_sent: Callable[[EncodedFrame], None] | None = None) -> None:
        super().__init__()
        self.kind = kind
        self._on_sent = on_sent
        self._queue: deque[EncodedFrame | None] = deque()
        self._wakeup = asyncio.Event()
        self._replay_left = 0

    def push(self, frame: EncodedFrame | None) -> None:
        self._queue.append(frame)
        self._wakeup.set()

    def replay(self, frames: list[EncodedFrame]) -> None:
        self._queue.extend(frames)
        self._replay_left = max(0, len(frames) - 1)
        self._wakeup.set()

    def clear(self) -> None:
        self._queue.clear()
        self._replay_left = 0

    @property
    def pending(self) -> int:
        # Not __len__: aiortc tests a sender's track for truth, and an empty
        # queue would read as "no track".
        return len(self._queue)

    async def recv(self) -> av.Packet:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if self._queue:
                item = self._queue.popleft()
                if item is None:
                    self.stop()
                    raise MediaStreamError
                if self._replay_left:
                    self._replay_left -= 1
                    await asyncio.sleep(REPLAY_SPACING_S)
                if self._on_sent is not None:
                    self._on_sent(item)
                return item.packet
            self._wakeup.clear()
            await self._wakeup.wait()


SubscriptionState = Literal["waiting", "flowing", "closed"]


class Subscription:
    def __init__(
        self,
        *,
        subscription_id: str,
        feed_id: str,
        participant_id: str,
        kind: str,
        max_queue: int,
        request_keyframe: Callable[[], None],
        close_peer: Callable[[], Awaitable[None]],
        on_closed: Callable[[Subscription], None],
        on_first_frame: Callable[[float], None] | None = None,
    ) -> None:
        self.id = subscription_id
        self.feed_id = feed_id
        self.participant_id = participant_id
        self.kind = kind
        # Counted when aiortc's sender takes a frame, not when it is queued.
        self.track = ForwardTrack(kind, on_sent=lambda frame: self._count([frame]))
        self.state: SubscriptionState = "waiting"
        self.frames_forwarded = 0
        self.bytes_forwarded = 0
        self.created_at = time.monotonic()
        self.first_frame_at: float | None = None
        self._max_queue = max_queue
        self._request_keyframe = request_keyframe
        self._close_peer = close_peer
        self._on_closed = on_closed
        self._on_first_frame = on_first_frame
        self._needs_keyframe = kind == "video"
        self._closing: asyncio.Task[None] | None = None
        #: The token it was made with (revocation closes it); set by the Session.
        self.grant: Any = None
        # Fast path: frames go straight out once the viewer is connected.
        self._fast: FastSender | None = None
        self._active = False
        self._replay: asyncio.Task[None] | None = None
        self._pending: deque[EncodedFrame] = deque()

    @property
    def fast(self) -> bool:
        return self._fast is not None

    @property
    def path(self) -> str:
        """How frames leave: "fast" (shared packetization) or "sender" (aiortc's)."""
        return "fast" if self._fast is not None else "sender"

    def use_fast_path(self, fast: FastSender) -> None:
        """Before the viewer connects: send through ``fast`` instead of the track."""
        self._fast = fast

    def connected(self, gop: list[EncodedFrame]) -> None:
        """The viewer's connection is up: start from ``gop`` (the Feed's cache)."""
        if self._fast is None or self._active or self.state == "closed":
            return
        if not self._fast.activate():
            # A relayed (TURN) connection: aiortc's own sender carries it.
            self._fast = None
            self.prime(gop)
            return
        self._active = True
        if self.kind == "video":
            if gop and gop[0].keyframe:
                self._needs_keyframe = False
                self._replay = asyncio.ensure_future(self._replay_then_live(list(gop)))
            else:
                self._request_keyframe()

    async def _replay_then_live(self, frames: list[EncodedFrame]) -> None:
        fast = self._fast
        for index, frame in enumerate(frames):
            if fast is None or self.state == "closed":
                return
            if index:
                await asyncio.sleep(REPLAY_SPACING_S)
            fast.send_frame(frame.payloads, frame.pts)
            self._count([frame])
        while self._pending and fast is not None and self.state != "closed":
            frame = self._pending.popleft()
            fast.send_frame(frame.payloads, frame.pts)
            self._count([frame])
        self._replay = None

    def prime(self, frames: list[EncodedFrame]) -> None:
        """Start from the Feed's cached keyframe and the frames after it."""
        if frames and frames[0].keyframe:
            self.track.replay(frames)
            self._needs_keyframe = False

    def deliver(self, frame: EncodedFrame) -> None:
        if self.state == "closed":
            return
        if self._fast is not None:
            self._deliver_fast(self._fast, frame)
            return
        if self._needs_keyframe:
            if not frame.keyframe:
                return
            self._needs_keyframe = False
        elif frame.keyframe and self.track.pending > 2:
            # Behind by more than a couple of frames: a keyframe lets the viewer
            # skip the backlog instead of the server buffering it.
            self.track.clear()
        if self.track.pending >= self._max_queue:
            self.track.clear()
            self._needs_keyframe = self.kind == "video"
            if self._needs_keyframe:
                self._request_keyframe()
            return
        self.track.push(frame)

    def _deliver_fast(self, fast: FastSender, frame: EncodedFrame) -> None:
        if not self._active:
            return  # not connected yet: it will start from the Feed's cache
        if self._needs_keyframe:
            if not frame.keyframe:
                return
            self._needs_keyframe = False
        if self._replay is not None:
            if len(self._pending) >= self._max_queue:
                self._pending.clear()
                self._needs_keyframe = self.kind == "video"
                self._request_keyframe()
                return
            self._pending.append(frame)
            return
        fast.send_frame(frame.payloads, frame.pts)
        self._count([frame])

    def on_keyframe_request(self) -> None:
        """The viewer lost a picture (PLI/FIR)."""
        self._request_keyframe()

    def _count(self, frames: list[EncodedFrame]) -> None:
        if self.first_frame_at is None:
            self.first_frame_at = time.monotonic()
            self.state = "flowing"
            if self._on_first_frame is not None:
                self._on_first_frame(self.first_frame_at - self.created_at)
        self.frames_forwarded += len(frames)
        self.bytes_forwarded += sum(f.size for f in frames)

    def close(self) -> asyncio.Task[None]:
        """Close the peer connection; idempotent. Returns the closing task."""
        if self._closing is None:
            self.state = "closed"
            self.track.push(None)
            if self._replay is not None:
                self._replay.cancel()
            self._closing = asyncio.ensure_future(self._close())
        return self._closing

    async def _close(self) -> None:
        try:
            await self._close_peer()
        except Exception:  # the peer may already be gone; closing must finish
            logger.exception("subscription %s: closing peer failed", self.id)
        self._on_closed(self)
