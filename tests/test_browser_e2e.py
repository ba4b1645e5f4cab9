"""The real pages in real Chromium against the real server (loopback only).

An expert goes live from broadcast.html with Chromium's synthetic camera and
microphone; a trainee watches on watch.html. Media is checked where a person
would see it: decoded frames in the trainee's browser (getStats) and pixels of
the main video (canvas), not server counters.

Set SCRUBIN_SCREENSHOTS=/some/dir to keep screenshots of each step.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from server.roles import Role

from .browser_helpers import (
    INBOUND_STATS_JS,
    SAMPLE_MAIN_VIDEO_JS,
    chromium_available,
    open_page,
    screenshot,
    wait_js,
    wait_until,
)
from .conftest import Server, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium"),
]

SESSION = "or1-live"
#: A display name that would be markup if a page used innerHTML.
TRAINEE_NAME = 'Dr <img src=x class="pwned"> Trainee'


async def inbound(page: Page, feed: str) -> dict[str, Any] | None:
    return await page.evaluate(INBOUND_STATS_JS, feed)


async def wait_decoding(page: Page, feed: str, timeout_s: float = 15.0) -> None:
    """Until the trainee's browser decodes frames of ``feed`` steadily: a first
    frame, then more on the same subscription."""
    first: dict[str, Any] = {}

    async def growing() -> str:
        stats = await inbound(page, feed)
        if not stats or stats["framesDecoded"] < 1:
            return f"{feed}: nothing decoded yet ({stats})"
        if first.get("subscription") != stats["subscription"]:
            first.update(stats)
        if stats["framesDecoded"] <= first["framesDecoded"]:
            return f"{feed}: framesDecoded stays at {stats['framesDecoded']}"
        return ""

    await wait_until(growing, timeout_s)


async def sample_main(page: Page) -> dict[str, Any]:
    sample = await page.evaluate(SAMPLE_MAIN_VIDEO_JS)
    assert sample is not None, "main video has no size"
    return sample


@pytest.mark.timeout(60)
async def test_expert_goes_live_and_trainee_sees_and_hears_it(
        live_server: Server, browser: Browser) -> None:
    base = live_server.base_url
    expert_token = live_server.token(Role.EXPERT, SESSION, name="Dr Expert")
    trainee_token = live_server.token(Role.TRAINEE, SESSION, name=TRAINEE_NAME)

    # -- the expert picks devices and goes live -------------------------------
    _, expert, expert_log = await open_page(browser, f"{base}/broadcast.html#token={expert_token}",
                                            "expert")
    assert "token" not in expert.url, "the token must leave the address bar"
    await wait_js(expert, "() => window.scrubin && window.scrubin.client.state === 'open'")
    # The synthetic camera goes to the first camera slot, the microphone to narration.
    await wait_js(expert, "() => scrubin.slotState('room') === 'preview'"
                          " && scrubin.slotState('narration') === 'preview'")
    assert await expert.evaluate("() => scrubin.slotState('endoscope')") == "off"
    await expert.click("#go-live")
    await wait_js(expert, "() => scrubin.slotState('room') === 'live'"
                          " && scrubin.slotState('narration') === 'live'")
    session = live_server.session(SESSION)
    await wait_for(lambda: "" if {"room.video", "narration.audio"} <= set(session.feeds)
                   else f"feeds: {sorted(session.feeds)}")
    await screenshot(expert, "broadcast-live-1280")

    # -- a trainee watches ------------------------------------------------------
    _, trainee, trainee_log = await open_page(browser, f"{base}/watch.html#token={trainee_token}",
                                              "trainee")
    assert "token" not in trainee.url
    await wait_js(trainee, "() => window.scrubin && scrubin.mainFeedId() === 'room.video'")
    await wait_decoding(trainee, "room.video")
    await wait_js(trainee, "() => scrubin.overlayText() === ''")

    first = await sample_main(trainee)
    assert first["width"] >= 320 and first["height"] >= 180, first
    assert first["nonBlack"] > 0.2, f"main video looks black: {first}"
    assert first["std"] > 8, f"main video looks blank (flat): {first}"

    async def moving() -> str:
        second = await sample_main(trainee)
        return "" if second["fingerprint"] != first["fingerprint"] else "main video is frozen"

    await wait_until(moving, timeout_s=5)

    # The narration microphone reaches the trainee's audio element.
    await wait_js(trainee, "() => scrubin.audioElements().length === 1"
                           " && scrubin.audioElements()[0].srcObject"
                           " && scrubin.audioElements()[0].srcObject.getAudioTracks().length === 1")
    await wait_for_packets(trainee, "narration.audio")
    await screenshot(trainee, "watch-live-1280")
    # Browsers may refuse sound until a click: then the page offers one.
    if await trainee.locator("#enable-audio").is_visible():
        await trainee.click("#enable-audio")
    await wait_js(trainee, "() => scrubin.audioElements().every((a) => !a.muted && !a.paused)")
    assert await trainee.locator("#audio-toggle").inner_text() == "Sound on"
    await trainee.click("#audio-toggle")
    assert await trainee.evaluate("() => scrubin.audioElements().every((a) => a.muted)")
    await trainee.click("#audio-toggle")

    # -- the expert sees the trainee; the name is text, never markup ------------
    await wait_js(expert, "() => document.querySelector('#viewer-count').textContent === '1'")
    roster = await expert.locator("#roster").inner_text()
    assert TRAINEE_NAME in roster, roster
    assert await expert.locator("#roster img, .pwned").count() == 0

    # -- a second camera: thumbnail, click to switch ------------------------------
    await expert.select_option("[data-slot=endoscope] .camera-select", index=1)
    await wait_js(expert, "() => scrubin.slotState('endoscope') === 'preview'")
    await expert.click("#go-live")
    await wait_js(expert, "() => scrubin.slotState('endoscope') === 'live'")
    await wait_js(trainee, "() => scrubin.thumbnails().includes('endoscope.video')")
    await trainee.click("[data-feed='endoscope.video']")
    await wait_js(trainee, "() => scrubin.mainFeedId() === 'endoscope.video'")
    await wait_decoding(trainee, "endoscope.video")
    await wait_js(trainee, "() => scrubin.overlayText() === ''")
    assert await trainee.evaluate("() => scrubin.thumbnails()") == ["room.video"]
    await screenshot(trainee, "watch-two-cameras-1280")
    await trainee.set_viewport_size({"width": 1024, "height": 768})
    await screenshot(trainee, "watch-two-cameras-1024")
    await expert.set_viewport_size({"width": 1024, "height": 768})
    await screenshot(expert, "broadcast-live-1024")
    await trainee.set_viewport_size({"width": 768, "height": 1024})
    await screenshot(trainee, "watch-two-cameras-768-portrait")
    await trainee.set_viewport_size({"width": 1024, "height": 768})
    await trainee.click("[data-feed='room.video']")
    await wait_js(trainee, "() => scrubin.mainFeedId() === 'room.video'")

    # -- the expert's signalling drops: Feeds go down, then resume by themselves --
    subscription_before = (await inbound(trainee, "room.video") or {}).get("subscription")
    await expert.evaluate("() => scrubin.client._ws.close()")
    await wait_js(trainee, "() => scrubin.overlayText().startsWith('Waiting for camera')",
                  timeout_s=10)
    await screenshot(trainee, "watch-waiting-1024")
    await wait_js(expert, "() => scrubin.client.state === 'open'"
                          " && scrubin.slotState('room') === 'live'", timeout_s=15)
    await wait_js(trainee, "() => scrubin.overlayText() === ''", timeout_s=15)
    await wait_decoding(trainee, "room.video")
    after = await inbound(trainee, "room.video")
    assert after is not None and after["subscription"] == subscription_before, \
        "the trainee must keep its Subscription across the publisher's reconnect"

    # -- the expert ends the session -----------------------------------------------
    await expert.click("#end-session")
    await expert.click("#end-confirm")
    await wait_js(expert, "() => !document.querySelector('#ended').hidden")
    await wait_js(trainee, "() => !document.querySelector('#ended').hidden")
    assert "ended" in (await trainee.locator("#ended-title").inner_text()).lower()
    assert session.state == "ended"
    await screenshot(trainee, "watch-ended-1024")

    errors = expert_log.errors + trainee_log.errors
    assert not errors, "\n".join(errors)


async def wait_for_packets(page: Page, feed: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    stats: dict[str, Any] | None = None
    while asyncio.get_running_loop().time() < deadline:
        stats = await inbound(page, feed)
        if stats and stats["packetsReceived"] > 10:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{feed}: no packets received: {stats}")


@pytest.mark.timeout(60)
async def test_trainee_cannot_go_live(live_server: Server, browser: Browser) -> None:
    base = live_server.base_url
    trainee_token = live_server.token(Role.TRAINEE, SESSION, name="Trainee")

    _, watch, watch_log = await open_page(browser, f"{base}/watch.html#token={trainee_token}",
                                          "watch")
    await wait_js(watch, "() => window.scrubin && scrubin.client.state === 'open'")
    await wait_js(watch, "() => scrubin.overlayText().startsWith('No camera is live')")
    assert await watch.locator("#go-live, .camera-select").count() == 0
    await screenshot(watch, "watch-empty-1280")

    # Even a hand-made publish from the trainee's page is refused, and said so.
    code = await watch.evaluate("""async () => {
        const canvas = document.createElement('canvas');
        canvas.width = 320; canvas.height = 180;
        canvas.getContext('2d').fillRect(0, 0, 320, 180);
        const track = canvas.captureStream(5).getVideoTracks()[0];
        try {
            await scrubin.client.publish('room', [track]);
            return 'published';
        } catch (err) {
            return err.code;
        } finally {
            track.stop();
        }
    }""")
    assert code == "wrong_role"
    await wait_js(watch, "() => !document.querySelector('#banner').hidden")
    assert "may not publish" in await watch.locator("#banner").inner_text()
    assert not live_server.session(SESSION).feeds
    assert not live_server.session(SESSION).ingests

    # The broadcast page, opened with a trainee link, offers watching instead.
    _, broadcast, broadcast_log = await open_page(
        browser, f"{base}/broadcast.html#token={trainee_token}", "broadcast-as-trainee",
        width=1024, height=768)
    await wait_js(broadcast, "() => !document.querySelector('#role-notice').hidden")
    assert not await broadcast.locator("#go-live").is_visible()
    assert await broadcast.locator("#slot-grid .slot-card").count() == 0
    await screenshot(broadcast, "broadcast-as-trainee-1024")

    errors = watch_log.errors + broadcast_log.errors
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(60)
async def test_trainee_page_recovers_by_itself(live_server: Server, browser: Browser) -> None:
    """Socket drop, a dead viewer connection, camera stopped and started again:
    the trainee never reloads."""
    base = live_server.base_url
    session = live_server.session(SESSION)
    expert_token = live_server.token(Role.EXPERT, SESSION, name="Dr Expert")
    trainee_token = live_server.token(Role.TRAINEE, SESSION, name="Trainee")
    _, expert, expert_log = await open_page(browser, f"{base}/broadcast.html#token={expert_token}",
                                            "expert")
    await wait_js(expert, "() => window.scrubin && scrubin.slotState('room') === 'preview'")
    await expert.click("#go-live")
    await wait_js(expert, "() => scrubin.slotState('room') === 'live'")
    _, trainee, trainee_log = await open_page(browser, f"{base}/watch.html#token={trainee_token}",
                                              "trainee")
    await wait_js(trainee, "() => window.scrubin && scrubin.overlayText() === ''")
    await wait_decoding(trainee, "room.video")

    # The trainee's signalling socket drops: the server closes its Subscriptions;
    # the page reconnects and subscribes again.
    old = (await inbound(trainee, "room.video") or {}).get("subscription")
    await trainee.evaluate("() => scrubin.client._ws.close()")
    await wait_js(trainee, "(old) => { const s = scrubin.client.subscriptions.get('room.video');"
                           " return s && s.id !== old && s.state === 'connected'; }", arg=old)
    await wait_decoding(trainee, "room.video")

    # The server drops the viewer's peer connection without a word: the page
    # notices the silence and subscribes again.
    old = (await inbound(trainee, "room.video") or {}).get("subscription")
    assert old in session.subscriptions
    await session.subscriptions[old].close()
    await wait_js(trainee, "(old) => scrubin.client.subscriptions.get('room.video')?.id !== old",
                  arg=old, timeout_s=10)
    await wait_decoding(trainee, "room.video")
    await wait_js(trainee, "() => scrubin.overlayText() === ''")

    # The expert stops the room camera: its Feed closes for the trainee …
    await expert.click("[data-slot=room] .slot-stop")
    await wait_js(trainee, "() => scrubin.mainFeedId() === null"
                           " && scrubin.overlayText().startsWith('No camera is live')")
    await wait_for(lambda: "" if "room.video" not in session.feeds else "room.video still open")
    # … and starts it again: the trainee's page picks the new Feed up.
    await expert.click("#go-live")
    await wait_js(trainee, "() => scrubin.mainFeedId() === 'room.video'"
                           " && scrubin.overlayText() === ''")
    await wait_decoding(trainee, "room.video")

    errors = expert_log.errors + trainee_log.errors
    assert not errors, "\n".join(errors)
