"""Issue 4 end to end on a real booted CPVM: a real ``sysvm-manager``, the system VM image
booted as a console proxy VM by the nspawn driver (its own network namespace: a control
NIC to reach the manager and a public NIC the browser reaches it on), a QEMU guest with a
password-protected VNC console deployed through the API with ``cs``, createConsoleEndpoint
through the API, and headless Chromium opening the returned URL: noVNC draws the guest's
screen, relayed by the CPVM from the guest's VNC port on the host's control-bridge address.
The same URL a second time, a forged token and a page of another Origin are refused.

Wiring (per-run addresses, host objects under the test's prefix, all removed)::

    host ── control bridge 169.254.N.1/24 ── eth0 169.254.N.10  (agent → manager wss,
         │     (guest VNC listens here too)                      CPVM → guest VNC)
         └─ public bridge  100.P.Q.1/24   ── eth1 100.P.Q.10   (browser → CPVM :80)

The CPVM record comes from ``create-external-vms`` (the lifecycle gives CPVMs no public
NIC yet); its console server is told to listen on the public address (boot data ``extra
.listen_host``), which is what the manager hands browsers.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.async_api import Browser, Page

from manager.hypervisor.base import NicSpec, PowerState, VmSpec, bridge_name
from manager.hypervisor.nspawn import NspawnDriver
from tests.integration.console.test_browser import browser
from tests.system.helpers import (
    TIMING_FACTOR,
    external_bootdata,
    free_port_any,
    manager_argv,
    read,
    start_manager,
    wait_for,
)

__all__ = ["browser"]  # the Chromium fixture of the integration console tests

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = REPO / "test-artifacts"

_LIT_JS = """() => {
  const c = document.querySelector('#screen canvas');
  if (!c || c.width === 0) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0;
  for (let k = 0; k < d.length; k += 4) if (d[k] + d[k + 1] + d[k + 2] > 30) lit++;
  return lit / (d.length / 4);
}"""

# Opens the console websocket from the current page (so with that page's Origin) and
# reports how it ended: "open" (accepted) or "closed:<code>" (refused before the upgrade).
_WS_FROM_PAGE_JS = """(url) => new Promise((resolve) => {
  const ws = new WebSocket(url, []);
  const t = setTimeout(() => resolve('timeout'), 15000);
  ws.onopen = () => { clearTimeout(t); ws.close(); resolve('open'); };
  ws.onclose = (e) => { clearTimeout(t); resolve('closed:' + e.code); };
})"""


def guest_qemu_pids(name: str) -> list[int]:
    """QEMU processes whose ``-name`` is ``name`` (the guests of this test)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and name.encode() in argv:
            pids.append(int(d.name))
    return pids


async def wait_status(page: Page, states: tuple[str, ...]) -> str:
    js = "(states) => states.includes(document.getElementById('status').dataset.state)"
    try:
        await page.wait_for_function(js, arg=list(states), timeout=30_000 * TIMING_FACTOR)
    except Exception as e:
        state = await page.eval_on_selector("#status", "e => e.dataset.state")
        raise AssertionError(f"page stuck in {state!r}, wanted {states}") from e
    return str(await page.eval_on_selector("#status", "e => e.dataset.state"))


class Api:
    """The ``cs`` client on the manager's credentials (blocking, so in a thread)."""

    def __init__(self, creds: dict[str, Any]) -> None:
        from cs import CloudStack

        self.client = CloudStack(
            endpoint=creds["endpoint"], key=creds["apikey"], secret=creds["secretkey"], timeout=60
        )

    async def __call__(self, command: str, **params: Any) -> Any:
        fn = getattr(self.client, command)
        return await asyncio.to_thread(fn, fetch_result=True, **params)


def _nets() -> tuple[str, str]:
    """(control /24 prefix, public /24 prefix) for this run: link-local for control, a
    CGNAT /24 for public (never 192.0.2.0/24, the host's uplink)."""
    pid = os.getpid()
    return f"169.254.{90 + pid % 80}", f"100.{96 + pid % 32}.{(pid // 32) % 250}"


