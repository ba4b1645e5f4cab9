"""Peer connections built from configuration, and only from it; answered and
watched the same way for publishers and viewers.

ICE servers come from the config (never aiortc's default public STUN server),
and the advertised host addresses and acceptable remote networks too. The
Node's own peer connections use ``ice.node_servers`` (none by default: the
Node answers from its host candidates and never allocates a TURN relay);
clients are told ``ice.servers`` plus TURN credentials of their own
(``ice_servers_for``). Every peer connection the server answers is watched
(``watch``): a connection that fails or closes, or a peer that goes quiet for
``liveness.peer_timeout_s`` (``server/media/liveness.py``), ends its owner.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCSessionDescription,
)
from aiortc import sdp as aiortc_sdp

from ..config import IceConfig, TurnConfig, udp_port_range
from ..errors import Unprocessable
from ..tokens import Grant
from . import hooks
from .liveness import Liveness
from .turn import ClientIce, ClientIceServers

logger = logging.getLogger(__name__)

#: Why a watched peer's owner is told it is gone.
GONE_FAILED = "failed"          # ICE/DTLS failed (aiortc's own verdict)
GONE_CLOSED = "closed"          # the connection closed (DTLS close, BYE...)
GONE_QUIET = "peer_gone"        # nothing heard for liveness.peer_timeout_s


def negotiated_codecs(answer: str | aiortc_sdp.SessionDescription
                      ) -> dict[str, RTCRtpCodecParameters]:
    """mid -> the codec the remote will send/receive (first in the answer)."""
    out = {}
    parsed = aiortc_sdp.SessionDescription.parse(answer) if isinstance(answer, str) else answer
    for media in parsed.media:
        codecs = [c for c in media.rtp.codecs if not c.mimeType.lower().endswith("/rtx")]
        if codecs and media.rtp.muxId is not None:
            out[media.rtp.muxId] = codecs[0]
    return out


def offered_setup(offer: str) -> str:
    """The offer's DTLS ``a=setup`` value (``actpass`` when absent, RFC 8842)."""
    for line in offer.splitlines():
        if line.startswith("a=setup:"):
            return line[len("a=setup:"):].strip().lower()
    return "actpass"


class PeerFactory:
    def __init__(self, ice: IceConfig, liveness: Liveness | None = None,
                 turn: TurnConfig | None = None, clock: Callable[[], float] = time.time,
                 ) -> None:
        self._ice = ice
        self._liveness = liveness
        self._clients = ClientIceServers(ice.servers, turn or TurnConfig(), clock)
        self.allowed_networks = [
            ipaddress.ip_network(net, strict=False) for net in ice.allowed_remote_networks
        ]
        self._probes: set[asyncio.Task[Any]] = set()
        #: Host candidates bind ports of this range (None: ephemeral ports).
        self.udp_ports = (hooks.UdpPortRange(*udp_port_range(ice.udp_ports))
                          if ice.udp_ports else None)

    def ice_servers_for(self, grant: Grant) -> ClientIce:
        """For one client: static servers and its own TURN credentials."""
        return self._clients.for_grant(grant)

    def create(self) -> RTCPeerConnection:
        servers = [
            RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
            for s in self._ice.node_servers
        ]
        # An explicit (possibly empty) list: None would make aiortc add a public server.
        return RTCPeerConnection(RTCConfiguration(iceServers=servers))

    def before_local_description(self, pc: RTCPeerConnection) -> None:
        hooks.advertise_host_addresses(pc, self._ice.host_addresses)
        if self.udp_ports is not None:
            hooks.bind_udp_ports(pc, self.udp_ports)

    async def answer(self, pc: RTCPeerConnection, offer: str) -> str:
        """Apply ``offer`` and return our answer with every candidate in it.

        We do not trickle (WHIP/WHEP PATCH answers 405), so candidates are
        gathered first; the caller applies the answer (setLocalDescription)
        once its receivers are tapped or its senders set up.
        """
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        except Exception as exc:  # aiortc raises ValueError/OperationError/etc.
            # aiortc's words ("Failed to set remote video description send
            # parameters") mean nothing to a client: log them, answer ours.
            logger.info("offer rejected by aiortc: %s", exc)
            raise Unprocessable("the offer cannot be answered: no codec or transport in it "
                                "that ScrubIn can use with this stream", code="sdp_rejected"
                                ) from None
        hooks.set_dtls_roles(pc, offered_setup(offer))
        hooks.accept_rsa_dtls_servers(pc)
        self.before_local_description(pc)
        for transceiver in pc.getTransceivers():
            await transceiver.receiver.transport.transport.iceGatherer.gather()
        answer = await pc.createAnswer()
        if answer is None:
            raise Unprocessable("could not answer the offer", code="sdp_rejected")
        return str(answer.sdp)

    def watch(self, pc: RTCPeerConnection, name: str,
              on_gone: Callable[[str], Any]) -> None:
        """Tell ``on_gone(reason)`` once when ``pc`` fails, closes, or goes quiet.

        Call after :meth:`answer` (the local candidates must exist).
        """
        told = False

        def gone(reason: str) -> None:
            nonlocal told
            if told:
                return
            told = True
            unwatch()
            on_gone(reason)

        unwatch: Callable[[], None] = lambda: None  # noqa: E731
        if self._liveness is not None:
            activity = self._liveness.activity()
            hooks.watch_datagrams(pc, activity.heard)
            unwatch = self._liveness.watch_peer(
                name, activity, connected=lambda: pc.connectionState == "connected",
                probe=lambda: self._probe(pc), on_gone=lambda quiet: gone(GONE_QUIET))

        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState == "failed":
                gone(GONE_FAILED)
            elif pc.connectionState == "closed":
                gone(GONE_CLOSED)

    def _probe(self, pc: RTCPeerConnection) -> None:
        for task in hooks.probe_peer(pc):
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def close(self) -> None:
        """Cancel probes still in flight (the Node is stopping)."""
        for task in list(self._probes):
            task.cancel()
        if self._probes:
            await asyncio.gather(*self._probes, return_exceptions=True)
