"""The forwarding path's pieces on plain data: jitter buffers, keyframes, the fast path's
RTP headers (the Feed and its downstreams: tests/test_media_plane.py)."""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
import pytest
from aiortc import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from server.media.codecs import h264_nal_types, is_keyframe
from server.media.hooks import AudioPassThrough, MarkerJitterBuffer

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)


def rtp(seq: int, ts: int, data: bytes, marker: bool = False) -> RtpPacket:
    packet = RtpPacket(payload_type=97, sequence_number=seq % 65536, timestamp=ts)
    packet.marker = int(marker)
    packet._data = data  # type: ignore[attr-defined]  # set by aiortc's depayloader
    return packet


def test_marker_bit_completes_a_frame_without_waiting_for_the_next() -> None:
    frames: list[tuple[bytes, int]] = []
    buffer = MarkerJitterBuffer(lambda d, t: frames.append((d, t)))
    buffer.add(rtp(10, 3000, b"a"))
    buffer.add(rtp(11, 3000, b"b"))
    assert frames == []
    buffer.add(rtp(12, 3000, b"c", marker=True))
    assert frames == [(b"abc", 3000)]


def test_reordered_packets_wait_for_the_gap_then_release_every_complete_frame() -> None:
    frames: list[tuple[bytes, int]] = []
    buffer = MarkerJitterBuffer(lambda d, t: frames.append((d, t)))
    buffer.add(rtp(100, 0, b"1", marker=True))
    buffer.add(rtp(102, 3000, b"y", marker=True))  # 101 missing
    buffer.add(rtp(103, 6000, b"z", marker=True))
    assert frames == [(b"1", 0)]
    buffer.add(rtp(101, 3000, b"x"))  # the retransmission arrives
    assert frames == [(b"1", 0), (b"xy", 3000), (b"z", 6000)]


def test_frames_without_marker_still_end_at_the_next_timestamp() -> None:
    frames: list[tuple[bytes, int]] = []
    buffer = MarkerJitterBuffer(lambda d, t: frames.append((d, t)))
    buffer.add(rtp(1, 0, b"a"))
    buffer.add(rtp(2, 3000, b"b"))
    assert frames == [(b"a", 0)]


def test_sequence_wraparound() -> None:
    frames: list[tuple[bytes, int]] = []
    buffer = MarkerJitterBuffer(lambda d, t: frames.append((d, t)))
    buffer.add(rtp(65535, 0, b"a"))
    buffer.add(rtp(65536, 0, b"b", marker=True))
    buffer.add(rtp(65537, 3000, b"c", marker=True))
    assert frames == [(b"ab", 0), (b"c", 3000)]


def test_audio_passes_through_immediately_and_drops_late_duplicates() -> None:
    frames: list[tuple[bytes, int]] = []
    buffer = AudioPassThrough(lambda d, t: frames.append((d, t)))
    buffer.add(rtp(5, 960, b"a"))
    buffer.add(rtp(7, 2880, b"c"))
    buffer.add(rtp(6, 1920, b"b"))  # late: its slot has been played out
    buffer.add(rtp(7, 2880, b"c"))  # duplicate
    assert frames == [(b"a", 960), (b"c", 2880)]


def _encode(codec: str, n: int) -> list[bytes]:
    context = av.CodecContext.create(codec, "w")
    context.width, context.height = 160, 120
    context.pix_fmt = "yuv420p"
    context.time_base = fractions.Fraction(1, 30)
    if codec == "libx264":
        # A fixed GOP: scene-cut detection would add keyframes of its own.
        context.options = {"g": "10", "bf": "0", "x264-params": "scenecut=0:keyint_min=10"}
    packets: list[bytes] = []
    base = np.random.default_rng(1).integers(0, 255, (120, 200, 3), np.uint8)
    for i in range(n):
        picture = np.ascontiguousarray(base[:, i * 2:i * 2 + 160])  # a slow pan
        frame = av.VideoFrame.from_ndarray(picture, format="bgr24").reformat(format="yuv420p")
        frame.pts = i
        packets += [bytes(p) for p in context.encode(frame)]
    packets += [bytes(p) for p in context.encode(None)]
    return packets


def test_vp8_keyframes_detected_in_real_encoder_output() -> None:
    packets = _encode("libvpx", 3)
    assert [is_keyframe("video/VP8", p) for p in packets] == [True, False, False]


def test_h264_keyframes_detected_in_real_encoder_output() -> None:
    packets = _encode("libx264", 12)
    flags = [is_keyframe("video/H264", p) for p in packets]
    assert flags[0] and flags[10] and not any(flags[1:10])
    assert 5 in h264_nal_types(packets[0]) and 1 in h264_nal_types(packets[1])


@pytest.mark.parametrize("data", [b"", b"\x01"])
def test_garbage_is_not_a_keyframe(data: bytes) -> None:
    assert not is_keyframe("video/VP8", data)


