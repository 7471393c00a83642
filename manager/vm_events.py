"""Events and alerts about one system VM, in CloudStack's words (listEvents, listAlerts).

``record(tx, vm, what, level, description, alert=False, now)`` writes the event (type
``<ROLE>.<what>``, e.g. ``ROUTER.CONFIG.FAILED``) and, with ``alert``, the alert of the
VM's role (CloudStack's AlertManager types: 9 SSVM, 10 console proxy, 12 domain router)
inside the caller's transaction.
"""

from __future__ import annotations

import uuid
from typing import Any

from manager.store.base import Alert, Event, Role, SystemVm

ALERT_TYPES = {Role.SECONDARY_STORAGE: 9, Role.CONSOLE_PROXY: 10, Role.ROUTER: 12}
ALERT_NAMES = {
    Role.SECONDARY_STORAGE: "ALERT.SERVICE.SSVM",
    Role.CONSOLE_PROXY: "ALERT.SERVICE.CONSOLEPROXY",
    Role.ROUTER: "ALERT.SERVICE.DOMAINROUTER",
}
EVENT_PREFIX = {Role.SECONDARY_STORAGE: "SSVM", Role.CONSOLE_PROXY: "PROXY", Role.ROUTER: "ROUTER"}


def event_type(role: Role, what: str) -> str:
    return f"{EVENT_PREFIX[role]}.{what}"


async def record(
    tx: Any,
    vm: SystemVm,
    what: str,
    level: str,
    description: str,
    *,
    now: float,
    alert: bool = False,
) -> None:
    await tx.add_event(
        Event(
            id=str(uuid.uuid4()), type=event_type(vm.role, what), level=level,
            description=description, account_id=None, resource_id=vm.id, created=now,
        )
    )  # fmt: skip
    if alert:
        await tx.add_alert(
            Alert(
                id=str(uuid.uuid4()), type=ALERT_TYPES[vm.role], name=ALERT_NAMES[vm.role],
                subject=f"{vm.name}: {description}"[:200], description=description,
                zone_id=vm.zone_id, created=now,
            )
        )  # fmt: skip
