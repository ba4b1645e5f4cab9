"""Peers that vanish, stall or misbehave, with real aiortc peers over loopback
(docs/architecture.md, "The media seam" and "Liveness").

The live stream must never notice: viewers killed without a DELETE, a viewer
whose transport is torn down under the server, a publisher that is killed or
whose camera stops. Dead peers are noticed in seconds, and the pages are told.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from server.http.common import LIVENESS, METRICS
from server.media import hooks
from server.publish.synthetic import SyntheticTheatreCamera, SyntheticTone
from server.roles import Role

from .conftest import Server, client_pc, offer_sdp, wait_for, whep_subscribe, whip_publish
from .netem import Link, UdpRelay, server_candidate
from .test_live_path import CounterReader
from .test_ws_protocol import WS, join, of_type, receive_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
W, H, FPS = 320, 180, 15
SESSION = "or1-live"


def metric(server: Server, name: str, **labels: str) -> float:
    value = server.app[METRICS].registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def peer_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Peers in their own process (tests/peer_process.py), ready to be killed."""
    with tempfile.TemporaryFile() as errors:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.peer_process", *args, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=errors)
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 40)
            if line != b"ready\n":
                errors.seek(0)
                raise AssertionError(f"peer process failed: {errors.read().decode()[-2000:]}")
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def kill(process: asyncio.subprocess.Process) -> float:
    """SIGKILL: no DELETE, no DTLS close_notify, no RTCP BYE. Returns when."""
    process.kill()
    await process.wait()
    return time.monotonic()


async def publish_camera(server: Server, http: aiohttp.ClientSession,
                         peers: list[RTCPeerConnection]) -> SyntheticTheatreCamera:
    camera = SyntheticTheatreCamera(W, H, FPS, label="room")
    publisher, _ = await whip_publish(http, server, "room", [camera])
    peers.append(publisher)
    session = server.session()
    await wait_for(lambda: "" if "room.video" in session.feeds
                   and session.feeds["room.video"].frames_received else "no frames yet")
    return camera


async def decoding_viewer(server: Server, http: aiohttp.ClientSession,
                          peers: list[RTCPeerConnection]) -> CounterReader:
    pc, _, track = await whep_subscribe(http, server, "room.video", "video")
    peers.append(pc)
    reader = CounterReader(await asyncio.wait_for(track, 10))
    await wait_for(lambda: "" if len(reader.counters) >= 5 else "no picture yet")
    return reader


async def keeps_decoding(reader: CounterReader, frames: int = FPS) -> None:
    before = len(reader.counters)
    await wait_for(lambda: "" if len(reader.counters) >= before + frames
                   else f"{len(reader.counters) - before} new frames", timeout=10)


def check_continuous(counters: list[int]) -> None:
    assert counters == sorted(counters), counters
    steps = [b - a for a, b in itertools.pairwise(counters)]
    assert steps.count(1) >= len(steps) * 0.9, steps


def server_udp_transports(pc: RTCPeerConnection) -> list[Any]:
    """The server side's UDP sockets of one peer connection (test-only reach-in)."""
    out = []
    for transceiver in pc.getTransceivers():
        connection = transceiver.sender.transport.transport._connection
        out += [p.transport for p in connection._protocols if p.transport is not None]
    return out


async def ws_subscribe(trainee: WS, viewer: RTCPeerConnection, feed: str,
                       request_id: str) -> str:
    """Subscribe over the websocket; returns the Subscription id."""
    viewer.addTransceiver(feed.rsplit(".", 1)[1], direction="recvonly")
    await trainee.send_json({"type": "subscribe", "feed": feed, "id": request_id,
                             "sdp": await offer_sdp(viewer)})
    reply = await receive_until(trainee, of_type("answer", id=request_id))
    await viewer.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
    return str(reply["subscription"])


# -- viewers -------------------------------------------------------------------------


