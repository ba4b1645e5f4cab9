"""A weak network on loopback: a seeded user-space UDP relay between a viewer
and the server (this kernel has no netem).

The viewer is pointed at the relay by rewriting the server's candidate in the
answer it receives; the server learns the relay's address as a peer-reflexive
candidate when the viewer's checks arrive through it. Packets from the server
to the viewer can be dropped, delayed, or rate-limited (token bucket with a
drop-tail queue, like a slow access link); STUN and DTLS are never dropped, so
the connection itself always comes up. Everything is on 127.0.0.1, seeded, and
bounded.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LinkStats:
    forwarded: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    bytes_forwarded: int = 0


@dataclass
class Link:
    """What happens to media packets going server → viewer."""

    loss: float = 0.0
    delay_s: float = 0.0
    rate_bps: float | None = None
    queue_bytes: int = 64 * 1024
    #: Only RTP/RTCP (RFC 7983: first byte 128-191) is ever impaired.
    seed: int = 1
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


class _ViewerSide(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.from_viewer(data, addr)


class _ServerSide(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, viewer: Any) -> None:
        self.relay = relay
        self.viewer = viewer

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.from_server(data, self.viewer)


class UdpRelay:
    def __init__(self, server_addr: tuple[str, int], link: Link | None = None) -> None:
        self.server_addr = server_addr
        self.link = link or Link()
        self.stats = LinkStats()
        self._viewer_transport: asyncio.DatagramTransport | None = None
        self._upstream: dict[Any, asyncio.DatagramTransport] = {}
        self._pending: dict[Any, list[bytes]] = {}
        # Token bucket of the rate limit.
        self._queue: list[tuple[bytes, Any]] = []
        self._queued_bytes = 0
        self._drain: asyncio.Task[None] | None = None
        self._opening: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._viewer_transport is not None
        return int(self._viewer_transport.get_extra_info("sockname")[1])

    async def start(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        self._viewer_transport, _ = await loop.create_datagram_endpoint(
            lambda: _ViewerSide(self), local_addr=("127.0.0.1", 0))
        return self

    def from_viewer(self, data: bytes, viewer: Any) -> None:
        transport = self._upstream.get(viewer)
        if transport is None:
            self._pending.setdefault(viewer, []).append(data)
            if len(self._pending[viewer]) == 1:
                task = asyncio.ensure_future(self._open_upstream(viewer))
                self._opening.add(task)
                task.add_done_callback(self._opening.discard)
            return
        transport.sendto(data, self.server_addr)

    async def _open_upstream(self, viewer: Any) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ServerSide(self, viewer), local_addr=("127.0.0.1", 0))
        self._upstream[viewer] = transport
        for data in self._pending.pop(viewer, []):
            transport.sendto(data, self.server_addr)

    def from_server(self, data: bytes, viewer: Any) -> None:
        link = self.link
        media = bool(data) and 127 < data[0] < 192
        if media and link.loss and link.rng.random() < link.loss:
            self.stats.dropped_loss += 1
            return
        if media and link.rate_bps:
            if self._queued_bytes + len(data) > link.queue_bytes:
                self.stats.dropped_queue += 1
                return
            self._queue.append((data, viewer))
            self._queued_bytes += len(data)
            if self._drain is None:
                self._drain = asyncio.ensure_future(self._drain_queue())
            return
        self._later(data, viewer, link.delay_s if media else 0.0)

    async def _drain_queue(self) -> None:
        try:
            while self._queue:
                data, viewer = self._queue.pop(0)
                self._queued_bytes -= len(data)
                self._later(data, viewer, self.link.delay_s)
                rate = self.link.rate_bps
                if rate:
                    await asyncio.sleep(len(data) * 8 / rate)
        finally:
            self._drain = None

    def _later(self, data: bytes, viewer: Any, delay: float) -> None:
        if delay <= 0:
            self._send(data, viewer)
            return
        asyncio.get_running_loop().call_later(delay, self._send, data, viewer)

    def _send(self, data: bytes, viewer: Any) -> None:
        if self._viewer_transport is None or self._viewer_transport.is_closing():
            return
        self.stats.forwarded += 1
        self.stats.bytes_forwarded += len(data)
        self._viewer_transport.sendto(data, viewer)

    def point_answer_here(self, answer_sdp: str) -> str:
        """The server's answer, with its candidate replaced by this relay's address."""
        host, port = self.server_addr
        return re.sub(rf"(a=candidate:\S+ \d+ udp \d+ ){re.escape(host)} {port} ",
                      rf"\g<1>127.0.0.1 {self.port} ", answer_sdp)

    def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        for transport in self._upstream.values():
            transport.close()
        if self._viewer_transport is not None:
            self._viewer_transport.close()


def server_candidate(answer_sdp: str) -> tuple[str, int]:
    """The (host, port) of the first UDP host candidate in the server's answer."""
    match = re.search(r"a=candidate:\S+ \d+ udp \d+ (\S+) (\d+) typ host", answer_sdp)
    assert match, answer_sdp
    return match.group(1), int(match.group(2))
