"""Every page says where the participant stands: revoked, ended, not started yet
(with the start time), reconnecting; nothing stays busy or clickable after the
end; the watch and broadcast pages work on a phone.

Real pages in Debian's Chromium against a real server; geometry from the pages'
own layout and pixels from their screenshots.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from playwright.async_api import Browser, Page

from server.http.common import ACCEPTING, WEBSOCKETS
from server.publish.synthetic import SyntheticTheatreCamera, SyntheticTone
from server.roles import Role

from .admin_helpers import admin_token, api, schedule
from .browser_helpers import (
    PageLog,
    chromium_available,
    open_page,
    screenshot,
    wait_js,
    wait_settled,
)
from .conftest import Server, whip_publish
from .test_browser_e2e import wait_decoding

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium"),
]

#: What is left busy or clickable outside the state panel: rendered text that
#: ends in "…" (Connecting…, Starting your microphone…), spinners, and controls
#: neither disabled nor inside an inert part of the page.
LEFT_BUSY_JS = """
() => {
  const panel = document.querySelector('#ended');
  const shown = (el) => el.getClientRects().length > 0
    && getComputedStyle(el).visibility !== 'hidden';
  const out = [];
  for (const el of document.querySelectorAll('body *')) {
    if (panel && panel.contains(el) || !shown(el)) continue;
    const own = [...el.childNodes].filter((n) => n.nodeType === 3)
      .map((n) => n.textContent).join('').trim();
    if (own.endsWith('…')) out.push(`busy text: ${own}`);
    if (el.classList.contains('spinner')) out.push('spinner');
    if (el.matches('button, input, select, textarea') && !el.disabled && !el.closest('[inert]')) {
      out.push(`live control: ${el.id || el.className || el.tagName} "${el.textContent.trim()}"`);
    }
  }
  return out;
}
"""

PANEL_JS = """
() => {
  const panel = document.querySelector('#ended');
  return panel.hidden ? null : {kind: panel.dataset.kind,
    title: document.querySelector('#ended-title').textContent,
    text: document.querySelector('#ended-reason').textContent};
}
"""


async def panel(page: Page, kind: str) -> dict[str, str]:
    await wait_js(page, "(kind) => { const p = document.querySelector('#ended');"
                        " return !p.hidden && p.dataset.kind === kind; }", kind)
    state: dict[str, str] = await page.evaluate(PANEL_JS)
    return state


async def nothing_left_busy(page: Page) -> None:
    left = await page.evaluate(LEFT_BUSY_JS)
    assert left == [], (left, await page.inner_text("#banner"))
    assert await page.evaluate("() => document.querySelector('#banner')?.hidden ?? true"), (
        "no banner beside the panel: " + await page.inner_text("#banner"))


async def publish_camera(http: aiohttp.ClientSession, server: Server,
                         peers: list[RTCPeerConnection], session: str = "or1-live") -> None:
    pc, _ = await whip_publish(http, server, "room", [
        SyntheticTheatreCamera(640, 360, 15, label="room"), SyntheticTone()], session=session)
    peers.append(pc)


async def watching(server: Server, browser: Browser, http: aiohttp.ClientSession,
                   peers: list[RTCPeerConnection], *, width: int = 1280,
                   height: int = 800) -> tuple[Page, PageLog]:
    """A camera published and a trainee's watch page showing it."""
    await publish_camera(http, server, peers)
    _, page, log = await open_page(
        browser, f"{server.base_url}/watch.html#token={server.token(Role.TRAINEE, name='Tess')}",
        "trainee", width=width, height=height)
    await wait_js(page, "() => window.scrubin && scrubin.mainFeedId() === 'room.video'")
    await wait_decoding(page, "room.video")
    await wait_js(page, "() => scrubin.overlayText() === ''")
    return page, log


@pytest.mark.timeout(90)
async def test_a_revoked_trainee_is_told_so_and_nothing_keeps_spinning(
        live_server: Server, browser: Browser, http: aiohttp.ClientSession,
        peers: list[RTCPeerConnection]) -> None:
    trainee, log = await watching(live_server, browser, http, peers)

    # Every link of the Session withdrawn by an admin while the trainee watches.
    await api(http, live_server, "DELETE", "/api/admin/sessions/or1-live/invites",
              admin_token(live_server), expect=200)
    state = await panel(trainee, "revoked")
    assert state["title"] == "Your access was withdrawn"
    assert "ask them for a new one" in state["text"]
    assert await trainee.inner_text("#conn-state") == "Access withdrawn"
    await nothing_left_busy(trainee)
    # It stays so: no reconnecting with a token that cannot work.
    assert await trainee.evaluate("() => scrubin.client.state") == "failed"
    await screenshot(trainee, "state-revoked-watch")
    assert not [e for e in log.errors if "uncaught" in e], log.errors


