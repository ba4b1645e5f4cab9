"""Edges: a Node serving its own viewers the Feeds of a Session held elsewhere.

One Session's media live on the Node that holds it (its origin). A Node with
trainees of such a Session (placed there by load, ``server/http/ws.py``) pulls
each Feed they watch **once** from the origin and fans it out itself:

```
origin (holder)                                 edge
Feed ── Subscription (relay grant) ══WHEP/SRTP══▶ RelayPull ── Feed (its own cache,
        one per Feed per edge                     (aiortc,     keyframe policy,
                                                  no decode)   timeline) ── viewers
```

- ``RelayPull`` is a WHEP client inside the Node: the server's own peer
  connections (``PeerFactory``: its ICE settings and UDP ports), a recvonly
  transceiver of the Feed's codec, the receiver tapped by the same hooks as a
  WHIP ingest (frames into a local Feed, never decoded; sender reports keep the
  publisher's clock), keyframe requests sent upstream as PLI through the local
  Feed's policy (coalesced there, and again on the origin per requester). A
  pull that drops reconnects (0.2 → 2 s) to whoever holds the Session then; a
  Feed the origin no longer has (404/410) closes here too.
- The pull authenticates with a **relay** grant this Node mints itself (one
  configuration, one signing key): ``Role.RELAY``, WHEP only, for one Session,
  ``cluster.relay_token_ttl_s``. When it expires or is revoked the origin closes
  the pull and the next attempt carries a fresh one.
- ``EdgeSession`` is the edge's media copy of one Session: a detached
  ``Session`` (not registered, not leased) whose Feeds are relayed, created when
  the first local viewer subscribes and ended with the Node's stand-in
  (``RemoteSession``) of that Session. A pull nobody here watches stops after
  ``cluster.edge_linger_s``.
- ``Edges`` is the Node's component (one AppKey, one cleanup_ctx).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCPeerConnection, RTCRtpCodecParameters, RTCRtpReceiver, RTCSessionDescription

from .cluster import RemoteSession
from .config import Config
from .errors import Gone, NotFound, ScrubinError, Unavailable
from .feed import Feed
from .media import hooks
from .media.h264 import H264Stream, inspect_frame
from .media.hooks import FrameSink
from .media.layers import Layer
from .media.peers import PeerFactory, negotiated_codecs
from .publish.whip import post_offer
from .registry import Registry
from .roles import Role
from .session import Event, Session
from .theatre import Theatre
from .tokens import TokenAuthority

logger = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0
#: A pull that is not connected by then is tried again.
CONNECT_TIMEOUT_S = 10.0
#: A Feed asked for this recently is kept pulled whatever edge_linger_s says
#: (its viewer may still be negotiating).
ASKED_GRACE_S = 5.0


class RelayRefused(Exception):
    """The origin answered a pull with something other than 201."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"origin answered {status}: {body[:200]}")
        self.status = status
        self.body = body

    @property
    def final(self) -> bool:
        """The Feed (or Session) is gone there, or cannot be relayed at all."""
        return self.status in (404, 410, 415, 422)

    def error(self, feed_id: str) -> ScrubinError:
        """What a local viewer waiting for this pull is told."""
        if self.status == 404:
            return NotFound(f"no feed {feed_id!r} in this session", code="unknown_feed")
        if self.status == 410:
            return Gone(f"feed {feed_id} has closed", code="feed_closed")
        return Unavailable(f"the Node holding this Session cannot relay {feed_id} now; "
                           "try again", code="relay_unavailable")


def h264_inspector(feed: Feed, sink: FrameSink) -> FrameSink:
    """Keep the relayed Feed's ``h264`` true to its SPS (local viewers are matched
    against it), as a WHIP ingest does."""

    def inspect(data: bytes, rtp_timestamp: int) -> None:
        try:
            sps, _ = inspect_frame(data)
        except Exception:  # inside aiortc's receive loop: never raise into it
            sps = None
        if sps is not None and sps != feed.h264:
            feed.h264 = sps
        sink(data, rtp_timestamp)

    return inspect


