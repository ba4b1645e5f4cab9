"""A WHIP client (RFC 9725) that keeps a slot published across drops.

This is how ``scrubin publish`` and the demo camera reach a Session: the same
HTTP endpoint OBS or a hardware encoder would use. Sources are shared through
a MediaRelay so a reconnect does not stop the camera or file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from ..media.hooks import advertise_host_addresses

logger = logging.getLogger(__name__)


#: Redirects followed for one offer (RFC 9725 section 4.5: a server may send
#: a client's first POST to another endpoint, e.g. the Node that holds the Session).
MAX_REDIRECTS = 3


async def post_offer(http: aiohttp.ClientSession, url: str, sdp: str, token: str,
                     params: dict[str, str] | None = None) -> tuple[int, str, str, str]:
    """POST an SDP offer; a 307/308 is followed with the same token and body
    (aiohttp would drop the token on a redirect to another host). Returns the
    status, the body, the URL that answered and its ``Location``."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}
    for _ in range(MAX_REDIRECTS + 1):
        async with http.post(url, data=sdp, headers=headers, params=params,
                             allow_redirects=False) as response:
            body = await response.text()
            target = response.headers.get("Location", "")
            if response.status not in (307, 308) or not target:
                return response.status, body, url, target
        following = urljoin(url, target)
        if urlsplit(following).scheme not in ("http", "https"):
            raise WhipError(response.status, body)
        logger.info("offer to %s redirected to %s", url, following)
        url, params = following, None  # the query came along in the Location
    raise WhipError(response.status, "too many redirects")


class WhipError(Exception):
    """The server refused the publication; ``status`` and body say why."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"WHIP {status}: {body[:300]}")
        self.status = status
        self.body = body
        try:
            self.code = str(json.loads(body).get("code", ""))
        except (ValueError, AttributeError):
            self.code = ""

    @property
    def retryable(self) -> bool:
        """Worth trying again later: the server's trouble, or a Session not open yet."""
        return self.status >= 500 or self.status in (409, 429) or self.code == "unknown_session"


@dataclass
class WhipOptions:
    ice_servers: list[RTCIceServer] = field(default_factory=list)
    host_addresses: list[str] = field(default_factory=list)
    #: Restrict video to one codec ("video/H264" for passthrough sources).
    video_codec: str | None = None
    reconnect: bool = True
    min_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    #: Replace another encoder publishing the slot (never the expert's page).
    takeover: bool = False


class WhipPublisher:
    def __init__(self, url: str, token: str, tracks: list[MediaStreamTrack],
                 options: WhipOptions | None = None) -> None:
        self.url = url
        self.token = token
        self.options = options or WhipOptions()
        self._relay = MediaRelay()
        self._sources = tracks
        self._pc: RTCPeerConnection | None = None
        self._resource: str | None = None
        self._stopping = asyncio.Event()
        self.connections = 0
        self.state = "new"
        self.on_state: Callable[[str], None] | None = None

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state)

    async def connect(self, http: aiohttp.ClientSession) -> RTCPeerConnection:
        """One publication attempt: offer, answer, and the peer connection."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.options.ice_servers)))
        try:
            for source in self._sources:
                transceiver = pc.addTransceiver(
                    self._relay.subscribe(source, buffered=False), direction="sendonly")
                if source.kind == "video" and self.options.video_codec:
                    wanted = self.options.video_codec.lower()
                    caps = RTCRtpSender.getCapabilities("video").codecs
                    transceiver.setCodecPreferences(
                        [c for c in caps if c.mimeType.lower() in (wanted, "video/rtx")])
            advertise_host_addresses(pc, self.options.host_addresses)
            await pc.setLocalDescription(await pc.createOffer())
            params = {"takeover": "1"} if self.options.takeover else None
            status, body, answered, location = await post_offer(
                http, self.url, pc.localDescription.sdp, self.token, params)
            if status != 201:
                raise WhipError(status, body)
            self._resource = urljoin(answered, location) if location else None
            await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        except BaseException:
            await pc.close()
            raise
        self.connections += 1
        return pc

    async def run(self) -> None:
        """Publish until stop(); reconnect with backoff when anything drops."""
        backoff = self.options.min_backoff_s
        async with aiohttp.ClientSession() as http:
            while not self._stopping.is_set():
                gone = asyncio.Event()
                try:
                    self._set_state("connecting")
                    pc = self._pc = await self.connect(http)

                    @pc.on("connectionstatechange")
                    def _changed(pc: RTCPeerConnection = pc, gone: asyncio.Event = gone) -> None:
                        if pc.connectionState == "connected":
                            self._set_state("live")
                        if pc.connectionState in ("failed", "closed"):
                            gone.set()

                    backoff = self.options.min_backoff_s
                    stop = asyncio.ensure_future(self._stopping.wait())
                    dropped = asyncio.ensure_future(gone.wait())
                    await asyncio.wait({stop, dropped}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    dropped.cancel()
                except WhipError as exc:
                    logger.warning("publish to %s refused: %s", self.url, exc)
                    if not exc.retryable:
                        self._set_state("refused")
                        raise
                    if exc.code == "slot_taken":
                        # Someone else publishes this slot (the expert took it over):
                        # wait for it to be free instead of fighting for it.
                        self._set_state("waiting")
                        backoff = self.options.max_backoff_s
                except (aiohttp.ClientError, OSError) as exc:
                    logger.warning("server unreachable at %s: %s", self.url, exc)
                finally:
                    await self._teardown(http)
                if self._stopping.is_set() or not self.options.reconnect:
                    break
                self._set_state("reconnecting")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, self.options.max_backoff_s)
        self._set_state("stopped")

    async def _teardown(self, http: aiohttp.ClientSession) -> None:
        pc, self._pc = self._pc, None
        resource, self._resource = self._resource, None
        if resource is not None and self._stopping.is_set():
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.delete(resource, headers={"Authorization": f"Bearer {self.token}"},
                                       timeout=aiohttp.ClientTimeout(total=5)):
                    pass
        if pc is not None:
            await pc.close()

    def stop(self) -> None:
        self._stopping.set()
