"""Every place ScrubIn reaches into aiortc/aioice private state, in one module.

aiortc has no public API for forwarding encoded media, so the live path taps the
receiver's jitter buffer and redirects the sender's keyframe requests. These
names are pinned with aiortc==1.16.0; tests/test_aiortc_hooks.py fails loudly
when an upgrade moves them. Nothing outside this module may use a private name.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import ipaddress
import logging
import time
import types
from collections.abc import Callable
from typing import Any

from aioice import Candidate
from aioice import ice as aioice_ice
from aiortc import (
    RTCCertificate,
    RTCDtlsTransport,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
)
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    RtpPacket,
    unpack_remb_fci,
)
from aiortc.utils import uint16_add

logger = logging.getLogger(__name__)

#: Called for every complete encoded frame: (depayloaded data, RTP timestamp).
FrameSink = Callable[[bytes, int], None]

RECEIVER_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
RECEIVER_SEND_PLI = "_send_rtcp_pli"
SENDER_SEND_KEYFRAME = "_send_keyframe"
GATHERER_CONNECTION = "_connection"


#: A head waiting this long is looked at for holes too old to be filled (a
#: frame interval at 10 fps: in steady flow the head moves on sooner).
STUCK_CHECK_S = 0.1


class MarkerJitterBuffer(JitterBuffer):
    """Video: hands a frame on as soon as its marker-bit packet completes it.

    aiortc's buffer only knows a frame is complete when the next frame's first
    packet arrives, which adds one frame interval (33 ms at 30 fps) per hop.
    Frames go straight to ``sink``; ``add`` never returns one, so the receiver's
    decoder thread stays idle and no pixels are ever decoded here.
    """

    def __init__(self, sink: FrameSink, capacity: int = 512, *, max_stall_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(capacity=capacity, is_video=True)
        self._sink = sink
        self._max_stall_s = max_stall_s
        self._clock = clock
        self._head: int | None = None
        self._head_since = 0.0
        #: When each slot's packet arrived: a hole's age is that of the first
        #: packet after it (when the hole became known, and was NACKed).
        self._arrived = [0.0] * capacity

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        now = self._clock()
        self._arrived[packet.sequence_number % self.capacity] = now
        pli_flag, _ = super().add(packet)
        # aiortc asks again for a lost packet only when a new gap appears, so a
        # retransmission that never comes would hold every later frame until
        # 512 packets have passed (seconds, for every viewer). Bound the wait:
        # skip to the next frame and ask the publisher for a keyframe.
        if self._origin != self._head:
            self._head, self._head_since = self._origin, now
            return pli_flag, None
        if now - self._head_since <= min(STUCK_CHECK_S, self._max_stall_s):
            return pli_flag, None
        # Stuck: skip while the hole at the head has been known longer than the
        # wait. After a burst the next holes were known (and NACKed) as long
        # ago as the first: one wait for them all, not a wait per hole.
        for _ in range(self.capacity):
            known = self._hole_known_at()
            if known is None or now - known <= self._max_stall_s:
                break
            if not self._skip_incomplete_head():
                break
            self._head, self._head_since = self._origin, now
            pli_flag = True
            self._remove_frame(packet.sequence_number)
            if self._origin is None:
                break
        return pli_flag, None

    def _hole_known_at(self) -> float | None:
        """Arrival time of the first packet after the first missing one from
        the head, or None (no hole, or nothing after it yet)."""
        origin = self._origin
        if origin is None:
            return None
        packets, capacity = self._packets, self.capacity
        offset = 0
        while offset < capacity and packets[(origin + offset) % capacity] is not None:
            offset += 1
        while offset < capacity:
            slot = (origin + offset) % capacity
            if packets[slot] is not None:
                return self._arrived[slot]
            offset += 1
        return None

    def _skip_incomplete_head(self) -> bool:
        """Drop what waits for a packet that is not coming: up to the first frame
        in the buffer that is whole (its first packet follows a marker or a new
        timestamp, and every packet up to its marker is here). After heavy loss
        there are many holes; skipping them one stall at a time would freeze the
        picture for seconds."""
        if self._origin is None:
            return False
        whole = self._first_whole_frame()
        if whole:
            self.remove(whole)
            return True
        return self._skip_head_group()

    def _first_whole_frame(self) -> int:
        """Offset from the origin of the first whole frame after the head, or 0."""
        packets, capacity, origin = self._packets, self.capacity, self._origin
        assert origin is not None
        previous = packets[origin % capacity]
        for offset in range(1, capacity):
            packet = packets[(origin + offset) % capacity]
            starts = (packet is not None and previous is not None
                      and (previous.marker or previous.timestamp != packet.timestamp))
            previous = packet
            if not starts:
                continue
            assert packet is not None
            for end in range(offset, capacity):
                member = packets[(origin + end) % capacity]
                if member is None or member.timestamp != packet.timestamp:
                    break
                if member.marker:
                    return offset
        return 0

    def _skip_head_group(self) -> bool:
        origin = self._origin
        assert origin is not None
        head_timestamp: int | None = None
        for count in range(self.capacity):
            packet = self._packets[(origin + count) % self.capacity]
            if packet is None:
                continue
            if head_timestamp is None:
                head_timestamp = packet.timestamp
            elif packet.timestamp != head_timestamp:
                self.remove(count)
                return True
        return False

    def _remove_frame(self, sequence_number: int) -> None:
        # Several frames may complete at once (a retransmission fills a gap).
        while self._origin is not None:
            packets: list[RtpPacket] = []
            timestamp: int | None = None
            complete = 0
            for count in range(self.capacity):
                packet = self._packets[(self._origin + count) % self.capacity]
                if packet is None:
                    break
                if timestamp is None:
                    timestamp = packet.timestamp
                elif packet.timestamp != timestamp:
                    # A sender that never sets the marker still ends its frame here.
                    complete = count
                    break
                packets.append(packet)
                if packet.marker:
                    complete = count + 1
                    break
            if not complete or timestamp is None:
                return None
            data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
            self.remove(complete)
            self._sink(data, timestamp)
        return None


class AudioPassThrough(JitterBuffer):
    """Audio: every RTP packet is one Opus frame; forward it on arrival.

    aiortc's audio buffer prefetches four packets (80 ms). Late or duplicate
    packets are dropped; gaps are the viewer's concealment's job.
    """

    def __init__(self, sink: FrameSink) -> None:
        super().__init__(capacity=16)
        self._sink = sink
        self._last: int | None = None

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        seq = packet.sequence_number
        if self._last is not None:
            ahead = uint16_add(seq, -self._last)
            if ahead == 0 or ahead > 0x8000:
                return False, None
        self._last = seq
        self._sink(packet._data, packet.timestamp)  # type: ignore[attr-defined]
        return False, None


def tap_receiver(receiver: RTCRtpReceiver, kind: str, sink: FrameSink) -> None:
    """Route the receiver's reassembled encoded frames to ``sink``.

    Must run before the receiver starts (after setRemoteDescription, before the
    connection is established).
    """
    buffer: JitterBuffer = MarkerJitterBuffer(sink) if kind == "video" else AudioPassThrough(sink)
    if not hasattr(receiver, RECEIVER_JITTER_BUFFER):
        raise RuntimeError("aiortc changed: RTCRtpReceiver has no jitter buffer to tap")
    setattr(receiver, RECEIVER_JITTER_BUFFER, buffer)


async def send_picture_loss(receiver: RTCRtpReceiver) -> int:
    """Ask the publisher for a keyframe (RTCP PLI) on every SSRC it sends."""
    send_pli = getattr(receiver, RECEIVER_SEND_PLI)
    sources = receiver.getSynchronizationSources()
    for source in sources:
        await send_pli(source.source)
    return len(sources)


def picture_loss_requester(receiver: RTCRtpReceiver, alive: Callable[[], bool],
                           tasks: set[asyncio.Task[Any]]) -> Callable[[], bool]:
    """A Feed's keyframe requester for what ``receiver`` receives: one PLI
    upstream now, while ``alive()``; its task kept in ``tasks`` (the owner
    cancels them when it closes)."""

    def request() -> bool:
        if not alive():
            return False
        task = asyncio.ensure_future(send_picture_loss(receiver))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return True

    return request


def redirect_keyframe_requests(sender: RTCRtpSender, handler: Callable[[], None]) -> None:
    """A viewer's PLI/FIR would make aiortc's sender ask its (absent) encoder for
    a keyframe; hand it to the Feed instead, which rate-limits it upstream."""
    if not callable(getattr(sender, SENDER_SEND_KEYFRAME, None)):
        raise RuntimeError("aiortc changed: RTCRtpSender has no _send_keyframe")
    setattr(sender, SENDER_SEND_KEYFRAME, handler)


def _ice_connections(pc: RTCPeerConnection) -> list[aioice_ice.Connection]:
    connections = []
    for transceiver in pc.getTransceivers():
        gatherer = transceiver.receiver.transport.transport.iceGatherer
        connections.append(getattr(gatherer, GATHERER_CONNECTION))
    if pc.sctp is not None:
        connections.append(getattr(pc.sctp.transport.transport.iceGatherer, GATHERER_CONNECTION))
    return connections


def advertise_host_addresses(pc: RTCPeerConnection, addresses: list[str]) -> None:
    """Gather host candidates on exactly ``addresses`` instead of the interfaces.

    aioice never gathers loopback and has no NAT 1:1 setting; both needs meet
    here. Call after transceivers exist and before setLocalDescription.
    """
    if not addresses:
        return

    async def gather_candidates(self: aioice_ice.Connection) -> None:
        if self._local_candidates_start:
            return
        self._local_candidates_start = True
        coros = [
            self.get_component_candidates(component=component, addresses=list(addresses))
            for component in self._components
        ]
        for candidates in await asyncio.gather(*coros):
            self._local_candidates += candidates
        self._local_candidates_end = True

    for connection in _ice_connections(pc):
        connection.gather_candidates = types.MethodType(  # type: ignore[method-assign]
            gather_candidates, connection)


class UdpPortRange:
    """Ports ``low``..``high`` for host candidates, handed out round robin;
    a port in use (by anyone) is skipped."""

    def __init__(self, low: int, high: int) -> None:
        if not 0 < low <= high <= 65535:
            raise ValueError(f"bad UDP port range {low}-{high}")
        self.low, self.high = low, high
        self._next = low

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"

    def ports(self) -> list[int]:
        """Every port once, starting after the last one bound."""
        size = self.high - self.low + 1
        start = self._next - self.low
        return [self.low + (start + i) % size for i in range(size)]

    async def bind(self, create: Callable[..., Any], protocol_factory: Callable[[], Any],
                   address: str, **kwargs: Any) -> Any:
        for port in self.ports():
            try:
                result = await create(protocol_factory, local_addr=(address, port), **kwargs)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            self._next = self.low + (port + 1 - self.low) % (self.high - self.low + 1)
            return result
        logger.error("no free UDP port in %s on %s: a peer connection gets no host candidate "
                     "there (widen ice.udp_ports)", self, address)
        raise OSError(errno.EADDRINUSE, f"no free UDP port in {self}")


#: The range the host candidates gathered in this task bind (bind_udp_ports).
_UDP_PORTS: contextvars.ContextVar[UdpPortRange | None] = contextvars.ContextVar(
    "scrubin_udp_ports", default=None)
LOOP_PORTS_HOOKED = "_scrubin_udp_ports_hooked"


def bind_udp_ports(pc: RTCPeerConnection, ports: UdpPortRange) -> None:
    """Bind the host candidates of ``pc`` to ports of ``ports``: a hospital
    firewall opens a range, not all of 1024-65535 (aioice binds port 0 and has
    no range option). Call after transceivers exist, before gathering.

    aioice's ``get_component_candidates`` binds each host address with
    ``loop.create_datagram_endpoint(..., local_addr=(address, 0))``; for this
    connection's gathering only (a context variable), the loop's call picks
    a port of the range instead of 0.
    """
    for connection in _unique_connections(pc):
        original = connection.get_component_candidates

        async def get_component_candidates(self: aioice_ice.Connection, *args: Any,
                                           _original: Callable[..., Any] = original,
                                           **kwargs: Any) -> Any:
            _hook_datagram_endpoints(asyncio.get_running_loop())
            token = _UDP_PORTS.set(ports)
            try:
                return await _original(*args, **kwargs)
            finally:
                _UDP_PORTS.reset(token)

        connection.get_component_candidates = types.MethodType(  # type: ignore[method-assign]
            get_component_candidates, connection)


def _hook_datagram_endpoints(loop: asyncio.AbstractEventLoop) -> None:
    if getattr(loop, LOOP_PORTS_HOOKED, False):
        return
    original = loop.create_datagram_endpoint

    async def create_datagram_endpoint(protocol_factory: Callable[[], Any],
                                       local_addr: tuple[str, int] | None = None,
                                       remote_addr: Any = None, **kwargs: Any) -> Any:
        ports = _UDP_PORTS.get()
        if (ports is None or local_addr is None or local_addr[1] != 0
                or remote_addr is not None or kwargs.get("sock") is not None):
            return await original(protocol_factory, local_addr=local_addr,
                                  remote_addr=remote_addr, **kwargs)
        return await ports.bind(original, protocol_factory, local_addr[0], **kwargs)

    setattr(loop, "create_datagram_endpoint", create_datagram_endpoint)  # noqa: B010
    setattr(loop, LOOP_PORTS_HOOKED, True)


def remote_candidate_allowed(
    candidate: Candidate | Any, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """mDNS names are never resolved (that would be multicast on the LAN)."""
    host = str(candidate.host)
    if host.endswith(".local"):
        return False
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)


DTLS_LOCAL_CERTIFICATE = "_RTCDtlsTransport__local_certificate"

#: What aiortc offers as DTLS client (ECDSA only), plus the ECDHE-RSA suites a
#: DTLS server with an RSA certificate needs (FFmpeg's WHIP muxer, GStreamer).
DTLS_CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
                b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:"
                b"ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305:"
                b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA")


class _RsaAcceptingCertificate(RTCCertificate):
    """The same key and certificate (so the same fingerprint); only the cipher
    list grows, which matters when we are the DTLS client."""

    def _create_ssl_context(self, srtp_profiles: list[Any]) -> Any:
        context = super()._create_ssl_context(srtp_profiles)
        context.set_cipher_list(DTLS_CIPHERS)
        return context


def set_dtls_roles(pc: RTCPeerConnection, remote_setup: str) -> None:
    """Choose our DTLS role for the answer from the offer's ``a=setup``.

    ``actpass`` (or absent): we answer ``passive`` and are the DTLS server:
    aiortc's server accepts clients with RSA certificates (GStreamer's
    webrtcbin) and ECDSA ones (browsers). ``passive`` (FFmpeg's WHIP muxer):
    RFC 8842 leaves only ``active``, so we are the client, and our client must
    offer RSA suites too (:func:`accept_rsa_dtls_servers`). ``active``: aiortc
    has already made us the server. Call after setRemoteDescription(offer).
    """
    for transport in _dtls_transports(pc):
        if transport._role != "auto":
            continue
        transport._set_role("client" if remote_setup == "passive" else "server")


def accept_rsa_dtls_servers(pc: RTCPeerConnection) -> None:
    """As DTLS client, aiortc offers only ECDSA suites: a server with an RSA
    certificate finds "no shared cipher". Give every transport a certificate
    object whose SSL context also offers ECDHE-RSA suites. Call before the
    connection starts (after setRemoteDescription)."""
    for transport in _dtls_transports(pc):
        certificate = getattr(transport, DTLS_LOCAL_CERTIFICATE, None)
        if not isinstance(certificate, RTCCertificate):
            raise RuntimeError("aiortc changed: RTCDtlsTransport has no local certificate")
        if isinstance(certificate, _RsaAcceptingCertificate):
            continue
        setattr(transport, DTLS_LOCAL_CERTIFICATE,
                _RsaAcceptingCertificate(key=certificate._key, cert=certificate._cert))


def _dtls_transports(pc: RTCPeerConnection) -> list[RTCDtlsTransport]:
    seen: dict[int, RTCDtlsTransport] = {}
    for transceiver in pc.getTransceivers():
        transport = transceiver.receiver.transport
        seen.setdefault(id(transport), transport)
    return list(seen.values())


SENDER_RETRANSMIT = "_retransmit"
SENDER_REPORT_FIELDS = {
    "ntp_timestamp": "_RTCRtpSender__ntp_timestamp",
    "rtp_timestamp": "_RTCRtpSender__rtp_timestamp",
    "packet_count": "_RTCRtpSender__packet_count",
    "octet_count": "_RTCRtpSender__octet_count",
}
DTLS_TX_SRTP = "_tx_srtp"
ICE_NOMINATED = "_nominated"


def redirect_retransmissions(sender: RTCRtpSender,
                             handler: Callable[[int], Any]) -> None:
    """NACKed packets come from the fast path's history, not the sender's."""
    if not callable(getattr(sender, SENDER_RETRANSMIT, None)):
        raise RuntimeError("aiortc changed: RTCRtpSender has no _retransmit")
    setattr(sender, SENDER_RETRANSMIT, handler)


def set_sender_report_state(sender: RTCRtpSender, **values: int) -> None:
    for name, value in values.items():
        setattr(sender, SENDER_REPORT_FIELDS[name], value)


def bind_rtp_output(sender: RTCRtpSender
                    ) -> tuple[Callable[[bytes], bytes], Callable[[bytes], None]] | None:
    """(protect, send) for the sender's connected transport, both synchronous.

    Only a direct UDP pair can be written synchronously; a TURN relay (whose
    send waits for channel binding) returns None and the caller stays on
    aiortc's own sending path.
    """
    dtls = sender.transport
    srtp = getattr(dtls, DTLS_TX_SRTP, None)
    if srtp is None or dtls.state != "connected":
        return None
    connection = getattr(dtls.transport, GATHERER_CONNECTION)
    pair = getattr(connection, ICE_NOMINATED).get(1)
    if pair is None:
        return None
    protocol = pair.protocol
    if type(protocol) is not aioice_ice.StunProtocol or protocol.transport is None:
        return None
    if pair.local_candidate.type == "relay":
        # The Node's own TURN allocation ([ice] node_servers): aioice's
        # TurnTransport sends through its TURN client, asynchronously.
        return None
    transport, addr = protocol.transport, pair.remote_addr
    # asyncio's own datagram transport (not an asyncio.DatagramTransport subclass).
    if not callable(getattr(transport, "is_closing", None)) or transport.is_closing():
        return None

    def send(data: bytes) -> None:
        # A transport closed under us (consent expired, connection torn down)
        # must read as "gone" to the caller, not as a crash in asyncio.
        if transport.is_closing():
            raise ConnectionError("viewer transport closed")
        transport.sendto(data, addr)

    return srtp.protect, send


SENDER_SSRC = "_ssrc"
SENDER_RTX_SSRC = "_rtx_ssrc"
GATHERER_PROTOCOLS = "_protocols"
RECEIVER_HANDLE_RTCP = "_handle_rtcp_packet"


def sender_ssrcs(sender: RTCRtpSender) -> tuple[int, int]:
    """(media SSRC, RTX SSRC) that aiortc put in our answer for this sender."""
    return getattr(sender, SENDER_SSRC), getattr(sender, SENDER_RTX_SSRC)


def sender_retransmit(sender: RTCRtpSender) -> Callable[[int], Any]:
    """aiortc's own NACK handler (answers from its own history)."""
    handler = getattr(sender, SENDER_RETRANSMIT, None)
    if not callable(handler):
        raise RuntimeError("aiortc changed: RTCRtpSender has no _retransmit")
    return handler


def _unique_connections(pc: RTCPeerConnection) -> list[aioice_ice.Connection]:
    seen: dict[int, aioice_ice.Connection] = {}
    for connection in _ice_connections(pc):
        seen.setdefault(id(connection), connection)
    return list(seen.values())


def watch_datagrams(pc: RTCPeerConnection, heard: Callable[[bytes], None]) -> None:
    """Call ``heard(datagram)`` for every datagram the peer sends us (STUN, DTLS,
    SRTP, SRTCP), on every local candidate, TURN-relayed ones included.

    Call after gathering, before the connection starts. aioice's own consent
    checks stay as they are; this only observes.
    """
    for connection in _unique_connections(pc):
        for protocol in getattr(connection, GATHERER_PROTOCOLS):
            original = protocol.datagram_received

            def datagram_received(data: bytes | str, addr: tuple[Any, ...],
                                  _original: Callable[..., None] = original) -> None:
                if isinstance(data, bytes):
                    heard(data)
                _original(data, addr)

            protocol.datagram_received = datagram_received


def probe_peer(pc: RTCPeerConnection) -> list[asyncio.Task[Any]]:
    """One STUN binding request (no retransmission) on each selected pair, as a
    consent check would send; a live peer's answer reaches ``watch_datagrams``.
    Returns the tasks (they end by themselves within aioice's RTO)."""
    tasks = []
    for connection in _unique_connections(pc):
        password = connection.remote_password
        if password is None:
            continue
        for pair in list(getattr(connection, ICE_NOMINATED).values()):
            request = connection.build_request(pair, nominate=False)
            tasks.append(asyncio.ensure_future(_quiet_request(
                pair.protocol.request(request, pair.remote_addr,
                                      integrity_key=password.encode("utf8"),
                                      retransmissions=0))))
    return tasks


async def _quiet_request(request: Any) -> None:
    try:
        await request
    except Exception:  # no answer is exactly what liveness wants to learn; it counts silence
        pass


def observe_sender_reports(receiver: RTCRtpReceiver,
                           on_report: Callable[[int, int], None]) -> None:
    """``on_report(ntp_timestamp, rtp_timestamp)`` for each RTCP sender report
    the publisher sends on this receiver: how its RTP clock maps to its wall
    clock, which viewers need for lip sync."""
    original = getattr(receiver, RECEIVER_HANDLE_RTCP, None)
    if not callable(original):
        raise RuntimeError("aiortc changed: RTCRtpReceiver has no _handle_rtcp_packet")

    async def handle(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            try:
                on_report(packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)
            except Exception:
                logger.exception("sender report observer failed")
        await original(packet)

    setattr(receiver, RECEIVER_HANDLE_RTCP, handle)


SENDER_HANDLE_RTCP = "_handle_rtcp_packet"
SENDER_RTT = "_RTCRtpSender__rtt"


def observe_viewer_feedback(sender: RTCRtpSender,
                            on_report: Callable[[float, int, float | None], None],
                            on_remb: Callable[[float], None]) -> None:
    """What a viewer tells us about its link: for each receiver report block
    about this sender, ``on_report(fraction lost 0-1, jitter, RTT s or None)``;
    for each REMB naming it, ``on_remb(bits per second)``. aiortc's own handling
    (RTT, NACK, PLI) runs first and is unchanged."""
    original = getattr(sender, SENDER_HANDLE_RTCP, None)
    if not callable(original):
        raise RuntimeError("aiortc changed: RTCRtpSender has no _handle_rtcp_packet")
    ssrc = getattr(sender, SENDER_SSRC)

    async def handle(packet: Any) -> None:
        await original(packet)
        try:
            if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
                for report in packet.reports:
                    if report.ssrc == ssrc:
                        on_report(report.fraction_lost / 256, report.jitter,
                                  getattr(sender, SENDER_RTT, None))
            elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                try:
                    bitrate, ssrcs = unpack_remb_fci(packet.fci)
                except ValueError:
                    return
                if ssrc in ssrcs:
                    on_remb(float(bitrate))
        except Exception:
            logger.exception("viewer feedback observer failed")

    setattr(sender, SENDER_HANDLE_RTCP, handle)


RECEIVER_SEND_RTCP = "_send_rtcp"


def adjust_remb(receiver: RTCRtpReceiver, adjust: Callable[[int], int | None]) -> None:
    """Every REMB this receiver sends its publisher goes through ``adjust``:
    the bitrate it says, or None to send none.

    Publishers read REMB differently. aiortc applies it to the senders whose
    SSRCs it names, so one receiver's REMB can hold one layer to its bitrate.
    libwebrtc (browsers) takes any REMB as the estimate for its whole
    connection: there the low layer's receiver must send none, and the full
    layer's must leave room for both.
    """
    from aiortc.rtp import pack_remb_fci

    original = getattr(receiver, RECEIVER_SEND_RTCP, None)
    if not callable(original):
        raise RuntimeError("aiortc changed: RTCRtpReceiver has no _send_rtcp")

    async def send(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                pass
            else:
                adjusted = adjust(bitrate)
                if adjusted is None:
                    return
                if adjusted != bitrate:
                    packet.fci = pack_remb_fci(adjusted, ssrcs)
        await original(packet)

    setattr(receiver, RECEIVER_SEND_RTCP, send)
