"""Session: one live teaching event, the unit of permission, routing and recording.

Close cascade (docs/architecture.md): ``Session.end()`` closes every Ingest
(publisher peer connection) and every Feed; a Feed closing closes its
Subscriptions; a Subscription closing closes its viewer peer connection.
``Session.end()`` returns only when all of those peer connections are closed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiortc import RTCPeerConnection, RTCRtpCodecParameters, RTCRtpReceiver, RTCSessionDescription
from aiortc import sdp as aiortc_sdp

from .config import Config
from .errors import BadRequest, Conflict, Forbidden, Gone, NotFound, Unprocessable
from .feed import Feed
from .interaction import MIC_SLOT, Interaction
from .media import hooks
from .media.codecs import capabilities_for
from .media.fastpath import FastSender, negotiated_from
from .media.peers import PeerFactory
from .media.sdp import add_bitrate_hints, check_offer
from .participant import Participant
from .roles import MODERATORS, PUBLISHERS, VIEWERS, Role
from .subscription import Subscription
from .theatre import Theatre, check_name
from .tokens import Grant

logger = logging.getLogger(__name__)

SessionState = Literal["live", "ended"]
Event = dict[str, Any]

#: Codecs a new Feed may be published in, most preferred first.
PUBLISH_PREFERENCE = ["video/VP8", "video/H264", "audio/opus"]


def _new_id() -> str:
    # Resource ids appear in WHIP/WHEP Location URLs: unguessable on purpose.
    return secrets.token_urlsafe(18)


def _negotiated_codecs(answer_sdp: str) -> dict[str, RTCRtpCodecParameters]:
    """mid -> the codec the remote will send/receive (first in the answer)."""
    out = {}
    for media in aiortc_sdp.SessionDescription.parse(answer_sdp).media:
        codecs = [c for c in media.rtp.codecs if not c.mimeType.lower().endswith("/rtx")]
        if codecs and media.rtp.muxId is not None:
            out[media.rtp.muxId] = codecs[0]
    return out


class Ingest:
    """The expert's peer connection into one camera slot; it feeds 1–2 Feeds."""

    def __init__(self, ingest_id: str, slot: str, participant_id: str,
                 pc: RTCPeerConnection) -> None:
        self.id = ingest_id
        self.slot = slot
        self.participant_id = participant_id
        self.pc = pc
        self.feeds: list[Feed] = []
        self.created_at = time.time()
        self._closed = False
        #: The token it was published with (revocation closes it).
        self.grant: Grant | None = None
        self._requests: set[asyncio.Task[int]] = set()

    def keyframe_requester(self, receiver: RTCRtpReceiver) -> Callable[[], bool]:
        """A narrow callable for a Feed: send one PLI upstream, now."""

        def request() -> bool:
            if self._closed:
                return False
            task = asyncio.ensure_future(hooks.send_picture_loss(receiver))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
            return True

        return request

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self, *, final: bool) -> None:
        """Stop receiving. ``final`` closes the Feeds; otherwise they wait for a
        reconnecting publisher."""
        if self._closed:
            return
        self._closed = True
        for feed in self.feeds:
            feed.detach(final=final)
        await self.pc.close()


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
    ) -> None:
        check_name("session", session_id)
        self.id = session_id
        self.theatre = theatre
        self.title = title
        self.procedure = procedure
        self.state: SessionState = "live"
        self.created_at = time.time()
        self.feeds: dict[str, Feed] = {}
        self.ingests: dict[str, Ingest] = {}
        self.subscriptions: dict[str, Subscription] = {}
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
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("session %s: listener failed", self.id)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "procedure": self.procedure,
            "state": self.state,
            "theatre": self.theatre.describe(),
            "feeds": [f.describe() for f in self.feeds.values() if f.state != "closed"],
        }

    def roster(self) -> list[dict[str, object]]:
        return [p.describe() for p in self.participants.values()]

    # -- participants -----------------------------------------------------
    def join(self, grant: Grant) -> Participant:
        self._require_live()
        participant = self.participants.get(grant.participant_id)
        if participant is None:
            participant = Participant(id=grant.participant_id, role=grant.role,
                                      name=grant.name or grant.role.value, node_id=self._node_id)
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
    async def publish(self, grant: Grant, slot: str, offer: str) -> tuple[str, Ingest]:
        """Answer a publisher's offer for ``slot``; its media become Feeds.
        The trainee granted the microphone publishes audio to ``MIC_SLOT``."""
        self._check_publisher(grant, slot)
        self._require_live()
        limits = self._config.limits
        summary = check_offer(offer, max_bytes=limits.max_sdp_bytes,
                              max_media=limits.max_media_sections,
                              allowed_networks=self._peers.allowed_networks,
                              want_direction="send")
        if len(set(summary.kinds)) != len(summary.kinds):
            raise Unprocessable("a slot carries at most one video and one audio track",
                                code="sdp_duplicate_kind")
        if slot == MIC_SLOT and summary.kinds != ["audio"]:
            raise Unprocessable("the trainee microphone carries audio only",
                                code="sdp_kind_mismatch")
        new_feeds = [k for k in summary.kinds if f"{slot}.{k}" not in self.feeds]
        live = sum(1 for f in self.feeds.values() if f.state != "closed")
        if live + len(new_feeds) > limits.max_feeds_per_session:
            raise Conflict(f"session has its maximum of {limits.max_feeds_per_session} feeds",
                           code="too_many_feeds")

        pc = self._peers.create()
        try:
            for kind in summary.kinds:
                transceiver = pc.addTransceiver(kind, direction="recvonly")
                existing = self.feeds.get(f"{slot}.{kind}")
                if existing is not None and existing.state != "closed":
                    # A returning publisher must keep the codec viewers negotiated.
                    transceiver.setCodecPreferences(capabilities_for(existing.codec))
                else:
                    # Exactly one codec: a publisher switching codecs mid-stream
                    # would push frames viewers negotiated differently.
                    offered = summary.codecs.get(kind, set())
                    mime = next(m for m in PUBLISH_PREFERENCE if m.lower() in offered)
                    caps = RTCRtpReceiver.getCapabilities(kind).codecs  # type: ignore[union-attr]
                    transceiver.setCodecPreferences(
                        [c for c in caps if c.mimeType.lower() in (mime.lower(), f"{kind}/rtx")])
            answer = await self._answer(pc, summary.text)
            codecs = _negotiated_codecs(answer)
            # The microphone may have been taken back while we answered.
            self._check_publisher(grant, slot)

            # The previous connection on this slot is stale (the publisher came
            # back before its old connection timed out): replace it, keep Feeds.
            for old in [i for i in self.ingests.values() if i.slot == slot]:
                await self._close_ingest(old, final=False)
            # A kind the slot no longer carries (camera off, mic kept) ends now
            # rather than waiting out its grace period.
            for feed in [f for f in self.feeds.values()
                         if f.slot == slot and f.kind not in summary.kinds]:
                feed.close()

            ingest = Ingest(_new_id(), slot, grant.participant_id, pc)
            ingest.grant = grant
            for transceiver in pc.getTransceivers():
                codec = codecs.get(transceiver.mid or "")
                if codec is None or transceiver.kind not in ("audio", "video"):
                    continue
                feed = self._feed_for(slot, transceiver.kind, codec)
                receiver = transceiver.receiver
                sink = feed.attach(ingest.keyframe_requester(receiver))
                hooks.tap_receiver(receiver, transceiver.kind, sink)
                ingest.feeds.append(feed)
            if not ingest.feeds:
                raise Unprocessable("no usable media in the offer", code="sdp_no_codec")
            await pc.setLocalDescription(RTCSessionDescription(answer, "answer"))
        except BaseException:
            await pc.close()
            raise
        self.ingests[ingest.id] = ingest
        self._watch_peer(pc, lambda: self._close_ingest(ingest, final=False))
        logger.info("session %s: %s publishes slot %s (%s)", self.id, grant.participant_id, slot,
                    ", ".join(f"{f.id} {f.codec.mimeType}" for f in ingest.feeds))
        media = self._config.media
        return add_bitrate_hints(answer, media.min_bitrate_kbps, media.start_bitrate_kbps,
                                 media.max_bitrate_kbps), ingest

    def _feed_for(self, slot: str, kind: str, codec: RTCRtpCodecParameters) -> Feed:
        feed_id = f"{slot}.{kind}"
        feed = self.feeds.get(feed_id)
        if feed is not None and feed.state != "closed":
            if feed.codec.mimeType.lower() != codec.mimeType.lower():
                raise Unprocessable(f"{feed_id} is {feed.codec.mimeType}; a returning publisher "
                                    f"must use it too", code="codec_mismatch")
            return feed
        feed = Feed(feed_id=feed_id, slot=slot, kind=kind, codec=codec,
                    media=self._config.media, on_state=self._feed_changed,
                    on_closed=self._feed_closed)
        self.feeds[feed_id] = feed
        return feed

    def _feed_changed(self, feed: Feed) -> None:
        self._emit({"type": "feed", "feed": feed.describe()})

    def _feed_closed(self, feed: Feed) -> None:
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
        await self._close_ingest(ingest, final=True)

    async def close_slot(self, grant: Grant, slot: str) -> None:
        """The expert stops a slot: every publication of it, and its Feeds, even
        those waiting for a publisher that dropped."""
        if slot == MIC_SLOT:
            self._check_grant(grant, VIEWERS, "publish")
            self.interaction.release_mic(grant)  # closes the microphone's Feed
            return
        self._check_grant(grant, PUBLISHERS, "publish")
        for ingest in [i for i in self.ingests.values() if i.slot == slot]:
            await self._close_ingest(ingest, final=True)
        for feed in [f for f in self.feeds.values() if f.slot == slot]:
            feed.close()

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
            self._track(ingest.close(final=True))
        for feed in [f for f in self.feeds.values() if f.slot == MIC_SLOT]:
            feed.close()

    def _has_video_feed(self, feed_id: str) -> bool:
        feed = self.feeds.get(feed_id)
        return feed is not None and feed.kind == "video" and feed.state != "closed"

    def close_revoked(self, revoked: Callable[[Grant], bool]) -> int:
        """A revocation: close the media of the grants ``revoked`` matches (WHIP
        and WHEP included, not only websockets). Returns how many were closed."""
        closed = 0
        for subscription in list(self.subscriptions.values()):
            if subscription.grant is not None and revoked(subscription.grant):
                self._track(subscription.close())
                closed += 1
        for ingest in list(self.ingests.values()):
            if ingest.grant is not None and revoked(ingest.grant):
                self._track(self._close_ingest(ingest, final=True))
                closed += 1
        return closed

    def live_grants(self) -> set[Grant]:
        """The grants behind this Session's open media (the periodic revocation
        re-check looks them up)."""
        grants = {s.grant for s in self.subscriptions.values() if s.grant is not None}
        return grants | {i.grant for i in self.ingests.values() if i.grant is not None}

    async def _close_ingest(self, ingest: Ingest, *, final: bool) -> None:
        self.ingests.pop(ingest.id, None)
        await ingest.close(final=final)

    # -- viewing ----------------------------------------------------------
    async def subscribe(self, grant: Grant, feed_id: str, offer: str) -> tuple[str, Subscription]:
        self._check_grant(grant, VIEWERS, "watch")
        self._require_live()
        feed = self.feeds.get(feed_id)
        if feed is None or feed.state == "closed":
            raise NotFound(f"no feed {feed_id!r} in session {self.id}", code="unknown_feed")
        limits = self._config.limits
        mine = sum(1 for s in self.subscriptions.values()
                   if s.participant_id == grant.participant_id)
        if mine >= limits.max_subscriptions_per_participant:
            raise Conflict(f"at most {limits.max_subscriptions_per_participant} subscriptions "
                           "per participant", code="too_many_subscriptions")
        summary = check_offer(offer, max_bytes=limits.max_sdp_bytes,
                              max_media=limits.max_media_sections,
                              allowed_networks=self._peers.allowed_networks,
                              want_direction="recv")
        if feed.kind not in summary.kinds:
            raise Unprocessable(f"feed {feed_id} is {feed.kind}; the offer has no {feed.kind} "
                                "section", code="sdp_kind_mismatch")
        if feed.codec.mimeType.lower() not in summary.codecs.get(feed.kind, set()):
            raise Unprocessable(f"viewer cannot receive {feed.codec.mimeType}, which "
                                f"{feed.id} is published in (no transcoding)",
                                code="codec_mismatch")

        pc = self._peers.create()
        subscription = Subscription(
            subscription_id=_new_id(), feed_id=feed.id, participant_id=grant.participant_id,
            kind=feed.kind,
            max_queue=self._config.media.keyframe_cache_max_frames
            + self._config.media.viewer_queue_frames,
            request_keyframe=feed.request_keyframe, close_peer=pc.close,
            on_closed=self._subscription_closed, on_first_frame=self._on_first_frame)
        try:
            transceiver = pc.addTransceiver(subscription.track, direction="sendonly")
            transceiver.setCodecPreferences(capabilities_for(feed.codec))
            answer = await self._answer(pc, summary.text)
            negotiated = _negotiated_codecs(answer).get(transceiver.mid or "")
            if negotiated is None or negotiated.mimeType.lower() != feed.codec.mimeType.lower():
                raise Unprocessable(f"viewer cannot receive {feed.codec.mimeType}, which "
                                    f"{feed.id} is published in", code="codec_mismatch")
            hooks.redirect_keyframe_requests(transceiver.sender, subscription.on_keyframe_request)
            if self._config.media.fast_path:
                media = next(m for m in aiortc_sdp.SessionDescription.parse(answer).media
                             if m.rtp.muxId == transceiver.mid)
                subscription.use_fast_path(FastSender(
                    transceiver.sender, negotiated_from(media, transceiver.mid or "")))
            await pc.setLocalDescription(RTCSessionDescription(answer, "answer"))
        except BaseException:
            await pc.close()
            raise
        if feed.state == "closed" or self.state != "live":
            await pc.close()
            raise Gone(f"feed {feed_id} closed while subscribing", code="feed_closed")
        subscription.grant = grant
        self.subscriptions[subscription.id] = subscription
        feed.add_subscription(subscription)
        self._watch_peer(pc, subscription.close)

        @pc.on("connectionstatechange")
        def _connected() -> None:
            if pc.connectionState == "connected":
                subscription.connected(feed.cached_frames())

        self._feed_changed(feed)
        return answer, subscription

    async def unsubscribe(self, grant: Grant, subscription_id: str) -> None:
        subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise NotFound("no such subscription", code="unknown_resource")
        if subscription.participant_id != grant.participant_id and grant.role not in MODERATORS:
            raise Forbidden("this subscription belongs to someone else", code="not_owner")
        await subscription.close()

    def _subscription_closed(self, subscription: Subscription) -> None:
        if self.subscriptions.pop(subscription.id, None) is not None:
            self._totals["frames_forwarded"] += subscription.frames_forwarded
            self._totals["bytes_forwarded"] += subscription.bytes_forwarded
        feed = self.feeds.get(subscription.feed_id)
        if feed is not None:
            feed.remove_subscription(subscription)
            if feed.state != "closed":
                self._feed_changed(feed)

    # -- shared helpers ---------------------------------------------------
    async def _answer(self, pc: RTCPeerConnection, offer: str) -> str:
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        except Exception as exc:  # aiortc raises ValueError/OperationError/etc.
            raise Unprocessable(f"offer rejected: {exc}", code="sdp_rejected") from None
        hooks.answer_as_dtls_server(pc)
        self._peers.before_local_description(pc)
        # Gather before answering so the answer carries every candidate: we do
        # not trickle (WHIP/WHEP PATCH answers 405).
        await self._gather(pc)
        answer = await pc.createAnswer()
        if answer is None:
            raise Unprocessable("could not answer the offer", code="sdp_rejected")
        return str(answer.sdp)

    @staticmethod
    async def _gather(pc: RTCPeerConnection) -> None:
        """Gather candidates without applying the answer yet: receivers must be
        tapped before setLocalDescription starts connecting."""
        for transceiver in pc.getTransceivers():
            await transceiver.receiver.transport.transport.iceGatherer.gather()

    def _watch_peer(self, pc: RTCPeerConnection, on_gone: Callable[[], Any]) -> None:
        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState in ("failed", "closed"):
                result = on_gone()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    self._track(result)

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
    async def end(self, reason: str = "ended") -> None:
        """The close cascade; returns when every peer connection is closed."""
        if self.state == "ended":
            await self._drain()
            return
        self.state = "ended"
        self._emit({"type": "session_ended", "reason": reason})
        for ingest in list(self.ingests.values()):
            await self._close_ingest(ingest, final=True)
        for feed in list(self.feeds.values()):
            feed.close()
        closing = [s.close() for s in list(self.subscriptions.values())]
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
