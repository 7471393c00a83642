"""sd_notify without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

``READY=1`` once serving, ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` (only while the event
loop is alive — a stuck loop stops the pings and systemd restarts us), ``STOPPING=1`` on a
graceful stop. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("sysvm.systemd")


def notify_address(env: dict[str, str] | os._Environ[str]) -> str | bytes | None:
    """Pure: the socket address from ``NOTIFY_SOCKET`` ('@' = Linux abstract namespace)."""
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):
        return b"\0" + addr[1:].encode()
    if addr.startswith("/"):
        return addr
    return None  # vsock etc. not supported


def watchdog_interval(env: dict[str, str] | os._Environ[str], pid: int) -> float | None:
    """Pure: seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if off."""
    usec = env.get("WATCHDOG_USEC", "")
    wpid = env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if wpid and wpid != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Notifier:
    def __init__(self, env: dict[str, str] | os._Environ[str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = notify_address(env)
        self.watchdog = watchdog_interval(env, os.getpid())

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(state.encode())
        except OSError as e:
            log.warning("event=sd_notify_failed state=%s error=%s", state.split("=")[0], e)
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    async def run_watchdog(self) -> None:
        """Pings until cancelled; returns at once if no watchdog was asked for."""
        if self.watchdog is None or self.address is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog)
