"""``sysvm-manager`` entry point.

- ``sysvm-manager [--home H] [--api-listen HOST:PORT] [--agent-listen HOST:PORT]
  [--agent-urls wss://...]`` — the daemon, in the foreground (env ``SYSVM_HOME``,
  ``SYSVM_API_LISTEN``, ``SYSVM_AGENT_LISTEN``, ``SYSVM_AGENT_URLS``).
- ``sysvm-manager create-external-vms --role R --count N --out FILE.jsonl [--zone ID]`` —
  creates VM records on the ``External`` hypervisor and writes their boot data, one JSON
  object per line (the file is 0600: it holds enrolment tokens).
- ``sysvm-manager external-bootdata --out FILE.jsonl [--role R] [--zone ID] [--vm ID ...]`` —
  boot data, with fresh enrolment tokens, for VMs that already exist on the ``External``
  hypervisor (e.g. the routers createNetwork made when nothing here boots them). Each
  VM's unused older token is replaced. VMs on other hypervisors are refused by name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from manager import logs
from manager.app import ConfigError, DaemonConfig, make_config, run
from manager.enrolment import issue_token, make_bootdata
from manager.pki import Pki
from manager.settings import Settings
from manager.store import open_store
from manager.store.base import Role, SystemVm, VmState

log = logging.getLogger("sysvm.manager")

ROLE_ALIASES = {
    "consoleproxy": Role.CONSOLE_PROXY,
    "cpvm": Role.CONSOLE_PROXY,
    "secondarystorage": Role.SECONDARY_STORAGE,
    "ssvm": Role.SECONDARY_STORAGE,
    "domainrouter": Role.ROUTER,
    "router": Role.ROUTER,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sysvm-manager", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", help="state directory (env SYSVM_HOME, default /var/lib/sysvm)")
    p.add_argument("--api-listen", help="HOST:PORT of the API (env SYSVM_API_LISTEN)")
    p.add_argument("--agent-listen", help="HOST:PORT of the agent endpoint (SYSVM_AGENT_LISTEN)")
    p.add_argument("--agent-urls", help="comma list of wss:// URLs given to VMs")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (env SYSVM_LOG_LEVEL)")
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("create-external-vms", help="create VM records + boot data (JSONL)")
    c.add_argument("--role", required=True, choices=sorted(ROLE_ALIASES))
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--zone", help="zone id (default: the first zone)")
    b = sub.add_parser("external-bootdata", help="boot data for existing External VMs (JSONL)")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--role", choices=sorted(ROLE_ALIASES), help="only VMs of this role")
    b.add_argument("--zone", help="only VMs in this zone")
    b.add_argument("--vm", action="append", default=[], help="only this VM id (repeatable)")
    return p


async def create_external_vms(
    cfg: DaemonConfig, role: Role, count: int, out: Path, zone_id: str | None
) -> int:
    if not 1 <= count <= 100_000:
        raise ConfigError("--count must be between 1 and 100000")
    pki = Pki.open(cfg.home)
    store = await open_store(cfg.home)
    try:
        settings = Settings(store)
        await settings.load()
        zones = await store.list_zones()
        if zone_id is None:
            if not zones:
                raise ConfigError("no zone yet: start sysvm-manager once (it creates one)")
            zone_id = zones[0].id
        elif zone_id not in {z.id for z in zones}:
            raise ConfigError(f"no zone with id {zone_id!r}")
        ttl = float(settings.get("sysvm.enrolment.token.ttl"))
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            done = 0
            while done < count:
                n = min(500, count - done)
                lines = []
                async with store.transaction() as tx:
                    now = time.time()
                    for _ in range(n):
                        vm = await tx.create_system_vm(
                            role=role, zone_id=zone_id, hypervisor="External"
                        )
                        # Version 1 = its first config, pushed when its agent says hello.
                        await tx.bump_desired([vm.id])
                        token = await issue_token(tx, vm.id, ttl, now)
                        boot = make_bootdata(
                            vm,
                            manager_urls=cfg.agent_urls,
                            ca_fingerprint=pki.ca_fingerprint,
                            token=token,
                        )
                        lines.append(json.dumps(boot, separators=(",", ":")))
                f.write("".join(line + "\n" for line in lines))
                done += n
            f.flush()
            os.fsync(f.fileno())
    finally:
        await store.close()
    log.info("event=external_vms_created role=%s count=%d out=%s", role.value, count, out)
    return 0


def _write_secret_lines(out: Path, lines: list[str]) -> None:
    """JSON lines holding enrolment tokens: created 0600 before anything is written."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def pick_external(
    vms: list[SystemVm], role: Role | None, zone_id: str | None, wanted: list[str]
) -> list[SystemVm]:
    """Pure: the live VMs ``external-bootdata`` writes boot data for. Raises ConfigError
    naming a wanted VM that does not exist, is gone, or is not on ``External``."""
    by_id = {vm.id: vm for vm in vms}
    for vm_id in wanted:
        vm = by_id.get(vm_id)
        if vm is None:
            raise ConfigError(f"no VM with id {vm_id!r}")
        if vm.state in (VmState.DESTROYED, VmState.EXPUNGING):
            raise ConfigError(f"VM {vm.name} is {vm.state.value}")
        if vm.hypervisor != "External":
            raise ConfigError(
                f"VM {vm.name} runs on the {vm.hypervisor} hypervisor, which boots it with "
                "its own boot data; only External VMs get boot data here"
            )
    return [
        vm
        for vm in vms
        if vm.hypervisor == "External"
        and vm.state not in (VmState.DESTROYED, VmState.EXPUNGING)
        and (role is None or vm.role is role)
        and (zone_id is None or vm.zone_id == zone_id)
        and (not wanted or vm.id in wanted)
    ]


