"""Session: one live teaching event, the unit of permission, routing and recording.

Close cascade (docs/architecture.md): ``Session.end()`` closes every Ingest
(publisher peer connection) and every Feed; a Feed closing closes its
Subscriptions; a Subscription closing closes its viewer peer connection.
``Session.end()`` returns only when all of those peer connections are closed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiortc import RTCPeerConnection, RTCRtpCodecParameters, RTCRtpReceiver, RTCSessionDescription

from .config import Config
from .errors import BadRequest, Conflict, Forbidden, Gone, NotFound, Unprocessable
from .feed import Feed
from .interaction import MIC_SLOT, Interaction
from .media import hooks
from .media.codecs import capabilities_for
from .media.h264 import H264Stream, fit_h264_publisher, inspect_frame
from .media.hooks import FrameSink
from .media.layers import LowLayerMaker
from .media.peers import GONE_CLOSED, PeerFactory, negotiated_codecs
from .media.plane import DropReason
from .media.sdp import add_bitrate_hints, check_offer
from .participant import Participant
from .roles import MEDIA_VIEWERS, MODERATORS, PUBLISHERS, VIEWERS, Role
from .subscription import Subscription, ViewerPeer
from .theatre import Theatre, check_name
from .tokens import Grant

logger = logging.getLogger(__name__)

SessionState = Literal["live", "ended"]
Event = dict[str, Any]

#: Codecs a new Feed may be published in, most preferred first.
PUBLISH_PREFERENCE = ["video/VP8", "video/H264", "audio/opus"]


#: A DELETE of a WHIP/WHEP resource that ended this recently (same token) is a 200.
ENDED_RESOURCE_MEMORY_S = 60.0

#: The slot whose audio is the Session's narration (docs/protocol.md).
NARRATION_SLOT = "narration"


def _no_remb(bitrate: int) -> int | None:
    return None


def _plus(extra: int, bitrate: int) -> int | None:
    return bitrate + extra


def _new_id() -> str:
    # Resource ids appear in WHIP/WHEP Location URLs: unguessable on purpose.
    return secrets.token_urlsafe(18)


#: Counts a media-plane event for /metrics: (what, label), e.g. ("drop", "failed").
Count = Callable[[str, str], None]
#: Registers a stream check with the Node's liveness task; returns an unwatch.
WatchStream = Callable[[Callable[[float], None]], Callable[[], None]]


#: How a publication reached us: the expert's broadcast page (websocket) or an
#: encoder (WHIP: `scrubin publish`, OBS, a hardware encoder).
Via = Literal["page", "whip"]


def notify(listeners: set[Callable[[Event], None]], event: Event, session_id: str) -> None:
    """Give ``event`` to every listener; one that raises is logged, not the others' problem."""
    for listener in list(listeners):
        try:
            listener(event)
        except Exception:
            logger.exception("session %s: listener failed", session_id)


class Ingest:
    """The expert's peer connection into one camera slot; it feeds 1–2 Feeds."""

    def __init__(self, ingest_id: str, slot: str, participant_id: str,
                 pc: RTCPeerConnection, *, via: Via = "whip", name: str = "") -> None:
        self.id = ingest_id
        self.slot = slot
        self.participant_id = participant_id
        self.pc = pc
        self.via: Via = via
        self.name = name
        self.feeds: list[Feed] = []
        self.created_at = time.time()
        self._closed = False
        #: The token it was published with (revocation closes it).
        self.grant: Grant | None = None
        self._requests: set[asyncio.Task[int]] = set()

    def keyframe_requester(self, receiver: RTCRtpReceiver) -> Callable[[], bool]:
        """A narrow callable for a Feed: send one PLI upstream, now."""
        return hooks.picture_loss_requester(receiver, lambda: not self._closed, self._requests)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self, *, final: bool, reason: str = "publisher left") -> None:
        """Stop receiving. ``final`` closes the Feeds; otherwise they wait for a
        reconnecting publisher."""
        if self._closed:
            return
        self._closed = True
        for feed in self.feeds:
            feed.publisher_gone(final=final, reason=reason)
        await self.pc.close()


@dataclass
class SlotView:
    """One WHEP-per-slot player: the Subscriptions its one peer connection carries."""

    id: str
    slot: str
    subscriptions: list[Subscription]

    @property
    def participant_id(self) -> str:
        return self.subscriptions[0].participant_id if self.subscriptions else ""


