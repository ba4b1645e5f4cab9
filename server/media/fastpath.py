"""Send a Feed's already-packetized frames to one viewer, synchronously.

aiortc's RTCRtpSender packetizes every frame again for every viewer and awaits
a chain of coroutines per packet; most of a viewer's cost is that machinery
(see docs/performance.md). Here a Feed packetizes a frame once, and for each
viewer only the RTP header is written (its SSRC, sequence number, timestamp
offset), the packet is SRTP-protected with the viewer's keys and handed to
the socket. The viewer's RTCRtpSender stays in place for everything else:
RTCP sender reports (from the counters and clock mapping kept here), NACK
(answered from this history, as RTX when the viewer negotiated it), PLI,
stats and shutdown.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from struct import pack
from time import monotonic
from typing import Any

from aiortc import RTCRtpSender
from aiortc.clock import current_ntp_time
from aiortc.rtp import HeaderExtensions, HeaderExtensionsMap

from . import hooks
from .plane import DownstreamGone

logger = logging.getLogger(__name__)

# Packets kept per viewer for NACK retransmission: ~2 s at 1.5 Mbit/s, far
# beyond a LAN round trip; each is a full packet, so this is most of a
# viewer's memory (docs/performance.md).
HISTORY = 256

# Retransmission limits. On a congested link every lost packet is NACKed again
# and again; answering them all fills the link further and nothing gets through
# (congestion collapse). So a packet is resent at most once per RESEND_GAP_S,
# never once it is older than MAX_AGE_S (the viewer has moved on), and
# retransmissions may use at most RESEND_SHARE of what the stream itself sends.
RESEND_GAP_S = 0.1
MAX_AGE_S = 1.0
RESEND_SHARE = 0.5
RESEND_BURST_BYTES = 48 * 1200

#: Maps a frame's pts on the Feed's timeline to the publisher's NTP time, or
#: None while the publisher has sent no sender report.
NtpClock = Callable[[int], int | None]


@dataclass(frozen=True)
class Negotiated:
    """What the viewer's answer fixed: payload types, MID, header extension ids."""

    payload_type: int
    clock_rate: int
    mid: str
    extensions: HeaderExtensionsMap
    #: The RTX payload type paired with ``payload_type`` (RFC 4588), if any.
    rtx_payload_type: int | None = None


def negotiated_from(media: Any, mid: str) -> Negotiated:
    """From aiortc's parsed SDP media section of our own answer."""
    codecs = list(media.rtp.codecs)
    codec = next(c for c in codecs if not c.mimeType.lower().endswith("/rtx"))
    rtx = next((c.payloadType for c in codecs if c.mimeType.lower().endswith("/rtx")
                and str(c.parameters.get("apt")) == str(codec.payloadType)), None)
    extensions = HeaderExtensionsMap()
    extensions.configure(media.rtp)
    return Negotiated(payload_type=codec.payloadType, clock_rate=codec.clockRate, mid=mid,
                      extensions=extensions, rtx_payload_type=rtx)


def _header_length(data: bytes) -> int:
    length = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10:
        length += 4 + 4 * int.from_bytes(data[length + 2:length + 4], "big")
    return length