def test_fast_path_packets_are_byte_identical_to_aiortcs() -> None:
    """The hand-written RTP header must be what aiortc's serializer writes."""
    from aiortc import sdp as aiortc_sdp
    from aiortc.rtp import HeaderExtensions, RtpPacket

    from server.media.fastpath import FastSender, negotiated_from

    answer = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 97\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n"
        "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
        "a=extmap:3 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\r\n"
        "a=rtpmap:97 VP8/90000\r\na=sendonly\r\na=rtcp-mux\r\n"
    )
    media = aiortc_sdp.SessionDescription.parse(answer).media[0]
    negotiated = negotiated_from(media, "0")

    class FakeSender:
        _ssrc = 0x11223344
        _rtx_ssrc = 0x55667788

        async def _retransmit(self, sequence_number: int) -> None:
            return None

    sent: list[bytes] = []
    fast = FastSender(FakeSender(), negotiated)  # type: ignore[arg-type]
    fast._protect, fast._send = (lambda data: data), sent.append
    fast.send_frame([b"first", b"second"], pts=3000)
    assert len(sent) == 2
    for index, data in enumerate(sent):
        parsed = RtpPacket.parse(data, negotiated.extensions)
        assert parsed.ssrc == 0x11223344 and parsed.payload_type == 97
        assert parsed.marker == (index == 1)
        assert parsed.extensions.mid == "0"
        expected = RtpPacket(payload_type=97, marker=parsed.marker,
                             sequence_number=parsed.sequence_number,
                             timestamp=parsed.timestamp, ssrc=parsed.ssrc,
                             payload=parsed.payload)
        expected.extensions = HeaderExtensions(mid="0",
                                               abs_send_time=parsed.extensions.abs_send_time)
        assert expected.serialize(negotiated.extensions) == data
    first, second = (RtpPacket.parse(d, negotiated.extensions) for d in sent)
    assert second.sequence_number == (first.sequence_number + 1) & 0xFFFF
    assert first.timestamp == second.timestamp


def test_a_packet_that_never_comes_back_holds_frames_for_a_bounded_time() -> None:
    now = [0.0]
    frames: list[tuple[bytes, int]] = []
    buffer = MarkerJitterBuffer(lambda d, t: frames.append((d, t)), max_stall_s=1.0,
                                clock=lambda: now[0])
    buffer.add(rtp(1, 0, b"k", marker=True))
    buffer.add(rtp(2, 3000, b"a"))          # 3 (the end of this frame) is lost for good
    pli = False
    for i in range(4, 40):                   # later frames, one packet each, 33 ms apart
        now[0] += 0.033
        pli_now, _ = buffer.add(rtp(i, 3000 * (i - 2), bytes([i]), marker=True))
        pli = pli or pli_now
    # Held while the retransmission might still come, then skipped past with a
    # keyframe request, and everything complete since was handed on.
    assert pli
    assert frames[0] == (b"k", 0)
    assert (b"a", 3000) not in frames
    assert frames[-1] == (bytes([39]), 3000 * 37)
    assert len(frames) > 30


async def test_nacked_packets_are_resent_as_rtx_when_negotiated_and_as_is_otherwise() -> None:
    """RFC 4588: RTX has its own SSRC and sequence, the original sequence number
    first in its payload; checked against aiortc's own unwrap."""
    from aiortc import sdp as aiortc_sdp
    from aiortc.rtp import RtpPacket, unwrap_rtx

    from server.media.fastpath import FastSender, negotiated_from

    def answer(rtx: bool) -> str:
        return (
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
            f"m=video 9 UDP/TLS/RTP/SAVPF 97{' 98' if rtx else ''}\r\nc=IN IP4 0.0.0.0\r\n"
            "a=mid:0\r\na=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
            "a=rtpmap:97 VP8/90000\r\n"
            + ("a=rtpmap:98 rtx/90000\r\na=fmtp:98 apt=97\r\n" if rtx else "")
            + "a=sendonly\r\na=rtcp-mux\r\n")

    class FakeSender:
        _ssrc = 0x11223344
        _rtx_ssrc = 0x55667788

        async def _retransmit(self, sequence_number: int) -> None:
            return None

    for with_rtx in (True, False):
        media = aiortc_sdp.SessionDescription.parse(answer(with_rtx)).media[0]
        negotiated = negotiated_from(media, "0")
        assert negotiated.rtx_payload_type == (98 if with_rtx else None)
        sent: list[bytes] = []
        fast = FastSender(FakeSender(), negotiated)  # type: ignore[arg-type]
        fast._protect, fast._send = (lambda data: data), sent.append
        fast.send_frame([b"first", b"second"], pts=3000)
        original = RtpPacket.parse(sent[1], negotiated.extensions)
        await fast._retransmit(original.sequence_number)
        await fast._retransmit((original.sequence_number + 1000) & 0xFFFF)  # not in history
        assert len(sent) == 3
        resent = RtpPacket.parse(sent[2], negotiated.extensions)
        if with_rtx:
            assert resent.ssrc == 0x55667788 and resent.payload_type == 98
            assert resent.extensions.mid == "0"
            restored = unwrap_rtx(resent, payload_type=97, ssrc=0x11223344)
            assert restored.sequence_number == original.sequence_number
            assert restored.payload == b"second" and restored.timestamp == original.timestamp
            assert restored.marker == original.marker == 1
        else:
            assert sent[2] == sent[1]


