"""Adaptive quality with real peers (docs/architecture.md, "Layers"): a camera's
full and low layers, one outgoing stream per viewer, moved between layers at
keyframes from its own feedback; a weak link emulated by a seeded UDP relay."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server import framecode
from server.publish.synthetic import SyntheticTheatreCamera
from server.roles import Role

from .browser_helpers import chromium_available, open_page
from .conftest import Server, client_pc, offer_sdp, wait_for, whep_subscribe
from .netem import Link, UdpRelay, server_candidate

pytestmark = pytest.mark.slow

SESSION = "or1-live"
FULL = (960, 540)
LOW = (320, 180)
FPS = 30


class Scaled(MediaStreamTrack):
    """A lower layer of a camera: smaller, and every ``keep``-th frame."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack, size: tuple[int, int], keep: int) -> None:
        super().__init__()
        self.source = source
        self.size = size
        self.keep = keep
        self.count = 0

    async def recv(self) -> Any:
        while True:
            frame = await self.source.recv()
            self.count += 1
            if (self.count - 1) % self.keep == 0:
                small = frame.reformat(width=self.size[0], height=self.size[1])
                small.pts, small.time_base = frame.pts, frame.time_base
                return small


async def publish_layers(http: aiohttp.ClientSession, server: Server, slot: str = "room",
                         full: tuple[int, int] = FULL, fps: int = FPS,
                         session: str = SESSION,
                         ) -> tuple[RTCPeerConnection, SyntheticTheatreCamera]:
    """A publisher that sends a camera as two layers, as the broadcast page does
    (same source, two video sections: full then low)."""
    camera = SyntheticTheatreCamera(full[0], full[1], fps, label=slot)
    relay = MediaRelay()
    pc = client_pc()
    vp8 = [c for c in RTCRtpSender.getCapabilities("video").codecs
           if c.mimeType in ("video/VP8", "video/rtx")]
    for track in (relay.subscribe(camera, buffered=False),
                  Scaled(relay.subscribe(camera, buffered=False), LOW, keep=2)):
        pc.addTransceiver(track, direction="sendonly").setCodecPreferences(vp8)
    token = server.token(Role.EXPERT, session)
    async with http.post(f"{server.base_url}/whip/{session}/{slot}", data=await offer_sdp(pc),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        assert response.status == 201, body
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc, camera


class Watcher:
    """Decodes a viewer's track: frame sizes (which layer) and counters, with times."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.frames: list[tuple[float, tuple[int, int], int | None]] = []
        self.task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                counter = framecode.read(frame.to_ndarray(format="bgr24"))
                self.frames.append((time.monotonic(), (frame.width, frame.height), counter))
        except MediaStreamError:
            pass

    def since(self, t: float) -> list[tuple[float, tuple[int, int], int | None]]:
        return [f for f in self.frames if f[0] >= t]

    def longest_gap(self, t0: float, t1: float) -> float:
        times = [t0] + [f[0] for f in self.frames if t0 <= f[0] <= t1] + [t1]
        return max(b - a for a, b in itertools.pairwise(times))

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


WHEP_JS = """
async ({feed, token}) => {
  const pc = new RTCPeerConnection();
  window.viewer = {pc, frames: []};
  pc.addTransceiver('video', {direction: 'recvonly'});
  const video = document.createElement('video');
  video.muted = true; video.autoplay = true; video.playsInline = true;
  document.body.append(video);
  pc.ontrack = (e) => { video.srcObject = new MediaStream([e.track]); };
  const each = (now, meta) => {
    window.viewer.frames.push([performance.now(), meta.width, meta.height]);
    video.requestVideoFrameCallback(each);
  };
  video.requestVideoFrameCallback(each);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') resolve();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && resolve();
  });
  // Without our candidates the server can reach us only through the relay (it
  // learns the relay's address from our checks), as behind a real weak link.
  const offer = pc.localDescription.sdp.split('\\r\\n')
    .filter((line) => !line.startsWith('a=candidate:')).join('\\r\\n');
  const response = await fetch(`/whep/or1-live/${feed}`, {method: 'POST',
    headers: {'Authorization': `Bearer ${token}`, 'Content-Type': 'application/sdp'},
    body: offer});
  return {status: response.status, sdp: await response.text(),
          location: response.headers.get('Location')};
}
"""

#: Frames the page presented since ``t`` (page ms): [[t, width, height], ...].
FRAMES_JS = "(t) => window.viewer.frames.filter((f) => f[0] >= t)"


def longest_gap_ms(frames: list[list[float]], t0: float, t1: float) -> float:
    times = [t0] + [f[0] for f in frames if t0 <= f[0] <= t1] + [t1]
    return max(b - a for a, b in itertools.pairwise(times))


async def test_pinned_layers_switch_at_keyframes_on_one_continuous_stream(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]) -> None:
    publisher, _ = await publish_layers(http, server)
    peers.append(publisher)
    session = server.session()
    await wait_for(lambda: "" if "room.video" in session.feeds
                   and session.feeds["room.video"].low is not None
                   and session.feeds["room.video"].low.frames_received > 10
                   else "layers starting", timeout=15)
    pc, _, track = await whep_subscribe(http, server, "room.video", "video")
    peers.append(pc)
    watcher = Watcher(await asyncio.wait_for(track, 10))
    (sub,) = session.subscriptions.values()
    await wait_for(lambda: "" if len(watcher.frames) > 20 else "no picture")
    started = time.monotonic()
    for layer, size in (("low", LOW), ("full", FULL), ("low", LOW)):
        sub.set_preference(layer)  # type: ignore[arg-type]
        await wait_for(lambda layer=layer: "" if sub.layer == layer else "switching")
        at = time.monotonic()
        await wait_for(lambda at=at: "" if len(watcher.since(at)) >= 10 else "frames")
        assert {s for _, s, _ in watcher.since(at + 0.2)} == {size}
    await watcher.stop()
    # One stream throughout: decodable frames only, in order, never a gap of a second.
    counters = [c for _, _, c in watcher.frames if c is not None]
    assert counters == sorted(counters)
    assert watcher.longest_gap(started, time.monotonic()) < 1.0
    assert sub.layer_switches == 3
    # The outgoing stream kept one SSRC: the viewer has one inbound video stream.
    stats = await pc.getStats()
    assert sum(1 for r in stats.values() if r.type == "inbound-rtp") == 1
    # Each switch asked the target layer for a keyframe through its policy.
    full, low = session.feeds["room.video"], session.feeds["room.video"].low
    assert low is not None and low.keyframes.stats.asked >= 2 and full.keyframes.stats.asked >= 1


@pytest.mark.browser
@pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium")
async def test_a_weak_link_moves_chromium_to_the_low_layer_and_back(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        browser: Any) -> None:
    publisher, _camera = await publish_layers(http, server)
    peers.append(publisher)
    session = server.session()
    await wait_for(lambda: "" if "room.video" in session.feeds
                   and session.feeds["room.video"].low is not None
                   and session.feeds["room.video"].low.frames_received > 10
                   else "layers starting", timeout=15)
    full = session.feeds["room.video"]
    # Give the publisher's encoder time to reach a bitrate the weak link cannot carry.
    await wait_for(lambda: "" if full.bitrate_bps > 650_000 else f"{full.bitrate_bps:.0f}",
                   timeout=30)

    good_pc, _, good_track = await whep_subscribe(http, server, "room.video", "video")
    peers.append(good_pc)
    good = Watcher(await asyncio.wait_for(good_track, 10))
    good_id = next(iter(session.subscriptions))

    _, page, log = await open_page(browser, f"{server.base_url}/index.html", "weak")
    offer = await page.evaluate(WHEP_JS, {"feed": "room.video",
                                          "token": server.token(Role.TRAINEE)})
    assert offer["status"] == 201, offer
    weak_sub = session.subscriptions[offer["location"].rsplit("/", 1)[-1]]
    link = Link(rate_bps=500_000, loss=0.01, delay_s=0.02, queue_bytes=30_000, seed=3)
    relay = await UdpRelay(server_candidate(offer["sdp"]), link).start()
    try:
        await page.evaluate("(sdp) => window.viewer.pc.setRemoteDescription("
                            "{type: 'answer', sdp})", relay.point_answer_here(offer["sdp"]))
        await wait_for(lambda: "" if weak_sub.layer == "low" else
                       f"still {weak_sub.layer}: loss {weak_sub.loss:.2f}, REMB "
                       f"{weak_sub.remb_bps}", timeout=25)
        moved = await page.evaluate("performance.now()")
        # Once the low layer's picture is on screen, it keeps coming, smoothly.
        first_low = await page.wait_for_function(
            "(t) => window.viewer.frames.find((f) => f[0] >= t && f[1] === 320)?.[0]",
            arg=moved, polling=100, timeout=5000)
        on_low = await first_low.json_value()
        await asyncio.sleep(4)
        now = await page.evaluate("performance.now()")
        frames = await page.evaluate(FRAMES_JS, on_low)
        assert {(w, h) for _, w, h in frames} == {LOW}, frames[:5]
        assert longest_gap_ms(frames, on_low, now) < 1000
        assert len(frames) >= 3 * 12  # ~15 fps
        # The viewer on a good link kept the full layer all along.
        assert session.subscriptions[good_id].layer == "full"
        assert {s for _, s, _ in good.frames[-10:]} == {FULL}

        # The link recovers: back to the full layer, without reconnecting.
        link.rate_bps, link.loss, link.delay_s = None, 0.0, 0.0
        await wait_for(lambda: "" if weak_sub.layer == "full" else "still low", timeout=40)
        back = await page.evaluate("performance.now()")
        await asyncio.sleep(2)
        frames = await page.evaluate(FRAMES_JS, back + 500)
        assert frames and {(w, h) for _, w, h in frames} == {FULL}
        everything = await page.evaluate(FRAMES_JS, on_low)
        assert longest_gap_ms(everything, on_low, await page.evaluate("performance.now()")) < 1000
        assert weak_sub.layer_switches >= 2
        assert not log.errors, log.errors
    finally:
        relay.close()
        await good.stop()


LAYER_HEIGHTS_JS = """
async () => {
  const out = {};
  for (const [id, sub] of window.scrubin.client.subscriptions) {
    if (sub.kind !== 'video' || !sub.pc) continue;
    let height = 0, bytes = 0;
    (await sub.pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        height = r.frameHeight || 0; bytes = r.bytesReceived || 0;
      }
    });
    out[id] = {height, bytes, layer: sub.layer, want: sub.wantLayer, paused: sub.paused};
  }
  return out;
}
"""


@pytest.mark.browser
@pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium")
async def test_the_watch_page_takes_one_full_and_three_low_layers_of_four_cameras(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        browser: Any) -> None:
    from server.theatre import Theatre

    slots = ("room", "endoscope", "overhead", "microscope")
    server.registry.add_theatre(Theatre("or4", "Theatre 4", slots))
    server.registry.create_session("four-cams", "or4", "Four cameras")
    for slot in slots:
        pc, _ = await publish_layers(http, server, slot, full=(640, 360), fps=15,
                                     session="four-cams")
        peers.append(pc)
    session = server.session("four-cams")
    await wait_for(lambda: "" if all(
        f"{s}.video" in session.feeds and session.feeds[f"{s}.video"].low is not None
        and session.feeds[f"{s}.video"].low.frames_received > 5 for s in slots)
        else "cameras starting", timeout=20)
    token = server.token(Role.TRAINEE, "four-cams", name="Trainee")
    _, page, log = await open_page(browser, f"{server.base_url}/watch.html#token={token}",
                                   "trainee")
    await page.wait_for_function(
        "() => window.scrubin && scrubin.mainFeedId() === 'room.video'"
        " && scrubin.thumbnails().length === 3", polling=100, timeout=20_000)

    def heights_ok(layers: dict[str, Any]) -> str:
        if len(layers) != 4:
            return f"{len(layers)} subscriptions"
        want = {f"{s}.video": 360 if s == "room" else 180 for s in slots}
        got = {k: v["height"] for k, v in layers.items()}
        return "" if got == want else f"frame heights {got}"

    reason = "never looked"
    for _ in range(100):
        layers = await page.evaluate(LAYER_HEIGHTS_JS)
        reason = heights_ok(layers)
        if not reason:
            break
        await asyncio.sleep(0.2)
    assert not reason, reason
    # The server agrees: one viewer of each camera, the main one on the full layer.
    subs = {s.feed_id: s for s in session.subscriptions.values() if s.kind == "video"}
    assert {k: v.layer for k, v in subs.items()} == {
        f"{s}.video": "full" if s == "room" else "low" for s in slots}
    # What this trainee receives for all four cameras (the benchmark measures it).
    first = await page.evaluate(LAYER_HEIGHTS_JS)
    await asyncio.sleep(4)
    second = await page.evaluate(LAYER_HEIGHTS_JS)
    kbps = {k: (second[k]["bytes"] - first[k]["bytes"]) * 8 / 4 / 1000 for k in second}
    low_total = sum(v for k, v in kbps.items() if k != "room.video")
    # Each thumbnail at about its 250 kbit/s ceiling (a keyframe may land in the window).
    assert low_total < 3 * 350, kbps
    # Switching the main camera swaps the layers.
    await page.click("[data-feed='endoscope.video']")
    await page.wait_for_function(
        "async () => { const s = window.scrubin.client.subscriptions;"
        " return s.get('endoscope.video').layer === 'full'"
        " && s.get('room.video').layer === 'low'; }",
        polling=100, timeout=15_000)
    assert not log.errors, log.errors


@pytest.mark.browser
@pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium")
async def test_the_broadcast_page_publishes_a_low_layer_beside_each_camera(
        server: Server, browser: Any) -> None:
    token = server.token(Role.EXPERT, name="Dr Grey")
    _, page, log = await open_page(browser, f"{server.base_url}/broadcast.html#token={token}",
                                   "expert")
    await page.wait_for_function("() => window.scrubin && scrubin.slotState('room') === "
                                 "'preview'", polling=100, timeout=15_000)
    await page.click("#go-live")
    session = server.session()
    await wait_for(lambda: "" if "room.video" in session.feeds
                   and session.feeds["room.video"].low is not None
                   and session.feeds["room.video"].low.frames_received > 20
                   else "no low layer yet", timeout=20)
    full, low = session.feeds["room.video"], session.feeds["room.video"].low
    assert low is not None and low.codec.mimeType == full.codec.mimeType
    # The low layer is the camera scaled to 180 lines.
    key = next(f for f in reversed(low.cached_frames()) if f.keyframe)
    width = int.from_bytes(key.data[6:8], "little") & 0x3FFF  # VP8 keyframe header
    height = int.from_bytes(key.data[8:10], "little") & 0x3FFF
    assert height == 180 and width in (240, 320), (width, height)
    described = session.describe_feed(full)
    assert described["layers"] == ["full", "low"]
    await wait_for(lambda: "" if 0 < low.bitrate_bps <= 300_000 else f"{low.bitrate_bps:.0f}",
                   timeout=15)
    assert not log.errors, log.errors


@pytest.mark.parametrize("codec", ["video/VP8", "video/H264"])
async def test_the_server_makes_a_low_layer_once_for_an_encoder_that_sends_one(
        http: aiohttp.ClientSession, peers: list[RTCPeerConnection], codec: str) -> None:
    from .conftest import make_config, start_server

    server, runner = await start_server(make_config(media={"server_low_layer": True}))
    try:
        camera = SyntheticTheatreCamera(640, 360, 15, label="room")
        pc = client_pc()
        peers.append(pc)
        pc.addTransceiver(camera, direction="sendonly").setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == codec])
        async with http.post(f"{server.base_url}/whip/{SESSION}/room",
                             data=await offer_sdp(pc),
                             headers={"Authorization": f"Bearer {server.token(Role.EXPERT)}",
                                      "Content-Type": "application/sdp"}) as response:
            body = await response.text()
            assert response.status == 201, body
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        session = server.session()
        await wait_for(lambda: "" if "room.video" in session.feeds
                       and session.feeds["room.video"].low is not None
                       and session.feeds["room.video"].low.frames_received > 10
                       else "no low layer yet", timeout=20)
        low = session.feeds["room.video"].low
        assert low is not None and low.codec.mimeType == codec  # same codec as the camera
        # Two viewers pinned to the low layer: made once, whatever the number of viewers.
        watchers = []
        for _ in range(2):
            viewer, _, track = await whep_subscribe(http, server, "room.video", "video")
            peers.append(viewer)
            watchers.append(Watcher(await asyncio.wait_for(track, 10)))
        for sub in session.subscriptions.values():
            sub.set_preference("low")
        def low_counters(watcher: Watcher) -> list[int]:
            return [c for _, size, c in watcher.frames if size == LOW and c is not None]

        for watcher in watchers:
            # The camera's picture, readable once the encoder's rate control settled.
            await wait_for(lambda w=watcher: "" if len(low_counters(w)) >= 10
                           else f"{len(w.frames)} frames", timeout=20)
            counters = low_counters(watcher)
            assert counters == sorted(counters)
            await watcher.stop()
        maker = session._makers["room.video"]
        assert maker.frames_out > 0 and maker.frames_in >= maker.frames_out
        # About 15 fps out of the camera's 15, 250 kbit/s at most (once it settled).
        await wait_for(lambda: "" if 0 < low.bitrate_bps < 300_000 else f"{low.bitrate_bps}",
                       timeout=10)
        # The recorder keeps only the full layer: cameras, not layers, are listed.
        assert list(session.feeds) == ["room.video"]
    finally:
        await runner.cleanup()
