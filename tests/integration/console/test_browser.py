"""A real headless Chromium opens a console URL through the CPVM role to a real QEMU guest
with a VNC password, and noVNC draws the guest's screen."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright
from playwright.async_api import Error as PlaywrightError

from manager.guests import GuestVm
from manager.guests.payload import HEIGHT, WIDTH

pytestmark = pytest.mark.integration

Console = Any  # the `console` fixture's object (conftest.Console)
REPO = Path(__file__).resolve().parents[3]
TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
GRID = (16, 10)  # sample points across the screen

_SAMPLE_JS = """([gw, gh]) => {
  const c = document.querySelector('#screen canvas');
  if (!c || c.width === 0) return null;
  const ctx = c.getContext('2d');
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  const out = [];
  for (let j = 0; j < gh; j++) for (let i = 0; i < gw; i++) {
    const x = Math.floor((i + 0.5) * c.width / gw), y = Math.floor((j + 0.5) * c.height / gh);
    const k = (y * c.width + x) * 4;
    out.push([d[k], d[k + 1], d[k + 2]]);
  }
  let lit = 0;
  for (let k = 0; k < d.length; k += 4) if (d[k] + d[k + 1] + d[k + 2] > 30) lit++;
  return {w: c.width, h: c.height, samples: out, lit: lit / (d.length / 4)};
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} missing: apt install chromium (scripts/setup --dev does)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            await b.close()


def _framebuffer_samples(width: int, height: int, rgb: bytes) -> list[list[int]]:
    gw, gh = GRID
    out = []
    for j in range(gh):
        for i in range(gw):
            x, y = int((i + 0.5) * width / gw), int((j + 0.5) * height / gh)
            k = (y * width + x) * 3
            out.append(list(rgb[k : k + 3]))
    return out


async def _goto(page: Page, url: str) -> None:
    """Navigates; retries when Chromium aborts the load because the host's network changed
    (other tests add and remove interfaces on this machine: net::ERR_NETWORK_CHANGED). The
    page load never spends the token (only the websocket upgrade does)."""
    for attempt in range(3):
        try:
            await page.goto(url)
            return
        except PlaywrightError as e:
            if "ERR_NETWORK_CHANGED" not in str(e) or attempt == 2:
                raise


