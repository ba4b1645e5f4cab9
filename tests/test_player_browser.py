"""The review pages and the live REC indicator in real Chromium.

Player: a Recording of two synthetic cameras (their frame counters known at
every Session-clock time) opens from the library; clicking a bookmark or a
step shows the frame of that moment (counter read from the picture with the
JS port of server/framecode.py), the expert's circle is drawn over it,
cameras switch, and playback at 2x keeps the cameras in sync.

Gaps: a Recording whose Session moved between Nodes (made by the real
recorder's hand-over and resume) has its gap hatched on the timeline where it
is, and a notice over the picture while the playhead is inside it, not the
picture from before it.

Live: the expert records from the broadcast page (consent dialog), the
trainee's page shows REC.

One clock: a step marked live shows on the trainee's page as time since the
Session started, and in the player, on the contact sheet and in the library
as time since the recording started, all from the one stamp stored.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from playwright.async_api import Page

from recorder.export import clock_label, contact_sheet
from recorder.replay import marks, player_events, read_events
from server import framecode
from server.http.review import RECORDINGS
from server.roles import Role

from .browser_helpers import chromium, chromium_available, open_page, screenshot, wait_js
from .conftest import Server, wait_for
from .recording_helpers import (
    CONSENT,
    FPS,
    build_moved_recording,
    build_recording,
    circle,
    interaction,
    mark,
)
from .test_recording_control import Client, join, publish_camera

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium"),
]

START_T = 1.0
ENDOSCOPE_FIRST = 5000

#: The frame counter of what a <video> shows (framecode.JS_READER on its pixels).
COUNTER_JS = """
(selector) => {
""" + framecode.JS_READER + """
  const video = document.querySelector(selector);
  if (!video || !video.videoWidth) return null;
  const canvas = document.createElement('canvas');
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(video, 0, 0);
  return framecodeRead(ctx.getImageData(0, 0, canvas.width, canvas.height));
}
"""

#: The most opaque overlay pixel within 4 px of a picture point, as [r, g, b, a].
OVERLAY_PIXEL_JS = """
([nx, ny]) => {
  const v = document.querySelector('#player-video');
  const canvas = document.querySelector('#player-telestration');
  const r = v.getBoundingClientRect(), cb = canvas.getBoundingClientRect();
  const s = Math.min(r.width / v.videoWidth, r.height / v.videoHeight);
  const w = v.videoWidth * s, h = v.videoHeight * s;
  const x = r.left + (r.width - w) / 2 + nx * w - cb.left;
  const y = r.top + (r.height - h) / 2 + ny * h - cb.top;
  const k = canvas.width / cb.width, span = 4;
  const data = canvas.getContext('2d').getImageData(
    Math.round((x - span) * k), Math.round((y - span) * k), Math.round(2 * span * k),
    Math.round(2 * span * k)).data;
  let best = [0, 0, 0, 0];
  for (let i = 0; i < data.length; i += 4) if (data[i + 3] > best[3]) best = data.slice(i, i + 4);
  return Array.from(best);
}
"""

SETTLED_JS = """
(t) => {
  const p = window.scrubinPlayer, v = p.mainVideo();
  const shown = p.shownTime();
  return v.readyState >= 2 && !v.seeking && shown !== null && Math.abs(shown - t) < 0.02;
}
"""


def expected_counter(t: float, first: int = 0) -> int:
    """The frame shown at Session time t: frame i covers [START_T + i/FPS, ...)."""
    return first + int((t - START_T) * FPS + 1e-6)


def h264_shows(value: int | None, t: float, gop: int = 15) -> bool:
    """The endoscope (H.264) shows the frame of ``t``. This machine's Chromium
    paints only the key frames of any H.264 file (P-frames leave the picture
    unchanged, for files from FFmpeg's CLI too), so the frame shown is the key
    frame at or before the one of ``t`` (a decoder that paints every frame
    shows it exactly)."""
    exact = expected_counter(t, ENDOSCOPE_FIRST)
    key = ENDOSCOPE_FIRST + (exact - ENDOSCOPE_FIRST) // gop * gop
    return value is not None and key <= value <= exact + 1


async def counter(page: Page, selector: str = "#player-video") -> int | None:
    value = await page.evaluate(COUNTER_JS, selector)
    return None if value is None else int(value)


async def shows(page: Page, ok: Callable[[int | None], bool], selector: str = "#player-video",
                timeout_s: float = 5.0) -> int | None:
    """Until ``selector`` paints a frame ``ok`` accepts: a seek completes before its
    decoded frame reaches the element. Returns the frame counter shown."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await counter(page, selector)
        if ok(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{selector} still shows frame {value}")
        await asyncio.sleep(0.05)


def near(expected: int, within: int = 1) -> Callable[[int | None], bool]:
    return lambda value: value is not None and abs(value - expected) <= within


async def jump(page: Page, selector: str, t: float) -> None:
    await page.click(selector)
    await wait_js(page, SETTLED_JS, t)


async def test_player_jumps_to_the_moment_with_drawings_and_cameras_in_sync(
        server: Server) -> None:
    question = interaction({"type": "question", "t": 3.1, "question": {
        "id": "q1", "text": "Why <b>clip</b> here?", "author": {"id": "t1", "name": "Trainee"},
        "t": 3.1, "votes": 2, "status": "answered", "held": False}})
    events = [mark(1.5, "Port placement"), circle(2.0, center=(0.5, 0.45), radius=0.15),
              mark(2.43, "Calot's triangle", kind="bookmark", mark_id="m2",
                   current="Port placement"),
              question, mark(4.1, "Exposure", mark_id="m3")]
    recording = await build_recording(
        server.config.recording.root, seconds=6, start_t=START_T, events=events,
        feeds=(("room.video", 0), ("endoscope.video", ENDOSCOPE_FIRST)),
        h264=("endoscope.video",))  # fragmented MP4 in the browser too
    server.app[RECORDINGS].open()
    token = server.token(Role.REVIEWER, name="Prof Review")

    async with chromium() as browser:
        context, page, log = await open_page(
            browser, f"{server.base_url}/library.html#token={token}", "library")
        await wait_js(page, "() => document.querySelectorAll('.recording-card').length === 1")
        await wait_js(page, "() => { const i = document.querySelector('.recording-img');"
                            " return i && i.complete && i.naturalWidth > 0; }")
        assert await page.text_content(".recording-title") == "Cholecystectomy"
        assert "#token=" not in page.url  # scrubbed from the address bar
        await page.click(".recording-link")
        await wait_js(page, "() => window.scrubinPlayer && window.scrubinPlayer.range()[1] > 0")
        # 0:00 is when the recording started (consent); the camera's first picture
        # came at 1 s: until then the player says so.
        assert await page.evaluate("() => window.scrubinPlayer.range()[0]") == 0.0
        await wait_js(page, "() => !document.querySelector('#player-gap').hidden")
        assert (await page.text_content("#player-gap") or "").strip() == (
            "No picture from this camera yet.")
        await page.evaluate(f"() => window.scrubinPlayer.seek({START_T})")
        await wait_js(page, "() => window.scrubinPlayer.mainVideo().readyState >= 2")
        assert recording.id in await page.evaluate("() => location.hash")
        assert await page.evaluate("() => window.scrubinPlayer.mainFeed()") == "room.video"
        assert await page.evaluate("() => window.scrubinPlayer.mainPart().file") == (
            "room.video-000.webm")
        # Question text is text.
        assert await page.evaluate(
            "() => document.querySelector('#player-questions b') === null")

        # A bookmark: the frame of that moment, and the circle over it.
        await jump(page, "button.mark-button[data-kind='bookmark']", 2.43)
        await shows(page, near(expected_counter(2.43)))
        pixel = await page.evaluate(OVERLAY_PIXEL_JS, [0.65, 0.45])
        assert pixel[3] > 150 and pixel[1] > 150 and pixel[0] < 120, pixel
        assert await page.evaluate(OVERLAY_PIXEL_JS, [0.1, 0.1]) == [0, 0, 0, 0]
        assert await page.text_content("#player-step") == "Port placement"
        await screenshot(page, "player-bookmark")

        # A step later on; then the endoscope (H.264, fragmented MP4) as the main camera.
        await jump(page, "button.mark-button[data-mark='m3']", 4.1)
        await shows(page, near(expected_counter(4.1)))
        assert await page.text_content("#player-step") == "Exposure"
        await shows(page, lambda value: h264_shows(value, 4.1), ".thumb video")
        await page.click(".thumb")
        await wait_js(page, "() => window.scrubinPlayer.mainFeed() === 'endoscope.video'")
        assert await page.evaluate("() => window.scrubinPlayer.mainPart().file") == (
            "endoscope.video-000.mp4")
        await wait_js(page, SETTLED_JS, 4.1)
        await shows(page, lambda value: h264_shows(value, 4.1))
        # The circle was drawn on the room camera: not on the endoscope.
        assert (await page.evaluate(OVERLAY_PIXEL_JS, [0.65, 0.45]))[3] == 0
        await page.click(".thumb")  # the room camera back
        await wait_js(page, "() => window.scrubinPlayer.mainFeed() === 'room.video'")
        await wait_js(page, SETTLED_JS, 4.1)

        # The timeline: a click at a marker jumps to it.
        box = await page.locator("#timeline").bounding_box()
        assert box is not None
        t0, t1 = await page.evaluate("() => window.scrubinPlayer.range()")
        x = box["x"] + (2.43 - t0) / (t1 - t0) * box["width"]
        await page.mouse.click(x + 2, box["y"] + box["height"] / 4)
        await wait_js(page, SETTLED_JS, 2.43)

        # Playing at 2x from 1.5 s: the clock and both cameras move together.
        await page.evaluate("() => window.scrubinPlayer.seek(1.5)")
        await page.select_option("#player-speed", "2")
        await page.click("#play")
        await wait_js(page, "() => window.scrubinPlayer.time() >= 3.0", timeout_s=10)
        assert await page.evaluate(
            "() => [window.scrubinPlayer.mainVideo().playbackRate,"
            " document.querySelector('.thumb video').playbackRate]") == [2, 2]
        await page.click("#play")  # pause
        t = await page.evaluate("() => window.scrubinPlayer.time()")
        assert 3.0 <= t < 6.0, t
        await wait_js(page, "() => !window.scrubinPlayer.mainVideo().seeking && "
                            "!document.querySelector('.thumb video').seeking")
        await shows(page, near(expected_counter(t), 2))
        await shows(page, lambda value: h264_shows(value, t), ".thumb video")
        assert not log.errors, log.errors
        await context.close()


#: The gap notice over the picture: its text, or null while it is hidden.
GAP_NOTICE_JS = """
() => { const g = document.querySelector('#player-gap');
        return g.hidden ? null : g.textContent.trim(); }
"""


async def test_player_draws_the_gap_of_a_session_that_moved_and_says_so_inside_it(
        server: Server) -> None:
    # node-a recorded 1.0-3.0 s, node-b 6.0-10.0 s (counter from 1000); consent at 0.5.
    after_t, first_after = 6.0, 1000
    recording = await build_moved_recording(server.config.recording.root,
                                            before=(1.0, 2.0), after=(after_t, 4.0),
                                            first_after=first_after)
    manifest = json.loads((recording.directory / "manifest.json").read_text())
    [gap] = manifest["gaps"]
    start, end = gap["start"], gap["end"]
    assert 2.8 < start < 3.2 and 5.8 < end < 6.2, gap
    server.app[RECORDINGS].open()
    token = server.token(Role.REVIEWER, name="Prof Review")
    said = f"Not recorded: {end - start:.1f} s (the Session moved to another Node)"

    async with chromium() as browser:
        context, page, log = await open_page(
            browser, f"{server.base_url}/player.html#token={token}&recording={recording.id}",
            "player")
        await wait_js(page, "() => window.scrubinPlayer && window.scrubinPlayer.range()[1] > 0"
                            " && document.querySelector('.timeline-gap')")
        t0, t1 = await page.evaluate("() => window.scrubinPlayer.range()")
        assert t0 == manifest["started_t"] and abs((t1 - t0) - manifest["duration"]) < 1e-6

        # Drawn where it is: its place and length as fractions of the timeline's
        # track (the canvas inside its 1 px border).
        assert await page.locator(".timeline-gap").count() == 1
        track = await page.locator("#timeline").bounding_box()
        span = await page.locator(".timeline-gap").bounding_box()
        assert track is not None and span is not None
        width = track["width"] - 2
        left_ratio = (span["x"] - track["x"] - 1) / width
        width_ratio = span["width"] / width
        want_left, want_width = (start - t0) / (t1 - t0), (end - start) / (t1 - t0)
        print(f"gap drawn at {left_ratio:.4f} (want {want_left:.4f}), width "
              f"{width_ratio:.4f} (want {want_width:.4f}) of {width:.0f} px")
        assert abs(left_ratio - want_left) < 0.005, (left_ratio, want_left)
        assert abs(width_ratio - want_width) < 0.005, (width_ratio, want_width)
        assert await page.get_attribute(".timeline-gap", "title") == said
        assert await page.locator("#legend-gap").is_visible()

        # Before the gap: node-a's picture, no notice.
        await page.evaluate("() => window.scrubinPlayer.seek(2.0)")
        await wait_js(page, SETTLED_JS, 2.0)
        await shows(page, near(expected_counter(2.0)))
        assert await page.evaluate(GAP_NOTICE_JS) is None

        # Into the gap (a click on its span): the notice, and no picture behind it.
        await page.click(".timeline-gap")
        await wait_js(page, "([s, e]) => { const t = window.scrubinPlayer.time();"
                            " return t > s && t < e; }", [start, end])
        assert await page.evaluate(GAP_NOTICE_JS) == said
        assert await page.evaluate("() => window.scrubinPlayer.mainPart()") is None
        # The element holds nothing to show (not node-a's last frame).
        assert await page.evaluate("() => { const v = window.scrubinPlayer.mainVideo();"
                                   " return [v.readyState, v.getAttribute('src')]; }") == [0, None]
        assert await counter(page) is None
        assert await page.get_attribute("#player-gap", "data-reason") == "origin_moved"
        await screenshot(page, "player-gap")

        # After it: node-b's picture, the notice gone.
        await page.evaluate(f"() => window.scrubinPlayer.seek({end + 0.5})")
        await wait_js(page, SETTLED_JS, end + 0.5)
        await shows(page, near(first_after + int((end + 0.5 - after_t) * FPS + 1e-6)))
        assert await page.evaluate(GAP_NOTICE_JS) is None
        assert await page.evaluate("() => window.scrubinPlayer.mainPart().node") == "node-b"

        # Playing through it: the notice comes at its start and goes at its end.
        await page.evaluate(f"() => window.scrubinPlayer.seek({start - 0.5})")
        await wait_js(page, SETTLED_JS, start - 0.5)
        await page.click("#play")
        notice_at = await wait_js(page, """(said) => {
            const p = window.scrubinPlayer, g = document.querySelector('#player-gap');
            return !g.hidden && g.textContent.trim() === said && p.time(); }""", said,
                                  timeout_s=20)
        assert start - 0.05 <= notice_at < end, (notice_at, gap)
        picture_at = await wait_js(page, """() => {
            const p = window.scrubinPlayer, part = p.mainPart();
            return document.querySelector('#player-gap').hidden && part
                && part.node === 'node-b' && p.time(); }""", timeout_s=20)
        assert end <= picture_at < t1, (picture_at, gap)
        print(f"notice shown at {notice_at:.2f} s, picture back at {picture_at:.2f} s "
              f"(gap {start:.2f}-{end:.2f})")
        await page.click("#play")  # pause
        assert not log.errors, log.errors
        await context.close()


async def test_expert_records_from_the_broadcast_page_and_trainees_see_rec(
        server: Server, http: aiohttp.ClientSession) -> None:
    base = server.base_url
    async with chromium() as browser:
        expert_ctx, expert, expert_log = await open_page(
            browser, f"{base}/broadcast.html#token={server.token(Role.EXPERT, name='Dr Grey')}",
            "expert")
        trainee_ctx, trainee, trainee_log = await open_page(
            browser, f"{base}/watch.html#token={server.token(Role.TRAINEE)}", "trainee")
        await wait_js(expert, "() => { const b = document.querySelector('#rec-toggle');"
                              " return b && !b.disabled; }")
        assert await trainee.locator(".rec-indicator").is_hidden()
        assert await trainee.locator("#rec-toggle").count() == 0  # trainees get no button

        async def consent(scope: str) -> None:
            await expert.click("#rec-toggle")
            await wait_js(expert, "() => document.querySelector('#consent-dialog').open")
            assert await expert.input_value("#consent-by") == "Dr Grey"
            await expert.check(f"input[name='scope'][value='{scope}']")
            await expert.fill("#consent-note", "Form 12b <signed>")
            await expert.click("#consent-start")

        # Live-only consent: refused in the dialog, nothing recorded.
        await consent("live_only")
        await wait_js(expert, "() => !document.querySelector('.consent-error').hidden")
        await expert.click("#consent-dialog button[value='cancel']")
        assert not server.app[RECORDINGS].index

        await consent("internal_review")
        await wait_js(trainee, "() => { const r = document.querySelector('.rec-indicator');"
                               " return r && !r.hidden && r.dataset.state === 'on'; }")
        assert await trainee.text_content(".rec-indicator") == "REC"
        assert await expert.get_attribute("#rec-toggle", "aria-pressed") == "true"
        [entry] = server.app[RECORDINGS].index.values()
        assert entry["consent_scope"] == "internal_review"
        await screenshot(expert, "broadcast-recording")
        await screenshot(trainee, "watch-recording")

        await expert.click("#rec-toggle")  # stop
        await wait_js(trainee, "() => document.querySelector('.rec-indicator').hidden")
        assert server.app[RECORDINGS].index[entry["id"]]["state"] == "stopped"
        errors: list[Any] = expert_log.errors + trainee_log.errors
        assert not errors, errors
        await expert_ctx.close()
        await trainee_ctx.close()


async def test_player_renews_its_media_urls_within_one_playback(
        http: aiohttp.ClientSession) -> None:
    """Media URLs live at most 5 minutes (here one, so the player renews every
    10 s): the player swaps the new URLs in and keeps playing; the audit trail
    has one viewing and one entry per part for the whole playback."""
    from server.http.common import AUDIT

    from .conftest import make_config, start_server

    server, runner = await start_server(make_config(recording={"media_url_ttl_s": 60}))
    try:
        recording = await build_recording(server.config.recording.root, seconds=6,
                                          start_t=START_T, events=[mark(4.1, "Exposure")])
        server.app[RECORDINGS].open()
        token = server.token(Role.REVIEWER, name="Prof Review")
        async with chromium() as browser:
            context, page, log = await open_page(
                browser, f"{server.base_url}/player.html#token={token}"
                         f"&recording={recording.id}", "player")
            # The recording opens before the camera's first picture: go where there is one.
            await wait_js(page, "() => window.scrubinPlayer && "
                                "document.querySelector(\"button.mark-button[data-mark='m1']\")")
            await jump(page, "button.mark-button[data-mark='m1']", 4.1)
            await wait_js(page, "() => window.scrubinPlayer.mainVideo().readyState >= 2")
            first = await page.evaluate("() => window.scrubinPlayer.mainVideo().currentSrc")
            await wait_js(page, "(first) => { const v = window.scrubinPlayer.mainVideo();"
                                " return v.currentSrc !== first && v.readyState >= 2; }",
                          first, timeout_s=20)
            renewed = await page.evaluate("() => window.scrubinPlayer.mainVideo().currentSrc")
            play = [p.split("=", 1)[1] for url in (first, renewed)
                    for p in url.split("?", 1)[1].split("&") if p.startswith("play=")]
            assert play[0] == play[1]  # the same playback
            await jump(page, "button.mark-button[data-mark='m1']", 4.1)
            shown = await counter(page)
            assert shown is not None and abs(shown - expected_counter(4.1)) <= 1, shown
            assert not log.errors, log.errors
            await context.close()
        entries = server.app[AUDIT].read(session="or1-live")
        assert [e["event"] for e in entries].count("recording_viewed") == 1
        media = [(e["playback"], e["part"]) for e in entries if e["event"] == "recording_media"]
        assert media == [(play[0], "room.video-000.webm")]
    finally:
        await runner.cleanup()


async def test_one_clock_live_view_player_contact_sheet_and_library(
        server: Server, http: aiohttp.ClientSession,
        peers: list[RTCPeerConnection]) -> None:
    """Record from Session time ~2 s; mark a step ~2.5 s later. The trainee's
    page shows it at its Session time, the player, the contact sheet and the
    export at its time since the recording started; the library and the player
    give the same length."""
    await publish_camera(http, server, peers)
    session = server.session()
    clients: list[Client] = []
    expert = await join(http, server, clients, Role.EXPERT, "Dr Grey")
    try:
        await wait_for(lambda: "" if session.interaction.now() >= 2.0 else "too early")
        reply = await expert.request({"type": "start_recording", "consent": CONSENT})
        assert reply["type"] == "ok", reply
        async with chromium() as browser:
            trainee_ctx, trainee, trainee_log = await open_page(
                browser, f"{server.base_url}/watch.html#token={server.token(Role.TRAINEE)}",
                "trainee")
            await wait_js(trainee, "() => document.querySelector('#step-list li')")
            await asyncio.sleep(2.5)
            reply = await expert.request({"type": "mark", "name": "Port placement"})
            stamp = reply["mark"]["t"]  # the one stamp, Session clock
            await wait_js(trainee, "() => !document.querySelector('#step-now').hidden")
            live_label = await trainee.text_content("#step-now")
            await asyncio.sleep(1.0)
            reply = await expert.request({"type": "stop_recording"})
            assert reply["type"] == "ok", reply
            [entry] = server.app[RECORDINGS].index.values()
            directory = Path(server.config.recording.root) / entry["id"]
            manifest = json.loads((directory / "manifest.json").read_text())
            started_t = manifest["started_t"]
            assert 2.0 <= started_t < stamp - 2.0, (started_t, stamp)
            # Consent-exact: no part starts before the recording did.
            assert all(p["start"] >= started_t for f in manifest["feeds"] for p in f["parts"])
            # Stored once: the recording keeps the very stamp the live pages got.
            [recorded] = marks(player_events(read_events(directory / "events.jsonl")), "step")
            assert recorded["t"] == stamp
            assert live_label == f"Port placement · {clock_label(stamp)}"

            # The player: the same event, at its time since the recording started.
            token = server.token(Role.ADMIN, name="Ms Admin")
            player_ctx, player, player_log = await open_page(
                browser, f"{server.base_url}/player.html#token={token}&recording={entry['id']}",
                "player")
            await wait_js(player, "() => window.scrubinPlayer && "
                                  "window.scrubinPlayer.marks().length === 1")
            [(label, at)] = await player.evaluate("() => window.scrubinPlayer.marks()")
            since_start = clock_label(stamp - started_t)
            assert label == f"{since_start} Port placement" and at == stamp
            assert clock_label(stamp) != since_start  # two clocks would show two numbers
            t0, t1 = await player.evaluate("() => window.scrubinPlayer.range()")
            assert t0 == started_t and abs((t1 - t0) - manifest["duration"]) < 1e-6
            await player.click("button.mark-button[data-kind='step']")
            await wait_js(player, "(t) => Math.abs(window.scrubinPlayer.time() - t) < 0.01",
                          stamp)
            assert (await player.evaluate("() => window.scrubinPlayer.timeLabel()")).startswith(
                f"{since_start} / ")
            player_length = (await player.evaluate(
                "() => window.scrubinPlayer.timeLabel()")).split(" / ")[1]

            # The contact sheet says what the player says.
            [tile] = contact_sheet(directory, directory.parent / "sheet.jpg")
            assert tile.label == label and tile.t == stamp

            # The library: the same length as the player.
            library_ctx, library, library_log = await open_page(
                browser, f"{server.base_url}/library.html#token={token}", "library")
            await wait_js(library, "() => document.querySelectorAll('.recording-card').length")
            when = await library.text_content(".recording-when")
            assert when is not None and when.endswith(f" · {player_length}"), (when,
                                                                              player_length)
            errors: list[Any] = trainee_log.errors + player_log.errors + library_log.errors
            assert not errors, errors
            for context in (trainee_ctx, player_ctx, library_ctx):
                await context.close()
    finally:
        for client in clients:
            await client.ws.close()


async def test_library_legal_hold_and_verified_deletion(server: Server) -> None:
    kept = await build_recording(server.config.recording.root, seconds=1, thumbnail=False)
    gone = await build_recording(server.config.recording.root, seconds=1, thumbnail=False)
    server.app[RECORDINGS].open()
    admin = server.token(Role.ADMIN, name="Ms Admin")
    async with chromium() as browser:
        # A reviewer sees no admin actions.
        context, page, log = await open_page(
            browser, f"{server.base_url}/library.html#token={server.token(Role.REVIEWER)}",
            "reviewer")
        await wait_js(page, "() => document.querySelectorAll('.recording-card').length === 2")
        assert await page.locator(".recording-actions:visible").count() == 0
        await context.close()

        context, page, log = await open_page(
            browser, f"{server.base_url}/library.html#token={admin}&session=or1-live", "admin")
        await wait_js(page, "() => document.querySelectorAll('.recording-card').length === 2")
        card = page.locator(f".recording-card[data-recording='{kept.id}']")
        await card.locator(".hold-toggle").click()
        await wait_js(page, "() => document.querySelector('#hold-dialog').open")
        await page.fill("#hold-reason", "Claim 2026-114")
        await page.click("#hold-ok")
        await wait_js(page, f"""() => !document.querySelector(
            ".recording-card[data-recording='{kept.id}'] .recording-hold").hidden""")
        assert server.app[RECORDINGS].index[kept.id]["hold"]["reason"] == "Claim 2026-114"
        card = page.locator(f".recording-card[data-recording='{kept.id}']")
        assert await card.locator(".recording-delete").is_disabled()

        # Deleting the other one: asked first, then every file and checksum.
        files = {p.name for p in gone.directory.iterdir()}
        await page.locator(f".recording-card[data-recording='{gone.id}'] "
                           ".recording-delete").click()
        await wait_js(page, "() => document.querySelector('#confirm').open")
        await page.click("#confirm-ok")
        await wait_js(page, "() => document.querySelectorAll('.recording-card').length === 1")
        status = await page.text_content("#library-status")
        assert status is not None and "checked gone" in status, status
        deleted = await page.evaluate("() => window.scrubinLibrary.lastDeleted")
        assert {f["file"] for f in deleted["files"]} == files
        assert all(len(f["sha256"]) == 64 for f in deleted["files"])
        assert not gone.directory.exists() and kept.directory.is_dir()

        # Release the hold.
        await page.locator(".hold-toggle").click()
        await wait_js(page, "() => document.querySelector('#confirm').open")
        await page.click("#confirm-ok")
        await wait_js(page, "() => document.querySelector('.recording-hold').hidden")
        assert server.app[RECORDINGS].index[kept.id]["hold"] is None
        assert not log.errors, log.errors
        await context.close()