async def test_viewers_killed_without_delete_never_stop_the_live_stream(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]) -> None:
    await publish_camera(server, http, peers)
    session = server.session()
    feed = session.feeds["room.video"]
    publisher_pc = next(iter(session.ingests.values())).pc
    reader = await decoding_viewer(server, http, peers)
    timeout = server.config.liveness.peer_timeout_s

    last_kill = 0.0
    for round_ in range(3):
        token = server.token(Role.TRAINEE, participant_id=f"crowd-{round_}")
        # Ten viewers receive for a second, then their process dies: a laptop
        # lid closing, a Wi-Fi drop. The next round joins while the last one's
        # connections are still being noticed.
        async with peer_process("viewers", server.base_url, SESSION, "room.video",
                                token, "10") as crowd:
            await asyncio.sleep(1.0)
            last_kill = await kill(crowd)
        await keeps_decoding(reader)
        assert feed.state == "live" and publisher_pc.connectionState == "connected"

    # Every vanished viewer was noticed in seconds, not aioice's ~30.
    await wait_for(lambda: "" if len(session.subscriptions) == 1
                   else f"{len(session.subscriptions) - 1} vanished viewers still served",
                   timeout=timeout + 4)
    assert time.monotonic() - last_kill < timeout + 4
    assert metric(server, "scrubin_peers_gone_total", role="viewer") == 30
    assert metric(server, "scrubin_subscription_transitions_total", state="closed") == 30
    assert feed.state == "live" and publisher_pc.connectionState == "connected"

    # The stream is whole: the survivor kept decoding and a newcomer gets the picture.
    await keeps_decoding(reader)
    newcomer = await decoding_viewer(server, http, peers)
    await keeps_decoding(newcomer)
    await reader.stop()
    await newcomer.stop()
    check_continuous(reader.counters)


async def test_a_transport_torn_down_under_a_viewer_drops_that_viewer_alone(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        sockets: list[WS]) -> None:
    await publish_camera(server, http, peers)
    session = server.session()
    reader = await decoding_viewer(server, http, peers)
    trainee, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-1")
    viewer = client_pc()
    peers.append(viewer)
    subscription_id = await ws_subscribe(trainee, viewer, "room.video", "sub-1")
    subscription = session.subscriptions[subscription_id]
    await wait_for(lambda: "" if subscription.frames_forwarded > 10 else "not flowing yet")

    # What aioice does when consent expires: the UDP socket closes under the
    # sender while the Feed is still handing it frames.
    for transport in server_udp_transports(subscription.pc):
        transport.close()

    closed = await receive_until(trainee, of_type("subscription_closed"), timeout=10)
    assert closed == {"type": "subscription_closed", "subscription": subscription_id,
                      "feed": "room.video", "reason": "transport_gone"}
    assert subscription_id not in session.subscriptions
    await keeps_decoding(reader)
    assert session.feeds["room.video"].state == "live"
    assert next(iter(session.ingests.values())).pc.connectionState == "connected"
    await reader.stop()
    check_continuous(reader.counters)


async def test_a_quiet_viewer_is_reaped_and_a_paused_one_is_not(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        sockets: list[WS]) -> None:
    await publish_camera(server, http, peers)
    session = server.session()
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    trainee, _ = await join(http, server, sockets, Role.TRAINEE, name="Ana",
                            participant_id="tr-1")
    quiet, paused = client_pc(), client_pc()
    peers += [quiet, paused]
    quiet_id = await ws_subscribe(trainee, quiet, "room.video", "q")
    # Paused before its connection is even up: it never receives RTP, so it
    # never sends a receiver report; only its answers to our probes keep it.
    paused.addTransceiver("video", direction="recvonly")
    await trainee.send_json({"type": "subscribe", "feed": "room.video", "id": "p",
                             "sdp": await offer_sdp(paused)})
    reply = await receive_until(trainee, of_type("answer", id="p"))
    paused_id = reply["subscription"]
    await trainee.send_json({"type": "pause", "subscription": paused_id, "id": "pause"})
    await receive_until(trainee, of_type("ok", id="pause"))
    await paused.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
    await wait_for(lambda: "" if session.subscriptions[quiet_id].frames_forwarded > 5
                   and paused.connectionState == "connected" else "connecting")

    # The quiet viewer's machine is gone from the network: nothing more arrives.
    gone_at = time.monotonic()
    for transceiver in quiet.getTransceivers():
        for protocol in transceiver.receiver.transport.transport._connection._protocols:
            protocol.transport.close()

    closed = await receive_until(trainee, of_type("subscription_closed", subscription=quiet_id),
                                 timeout=15)
    noticed = time.monotonic() - gone_at
    liveness = server.config.liveness
    assert closed["reason"] == "peer_gone"
    assert liveness.peer_timeout_s - 0.5 <= noticed <= liveness.peer_timeout_s + 2.5, noticed
    # The expert is told who dropped.
    dropped = await receive_until(expert, of_type("presence", event="dropped"), timeout=5)
    assert dropped["participant"] == {"id": "tr-1", "name": "Ana"}
    assert dropped["role"] == "viewer" and dropped["reason"] == "peer_gone"

    # The paused viewer got no media for over the timeout and is still there.
    await asyncio.sleep(max(0.0, liveness.peer_timeout_s + 2 - (time.monotonic() - gone_at)))
    assert session.subscriptions[paused_id].state == "paused"
    assert session.subscriptions[paused_id].frames_forwarded == 0
    assert server.app[LIVENESS].stats.probes > 0
    # And once resumed it starts from the Feed's cache.
    await trainee.send_json({"type": "resume", "subscription": paused_id, "id": "resume"})
    await receive_until(trainee, of_type("ok", id="resume"))
    await wait_for(lambda: "" if session.subscriptions[paused_id].frames_forwarded > 5
                   else "no frames after resume")


