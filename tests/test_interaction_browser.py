"""Live interaction in real Chromium: the expert draws on the live Feed and the
trainee sees it at the same place on the picture, a trainee's question reaches
the expert's queue (as text), steps, sterile focus, and the trainee microphone
heard on the expert's page.

Two browser contexts (two profiles) on one real server over loopback. Where
things are drawn is checked on the trainee's overlay canvas pixels, computed
from the video's own size and element box (not from the page's code).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiortc.mediastreams import VideoStreamTrack
from playwright.async_api import Browser, Page

from server.interaction import MIC_SLOT
from server.roles import Role

from .browser_helpers import (
    chromium_available,
    open_page,
    screenshot,
    wait_js,
    wait_settled,
    wait_until,
)
from .conftest import Server, wait_for, whip_publish
from .test_browser_e2e import wait_decoding

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium"),
]

SESSION = "or1-live"
HOSTILE = '<img src=x class="pwned" onerror="window.__pwned=1">Why <b>clip</b> twice?'

#: The picture's rectangle (letterboxing excluded) of a video, in viewport pixels.
PICTURE_JS = """
(selector) => {
  const v = document.querySelector(selector);
  const r = v.getBoundingClientRect();
  const s = Math.min(r.width / v.videoWidth, r.height / v.videoHeight);
  const w = v.videoWidth * s, h = v.videoHeight * s;
  return {left: r.left + (r.width - w) / 2, top: r.top + (r.height - h) / 2, width: w, height: h,
          videoWidth: v.videoWidth, videoHeight: v.videoHeight};
}
"""

#: The most opaque pixel of the trainee's overlay within 5 px of a picture point.
OVERLAY_PIXEL_JS = """
([nx, ny]) => {
  const v = document.querySelector('#main-video');
  const canvas = document.querySelector('#main-telestration');
  const r = v.getBoundingClientRect(), cb = canvas.getBoundingClientRect();
  const s = Math.min(r.width / v.videoWidth, r.height / v.videoHeight);
  const w = v.videoWidth * s, h = v.videoHeight * s;
  const x = r.left + (r.width - w) / 2 + nx * w - cb.left;
  const y = r.top + (r.height - h) / 2 + ny * h - cb.top;
  const k = canvas.width / cb.width, span = 5;
  const data = canvas.getContext('2d').getImageData(Math.round((x - span) * k),
      Math.round((y - span) * k), Math.round(2 * span * k), Math.round(2 * span * k)).data;
  let best = [0, 0, 0, 0];
  for (let i = 0; i < data.length; i += 4) if (data[i + 3] > best[3]) best = data.slice(i, i + 4);
  return Array.from(best);
}
"""

#: Inbound audio of the trainee microphone on the expert's page.
MIC_STATS_JS = f"""
async () => {{
  const sub = window.scrubin.client.subscriptions.get('{MIC_SLOT}.audio');
  if (!sub || !sub.pc) return null;
  let out = null;
  (await sub.pc.getStats()).forEach((r) => {{
    if (r.type === 'inbound-rtp' && r.kind === 'audio') {{
      out = {{packets: r.packetsReceived || 0, samples: r.totalSamplesReceived || 0}};
    }}
  }});
  return out;
}}
"""


async def drag(page: Page, box: dict[str, Any], start: tuple[float, float],
               end: tuple[float, float]) -> None:
    """Drag from one picture point to another (normalised coordinates)."""
    viewport = page.viewport_size or {"width": 0, "height": 0}

    def at(p: tuple[float, float]) -> tuple[float, float]:
        x, y = box["left"] + p[0] * box["width"], box["top"] + p[1] * box["height"]
        assert 0 < x < viewport["width"] and 0 < y < viewport["height"], (p, box, viewport)
        return x, y

    await page.mouse.move(*at(start))
    await page.mouse.down()
    mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
    await page.mouse.move(*at(mid), steps=4)
    await page.mouse.move(*at(end), steps=4)
    await page.mouse.up()


async def mic_stats(page: Page, ok: Any, timeout_s: float = 10.0) -> dict[str, int]:
    """Poll the expert's inbound microphone stats until ``ok(stats)``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    stats = None
    while asyncio.get_running_loop().time() < deadline:
        stats = await page.evaluate(MIC_STATS_JS)
        if stats and ok(stats):
            return dict(stats)
        await asyncio.sleep(0.2)
    raise AssertionError(f"trainee microphone not received on the expert page: {stats}")


