"""sd_notify for the agent (``READY=1``, ``STOPPING=1``) over ``$NOTIFY_SOCKET``; no-op when
not under systemd."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("sysvm.agent")


def notify(state: str) -> bool:
    addr: str | bytes = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if isinstance(addr, str) and addr.startswith("@"):
        addr = b"\0" + addr[1:].encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("event=sd_notify_failed error=%s", e)
        return False
    return True
