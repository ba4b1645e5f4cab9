"""Codec facts the forwarding path needs without decoding: keyframes and names."""

from __future__ import annotations

from collections.abc import Mapping

from aiortc import RTCRtpCodecCapability, RTCRtpCodecParameters, RTCRtpSender

#: What a Feed may carry. Forwarding means the viewer must accept exactly this.
FORWARDABLE = {"video/vp8", "video/h264", "audio/opus"}


def is_keyframe(mime_type: str, data: bytes) -> bool:
    """True if ``data`` (a depayloaded frame) can be decoded on its own."""
    mime = mime_type.lower()
    if mime == "video/vp8":
        # RFC 6386 9.1: bit 0 of the frame tag is 0 for a key frame.
        return len(data) >= 3 and not (data[0] & 0x01)
    if mime == "video/h264":
        return any(nal_type in (5, 7) for nal_type in h264_nal_types(data))
    # Every audio frame stands alone.
    return True


def h264_nal_types(data: bytes) -> list[int]:
    """NAL unit types in an Annex-B buffer (aiortc's depayloader emits Annex-B)."""
    types = []
    start = data.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(data):
        types.append(data[start + 3] & 0x1F)
        start = data.find(b"\x00\x00\x01", start + 3)
    return types


def h264_parameter_sets(data: bytes) -> bytes | None:
    """The SPS and PPS NAL units of an Annex-B access unit (with start codes), if
    it carries both."""
    units: list[bytes] = []
    starts = []
    position = data.find(b"\x00\x00\x01")
    while position != -1:
        starts.append(position)
        position = data.find(b"\x00\x00\x01", position + 3)
    for index, begin in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(data)
        if begin + 3 < len(data) and data[begin + 3] & 0x1F in (7, 8):
            units.append(b"\x00\x00\x01" + data[begin + 3:end].rstrip(b"\x00"))
    kinds = {unit[3] & 0x1F for unit in units}
    return b"".join(units) if kinds >= {7, 8} else None


def capabilities_for(codec: RTCRtpCodecParameters) -> list[RTCRtpCodecCapability]:
    """The sender capability equal to ``codec`` (plus RTX), for a viewer's answer.

    aiortc matches preferences on MIME type and exact fmtp parameters, so for
    H.264 this also pins profile and packetization mode to the publisher's.
    """
    caps = RTCRtpSender.getCapabilities(codec.mimeType.split("/")[0]).codecs
    wanted = codec.mimeType.lower()
    chosen = []
    for cap in caps:
        if cap.mimeType.lower() != wanted:
            continue
        if wanted == "video/h264":
            if _h264_key(cap.parameters) != _h264_key(codec.parameters):
                continue
        chosen.append(cap)
        break
    if not chosen:
        # The publisher's exact profile is not one aiortc offers; fall back to
        # any of the same codec and let the SDP negotiation decide.
        chosen = [cap for cap in caps if cap.mimeType.lower() == wanted][:1]
    chosen += [cap for cap in caps if cap.mimeType.lower().endswith("/rtx")]
    return chosen


def _h264_key(parameters: Mapping[str, object]) -> tuple[str, str]:
    profile = str(parameters.get("profile-level-id", "42001f")).lower()
    # profile_idc + constraint flags decide decodability; level does not.
    return profile[:4], str(parameters.get("packetization-mode", "0"))
