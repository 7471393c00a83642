"""The desired config of one system VM, rendered from current state (pure).

``render_config(vm, settings)`` returns the whole dict the agent applies; its version is the
VM's ``desired_version`` at the time of rendering. Because it is rendered from committed
state when it is sent, a push of version V carries every change committed up to V (and
possibly later ones — the agent then simply gets them early, and the next push is a no-op
for it). Role sections are added by :data:`SECTION_RENDERERS` (others register theirs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from manager.store.base import SystemVm


class AgentSettings(Protocol):
    def agent_settings(self, zone_id: str | None) -> dict[str, Any]: ...


# role section name -> renderer(vm, settings) -> section dict or None (omit)
SectionRenderer = Callable[[SystemVm, Any], "dict[str, Any] | None"]
SECTION_RENDERERS: dict[str, SectionRenderer] = {}


def register_section(name: str, renderer: SectionRenderer) -> None:
    """Lets a role's manager side add its section (e.g. ``router``) to every config."""
    if name == "settings":
        raise ValueError("the settings section is rendered by manager.desired itself")
    SECTION_RENDERERS[name] = renderer


def render_config(vm: SystemVm, settings: AgentSettings) -> dict[str, Any]:
    config: dict[str, Any] = {"settings": dict(settings.agent_settings(vm.zone_id))}
    for name, renderer in SECTION_RENDERERS.items():
        section = renderer(vm, settings)
        if section is not None:
            config[name] = section
    return config