async def overlay_pixel(page: Page, point: tuple[float, float]) -> list[int]:
    return list(await page.evaluate(OVERLAY_PIXEL_JS, list(point)))


def red(pixel: list[int]) -> bool:
    r, g, b, a = pixel
    return a > 150 and r > 180 and g < 110 and b < 110


async def check_circle_on_trainee(trainee: Page, circle: dict[str, Any]) -> None:
    """The ring passes through its edge point and the opposite one; its centre
    and a point outside stay clear, in the trainee's own picture geometry
    (once layout has settled and the overlay has been redrawn for it)."""
    (cx, cy), (ex, ey) = circle["shape"]["points"]

    async def drawn() -> str:
        picture = await trainee.evaluate(PICTURE_JS, "#main-video")
        aspect = picture["width"] / picture["height"]
        radius_x = ex - cx  # the edge point is to the right of the centre
        above = (cx, cy - radius_x * aspect)  # same pixel radius, upwards
        for point in ((ex, ey), (2 * cx - ex, cy), above):
            pixel = await overlay_pixel(trainee, point)
            if not red(pixel):
                return f"no red ring at {point}: {pixel} (picture {picture})"
        for point in ((cx, cy), (cx + radius_x * 1.5, cy)):
            pixel = await overlay_pixel(trainee, point)
            if pixel[3] != 0:
                return f"overlay not clear at {point}: {pixel}"
        return ""

    await wait_settled(trainee, "#main-video")
    await wait_until(drawn, timeout_s=5)