async def test_packets_sent_before_a_new_epoch_are_not_resent() -> None:
    """A viewer moved to another layer: what the old layer sent is not worth
    resending (it would compete with the new layer's keyframe)."""
    from aiortc import sdp as aiortc_sdp

    from server.media.fastpath import FastSender, negotiated_from

    class FakeSender:
        _ssrc = 0x11223344
        _rtx_ssrc = 0x55667788

        async def _retransmit(self, sequence_number: int) -> None:
            return None

    media = aiortc_sdp.SessionDescription.parse(
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 97\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n"
        "a=rtpmap:97 VP8/90000\r\na=sendonly\r\na=rtcp-mux\r\n").media[0]
    negotiated = negotiated_from(media, "0")
    sent: list[bytes] = []
    fast = FastSender(FakeSender(), negotiated)  # type: ignore[arg-type]
    fast._protect, fast._send = (lambda data: data), sent.append
    fast.send_frame([b"old layer"], pts=3000)
    old = RtpPacket.parse(sent[-1], negotiated.extensions).sequence_number
    await asyncio.sleep(0.002)
    fast.new_epoch()
    fast.send_frame([b"new layer keyframe"], pts=9000)
    new = RtpPacket.parse(sent[-1], negotiated.extensions).sequence_number
    await fast._retransmit(old)
    assert len(sent) == 2 and fast.resend_refused == 1
    await fast._retransmit(new)
    assert len(sent) == 3 and sent[2] == sent[1] and fast.retransmitted == 1


def test_after_heavy_loss_one_stall_skips_every_hole_to_a_whole_frame() -> None:
    """Many frames lost pieces (a congested link, retransmissions refused): the
    buffer waits once, then goes straight to the first whole frame, not one
    stall per hole."""
    now = [0.0]
    frames: list[tuple[bytes, int]] = []
    buffer = MarkerJitterBuffer(lambda d, t: frames.append((d, t)), max_stall_s=1.0,
                                clock=lambda: now[0])
    seq = 100
    buffer.add(rtp(seq, 0, b"k", marker=True))
    # Ten frames of two packets, each missing its first packet.
    for i in range(1, 11):
        seq += 2
        buffer.add(rtp(seq, 3000 * i, b"tail", marker=True))
        now[0] += 0.05
    assert frames == [(b"k", 0)]
    # Whole frames follow; after the wait, the next packet releases them at once.
    for i in range(11, 20):
        seq += 1
        buffer.add(rtp(seq, 3000 * i, b"A"))
        seq += 1
        now[0] += 0.2
        buffer.add(rtp(seq, 3000 * i, b"B", marker=True))
    released = [t for _, t in frames[1:]]
    assert released and released[0] == 3000 * 11, released
    assert released == [3000 * i for i in range(11, 11 + len(released))]
    assert len(released) >= 5  # only one wait of ~1 s, then every frame as it completes


def test_holes_between_whole_frames_cost_one_wait_not_one_each() -> None:
    """A backlog where broken frames and whole ones alternate (a link that
    dropped packets at its queue while a viewer moved to another layer): the
    holes were all known, and NACKed, when their later packets came, so once
    the first has waited its time the others have too."""
    now = [0.0]
    frames: list[tuple[bytes, int]] = []
    buffer = MarkerJitterBuffer(lambda d, t: frames.append((d, t)), max_stall_s=1.0,
                                clock=lambda: now[0])
    seq = 100
    buffer.add(rtp(seq, 0, b"k", marker=True))
    # Five broken frames (first packet lost), each followed by a whole one.
    for i in range(1, 11):
        seq += 1
        if i % 2:
            seq += 1  # its first packet is lost
            buffer.add(rtp(seq, 3000 * i, b"tail", marker=True))
        else:
            buffer.add(rtp(seq, 3000 * i, b"whole", marker=True))
        now[0] += 0.033
    assert frames == [(b"k", 0)]
    # Live frames keep coming; the first wait ends ~1 s after the first hole.
    waited = None
    for i in range(11, 60):
        seq += 1
        now[0] += 0.033
        buffer.add(rtp(seq, 3000 * i, b"live", marker=True))
        if waited is None and len(frames) > 1:
            waited = now[0]
    assert waited is not None and waited <= 1.2, waited
    released = [t for _, t in frames[1:]]
    # Every whole frame of the backlog, then every live one, in order, no broken one.
    assert released[:5] == [3000 * i for i in (2, 4, 6, 8, 10)], released[:8]
    assert released[5:] == [3000 * i for i in range(11, 11 + len(released) - 5)]
    assert released[-1] == 3000 * 59
