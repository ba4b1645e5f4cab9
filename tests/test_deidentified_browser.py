"""De-identified exports in real Chromium: an admin makes one from the library
(its progress shows while it is made), it shows "Pending review", the admin
watches it in the player and signs it off there, the library then shows it
signed off and shared, and a reviewer of another Session finds it among the
exports shared for teaching and can watch it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.roles import Role

from .browser_helpers import chromium, chromium_available, open_page, screenshot, wait_js
from .conftest import Server, make_config, start_server
from .deidentify_helpers import CONFIG
from .test_deidentified_api import SHARED, plant

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium"),
]

#: Remembers whether the library ever showed an export's progress bar.
WATCH_PROGRESS_JS = """
() => {
  window.__progressSeen = false;
  const seen = () => {
    if (document.querySelector('.recording-exports .export-run:not([hidden]) progress')) {
      window.__progressSeen = true;
    }
  };
  new MutationObserver(seen).observe(document.body, {subtree: true, childList: true,
                                                     attributes: true});
}
"""


def export_state(state: str) -> str:
    return (f"() => [...document.querySelectorAll('.recording-exports .export-item')]"
            f".some((i) => i.dataset.state === '{state}')")


@pytest.fixture
async def sharing() -> AsyncIterator[Server]:
    server, runner = await start_server(make_config(recording={"share_deidentified": True},
                                                    deidentify=CONFIG))
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_admin_makes_watches_and_signs_off_an_export(sharing: Server) -> None:
    server = sharing
    rid = await plant(server, consent=SHARED, seconds=3.0,
                      audio=(("narration.audio", (1.0,), 1000.0),))
    admin = server.token(Role.ADMIN, name="Dr Admin")
    library = f"{server.base_url}/library.html#token={admin}"
    async with chromium() as browser:
        context, page, log = await open_page(browser, library, "admin")
        await wait_js(page, f"() => document.querySelector(\"[data-recording='{rid}']\")")
        await page.evaluate(WATCH_PROGRESS_JS)
        await page.click(f"[data-recording='{rid}'] .deidentify")
        await wait_js(page, "() => document.querySelector('#deidentify-dialog').open")
        await page.check("#deidentify-narration")
        await page.click("#deidentify-ok")
        # Being made: its progress bar; then pending review.
        await wait_js(page, "() => window.__progressSeen")
        await wait_js(page, export_state("pending_review"), timeout_s=120)
        item = page.locator(".recording-exports .export-item")
        assert await item.locator(".export-state").text_content() == "Pending review"
        assert await item.locator(".export-shared").is_hidden()
        meta = await item.locator(".export-meta").text_content() or ""
        assert "narration kept" in meta and "faces blurred" in meta
        await screenshot(page, "deidentified-pending")

        # Reviewed in the player: it plays, then the admin signs it off.
        await item.locator(".export-open").click()
        await wait_js(page, """() => {
          const p = window.scrubinPlayer;
          return p && p.exported() && p.exported().state === 'pending_review' && p.mayReview()
            && p.mainVideo().readyState >= 1;
        }""", timeout_s=20)
        bar = await page.text_content("#review-bar") or ""
        assert "Pending review" in bar
        await page.click("#player-sound")  # its sound is in the MP4
        assert await page.evaluate("() => window.scrubinPlayer.mainVideo().muted") is False
        await page.click("#review-sign")
        await wait_js(page, "() => document.querySelector('#review-dialog').open")
        await page.fill("#review-note", "Face and monitor hidden; narration names nobody")
        await page.click("#review-ok")
        await wait_js(page, "() => window.scrubinPlayer.exported().state === 'signed_off'")
        bar = await page.text_content("#review-bar") or ""
        assert "Signed off by Dr Admin" in bar and "Shared with the reviewers" in bar
        assert await page.locator("#review-downloads a").count() == 1
        assert await page.locator("#review-sign").is_hidden()
        await screenshot(page, "deidentified-signed-off")

        # The library says so.
        await page.goto(library)
        await page.reload()
        await wait_js(page, export_state("signed_off"))
        item = page.locator(".recording-exports .export-item")
        assert await item.locator(".export-state").text_content() == "Signed off"
        assert await item.locator(".export-shared").is_visible()
        assert not log.errors, log.errors
        await context.close()

        # Another Session's reviewer finds it among the shared ones, and watches it.
        server.registry.create_session("or2-other", "or1", "Another procedure")
        foreign = server.token(Role.REVIEWER, "or2-other")
        context, page, log = await open_page(
            browser, f"{server.base_url}/library.html#token={foreign}", "foreign")
        await wait_js(page, "() => !document.querySelector('#shared').hidden")
        shared = page.locator("#shared-list .export-item")
        assert await shared.count() == 1
        text = await shared.text_content() or ""
        assert "Dr Admin" not in text and "Dr Expert" not in text
        await shared.locator(".export-open").click()
        await wait_js(page, """() => window.scrubinPlayer && window.scrubinPlayer.exported()
          && window.scrubinPlayer.mainVideo().readyState >= 1""", timeout_s=20)
        assert await page.locator("#review-sign").is_hidden()
        assert not log.errors, log.errors
        await context.close()