@pytest.mark.timeout(90)
async def test_an_early_trainee_sees_the_start_time_and_joins_when_it_starts(
        live_server: Server, browser: Browser, http: aiohttp.ClientSession) -> None:
    admin = admin_token(live_server)
    starts_at = time.time() + 1800
    await schedule(http, live_server, admin, "or1-pm", starts_at=starts_at)
    base = live_server.base_url
    _, trainee, _ = await open_page(
        browser, f"{base}/watch.html#token={live_server.token(Role.TRAINEE, 'or1-pm')}",
        "trainee")
    state = await panel(trainee, "not_started")
    # The time alone on the same day; after midnight (a run near it) with the date.
    expected = await trainee.evaluate("""(t) => {
        const at = new Date(t * 1000);
        const time = at.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
        if (at.toDateString() === new Date().toDateString()) return time;
        const day = at.toLocaleDateString([], {weekday: 'short', day: 'numeric', month: 'short'});
        return `${day}, ${time}`;
    }""", starts_at)
    assert state["title"] == f"The session starts at {expected}"
    assert "in 30 min" in state["text"] or "in 29 min" in state["text"], state
    assert "joins by itself" in state["text"]
    assert await trainee.inner_text("#conn-state") == "Not started yet"
    await nothing_left_busy(trainee)
    await screenshot(trainee, "state-not-started-watch")

    # The reviewer's library says the same before there is anything to review.
    _, library, _ = await open_page(
        browser, f"{base}/library.html#token={live_server.token(Role.REVIEWER, 'or1-pm')}",
        "reviewer")
    await wait_js(library, "() => document.querySelector('#library-empty').textContent"
                           ".startsWith('This session starts at')")
    assert expected in await library.inner_text("#library-empty")

    # Started by the admin: the page joins by itself.
    await api(http, live_server, "POST", "/api/admin/sessions/or1-pm/start", admin, expect=200)
    await wait_js(trainee, "() => scrubin.client.state === 'open'"
                           " && document.querySelector('#ended').hidden", timeout_s=20)
    assert await trainee.evaluate("() => document.querySelector('main').inert") is False
    assert await trainee.inner_text("#conn-state") == "Connected"


@pytest.mark.timeout(120)
async def test_after_the_session_ends_no_page_looks_busy(
        live_server: Server, browser: Browser, http: aiohttp.ClientSession) -> None:
    base = live_server.base_url
    expert_token = live_server.token(Role.EXPERT, name="Dr Expert")
    _, expert, _ = await open_page(browser, f"{base}/broadcast.html#token={expert_token}",
                                   "expert")
    await wait_js(expert, "() => window.scrubin && scrubin.slotState('room') === 'preview'")
    await expert.click("#go-live")
    await wait_js(expert, "() => scrubin.slotState('room') === 'live'")
    _, trainee, _ = await open_page(
        browser, f"{base}/watch.html#token="
        f"{live_server.token(Role.TRAINEE, name='Tess', participant_id='tr-1')}", "trainee")
    await wait_js(trainee, "() => window.scrubin && scrubin.interaction().synced")
    # The trainee has the microphone when the Session ends.
    ws = await http.ws_connect(f"{base}/ws")
    await ws.send_json({"type": "hello", "token": expert_token, "id": "h"})
    assert (await ws.receive_json())["type"] == "welcome"
    await ws.send_json({"type": "mic_grant", "participant": "tr-1", "id": "g"})
    await wait_js(trainee, "() => !document.querySelector('#mic-strip').hidden")
    await wait_js(trainee, "() => scrubin.micTrack() !== null")

    await api(http, live_server, "POST", "/api/sessions/or1-live/end", expert_token,
              expect=200)
    for page in (trainee, expert):
        state = await panel(page, "ended")
        assert state["title"] == "The session has ended"
        assert state["text"] == "Ended by Dr Expert."
        assert await page.inner_text("#conn-state") == "Session ended"
        await nothing_left_busy(page)
    assert await trainee.evaluate("() => scrubin.micTrack()") is None
    await screenshot(trainee, "state-ended-watch")
    await screenshot(expert, "state-ended-broadcast")
    await ws.close()


