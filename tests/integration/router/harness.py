"""Runs the router role inside the VR's network namespace for the integration tests.

Started as ``ip netns exec <vr> python harness.py --state-dir D --run-dir R --name N``.
Speaks JSON lines: commands on stdin (``{"op": "start"|"apply"|"status"|"stats"|"stop",
...}``), one reply line per command on stdout (``{"ok": true, ...}`` or ``{"ok": false,
"error": ...}``). The role's ``ctx.request`` is relayed to the test as a ``{"request":
method, "params": ...}`` line; the test answers with ``{"op": "reply", "ok": bool,
"result": {...}}`` — so stats go through a real request/ack exchange.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.roles import load
from agent.roles.base import ApplyError, LinkDown, RequestFailed, RoleContext


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--name", default="r-1-VM")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    link_up = True

    def out(obj: Mapping[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def request(method: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        if not link_up:
            raise LinkDown("harness link down")
        out({"request": method, "params": dict(params)})
        reply = await replies.get()
        if not reply.get("ok"):
            raise RequestFailed(method, str(reply.get("error", "")))
        return dict(reply.get("result", {}))

    async def pump() -> None:
        while line := await reader.readline():
            msg = json.loads(line)
            if msg.get("op") == "reply":
                await replies.put(msg)
            else:
                await commands.put(msg)
        await commands.put(None)

    ctx = RoleContext(
        vm_id="vm-1",
        name=args.name,
        zone_id="z-1",
        role="domainrouter",
        state_dir=Path(args.state_dir),
        extra={"router_run_dir": args.run_dir},
        request=request,
    )
    role = load("domainrouter", ctx)
    async with asyncio.TaskGroup() as tg:
        pumper = tg.create_task(pump())
        while (msg := await commands.get()) is not None:
            op = msg.get("op")
            try:
                if op == "start":
                    await role.start(msg.get("applied"))
                    out({"ok": True, "status": role.status()})
                elif op == "apply":
                    await role.apply(msg["config"])
                    out({"ok": True, "status": role.status()})
                elif op == "status":
                    out({"ok": True, "status": role.status()})
                elif op == "link":
                    link_up = bool(msg["up"])
                    out({"ok": True})
                elif op == "stats":
                    await role.collect_stats()  # type: ignore[attr-defined]
                    out({"ok": True, "status": role.status()})
                elif op == "stop":
                    await role.stop()
                    out({"ok": True})
                    break
                else:
                    out({"ok": False, "error": f"unknown op {op}"})
            except ApplyError as e:
                out({"ok": False, "error": e.reason})
        pumper.cancel()


if __name__ == "__main__":
    asyncio.run(main())
