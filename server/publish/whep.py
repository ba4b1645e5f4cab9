"""A headless WHEP player (aiortc): one Feed of a Session, counted as it
arrives. Tests and operators use it to check that a Feed reaches a viewer
from where it stands (an entry Node included: it follows the 307 to the Node
that holds the Session, with its token, as RFC 9725 clients do)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..media.hooks import advertise_host_addresses
from .whip import WhipError, post_offer

logger = logging.getLogger(__name__)


class WhepPlayer:
    def __init__(self, url: str, token: str, *, kind: str = "video",
                 ice_servers: list[RTCIceServer] | None = None,
                 host_addresses: list[str] | None = None) -> None:
        self.url = url
        self.token = token
        self.kind = kind
        #: The URL that answered (after redirects) and the resource there.
        self.answered_by = ""
        self.resource = ""
        self.frames = 0
        self.first_frame = asyncio.Event()
        self._ice_servers = list(ice_servers or [])
        self._host_addresses = list(host_addresses or [])
        self._pc: RTCPeerConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pc(self) -> RTCPeerConnection | None:
        return self._pc

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Offer, follow redirects, apply the answer; frames then count."""
        pc = self._pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        pc.addTransceiver(self.kind, direction="recvonly")

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            self._reader = asyncio.ensure_future(self._read(track))

        advertise_host_addresses(pc, self._host_addresses)
        await pc.setLocalDescription(await pc.createOffer())
        status, body, answered, location, _ = await post_offer(
            http, self.url, pc.localDescription.sdp, self.token)
        if status != 201:
            raise WhipError(status, body)
        self.answered_by = answered
        self.resource = urljoin(answered, location) if location else ""
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames += 1
                self.first_frame.set()

    async def stop(self, http: aiohttp.ClientSession) -> int:
        """DELETE the resource (on the Node that answered) and close; its status."""
        status = 0
        if self.resource:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.delete(self.resource,
                                       headers={"Authorization": f"Bearer {self.token}"},
                                       timeout=aiohttp.ClientTimeout(total=5)) as response:
                    status = response.status
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pc is not None:
            await self._pc.close()
        return status
