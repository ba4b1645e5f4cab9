"""Real aiortc publisher → server → several aiortc viewers, over loopback.

Viewers decode what the server forwarded and read back the synthetic
camera's frame counter, so these tests check content, not just arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server import framecode
from server.publish.synthetic import SyntheticTheatreCamera, SyntheticTone
from server.roles import Role

from .conftest import (
    Server,
    client_pc,
    live_peer_connections,
    offer_sdp,
    wait_for,
    whep_subscribe,
    whip_publish,
)

pytestmark = pytest.mark.slow

W, H, FPS = 640, 360, 15


class CounterReader:
    """Decodes a viewer's track and keeps the frame counters it reads."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.counters: list[int] = []
        self.frames = 0
        self.unreadable = 0
        self.sizes: set[tuple[int, int]] = set()
        self.samples = 0
        self.task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.frames += 1
                if track.kind == "audio":
                    self.samples += frame.samples
                    continue
                self.sizes.add((frame.width, frame.height))
                counter = framecode.read(frame.to_ndarray(format="bgr24"))
                if counter is None:
                    self.unreadable += 1
                else:
                    self.counters.append(counter)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture(params=["fast", "sender"])
async def any_path_server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    from .conftest import make_config, start_server

    srv, runner = await start_server(make_config(media={"fast_path": request.param == "fast"}))
    srv.path = request.param  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        await runner.cleanup()


async def test_viewers_decode_the_publishers_frame_counter_and_audio(
        any_path_server: Server, http: aiohttp.ClientSession,
        peers: list[RTCPeerConnection]) -> None:
    server = any_path_server
    camera = SyntheticTheatreCamera(W, H, FPS, label="room")
    publisher, _ = await whip_publish(http, server, "room", [camera, SyntheticTone()])
    peers.append(publisher)
    session = server.session()
    await wait_for(lambda: "" if session.feeds.get("room.video") is not None
                   and session.feeds["room.video"].frames_received > 0 else "no frames yet")
    assert session.feeds["room.video"].codec.mimeType == "video/VP8"
    assert session.feeds["room.audio"].codec.mimeType == "audio/opus"

    readers = []
    for _ in range(3):
        pc, _, track = await whep_subscribe(http, server, "room.video", "video")
        peers.append(pc)
        readers.append(CounterReader(await asyncio.wait_for(track, 10)))
    audio_pc, _, audio_track = await whep_subscribe(http, server, "room.audio", "audio")
    peers.append(audio_pc)
    audio = CounterReader(await asyncio.wait_for(audio_track, 10))

    await wait_for(lambda: "" if all(len(r.counters) >= 20 for r in readers)
                   else f"counters so far: {[len(r.counters) for r in readers]}", timeout=20)
    await wait_for(lambda: "" if audio.samples >= 48000 // 2 else f"{audio.samples} samples")
    for reader in readers:
        await reader.stop()
        counters = reader.counters
        # What viewers decode is the publisher's picture, in order, and recent.
        assert counters == sorted(counters), counters
        assert counters[-1] <= camera.frames_sent
        assert camera.frames_sent - counters[-1] < FPS * 2
        # Forwarding drops nothing on loopback once a viewer is flowing.
        steps = [b - a for a, b in itertools.pairwise(counters)]
        assert steps.count(1) >= len(steps) * 0.9, steps
        assert reader.sizes == {(W, H)}
    await audio.stop()

    feed = session.feeds["room.video"]
    assert len(feed.downstreams) == 3
    # Each path was the one configured (loopback: no TURN fallback).
    assert {s.path for s in session.subscriptions.values()} == {server.path}  # type: ignore[attr-defined]
    # Late joiners were served from the keyframe cache, not one request each.
    assert feed.keyframe_requests_sent <= 2


async def test_h264_is_forwarded_without_transcoding(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]) -> None:
    publisher = client_pc()
    peers.append(publisher)
    camera = SyntheticTheatreCamera(W, H, FPS, label="endoscope")
    transceiver = publisher.addTransceiver(camera, direction="sendonly")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                     if c.mimeType == "video/H264"])
    sdp = await offer_sdp(publisher)
    token = server.token(Role.EXPERT)
    async with http.post(f"{server.base_url}/whip/or1-live/endoscope", data=sdp,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        assert response.status == 201, await response.text()
        from aiortc import RTCSessionDescription
        await publisher.setRemoteDescription(
            RTCSessionDescription(await response.text(), "answer"))
    session = server.session()
    await wait_for(lambda: "" if "endoscope.video" in session.feeds else "no feed")
    assert session.feeds["endoscope.video"].codec.mimeType == "video/H264"

    pc, _, track = await whep_subscribe(http, server, "endoscope.video", "video")
    peers.append(pc)
    reader = CounterReader(await asyncio.wait_for(track, 10))
    await wait_for(lambda: "" if len(reader.counters) >= 15 else f"{len(reader.counters)}",
                   timeout=20)
    await reader.stop()
    assert reader.counters == sorted(reader.counters)


async def test_publisher_reconnect_resumes_existing_viewers(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]) -> None:
    first = SyntheticTheatreCamera(W, H, FPS, label="room")
    publisher, _ = await whip_publish(http, server, "room", [first])
    session = server.session()
    await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
    feed = session.feeds["room.video"]

    pc, _, track = await whep_subscribe(http, server, "room.video", "video")
    peers.append(pc)
    reader = CounterReader(await asyncio.wait_for(track, 10))
    await wait_for(lambda: "" if len(reader.counters) >= 10 else f"{len(reader.counters)}")
    subscription = next(s for s in session.subscriptions.values() if s.feed_id == feed.id)

    # The publisher drops without saying goodbye (no DELETE).
    await publisher.close()
    await wait_for(lambda: "" if feed.state == "down" else f"feed is {feed.state}")
    assert subscription.state != "closed"
    before = len(reader.counters)

    # It comes back on a new connection, with a camera counting from zero again.
    second = SyntheticTheatreCamera(W, H, FPS, label="room")
    for _ in range(FPS * 3):
        await second.recv()  # its counter is now well past 3 s: distinguishable
    publisher2, _ = await whip_publish(http, server, "room", [second])
    peers.append(publisher2)
    await wait_for(lambda: "" if feed.state == "live" else f"feed is {feed.state}")
    assert session.feeds["room.video"] is feed

    def resumed() -> str:
        new = reader.counters[before:]
        return "" if len(new) >= 10 else f"{len(new)} new frames after reconnect"

    await wait_for(resumed, timeout=20)
    await reader.stop()
    assert subscription.state != "closed"
    assert pc.connectionState == "connected"
    # Frames after the reconnect come from the second camera.
    assert reader.counters[-1] >= FPS * 3


