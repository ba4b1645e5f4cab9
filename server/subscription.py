"""Subscription: one Feed delivered to one viewer, without decoding.

A Subscription is the local-viewer downstream of the media seam
(``server/media/plane.py``): it owns the viewer's peer connection, negotiates
it for its Feed, and takes the Feed's encoded frames out one of two ways:

- the **fast path** (``media.fast_path``, the default): the Feed's shared RTP
  payloads get this viewer's RTP header, SRTP and a synchronous ``sendto`` on
  the selected UDP pair (``server/media/fastpath.py``);
- **aiortc's sender**, when the fast path is off or cannot bind to the
  transport: frames go through a bounded :class:`FrameQueue` to a
  :class:`ForwardTrack`, whose ``recv()`` hands aiortc's RTCRtpSender encoded
  packets to packetize.

A :class:`ViewerPeer` owns the viewer's peer connection and answers its offer
for one or more Subscriptions (one per transceiver: a Feed per WHEP or
websocket subscribe; a camera with its narration for a WHEP-per-slot player).
The Feed only sees ``deliver``/``dropped``. Closing a Subscription detaches it
from the Feed first; the peer connection closes with its last Subscription;
nothing they started outlives them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import av
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .errors import Unprocessable
from .media import hooks
from .media.codecs import capabilities_for
from .media.fastpath import FastSender, negotiated_from, vp8_picture_id
from .media.h264 import (
    DEFAULT_PROFILE_LEVEL_ID,
    H264Refusal,
    H264Stream,
    choose_viewer_codec,
)
from .media.layers import Layer, LayerController, Preference
from .media.peers import negotiated_codecs
from .media.plane import DropReason, EncodedFrame, FrameQueue, Start
from .media.sdp import h264_payloads, keep_one_h264, relabel_h264, section_index

if TYPE_CHECKING:
    from .feed import Feed

logger = logging.getLogger(__name__)

SubscriptionState = Literal["waiting", "flowing", "paused", "closed"]

#: Answers an offer on a peer connection (``PeerFactory.answer``).
Answerer = Callable[[RTCPeerConnection, str], Awaitable[str]]


class ForwardTrack(MediaStreamTrack):
    """A track whose frames are already encoded: aiortc's sender packs, not encodes."""

    def __init__(self, kind: str, queue: FrameQueue,
                 on_sent: Callable[[EncodedFrame], None]) -> None:
        super().__init__()
        self.kind = kind
        self._queue = queue
        self._on_sent = on_sent
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def recv(self) -> av.Packet:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            frame = self._queue.get()
            if frame is not None:
                self._on_sent(frame)
                return frame.packet
            self._wakeup.clear()
            await self._wakeup.wait()