@pytest.mark.timeout(90)
async def test_drawing_question_step_and_microphone_between_expert_and_trainee(
        live_server: Server, browser: Browser) -> None:
    base = live_server.base_url
    session = live_server.session(SESSION)
    expert_token = live_server.token(Role.EXPERT, SESSION, name="Dr Expert")
    trainee_token = live_server.token(Role.TRAINEE, SESSION, name="Tess <b>Trainee</b>",
                                      participant_id="tr-1")

    _, expert, expert_log = await open_page(browser, f"{base}/broadcast.html#token={expert_token}",
                                            "expert")
    await wait_js(expert, "() => window.scrubin && scrubin.slotState('room') === 'preview'")
    await expert.click("#go-live")
    await wait_js(expert, "() => scrubin.slotState('room') === 'live'")

    # A portrait-ish trainee window: its picture is letterboxed differently.
    _, trainee, trainee_log = await open_page(browser, f"{base}/watch.html#token={trainee_token}",
                                              "trainee", width=760, height=1000)
    await wait_js(trainee, "() => window.scrubin && scrubin.mainFeedId() === 'room.video'")
    await wait_decoding(trainee, "room.video")
    await wait_js(trainee, "() => scrubin.interaction().synced")

    # -- the expert circles something on the live picture ---------------------
    await expert.click("[data-slot=room] .slot-draw")
    await expert.click("#draw-toolbar [data-tool=circle]")
    await wait_js(expert, "() => document.querySelector('[data-slot=room]')"
                          ".classList.contains('drawing')")
    await wait_settled(expert, "[data-slot=room] .preview-video")  # the card grew
    box = await expert.evaluate(PICTURE_JS, "[data-slot=room] .preview-video")
    assert box["width"] / box["height"] == pytest.approx(
        box["videoWidth"] / box["videoHeight"], rel=0.01)
    await drag(expert, box, (0.5, 0.5), (0.7, 0.5))

    await wait_js(trainee, "() => scrubin.interaction().annotations.size === 1", timeout_s=5)
    annotation = await trainee.evaluate(
        "() => [...scrubin.interaction().annotations.values()][0].annotation")
    shape = annotation["shape"]
    assert shape["kind"] == "circle" and shape["color"] == "#ff3b30"
    (cx, cy), (ex, ey) = shape["points"]
    assert (cx, cy) == (pytest.approx(0.5, abs=0.01), pytest.approx(0.5, abs=0.01))
    assert (ex, ey) == (pytest.approx(0.7, abs=0.01), pytest.approx(0.5, abs=0.01))
    assert annotation["feed"] == "room.video" and annotation["by"]["name"] == "Dr Expert"
    assert annotation["t"] > 0 and "client_time" in annotation["media"]

    # Drawn on the trainee's overlay within 150 ms of the expert letting go.
    await wait_js(trainee, "(id) => scrubin.drawnAt(id) !== null", annotation["id"], timeout_s=5)
    drawn = await trainee.evaluate("(id) => scrubin.drawnAt(id)", annotation["id"])
    await wait_js(expert, "(id) => scrubin.sentAt.has(id)", annotation["id"])
    sent = await expert.evaluate("(id) => scrubin.sentAt.get(id)", annotation["id"])
    assert 0 <= drawn - sent < 150, f"drawing reached the trainee after {drawn - sent:.0f} ms"

    await check_circle_on_trainee(trainee, annotation)
    await screenshot(trainee, "interaction-circle-760")
    # Another window shape: the circle follows the picture.
    await trainee.set_viewport_size({"width": 1280, "height": 600})
    await check_circle_on_trainee(trainee, annotation)
    await screenshot(trainee, "interaction-circle-1280x600")
    await screenshot(expert, "interaction-expert-drawing")
    await expert.click("#draw-done")

    # -- a step -----------------------------------------------------------------
    await expert.click("#step-list button:has-text('Critical view of safety')")
    await wait_js(trainee, "() => document.querySelector('#step-now').textContent"
                           ".startsWith('Critical view of safety')")
    assert await trainee.locator("#step-list [data-current=true]").inner_text() \
        == "Critical view of safety"
    await expert.locator("body").press("n")  # the next step, by keyboard
    await wait_js(trainee, "() => document.querySelector('#step-now').textContent"
                           ".startsWith('Clip and divide cystic artery')")

    # -- a question, hostile text shown as text --------------------------------
    await trainee.fill("#ask-input", HOSTILE)
    await trainee.click("#ask-form button[type=submit]")
    await wait_js(expert, "() => document.querySelectorAll('#question-queue .question').length"
                          " === 1")
    text = await expert.locator("#question-queue .question-text").inner_text()
    assert text == HOSTILE
    assert await expert.locator("#question-queue img, #question-queue b, .pwned").count() == 0
    assert await expert.evaluate("() => window.__pwned") is None
    assert "Tess <b>Trainee</b>" in await expert.locator("#question-queue").inner_text()
    await expert.click("#question-queue .answer")
    await wait_js(trainee, "() => document.querySelector('#question-list .question')"
                           "?.dataset.status === 'answered'")

    # -- chat, both ways, as text -----------------------------------------------
    await trainee.fill("#chat-input", HOSTILE)
    await trainee.press("#chat-input", "Enter")
    await wait_js(expert, "() => document.querySelectorAll('#chat-log .chat-item').length === 1")
    assert await expert.locator("#chat-log .chat-text").inner_text() == HOSTILE
    assert await expert.locator("#chat-log img, #chat-log b").count() == 0

    # -- sterile focus pauses the trainee's chat and hand ---------------------------
    await expert.click("#sterile-toggle")
    await wait_js(trainee, "() => !document.querySelector('#sterile-strip').hidden"
                           " && document.querySelector('#chat-input').disabled"
                           " && document.querySelector('#hand-toggle').disabled")
    await expert.click("#sterile-toggle")
    await wait_js(trainee, "() => document.querySelector('#sterile-strip').hidden"
                           " && !document.querySelector('#chat-input').disabled")

    # -- the trainee raises a hand; the expert gives it the microphone -----------------
    await trainee.click("#hand-toggle")
    await wait_js(expert, "() => document.querySelectorAll('#hand-list .hand-item').length === 1")
    await expert.click("#hand-list .give-mic")
    await wait_js(trainee, "() => scrubin.micTrack() !== null"
                           f" && scrubin.client.publications.get('{MIC_SLOT}')?.state === 'live'")
    await wait_for(lambda: "" if f"{MIC_SLOT}.audio" in session.feeds else "no microphone feed")
    await wait_js(expert, "() => scrubin.micAudio() !== null")
    first = await mic_stats(expert, lambda s: s["packets"] > 5 and s["samples"] > 0)
    second = await mic_stats(expert, lambda s: s["packets"] > first["packets"] + 25
                             and s["samples"] > first["samples"] + 24000)
    assert second["samples"] > first["samples"] > 0, (first, second)
    assert await expert.locator("#mic-status").inner_text() == "Tess <b>Trainee</b> has the " \
                                                               "microphone."

    # Take it back: the trainee's Feed closes and its page stops the microphone.
    await expert.click("#mic-take-back")
    await wait_js(trainee, "() => scrubin.micTrack() === null"
                           f" && !scrubin.client.publications.has('{MIC_SLOT}')")
    await wait_for(lambda: "" if f"{MIC_SLOT}.audio" not in session.feeds else "mic feed open")
    await wait_js(expert, "() => scrubin.micAudio() === null")
    await screenshot(expert, "interaction-expert-panels")
    await screenshot(trainee, "interaction-trainee-panels")

    errors = expert_log.errors + trainee_log.errors
    assert not errors, "\n".join(errors)