def _watch(page: Page) -> list[str]:
    """Collects what the browser saw (console lines, failed requests) for failure messages."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(f"console {m.type}: {m.text}"))
    page.on("requestfailed", lambda r: seen.append(f"failed {r.url}: {r.failure}"))
    page.on("websocket", lambda ws: seen.append(f"websocket {ws.url.split('?')[0]}"))
    return seen


async def _wait_status(page: Page, states: tuple[str, ...], seen: list[str] | None = None) -> str:
    js = "(states) => states.includes(document.getElementById('status').dataset.state)"
    try:
        await page.wait_for_function(js, arg=list(states), timeout=30_000 * TIMING)
    except Exception as e:
        state = await page.eval_on_selector("#status", "e => e.dataset.state")
        raise AssertionError(f"page stuck in {state!r}; browser saw: {seen}") from e
    return str(await page.eval_on_selector("#status", "e => e.dataset.state"))


async def test_chromium_draws_guest_screen_and_link_is_single_use(
    console: Console, guest_vm: GuestVm, browser: Browser, tmp_path: Path
) -> None:
    token = await console.mint(guest_vm)
    url = console.page_url(guest_vm.id, token)
    page = await browser.new_page(viewport={"width": 800, "height": 600})
    seen = _watch(page)
    await _goto(page, url)
    status = await _wait_status(page, ("connected", "error", "disconnected"), seen)
    assert status == "connected", seen
    # The token left the address bar; the VNC password never reached the page.
    assert "token=" not in page.url
    html = await page.content()
    assert guest_vm.vnc_password not in html

    # Wait until the guest has switched to VGA mode 13h and painted its gradient (QEMU's
    # std VGA shows 320x200 doubled), then until noVNC's canvas has that size.
    for _ in range(int(200 * TIMING)):
        width, height, rgb = await console.guests.screendump(guest_vm.id, tmp_path / "fb.ppm")
        if (width, height) in ((WIDTH, HEIGHT), (2 * WIDTH, 2 * HEIGHT)) and _colours(rgb) > 100:
            break
        await asyncio.sleep(0.05)
    assert (width, height) in ((WIDTH, HEIGHT), (2 * WIDTH, 2 * HEIGHT)), (width, height)
    await page.wait_for_function(
        f"() => {{ const c = document.querySelector('#screen canvas');"
        f" return c && c.width === {width} && c.height === {height}; }}",
        timeout=20_000 * TIMING,
    )
    seen: dict[str, Any] | None = None
    want = _framebuffer_samples(width, height, rgb)
    # Poll until noVNC's canvas matches the framebuffer (updates arrive incrementally).
    for _ in range(int(100 * TIMING)):
        seen = await page.evaluate(_SAMPLE_JS, list(GRID))
        if seen and _close(seen["samples"], want) >= 0.95:
            break
        await page.wait_for_timeout(100)
    assert seen is not None
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console-guest.png"))
    assert seen["lit"] > 0.5, f"canvas mostly blank: {seen['lit']:.2f} lit"
    assert _close(seen["samples"], want) >= 0.95, (seen["samples"][:8], want[:8])
    # The guest's gradient has many distinct colours; a blank or solid canvas would not.
    assert len({tuple(s) for s in seen["samples"]}) >= 20

    # The manager got one authorize, with the token; session events were sent.
    assert [r["vm_id"] for r in console.requests] == [guest_vm.id]
    opens = [d for n, d in console.events if n == "console.sessions" and d["reason"] == "open"]
    assert opens and opens[0]["sessions"][0]["vm_id"] == guest_vm.id
    assert opens[0]["sessions"][0]["client"] == "127.0.0.1"

    # Ctrl-Alt-Del and the clipboard go through without breaking the session.
    await page.click("#cad")
    await page.click("#clip summary")
    await page.fill("#cliptext", "hello from the browser")
    await page.click("#clipsend")
    assert await page.eval_on_selector("#status", "e => e.dataset.state") == "connected"

    # The same URL a second time is refused (token spent at the first upgrade).
    page2 = await browser.new_page()
    seen2 = _watch(page2)
    await _goto(page2, url)
    assert await _wait_status(page2, ("connected", "error"), seen2) == "error"
    assert "refused" in (await page2.inner_text("#error")).lower()
    # (The page retries a connection that failed before opening, twice: same answer.)
    assert 1 <= console.counters().get("refused_token", 0) <= 3
    await page2.close()

    # Closing the page ends the session; Reconnect then works once via the resume cookie.
    await page.evaluate("() => window.sysvmRfb.disconnect()")
    assert await _wait_status(page, ("disconnected",), seen) == "disconnected"
    await page.click("#reconnect")
    assert await _wait_status(page, ("connected", "error"), seen) == "connected"
    await page.close()


def _colours(rgb: bytes) -> int:
    return len({rgb[k : k + 3] for k in range(0, len(rgb), 3 * 97)})


def _close(got: list[list[int]], want: list[list[int]], tol: int = 24) -> float:
    ok = sum(
        1
        for g, w in zip(got, want, strict=True)
        if all(abs(a - b) <= tol for a, b in zip(g, w, strict=True))
    )
    return ok / len(want)


async def test_chromium_shows_hypervisor_password_failure(
    console: Console, guest_vm: GuestVm, browser: Browser
) -> None:
    console.records.password_override[guest_vm.id] = "wrong-pw"
    token = await console.mint(guest_vm)
    page = await browser.new_page()
    await _goto(page, console.page_url(guest_vm.id, token))
    assert await _wait_status(page, ("connected", "error")) == "error"
    text = await page.inner_text("#error")
    assert "VNC authentication to the hypervisor failed" in text
    assert "wrong-pw" not in text
    assert console.counters().get("vnc_auth_failed") == 1
    await page.close()
