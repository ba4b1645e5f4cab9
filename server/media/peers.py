"""Peer connections built from configuration, and only from it.

ICE servers come from the config (never aiortc's default public STUN server),
and the advertised host addresses and acceptable remote networks too.
"""

from __future__ import annotations

import ipaddress
import logging

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

from ..config import IceConfig
from .hooks import advertise_host_addresses

logger = logging.getLogger(__name__)


class PeerFactory:
    def __init__(self, ice: IceConfig) -> None:
        self._ice = ice
        self.allowed_networks = [
            ipaddress.ip_network(net, strict=False) for net in ice.allowed_remote_networks
        ]

    @property
    def ice_servers(self) -> list[dict[str, object]]:
        """For clients: the same servers, in RTCIceServer dictionary form."""
        out: list[dict[str, object]] = []
        for server in self._ice.servers:
            entry: dict[str, object] = {"urls": list(server.urls)}
            if server.username is not None:
                entry["username"] = server.username
                entry["credential"] = server.credential or ""
            out.append(entry)
        return out

    def create(self) -> RTCPeerConnection:
        servers = [
            RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
            for s in self._ice.servers
        ]
        # An explicit (possibly empty) list: None would make aiortc add a public server.
        return RTCPeerConnection(RTCConfiguration(iceServers=servers))

    def before_local_description(self, pc: RTCPeerConnection) -> None:
        advertise_host_addresses(pc, self._ice.host_addresses)