ARROW_HEAD_JS = """
() => [...scrubin.interaction().annotations.values()].map((a) => a.annotation)
  .find((a) => a.feed === 'endoscope.video')
"""


@pytest.mark.timeout(60)
async def test_expert_draws_on_a_feed_from_an_external_encoder(
        live_server: Server, browser: Browser, http: aiohttp.ClientSession) -> None:
    """An endoscope tower publishing over WHIP (a 4:3 picture, letterboxed in
    the 16:9 previews): the broadcast page shows it, and the drawing lands on
    the trainee's picture where the expert put it."""
    base = live_server.base_url
    publisher, _ = await whip_publish(http, live_server, "endoscope", [VideoStreamTrack()])
    try:
        expert_token = live_server.token(Role.EXPERT, SESSION, name="Dr Expert")
        trainee_token = live_server.token(Role.TRAINEE, SESSION, name="Trainee")
        _, expert, expert_log = await open_page(
            browser, f"{base}/broadcast.html#token={expert_token}", "expert")
        await wait_js(expert, "() => window.scrubin"
                              " && scrubin.slotState('endoscope') === 'remote'")
        _, trainee, trainee_log = await open_page(
            browser, f"{base}/watch.html#token={trainee_token}", "trainee", width=1000,
            height=700)
        await wait_js(trainee, "() => window.scrubin"
                               " && scrubin.mainFeedId() === 'endoscope.video'")
        await wait_decoding(trainee, "endoscope.video")

        await expert.click("[data-slot=endoscope] .slot-draw")
        await expert.click("#draw-toolbar [data-tool=arrow]")
        await expert.click("#draw-toolbar [data-color='#ff3b30']")
        await wait_js(expert, "() => document.querySelector('[data-slot=endoscope] video')"
                              ".videoWidth > 0")
        await wait_settled(expert, "[data-slot=endoscope] .preview-video")
        box = await expert.evaluate(PICTURE_JS, "[data-slot=endoscope] .preview-video")
        assert (box["videoWidth"], box["videoHeight"]) == (640, 480)
        await drag(expert, box, (0.2, 0.8), (0.6, 0.3))

        await wait_js(trainee, "() => scrubin.interaction().annotations.size === 1")
        arrow = await trainee.evaluate(ARROW_HEAD_JS)
        assert arrow["shape"]["kind"] == "arrow"
        (x0, y0), (x1, y1) = arrow["shape"]["points"]
        assert (x0, y0, x1, y1) == pytest.approx((0.2, 0.8, 0.6, 0.3), abs=0.01)
        await wait_js(trainee, "(id) => scrubin.drawnAt(id) !== null", arrow["id"])
        mid = ((x0 + x1) / 2, (y0 + y1) / 2)
        for point in ((x0, y0), mid, (x1, y1)):
            assert red(await overlay_pixel(trainee, point)), point
        assert (await overlay_pixel(trainee, (0.8, 0.8)))[3] == 0
        geometry = await trainee.evaluate("""async () => {
          const t = await import('/js/telestration.js');
          const pts = Array.from({length: 1200}, (_, i) => [i / 1199, 0.5]);
          const thin = t.thin(pts, 500);
          return {contain: t.fitRect(1000, 500, 640, 480, 'contain'),
                  cover: t.fitRect(1000, 500, 640, 480, 'cover'),
                  none: t.fitRect(1000, 500, 640, 480, 'none'),
                  fill: t.fitRect(1000, 500, 640, 480, 'fill'),
                  empty: t.fitRect(1000, 500, 0, 0, 'contain'),
                  thin: [thin.length, thin[0], thin[499]]};
        }""")
        assert geometry["contain"] == pytest.approx(
            {"x": 1000 / 2 - 500 * 4 / 3 / 2, "y": 0, "width": 500 * 4 / 3, "height": 500})
        assert geometry["cover"] == pytest.approx(
            {"x": 0, "y": -(750 - 500) / 2, "width": 1000, "height": 750})
        assert geometry["none"] == {"x": 180, "y": 10, "width": 640, "height": 480}
        assert geometry["fill"] == {"x": 0, "y": 0, "width": 1000, "height": 500}
        assert geometry["empty"] is None
        assert geometry["thin"] == [500, [0, 0.5], [1, 0.5]]
        await screenshot(expert, "interaction-expert-encoder-feed")

        # An admin moderates from the broadcast page: no cameras, the queue.
        admin_token = live_server.token(Role.ADMIN, SESSION, name="Admin")
        _, admin, admin_log = await open_page(
            browser, f"{base}/broadcast.html#token={admin_token}", "admin", width=1024,
            height=768)
        await wait_js(admin, "() => window.scrubin && scrubin.interaction().synced")
        assert await admin.locator("#slots").is_hidden()
        assert await admin.locator("#step-form").is_hidden()
        await trainee.fill("#ask-input", "Which port?")
        await trainee.click("#ask-form button[type=submit]")
        await wait_js(admin, "() => document.querySelectorAll('#question-queue .question')"
                             ".length === 1")
        await admin.click("#question-queue .dismiss")
        await wait_js(trainee, "() => document.querySelector('#question-list .question')"
                               "?.dataset.status === 'dismissed'")
        await admin.click("#sterile-toggle")
        await wait_js(trainee, "() => !document.querySelector('#sterile-strip').hidden")
        await screenshot(admin, "interaction-admin-1024")
        expert_log.errors.extend(admin_log.errors)
        await screenshot(trainee, "interaction-trainee-encoder-feed")
        errors = expert_log.errors + trainee_log.errors
        assert not errors, "\n".join(errors)
    finally:
        await publisher.close()
