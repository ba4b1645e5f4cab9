"""H.264 facts read from the stream (server/media/h264.py) and the SDP fitting that lets
aiortc answer players by what the stream allows, not by its label (server/media/sdp.py)."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from av.bitstream import BitStreamFilterContext

from server.media.h264 import (
    H264Refusal,
    H264Stream,
    choose_viewer_codec,
    inspect_frame,
)
from server.media.sdp import h264_payloads, keep_one_h264, relabel_h264, section_index
from server.roles import Role

from .conftest import Server, client_pc, offer_sdp, wait_for
from .interop.media import write_h264


def annexb_frames(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        bsf = BitStreamFilterContext("h264_mp4toannexb", stream)
        return [bytes(p) for packet in container.demux(stream) for p in bsf.filter(packet)]


@pytest.mark.parametrize("bframes,profile,name", [
    (0, "baseline", "Constrained Baseline"),
    (2, "high", None),
])
def test_sps_and_b_frames_are_read_from_the_stream(tmp_path: Path, bframes: int,
                                                   profile: str, name: str | None) -> None:
    frames = annexb_frames(write_h264(tmp_path / "x.mp4", 45, bframes=bframes,
                                      profile=profile))
    results = [inspect_frame(f) for f in frames]
    sps = [s for s, _ in results if s is not None]
    b_frames = sum(b for _, b in results)
    assert sps, "the keyframe carries an SPS"
    if bframes:
        assert b_frames > 10
        assert sps[0].profile_idc in (77, 100)
    else:
        assert b_frames == 0
        assert sps[0].describe().startswith(name or "")
        assert sps[0].constraints & 0x40, "constraint_set1: decodable by Main decoders"


@pytest.mark.parametrize("stream,player,ok", [
    ("42c01f", "42e01f", True),   # constrained stream labelled Baseline, CB player
    ("42e01f", "42001f", True),
    ("42e01f", "640c1f", True),
    ("42e01f", "4d001f", True),
    ("42001f", "42e01f", False),  # real Baseline (FMO/ASO allowed): Baseline players only
    ("4d001f", "42e01f", False),
    ("4d001f", "64001f", True),
    ("4d001f", "640c1f", False),  # Constrained High decoders: no Main promise
    ("640c1f", "4d001f", False),
    ("640c1f", "zz", False),
])
def test_which_players_decode_which_streams(stream: str, player: str, ok: bool) -> None:
    assert H264Stream.from_label(stream).decodable_by(player) is ok


def test_choice_and_refusals_name_mode_and_profile() -> None:
    stream = H264Stream.from_label("42c01f")
    offered = [(100, {"profile-level-id": "4d001f", "packetization-mode": "0"}),
               (102, {"profile-level-id": "42e01f", "packetization-mode": "1"})]
    assert choose_viewer_codec(stream, offered, "room.video").payload_type == 102
    with pytest.raises(H264Refusal) as mode0:
        choose_viewer_codec(stream, [(96, {"profile-level-id": "42e01f"})], "room.video")
    assert mode0.value.code == "h264_packetization_mode"
    assert "packetization-mode 0" in mode0.value.message and "42c01f" in mode0.value.message
    with pytest.raises(H264Refusal) as profile:
        choose_viewer_codec(H264Stream.from_label("640c1f"),
                            [(96, {"profile-level-id": "42e01f", "packetization-mode": "1"})],
                            "room.video")
    assert profile.value.code == "codec_mismatch"
    assert "Constrained High (640c1f)" in profile.value.message


OFFER = "\r\n".join([
    "v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111", "a=rtpmap:111 opus/48000/2",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 104",
    "a=rtpmap:96 VP8/90000",
    "a=rtpmap:97 H264/90000", "a=fmtp:97 packetization-mode=1;profile-level-id=640c1f",
    "a=rtcp-fb:97 nack",
    "a=rtpmap:102 H264/90000", "a=fmtp:102 packetization-mode=1;profile-level-id=42e01f",
    "a=rtpmap:103 rtx/90000", "a=fmtp:103 apt=97",
    "a=rtpmap:104 rtx/90000", "a=fmtp:104 apt=102",
]) + "\r\n"


def test_offer_fitted_for_aiortc_and_answer_relabelled() -> None:
    section = section_index(OFFER, "video", 0)
    assert section == 1 and section_index(OFFER, "video", 1) is None
    assert [pt for pt, _ in h264_payloads(OFFER, section)] == [97, 102]
    fitted = keep_one_h264(OFFER, section, 97, "42e01f")
    video = fitted[fitted.index("m=video"):]
    assert video.splitlines()[0] == "m=video 9 UDP/TLS/RTP/SAVPF 96 97 103"
    assert "a=fmtp:97 packetization-mode=1;profile-level-id=42e01f" in video
    assert ":102 " not in video and ":104 " not in video and "a=rtcp-fb:97 nack" in video
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 111" in fitted
    answer = relabel_h264(fitted, section, 97, "640c1f")
    assert "a=fmtp:97 packetization-mode=1;profile-level-id=640c1f" in answer


class RawH264Track(MediaStreamTrack):
    """Sends a file's H.264 frames as they are, unchecked: an encoder with B-frames."""

    kind = "video"

    def __init__(self, frames: list[bytes]) -> None:
        super().__init__()
        self._frames = frames
        self._index = 0

    async def recv(self) -> av.Packet:
        await asyncio.sleep(1 / 30)
        packet = av.Packet(self._frames[self._index % len(self._frames)])
        packet.pts = self._index * 3000
        packet.time_base = Fraction(1, 90000)
        self._index += 1
        return packet