@pytest.mark.timeout(120)
async def test_a_lost_connection_says_reconnecting_and_comes_back(
        live_server: Server, browser: Browser, http: aiohttp.ClientSession,
        peers: list[RTCPeerConnection]) -> None:
    trainee, _ = await watching(live_server, browser, http, peers)

    # The Node refuses joins and drops every socket: the page keeps trying.
    app = live_server.app
    app[ACCEPTING]["joins"] = False
    for socket in list(app[WEBSOCKETS]):
        await socket.close(code=1012, message=b"restarting")
    await wait_js(trainee, "() => !document.querySelector('#conn-strip').hidden")
    assert (await trainee.inner_text("#conn-strip")).startswith("Connection lost. Reconnecting…")
    assert await trainee.inner_text("#conn-state") == "Reconnecting…"
    assert await trainee.evaluate("() => scrubin.overlayText()") == (
        "Connection lost. Reconnecting…")
    for control in ("#chat-input", "#ask-input", "#ask-form button", "#hand-toggle"):
        assert await trainee.is_disabled(control), control
    assert await trainee.evaluate("() => document.querySelector('#ended').hidden")

    app[ACCEPTING]["joins"] = True
    await wait_js(trainee, "() => document.querySelector('#conn-strip').hidden"
                           " && scrubin.client.state === 'open'", timeout_s=20)
    await wait_js(trainee, "() => scrubin.overlayText() === ''", timeout_s=20)
    for control in ("#chat-input", "#ask-input", "#hand-toggle"):
        assert not await trainee.is_disabled(control), control


@pytest.mark.timeout(90)
async def test_library_and_join_use_the_same_words(
        live_server: Server, browser: Browser, http: aiohttp.ClientSession) -> None:
    base = live_server.base_url
    admin = admin_token(live_server)
    _, created = await api(http, live_server, "POST", "/api/admin/sessions/or1-live/invites",
                           admin, {"role": "trainee", "name": "Tess"}, expect=201)
    invite = created["token"]
    reviewer = live_server.token(Role.REVIEWER)

    # The library while the network fails: it says so and tries again.
    context, library, _ = await open_page(browser, "about:blank", "reviewer")
    failures = {"left": 2}

    async def flaky(route: Any) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            await route.abort("connectionrefused")
        else:
            await route.continue_()

    await library.route("**/api/sessions/*/recordings", flaky)
    await library.goto(f"{base}/library.html#token={reviewer}")
    await wait_js(library, "() => !document.querySelector('#conn-strip').hidden")
    assert (await library.inner_text("#conn-strip")).startswith("Cannot reach the server")
    await wait_js(library, "() => document.querySelector('#conn-strip').hidden"
                           " && !document.querySelector('#library-empty').hidden", timeout_s=20)
    assert failures["left"] == 0

    # Every link withdrawn: the library and the invite say it as the live pages do.
    await api(http, live_server, "DELETE", "/api/admin/sessions/or1-live/invites", admin,
              expect=200)
    await library.reload()
    state = await panel(library, "revoked")
    assert state["title"] == "Your access was withdrawn"
    _, join, _ = await open_page(browser, f"{base}/join.html#token={invite}", "invitee")
    await wait_js(join, "() => document.querySelector('#join-status').dataset.kind === 'revoked'")
    assert await join.inner_text("#status-title") == "Your access was withdrawn"
    await context.close()


# -- phones ----------------------------------------------------------------------

#: Where each visible control and the main picture are, and what covers the picture.
LAYOUT_JS = """
(pictureSelector) => {
  const box = (el) => { const r = el.getBoundingClientRect();
    return {x: r.x, y: r.y, width: r.width, height: r.height}; };
  const controls = [...document.querySelectorAll('button, select, input, .status')]
    .filter((el) => el.getClientRects().length && getComputedStyle(el).visibility !== 'hidden')
    .map((el) => ({name: el.id || el.className || el.tagName, ...box(el)}));
  const video = document.querySelector(pictureSelector);
  const r = video.getBoundingClientRect();
  // The picture inside the element (object-fit: contain).
  const s = Math.min(r.width / video.videoWidth, r.height / video.videoHeight);
  const w = video.videoWidth * s, h = video.videoHeight * s;
  const picture = {x: r.x + (r.width - w) / 2, y: r.y + (r.height - h) / 2, width: w, height: h};
  const covered = [];
  for (const [fx, fy] of [[0.5, 0.5], [0.3, 0.6], [0.7, 0.6], [0.5, 0.8], [0.2, 0.9], [0.8, 0.9]]) {
    const hit = document.elementFromPoint(picture.x + fx * w, picture.y + fy * h);
    if (hit !== video && !(hit && hit.classList.contains('telestration'))) {
      covered.push(`${fx},${fy}: ${hit ? hit.id || hit.className || hit.tagName : 'nothing'}`);
    }
  }
  return {width: innerWidth, height: innerHeight, scrollWidth: document.documentElement.scrollWidth,
          header: box(document.querySelector('.topbar')), controls, picture, covered};
}
"""


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


