"""npm whip-whep 1.2.0 (medooze) in Debian's Chromium, publishing and playing VP8 and H.264
against the server (issue 17). The page is served from http://localhost through Playwright
and talks to the server on 127.0.0.1 across origins, as a hospital's own page would.

whip-whep closes its peer connection before its DELETE: those DELETEs must answer 200.
Chromium captures a framecoded clip (--use-file-for-fake-video-capture), so what it
publishes is read back frame by frame; what it plays is read from its <video> element.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

from server.framecode import JS_READER
from server.roles import Role

from .browser_helpers import CHROMIUM, CHROMIUM_ARGS, PageLog
from .conftest import Server, make_config, start_server, wait_for
from .interop.media import write_y4m
from .test_interop import published_counters

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).parent.parent
WHIP_WHEP = ROOT / "node_modules" / "whip-whep"
ORIGIN = "http://localhost"
SESSION = "or1-live"

PAGE = """<!doctype html><html><body><video autoplay muted playsinline></video>
<script type="module">
// whip-whep ignores its DELETE's status: note it for the test.
window.deletes = [];
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  const response = await realFetch(url, init);
  if (init && init.method === "DELETE") window.deletes.push(response.status);
  return response;
};
import { WHIPClient } from "./whip.js";
import { WHEPClient } from "./whep.js";

window.publish = async (url, token, mime) => {
  const stream = await navigator.mediaDevices.getUserMedia(
    {video: {width: 320, height: 240, frameRate: 30}, audio: true});
  const pc = new RTCPeerConnection({bundlePolicy: "max-bundle"});
  for (const track of stream.getTracks()) {
    const transceiver = pc.addTransceiver(track, {direction: "sendonly"});
    if (track.kind !== "video") continue;
    const all = RTCRtpSender.getCapabilities("video").codecs;
    const wanted = all.filter((c) => c.mimeType.toLowerCase() === mime.toLowerCase() &&
      (mime !== "video/H264" || /packetization-mode=1/.test(c.sdpFmtpLine || "")));
    if (!wanted.length) throw new Error("this Chromium cannot send " + mime);
    transceiver.setCodecPreferences(
      [...wanted, ...all.filter((c) => c.mimeType.toLowerCase() === "video/rtx")]);
  }
  window.whip = new WHIPClient();
  await window.whip.publish(pc, url, token);
  window.publisherPc = pc;
};

window.play = async (url, token, mime) => {
  const pc = new RTCPeerConnection({bundlePolicy: "max-bundle"});
  pc.addTransceiver("audio", {direction: "recvonly"});
  const video = pc.addTransceiver("video", {direction: "recvonly"});
  const all = RTCRtpReceiver.getCapabilities("video").codecs;
  video.setCodecPreferences(all.filter((c) => c.mimeType.toLowerCase() === mime.toLowerCase()
                                       || c.mimeType.toLowerCase() === "video/rtx"));
  pc.ontrack = (event) => {
    const element = document.querySelector("video");
    element.srcObject = event.streams[0] || new MediaStream([event.track]);
  };
  window.whep = new WHEPClient();
  await window.whep.view(pc, url, token);
  window.playerPc = pc;
};

window.inbound = async () => {
  if (!window.playerPc) return null;
  const out = {};
  (await window.playerPc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp") out[r.kind] = {frames: r.framesDecoded || 0,
                                                 packets: r.packetsReceived || 0};
  });
  return out;
};

