"""Peer connections built from configuration, and only from it.

ICE servers come from the config (never aiortc's default public STUN server),
and the advertised host addresses and acceptable remote networks too. The
Node's own peer connections use ``ice.node_servers`` (none by default: the
Node answers from its host candidates and never allocates a TURN relay);
clients are told ``ice.servers`` plus TURN credentials of their own
(``ice_servers_for``).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

from ..config import IceConfig, TurnConfig
from ..tokens import Grant
from .hooks import advertise_host_addresses
from .turn import ClientIce, ClientIceServers

logger = logging.getLogger(__name__)


class PeerFactory:
    def __init__(self, ice: IceConfig, turn: TurnConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._ice = ice
        self._clients = ClientIceServers(ice.servers, turn or TurnConfig(), clock)
        self.allowed_networks = [
            ipaddress.ip_network(net, strict=False) for net in ice.allowed_remote_networks
        ]

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
        advertise_host_addresses(pc, self._ice.host_addresses)