class ViewerPeer:
    """One viewer's peer connection and the Subscriptions it carries."""

    def __init__(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        self.subscriptions: list[Subscription] = []
        #: When ICE completed (server side): the server's share of a joiner's wait
        #: for its first frame starts here.
        self.ice_connected_at: float | None = None

    async def negotiate(self, subscriptions: list[Subscription], offer: str,
                        answer: Answerer) -> str:
        """Answer the viewer's offer: one sendonly transceiver per Subscription,
        matched to the offer's sections of its kind in order."""
        pc = self.pc
        self.subscriptions = list(subscriptions)
        transceivers = [sub.add_to(pc) for sub in subscriptions]
        relabels = []
        seen: dict[str, int] = {}
        for sub in subscriptions:
            nth = seen[sub.kind] = seen.get(sub.kind, -1) + 1
            section = section_index(offer, sub.kind, nth)
            if section is not None:
                offer, relabel = sub.fit_offer(offer, section)
                relabels.append(relabel)
        text = await answer(pc, offer)
        for relabel in relabels:
            text = relabel(text)
        # Parsed once here: joins come in bursts and SDP parsing is a good part of each.
        parsed = aiortc_sdp.SessionDescription.parse(text)
        for sub, transceiver in zip(subscriptions, transceivers, strict=True):
            sub.bind(transceiver, parsed)
        await pc.setLocalDescription(RTCSessionDescription(text, "answer"))

        @pc.on("connectionstatechange")
        def _connected() -> None:
            if pc.connectionState == "connected":
                for sub in list(self.subscriptions):
                    sub.connected()

        @pc.on("iceconnectionstatechange")
        def _ice() -> None:
            # aiortc has no "connected" ICE state: "completed" is when ICE is up.
            if self.ice_connected_at is None and pc.iceConnectionState == "completed":
                self.ice_connected_at = time.monotonic()
                for sub in self.subscriptions:
                    sub.ice_connected_at = self.ice_connected_at

        return text

    async def release(self, subscription: Subscription) -> None:
        """``subscription`` closed; the connection closes with the last one."""
        if subscription in self.subscriptions:
            self.subscriptions.remove(subscription)
        if not self.subscriptions:
            await self.pc.close()


#: A gap left in a viewer's outgoing timeline when it moves to another layer
#: (about one frame), so its decoder sees time go on, never back.
_SWITCH_STEP = {"video": 3000, "audio": 960}


class _Port:
    """One Subscription's attachment to one layer's Feed (a seam downstream)."""

    __slots__ = ("feed", "layer", "picture_id_offset", "pts_offset", "sub")

    def __init__(self, sub: Subscription, feed: Feed, layer: Layer) -> None:
        self.sub = sub
        self.feed = feed
        self.layer: Layer = layer
        self.pts_offset = 0
        self.picture_id_offset = 0

    @property
    def downstream_id(self) -> str:
        base = f"viewer:{self.sub.id}"
        return base if self.layer == "full" else f"{base}:{self.layer}"

    def deliver(self, frame: EncodedFrame) -> None:
        self.sub._from_port(self, frame)

    def dropped(self, reason: DropReason) -> None:
        self.sub._port_dropped(self, reason)


class Subscription:
    """See the module docstring. One camera (or audio) Feed to one viewer, on
    one outgoing stream, from whichever layer suits the viewer's link."""

    def __init__(
        self,
        *,
        subscription_id: str,
        feed: Feed,
        participant_id: str,
        peer: ViewerPeer,
        max_queue: int,
        fast_path: bool,
        on_closed: Callable[[Subscription], None],
        on_first_frame: Callable[[float], None] | None = None,
        on_layer: Callable[[Subscription, Layer, str], None] | None = None,
        on_state: Callable[[Subscription], None] | None = None,
        adaptive: bool = True,
        preference: Preference = "auto",
    ) -> None:
        self.id = subscription_id
        self.feed_id = feed.id
        self.participant_id = participant_id
        self.kind = feed.kind
        self.peer = peer
        self.pc = peer.pc
        self.state: SubscriptionState = "waiting"
        self.close_reason: DropReason | None = None
        self.frames_forwarded = 0
        self.bytes_forwarded = 0
        self.created_at = time.monotonic()
        #: When the viewer's ICE connected (server side) and when its first frame
        #: left: the server's share of a joiner's wait is the difference.
        self.ice_connected_at: float | None = None
        self.connected_at: float | None = None  # DTLS up: SRTP keys ready
        self.first_frame_at: float | None = None
        #: The token it was made with (revocation closes it); set by the Session.
        self.grant: Any = None
        #: What the viewer asked for ("auto": follow its link) and what it gets.
        self.preference: Preference = preference
        self.layer: Layer = "full"
        self.layer_switches = 0
        #: The viewer's last feedback: loss (0-1), REMB (bit/s), RTT (s).
        self.loss = 0.0
        self.remb_bps: float | None = None
        self.rtt_s: float | None = None
        self._feed = feed
        self._fast_path = fast_path
        self._on_closed = on_closed
        self._on_first_frame = on_first_frame
        self._on_layer = on_layer
        self._on_state = on_state
        self._adaptive = adaptive and feed.kind == "video"
        self.controller = LayerController()
        self._queue = FrameQueue(max_frames=max_queue, video=feed.kind == "video")
        self.track = ForwardTrack(feed.kind, self._queue, on_sent=self._count)
        self._fast: FastSender | None = None
        self._connected = False
        #: The port frames go out from, and the one waiting for its first keyframe.
        self._current: _Port | None = None
        self._target: _Port | None = None
        self._last_pts = 0
        self._last_picture_id: int | None = None
        self._closing: asyncio.Task[None] | None = None

    @property
    def path(self) -> str:
        """How frames leave: "fast" (shared packetization) or "sender" (aiortc's)."""
        return "fast" if self._fast is not None else "sender"

    # -- frames from the seam ---------------------------------------------------
    def _from_port(self, port: _Port, frame: EncodedFrame) -> None:
        if port is not self._current:
            if port is not self._target:
                return
            self._switch(port, frame)  # the target layer's first keyframe
        pts = frame.pts + port.pts_offset
        fast = self._fast
        if fast is not None:
            fast.send_frame(frame.payloads, pts, port.picture_id_offset)  # may raise Gone
            if self._vp8:
                self._last_picture_id = _first_picture_id(frame, port.picture_id_offset)
            self._last_pts = pts
            self._count(frame)
            return
        if port.pts_offset:
            frame = _shifted(frame, pts)
        self._last_pts = pts
        self._queue.put(frame)  # raises DownstreamBehind when it had to skip
        self.track.wake()

    def _switch(self, port: _Port, frame: EncodedFrame) -> None:
        """Continue the outgoing stream from ``port``'s layer at ``frame`` (a keyframe)."""
        old, self._current, self._target = self._current, port, None
        if old is not None:
            port.pts_offset = self._last_pts + _SWITCH_STEP[self.kind] - frame.pts
            if self._vp8 and self._last_picture_id is not None:
                first = _first_picture_id(frame, 0)
                if first is not None:
                    port.picture_id_offset = (self._last_picture_id + 1 - first) & 0x7FFF
            old.feed.detach(old, "closed")
            if self._fast is not None:
                self._fast.new_epoch()
        self.layer = port.layer
        self.layer_switches += 1
        self.controller.start(port.layer)
        if self._on_layer is not None:
            self._on_layer(self, port.layer, "switched")

    @property
    def _vp8(self) -> bool:
        return self._feed.mime_type.lower() == "video/vp8"

    def _port_dropped(self, port: _Port, reason: DropReason) -> None:
        if port is self._target:
            self._target = None
            if self._current is not None and self.state != "paused":
                self._current.feed.resume(self._current)  # it was held for the switch
            return
        if port is not self._current:
            return
        self._current = None
        if port.layer == "low" and reason == "feed_closed" and self.state != "closed":
            # The low layer went away (the publisher stopped sending it): back
            # to the full one, from its next keyframe.
            self._attach_layer("full", start="keyframe")
            return
        self.close(reason)

    # -- layers -------------------------------------------------------------------
    def _layer_feed(self, layer: Layer) -> Feed | None:
        if layer == "full":
            return self._feed
        low = self._feed.low
        return low if low is not None and low.state != "closed" else None

    def _attach_layer(self, layer: Layer, *, start: Start) -> None:
        feed = self._layer_feed(layer)
        if feed is None:
            feed, layer = self._feed, "full"
        port = _Port(self, feed, layer)
        if self._current is None:
            self._current = port
            self.layer = layer
            self.controller.start(layer)
        else:
            self._target = port
        feed.attach(port, start=start)

    def set_preference(self, preference: Preference) -> None:
        """The viewer pins a layer ("full", "low") or lets its link decide ("auto")."""
        if self.kind != "video":
            return
        self.preference = preference
        wanted: Layer = self.controller.layer if preference == "auto" else preference
        self._move(wanted, f"asked for {preference}")

    def _move(self, layer: Layer, reason: str) -> None:
        """Start moving to ``layer`` at its next keyframe (asked for through its policy)."""
        if self._current is None or self.state in ("closed", "paused"):
            self.layer = layer if self._layer_feed(layer) is not None else "full"
            return
        target = self._target.layer if self._target is not None else self._current.layer
        if layer == target or self._layer_feed(layer) is None:
            return
        if self._target is not None:
            self._target.feed.detach(self._target, "closed")
            self._target = None
            self._current.feed.resume(self._current)
        if layer == self._current.layer:
            return
        logger.info("subscription %s: %s -> %s layer (%s)", self.id, self._current.layer, layer,
                    reason)
        if layer == "low" and self.preference == "auto":
            # The link is overloaded: stop filling it with the full layer now, so
            # the low layer's keyframe (and its retransmissions) get through.
            # Nor resend what the full layer already sent: those packets would
            # compete with the keyframe for the same link.
            self._current.feed.pause(self._current)
            if self._fast is not None:
                self._fast.new_epoch()
        self._attach_layer(layer, start="keyframe")

    def on_feedback(self, loss: float, jitter: int, rtt: float | None) -> None:
        """A receiver report from the viewer: maybe move between layers."""
        self.loss = loss
        if rtt is not None:
            self.rtt_s = rtt
        if not self._adaptive or self.preference != "auto" or self._feed.low is None:
            return
        full_bps = self._feed.bitrate_bps or None
        wanted = self.controller.on_report(loss, self.remb_bps, full_bps)
        if wanted is not None:
            self._move(wanted, f"loss {loss:.0%}, REMB "
                       f"{'-' if self.remb_bps is None else f'{self.remb_bps / 1000:.0f}'} kbit/s")

    def on_remb(self, bitrate: float) -> None:
        self.remb_bps = bitrate

    # -- negotiation ----------------------------------------------------------
    def add_to(self, pc: RTCPeerConnection) -> Any:
        """This Subscription's transceiver: the Feed's codec, and only it."""
        transceiver = pc.addTransceiver(self.track, direction="sendonly")
        transceiver.setCodecPreferences(capabilities_for(self._feed.codec))
        return transceiver

    def fit_offer(self, offer: str, section: int) -> tuple[str, Callable[[str], str]]:
        """H.264: pick the player's payload type that decodes what the Feed really
        sends (its SPS, not its label), and show aiortc only that one. Returns the
        offer for aiortc and how to put the player's label back on our answer."""
        if self._feed.mime_type.lower() != "video/h264":
            return offer, lambda answer: answer
        feed = self._feed
        stream = feed.h264 or H264Stream.from_label(str(
            feed.codec.parameters.get("profile-level-id", DEFAULT_PROFILE_LEVEL_ID)))
        try:
            choice = choose_viewer_codec(stream, h264_payloads(offer, section), feed.id)
        except H264Refusal as refusal:
            raise Unprocessable(refusal.message, code=refusal.code) from None
        preferred = capabilities_for(feed.codec)[0]
        as_profile = str(preferred.parameters.get("profile-level-id", "42e01f"))
        fitted = keep_one_h264(offer, section, choice.payload_type, as_profile)
        return fitted, lambda answer: relabel_h264(answer, section, choice.payload_type,
                                                   choice.profile_level_id)

    def bind(self, transceiver: Any, answer: aiortc_sdp.SessionDescription) -> None:
        """What our answer fixed for this transceiver: codec, fast path, feedback."""
        feed = self._feed
        negotiated = negotiated_codecs(answer).get(transceiver.mid or "")
        if negotiated is None or negotiated.mimeType.lower() != feed.mime_type.lower():
            raise Unprocessable(f"viewer cannot receive {feed.mime_type}, which "
                                f"{feed.id} is published in", code="codec_mismatch")
        hooks.redirect_keyframe_requests(transceiver.sender, self.on_keyframe_request)
        if self.kind == "video":
            hooks.observe_viewer_feedback(transceiver.sender, self.on_feedback, self.on_remb)
        if self._fast_path:
            media = next(m for m in answer.media if m.rtp.muxId == transceiver.mid)
            self._fast = FastSender(transceiver.sender,
                                    negotiated_from(media, transceiver.mid or ""),
                                    ntp_clock=self._ntp_at)

    def _ntp_at(self, pts: int) -> int | None:
        port = self._current
        if port is None:
            return None
        return port.feed.ntp_at(pts - port.pts_offset)

    async def negotiate(self, offer: str, answer: Answerer) -> str:
        """Answer the viewer's offer for this Subscription's Feed alone."""
        return await self.peer.negotiate([self], offer, answer)

    def connected(self) -> None:
        """The viewer's connection is up: the Feed starts it from its cache."""
        if self._connected or self.state == "closed":
            return
        self._connected = True
        self.connected_at = time.monotonic()
        if self._fast is not None and not self._fast.activate():
            # No synchronous UDP pair to write to: aiortc's own sender carries it.
            logger.info("subscription %s: fast path unavailable, using aiortc's sender",
                        self.id)
            self._fast = None
        self._start()

    def _start(self) -> None:
        if self._connected and self._current is None and self.state not in ("closed", "paused"):
            layer: Layer = "low" if self.preference == "low" else "full"
            self._attach_layer(layer, start="cache")

    # -- viewer feedback ------------------------------------------------------
    def on_keyframe_request(self) -> None:
        """The viewer lost a picture (PLI/FIR): through the Feed's policy."""
        port = self._current
        if port is not None:
            port.feed.request_keyframe(port.downstream_id)

    def pause(self) -> None:
        """Stop sending (a hidden video); the connection stays up."""
        if self.state in ("closed", "paused"):
            return
        self._set_state("paused")
        if self._target is not None:
            self._target.feed.detach(self._target, "closed")
            self._target = None
        if self._current is not None:
            self._current.feed.pause(self._current)
        self._queue.clear()

    def resume(self) -> None:
        if self.state != "paused":
            return
        self._set_state("flowing" if self.first_frame_at is not None else "waiting")
        if self._current is not None:
            self._current.feed.resume(self._current)
        else:
            self._start()  # paused before its connection came up: start from the cache

    def _set_state(self, state: SubscriptionState) -> None:
        if state != self.state:
            self.state = state
            if self._on_state is not None:
                self._on_state(self)

    def _count(self, frame: EncodedFrame) -> None:
        if self.first_frame_at is None:
            self.first_frame_at = time.monotonic()
            if self.state == "waiting":
                self._set_state("flowing")
            if self._on_first_frame is not None:
                self._on_first_frame(self.first_frame_at - self.created_at)
        self.frames_forwarded += 1
        self.bytes_forwarded += frame.size

    # -- lifecycle -------------------------------------------------------------
    def close(self, reason: DropReason = "closed") -> asyncio.Task[None]:
        """Detach from the Feed, then close the peer connection; idempotent.
        Returns the closing task."""
        if self._closing is None:
            self.state = "closed"
            self.close_reason = reason
            for port in (self._current, self._target):
                if port is not None:
                    port.feed.detach(port, reason)
            self._current = self._target = None
            self.track.stop()
            self._closing = asyncio.ensure_future(self._close())
        return self._closing

    async def _close(self) -> None:
        try:
            await self.peer.release(self)
        except Exception:  # the peer may already be gone; closing must finish
            logger.exception("subscription %s: closing peer failed", self.id)
        self._on_closed(self)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "feed": self.feed_id, "state": self.state, "path": self.path,
                "layer": self.layer, "preference": self.preference}


def _first_picture_id(frame: EncodedFrame, offset: int) -> int | None:
    if not frame.payloads:
        return None
    picture_id = vp8_picture_id(frame.payloads[0])
    return None if picture_id is None else (picture_id + offset) & 0x7FFF


def _shifted(frame: EncodedFrame, pts: int) -> EncodedFrame:
    """The same frame at another pts, for aiortc's sender (which reads the packet's)."""
    packet = av.Packet(frame.data)
    packet.pts = pts
    if frame.packet is not None:
        packet.time_base = frame.packet.time_base
    return EncodedFrame(data=frame.data, pts=pts, keyframe=frame.keyframe,
                        received_at=frame.received_at, wall=frame.wall, packet=packet)
