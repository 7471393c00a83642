"""A minimal QMP (QEMU Machine Protocol) client over a unix socket.

JSON lines; after the greeting, ``qmp_capabilities`` enters command mode. Asynchronous
events (objects with an ``event`` key) may arrive between a command and its reply; they are
skipped. Every wait is under a timeout.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: Path, within: float = 5.0) -> Qmp:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
            qmp = cls(reader, writer)
            greeting = await qmp._read()
            if "QMP" not in greeting:
                writer.close()
                raise QmpError("not a QMP greeting")
            await qmp.execute("qmp_capabilities", within=within)
        return qmp

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QmpError("QMP connection closed")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QmpError("bad QMP line") from e
        if not isinstance(msg, dict):
            raise QmpError("bad QMP message")
        return msg

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, within: float = 5.0
    ) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        async with self._lock, asyncio.timeout(within):
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
            while True:
                reply = await self._read()
                if "event" in reply:
                    continue
                if "error" in reply:
                    err = reply["error"]
                    desc = err.get("desc", "?") if isinstance(err, dict) else str(err)
                    raise QmpError(f"{command}: {desc}")
                return reply.get("return")

    async def close(self) -> None:
        self._writer.close()
        try:
            async with asyncio.timeout(2):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            pass