async def check_phone_layout(page: Page, picture_selector: str, name: str) -> dict[str, Any]:
    layout: dict[str, Any] = await page.evaluate(LAYOUT_JS, picture_selector)
    assert layout["scrollWidth"] <= layout["width"], f"{name}: the page scrolls sideways"
    assert layout["header"]["height"] <= 112, f"{name}: header {layout['header']}"
    for control in layout["controls"]:
        assert control["x"] >= 0 and control["x"] + control["width"] <= layout["width"] + 0.5, (
            f"{name}: {control} overflows the screen")
    assert layout["covered"] == [], f"{name}: the picture is covered: {layout['covered']}"
    # The screenshot shows the camera's picture there: textured, not a flat
    # colour or a button (pixels, not only the layout's word for it).
    shot = cv2.imdecode(np.frombuffer(await page.screenshot(), np.uint8), cv2.IMREAD_COLOR)
    assert shot.shape[1] == layout["width"], shot.shape
    p = layout["picture"]
    crop = shot[int(p["y"]) + 4:int(p["y"] + p["height"]) - 4,
                int(p["x"]) + 4:int(p["x"] + p["width"]) - 4]
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    assert gray.size > 0 and float(gray.std()) > 12, f"{name}: no picture in {p}"
    assert float((gray > 16).mean()) > 0.5, f"{name}: picture mostly dark in {p}"
    layout["shot"] = shot
    return layout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [(390, 844), (360, 640)], ids=["390x844", "360x640"])
async def test_watch_and_broadcast_pages_work_on_a_phone(
        live_server: Server, browser: Browser, http: aiohttp.ClientSession,
        peers: list[RTCPeerConnection], size: tuple[int, int]) -> None:
    width, height = size
    base = live_server.base_url
    trainee, _ = await watching(live_server, browser, http, peers, width=width, height=height)
    # Sound needs a tap on a phone: the prompt is shown, below the picture.
    await wait_js(trainee, "() => !document.querySelector('#enable-audio').hidden")
    await wait_settled(trainee, "#main-video")
    layout = await check_phone_layout(trainee, "#main-video", f"watch {width}x{height}")
    prompt = next(c for c in layout["controls"] if c["name"] == "enable-audio")
    assert not overlaps(prompt, layout["picture"]), (prompt, layout["picture"])
    assert prompt["y"] + prompt["height"] <= height, "the prompt is on the first screen"
    # ... and it is really drawn there, in the accent green.
    shot = layout["shot"]
    button = shot[int(prompt["y"]) + 6:int(prompt["y"] + prompt["height"]) - 6,
                  int(prompt["x"]) + 6:int(prompt["x"]) + 40]
    b, g, r = (float(v) for v in button.reshape(-1, 3).mean(axis=0))
    assert g > 150 and g > r + 60 and g > b + 40, (b, g, r)
    await screenshot(trainee, f"phone-watch-{width}x{height}")
    await trainee.click("#enable-audio")
    await wait_js(trainee, "() => document.querySelector('#enable-audio').hidden")

    # The expert on a phone, with a trainee holding the microphone (the longest line).
    expert_token = live_server.token(Role.EXPERT, name="Dr Expert")
    _, expert, _ = await open_page(browser, f"{base}/broadcast.html#token={expert_token}",
                                   "expert", width=width, height=height)
    # The slot card showing a camera picture (the page's own camera or an encoder's).
    slot = await wait_js(expert, "() => window.scrubin && [...scrubin.slots.values()].find("
                                 "(v) => v.video.videoWidth > 0)?.slot")
    listener = await http.ws_connect(f"{base}/ws")
    await listener.send_json({"type": "hello", "id": "h", "token": live_server.token(
        Role.TRAINEE, name="Dr Tessellate Traineeworthy-Longname", participant_id="tr-9")})
    assert (await listener.receive_json())["type"] == "welcome"
    await expert.evaluate("() => scrubin.client.grantMic('tr-9')")
    await wait_js(expert, "() => !document.querySelector('#mic-take-back').hidden")
    await expert.locator("#mic-take-back").scroll_into_view_if_needed()
    take_back = await expert.evaluate(
        "() => { const r = document.querySelector('#mic-take-back').getBoundingClientRect();"
        " return [r.left, r.right, innerWidth]; }")
    assert 0 <= take_back[0] and take_back[1] <= take_back[2], take_back
    # The slot may be below the fold (the camera goes to the first slot no
    # encoder holds): bring its picture into view, as the expert would.
    await expert.locator(f"[data-slot={slot}] .preview-video").scroll_into_view_if_needed()
    await wait_settled(expert, f"[data-slot={slot}] .preview-video")
    await check_phone_layout(expert, f"[data-slot={slot}] .preview-video",
                             f"broadcast {width}x{height}")
    await screenshot(expert, f"phone-broadcast-{width}x{height}")
    await listener.close()
