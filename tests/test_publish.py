"""`scrubin publish`: sources reach viewers; H.264 files pass through; drops recover."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import itertools
import sys
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from server import framecode
from server.http.common import AUDIT
from server.publish.passthrough import EncodedVideoTrack, SourceError
from server.publish.synthetic import TheatreRenderer
from server.publish.whip import (
    WhipError,
    WhipOptions,
    WhipPublisher,
    candidate_hosts,
    explain_ice_failure,
    loopback_host_addresses,
)
from server.roles import Role

from .conftest import Server, make_config, start_server, wait_for, whep_subscribe
from .test_live_path import CounterReader

pytestmark = pytest.mark.slow


def write_h264_file(path: Path, seconds: float = 3, fps: int = 15) -> None:
    """An MP4 (length-prefixed H.264, as cameras record) of stamped frames."""
    renderer = TheatreRenderer(320, 180, label="file")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        # Constrained Baseline, as WebRTC players (aiortc's included) say they decode.
        stream.options = {"g": str(fps), "bf": "0", "tune": "zerolatency", "profile": "baseline"}
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(renderer.render(i), format="bgr24")
            frame.pts = i
            frame.time_base = fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


async def test_h264_file_is_published_without_decoding_and_loops(
        tmp_path: Path, server: Server, http: aiohttp.ClientSession) -> None:
    path = tmp_path / "camera.mp4"
    write_h264_file(path)
    track = EncodedVideoTrack(str(path))
    assert track.codec == "h264"
    publisher = WhipPublisher(f"{server.base_url}/whip/or1-live/endoscope",
                              server.token(Role.EXPERT), [track],
                              WhipOptions(host_addresses=["127.0.0.1"], video_codec="video/H264"))
    task = asyncio.ensure_future(publisher.run())
    viewer = None
    try:
        session = server.session()
        await wait_for(lambda: "" if "endoscope.video" in session.feeds else "no feed")
        assert session.feeds["endoscope.video"].codec.mimeType == "video/H264"
        viewer, _, remote = await whep_subscribe(http, server, "endoscope.video", "video")
        reader = CounterReader(await asyncio.wait_for(remote, 10))
        # 3 s of file at 15 fps: more than 45 frames means it looped.
        await wait_for(lambda: "" if len(reader.counters) >= 50 else f"{len(reader.counters)}",
                       timeout=25)
        await reader.stop()
        counters = reader.counters
        assert all(c < 45 for c in counters), "only the file's own frames"
        # The file looped: its counters start again, on one increasing timeline.
        assert any(b < a for a, b in itertools.pairwise(counters)), counters
    finally:
        publisher.stop()
        await task
        if viewer is not None:
            await viewer.close()
        track.stop()


def test_non_h264_sources_are_refused_for_passthrough(tmp_path: Path) -> None:
    path = tmp_path / "mjpeg.avi"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="bgr24")
        for packet in stream.encode(frame.reformat(format="yuvj420p")):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(SourceError):
        EncodedVideoTrack(str(path))
    with pytest.raises(SourceError):
        EncodedVideoTrack(str(tmp_path / "missing.mp4"))


async def test_publisher_reconnects_when_the_server_comes_back(
        http: aiohttp.ClientSession) -> None:
    from server.publish.synthetic import SyntheticTheatreCamera

    config = make_config(media={"feed_grace_s": 60})
    server, runner = await start_server(config)
    camera = SyntheticTheatreCamera(320, 180, 15)
    token = server.token(Role.EXPERT)
    publisher = WhipPublisher(f"{server.base_url}/whip/or1-live/room", token, [camera],
                              WhipOptions(host_addresses=["127.0.0.1"], min_backoff_s=0.2,
                                          max_backoff_s=0.5))
    task = asyncio.ensure_future(publisher.run())
    try:
        await wait_for(lambda: "" if publisher.state == "live" else publisher.state)
        await runner.cleanup()  # the server goes away
        await wait_for(lambda: "" if publisher.state in ("reconnecting", "connecting")
                       else publisher.state, timeout=40)
        # A new server process on the same address and keys.
        server2, runner = await start_server(config)
        # Tokens are signed per process in tests: hand the publisher a valid one.
        publisher.token = server2.token(Role.EXPERT)
        await wait_for(lambda: "" if publisher.state == "live" else publisher.state, timeout=20)
        assert publisher.connections >= 2
        feed = server2.session().feeds["room.video"]
        await wait_for(lambda: "" if feed.frames_received > 5 else f"{feed.frames_received}")
    finally:
        publisher.stop()
        with contextlib.suppress(Exception):
            await task
        await runner.cleanup()


async def test_refused_publication_stops_with_the_reason(server: Server) -> None:
    from server.publish.synthetic import SyntheticTheatreCamera

    publisher = WhipPublisher(f"{server.base_url}/whip/or1-live/room",
                              server.token(Role.TRAINEE), [SyntheticTheatreCamera(160, 120, 5)],
                              WhipOptions(host_addresses=["127.0.0.1"]))
    with pytest.raises(WhipError) as refused:
        await publisher.run()
    assert refused.value.status == 403
    assert "wrong_role" in refused.value.body


async def test_cli_publish_synthetic_reaches_a_viewer(
        server: Server, http: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "--log-level", "WARNING", "publish",
        f"{server.base_url}/whip/or1-live/narration", "--token", server.token(Role.EXPERT),
        # No --host-address: a loopback URL makes the publisher advertise loopback,
        # which is all a server like the demo (127.0.0.1, loopback only) accepts.
        "--source", "synthetic", "--size", "320x180", "--fps", "15", "--no-audio",
        stdout=asyncio.subprocess.PIPE)
    viewer = None
    try:
        session = server.session()
        await wait_for(lambda: "" if "narration.video" in session.feeds else "no feed", timeout=20)
        viewer, _, remote = await whep_subscribe(http, server, "narration.video", "video")
        reader = CounterReader(await asyncio.wait_for(remote, 10))
        await wait_for(lambda: "" if len(reader.counters) >= 10 else f"{len(reader.counters)}",
                       timeout=20)
        await reader.stop()
        assert reader.counters == sorted(reader.counters)
        assert framecode.COUNTER_BITS == 24
    finally:
        process.terminate()
        out, _ = await asyncio.wait_for(process.communicate(), 15)
        if viewer is not None:
            await viewer.close()
    assert process.returncode == 0
    assert b"publish: live" in out


def _mid_gop_copy(source: Path, target: Path, skip: int) -> None:
    """``source``'s H.264 remuxed into MPEG-TS from its ``skip``-th frame: a camera
    joined between keyframes."""
    with av.open(str(source)) as container, av.open(str(target), "w") as out:
        stream = container.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for index, packet in enumerate(container.demux(stream)):
            if index >= skip and packet.size:
                packet.stream = copy
                out.mux(packet)


async def test_passthrough_forwards_nothing_before_the_first_keyframe(tmp_path: Path) -> None:
    from server.media.codecs import is_keyframe

    from .interop.media import write_h264

    source = write_h264(tmp_path / "camera.mp4", 90, gop=30)
    _mid_gop_copy(source, tmp_path / "joined.ts", skip=10)
    track = EncodedVideoTrack(str(tmp_path / "joined.ts"), loop=False, reopen=False)
    try:
        first = await track.recv()
        assert is_keyframe("video/h264", bytes(first))
        assert track.packets_skipped == 20  # frames 10..29, before the keyframe at 30
    finally:
        track.stop()


def test_passthrough_refuses_h264_with_b_frames(tmp_path: Path) -> None:
    from server.publish.passthrough import BFramesError

    from .interop.media import write_h264

    source = write_h264(tmp_path / "high.mp4", 30, bframes=2, profile="high")
    with pytest.raises(BFramesError, match=r"B-frames.*--transcode"):
        EncodedVideoTrack(str(source))


def test_transcoding_an_h264_source_keeps_h264(tmp_path: Path) -> None:
    from server.publish.sources import open_source

    path = tmp_path / "camera.mp4"
    write_h264_file(path, seconds=1)
    source = open_source(str(path), label="x", passthrough=False, audio=False)
    try:
        assert source.player is not None  # decoded and re-encoded
        assert source.video_codec == "video/H264"
    finally:
        source.close()


def test_a_loopback_or_localhost_url_advertises_loopback() -> None:
    assert loopback_host_addresses("http://127.0.0.1:8080/whip/s/room") == ["127.0.0.1"]
    assert loopback_host_addresses("http://127.0.0.9:8080/whip/s/room") == ["127.0.0.9"]
    assert loopback_host_addresses("http://localhost:8080/whip/s/room") == ["127.0.0.1"]
    assert loopback_host_addresses("https://[::1]:8443/whip/s/room") == ["::1"]
    assert loopback_host_addresses("https://or.example.org/whip/s/room") == []
    assert loopback_host_addresses("http://10.0.0.5:8080/whip/s/room") == []
    publisher = WhipPublisher("http://localhost:1/whip/s/room", "t", [])
    assert publisher.host_addresses == ["127.0.0.1"]
    chosen = WhipPublisher("http://localhost:1/whip/s/room", "t", [],
                           WhipOptions(host_addresses=["127.0.0.5"]))
    assert chosen.host_addresses == ["127.0.0.5"]


def test_ice_failures_are_explained_in_terms_an_operator_can_act_on() -> None:
    sdp = ("v=0\r\na=candidate:a 1 udp 2130706431 10.0.0.7 5000 typ host\r\n"
           "a=candidate:b 1 udp 2130706431 10.0.0.7 5002 typ host\r\n"
           "a=candidate:c 1 udp 1694498815 198.51.100.4 5000 typ srflx raddr 0.0.0.0 rport 0\r\n")
    assert candidate_hosts(sdp) == ["10.0.0.7", "198.51.100.4"]
    no_answer = explain_ice_failure(["10.0.0.7"], [])
    assert "answered without candidates" in no_answer and "10.0.0.7" in no_answer
    assert "allowed_remote_networks" in no_answer
    remote_loopback = explain_ice_failure(["10.0.0.7"], ["127.0.0.1"])
    assert "advertises only loopback" in remote_loopback
    assert "--host-address 127.0.0.1" in remote_loopback
    local_loopback = explain_ice_failure(["127.0.0.1"], ["10.0.0.1"])
    assert "drop --host-address" in local_loopback
    plain = explain_ice_failure(["10.0.0.7"], ["10.0.0.1"])
    assert plain == ("ICE failed: none of this machine's addresses (10.0.0.7) reached the "
                     "server's (10.0.0.1)")


async def test_a_publication_ice_cannot_connect_says_why_backs_off_and_is_not_a_start(
        ) -> None:
    """The server accepts only 127.0.0.1; the publisher advertises 127.0.0.2 (all
    traffic stays on loopback), and this server answers without candidates of its
    own (as ScrubIn did before it kept end-of-candidates out of such offers; other
    WHIP servers may). Every offer is answered 201, ICE never connects: the
    publisher says why, waits longer each time, and the audit trail has no
    publish_start, only publish_no_media entries."""
    from server.http.common import PEERS
    from server.publish.synthetic import SyntheticTheatreCamera

    config = make_config(ice={"allowed_remote_networks": ["127.0.0.1/32"]})
    server, runner = await start_server(config)
    peers = server.app[PEERS]
    answer = peers.answer

    async def without_candidates(pc: Any, offer: str) -> str:
        text = await answer(pc, offer)
        return "".join(line + "\r\n" for line in text.splitlines()
                       if not line.startswith("a=candidate:"))

    peers.answer = without_candidates  # type: ignore[method-assign]
    states: list[tuple[str, str, float]] = []
    publisher = WhipPublisher(
        f"{server.base_url}/whip/or1-live/room", server.token(Role.EXPERT),
        [SyntheticTheatreCamera(160, 120, 5)],
        WhipOptions(host_addresses=["127.0.0.2"], min_backoff_s=0.1, max_backoff_s=0.4))
    publisher.on_state = lambda state: states.append(
        (state, publisher.reason, publisher.retry_in))
    task = asyncio.ensure_future(publisher.run())
    try:
        def retries() -> list[tuple[str, str, float]]:
            return [s for s in states if s[0] == "reconnecting"]

        await wait_for(lambda: "" if len(retries()) >= 4 else f"{states}", timeout=30)
        waits = [retry_in for _, _, retry_in in retries()[:4]]
        assert waits == [0.1, 0.2, 0.4, 0.4], waits
        assert all("answered without candidates" in reason and "127.0.0.2" in reason
                   for _, reason, _ in retries())
        assert "live" not in [s for s, _, _ in states]
        assert publisher.describe_state().startswith("reconnecting in 0.4 s: ICE failed")
        audit = server.app[AUDIT]

        def no_media_entries() -> list[dict[str, object]]:
            return [e for e in audit.read() if e["event"] == "publish_no_media"]

        await wait_for(lambda: "" if len(no_media_entries()) >= 3 else f"{audit.read()}")
        events = [e["event"] for e in audit.read()]
        assert "publish_start" not in events
        assert no_media_entries()[0]["slot"] == "room"
        assert no_media_entries()[0]["via"] == "whip"
    finally:
        publisher.stop()
        with contextlib.suppress(Exception):
            await task
        await runner.cleanup()


async def test_publish_start_is_audited_when_media_first_flows(server: Server) -> None:
    from server.publish.synthetic import SyntheticTheatreCamera

    publisher = WhipPublisher(f"{server.base_url}/whip/or1-live/room",
                              server.token(Role.EXPERT), [SyntheticTheatreCamera(160, 120, 10)])
    task = asyncio.ensure_future(publisher.run())
    audit = server.app[AUDIT]
    try:
        await wait_for(lambda: "" if any(e["event"] == "publish_start" for e in audit.read())
                       else f"{publisher.state}: {audit.read()}", timeout=20)
        start = next(e for e in audit.read() if e["event"] == "publish_start")
        assert start["slot"] == "room" and start["via"] == "whip"
        assert start["feeds"] == ["room.video"]
        assert start["role"] == "expert" and start["after_s"] >= 0
        assert server.session().feeds["room.video"].frames_received >= 1
        # Exactly one, however many frames followed.
        feed = server.session().feeds["room.video"]
        seen = feed.frames_received
        await wait_for(lambda: "" if feed.frames_received > seen + 5 else "no more frames")
        assert [e["event"] for e in audit.read()].count("publish_start") == 1
        assert "publish_no_media" not in [e["event"] for e in audit.read()]
    finally:
        publisher.stop()
        await task
