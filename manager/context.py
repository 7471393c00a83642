"""What handlers get: :class:`ManagerContext` (docs/internals.md, "manager/")."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from manager.agentlink import AgentLinks
    from manager.metrics import Metrics
    from manager.pki import Pki
    from manager.settings import Settings
    from manager.store.base import Store


@dataclass
class ManagerContext:
    home: Path
    store: Store
    settings: Settings
    metrics: Metrics
    links: AgentLinks
    pki: Pki
    clock: Callable[[], float] = time.time
    # name -> manager.hypervisor.base.Driver (typed loosely: drivers are registered by
    # manager.app from whatever hypervisor modules are present)
    hypervisors: dict[str, Any] = field(default_factory=dict)
    # wss:// URLs advertised to new VMs in their boot data
    agent_urls: list[str] = field(default_factory=list)
    # http://host:port/client/api, written into credentials.json by manager.bootstrap
    api_url: str = ""
