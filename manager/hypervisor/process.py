"""The ``process`` hypervisor: ``sysvm-agent`` as a plain host process (no image).

Each "VM" is one agent process in its own network namespace (NICs as veth pairs on the
zone bridges, like the nspawn driver), with boot data and a state directory of its own.
For fast tests and benchmarks. Clean stop: SIGTERM; forced: SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from manager.hypervisor.base import VmSpec, netns_name
from manager.hypervisor.hostvm import HostDriver, spawn


def default_agent_argv() -> list[str]:
    """The ``sysvm-agent`` beside this interpreter (the project's venv)."""
    exe = Path(sys.executable).with_name("sysvm-agent")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "agent.main"]


def agent_argv(base: Sequence[str], netns: str | None, vmdir: Path) -> list[str]:
    ns = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
    return [
        *ns,
        *base,
        "--bootdata",
        str(vmdir / "bootdata.json"),
        "--state-dir",
        str(vmdir / "agent-state"),
    ]


class ProcessDriver(HostDriver):
    name = "process"

    def __init__(
        self,
        state_dir: Path,
        prefix: str = "sv",
        agent: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        netns: bool = True,
    ) -> None:
        super().__init__(state_dir, prefix)
        self.agent = list(agent or default_agent_argv())
        self.env = dict(env or {})
        self.uses_netns = netns

    async def _prepare(self, spec: VmSpec, vmdir: Path) -> None:
        (vmdir / "agent-state").mkdir(mode=0o700, exist_ok=True)

    async def _launch(self, spec: VmSpec, vmdir: Path) -> asyncio.subprocess.Process:
        ns = netns_name(self.prefix, spec.vm_id) if self.uses_netns else None
        env = {**os.environ, **self.env, "SYSVM_VM_NAME": spec.name}
        return await spawn(
            spec.vm_id, agent_argv(self.agent, ns, vmdir), vmdir / "console.log", env
        )

    async def _request_shutdown(self, vm_id: str, run: Mapping[str, Any]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(run["pid"]), signal.SIGTERM)

    async def _destroy_disk(self, vm_id: str, vmdir: Path) -> None:
        shutil.rmtree(vmdir / "agent-state", ignore_errors=True)