async def test_nacked_packets_come_back_and_frames_decode_under_loss(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]) -> None:
    await publish_camera(server, http, peers)
    session = server.session()
    results = {}
    for rtx in (True, False):
        viewer = client_pc()
        peers.append(viewer)
        transceiver = viewer.addTransceiver("video", direction="recvonly")
        if not rtx:  # a player that does not offer RTX gets plain retransmissions
            transceiver.setCodecPreferences([
                c for c in RTCRtpReceiver.getCapabilities("video").codecs
                if c.mimeType == "video/VP8"])
        track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        viewer.on("track", lambda t, f=track: f.done() or f.set_result(t))
        offer = await offer_sdp(viewer)
        async with http.post(f"{server.base_url}/whep/{SESSION}/room.video", data=offer,
                             headers={"Authorization": f"Bearer {server.token(Role.TRAINEE)}",
                                      "Content-Type": "application/sdp"}) as response:
            answer = await response.text()
            assert response.status == 201, answer
        assert ("rtx/90000" in answer) is rtx
        relay = await UdpRelay(server_candidate(answer), Link(loss=0.05, seed=7)).start()
        try:
            await viewer.setRemoteDescription(
                RTCSessionDescription(relay.point_answer_here(answer), "answer"))
            reader = CounterReader(await asyncio.wait_for(track, 10))
            await wait_for(lambda r=reader: "" if len(r.counters) >= 3 * FPS
                           else f"{len(r.counters)} frames", timeout=30)
            await reader.stop()
            subscription = next(s for s in session.subscriptions.values()
                                if s.pc.remoteDescription.sdp == offer)
            fast = subscription._fast
            assert fast is not None
            results[rtx] = (relay.stats.dropped_loss, fast.retransmitted, reader.counters)
        finally:
            relay.close()
    for rtx, (dropped, retransmitted, counters) in results.items():
        # Packets were lost on the way, the server resent them (as RTX when
        # negotiated), and the pictures came out whole and in order.
        assert dropped >= 5, (rtx, dropped)
        assert retransmitted >= dropped // 2, (rtx, dropped, retransmitted)
        check_continuous(counters)