class FastSender:
    def __init__(self, sender: RTCRtpSender, negotiated: Negotiated,
                 ntp_clock: NtpClock | None = None) -> None:
        self._sender = sender
        self._negotiated = negotiated
        self._ntp_clock = ntp_clock
        self._ssrc, self._rtx_ssrc = hooks.sender_ssrcs(sender)
        # Random starts, as RFC 3550 asks; below 2^15 like aiortc, so SRTP's
        # rollover estimate cannot be confused at the start.
        self._seq = random.randint(0, 0x7FFF)
        self._rtx_seq = random.randint(0, 0x7FFF)
        self._ts_origin = random.getrandbits(32)
        self._history: list[bytes | None] = [None] * HISTORY
        self._sent_at = [0.0] * HISTORY
        self._resent_at = [0.0] * HISTORY
        self._resend_tokens = float(RESEND_BURST_BYTES)
        #: Packets sent before this moment (a layer switch) are not resent: the
        #: keyframe that started the new layer supersedes them.
        self._epoch = 0.0
        self._send: Any = None
        self._protect: Any = None
        self.packets = 0
        self.octets = 0
        self.retransmitted = 0
        self.resend_refused = 0
        # Until activated (or if it never can be), aiortc's own history answers.
        self._fallback_retransmit = hooks.sender_retransmit(sender)
        hooks.redirect_retransmissions(sender, self._retransmit)

    def activate(self) -> bool:
        """Bind to the viewer's connected transport; False if it cannot be used."""
        binding = hooks.bind_rtp_output(self._sender)
        if binding is None:
            return False
        self._protect, self._send = binding
        return True

    @property
    def active(self) -> bool:
        return self._send is not None

    def new_epoch(self) -> None:
        """The stream continues from another layer's keyframe: what was sent
        before is no longer worth resending (and must not take the budget)."""
        self._epoch = monotonic()

    def send_frame(self, payloads: Any, pts: int, picture_id_offset: int = 0) -> None:
        """One encoded frame (payloads from the Feed's packetizer), now.

        ``picture_id_offset`` keeps VP8 picture ids continuous for a viewer that
        moved between layers (each layer's Feed numbers its own frames).
        Raises :class:`DownstreamGone` when the viewer's transport is gone.
        """
        send = self._send
        if send is None:
            raise DownstreamGone("fast sender is not bound to a transport")
        if picture_id_offset:
            payloads = [vp8_with_picture_id_offset(p, picture_id_offset) for p in payloads]
        timestamp = (self._ts_origin + pts) & 0xFFFFFFFF
        now_ntp = current_ntp_time()
        profile, ext = self._negotiated.extensions.set(HeaderExtensions(
            mid=self._negotiated.mid, abs_send_time=(now_ntp >> 14) & 0x00FFFFFF))
        ext_header = pack("!HH", profile, len(ext) >> 2) + ext if ext else b""
        first = 0x90 if ext else 0x80
        payload_type = self._negotiated.payload_type
        last = len(payloads) - 1
        protect, history, sent_at = self._protect, self._history, self._sent_at
        now = monotonic()
        size = 0
        try:
            for i, payload in enumerate(payloads):
                seq = self._seq
                data = pack("!BBHII", first, payload_type | (0x80 if i == last else 0), seq,
                            timestamp, self._ssrc) + ext_header + payload
                history[seq % HISTORY] = data
                sent_at[seq % HISTORY] = now
                send(protect(data))
                self._seq = (seq + 1) & 0xFFFF
                self.octets += len(payload)
                size += len(data)
        except (ConnectionError, OSError, RuntimeError, AttributeError) as exc:
            self._send = None
            raise DownstreamGone(f"viewer transport failed: {exc}") from exc
        self.packets += len(payloads)
        self._resend_tokens = min(self._resend_tokens + size * RESEND_SHARE, RESEND_BURST_BYTES)
        # RTCP sender reports are built by the RTCRtpSender from these. With
        # the publisher's own mapping (its sender reports), every Feed of one
        # publisher shares its clock, so a viewer can keep them in lip sync.
        ntp = self._ntp_clock(pts) if self._ntp_clock is not None else None
        hooks.set_sender_report_state(self._sender, ntp_timestamp=now_ntp if ntp is None else ntp,
                                      rtp_timestamp=timestamp, packet_count=self.packets,
                                      octet_count=self.octets)

    async def _retransmit(self, sequence_number: int) -> None:
        if self._send is None:
            await self._fallback_retransmit(sequence_number)
            return
        index = sequence_number % HISTORY
        data = self._history[index]
        if data is None or int.from_bytes(data[2:4], "big") != sequence_number:
            return
        now = monotonic()
        sent_at = self._sent_at[index]
        if (now - sent_at > MAX_AGE_S or sent_at < self._epoch
                or now - self._resent_at[index] < RESEND_GAP_S
                or self._resend_tokens < len(data)):
            self.resend_refused += 1
            return
        self._resent_at[index] = now
        self._resend_tokens -= len(data)
        rtx_payload_type = self._negotiated.rtx_payload_type
        if rtx_payload_type is not None:
            # RFC 4588: own SSRC and sequence, the original sequence number
            # first in the payload; same timestamp, marker and extensions.
            header = _header_length(data)
            data = (pack("!BBHII", data[0], (data[1] & 0x80) | rtx_payload_type, self._rtx_seq,
                         int.from_bytes(data[4:8], "big"), self._rtx_ssrc)
                    + data[12:header] + data[2:4] + data[header:])
            self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
        try:
            self._send(self._protect(data))
            self.retransmitted += 1
        except (ConnectionError, OSError, RuntimeError, AttributeError):
            self._send = None


def vp8_picture_id(payload: bytes) -> int | None:
    """The 15-bit picture id of a VP8 payload descriptor (RFC 7741), if it has one."""
    if len(payload) >= 4 and payload[0] & 0x80 and payload[1] & 0x80 and payload[2] & 0x80:
        return ((payload[2] & 0x7F) << 8) | payload[3]
    return None


def vp8_with_picture_id_offset(payload: bytes, offset: int) -> bytes:
    picture_id = vp8_picture_id(payload)
    if picture_id is None:
        return payload
    rewritten = (picture_id + offset) & 0x7FFF
    return payload[:2] + bytes((0x80 | (rewritten >> 8), rewritten & 0xFF)) + payload[4:]


def shared_packetizer(codec: Any) -> Any:
    """One aiortc encoder per Feed, used only to packetize (``pack``)."""
    from aiortc.codecs import get_encoder

    return get_encoder(codec)