async def test_server_refuses_a_publication_with_b_frames(tmp_path: Path, server: Server,
                                                          http: aiohttp.ClientSession,
                                                          peers: list[RTCPeerConnection]
                                                          ) -> None:
    frames = annexb_frames(write_h264(tmp_path / "high.mp4", 60, bframes=2, profile="high"))
    session = server.session()
    events: list[dict[str, Any]] = []
    session.listen(events.append)
    pc = client_pc()
    peers.append(pc)
    transceiver = pc.addTransceiver(RawH264Track(frames), direction="sendonly")
    caps = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences(
        [c for c in caps if c.mimeType in ("video/H264", "video/rtx")])
    async with http.post(f"{server.base_url}/whip/or1-live/room", data=await offer_sdp(pc),
                         headers={"Authorization": f"Bearer {server.token(Role.EXPERT)}",
                                  "Content-Type": "application/sdp"}) as response:
        assert response.status == 201
        await pc.setRemoteDescription(RTCSessionDescription(await response.text(), "answer"))

    def refusal() -> dict[str, Any] | None:
        return next((e for e in events if e["type"] == "publication_refused"), None)

    await wait_for(lambda: "" if refusal() else "not refused yet", timeout=15)
    event = refusal()
    assert event is not None and event["code"] == "h264_b_frames" and event["slot"] == "room"
    assert "B-frames" in event["message"]
    await wait_for(lambda: "" if not session.ingests and "room.video" not in session.feeds
                   else "publication still there")


def test_publisher_offering_only_high_is_fitted_and_its_label_restored() -> None:
    from server.media.h264 import fit_h264_publisher

    high = OFFER.replace("a=fmtp:102 packetization-mode=1;profile-level-id=42e01f",
                         "a=fmtp:102 packetization-mode=1;profile-level-id=64001f")
    fitted, relabel, stream = fit_h264_publisher(high, "42001f")
    # The first usable payload type (97, Constrained High) is the one aiortc receives.
    assert stream is not None and stream.describe() == "Constrained High (640c1f)"
    assert "a=fmtp:97 packetization-mode=1;profile-level-id=42001f" in fitted
    assert ":102 " not in fitted  # one H.264 payload type left for aiortc
    assert "profile-level-id=640c1f" in relabel(fitted)
    # A Baseline label aiortc knows: left alone.
    unchanged, _, none = fit_h264_publisher(OFFER, "42001f")
    assert unchanged == OFFER and none is None
