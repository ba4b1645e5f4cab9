"""Firewalled trainees in real Chromium, through a real coturn on loopback.

A network that lets nothing but the TURN relay through cannot be built on
loopback without touching the machine's firewall, so these pages run with
WebRTC's own relay-only policy (``iceTransportPolicy: "relay"``, forced on
every RTCPeerConnection by an init script, as a managed browser or a privacy
setting would): the browser may only use relayed candidates, so anything it
receives came through coturn. The pages themselves are unchanged.

Chromium verifies the TURN server's TLS certificate; the test CA is made at
start, so these browsers run with ``--ignore-certificate-errors``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page

from server.publish.synthetic import SyntheticTheatreCamera
from server.roles import Role

from .admin_helpers import admin_token, api, schedule
from .browser_helpers import (
    INBOUND_STATS_JS,
    PageLog,
    chromium,
    chromium_available,
    open_page,
    screenshot,
    wait_js,
)
from .conftest import Server, make_config, start_server, wait_for, whip_publish
from .coturn import Coturn
from .test_player_browser import COUNTER_JS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium"),
]

RELAY_ONLY_JS = """
(() => {
  const Native = window.RTCPeerConnection;
  function RelayOnly(config, ...rest) {
    return new Native({...(config || {}), iceTransportPolicy: 'relay'}, ...rest);
  }
  RelayOnly.prototype = Native.prototype;
  Object.setPrototypeOf(RelayOnly, Native);
  window.RTCPeerConnection = RelayOnly;
})();
"""

#: The selected candidate pair of a subscribed Feed's peer connection.
SELECTED_PAIR_JS = """
async (feedId) => {
  const sub = window.scrubin && window.scrubin.client.subscriptions.get(feedId);
  if (!sub || !sub.pc) return null;
  const report = await sub.pc.getStats();
  const byId = new Map();
  let selected = null;
  report.forEach((r) => {
    byId.set(r.id, r);
    if (r.type === 'transport' && r.selectedCandidatePairId) selected = r.selectedCandidatePairId;
  });
  const pair = selected && byId.get(selected);
  if (!pair) return null;
  const local = byId.get(pair.localCandidateId), remote = byId.get(pair.remoteCandidateId);
  return {localType: local.candidateType, relayProtocol: local.relayProtocol || '',
          remoteType: remote.candidateType, bytesReceived: pair.bytesReceived};
}
"""

@pytest.fixture
async def tls_browser() -> AsyncIterator[Browser]:
    async with chromium(extra_args=("--ignore-certificate-errors",)) as browser:
        yield browser


async def relay_only_page(browser: Browser, url: str, name: str
                          ) -> tuple[BrowserContext, Page, PageLog]:
    return await open_page(browser, url, name, init_script=RELAY_ONLY_JS)


async def poll(page: Page, expression: str, arg: Any = None, timeout_s: float = 20.0) -> Any:
    """Evaluate ``expression`` (may be async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    value = None
    while asyncio.get_running_loop().time() < deadline:
        value = await page.evaluate(expression, arg)
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s; last value {value!r}")


def dead_port() -> int:
    """A loopback port nothing listens on (UDP and TCP): a blocked transport."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        return int(tcp.getsockname()[1])


async def test_relay_only_trainee_watches_through_turn_over_tcp(
        coturn: Coturn, tls_browser: Browser, http: aiohttp.ClientSession) -> None:
    # Only TURN over TCP is offered: what a trainee behind a UDP-blocking
    # firewall ends up using.
    server, runner = await start_server(make_config(
        turn={"urls": [coturn.url("tcp")], "secret": coturn.secret}))
    publisher = None
    try:
        publisher, _ = await whip_publish(http, server, "room",
                                          [SyntheticTheatreCamera(320, 180, 15)])
        session = server.session()
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
        token = server.token(Role.TRAINEE, participant_id="behind-firewall", name="Dr Wall")
        _, page, log = await relay_only_page(tls_browser, f"{server.base_url}/watch.html"
                                             f"#token={token}", "trainee")
        await wait_js(page, "() => window.scrubin && scrubin.mainFeedId() === 'room.video'")
        await poll(page, "async () => { const s = await (" + INBOUND_STATS_JS
                   + ")('room.video'); return s && s.framesDecoded > 10; }", timeout_s=30)
        pair = await poll(page, SELECTED_PAIR_JS, "room.video")
        assert pair is not None and pair["localType"] == "relay", pair
        assert pair["relayProtocol"] == "tcp", pair
        # What the trainee sees is the camera, frame by frame.
        # Wrapped in an object: counter 0 is a reading too.
        read = f"(s) => {{ const c = ({COUNTER_JS})(s); return c === null ? null : {{c}}; }}"
        first = (await wait_js(page, read, "#main-video"))["c"]
        later = (await wait_js(page, f"(s) => {{ const r = ({read})(s); "
                                     f"return r && r.c > {first} ? r : null; }}",
                               "#main-video"))["c"]
        assert later > first
        (subscription,) = session.subscriptions.values()
        assert subscription.path == "fast"
        assert "username=<" in coturn.log() and ":behind-firewall>" in coturn.log()
        await screenshot(page, "watch-through-turn-1280")
        assert log.errors == [], log.errors
    finally:
        if publisher is not None:
            await publisher.close()
        await runner.cleanup()


async def test_invite_leads_to_a_preflight_that_finds_the_relay_then_joins(
        coturn: Coturn, tls_browser: Browser, http: aiohttp.ClientSession) -> None:
    """UDP to the relay is blocked (a dead port), TCP and TLS pass: the check
    says the trainee is ready through the relay, the note for IT says what
    is blocked, and the invite still works afterwards."""
    server, runner = await start_server(make_config(turn={
        "urls": [f"turn:127.0.0.1:{dead_port()}?transport=udp", coturn.url("tcp"),
                 coturn.url("tls")], "secret": coturn.secret}))
    try:
        admin = admin_token(server)
        await schedule(http, server, admin, "or1-later", title="Hernia repair")
        _, created = await api(http, server, "POST", "/api/admin/sessions/or1-later/invites",
                               admin, {"role": "trainee", "name": "Dr Wall", "max_uses": 1},
                               expect=201)
        _, page, log = await relay_only_page(tls_browser, created["link"], "trainee")
        # A named invite waits on the join page so the check can come first.
        await wait_js(page, "() => !document.querySelector('#preflight-hint').hidden")
        assert await page.locator("#name-field").is_hidden()
        await page.click("#preflight-link")
        await page.wait_for_url(f"{server.base_url}/preflight.html*")
        assert "token" not in page.url
        state = await wait_js(page, "() => window.scrubinPreflight.state === 'done'"
                                    " && window.scrubinPreflight", timeout_s=45)
        result = state["result"]
        assert result["browser"] is True
        assert result["direct"] is False  # relay-only: no direct path exists
        assert result["turn"] == {"udp": False, "tcp": True, "tls": True}, result
        assert result["via"] == "turn-tcp" and result["verdict"] == "ready"
        assert result["kbps"] > 0
        assert await page.text_content("#pf-session") == "For: Hernia repair"
        text = await page.text_content("#pf-verdict-text")
        assert "relay server gets the video through" in (text or "")
        assert await page.locator("#pf-it").is_visible()
        note = await page.input_value("#pf-it-text")
        assert f"{coturn.url('tcp')}  →  works" in note
        assert "?transport=udp  →  blocked" in note and "Result here: blocked" in note
        await screenshot(page, "preflight-relay-1280")
        # The check used nothing up: the invite is redeemed now.
        await page.click("#pf-continue")
        await page.wait_for_url(f"{server.base_url}/join.html*")
        await wait_js(page, "() => !document.querySelector('#join-card').hidden")
        await page.click("#join-button")
        await page.wait_for_url(f"{server.base_url}/watch.html*")
        _, listed = await api(http, server, "GET", "/api/admin/sessions/or1-later/invites",
                              admin, expect=200)
        (entry,) = listed["invites"]
        assert entry["uses"] == 1, entry
        assert log.errors == [], log.errors
    finally:
        await runner.cleanup()


async def test_preflight_verdicts_direct_blocked_and_wrong_role(
        coturn: Coturn, tls_browser: Browser, turn_server: Server) -> None:
    # An ordinary network: direct works, no note for IT.
    context = await tls_browser.new_context()
    page = await context.new_page()
    token = turn_server.token(Role.TRAINEE)
    await page.goto(f"{turn_server.base_url}/preflight.html#token={token}")
    state = await wait_js(page, "() => window.scrubinPreflight.state === 'done'"
                                " && window.scrubinPreflight", timeout_s=45)
    assert state["result"]["direct"] is True and state["result"]["via"] == "direct"
    assert state["result"]["verdict"] == "ready"
    assert state["result"]["turn"] == {"udp": True, "tcp": True, "tls": True}
    assert await page.locator("#pf-it").is_hidden()
    await screenshot(page, "preflight-direct-1280")

    # Nothing gets through: blocked, with the note.
    server, runner = await start_server(make_config(turn={
        "urls": [f"turn:127.0.0.1:{dead_port()}?transport=tcp"], "secret": coturn.secret}))
    try:
        _, blocked, _ = await relay_only_page(
            tls_browser, f"{server.base_url}/preflight.html#token={server.token(Role.TRAINEE)}",
            "blocked")
        state = await wait_js(blocked, "() => window.scrubinPreflight.state === 'done'"
                                       " && window.scrubinPreflight", timeout_s=45)
        assert state["result"]["verdict"] == "blocked" and state["result"]["via"] == ""
        assert await blocked.text_content("#pf-verdict-title") == \
            "Your network blocks the live video"
        assert await blocked.locator("#pf-it").is_visible()
        assert await blocked.locator('[data-step="speed"]').get_attribute("data-state") \
            == "skipped"
        await screenshot(blocked, "preflight-blocked-1280")
    finally:
        await runner.cleanup()

    # A reviewer's link gives no live video, so no check either.
    reviewer = await context.new_page()
    await reviewer.goto(f"{turn_server.base_url}/preflight.html"
                        f"#token={turn_server.token(Role.REVIEWER)}")
    await wait_js(reviewer, "() => window.scrubinPreflight.state === 'error'")
    assert "does not give access" in (await reviewer.text_content("#pf-verdict-text") or "")

