"""A WHIP client (RFC 9725) that keeps a slot published across drops.

This is how ``scrubin publish`` and the demo camera reach a Session: the same
HTTP endpoint OBS or a hardware encoder would use. Sources are shared through
a MediaRelay so a reconnect does not stop the camera or file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
from aioice import Candidate
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


def loopback_host_addresses(url: str) -> list[str]:
    """What to advertise when ``url`` reaches the server over loopback.

    aioice never gathers loopback, so a publisher on the server's own machine
    would offer only its LAN addresses, which a server advertising 127.0.0.1
    (the demo) ignores: ICE could never connect without ``--host-address``.
    """
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return ["127.0.0.1"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return []
    return [str(address)] if address.is_loopback else []


def candidate_hosts(sdp: str) -> list[str]:
    """The distinct addresses of the ICE candidates in ``sdp``, in order."""
    hosts: list[str] = []
    for line in sdp.splitlines():
        if not line.startswith("a=candidate:"):
            continue
        try:
            host = str(Candidate.from_sdp(line[len("a=candidate:"):].strip()).host)
        except (ValueError, IndexError):
            continue
        if host not in hosts:
            hosts.append(host)
    return hosts


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def explain_ice_failure(local: list[str], remote: list[str]) -> str:
    """Why no candidate pair worked, in words an operator can act on."""
    if not remote:
        # The server drops every offered candidate outside its allowed networks;
        # left with none, aioice gathers none of its own either.
        return (f"ICE failed: the server answered without candidates, as it does when none "
                f"of this machine's addresses ({', '.join(local) or 'none'}) is in its [ice] "
                "allowed_remote_networks; on the server's own machine publish with "
                "--host-address 127.0.0.1")
    why = (f"ICE failed: none of this machine's addresses ({', '.join(local) or 'none'}) "
           f"reached the server's ({', '.join(remote)})")
    if all(_is_loopback(h) for h in remote) and not any(_is_loopback(h) for h in local):
        why += ("; the server advertises only loopback: publish from the server's own "
                "machine (--host-address 127.0.0.1) or set [ice] host_addresses on the "
                "server to an address this machine reaches")
    elif local and all(_is_loopback(h) for h in local) and not any(
            _is_loopback(h) for h in remote):
        why += ("; this machine advertises only loopback but the server is elsewhere: "
                "drop --host-address or give an address the server reaches")
    return why


@dataclass
class WhipOptions:
    ice_servers: list[RTCIceServer] = field(default_factory=list)
    #: Addresses to advertise instead of the interfaces'. Empty: the
    #: interfaces', or loopback when the URL is a loopback or localhost one.
    host_addresses: list[str] = field(default_factory=list)
    #: Restrict video to one codec ("video/H264" for passthrough sources).
    video_codec: str | None = None
    reconnect: bool = True
    min_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    #: Replace another encoder publishing the slot (never the expert's page).
    takeover: bool = False
    #: An attempt that is not connected by then counts as failed.
    connect_timeout_s: float = 20.0


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
        # The last attempt's offer and answer, to explain an ICE failure.
        self._sdp = ("", "")
        self._stopping = asyncio.Event()
        self.host_addresses = self.options.host_addresses or loopback_host_addresses(url)
        self.connections = 0
        self.state = "new"
        #: Why the last attempt ended (empty while live or before any failure).
        self.reason = ""
        #: Seconds until the next attempt, while ``reconnecting``.
        self.retry_in = 0.0
        self.on_state: Callable[[str], None] | None = None

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state)

    def describe_state(self) -> str:
        """One line for a terminal: the state, and why and when for a retry."""
        if self.state == "reconnecting":
            return f"reconnecting in {self.retry_in:.1f} s: {self.reason or 'dropped'}"
        if self.state == "refused" and self.reason:
            return f"refused: {self.reason}"
        return self.state

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
            advertise_host_addresses(pc, self.host_addresses)
            await pc.setLocalDescription(await pc.createOffer())
            headers = {"Authorization": f"Bearer {self.token}",
                       "Content-Type": "application/sdp"}
            params = {"takeover": "1"} if self.options.takeover else None
            async with http.post(self.url, data=pc.localDescription.sdp, headers=headers,
                                 params=params) as response:
                body = await response.text()
                if response.status != 201:
                    raise WhipError(response.status, body)
                location = response.headers.get("Location", "")
            self._resource = urljoin(self.url, location) if location else None
            self._sdp = (pc.localDescription.sdp, body)
            await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        except BaseException:
            await pc.close()
            raise
        self.connections += 1
        return pc

    async def run(self) -> None:
        """Publish until stop(); reconnect with backoff when anything drops.

        The backoff is reset only by a connection that came up: a server that
        answers every offer but never connects (ICE) is retried ever more
        slowly, and ``reason`` says why each attempt ended."""
        backoff = self.options.min_backoff_s
        async with aiohttp.ClientSession() as http:
            while not self._stopping.is_set():
                try:
                    self._set_state("connecting")
                    pc = self._pc = await self.connect(http)
                    if await self._until_dropped(pc):
                        backoff = self.options.min_backoff_s
                except WhipError as exc:
                    self.reason = f"server answered {exc.status}: {exc.body[:200]}"
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
                    self.reason = f"server unreachable: {exc}"
                    logger.warning("server unreachable at %s: %s", self.url, exc)
                finally:
                    await self._teardown(http)
                if self._stopping.is_set() or not self.options.reconnect:
                    break
                self.retry_in = backoff
                self._set_state("reconnecting")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, self.options.max_backoff_s)
        self._set_state("stopped")

    async def _until_dropped(self, pc: RTCPeerConnection) -> bool:
        """Wait until ``pc`` fails, closes or stop() is called; sets ``reason``.
        Returns whether it was ever connected."""
        connected = asyncio.Event()
        gone = asyncio.Event()

        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState == "connected":
                self.reason = ""
                connected.set()
                self._set_state("live")
            if pc.connectionState in ("failed", "closed"):
                gone.set()

        stop = asyncio.ensure_future(self._stopping.wait())
        dropped = asyncio.ensure_future(gone.wait())
        try:
            done, _ = await asyncio.wait({stop, dropped}, timeout=self.options.connect_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done and not connected.is_set():
                self.reason = (f"not connected after {self.options.connect_timeout_s:g} s "
                               f"(ICE {pc.iceConnectionState})")
                return False
            if not done:
                await asyncio.wait({stop, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            dropped.cancel()
        if self._stopping.is_set():
            return connected.is_set()
        if connected.is_set():
            self.reason = "connection lost"
        elif pc.iceConnectionState == "failed":
            offer, answer = self._sdp
            self.reason = explain_ice_failure(candidate_hosts(offer), candidate_hosts(answer))
        else:
            self.reason = f"connection {pc.connectionState} before it came up (DTLS)"
        logger.info("publish to %s: %s", self.url, self.reason)
        return connected.is_set()

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