async def external_bootdata(
    cfg: DaemonConfig, role: Role | None, zone_id: str | None, wanted: list[str], out: Path
) -> int:
    pki = Pki.open(cfg.home)
    store = await open_store(cfg.home)
    try:
        settings = Settings(store)
        await settings.load()
        ttl = float(settings.get("sysvm.enrolment.token.ttl"))
        vms = pick_external(await store.list_system_vms(), role, zone_id, wanted)
        if not vms:
            raise ConfigError("no live VM on the External hypervisor matches")
        lines = []
        async with store.transaction() as tx:
            now = time.time()
            for vm in vms:
                token = await issue_token(tx, vm.id, ttl, now)
                boot = make_bootdata(
                    vm, manager_urls=cfg.agent_urls, ca_fingerprint=pki.ca_fingerprint, token=token
                )
                lines.append(json.dumps(boot, separators=(",", ":")))
        _write_secret_lines(out, lines)
    finally:
        await store.close()
    log.info("event=external_bootdata_written count=%d out=%s", len(lines), out)
    return 0


def raise_nofile_limit() -> None:
    """One socket per agent: lift the soft fd limit to the hard one (systemd's unit sets
    LimitNOFILE; a shell's default soft limit of 1024 would cap the fleet)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:  # pragma: no cover
        log.warning("event=nofile_limit_unchanged error=%s", e)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_level)
    raise_nofile_limit()
    try:
        cfg = make_config(
            os.environ, args.home, args.api_listen, args.agent_listen, args.agent_urls
        )
    except ConfigError as e:
        print(f"sysvm-manager: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - non-Linux
        pass
    runner = asyncio.run
    try:
        if args.cmd == "create-external-vms":
            return int(
                runner(
                    create_external_vms(
                        cfg, ROLE_ALIASES[args.role], args.count, args.out, args.zone
                    )
                )
            )
        if args.cmd == "external-bootdata":
            role = ROLE_ALIASES[args.role] if args.role else None
            return int(runner(external_bootdata(cfg, role, args.zone, args.vm, args.out)))
        return int(runner(run(cfg)))
    except ConfigError as e:
        print(f"sysvm-manager: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - signal handlers take SIGINT once running
        return 130


if __name__ == "__main__":
    sys.exit(main())