@pytest.mark.parametrize("host_prefix", ["c"], indirect=True)
async def test_console_on_booted_cpvm(
    tmp_path: Path,
    host_prefix: str,
    sysvm_image: Path,
    free_port: Callable[[], int],
    browser: Browser,
) -> None:
    control, public = _nets()
    host_ip, cpvm_public = f"{control}.1", f"{public}.10"
    api_port, agent_port = free_port(), free_port_any()
    home = tmp_path / "home"
    guest_name = f"{host_prefix}-guest"
    env = {k: v for k, v in os.environ.items() if k not in ("SYSVM_LIFECYCLE", "SYSVM_DEMO_GUEST")}
    env |= {
        "SYSVM_AGENT_URLS": f"wss://{host_ip}:{agent_port}",  # guests' VNC listens there too
        "SYSVM_HOST_PREFIX": host_prefix,  # whatever the manager's drivers make is ours
        "SYSVM_LOG_LEVEL": "INFO",
    }
    env.pop("SYSVM_GUEST_VNC_HOST", None)
    mlog = tmp_path / "manager.log"
    argv = manager_argv(home, api_port, agent_port)
    mgr = await start_manager(argv, mlog, env)
    driver = NspawnDriver(tmp_path / "vms", host_prefix, image_dir=sysvm_image)
    vm_id = ""
    try:
        await wait_for(lambda: "event=manager_ready" in read(mlog), 30, "manager ready")
        api = Api(json.loads((home / "credentials.json").read_text()))
        # one proxy is enough: the scaler must not boot more while the test runs
        await api("updateConfiguration", name="consoleproxy.capacity.standby", value="0")

        # --- the CPVM: record + boot data from the manager, booted by the nspawn driver
        out = tmp_path / "boot.jsonl"
        boot = await external_bootdata(argv, "consoleproxy", out, env)
        vm_id = boot["vm_id"]
        boot["extra"] = {**(boot.get("extra") or {}), "listen_host": cpvm_public}
        zone = boot["zone_id"]
        spec = VmSpec(
            vm_id=vm_id,
            name=boot["name"],
            role=boot["role"],
            boot_data=boot,
            nics=(
                NicSpec(kind="control", bridge=bridge_name(host_prefix, zone, "control"),
                        address=f"{control}.10/24", bridge_address=f"{host_ip}/24"),
                NicSpec(kind="public", bridge=bridge_name(host_prefix, zone, "public"),
                        address=f"{cpvm_public}/24", bridge_address=f"{public}.1/24"),
            ),
        )  # fmt: skip
        await driver.start(spec)
        assert await driver.wait_booted(vm_id, 60) in ("running", "degraded")

        async def proxy_up() -> bool:
            [vm] = (await api("listSystemVms", id=vm_id))["systemvm"]
            return bool(vm["agentstate"] == "Up")

        await wait_for(
            proxy_up, 90, f"CPVM agent up\n{await driver.console_log(vm_id)}", interval=0.25
        )

        # --- a guest with a VNC console, through the API
        vm = (await api("deployVirtualMachine", name=guest_name))["virtualmachine"]
        assert vm["state"] == "Running"
        assert "vnc" not in json.dumps(vm).lower()  # VNC details never leave the manager
        # its VNC listens on the control-bridge address (the CPVM's way to this host),
        # not on every address and not on loopback
        assert f"vnc={host_ip}:" in read(mlog)

        # --- createConsoleEndpoint: the URL names the CPVM's public address
        async def endpoint() -> dict[str, Any]:
            body = await api("createConsoleEndpoint", virtualmachineid=vm["id"])
            ep: dict[str, Any] = body["consoleendpoint"]
            return ep

        ep = await wait_for(endpoint_or_none(endpoint), 60, "a console endpoint", interval=0.25)
        url = ep["url"]
        assert ep["success"] is True
        assert urlsplit(url).hostname == cpvm_public, url
        assert ep["websocket"]["host"] == cpvm_public

        # --- Chromium on the host draws the guest's screen through the CPVM
        page = await browser.new_page(viewport={"width": 800, "height": 600})
        await page.goto(url)
        assert await wait_status(page, ("connected", "error", "disconnected")) == "connected"
        await page.wait_for_function(
            f"() => ({_LIT_JS})() > 0.5", timeout=int(30_000 * TIMING_FACTOR)
        )
        assert ep["websocket"]["token"] not in page.url  # the token left the address bar
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "console-system.png"))

        async def sessions() -> int:
            [p] = (await api("listSystemVms", id=vm_id))["systemvm"]
            return int(p.get("activeviewersessions", 0))

        await wait_for(sessions, 30, "the CPVM to report the session", interval=0.25)

        # --- the same URL again: refused (single use)
        page2 = await browser.new_page()
        await page2.goto(url)
        assert await wait_status(page2, ("connected", "error")) == "error"
        assert "already used" in (await page2.inner_text("#error")).lower()
        await page2.close()
        assert "event=console_refused" in read(mlog) and "code=used" in read(mlog)

        # --- a forged token: refused
        forged = url.replace(parse_qs(urlsplit(url).query)["token"][0], secrets.token_urlsafe(24))
        page3 = await browser.new_page()
        await page3.goto(forged)
        assert await wait_status(page3, ("connected", "error")) == "error"
        assert "refused" in (await page3.inner_text("#error")).lower()
        await page3.close()
        assert "code=unknown" in read(mlog)  # the manager refused it, not the page

        # --- a page of another Origin (the manager's API listener) opening the console
        # websocket with a fresh, valid token: refused before the token is even looked at
        ep2 = await endpoint()
        token2 = ep2["websocket"]["token"]
        ws_url = f"ws://{cpvm_public}/websockify?vm={vm['id']}&token={token2}"
        page4 = await browser.new_page()
        await page4.goto(f"http://127.0.0.1:{api_port}/metrics")
        assert await page4.evaluate(_WS_FROM_PAGE_JS, ws_url) == "closed:1006"
        await page4.close()
        _, journal, _ = await driver.exec_in(
            vm_id, ["journalctl", "--no-pager", "-o", "cat", "-g", "event=refused reason=origin"]
        )
        assert "reason=origin" in journal, "the CPVM did not refuse the foreign Origin"
        # ... and it was the Origin: the same token still opens the console from its page
        page5 = await browser.new_page()
        await page5.goto(ep2["url"])
        assert await wait_status(page5, ("connected", "error")) == "connected"
        await page5.close()
        await page.close()
        await wait_for(
            lambda: _zero(sessions), 30, "the CPVM to report the sessions closed", interval=0.25
        )

        # secrets stay out of the logs
        assert boot["token"] not in read(mlog)
        assert token2 not in read(mlog)
        assert ep["websocket"]["token"] not in read(mlog)
    finally:
        if vm_id:
            await driver.destroy(vm_id)
            assert await driver.state(vm_id) is PowerState.ABSENT
        await driver.close()
        if mgr.returncode is None:
            mgr.terminate()
            await asyncio.wait_for(mgr.wait(), 60)
        print(read(mlog)[-3000:])
    assert mgr.returncode == 0
    assert guest_qemu_pids(guest_name) == [], "a guest QEMU outlived the manager"


async def _zero(fn: Callable[[], Any]) -> bool:
    return bool(await fn() == 0)


def endpoint_or_none(fn: Callable[[], Any]) -> Callable[[], Any]:
    """createConsoleEndpoint until it succeeds: 533 while the CPVM has not reported where it
    listens yet (its first heartbeat)."""
    from cs import CloudStackApiException

    async def attempt() -> Any:
        try:
            return await fn()
        except CloudStackApiException as e:
            if "533" in str(e) or "no console proxy" in str(e) or "no reachable" in str(e):
                return None
            raise

    return attempt