async def test_sender_reports_carry_the_publishers_clock_for_lip_sync(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import aiortc.clock

    # The publisher's wall clock is an hour behind ours: its sender reports say
    # so, and viewers must get its clock, not the server's arrival times.
    real = aiortc.clock.current_ntp_time
    offset = -3600 << 32
    monkeypatch.setattr(aiortc.clock, "current_ntp_time", lambda: real() + offset)
    publisher, _ = await whip_publish(http, server, "room", [
        SyntheticTheatreCamera(W, H, FPS, label="room"), SyntheticTone()])
    peers.append(publisher)
    session = server.session()
    await wait_for(lambda: "" if len(session.feeds) == 2 else "feeds")
    reports: dict[str, list[tuple[int, int]]] = {"video": [], "audio": []}
    for feed, kind in (("room.video", "video"), ("room.audio", "audio")):
        pc, _, _track = await whep_subscribe(http, server, feed, kind)
        peers.append(pc)
        receiver = pc.getTransceivers()[0].receiver
        hooks.observe_sender_reports(receiver, lambda ntp, rtp, k=kind: reports[k].append(
            (ntp, rtp)))
    def on_publisher_clock(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        # Until a Feed has the publisher's first sender report (~1 s), its
        # viewers' reports fall back to arrival times on our clock.
        return [(n, r) for n, r in pairs if abs((n - (real() + offset)) / (1 << 32)) < 5]

    await wait_for(lambda: "" if all(len(on_publisher_clock(r)) >= 2 for r in reports.values())
                   else f"{ {k: len(v) for k, v in reports.items()} }", timeout=15)
    now = real()
    for kind, all_pairs in reports.items():
        pairs = on_publisher_clock(all_pairs)
        ntp, _ = pairs[-1]
        skew_s = (ntp - (now + offset)) / (1 << 32)
        assert -3 < skew_s < 1, (kind, skew_s)  # the publisher's clock, not ours
        # One clock, one line: consecutive reports agree on the rate (within the
        # publisher's own wobble: it stamps reports at packet send time).
        (n0, r0), (n1, r1) = pairs[-2], pairs[-1]
        rate = 90000 if kind == "video" else 48000
        drift = ((n1 - n0) / (1 << 32)) - ((r1 - r0) & 0xFFFFFFFF) / rate
        assert abs(drift) < 0.02, (kind, drift)


# -- publishers ------------------------------------------------------------------------


async def test_a_publisher_that_vanishes_takes_its_feed_down_in_seconds(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        sockets: list[WS]) -> None:
    session = server.session()
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    encoder = server.token(Role.EXPERT, name="Room encoder", participant_id="encoder-1")
    async with peer_process("publish", server.base_url, SESSION, "room", encoder) as camera:
        await wait_for(lambda: "" if "room.video" in session.feeds
                       and session.feeds["room.video"].frames_received > 15 else "no frames")
        feed = session.feeds["room.video"]
        reader = await decoding_viewer(server, http, peers)
        viewer_id = next(iter(session.subscriptions))
        killed_at = await kill(camera)

    down = await receive_until(expert, lambda m: m.get("type") == "feed"
                               and m["feed"]["state"] == "down", timeout=15)
    noticed = time.monotonic() - killed_at
    assert noticed < server.config.liveness.peer_timeout_s + 2, noticed
    assert down["feed"]["id"] == "room.video"
    assert metric(server, "scrubin_peers_gone_total", role="publisher") == 1
    assert metric(server, "scrubin_feed_transitions_total", state="down") == 1
    # Viewers wait out the grace period for the publisher to come back.
    assert feed.state == "down" and viewer_id in session.subscriptions

    # The expert learns who dropped (the message came before the Feed went down).
    async with peer_process("publish", server.base_url, SESSION, "room", encoder):
        await wait_for(lambda: "" if feed.state == "live" else f"feed is {feed.state}")
        await keeps_decoding(reader)
    await reader.stop()
    assert viewer_id in session.subscriptions or feed.state != "live"


async def test_a_stalled_camera_is_reported_in_two_seconds_and_silence_does_not_flap(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        sockets: list[WS]) -> None:
    class Pausable(MediaStreamTrack):
        def __init__(self, inner: MediaStreamTrack) -> None:
            super().__init__()
            self.kind = inner.kind
            self.inner = inner
            self.running = asyncio.Event()
            self.running.set()

        async def recv(self) -> Any:
            await self.running.wait()
            return await self.inner.recv()

    camera = Pausable(SyntheticTheatreCamera(W, H, FPS, label="room"))
    tone = Pausable(SyntheticTone())
    publisher, _ = await whip_publish(http, server, "room", [camera, tone])
    peers.append(publisher)
    session = server.session()
    trainee, _ = await join(http, server, sockets, Role.TRAINEE)
    await wait_for(lambda: "" if len(session.feeds) == 2 and all(
        f.frames_received > 10 for f in session.feeds.values()) else "feeds starting")
    transitions: list[tuple[str, str, float]] = []
    session.listen(lambda e: e["type"] == "feed" and transitions.append(
        (e["feed"]["id"], e["feed"]["state"], time.monotonic())))

    video = session.feeds["room.video"]
    camera.running.clear()
    stalled = await receive_until(trainee, lambda m: m.get("type") == "feed"
                                  and m["feed"]["state"] == "stalled", timeout=5)
    assert stalled["feed"]["id"] == "room.video"
    (_, _, at), = [t for t in transitions if t[1] == "stalled"]
    assert video.last_frame_at is not None and at - video.last_frame_at <= 2.0
    assert publisher.connectionState == "connected"

    camera.running.set()
    await receive_until(trainee, lambda m: m.get("type") == "feed"
                        and m["feed"]["id"] == "room.video" and m["feed"]["state"] == "live")

    # Three seconds without a single audio packet (far longer than DTX's 400 ms):
    # the microphone is not reported as stalled, and nothing flaps.
    tone.running.clear()
    await asyncio.sleep(3.0)
    tone.running.set()
    await asyncio.sleep(0.5)
    assert [t for t in transitions if t[0] == "room.audio"] == []
    assert session.feeds["room.audio"].state == "live"
