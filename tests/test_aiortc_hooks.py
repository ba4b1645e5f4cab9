"""Fails loudly when an aiortc/aioice upgrade moves a private name we rely on.

server/media/hooks.py is the only module that touches these; if one of these
tests fails, read it before changing the pin in pyproject.toml.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import aioice.ice
import pytest
from aiortc import RTCDtlsTransport, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.jitterbuffer import JitterBuffer

from server.media import hooks


def test_pinned_versions() -> None:
    assert version("aiortc") == "1.16.0"
    assert version("aioice") == "0.13.0"


async def test_receiver_has_the_jitter_buffer_and_pli_we_tap() -> None:
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video", direction="recvonly")
        receiver = transceiver.receiver
        assert isinstance(getattr(receiver, hooks.RECEIVER_JITTER_BUFFER), JitterBuffer)
        assert inspect.iscoroutinefunction(getattr(receiver, hooks.RECEIVER_SEND_PLI))
        # The receiver must feed packets through the attribute we replace.
        source = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
        assert "self.__jitter_buffer.add(packet)" in source
        assert "packet._data = depayload(codec, packet.payload)" in source
        hooks.tap_receiver(receiver, "video", lambda data, ts: None)
        assert isinstance(getattr(receiver, hooks.RECEIVER_JITTER_BUFFER),
                          hooks.MarkerJitterBuffer)
    finally:
        await pc.close()


def test_jitter_buffer_internals_used_by_the_marker_buffer() -> None:
    buffer = JitterBuffer(capacity=16, is_video=True)
    for name in ("_origin", "_packets", "_capacity", "remove", "capacity"):
        assert hasattr(buffer, name), name
    assert "return pli_flag, self._remove_frame(packet.sequence_number)" in inspect.getsource(
        JitterBuffer.add)


def test_sender_routes_pli_and_fir_to_send_keyframe() -> None:
    source = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    assert "self._send_keyframe()" in source
    assert callable(RTCRtpSender._send_keyframe)
    # Pre-encoded packets are packed, never encoded.
    assert "self.__encoder.pack(data)" in inspect.getsource(RTCRtpSender._next_encoded_frame)


def test_ice_gathering_internals_used_to_advertise_addresses() -> None:
    connection = aioice.ice.Connection(ice_controlling=False)
    for name in ("_local_candidates_start", "_local_candidates_end", "_local_candidates",
                 "_components", "get_component_candidates"):
        assert hasattr(connection, name), name
    assert "get_host_addresses(" in inspect.getsource(aioice.ice.Connection.gather_candidates)


async def test_dtls_role_internals() -> None:
    assert callable(RTCDtlsTransport._set_role)
    pc = RTCPeerConnection()
    try:
        transport = pc.addTransceiver("video").receiver.transport
        assert transport._role == "auto"
    finally:
        await pc.close()


async def test_advertised_addresses_are_the_only_host_candidates() -> None:
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("video")
        hooks.advertise_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createOffer())
        lines = [x for x in pc.localDescription.sdp.splitlines() if x.startswith("a=candidate")]
        assert lines and all(" 127.0.0.1 " in line for line in lines), lines
    finally:
        await pc.close()


def test_host_candidates_are_bound_where_the_port_range_hook_reaches() -> None:
    source = inspect.getsource(aioice.ice.Connection.get_component_candidates)
    assert "loop = asyncio.get_running_loop()" in source
    assert "loop.create_datagram_endpoint(" in source
    assert "local_addr=(address, 0)" in source
    # Every way aioice gathers host candidates goes through it.
    assert "self.get_component_candidates(" in inspect.getsource(
        aioice.ice.Connection.gather_candidates)


async def test_host_candidates_take_ports_of_the_configured_range() -> None:
    import socket

    from .conftest import free_ports

    first = free_ports(3, socket.SOCK_DGRAM)
    ports = hooks.UdpPortRange(first, first + 2)
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", first + 1))  # someone else's: skipped
    pcs = [RTCPeerConnection() for _ in range(3)]
    try:
        seen = []
        for pc in pcs[:2]:
            pc.addTransceiver("video")
            hooks.advertise_host_addresses(pc, ["127.0.0.1"])
            hooks.bind_udp_ports(pc, ports)
            await pc.setLocalDescription(await pc.createOffer())
            lines = [x for x in pc.localDescription.sdp.splitlines()
                     if x.startswith("a=candidate")]
            assert len(lines) == 1, lines
            seen.append(int(lines[0].split()[5]))
        assert seen == [first, first + 2]
        # The range is full: no host candidate (said in the log), nothing elsewhere.
        pcs[2].addTransceiver("video")
        hooks.advertise_host_addresses(pcs[2], ["127.0.0.1"])
        hooks.bind_udp_ports(pcs[2], ports)
        await pcs[2].setLocalDescription(await pcs[2].createOffer())
        assert "a=candidate" not in pcs[2].localDescription.sdp
        # Freed by a closed connection, a port is used again.
        await pcs[0].close()
        again = RTCPeerConnection()
        pcs.append(again)
        again.addTransceiver("video")
        hooks.advertise_host_addresses(again, ["127.0.0.1"])
        hooks.bind_udp_ports(again, ports)
        await again.setLocalDescription(await again.createOffer())
        assert f" {first} typ host" in again.localDescription.sdp
    finally:
        taken.close()
        for pc in pcs:
            await pc.close()


@pytest.mark.parametrize("host,networks,allowed", [
    ("abc.local", [], False),
    ("127.0.0.1", [], True),
    ("127.0.0.1", ["127.0.0.0/8"], True),
    ("10.0.0.5", ["127.0.0.0/8"], False),
    ("not-an-ip", ["127.0.0.0/8"], False),
])
def test_remote_candidate_filter(host: str, networks: list[str], allowed: bool) -> None:
    import ipaddress

    from aioice import Candidate
    candidate = Candidate(foundation="1", component=1, transport="udp", priority=1, host=host,
                          port=9, type="host")
    nets = [ipaddress.ip_network(n) for n in networks]
    assert hooks.remote_candidate_allowed(candidate, nets) is allowed


async def test_fast_path_internals() -> None:
    from aiortc import RTCDtlsTransport as Dtls

    pc = RTCPeerConnection()
    try:
        sender = pc.addTransceiver("video", direction="sendonly").sender
        for attribute in hooks.SENDER_REPORT_FIELDS.values():
            assert isinstance(getattr(sender, attribute), int), attribute
        assert inspect.iscoroutinefunction(getattr(sender, hooks.SENDER_RETRANSMIT))
    finally:
        await pc.close()
    # NACKs reach _retransmit; sender reports read the counters we keep.
    handle = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    assert "await self._retransmit(seq)" in handle
    report = inspect.getsource(RTCRtpSender._run_rtcp)
    for name in ("ntp_timestamp", "rtp_timestamp", "packet_count", "octet_count"):
        assert f"self.__{name}" in report, name
    assert "self._tx_srtp = Session(tx_policy)" in inspect.getsource(Dtls._setup_srtp)
    connection = aioice.ice.Connection(ice_controlling=False)
    assert isinstance(getattr(connection, hooks.ICE_NOMINATED), dict)
    assert "self.transport.sendto(data, addr)" in inspect.getsource(
        aioice.ice.StunProtocol.send_data)


async def test_seam_and_liveness_internals() -> None:
    """What fastpath, liveness and lip sync read through hooks.py."""
    from aiortc.rtp import RtcpSrPacket

    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video", direction="sendrecv")
        ssrc, rtx_ssrc = hooks.sender_ssrcs(transceiver.sender)
        assert isinstance(ssrc, int) and isinstance(rtx_ssrc, int) and ssrc != rtx_ssrc
        assert callable(hooks.sender_retransmit(transceiver.sender))
        # Sender reports: the receiver routes every RTCP packet through this method.
        receiver = transceiver.receiver
        assert inspect.iscoroutinefunction(getattr(receiver, hooks.RECEIVER_HANDLE_RTCP))
        seen: list[tuple[int, int]] = []
        hooks.observe_sender_reports(receiver, lambda ntp, rtp: seen.append((ntp, rtp)))
        from aiortc.rtp import RtcpSenderInfo
        await getattr(receiver, hooks.RECEIVER_HANDLE_RTCP)(RtcpSrPacket(
            ssrc=1, sender_info=RtcpSenderInfo(ntp_timestamp=5, rtp_timestamp=7,
                                               packet_count=0, octet_count=0)))
        assert seen == [(5, 7)]
        # Datagram watching: every local candidate's protocol after gathering.
        hooks.advertise_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createOffer())
        heard: list[bytes] = []
        hooks.watch_datagrams(pc, heard.append)
        connection = getattr(transceiver.receiver.transport.transport.iceGatherer,
                             hooks.GATHERER_CONNECTION)
        protocols = getattr(connection, hooks.GATHERER_PROTOCOLS)
        assert protocols and all(isinstance(p, aioice.ice.StunProtocol) for p in protocols)
        protocols[0].datagram_received(b"\x80\xc8rtcp", ("127.0.0.1", 9))
        assert heard == [b"\x80\xc8rtcp"]
    finally:
        await pc.close()
    # dtls_transport._recv_next demultiplexes what watch_datagrams classifies.
    source = inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    assert "self.receiver.data_received(" in source and "transaction.response_received" in source
    # The liveness probe sends what a consent check sends.
    consent = inspect.getsource(aioice.ice.Connection.query_consent)
    assert "self.build_request(pair, nominate=False)" in consent
    assert "pair.protocol.request(" in consent and "retransmissions=0" in consent
    assert "self.remote_password" in consent
    # bind_rtp_output refuses a transport that is closing.
    assert "def is_closing" in inspect.getsource(__import__("asyncio").BaseTransport)


async def test_dtls_role_and_certificate_internals() -> None:
    """set_dtls_roles and accept_rsa_dtls_servers: the role setter, the certificate slot
    and the ECDSA-only cipher list they extend."""
    from aiortc import RTCCertificate

    pc = RTCPeerConnection()
    try:
        transport = pc.addTransceiver("video").receiver.transport
        certificate = getattr(transport, hooks.DTLS_LOCAL_CERTIFICATE)
        assert isinstance(certificate, RTCCertificate)
        fingerprints = transport.getLocalParameters().fingerprints
        hooks.accept_rsa_dtls_servers(pc)
        # Same key and certificate: the fingerprint in our answer is unchanged.
        assert transport.getLocalParameters().fingerprints == fingerprints
        hooks.set_dtls_roles(pc, "passive")
        assert transport._role == "client"
    finally:
        await pc.close()
    source = inspect.getsource(RTCCertificate._create_ssl_context)
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in source and "ECDHE-RSA" not in source
    assert "self.__local_certificate._create_ssl_context(" in inspect.getsource(
        RTCDtlsTransport.start)


def _dtls_handshake(client: object, server: object) -> str:
    """Run a DTLS handshake between two pyOpenSSL connections in memory; returns the cipher."""
    from OpenSSL import SSL

    client.set_connect_state()  # type: ignore[attr-defined]
    server.set_accept_state()  # type: ignore[attr-defined]
    for _ in range(20):
        done = 0
        for me, peer in ((client, server), (server, client)):
            try:
                me.do_handshake()  # type: ignore[attr-defined]
                done += 1
            except SSL.WantReadError:
                pass
            while True:
                try:
                    data = me.bio_read(65536)  # type: ignore[attr-defined]
                except SSL.WantReadError:
                    break
                peer.bio_write(data)  # type: ignore[attr-defined]
        if done == 2:
            return str(client.get_cipher_name())  # type: ignore[attr-defined]
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("hooked", [False, True])
def test_aiortc_as_dtls_client_needs_the_hook_for_rsa_servers(hooked: bool) -> None:
    """FFmpeg's WHIP muxer with an RSA certificate is the DTLS server; aiortc's own
    client context offers only ECDSA suites."""
    import datetime

    from aiortc import RTCCertificate
    from aiortc.rtcdtlstransport import SRTP_AEAD_AES_128_GCM
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    from OpenSSL import SSL

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-peer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    server_ctx = SSL.Context(SSL.DTLS_METHOD)
    server_ctx.use_certificate(cert)
    server_ctx.use_privatekey(key)
    server_ctx.set_tlsext_use_srtp(SRTP_AEAD_AES_128_GCM.openssl_profile)
    ours = RTCCertificate.generateCertificate()
    if hooked:
        ours = hooks._RsaAcceptingCertificate(key=ours._key, cert=ours._cert)
    client = SSL.Connection(ours._create_ssl_context(srtp_profiles=[SRTP_AEAD_AES_128_GCM]))
    server = SSL.Connection(server_ctx)
    if hooked:
        assert _dtls_handshake(client, server).startswith("ECDHE-RSA-")
    else:
        with pytest.raises(SSL.Error):
            _dtls_handshake(client, server)
