"""Fixtures for the console proxy integration tests: a real QEMU guest with a VNC password,
the real CPVM role server on loopback, and the real manager-side token logic in-process
(standing in only for the manager link, which is another engineer's part)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.roles.base import RequestFailed, RoleContext
from agent.roles.consoleproxy import ConsoleProxyRole
from manager.consoleproxy import tokens
from manager.guests import GuestManager, GuestVm

REPO = Path(__file__).resolve().parents[3]
NOVNC_DIR = REPO / "node_modules" / "@novnc" / "novnc"
TIMING = float(os.environ.get("SYSVM_TEST_TIMING", "1"))


@dataclass
class Clock:
    offset: float = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset


@dataclass
class Records:
    """ConsoleRecords over the guest manager, with an optional wrong password for a test."""

    guests: GuestManager
    password_override: dict[str, str] = field(default_factory=dict)
    extra: dict[str, tokens.ConsoleTarget] = field(default_factory=dict)  # non-QEMU endpoints

    async def console_target(self, vm_id: str) -> tokens.ConsoleTarget | None:
        if vm_id in self.extra:
            return self.extra[vm_id]
        t = await self.guests.console_target(vm_id)
        if t is not None and vm_id in self.password_override:
            return tokens.ConsoleTarget(
                t.vm_id, t.account_id, t.host, t.port, self.password_override[vm_id]
            )
        return t


@dataclass
class Console:
    role: ConsoleProxyRole
    storage: tokens.MemoryTokenStorage
    records: Records
    guests: GuestManager
    clock: Clock
    events: list[tuple[str, dict[str, Any]]]
    requests: list[dict[str, Any]]

    @property
    def port(self) -> int:
        assert self.role.server is not None
        return self.role.server.address[1]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def mint(self, vm: GuestVm, ttl: float = tokens.DEFAULT_TTL) -> str:
        return await tokens.mint(
            self.storage, vm_id=vm.id, account_id=vm.account_id, now=self.clock(), ttl=ttl
        )

    def page_url(self, vm_id: str, token: str) -> str:
        return f"http://127.0.0.1:{self.port}/console?vm={vm_id}&token={token}"

    def ws_url(self, vm_id: str, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/websockify?vm={vm_id}&token={token}"

    def counters(self) -> dict[str, int]:
        assert self.role.server is not None
        return dict(self.role.server.counters)


@pytest.fixture
async def guests(tmp_path: Path) -> AsyncIterator[GuestManager]:
    g = GuestManager(tmp_path / "guests", start_timeout=20 * TIMING)
    try:
        yield g
    finally:
        await g.close()


@pytest.fixture
async def guest_vm(guests: GuestManager) -> GuestVm:
    return await guests.deploy("console-test", account_id="acct-1")


def make_console_fixture(section: Mapping[str, Any] | None = None) -> Any:
    async def _console(guests: GuestManager, tmp_path: Path) -> AsyncIterator[Console]:
        assert (NOVNC_DIR / "core" / "rfb.js").is_file(), (
            f"noVNC missing at {NOVNC_DIR}: run `npm ci` (scripts/setup --dev does)"
        )
        storage = tokens.MemoryTokenStorage()
        records = Records(guests)
        guests.on_destroy(storage.drop_vm)
        clock = Clock()
        events: list[tuple[str, dict[str, Any]]] = []
        requests: list[dict[str, Any]] = []

        async def request(method: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
            # What manager.agentlink does with an agent's request: run the handler, turn a
            # refusal into ok=False (RequestFailed on the agent side).
            requests.append(dict(params))
            assert method == "console.authorize"
            try:
                return await tokens.handle_authorize_request(storage, records, params, clock())
            except tokens.ConsoleRefused as e:
                raise RequestFailed(method, str(e)) from e

        ctx = RoleContext(
            vm_id="cpvm-1",
            name="v-1-VM",
            zone_id="zone-1",
            role="consoleproxy",
            state_dir=tmp_path / "agent",
            request=request,
            notify=lambda name, data: events.append((name, dict(data))),
        )
        role = ConsoleProxyRole(ctx)
        config = {
            "settings": {"consoleproxy.loadscan.interval": 0.2},
            "consoleproxy": {
                "listen_host": "127.0.0.1",
                "listen_port": 0,
                "novnc_dir": str(NOVNC_DIR),
                "sweep_interval": 0.05,
                **(section or {}),
            },
        }
        await role.start(config)
        try:
            yield Console(role, storage, records, guests, clock, events, requests)
        finally:
            await role.stop()

    return pytest.fixture(_console)


console = make_console_fixture()
# Short timers and a small per-IP cap, for the limit tests.
console_short = make_console_fixture(
    {"idle_timeout": 1.0, "handshake_timeout": 1.0, "max_per_ip": 2}
)
