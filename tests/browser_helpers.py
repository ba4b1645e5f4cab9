"""Real Chromium for browser tests: launch flags, console capture, stats probes.

Chromium comes from Debian (/usr/bin/chromium); never ``playwright install``.
Flags are the ones known to work as root and headless on this kind of machine
(/work/shared/notes/webrtc-on-this-machine.md): a synthetic camera and
microphone, loopback ICE, no mDNS candidates, no network chatter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]

#: Where tests may drop screenshots for a human to look at (unset: none).
SCREENSHOT_DIR = os.environ.get("SCRUBIN_SCREENSHOTS", "")


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)


@contextlib.asynccontextmanager
async def chromium(fake_device: str = "") -> AsyncIterator[Browser]:
    """One headless Chromium. Playwright's ``launch`` starts it with a fresh
    temporary ``--user-data-dir`` of its own and deletes it afterwards; each
    ``new_context`` is then an isolated profile (cookies, storage)."""
    async with async_playwright() as pw:
        args = [a if a != "--use-fake-device-for-media-stream" or not fake_device
                else f"{a}={fake_device}" for a in CHROMIUM_ARGS]
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class PageLog:
    """Console errors and uncaught exceptions of one page."""

    name: str
    errors: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        def on_console(msg: ConsoleMessage) -> None:
            line = f"[{self.name}] {msg.type}: {msg.text}"
            self.messages.append(line)
            if msg.type == "error":
                self.errors.append(line)

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"[{self.name}] uncaught: {exc}"))


async def open_page(browser: Browser, url: str, name: str, *, width: int = 1280,
                    height: int = 800) -> tuple[BrowserContext, Page, PageLog]:
    context = await browser.new_context(viewport={"width": width, "height": height},
                                        permissions=["camera", "microphone"])
    context.set_default_timeout(10_000)
    page = await context.new_page()
    log = PageLog(name)
    log.attach(page)
    await page.goto(url)
    return context, page, log


async def wait_js(page: Page, expression: str, arg: Any = None, timeout_s: float = 15.0) -> Any:
    """Poll a JS function expression until it returns something truthy.

    Polls on a timer, not requestAnimationFrame: pages of other contexts are
    in the background and rAF may not run there.
    """
    handle = await page.wait_for_function(expression, arg=arg, polling=100,
                                          timeout=timeout_s * 1000)
    return await handle.json_value()


#: True once the element's box was the same at two polls in a row and no CSS
#: transition or animation moves it: layout has settled (a card grew, a viewport changed).
SETTLED_BOX_JS = """
(selector) => {
  const el = document.querySelector(selector);
  if (!el) return false;
  const r = el.getBoundingClientRect();
  const box = [r.x, r.y, r.width, r.height].join();
  const seen = (window.__settledBoxes = window.__settledBoxes || {});
  const same = seen[selector] === box;
  seen[selector] = box;
  // Transitions or animations of the element, its ancestors or its children move it.
  const moving = document.getAnimations().some((a) => {
    const target = a.effect && a.effect.target;
    return a.playState === 'running' && target instanceof Element
      && (target.contains(el) || el.contains(target));
  });
  return same && r.width > 0 && r.height > 0 && !moving;
}
"""


async def wait_settled(page: Page, selector: str, timeout_s: float = 10.0) -> None:
    """Until ``selector``'s layout has settled (no fixed pause: it waits for the fact)."""
    await page.evaluate("(s) => { if (window.__settledBoxes) delete window.__settledBoxes[s]; }",
                        selector)
    await wait_js(page, SETTLED_BOX_JS, selector, timeout_s=timeout_s)


async def wait_until(check: Callable[[], Awaitable[str]], timeout_s: float = 15.0) -> None:
    """Poll an async ``check`` (returns '' when done, else why it is not)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        reason = await check()
        if not reason:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s: {reason}")
        await asyncio.sleep(0.1)


#: framesDecoded (and friends) of the inbound stream of a subscribed Feed.
INBOUND_STATS_JS = """
async (feedId) => {
  const sub = window.scrubin && window.scrubin.client.subscriptions.get(feedId);
  if (!sub || !sub.pc) return null;
  const report = await sub.pc.getStats();
  let out = null;
  report.forEach((r) => {
    if (r.type === 'inbound-rtp' && r.kind === sub.kind) {
      out = {framesDecoded: r.framesDecoded || 0, packetsReceived: r.packetsReceived || 0,
             bytesReceived: r.bytesReceived || 0, frameWidth: r.frameWidth || 0,
             subscription: sub.id};
    }
  });
  return out;
}
"""

#: Draw the main video into a canvas: pixel statistics and a small fingerprint.
SAMPLE_MAIN_VIDEO_JS = """
() => {
  const video = window.scrubin.mainVideo();
  const w = video.videoWidth, h = video.videoHeight;
  if (!w || !h) return null;
  const canvas = document.createElement('canvas');
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(video, 0, 0, w, h);
  const data = ctx.getImageData(0, 0, w, h).data;
  let sum = 0, sumSq = 0, nonBlack = 0, n = 0;
  const step = 4 * 7;  // every 7th pixel is plenty
  for (let i = 0; i < data.length; i += step) {
    const y = 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
    sum += y; sumSq += y * y; n++;
    if (y > 16) nonBlack++;
  }
  const mean = sum / n;
  const fingerprint = [];
  for (let i = 0; i < data.length; i += Math.floor(data.length / 64 / 4) * 4) {
    fingerprint.push(data[i], data[i + 1], data[i + 2]);
  }
  return {width: w, height: h, mean, std: Math.sqrt(Math.max(0, sumSq / n - mean * mean)),
          nonBlack: nonBlack / n, fingerprint};
}
"""


async def screenshot(page: Page, name: str) -> None:
    if SCREENSHOT_DIR:
        await page.screenshot(path=str(Path(SCREENSHOT_DIR) / f"{name}.png"))
