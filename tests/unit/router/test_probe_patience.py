"""Verify checks tell slow from broken: a probe that gets no answer in time says so
(``timed_out``), and the router's verify step asks a late service again with twice the
limit, within the role's timeout, while a refusal fails at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.roles.base import RoleContext
from agent.roles.router import probes, render
from agent.roles.router.role import PROBE_LIMIT, RouterRole
from tests.unit.router.test_config_render import ENV


async def test_a_silent_service_times_out_and_a_closed_port_is_refused() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never sends a banner

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(probes.ProbeError) as late:
            await probes.ssh_banner("127.0.0.1", port, limit=0.2)
        assert late.value.timed_out
        assert str(late.value) == f"ssh 127.0.0.1:{port}: no answer within 0.2 s"
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(probes.ProbeError) as refused:
        await probes.ssh_banner("127.0.0.1", port, limit=0.2)  # nobody listens now
    assert not refused.value.timed_out
    assert str(refused.value).startswith(f"ssh 127.0.0.1:{port}: ")
    assert "no answer" not in str(refused.value)


def role(tmp_path: Path, timeout: float) -> RouterRole:
    ctx = RoleContext(
        vm_id="v", name="r-1-VM", zone_id="z", role="domainrouter", state_dir=tmp_path
    )
    return RouterRole(ctx, render.Paths(tmp_path / "run", tmp_path / "state"), ENV, timeout=timeout)


async def test_a_late_answer_is_asked_again_with_twice_the_limit(tmp_path: Path) -> None:
    r = role(tmp_path, timeout=30.0)
    limits: list[float] = []

    async def probe(name: str, limit: float = PROBE_LIMIT) -> str:
        limits.append(limit)
        if len(limits) < 3:
            raise probes.ProbeError(f"{name}: no answer", timed_out=True)
        return "ok"

    r._probe = probe  # type: ignore[method-assign]
    assert await r._probe_patiently("sshd") == "ok"
    assert limits == [PROBE_LIMIT, 2 * PROBE_LIMIT, 4 * PROBE_LIMIT]


async def test_a_refusal_fails_at_once_and_patience_ends_with_the_timeout(
    tmp_path: Path,
) -> None:
    r = role(tmp_path, timeout=5.0 * PROBE_LIMIT)
    limits: list[float] = []

    async def refused(name: str, limit: float = PROBE_LIMIT) -> str:
        limits.append(limit)
        raise probes.ProbeError(f"{name}: connection refused")

    r._probe = refused  # type: ignore[method-assign]
    with pytest.raises(probes.ProbeError, match="refused"):
        await r._probe_patiently("apache")
    assert limits == [PROBE_LIMIT]

    limits.clear()

    async def silent(name: str, limit: float = PROBE_LIMIT) -> str:
        limits.append(limit)
        raise probes.ProbeError(f"{name}: no answer", timed_out=True)

    r._probe = silent  # type: ignore[method-assign]
    with pytest.raises(probes.ProbeError, match="no answer"):
        await r._probe_patiently("dnsmasq")
    # 1 + 2 waited; another 4 would pass the role's 5-limit budget.
    assert limits == [PROBE_LIMIT, 2 * PROBE_LIMIT]