window.counters = [];
window.sampleCounter = () => {
  const video = document.querySelector("video");
  if (!video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(video, 0, 0);
  const value = framecodeRead(ctx.getImageData(0, 0, canvas.width, canvas.height));
  if (value !== null) window.counters.push(value);
  return value;
};
</script>
<script>
""" + JS_READER + """
</script></body></html>"""


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_y4m(tmp_path_factory.mktemp("chromium") / "camera.y4m", 10 * 30)


@pytest.fixture
async def node() -> AsyncIterator[Server]:
    srv, runner = await start_server(make_config(server={"cors_origins": [ORIGIN]}))
    try:
        yield srv
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def chromium_with(clip: Path) -> AsyncIterator[Browser]:
    assert (WHIP_WHEP / "whip.js").is_file(), "npm ci (.ci/install --test) installs whip-whep"
    args = [a for a in CHROMIUM_ARGS if not a.startswith("--disable-features=")]
    args += [f"--use-file-for-fake-video-capture={clip}",
             # Pages on localhost may fetch 127.0.0.1 (Local Network Access).
             "--disable-features=WebRtcHideLocalIpsWithMdns,LocalNetworkAccessChecks",
             "--autoplay-policy=no-user-gesture-required"]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield browser
        finally:
            await browser.close()


async def open_client_page(browser: Browser, name: str) -> tuple[Page, PageLog]:
    """The page at http://localhost/interop/, whip-whep served from node_modules."""
    context = await browser.new_context(permissions=["camera", "microphone"])
    page = await context.new_page()
    log = PageLog(name)
    log.attach(page)
    async def serve(route: Route) -> None:
        path = route.request.url.split("/interop/", 1)[1]
        if path in ("whip.js", "whep.js"):
            await route.fulfill(path=str(WHIP_WHEP / path),
                                content_type="text/javascript")
        else:
            await route.fulfill(body=PAGE, content_type="text/html")

    await page.route(f"{ORIGIN}/interop/**", serve)
    await page.goto(f"{ORIGIN}/interop/page.html")
    return page, log


@pytest.mark.parametrize("mime", ["video/VP8", "video/H264"])
async def test_whip_whep_in_chromium_publishes_and_plays(
        mime: str, node: Server, clip: Path, http: aiohttp.ClientSession) -> None:
    async with chromium_with(clip) as browser:
        publisher, publisher_log = await open_client_page(browser, "whip")
        await publisher.evaluate("([u, t, m]) => window.publish(u, t, m)",
                                 [f"{node.base_url}/whip/{SESSION}/room",
                                  node.token(Role.EXPERT), mime])
        await wait_for(lambda: "" if (f := node.session().feeds.get("room.video")) is not None
                       and f.frames_received >= 10 else "no frames from Chromium", timeout=20)
        assert node.session().feeds["room.video"].codec.mimeType == mime

        # What Chromium published decodes in order.
        readable = await published_counters(http, node)
        assert sorted(readable) == readable or _wrapped(readable), readable

        # whip-whep plays the slot (camera + the slot's sound) over WHEP per slot.
        player, player_log = await open_client_page(browser, "whep")
        await player.evaluate("([u, t, m]) => window.play(u, t, m)",
                              [f"{node.base_url}/whep/{SESSION}/room",
                               node.token(Role.TRAINEE), mime])
        stats: dict[str, Any] = {}

        async def playing() -> str:
            stats.update(await player.evaluate("() => window.inbound()") or {})
            video, audio = stats.get("video", {}), stats.get("audio", {})
            if video.get("frames", 0) >= 30 and audio.get("packets", 0) > 20:
                return ""
            return f"Chromium plays {stats}"

        await poll(playing, timeout=20)
        for _ in range(100):
            await player.evaluate("() => window.sampleCounter()")
            counters = await player.evaluate("() => window.counters")
            if len(counters) >= 10:
                break
            await asyncio.sleep(0.05)
        assert len(counters) >= 10, f"{counters} read from Chromium's <video>"
        assert sorted(counters) == counters or _wrapped(counters), counters

        # whip-whep closes its peer connection, then DELETEs: both answered 200.
        await player.evaluate("() => window.whep.stop()")
        await publisher.evaluate("() => window.whip.stop()")
        assert await player.evaluate("() => window.deletes") == [200]
        assert await publisher.evaluate("() => window.deletes") == [200]
        # Trickle PATCHes are refused with 405 (RFC 9725 allows it); nothing else failed.
        errors = [e for e in publisher_log.errors + player_log.errors
                  if "status of 405" not in e]
        assert not errors, errors


async def poll(check: Callable[[], Awaitable[str]], timeout: float) -> None:
    """Like conftest.wait_for, for checks that must await (page evaluations)."""
    deadline = asyncio.get_running_loop().time() + timeout
    reason = await check()
    while reason and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        reason = await check()
    assert not reason, f"timed out after {timeout}s: {reason}"


def _wrapped(counters: list[int]) -> bool:
    """Chromium loops the capture file: counters may restart once."""
    drops = sum(1 for a, b in itertools.pairwise(counters) if b < a)
    return drops <= 1
