"""``sysvm-agent`` entry point: ``sysvm-agent [--bootdata PATH] [--state-dir DIR]``.

Reads the boot data, loads the role, enrols on first start, keeps the channel to the manager
and re-applies the last applied config at every start. SIGTERM/SIGINT stop it cleanly.
Environment: ``SYSVM_AGENT_RENEW_FRACTION`` (share of a certificate's lifetime after which it
is renewed, default 2/3), ``SYSVM_AGENT_BACKOFF_CAP`` (seconds, default 60),
``SYSVM_LOG_LEVEL``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from agent import sdnotify
from agent.bootdata import BootDataError, load
from agent.link import Agent, AgentOptions, default_state_dir
from agent.state import StateDir

log = logging.getLogger("sysvm.agent")


def _setup_logging(level: str | None) -> None:
    lvl = (level or os.environ.get("SYSVM_LOG_LEVEL", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    fmt = "level=%(levelname)s logger=%(name)s %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "ts=%(asctime)s.%(msecs)03dZ " + fmt
    formatter = logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = __import__("time").gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, lvl, logging.INFO))
    logging.getLogger("websockets").setLevel(logging.WARNING)


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        log.warning("event=bad_env name=%s", name)
        return default


def _ready() -> None:
    sdnotify.notify("READY=1")


async def _main(args: argparse.Namespace) -> int:
    try:
        boot = load(Path(args.bootdata) if args.bootdata else None)
    except BootDataError as e:
        log.error("event=bootdata_invalid error=%s", str(e).replace(" ", "_")[:300])
        return 2
    opts = AgentOptions(
        renew_fraction=_float_env("SYSVM_AGENT_RENEW_FRACTION", 2.0 / 3.0),
        backoff_cap=_float_env("SYSVM_AGENT_BACKOFF_CAP", 60.0),
        backoff_base=_float_env("SYSVM_AGENT_BACKOFF_BASE", 0.5),
    )
    agent = Agent(boot, StateDir(Path(args.state_dir)), options=opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.run(stop, ready=_ready)
    finally:
        sdnotify.notify("STOPPING=1")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sysvm-agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootdata", help="boot data JSON file (else the standard sources)")
    p.add_argument("--state-dir", default=str(default_state_dir()))
    p.add_argument("--log-level")
    args = p.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