class RelayPull:
    """One Feed (one layer of it) pulled from the origin into a local Feed."""

    def __init__(self, *, session_id: str, feed_id: str, kind: str, mime_type: str,
                 layer: Layer, origin_url: Callable[[], str | None], token: Callable[[], str],
                 http: aiohttp.ClientSession, peers: PeerFactory,
                 make_feed: Callable[[RTCRtpCodecParameters], Feed],
                 on_final: Callable[[RelayPull, str], None], node_id: str,
                 min_backoff_s: float = MIN_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.session_id = session_id
        self.feed_id = feed_id
        self.kind = kind
        self.mime_type = mime_type
        self.layer: Layer = layer
        self._origin_url = origin_url
        self._token = token
        self._http = http
        self._peers = peers
        self._make_feed = make_feed
        self._on_final = on_final
        self._node_id = node_id
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._connect_timeout_s = connect_timeout_s
        self.feed: Feed | None = None
        #: Peer connections that came up (a re-pull counts one more).
        self.connections = 0
        self.attempts = 0
        #: The local Feed exists (first answer), or the first attempt failed.
        self.ready: asyncio.Future[Feed] = asyncio.get_running_loop().create_future()
        self._pc: RTCPeerConnection | None = None
        self._resource: str | None = None
        self._token_used = ""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return self.feed_id + (".low" if self.layer == "low" else "")

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = self._min_backoff_s
        while not self._stopping.is_set():
            connected = False
            try:
                connected = await self._attempt()
            except RelayRefused as refused:
                logger.info("edge %s: pull of %s/%s refused: %s", self._node_id,
                            self.session_id, self.name, refused)
                self._fail_ready(refused.error(self.feed_id))
                if refused.final:
                    await self._teardown()
                    self._on_final(self, f"origin answered {refused.status}")
                    return
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError,
                    ScrubinError) as exc:
                logger.info("edge %s: pull of %s/%s failed: %s", self._node_id,
                            self.session_id, self.name, exc)
                self._fail_ready(Unavailable(
                    f"the Node holding this Session cannot be reached for {self.feed_id} "
                    "now; try again", code="relay_unavailable"))
            finally:
                await self._teardown()
            if self._stopping.is_set():
                break
            if self.feed is not None:
                # Viewers here keep their Subscriptions: the Feed waits
                # (media.feed_grace_s) for the next pull, as for a publisher.
                self.feed.publisher_gone(final=False, reason="relay from the origin lost")
            if connected:
                backoff = self._min_backoff_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    def _fail_ready(self, error: ScrubinError) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # marked retrieved: nobody may be waiting

    async def _attempt(self) -> bool:
        """One pull: offer, answer, tap, and wait until it drops. Returns
        whether it was ever connected."""
        origin = self._origin_url()
        if origin is None:
            raise Unavailable("the origin's URL is unknown", code="session_moving")
        self.attempts += 1
        pc = self._pc = self._peers.create()
        transceiver = pc.addTransceiver(self.kind, direction="recvonly")
        caps = RTCRtpReceiver.getCapabilities(self.kind).codecs  # type: ignore[union-attr]
        wanted = self.mime_type.lower()
        transceiver.setCodecPreferences(
            [c for c in caps if c.mimeType.lower() in (wanted, f"{self.kind}/rtx")])
        self._peers.before_local_description(pc)
        await pc.setLocalDescription(await pc.createOffer())
        token = self._token_used = self._token()
        status, body, answered, location, _ = await post_offer(
            self._http, f"{origin}/whep/{self.session_id}/{self.feed_id}",
            pc.localDescription.sdp, token, {"layer": self.layer})
        if status != 201:
            raise RelayRefused(status, body)
        self._resource = urljoin(answered, location) if location else None
        codec = negotiated_codecs(body).get(transceiver.mid or "")
        if codec is None or codec.mimeType.lower() != wanted:
            raise RelayRefused(422, "the origin answered another codec")
        feed = self.feed
        if feed is None or feed.state == "closed":
            feed = self.feed = self._make_feed(codec)
            if wanted == "video/h264" and feed.h264 is None:
                feed.h264 = H264Stream.from_label(
                    str(codec.parameters.get("profile-level-id", "42e01f")))
        receiver = transceiver.receiver
        sink = feed.connect_publisher(self._keyframe_requester(receiver))
        if wanted == "video/h264":
            sink = h264_inspector(feed, sink)
        hooks.tap_receiver(receiver, self.kind, sink)
        hooks.observe_sender_reports(receiver, feed.on_sender_report)
        if self.ready.done() and self.ready.exception() is not None:
            # An earlier attempt failed: viewers asking from now on get this Feed.
            self.ready = asyncio.get_running_loop().create_future()
        if not self.ready.done():
            self.ready.set_result(feed)
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        return await self._until_gone(pc)

    def _keyframe_requester(self, receiver: RTCRtpReceiver) -> Callable[[], bool]:
        """The local Feed's policy asks through this: one PLI to the origin,
        whose own policy coalesces it with its other viewers' requests."""
        pc = self._pc
        return hooks.picture_loss_requester(
            receiver, lambda: pc is not None and self._pc is pc, self._requests)

    async def _until_gone(self, pc: RTCPeerConnection) -> bool:
        connected = asyncio.Event()
        gone = asyncio.Event()

        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState == "connected":
                connected.set()

        # Failed, closed, or quiet for liveness.peer_timeout_s (the origin died).
        self._peers.watch(pc, f"relay pull {self.session_id}/{self.name}",
                          lambda reason: gone.set())
        stop = asyncio.ensure_future(self._stopping.wait())
        dropped = asyncio.ensure_future(gone.wait())
        up = asyncio.ensure_future(connected.wait())
        try:
            done, _ = await asyncio.wait({stop, dropped, up}, timeout=self._connect_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                logger.info("edge %s: pull of %s/%s not connected after %g s", self._node_id,
                            self.session_id, self.name, self._connect_timeout_s)
                return False
            if up in done:
                self.connections += 1
                logger.info("edge %s: relaying %s/%s from the origin", self._node_id,
                            self.session_id, self.name)
                await asyncio.wait({stop, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, dropped, up):
                task.cancel()
        return connected.is_set()

    async def _teardown(self) -> None:
        pc, self._pc = self._pc, None
        resource, self._resource = self._resource, None
        if resource is not None:
            # Best effort: the origin closes a Subscription whose peer went anyway.
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self._http.delete(
                        resource, headers={"Authorization": f"Bearer {self._token_used}"},
                        timeout=aiohttp.ClientTimeout(total=3)):
                    pass
        if pc is not None:
            await pc.close()

    async def close(self) -> None:
        """Stop pulling (DELETE the WHEP resource, close the peer connection)."""
        self._stopping.set()
        self._fail_ready(Gone(f"the relay of {self.feed_id} stopped", code="feed_closed"))
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._requests):
            task.cancel()


PullFactory = Callable[..., RelayPull]


class EdgeSession:
    """This Node's media copy of a Session held elsewhere (see the module docstring)."""

    def __init__(self, remote: RemoteSession, session: Session, *, pull: PullFactory,
                 linger_s: float, ready_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.remote = remote
        self.session = session
        self._pull = pull
        self._linger_s = linger_s
        self._ready_timeout_s = ready_timeout_s
        self._clock = clock
        #: Pulls by name: "room.video", "room.video.low", "narration.audio".
        self.pulls: dict[str, RelayPull] = {}
        self._unwatched_since: dict[str, float] = {}
        #: When each Feed was last asked for: a viewer still negotiating is not
        #: watching yet, but its pull must not linger out meanwhile.
        self._asked_at: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unlisten = remote.listen(self._on_event)
        self._linger = asyncio.ensure_future(self._linger_loop())
        self.ended = False

    @property
    def id(self) -> str:
        return self.session.id

    def _described(self, feed_id: str) -> dict[str, Any] | None:
        feeds = self.remote.describe().get("feeds", [])
        return next((f for f in feeds if isinstance(f, dict) and f.get("id") == feed_id
                     and f.get("state") != "closed"), None)

    async def feed(self, feed_id: str) -> Feed:
        """The local Feed relaying ``feed_id`` (the pull started if needed,
        shared by every viewer here)."""
        if self.ended or self.remote.state != "live":
            raise Unavailable("the Session moved; reconnecting", code="session_moving")
        info = self._described(feed_id)
        if info is None:
            raise NotFound(f"no feed {feed_id!r} in session {self.id}", code="unknown_feed")
        pull = self.pulls.get(feed_id)
        if pull is None or pull.done:
            pull = self._start(feed_id, info, "full")
        self._unwatched_since.pop(feed_id, None)
        self._asked_at[feed_id] = self._clock()
        try:
            async with asyncio.timeout(self._ready_timeout_s):
                feed = await asyncio.shield(pull.ready)
        except TimeoutError:
            raise Unavailable(f"the Node holding this Session did not answer for {feed_id}; "
                              "try again", code="relay_unavailable") from None
        self._follow_layers(feed_id, info)
        return feed

    def _start(self, feed_id: str, info: dict[str, Any], layer: Layer) -> RelayPull:
        kind, mime = str(info.get("kind", "video")), str(info.get("codec", ""))
        name = feed_id + (".low" if layer == "low" else "")
        pull = self._pull(session_id=self.id, feed_id=feed_id, kind=kind, mime_type=mime,
                          layer=layer, make_feed=self._maker(feed_id, layer),
                          on_final=self._pull_final)
        self.pulls[name] = pull
        pull.start()
        return pull

    def _maker(self, feed_id: str, layer: Layer) -> Callable[[RTCRtpCodecParameters], Feed]:
        def make(codec: RTCRtpCodecParameters) -> Feed:
            return self.session.relayed_feed(feed_id, codec, low=layer == "low")
        return make

    def _follow_layers(self, feed_id: str, info: dict[str, Any]) -> None:
        """Pull the camera's low layer too while the origin has one (a second
        stream: local viewers then switch layers here, at its keyframes)."""
        if feed_id not in self.pulls or info.get("kind") != "video":
            return
        low = self.pulls.get(f"{feed_id}.low")
        if "low" in info.get("layers", []):
            if low is None or low.done:
                self._start(feed_id, info, "low")
        elif low is not None:
            self._stop(f"{feed_id}.low", "the origin no longer has a low layer")

    def _on_event(self, event: Event) -> None:
        kind = event.get("type")
        if kind == "feed" and isinstance(event.get("feed"), dict):
            feed_id = str(event["feed"].get("id"))
            if event["feed"].get("state") == "closed":
                self._stop(feed_id, "closed on the origin")
                self._stop(f"{feed_id}.low", "closed on the origin")
            elif feed_id in self.pulls:
                self._follow_layers(feed_id, event["feed"])

    def _pull_final(self, pull: RelayPull, reason: str) -> None:
        if self.pulls.get(pull.name) is pull:
            del self.pulls[pull.name]
        if pull.feed is not None:
            pull.feed.close(reason)

    def _stop(self, name: str, reason: str) -> None:
        pull = self.pulls.pop(name, None)
        if pull is None:
            return
        logger.info("edge: stop relaying %s/%s (%s)", self.id, name, reason)
        self._spawn(self._close_pull(pull, reason))

    async def _close_pull(self, pull: RelayPull, reason: str) -> None:
        await pull.close()
        if pull.feed is not None:
            pull.feed.close(reason)

    def watched(self, feed_id: str) -> bool:
        return any(s.feed_id == feed_id for s in self.session.subscriptions.values())

    async def _linger_loop(self) -> None:
        interval = max(0.05, min(1.0, self._linger_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.linger()

    def linger(self) -> None:
        """Stop the pulls nobody here has watched for ``edge_linger_s``."""
        now = self._clock()
        for name in [n for n, p in self.pulls.items() if p.layer == "full"]:
            if self.watched(name) or now - self._asked_at.get(name, now) < ASKED_GRACE_S:
                self._unwatched_since.pop(name, None)
                continue
            since = self._unwatched_since.setdefault(name, now)
            if now - since >= self._linger_s:
                self._unwatched_since.pop(name, None)
                self._stop(name, "nobody here watches it")
                self._stop(f"{name}.low", "nobody here watches it")

    def subscriptions(self) -> int:
        return len(self.session.subscriptions)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def end(self, reason: str) -> None:
        """The stand-in closed (the Session moved or ended, or nobody is here):
        every pull stops, every local viewer's Subscription closes."""
        if self.ended:
            return
        self.ended = True
        self._unlisten()
        self._linger.cancel()
        pulls, self.pulls = list(self.pulls.values()), {}
        await asyncio.gather(*(p.close() for p in pulls), return_exceptions=True)
        await self.session.end(reason, moved=True)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await self._linger


class Edges:
    """This Node's EdgeSessions, by Session id."""

    def __init__(self, config: Config, registry: Registry, peers: PeerFactory,
                 tokens: TokenAuthority, node_id: str) -> None:
        self._config = config
        self._registry = registry
        self._peers = peers
        self._tokens = tokens
        self._node_id = node_id
        self.sessions: dict[str, EdgeSession] = {}
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def enabled(self) -> bool:
        return self._config.cluster.edges

    def token(self, session_id: str) -> str:
        """A relay grant for one Session, minted here (docs/security.md)."""
        return self._tokens.issue(session_id, Role.RELAY, participant_id=f"node:{self._node_id}",
                                  name=f"edge {self._node_id}",
                                  ttl_s=self._config.cluster.relay_token_ttl_s)

    def session_for(self, remote: RemoteSession) -> EdgeSession:
        """The media copy of ``remote``'s Session here (made on first use)."""
        edge = self.sessions.get(remote.id)
        if edge is not None and edge.remote is remote and not edge.ended:
            return edge
        if edge is not None:
            self._spawn(edge.end("the Session's holder changed"))
        if self._http is None:
            raise Unavailable("this Node is stopping", code="server_stopping")
        described = remote.describe()
        theatre_info = described.get("theatre") or {}
        theatre = Theatre(str(theatre_info.get("id") or "edge"),
                          str(theatre_info.get("name") or ""),
                          tuple(str(s) for s in theatre_info.get("slots", [])))
        session = self._registry.detached(remote.id, theatre, str(described.get("title", "")),
                                          str(described.get("procedure", "")))
        http = self._http

        def pull(**kwargs: Any) -> RelayPull:
            return RelayPull(origin_url=lambda: remote.holder_url,
                             token=lambda: self.token(remote.id), http=http,
                             peers=self._peers, node_id=self._node_id, **kwargs)

        edge = EdgeSession(remote, session, pull=pull,
                           linger_s=self._config.cluster.edge_linger_s,
                           ready_timeout_s=self._config.cluster.request_timeout_s)
        self.sessions[remote.id] = edge
        return edge

    def remote_closed(self, remote: RemoteSession) -> None:
        edge = self.sessions.get(remote.id)
        if edge is not None and edge.remote is remote:
            del self.sessions[remote.id]
            self._spawn(edge.end("session moved" if remote.moved else "session ended"))

    def subscriptions(self) -> int:
        return sum(e.subscriptions() for e in self.sessions.values())

    def feeds(self) -> int:
        return sum(len(e.session.feeds) for e in self.sessions.values())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))

    async def close(self) -> None:
        edges, self.sessions = list(self.sessions.values()), {}
        for edge in edges:
            self._spawn(edge.end("server shutting down"))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