async def track_ends(track: MediaStreamTrack, max_frames: int = 2000) -> bool:
    """Read what a remote track still holds; True once it reports its end."""
    for _ in range(max_frames):
        try:
            await asyncio.wait_for(track.recv(), 5)
        except MediaStreamError:
            return True
    return False


async def test_session_end_closes_everything_in_cascade(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]) -> None:
    publisher, _ = await whip_publish(http, server, "room", [
        SyntheticTheatreCamera(W, H, FPS, label="room"), SyntheticTone()])
    peers.append(publisher)
    session = server.session()
    await wait_for(lambda: "" if len(session.feeds) == 2 else f"{list(session.feeds)}")
    viewers = []
    tracks = []
    for feed, kind in (("room.video", "video"), ("room.video", "video"), ("room.audio", "audio")):
        pc, _, track = await whep_subscribe(http, server, feed, kind)
        peers.append(pc)
        viewers.append(pc)
        tracks.append(await asyncio.wait_for(track, 10))
    await wait_for(lambda: "" if all(v.connectionState == "connected" for v in viewers)
                   else "viewers connecting")
    server_pcs = [i.pc for i in session.ingests.values()]
    assert len(session.subscriptions) == 3

    await session.end("test")

    assert session.state == "ended"
    assert session.feeds == {} and session.subscriptions == {} and session.ingests == {}
    assert all(pc.connectionState == "closed" for pc in server_pcs)
    # The far ends see their connections end by themselves (the server's DTLS
    # close_notify): nothing here closes a client peer connection.
    clients = [*viewers, publisher]
    await wait_for(lambda: "" if all(pc.connectionState == "closed" for pc in clients)
                   else f"client states {[pc.connectionState for pc in clients]}")
    for track in tracks:  # what had arrived plays out, then each track ends
        assert await track_ends(track), f"{track.kind} track still delivering"
    await wait_for(lambda: "" if not live_peer_connections()
                   else f"{len(live_peer_connections())} peer connections alive")
    # An ended Session refuses new publishing.
    async with http.post(f"{server.base_url}/whip/or1-live/room", data="v=0\r\n",
                         headers={"Authorization": f"Bearer {server.token(Role.EXPERT)}",
                                  "Content-Type": "application/sdp"}) as response:
        assert response.status == 410


async def test_no_task_outlives_the_app(http: aiohttp.ClientSession) -> None:
    from .conftest import make_config, start_server

    before = {t for t in asyncio.all_tasks()}
    srv, runner = await start_server(make_config())
    publisher, _ = await whip_publish(http, srv, "room", [SyntheticTheatreCamera(W, H, FPS)])
    await wait_for(lambda: "" if "room.video" in srv.session().feeds else "no feed")
    viewer, _, track = await whep_subscribe(http, srv, "room.video", "video")
    await asyncio.wait_for(track, 10)
    # aioice starts consent checks when its connect() finishes even if the
    # connection was closed meanwhile; let ICE settle so this test is about us.
    await wait_for(lambda: "" if viewer.connectionState == "connected" else "connecting")
    await runner.cleanup()
    await publisher.close()
    await viewer.close()

    def leftovers() -> str:
        current = asyncio.current_task()
        alive = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
        return "" if not alive else ", ".join(repr(t.get_coro()) for t in alive[:5])

    await wait_for(leftovers, timeout=10)
    assert not live_peer_connections()
