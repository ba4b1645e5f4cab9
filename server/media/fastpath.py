"""Send a Feed's already-packetized frames to one viewer, synchronously.

aiortc's RTCRtpSender packetizes every frame again for every viewer and awaits
a chain of coroutines per packet; most of a viewer's cost is that machinery
(see docs/performance.md). Here a Feed packetizes a frame once, and for each
viewer only the RTP header is written (its SSRC, sequence number, timestamp
offset), the packet is SRTP-protected with the viewer's keys and handed to
the socket. The viewer's RTCRtpSender stays in place for everything else:
RTCP sender reports, NACK and PLI handling, stats and shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from struct import pack
from typing import Any

from aiortc import RTCRtpSender
from aiortc.clock import current_ntp_time
from aiortc.rtp import HeaderExtensions, HeaderExtensionsMap

from . import hooks

logger = logging.getLogger(__name__)

# Packets kept per viewer for NACK retransmission: ~2 s at 1.5 Mbit/s, far
# beyond a LAN round trip; each is a full packet, so this is most of a
# viewer's memory (docs/performance.md).
HISTORY = 256


@dataclass(frozen=True)
class Negotiated:
    """What the viewer's answer fixed: payload type, MID, header extension ids."""

    payload_type: int
    clock_rate: int
    mid: str
    extensions: HeaderExtensionsMap


def negotiated_from(media: Any, mid: str) -> Negotiated:
    """From aiortc's parsed SDP media section of our own answer."""
    codec = next(c for c in media.rtp.codecs if not c.mimeType.lower().endswith("/rtx"))
    extensions = HeaderExtensionsMap()
    extensions.configure(media.rtp)
    return Negotiated(payload_type=codec.payloadType, clock_rate=codec.clockRate, mid=mid,
                      extensions=extensions)


class FastSender:
    def __init__(self, sender: RTCRtpSender, negotiated: Negotiated) -> None:
        self._sender = sender
        self._negotiated = negotiated
        self._ssrc = sender._ssrc
        # Random starts, as RFC 3550 asks; below 2^15 like aiortc, so SRTP's
        # rollover estimate cannot be confused at the start.
        self._seq = random.randint(0, 0x7FFF)
        self._ts_origin = random.getrandbits(32)
        self._history: list[bytes | None] = [None] * HISTORY
        self._send: Any = None
        self._protect: Any = None
        self.packets = 0
        self.octets = 0
        # Until activated (or if it never can be), aiortc's own history answers.
        self._fallback_retransmit = sender._retransmit
        hooks.redirect_retransmissions(sender, self._retransmit)

    def activate(self) -> bool:
        """Bind to the viewer's connected transport; False if it cannot be used."""
        binding = hooks.bind_rtp_output(self._sender)
        if binding is None:
            return False
        self._protect, self._send = binding
        return True

    def send_frame(self, payloads: list[bytes], pts: int) -> None:
        """One encoded frame (payloads from the Feed's packetizer), now."""
        if self._send is None:
            return
        timestamp = (self._ts_origin + pts) & 0xFFFFFFFF
        ntp = current_ntp_time()
        profile, ext = self._negotiated.extensions.set(HeaderExtensions(
            mid=self._negotiated.mid, abs_send_time=(ntp >> 14) & 0x00FFFFFF))
        ext_header = pack("!HH", profile, len(ext) >> 2) + ext if ext else b""
        first = 0x90 if ext else 0x80
        payload_type = self._negotiated.payload_type
        last = len(payloads) - 1
        try:
            for i, payload in enumerate(payloads):
                seq = self._seq
                data = pack("!BBHII", first, payload_type | (0x80 if i == last else 0), seq,
                            timestamp, self._ssrc) + ext_header + payload
                self._history[seq % HISTORY] = data
                self._send(self._protect(data))
                self._seq = (seq + 1) & 0xFFFF
                self.octets += len(payload)
            self.packets += len(payloads)
        except (ConnectionError, OSError, RuntimeError) as exc:
            logger.debug("fast sender stopped: %s", exc)
            self._send = None
            return
        # RTCP sender reports are built by the RTCRtpSender from these.
        hooks.set_sender_report_state(self._sender, ntp_timestamp=ntp, rtp_timestamp=timestamp,
                                      packet_count=self.packets, octet_count=self.octets)

    async def _retransmit(self, sequence_number: int) -> None:
        if self._send is None:
            await self._fallback_retransmit(sequence_number)
            return
        data = self._history[sequence_number % HISTORY]
        if data is None:
            return
        if int.from_bytes(data[2:4], "big") != sequence_number:
            return
        try:
            self._send(self._protect(data))
        except (ConnectionError, OSError, RuntimeError):
            pass


def shared_packetizer(codec: Any) -> Any:
    """One aiortc encoder per Feed, used only to packetize (``pack``)."""
    from aiortc.codecs import get_encoder

    return get_encoder(codec)


async def yield_now() -> None:
    await asyncio.sleep(0)