class Session:
    def __init__(
        self,
        *,
        session_id: str,
        theatre: Theatre,
        title: str,
        config: Config,
        peers: PeerFactory,
        node_id: str,
        procedure: str = "",
        totals: Counter[str] | None = None,
        on_first_frame: Callable[[float], None] | None = None,
        on_ended: Callable[[Session], None] | None = None,
        count: Count | None = None,
        watch_stream: WatchStream | None = None,
    ) -> None:
        check_name("session", session_id)
        self.id = session_id
        self.theatre = theatre
        self.title = title
        self.procedure = procedure
        self.state: SessionState = "live"
        #: Ended here only: it lives on on another Node (``end(moved=True)``).
        self.moved = False
        self.created_at = time.time()
        self.feeds: dict[str, Feed] = {}
        self.ingests: dict[str, Ingest] = {}
        self.subscriptions: dict[str, Subscription] = {}
        #: WHEP-per-slot resources: a camera and its narration on one connection.
        self.slot_views: dict[str, SlotView] = {}
        #: Resource id -> (where, token id, when it ended): see recently_ended().
        self._ended: dict[str, tuple[str, str, float]] = {}
        self.participants: dict[str, Participant] = {}
        self._config = config
        self._peers = peers
        self._node_id = node_id
        self._listeners: set[Callable[[Event], None]] = set()
        self._pending: set[asyncio.Task[Any]] = set()
        # Node-wide totals of what closed Feeds and Subscriptions carried.
        self._totals: Counter[str] = totals if totals is not None else Counter()
        self._on_first_frame = on_first_frame
        self._on_ended = on_ended
        self._count = count or (lambda what, label: None)
        self._watch_stream = watch_stream
        self._unwatch_feeds: dict[int, Callable[[], None]] = {}
        #: Low layers this Node makes (decode once, encode once), by full Feed id.
        self._makers: dict[str, LowLayerMaker] = {}
        #: Awaited by end() after the close cascade (the recorder stopping).
        self.end_hooks: list[Callable[[], Awaitable[None]]] = []
        #: Drawings, steps, questions, chat, hands, the trainee microphone.
        self.interaction = Interaction(
            procedure=procedure or title, started_at=self.created_at, emit=self._emit,
            listen=self.listen, participant=self.participants.get,
            has_video_feed=self._has_video_feed, close_mic=self._close_mic)

    # -- events -----------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Tell every listener (websockets, a recording) about ``event``."""
        self._emit(event)

    def listen(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def _emit(self, event: Event) -> None:
        notify(self._listeners, event, self.id)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "procedure": self.procedure,
            "state": self.state,
            "theatre": self.theatre.describe(),
            "feeds": [self.describe_feed(f) for f in self.feeds.values()
                      if f.state != "closed"],
        }

    def describe_feed(self, feed: Feed) -> dict[str, Any]:
        viewers = relays = 0
        for s in self.subscriptions.values():
            if s.feed_id == feed.id and s.state != "closed":
                # An edge's relay is a Node, not a viewer (its viewers are on it).
                if s.grant is not None and s.grant.role is Role.RELAY:
                    relays += 1
                else:
                    viewers += 1
        owner = self.slot_owner(feed.slot)
        publisher = None if owner is None else {"id": owner.participant_id, "name": owner.name,
                                                "via": owner.via}
        return {**feed.describe(), "viewers": viewers, "relays": relays, "publisher": publisher}

    def roster(self) -> list[dict[str, object]]:
        return [p.describe() for p in self.participants.values()]

    # -- participants -----------------------------------------------------
    def join(self, grant: Grant) -> Participant:
        return self.join_member(grant.participant_id, grant.role, grant.name or grant.role.value)

    def join_member(self, participant_id: str, role: Role, name: str,
                    node_id: str | None = None) -> Participant:
        """One more connection of a Participant; ``node_id``: the Node its
        websocket is on, when not this one (server/cluster.py)."""
        self._require_live()
        participant = self.participants.get(participant_id)
        if participant is None:
            participant = Participant(id=participant_id, role=role, name=name,
                                      node_id=node_id or self._node_id)
            self.participants[participant.id] = participant
        participant.connections += 1
        if participant.connections == 1:
            self._emit({"type": "participant_joined", "participant": participant.describe()})
        return participant

    def leave(self, participant_id: str) -> None:
        participant = self.participants.get(participant_id)
        if participant is None:
            return
        participant.connections -= 1
        if participant.connections > 0:
            return
        # Subscriptions belong to the connection that made them (a websocket
        # closes its own; WHEP ones live until DELETE or their peer fails).
        del self.participants[participant_id]
        self._emit({"type": "participant_left", "participant": participant.describe()})

    # -- publishing -------------------------------------------------------
    def slot_owner(self, slot: str) -> Ingest | None:
        """The connection that publishes ``slot`` now, if any (one at a time)."""
        return next((i for i in self.ingests.values() if i.slot == slot and not i.closed), None)

    def _check_owner(self, grant: Grant, slot: str, via: Via, takeover: bool) -> Ingest | None:
        """One publisher per slot. Returns the holder this publication replaces.

        The same Participant reconnecting replaces its own connection. Anyone
        else needs ``takeover``: the expert's page may take a slot from anyone
        (an encoder left running, its own other device); an encoder may take one
        from another encoder, never from the expert's page.
        """
        holder = self.slot_owner(slot)
        if holder is None or holder.participant_id == grant.participant_id:
            return holder
        what = "the expert's page" if holder.via == "page" else "an encoder"
        who = f"{holder.name} ({what})" if holder.name else what
        if not takeover:
            raise Conflict(f"{slot} is being published by {who}; publish with takeover to "
                           "replace it", code="slot_taken")
        if via == "whip" and holder.via == "page":
            raise Forbidden(f"{slot} is published by {who}; an encoder may not take over "
                            "the expert's camera", code="takeover_refused")
        return holder

    async def publish(self, grant: Grant, slot: str, offer: str, *, via: Via = "whip",
                      takeover: bool = False) -> tuple[str, Ingest]:
        """Answer a publisher's offer for ``slot``; its media become Feeds.
        The trainee granted the microphone publishes audio to ``MIC_SLOT``."""
        self._check_publisher(grant, slot)
        self._require_live()
        self._check_owner(grant, slot, via, takeover)
        limits = self._config.limits
        summary = check_offer(offer, max_bytes=limits.max_sdp_bytes,
                              max_media=limits.max_media_sections,
                              allowed_networks=self._peers.allowed_networks,
                              want_direction="send")
        if summary.kinds.count("audio") > 1 or summary.kinds.count("video") > 2:
            raise Unprocessable("a slot carries one audio track and one video track, "
                                "optionally with a low layer (a second video section)",
                                code="sdp_duplicate_kind")
        with_low = summary.kinds.count("video") == 2
        if with_low and slot == MIC_SLOT:
            raise Unprocessable("the trainee microphone carries audio only",
                                code="sdp_kind_mismatch")
        if slot == MIC_SLOT and summary.kinds != ["audio"]:
            raise Unprocessable("the trainee microphone carries audio only",
                                code="sdp_kind_mismatch")
        new_feeds = [k for k in set(summary.kinds) if f"{slot}.{k}" not in self.feeds]
        live = sum(1 for f in self.feeds.values() if f.state != "closed")
        if live + len(new_feeds) > limits.max_feeds_per_session:
            raise Conflict(f"session has its maximum of {limits.max_feeds_per_session} feeds",
                           code="too_many_feeds")

        pc = self._peers.create()
        offer = summary.text
        relabels: list[Callable[[str], str]] = []
        labelled: H264Stream | None = None
        videos = 0
        try:
            for kind in summary.kinds:
                transceiver = pc.addTransceiver(kind, direction="recvonly")
                existing = self.feeds.get(f"{slot}.{kind}")
                if existing is not None and existing.state != "closed":
                    # A returning publisher must keep the codec viewers negotiated.
                    preferred = capabilities_for(existing.codec)
                    transceiver.setCodecPreferences(preferred)
                else:
                    # Exactly one codec: a publisher switching codecs mid-stream
                    # would push frames viewers negotiated differently.
                    offered = summary.codecs.get(kind, set())
                    mime = next(m for m in PUBLISH_PREFERENCE if m.lower() in offered)
                    caps = RTCRtpReceiver.getCapabilities(kind).codecs  # type: ignore[union-attr]
                    preferred = [c for c in caps
                                 if c.mimeType.lower() in (mime.lower(), f"{kind}/rtx")]
                    transceiver.setCodecPreferences(preferred)
                codec_cap = next(c for c in preferred if not c.mimeType.lower().endswith("/rtx"))
                if codec_cap.mimeType.lower() == "video/h264":
                    offer, relabel, stream = fit_h264_publisher(
                        offer, str(codec_cap.parameters.get("profile-level-id", "42e01f")),
                        nth=videos)
                    relabels.append(relabel)
                    labelled = labelled if videos else stream  # the full layer's label
                videos += kind == "video"
            answer = await self._peers.answer(pc, offer)
            for relabel in relabels:
                answer = relabel(answer)
            codecs = negotiated_codecs(answer)
            # The microphone may have been taken back, or someone else taken the
            # slot, while we answered.
            self._check_publisher(grant, slot)
            holder = self._check_owner(grant, slot, via, takeover)
            name = grant.name or grant.role.value
            if holder is not None and holder.participant_id != grant.participant_id:
                logger.info("session %s: %s takes over slot %s from %s", self.id, name, slot,
                            holder.name)
                self._emit({"type": "slot_taken_over", "slot": slot, "ingest": holder.id,
                            "from": {"id": holder.participant_id, "name": holder.name,
                                     "via": holder.via},
                            "by": {"id": grant.participant_id, "name": name, "via": via}})

            # The previous connection on this slot is stale (the publisher came
            # back before its old connection timed out) or taken over: replace
            # it, keep the Feeds and their viewers.
            for old in [i for i in self.ingests.values() if i.slot == slot]:
                await self._close_ingest(old, final=False, reason="replaced by a new connection")
            # A kind the slot no longer carries (camera off, mic kept) ends now
            # rather than waiting out its grace period.
            for feed in [f for f in self.feeds.values()
                         if f.slot == slot and f.kind not in summary.kinds]:
                feed.close("the publisher no longer sends it")

            ingest = Ingest(_new_id(), slot, grant.participant_id, pc, via=via, name=name)
            ingest.grant = grant
            full: Feed | None = None
            full_receiver: RTCRtpReceiver | None = None
            low_mids: set[str] = set()
            for transceiver in pc.getTransceivers():
                codec = codecs.get(transceiver.mid or "")
                if codec is None or transceiver.kind not in ("audio", "video"):
                    continue
                if transceiver.kind == "video" and full is not None:
                    # The second video section: this camera's low layer. A browser
                    # page holds it to its bitrate itself (sendEncodings) and reads
                    # any REMB as the whole connection's: this receiver sends none.
                    # Other publishers are held to it by a REMB naming its SSRC.
                    feed = self._low_feed_for(full, codec, published=True)
                    low_bps = self._config.media.low_layer_max_kbps * 1000
                    if via == "page" and full_receiver is not None:
                        hooks.adjust_remb(transceiver.receiver, _no_remb)
                        hooks.adjust_remb(full_receiver, functools.partial(_plus, low_bps))
                    else:
                        hooks.adjust_remb(transceiver.receiver, functools.partial(min, low_bps))
                        low_mids.add(transceiver.mid or "")
                else:
                    feed = self._feed_for(slot, transceiver.kind, codec)
                    if transceiver.kind == "video":
                        full, full_receiver = feed, transceiver.receiver
                receiver = transceiver.receiver
                sink = feed.connect_publisher(ingest.keyframe_requester(receiver))
                if codec.mimeType.lower() == "video/h264":
                    if labelled is not None and feed.h264 is None:
                        feed.h264 = labelled  # until its first SPS says more
                    sink = self._inspect_h264(ingest, feed, sink)
                hooks.tap_receiver(receiver, transceiver.kind, sink)
                hooks.observe_sender_reports(receiver, feed.on_sender_report)
                ingest.feeds.append(feed)
            if not ingest.feeds:
                raise Unprocessable("no usable media in the offer", code="sdp_no_codec")
            if full is not None and not with_low:
                self._without_published_low(full)
            await pc.setLocalDescription(RTCSessionDescription(answer, "answer"))
        except BaseException:
            await pc.close()
            raise
        self.ingests[ingest.id] = ingest
        self._peers.watch(pc, f"publisher {ingest.id} ({slot})",
                          lambda reason: self._publisher_gone(ingest, reason))
        logger.info("session %s: %s publishes slot %s (%s)", self.id, grant.participant_id, slot,
                    ", ".join(f"{f.id} {f.codec.mimeType}" for f in ingest.feeds))
        media = self._config.media
        # A browser's hints count for its whole connection: with a low layer in
        # it, the full layer keeps its range only if the low layer's is added.
        extra = media.low_layer_max_kbps if with_low and via == "page" else 0
        return add_bitrate_hints(answer, media.min_bitrate_kbps + extra,
                                 media.start_bitrate_kbps + extra,
                                 media.max_bitrate_kbps + extra, frozenset(low_mids),
                                 media.low_layer_max_kbps), ingest

    def _inspect_h264(self, ingest: Ingest, feed: Feed, sink: FrameSink) -> FrameSink:
        """Learn what the publisher's H.264 really is (viewers are matched against its
        SPS) and refuse B-frames, which WebRTC players cannot show."""
        refused = False

        def inspect(data: bytes, rtp_timestamp: int) -> None:
            nonlocal refused
            if refused:
                return
            try:
                sps, b_frames = inspect_frame(data)
            except Exception:  # runs in aiortc's receive loop: never raise into it
                logger.exception("session %s: inspecting %s failed", self.id, feed.id)
                sps, b_frames = None, False
            if b_frames:
                refused = True
                self._refuse_publication(
                    ingest, "h264_b_frames",
                    f"{feed.id}: the encoder sends H.264 with B-frames, which WebRTC players "
                    "cannot show; turn B-frames off (Constrained Baseline, or Main/High "
                    "with bframes=0) and publish again")
                return
            if sps is not None and sps != feed.h264:
                feed.h264 = sps
            sink(data, rtp_timestamp)

        return inspect

    def _refuse_publication(self, ingest: Ingest, code: str, message: str) -> None:
        """The publication's media cannot be forwarded: end it, and say why."""
        logger.warning("session %s: refused the publication of slot %s: %s", self.id,
                       ingest.slot, message)
        self._emit({"type": "publication_refused", "slot": ingest.slot, "ingest": ingest.id,
                    "participant_id": ingest.participant_id, "code": code,
                    "message": message})
        self._track(self._close_ingest(ingest, final=True, reason=message))

    def _publisher_gone(self, ingest: Ingest, reason: str) -> None:
        """The publisher's connection failed, closed, or went quiet."""
        if ingest.closed:
            return  # we closed it ourselves (replaced, unpublished, ended)
        if reason != GONE_CLOSED:
            self._count("peer_gone", "publisher")
            participant = self.participants.get(ingest.participant_id)
            logger.warning("session %s: lost the publisher of slot %s (%s)", self.id,
                           ingest.slot, reason)
            self._emit({"type": "media_dropped", "role": "publisher", "slot": ingest.slot,
                        "participant_id": ingest.participant_id,
                        "name": participant.name if participant is not None else "",
                        "reason": reason})
        self._track(self._close_ingest(ingest, final=False, reason=f"publisher {reason}"))

    def _feed_for(self, slot: str, kind: str, codec: RTCRtpCodecParameters) -> Feed:
        feed_id = f"{slot}.{kind}"
        feed = self.feeds.get(feed_id)
        if feed is not None and feed.state != "closed":
            if feed.codec.mimeType.lower() != codec.mimeType.lower():
                raise Unprocessable(f"{feed_id} is {feed.codec.mimeType}; a returning publisher "
                                    f"must use it too", code="codec_mismatch")
            return feed
        feed = Feed(feed_id=feed_id, slot=slot, kind=kind, codec=codec,
                    media=self._config.media, liveness=self._config.liveness,
                    on_state=self._feed_changed, on_closed=self._feed_closed,
                    on_dropped=self._downstream_dropped)
        self.feeds[feed_id] = feed
        if self._watch_stream is not None:
            self._unwatch_feeds[id(feed)] = self._watch_stream(feed.check_stall)
        return feed

    def relayed_feed(self, feed_id: str, codec: RTCRtpCodecParameters, *,
                     low: bool = False) -> Feed:
        """An edge Node's Feed relayed from the Session's holder (server/edge.py),
        made like a publisher's: its own cache, keyframe policy and timeline.
        ``low``: the low layer of the camera ``feed_id``, whose full Feed exists."""
        if low:
            full = self.feeds.get(feed_id)
            if full is None or full.state == "closed":
                raise Gone(f"feed {feed_id} is not relayed here", code="feed_closed")
            return self._low_feed_for(full, codec, published=True)
        slot, kind = feed_id.split(".", 1)
        return self._feed_for(slot, kind, codec)

    def _low_feed_for(self, full: Feed, codec: RTCRtpCodecParameters, *,
                      published: bool) -> Feed:
        """The low layer of ``full``: its own Feed, linked, never in ``self.feeds``
        (pages, the recorder and links see cameras, not layers)."""
        maker = self._makers.pop(full.id, None)
        if maker is not None and published:
            maker.stop()  # the publisher sends its own low layer now
            if full.low is not None:
                full.low.publisher_gone(final=False, reason="the publisher sends its own")
        low = full.low
        if low is None or low.state == "closed":
            low = Feed(feed_id=f"{full.id}.low", slot=full.slot, kind="video", codec=codec,
                       media=self._config.media, liveness=self._config.liveness,
                       on_state=self._low_changed, on_closed=self._feed_closed,
                       on_dropped=self._downstream_dropped, layer="low")
            full.low = low
            if self._watch_stream is not None:
                self._unwatch_feeds[id(low)] = self._watch_stream(low.check_stall)
        elif low.codec.mimeType.lower() != codec.mimeType.lower():
            raise Unprocessable(f"the low layer must use the full layer's codec "
                                f"({full.codec.mimeType})", code="codec_mismatch")
        return low

    def _without_published_low(self, full: Feed) -> None:
        """A camera published without a low layer: close a published one it had;
        the server makes one instead when configured to."""
        low = full.low
        if full.id in self._makers:
            return
        if low is not None and low.state != "closed" and not self._config.media.server_low_layer:
            low.close("the publisher no longer sends a low layer")
            full.low = None
            self._feed_changed(full)
            return
        if not self._config.media.server_low_layer:
            return
        low = self._low_feed_for(full, full.codec, published=False)
        maker = LowLayerMaker(feed_id=full.id, mime_type=full.mime_type,
                              request_full_keyframe=lambda: full.request_keyframe(
                                  f"low-layer:{full.id}"),
                              bitrate=self._config.media.low_layer_max_kbps * 1000)
        self._makers[full.id] = maker
        maker.start(low.connect_publisher(maker.request_keyframe))
        full.attach(maker, start="keyframe")
        logger.info("session %s: making a low layer of %s on this Node", self.id, full.id)

    def _low_changed(self, low: Feed) -> None:
        self._count("feed", low.state)
        full = self.feeds.get(low.slot + ".video")
        if full is not None and full.low is low and full.state != "closed":
            self._emit({"type": "feed", "feed": self.describe_feed(full)})

    def _feed_changed(self, feed: Feed) -> None:
        self._count("feed", feed.state)
        self._emit({"type": "feed", "feed": self.describe_feed(feed)})

    def _downstream_dropped(self, feed: Feed, reason: DropReason) -> None:
        self._count("drop", reason)

    def _feed_closed(self, feed: Feed) -> None:
        unwatch = self._unwatch_feeds.pop(id(feed), None)
        if unwatch is not None:
            unwatch()
        maker = self._makers.pop(feed.id, None)
        if maker is not None:
            maker.stop()
        if feed.layer == "low":
            return
        if self.feeds.get(feed.id) is feed:
            del self.feeds[feed.id]
        self._totals["frames_received"] += feed.frames_received
        self._totals["bytes_received"] += feed.bytes_received
        self._totals["keyframe_requests"] += feed.keyframe_requests_sent

    async def unpublish(self, grant: Grant, ingest_id: str) -> None:
        ingest = self.ingests.get(ingest_id)
        if ingest is None:
            raise NotFound("no such publication", code="unknown_resource")
        if ingest.participant_id != grant.participant_id and grant.role not in MODERATORS:
            raise Forbidden("this publication belongs to someone else", code="not_owner")
        await self._close_ingest(ingest, final=True, reason="unpublished")

    async def close_slot(self, grant: Grant, slot: str) -> None:
        """The expert stops a slot: every publication of it, and its Feeds, even
        those waiting for a publisher that dropped."""
        if slot == MIC_SLOT:
            self._check_grant(grant, VIEWERS, "publish")
            self.interaction.release_mic(grant)  # closes the microphone's Feed
            return
        self._check_grant(grant, PUBLISHERS, "publish")
        for ingest in [i for i in self.ingests.values() if i.slot == slot]:
            await self._close_ingest(ingest, final=True, reason="slot closed")
        for feed in [f for f in self.feeds.values() if f.slot == slot]:
            feed.close("slot closed")

    def _check_publisher(self, grant: Grant, slot: str) -> None:
        if slot == MIC_SLOT:
            self._check_grant(grant, VIEWERS, "publish")
            self.interaction.check_mic_publisher(grant)
            return
        self._check_grant(grant, PUBLISHERS, "publish")
        if slot not in self.theatre.slots:
            raise NotFound(f"theatre {self.theatre.id} has no slot {slot!r} "
                           f"(slots: {', '.join(self.theatre.slots)})", code="unknown_slot")

    def _close_mic(self) -> None:
        """The trainee microphone was taken back: its Feed closes at once."""
        for ingest in [i for i in self.ingests.values() if i.slot == MIC_SLOT]:
            self.ingests.pop(ingest.id, None)
            self._track(ingest.close(final=True, reason="microphone taken back"))
        for feed in [f for f in self.feeds.values() if f.slot == MIC_SLOT]:
            feed.close("microphone taken back")

    def _has_video_feed(self, feed_id: str) -> bool:
        feed = self.feeds.get(feed_id)
        return feed is not None and feed.kind == "video" and feed.state != "closed"

    def close_revoked(self, revoked: Callable[[Grant], bool]) -> int:
        """A revocation: close the media of the grants ``revoked`` matches (WHIP
        and WHEP included, not only websockets). Returns how many were closed."""
        closed = 0
        for subscription in list(self.subscriptions.values()):
            if subscription.grant is not None and revoked(subscription.grant):
                self._track(subscription.close("revoked"))
                closed += 1
        for ingest in list(self.ingests.values()):
            if ingest.grant is not None and revoked(ingest.grant):
                self._track(self._close_ingest(ingest, final=True, reason="access revoked"))
                closed += 1
        return closed

    def live_grants(self) -> set[Grant]:
        """The grants behind this Session's open media (the periodic revocation
        re-check looks them up)."""
        grants = {s.grant for s in self.subscriptions.values() if s.grant is not None}
        return grants | {i.grant for i in self.ingests.values() if i.grant is not None}

    async def _close_ingest(self, ingest: Ingest, *, final: bool, reason: str) -> None:
        if self.ingests.pop(ingest.id, None) is not None:
            self._remember_ended(ingest.id, f"whip:{ingest.slot}", ingest.grant)
        await ingest.close(final=final, reason=reason)

    # -- viewing ----------------------------------------------------------
    async def subscribe(self, grant: Grant, feed_id: str, offer: str) -> tuple[str, Subscription]:
        """One Feed to one viewer (a websocket subscribe, WHEP per Feed, or an
        edge Node's relay pull)."""
        self._check_grant(grant, MEDIA_VIEWERS, "watch")
        self._require_live()
        feed = self._live_feed(feed_id)
        answer, subscriptions = await self._subscribe(grant, [feed], offer,
                                                      f"viewer ({feed.id})")
        return answer, subscriptions[0]

    async def subscribe_slot(self, grant: Grant, slot: str, offer: str
                             ) -> tuple[str, SlotView]:
        """A camera slot for a WHEP player that wants picture and sound from one
        endpoint: the slot's video and the Session's narration in one peer
        connection (one media stream, so the player keeps them in lip sync from
        the publishers' sender reports). Without narration the audio section is
        answered inactive."""
        self._check_grant(grant, MEDIA_VIEWERS, "watch")
        self._require_live()
        video = self._live_feed(f"{slot}.video")
        feeds = [video]
        narration = self.narration_for(slot)
        if narration is not None and "audio/opus" in check_offer(
                offer, max_bytes=self._config.limits.max_sdp_bytes,
                max_media=self._config.limits.max_media_sections,
                allowed_networks=self._peers.allowed_networks,
                want_direction="recv").codecs.get("audio", set()):
            feeds.append(narration)
        answer, subscriptions = await self._subscribe(grant, feeds, offer,
                                                      f"slot viewer ({slot})")
        view = SlotView(_new_id(), slot, subscriptions)
        self.slot_views[view.id] = view
        return answer, view

    def narration_for(self, slot: str) -> Feed | None:
        """The sound that goes with a camera: the Session's narration slot, else the
        camera slot's own audio."""
        for feed_id in (f"{NARRATION_SLOT}.audio", f"{slot}.audio"):
            feed = self.feeds.get(feed_id)
            if feed is not None and feed.state != "closed":
                return feed
        return None

    def _live_feed(self, feed_id: str) -> Feed:
        feed = self.feeds.get(feed_id)
        if feed is None or feed.state == "closed":
            raise NotFound(f"no feed {feed_id!r} in session {self.id}", code="unknown_feed")
        return feed

    async def _subscribe(self, grant: Grant, feeds: list[Feed], offer: str, name: str
                         ) -> tuple[str, list[Subscription]]:
        """Answer one viewer's offer for ``feeds`` (a Subscription each) on one peer."""
        limits = self._config.limits
        mine = sum(1 for s in self.subscriptions.values()
                   if s.participant_id == grant.participant_id)
        # An edge Node pulls every Feed of a Session once (one relay per Feed),
        # whatever the per-person cap: it is not a person.
        if grant.role is not Role.RELAY and (
                mine + len(feeds) > limits.max_subscriptions_per_participant):
            raise Conflict(f"at most {limits.max_subscriptions_per_participant} subscriptions "
                           "per participant", code="too_many_subscriptions")
        summary = check_offer(offer, max_bytes=limits.max_sdp_bytes,
                              max_media=limits.max_media_sections,
                              allowed_networks=self._peers.allowed_networks,
                              want_direction="recv")
        for feed in feeds:
            if feed.kind not in summary.kinds:
                raise Unprocessable(f"feed {feed.id} is {feed.kind}; the offer has no "
                                    f"{feed.kind} section", code="sdp_kind_mismatch")
            if feed.codec.mimeType.lower() not in summary.codecs.get(feed.kind, set()):
                raise Unprocessable(f"viewer cannot receive {feed.codec.mimeType}, which "
                                    f"{feed.id} is published in (no transcoding)",
                                    code="codec_mismatch")

        pc = self._peers.create()
        peer = ViewerPeer(pc)
        subscriptions = [Subscription(
            subscription_id=_new_id(), feed=feed, participant_id=grant.participant_id,
            peer=peer,
            max_queue=self._config.media.keyframe_cache_max_frames
            + self._config.media.viewer_queue_frames,
            fast_path=self._config.media.fast_path,
            on_closed=self._subscription_closed, on_first_frame=self._on_first_frame,
            on_layer=self._layer_changed, on_state=self._subscription_changed,
            adaptive=self._config.media.adaptive_layers)
            for feed in feeds]
        try:
            answer = await peer.negotiate(subscriptions, summary.text, self._peers.answer)
        except BaseException:
            await pc.close()
            raise
        closed = next((f for f in feeds if f.state == "closed"), None)
        if closed is not None or self.state != "live":
            await pc.close()
            raise Gone(f"feed {(closed or feeds[0]).id} closed while subscribing",
                       code="feed_closed")
        for subscription in subscriptions:
            subscription.grant = grant
            self.subscriptions[subscription.id] = subscription
        self._peers.watch(pc, f"{name} {subscriptions[0].id}",
                          lambda reason: self._peer_gone(subscriptions, reason))
        for feed in feeds:
            self._count("subscription", "waiting")
            self._feed_changed(feed)
        return answer, subscriptions

    def _peer_gone(self, subscriptions: list[Subscription], reason: str) -> None:
        for subscription in subscriptions:
            self._viewer_gone(subscription, reason)

    def _subscription_changed(self, subscription: Subscription) -> None:
        self._count("subscription", subscription.state)
        logger.info("session %s: subscription %s of %s %s", self.id, subscription.id,
                    subscription.feed_id, subscription.state)

    def _layer_changed(self, subscription: Subscription, layer: str, reason: str) -> None:
        self._count("layer", layer)
        self._emit({"type": "layer", "subscription": subscription.id,
                    "feed": subscription.feed_id, "layer": layer, "reason": reason,
                    "participant_id": subscription.participant_id})

    def _viewer_gone(self, subscription: Subscription, reason: str) -> None:
        """The viewer's connection failed, went quiet, or closed under us."""
        if subscription.state == "closed":
            return  # we closed it ourselves
        self._count("peer_gone", "viewer")
        logger.info("session %s: viewer %s of %s gone (%s)", self.id, subscription.id,
                    subscription.feed_id, reason)
        self._track(subscription.close("transport_gone" if reason == GONE_CLOSED
                                       else "peer_gone"))

    async def unsubscribe_slot(self, grant: Grant, view_id: str) -> None:
        view = self.slot_views.get(view_id)
        if view is None:
            raise NotFound("no such subscription", code="unknown_resource")
        if view.participant_id != grant.participant_id and grant.role not in MODERATORS:
            raise Forbidden("this subscription belongs to someone else", code="not_owner")
        await asyncio.gather(*[s.close() for s in view.subscriptions])

    def recently_ended(self, resource_id: str, where: str, grant: Grant) -> bool:
        """A WHIP/WHEP resource at ``where`` that ended within the last
        ``ENDED_RESOURCE_MEMORY_S`` and was made with this token: its DELETE is
        answered 200 (clients often close their peer connection first)."""
        self._forget_ended()
        ended = self._ended.get(resource_id)
        return ended is not None and ended[0] == where and ended[1] == grant.token_id

    def _remember_ended(self, resource_id: str, where: str, grant: Grant | None) -> None:
        if grant is None:
            return
        self._forget_ended()
        self._ended[resource_id] = (where, grant.token_id, time.monotonic())

    def _forget_ended(self) -> None:
        horizon = time.monotonic() - ENDED_RESOURCE_MEMORY_S
        for key in [k for k, (_, _, at) in self._ended.items() if at < horizon]:
            del self._ended[key]

    async def unsubscribe(self, grant: Grant, subscription_id: str) -> None:
        subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise NotFound("no such subscription", code="unknown_resource")
        if subscription.participant_id != grant.participant_id and grant.role not in MODERATORS:
            raise Forbidden("this subscription belongs to someone else", code="not_owner")
        await subscription.close()

    def _subscription_closed(self, subscription: Subscription) -> None:
        if self.subscriptions.pop(subscription.id, None) is None:
            return
        self._remember_ended(subscription.id, f"whep:{subscription.feed_id}",
                             subscription.grant)
        for view in [v for v in self.slot_views.values() if subscription in v.subscriptions]:
            view.subscriptions.remove(subscription)
            if not view.subscriptions:
                del self.slot_views[view.id]
                self._remember_ended(view.id, f"whep:{view.slot}", subscription.grant)
        self._totals["frames_forwarded"] += subscription.frames_forwarded
        self._totals["bytes_forwarded"] += subscription.bytes_forwarded
        reason = subscription.close_reason or "closed"
        self._count("subscription", "closed")
        logger.info("session %s: subscription %s of %s closed (%s)", self.id, subscription.id,
                    subscription.feed_id, reason)
        self._emit({"type": "subscription_closed", "subscription": subscription.id,
                    "feed": subscription.feed_id, "participant_id": subscription.participant_id,
                    "reason": reason})
        if reason in ("peer_gone", "transport_gone", "failed", "blocked", "behind"):
            participant = self.participants.get(subscription.participant_id)
            self._emit({"type": "media_dropped", "role": "viewer",
                        "feed": subscription.feed_id,
                        "participant_id": subscription.participant_id,
                        "name": participant.name if participant is not None else "",
                        "reason": reason})
        feed = self.feeds.get(subscription.feed_id)
        if feed is not None and feed.state != "closed":
            self._feed_changed(feed)

    # -- shared helpers ---------------------------------------------------
    def _track(self, awaitable: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _check_grant(self, grant: Grant, allowed: frozenset[Role], action: str) -> None:
        if grant.session_id != self.id:
            raise Forbidden("token is for another session", code="wrong_session")
        if grant.role not in allowed:
            raise Forbidden(f"role {grant.role.value} may not {action}", code="wrong_role")

    def _require_live(self) -> None:
        if self.state != "live":
            raise Gone(f"session {self.id} has ended", code="session_ended")

    def check_moderator(self, grant: Grant) -> None:
        self._check_grant(grant, MODERATORS, "end the session")

    # -- lifecycle --------------------------------------------------------
    async def end(self, reason: str = "ended", *, moved: bool = False) -> None:
        """The close cascade; returns when every peer connection is closed.
        ``moved``: the Session goes on, but not on this Node (it lost the
        Session's lease, or is shutting down): participants are told to
        reconnect (``session_moved``), not that it ended."""
        if self.state == "ended":
            await self._drain()
            return
        self.state = "ended"
        self.moved = moved
        self._emit({"type": "session_moved" if moved else "session_ended", "reason": reason})
        for ingest in list(self.ingests.values()):
            await self._close_ingest(ingest, final=True, reason="session ended")
        for feed in list(self.feeds.values()):
            feed.close("session ended")
        closing = [s.close("feed_closed") for s in list(self.subscriptions.values())]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        await self._drain()
        for hook in list(self.end_hooks):
            try:
                await hook()
            except Exception:
                logger.exception("session %s: end hook failed", self.id)
        self._listeners.clear()
        if self._on_ended is not None:
            self._on_ended(self)

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


def parse_slot_request(body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("slot"), str):
        raise BadRequest("expected a slot name", code="bad_slot")
    return body["slot"]
