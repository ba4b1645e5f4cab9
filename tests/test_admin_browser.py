"""The admin page in real Chromium: schedule a Session, create an invite, copy
its link; the link (join page, name asked once) opens the watch page, which
joins as soon as the Session is started."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser

from server.http.common import STORE

from .admin_helpers import admin_token, api
from .browser_helpers import chromium_available, open_page, screenshot, wait_js
from .conftest import Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium"),
]

HOSTILE_NAME = 'Dr <img src=x class="pwned"> Trainee'


@pytest.mark.timeout(90)
async def test_admin_creates_a_session_and_an_invite_whose_link_opens_the_watch_page(
        live_server: Server, browser: Browser) -> None:
    base = live_server.base_url
    context, admin, admin_log = await open_page(
        browser, f"{base}/admin.html#token={admin_token(live_server)}", "admin")
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    assert "token" not in admin.url, "the token must leave the address bar"
    await wait_js(admin, "() => document.querySelectorAll('#theatre-rows tr').length === 1")
    assert await admin.locator("#who").inner_text() == "Signed in as Ada Admin"

    # A Theatre, then a Session in it.
    await admin.click("#theatre-form >> xpath=..")  # open the <details>
    await admin.fill("#theatre-form input[name=id]", "or7")
    await admin.fill("#theatre-form input[name=name]", "Theatre 7")
    await admin.fill("#theatre-form input[name=slots]", "room, endoscope")
    await admin.click("#theatre-form button[type=submit]")
    await wait_js(admin, "() => document.querySelectorAll('#theatre-rows tr').length === 2")
    await admin.select_option("#session-theatre", "or7")
    await admin.fill("#session-form input[name=title]", "Laparoscopic <b>cholecystectomy</b>")
    await admin.fill("#session-form input[name=expert]", "Dr Grey")
    await admin.fill("#session-form input[name=id]", "or7-am")
    tomorrow = (datetime.now() + timedelta(days=1)).strftime("%Y-%m-%d")
    await admin.fill("#session-form input[name=starts_at]", f"{tomorrow}T08:30")
    await admin.click("#session-form button[type=submit]")
    await wait_js(admin, "() => document.querySelector('tr[data-session=\"or7-am\"]')")
    row = admin.locator('tr[data-session="or7-am"]')
    # Titles are text: the markup shows as characters, no element is made of it.
    assert "Laparoscopic <b>cholecystectomy</b>" in await row.inner_text()
    assert await row.locator("b").count() == 0
    record = await live_server.app[STORE].sessions.get_session("or7-am")
    assert record is not None and record.state == "scheduled" and record.theatre_id == "or7"

    # An invite for trainees, at most two people; copy its link.
    await wait_js(admin, "() => !document.querySelector('#invites-card').hidden")
    await admin.select_option("#invite-form select[name=role]", "trainee")
    await admin.fill("#invite-form input[name=max_uses]", "2")
    await admin.click("#invite-form button[type=submit]")
    await wait_js(admin, "() => !document.querySelector('#new-invite').hidden")
    await admin.click("#copy-new-invite")
    await wait_js(admin, "() => document.querySelector('#copy-new-invite').dataset.copied")
    link = await admin.evaluate("() => navigator.clipboard.readText()")
    assert link == await admin.input_value("#new-invite-link")
    assert link.startswith(f"{base}/join.html#token=")
    assert await admin.locator("#invite-rows tr").count() == 1
    await screenshot(admin, "admin-invite-1280")

    # The trainee opens the link in a browser of their own: asked for a name once.
    _, trainee, _ = await open_page(browser, link, "trainee")
    await wait_js(trainee, "() => !document.querySelector('#join-card').hidden")
    assert "token" not in trainee.url
    await trainee.fill("#join-name", HOSTILE_NAME)
    await trainee.click("#join-button")
    await trainee.wait_for_url(f"{base}/watch.html*")
    assert "token" not in trainee.url
    # Scheduled: the page waits and retries; the admin starts the Session.
    await admin.click('tr[data-session="or7-am"] button[data-action="start"]')
    await wait_js(admin, "() => document.querySelector('tr[data-session=\"or7-am\"] .pill')"
                         ".textContent === 'Live'")
    await wait_js(trainee, "() => window.scrubin && window.scrubin.client.state === 'open'",
                  timeout_s=30)
    session = live_server.registry.sessions["or7-am"]
    names = [p.name for p in session.participants.values()]
    assert names == [HOSTILE_NAME]
    store = live_server.app[STORE]
    (invite,) = await store.invites.list_invites("or7-am")
    assert await store.invites.invite_uses(invite.id) == 1
    await admin.click("#refresh")
    await wait_js(admin, "() => document.querySelector('#invite-rows td:nth-child(3)')"
                         ".textContent === '1 / 2 (1 free)'")
    await admin.evaluate("() => window.scrollTo(0, 0)")
    await screenshot(admin, "admin-live-1280")
    await screenshot(trainee, "join-then-watch-1280")

    # Attendance on the admin page while it runs: the trainee, by name (as text).
    token = admin_token(live_server)
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 30
        while True:  # present for most of the Session so far: a certificate's worth
            _, view = await api(http, live_server, "GET", "/api/sessions/or7-am/attendance",
                                token, expect=200)
            shares = [p["share"] for p in view["participants"] if p["role"] == "trainee"]
            if shares and shares[0] >= 0.8:
                break
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.25)
    await admin.click("#attendance-refresh")
    await wait_js(admin, "() => document.querySelectorAll('#attendance-rows tr').length === 1")
    row_text = await admin.locator("#attendance-rows tr").inner_text()
    assert HOSTILE_NAME in row_text and "trainee" in row_text, row_text
    assert await admin.locator("#attendance-rows img, .pwned").count() == 0
    assert await admin.is_disabled("#attendance-confirm")  # not before the end

    # The Session ends; the admin confirms attendance: a certificate, a PDF to fetch.
    await admin.click('tr[data-session="or7-am"] button[data-action="end"]')
    await admin.click("#confirm-ok")
    await wait_js(admin, "() => !document.querySelector('#attendance-confirm').disabled",
                  timeout_s=15)
    await admin.click("#attendance-confirm")
    await admin.click("#confirm-ok")
    await wait_js(admin, "() => document.querySelector("
                         "'#attendance-rows button[data-action=\"pdf\"]')", timeout_s=15)
    (certificate,) = await store.training.list_certificates("or7-am")
    assert certificate.name == HOSTILE_NAME
    async with admin.expect_download() as download_info:
        await admin.click('#attendance-rows button[data-action="pdf"]')
    download = await download_info.value
    path = await download.path()
    assert path is not None
    assert (await asyncio.to_thread(Path(path).read_bytes)).startswith(b"%PDF-")
    await screenshot(admin, "admin-attendance-1280")
    # The trainee's page offers it too (it looks every 15 s), with the link to
    # its public page, which outlives the trainee's token.
    await wait_js(trainee, "() => !document.querySelector('#certificate-note').hidden",
                  timeout_s=30)
    keep = await trainee.get_attribute("#certificate-keep", "href")
    assert keep == f"{base}/verify.html#id={certificate.id}", keep
    assert admin_log.errors == [], admin_log.errors
