"""`scrubin publish`: sources reach viewers; H.264 files pass through; drops recover."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import itertools
import sys
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from server import framecode
from server.publish.passthrough import EncodedVideoTrack, SourceError
from server.publish.synthetic import TheatreRenderer
from server.publish.whip import WhipError, WhipOptions, WhipPublisher
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
        "--source", "synthetic", "--size", "320x180", "--fps", "15", "--no-audio",
        "--host-address", "127.0.0.1", stdout=asyncio.subprocess.PIPE)
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
