"""Codec facts the recorder reads from encoded frames, without decoding.

Pure functions on bytes: picture size from a VP8 key frame header or an H.264
sequence parameter set, H.264 NAL units in Annex-B, the duration of an Opus
packet from its TOC byte, and a one-page Ogg Opus stream that FFmpeg parses
into the stream template a Matroska/WebM muxer needs (its OpusHead).
"""

from __future__ import annotations

import struct

# -- VP8 ---------------------------------------------------------------------

_VP8_START_CODE = b"\x9d\x01\x2a"


def vp8_is_keyframe(data: bytes) -> bool:
    """RFC 6386 9.1: bit 0 of the frame tag is 0 for a key frame."""
    return len(data) >= 10 and not (data[0] & 0x01) and data[3:6] == _VP8_START_CODE


def vp8_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a VP8 key frame; None for inter frames or garbage."""
    if not vp8_is_keyframe(data):
        return None
    width, height = struct.unpack_from("<HH", data, 6)
    # The top two bits of each are the upscaling mode, not part of the size.
    return width & 0x3FFF, height & 0x3FFF


# -- H.264 -------------------------------------------------------------------

NAL_IDR = 5
NAL_SPS = 7
NAL_PPS = 8


def h264_nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex-B buffer, start codes removed."""
    units: list[bytes] = []
    start = data.find(b"\x00\x00\x01")
    while start != -1:
        begin = start + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        end = len(data) if nxt == -1 else nxt
        unit = data[begin:end]
        if nxt != -1:
            # A four-byte start code (00 00 00 01) leaves a zero on this unit.
            unit = unit.rstrip(b"\x00")
        if unit:
            units.append(unit)
        start = nxt
    return units


def h264_nal_type(unit: bytes) -> int:
    return unit[0] & 0x1F


def _unescape(rbsp: bytes) -> bytes:
    """Remove emulation prevention bytes (00 00 03 -> 00 00)."""
    if b"\x00\x00\x03" not in rbsp:
        return rbsp
    out = bytearray()
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


class _Bits:
    """MSB-first bit reader with Exp-Golomb codes (H.264 9.1)."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._left = len(data) * 8

    def u(self, n: int) -> int:
        if n > self._left:
            raise ValueError("SPS truncated")
        self._left -= n
        return (self._value >> self._left) & ((1 << n) - 1)

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last, nxt = 8, 8
    for _ in range(size):
        if nxt != 0:
            nxt = (last + bits.se() + 256) % 256
        last = nxt if nxt != 0 else last


def h264_sps_frame_size(sps: bytes) -> tuple[int, int]:
    """(width, height) after cropping from an SPS NAL unit (header byte included).

    Raises ValueError on a truncated or malformed SPS.
    """
    if not sps or h264_nal_type(sps) != NAL_SPS:
        raise ValueError("not an SPS NAL unit")
    bits = _Bits(_unescape(sps[1:]))
    profile_idc = bits.u(8)
    bits.u(16)  # constraint flags, level_idc
    bits.ue()  # seq_parameter_set_id
    chroma_format_idc = 1
    separate_colour_plane = 0
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = bits.ue()
        if chroma_format_idc == 3:
            separate_colour_plane = bits.u(1)
        bits.ue()  # bit_depth_luma_minus8
        bits.ue()  # bit_depth_chroma_minus8
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        if bits.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format_idc != 3 else 12):
                if bits.u(1):
                    _skip_scaling_list(bits, 16 if i < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        bits.u(1)  # delta_pic_order_always_zero_flag
        bits.se()  # offset_for_non_ref_pic
        bits.se()  # offset_for_top_to_bottom_field
        for _ in range(bits.ue()):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_map_units = bits.ue() + 1
    frame_mbs_only = bits.u(1)
    if not frame_mbs_only:
        bits.u(1)  # mb_adaptive_frame_field_flag
    bits.u(1)  # direct_8x8_inference_flag
    width = width_mbs * 16
    height = (2 - frame_mbs_only) * height_map_units * 16
    if bits.u(1):  # frame_cropping_flag
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        chroma_array_type = 0 if separate_colour_plane else chroma_format_idc
        if chroma_array_type == 0:
            crop_x, crop_y = 1, 2 - frame_mbs_only
        else:
            sub_width = 2 if chroma_array_type in (1, 2) else 1
            sub_height = 2 if chroma_array_type == 1 else 1
            crop_x, crop_y = sub_width, sub_height * (2 - frame_mbs_only)
        width -= crop_x * (left + right)
        height -= crop_y * (top + bottom)
    if width <= 0 or height <= 0:
        raise ValueError("SPS crops the picture away")
    return width, height


# -- Opus --------------------------------------------------------------------

OPUS_CLOCK_RATE = 48_000
#: Frame sizes in 48 kHz samples by TOC config (RFC 6716 3.1).
_OPUS_FRAME_SAMPLES = (
    [480, 960, 1920, 2880] * 3  # SILK-only: 10, 20, 40, 60 ms
    + [480, 960] * 2  # Hybrid: 10, 20 ms
    + [120, 240, 480, 960] * 4  # CELT-only: 2.5, 5, 10, 20 ms
)


def opus_packet_samples(data: bytes) -> int:
    """Duration of an Opus packet in 48 kHz samples (0 if it cannot be told)."""
    if not data:
        return 0
    toc = data[0]
    per_frame = _OPUS_FRAME_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    elif len(data) >= 2:
        count = data[1] & 0x3F
    else:
        return 0
    return per_frame * count


_OGG_CRC_TABLE: list[int] = []
for _i in range(256):
    _r = _i << 24
    for _ in range(8):
        _r = ((_r << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if _r & 0x80000000 else (_r << 1) & 0xFFFFFFFF
    _OGG_CRC_TABLE.append(_r)


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[((crc >> 24) ^ byte) & 0xFF]
    return crc


def _ogg_page(payload: bytes, sequence: int, granule: int, flags: int) -> bytes:
    lacing = [255] * (len(payload) // 255) + [len(payload) % 255]
    page = (b"OggS" + bytes([0, flags]) + struct.pack("<qIII", granule, 1, sequence, 0)
            + bytes([len(lacing)]) + bytes(lacing) + payload)
    return page[:22] + struct.pack("<I", _ogg_crc(page)) + page[26:]


def opus_head(channels: int = 2, pre_skip: int = 0) -> bytes:
    """RFC 7845 5.1 identification header (mapping family 0)."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, OPUS_CLOCK_RATE, 0, 0)


def ogg_opus_stream(first_packet: bytes, channels: int = 2) -> bytes:
    """A complete, tiny Ogg Opus stream: headers and one audio packet.

    FFmpeg parses it into an audio stream whose parameters (OpusHead included)
    serve as the template of a recording's Opus track. WebRTC signals Opus as
    two channels; pre-skip is 0 because the encoder's delay is not known here.
    """
    tags = b"OpusTags" + struct.pack("<I", 7) + b"scrubin" + struct.pack("<I", 0)
    samples = opus_packet_samples(first_packet) or 960
    return (_ogg_page(opus_head(channels), 0, 0, 0x02) + _ogg_page(tags, 1, 0, 0)
            + _ogg_page(first_packet, 2, samples, 0x04))
