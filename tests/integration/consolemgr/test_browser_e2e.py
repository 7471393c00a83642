"""What a person does: deployVirtualMachine and createConsoleEndpoint with ``cs``, then open
the returned URL in a real headless Chromium. The page is served by a console proxy agent
process that authorises through the real manager; noVNC draws the QEMU guest's screen. The
same URL a second time is refused; the page's Reconnect works once (resume token, bound to
the same proxy, issued by the manager)."""

from __future__ import annotations

from playwright.async_api import Browser

from tests.integration.console.test_browser import _wait_status, browser
from tests.integration.consolemgr.conftest import TIMING, Manager, wait_for

__all__ = ["browser"]  # the fixture, shared with the console engineer's browser tests

_LIT_JS = """() => {
  const c = document.querySelector('#screen canvas');
  if (!c || c.width === 0) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0;
  for (let k = 0; k < d.length; k += 4) if (d[k] + d[k + 1] + d[k + 2] > 30) lit++;
  return lit / (d.length / 4);
}"""


async def test_browser_opens_console_url_once(manager: Manager, browser: Browser) -> None:
    m = manager
    proxy = await m.new_proxy()
    vm = (await m.call("deployVirtualMachine", name="browser-vm"))["virtualmachine"]
    guest = m.svc.guests.get(vm["id"])
    assert guest is not None
    ep = (await m.call("createConsoleEndpoint", virtualmachineid=vm["id"]))["consoleendpoint"]
    assert ep["url"].startswith(f"http://127.0.0.1:{proxy.port}/console?")

    page = await browser.new_page(viewport={"width": 800, "height": 600})
    await page.goto(ep["url"])
    assert await _wait_status(page, ("connected", "error", "disconnected")) == "connected"
    assert guest.vnc_password not in await page.content()
    await page.wait_for_function(f"() => ({_LIT_JS})() > 0.5", timeout=20_000 * TIMING)
    await wait_for(lambda: m.svc.session_count(proxy.vm_id) == 1, 10, "session reported")

    page2 = await browser.new_page()
    await page2.goto(ep["url"])
    assert await _wait_status(page2, ("connected", "error")) == "error"
    assert "already used" in (await page2.inner_text("#error")).lower()
    await page2.close()

    await page.evaluate("() => window.sysvmRfb.disconnect()")
    assert await _wait_status(page, ("disconnected",)) == "disconnected"
    await page.click("#reconnect")
    assert await _wait_status(page, ("connected", "error")) == "connected"
    await page.close()
    await wait_for(lambda: m.svc.session_count(proxy.vm_id) == 0, 10, "session closed")
