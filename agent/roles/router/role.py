"""The virtual router role: applies ``config["router"]`` atomically and supervises the
router's daemons (dnsmasq, haproxy, apache2, sshd) as its children.

``apply``: parse → render → test everything (``iptables-restore --test``, ``dnsmasq
--test``, ``haproxy -c``, ``apache2 -t``, ``sshd -t``) → remember the current state →
write files, restore the changed tables, reload only the daemons whose files changed →
verify (read back our chains with ``iptables-save``; DNS query, haproxy stats socket, HTTP
GET, SSH banner) → on any failure put everything back and raise ``ApplyError`` naming the
failing line. Nothing changed → nothing touched (no restore, no reload, counters kept).
After a successful apply, addresses just added (and all guest/public ones when the
config's ``announce`` generation changed) are announced by gratuitous ARP (``garp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import json
import logging
import os
import pwd
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.roles.base import ApplyError, LinkDown, RequestFailed, RoleContext
from agent.roles.router import garp, plan, probes, stats
from agent.roles.router import iptables as ipt
from agent.roles.router.config import ConfigError, RouterConfig, parse
from agent.roles.router.proc import CommandError, Daemon, kill_group, run, stale_groups
from agent.roles.router.render import (
    FILE_NAMES,
    STATS_CHAINS,
    TABLES,
    Env,
    Paths,
    Rendered,
    RestoreInput,
    Rules,
    render,
    render_files,
    restore_input,
)
from agent.state import atomic_write

log = logging.getLogger("sysvm.agent.router")

STATS_FILE = "router-stats.json"
STATS_METHOD = "router.stats"
PROBE_LIMIT = 1.0  # seconds a verify check first waits for an answer (doubled when late)


class _Failed(Exception):
    """An apply step failed; ``reason`` is what the manager is told."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Snapshot:
    """What is in place before an apply, to put back on failure."""

    tables: dict[str, ipt.TableState]
    files: dict[str, bytes | None]
    vmdata_target: str | None
    rendered: Rendered | None
    cfg: RouterConfig | None


def detect_env(router_name: str) -> Env:
    def user(name: str) -> str | None:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return None
        return name

    def group(name: str) -> str | None:
        try:
            grp.getgrnam(name)
        except KeyError:
            return None
        return name

    return Env(
        router_name=router_name if _hostname_ok(router_name) else "router",
        apache_user=user("www-data"),
        apache_group=group("www-data"),
        dnsmasq_user=user("dnsmasq"),
        haproxy_user=user("haproxy") if group("haproxy") else None,
    )


def _hostname_ok(name: str) -> bool:
    return 0 < len(name) <= 63 and all(c.isalnum() or c == "-" for c in name) and name[0] != "-"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class RouterRole:
    def __init__(
        self,
        ctx: RoleContext,
        paths: Paths | None = None,
        env: Env | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.ctx = ctx
        run_dir = Path(str(ctx.extra.get("router_run_dir", "/run/sysvm-router")))
        self.paths = paths or Paths(run_dir=run_dir, state_dir=Path(ctx.state_dir) / "router")
        self.env = env or detect_env(ctx.name)
        self.timeout = timeout
        self.cfg: RouterConfig | None = None
        self.rendered: Rendered | None = None
        self._section: Any = None  # the config["router"] last applied (not mutated by callers)
        self.daemons: dict[str, Daemon] = {}
        self._lock = asyncio.Lock()
        self._stats_task: asyncio.Task[None] | None = None
        self._stats_wake = asyncio.Event()
        self._garp_tasks: set[asyncio.Task[None]] = set()  # later rounds of announcements
        self.garp_sent = 0  # gratuitous ARP frames sent since start
        self.book = self._load_book()
        self.last_error = ""
        self.applies = 0
        self.last_apply_seconds = 0.0
        self.last_actions: dict[str, str] = {}
        self.last_phases: dict[str, float] = {}
        self.last_restored: tuple[str, ...] = ()

    # --- Role interface ------------------------------------------------------------

    async def start(self, applied: Mapping[str, Any] | None) -> None:
        self._prepare_dirs()
        await self._kill_stale()
        if applied is not None:
            try:
                await self.apply(applied)
                log.info("event=router_boot_reapplied")
            except ApplyError as e:
                log.error("event=router_boot_reapply_failed reason=%s", e.reason)
        self._stats_task = asyncio.create_task(self._stats_loop(), name="router-stats")

    async def apply(self, config: Mapping[str, Any]) -> None:
        section = config.get("router") if isinstance(config, Mapping) else None
        if section is None:
            raise ApplyError("config has no router section")
        async with self._lock:
            t0 = time.monotonic()
            try:
                if section == self._section and self.cfg is not None and self.rendered:
                    # Same desired config as last applied (a re-push, a boot re-apply of
                    # a running agent): no need to parse and render it again.
                    cfg, new = self.cfg, self.rendered
                    save = await self._iptables_save()
                else:
                    # Parse + render (CPU, in a thread) while iptables-save reads the kernel.
                    async with asyncio.TaskGroup() as tg:
                        saving = tg.create_task(self._iptables_save())
                        rendering = tg.create_task(asyncio.to_thread(self._parse_render, section))
                    cfg, new = rendering.result()
                    save = saving.result()
                await self._apply(cfg, new, save)
                self._section = section
            except* ConfigError as eg:
                self._section = None
                self.last_error = f"invalid config: {eg.exceptions[0]}"
                raise ApplyError(self.last_error) from None
            except* (_Failed, CommandError, OSError) as eg:
                self._section = None
                e = eg.exceptions[0]
                self.last_error = e.reason if isinstance(e, _Failed) else str(e)
                log.error("event=router_apply_failed reason=%s", self.last_error)
                raise ApplyError(self.last_error) from None
            self.last_error = ""
            self.applies += 1
            self.last_apply_seconds = time.monotonic() - t0
            marks = sorted(self.last_phases.items(), key=lambda kv: kv[1])
            steps = " ".join(
                f"t_{a}={b_t - a_t:.3f}" for (a, a_t), (_b, b_t) in itertools.pairwise(marks)
            )
            log.info(
                "event=router_applied seconds=%.3f %s restored=%s actions=%s",
                self.last_apply_seconds,
                steps,
                ",".join(self.last_restored) or "-",
                ",".join(f"{k}:{v}" for k, v in self.last_actions.items()) or "-",
            )
        self._stats_wake.set()  # the interval may have changed

    def status(self) -> dict[str, Any]:
        return {
            "applied": self.cfg is not None,
            "error": self.last_error,
            "daemons": {n: d.status for n, d in self.daemons.items()},
            "pids": {n: d.pid for n, d in self.daemons.items()},
            "stats_pending": len(self.book.pending),
            "last_apply_seconds": round(self.last_apply_seconds, 4),
            "last_actions": dict(self.last_actions),
            "last_restored": list(self.last_restored),
            "garp_sent": self.garp_sent,
            "garp_pending": len(self._garp_tasks),
        }

    async def stop(self) -> None:
        task, self._stats_task = self._stats_task, None
        for t in [task, *self._garp_tasks]:
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        # Planned stop: account the last counters so nothing is lost.
        if self.cfg is not None:
            with contextlib.suppress(CommandError, OSError):
                await self.collect_stats()
        for name in reversed(plan.ORDER):
            d = self.daemons.pop(name, None)
            if d is not None:
                await d.stop()

    # --- apply ---------------------------------------------------------------------

    async def _kill_stale(self) -> None:
        """Daemons of a previous agent run (agent crashed, VM did not reboot) still hold
        their ports: kill their process groups. Their pid files are stale either way (a
        zombie's pid makes apache say "already running")."""
        daemons = frozenset({"dnsmasq", "haproxy", "apache2", "sshd"})
        for pgid in stale_groups(f"{self.paths.run_dir}/", daemons):
            if pgid != os.getpgid(0):
                log.warning("event=router_stale_daemon pgid=%s", pgid)
                await kill_group(pgid)
        (self.paths.run_dir / "apache2.pid").unlink(missing_ok=True)

    def _prepare_dirs(self) -> None:
        self.paths.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(self.paths.run_dir, 0o755)  # noqa: S103 - daemons' users must traverse it
        self.paths.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _mkdir(self.paths.www, 0o755)
        health = self.paths.www / "health"
        if not health.exists():
            atomic_write(health, b"ok\n", 0o644)
        _mkdir(Path("/run/sshd"), 0o755)  # sshd's privilege separation dir
        leases = self.paths.leases.parent
        _mkdir(leases, 0o755)
        if self.env.dnsmasq_user:
            pw = pwd.getpwnam(self.env.dnsmasq_user)
            os.chown(leases, pw.pw_uid, pw.pw_gid)

    async def _ensure_host_key(self) -> None:
        key = self.paths.host_key
        if key.exists():
            return
        await run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sysvm-router", "-f", str(key)],
            limit=self.timeout,
        )
        os.chmod(key, 0o600)

    def _parse_render(self, section: Any) -> tuple[RouterConfig, Rendered]:
        cfg = parse(section)
        return cfg, render(cfg, self.paths, self.env)

    async def _apply(self, cfg: RouterConfig, new: Rendered, save: str) -> None:
        self._prepare_dirs()
        if "sshd_config" in new.files:
            await self._ensure_host_key()
        phases = self.last_phases = {"prepare": time.monotonic()}
        current = ipt.parse_save(save)
        # Only the chains whose rules differ are restored (the rest keep their counters).
        chains: dict[str, set[str]] = {}
        for t in TABLES:
            st = current.get(t)
            cs = ipt.changed_chains(t, st, new.tables[t].by_chain())
            if cs or ipt.missing_jumps(t, st):
                chains[t] = cs
        tables = {t: new.tables[t] for t in chains}
        snap = _Snapshot(
            tables=current,
            files={n: _read(self.paths.file(n)) for n in FILE_NAMES},
            vmdata_target=_readlink(self.paths.www / "vmdata"),
            rendered=self.rendered,
            cfg=self.cfg,
        )
        changed = {n for n in FILE_NAMES if new.files.get(n) != snap.files[n]}
        # 1. Test everything before touching anything.
        phases["test"] = time.monotonic()
        if chains or changed:
            await self._test(cfg, tables, chains, current, changed)
        phases["apply"] = time.monotonic()
        # 2. Apply, then verify; on any failure put everything back.
        restored: list[str] = []
        try:
            if chains.get("mangle", set()) & STATS_CHAINS:
                self._stats_before_recount(current)
            added = await self._ensure_network(new, snap.rendered)
            self._write_files(new, changed)
            self._write_vmdata(new)
            restored.extend(tables)
            await self._restore(tables, chains, current, test=False)
            self.cfg, self.rendered = cfg, new
            actions = plan.daemon_actions(changed, set(new.files), self._running())
            phases["daemons"] = time.monotonic()
            await self._act(actions)
            phases["verify"] = time.monotonic()
            await self._verify(new, reread=bool(chains))
            phases["end"] = time.monotonic()
        except (_Failed, CommandError, OSError, probes.ProbeError) as e:
            reason = e.reason if isinstance(e, _Failed) else str(e)
            await self._rollback(snap, new, changed, {t: chains[t] for t in restored})
            raise _Failed(reason) from None
        self.last_actions = actions
        self.last_restored = tuple(restored)
        old_announce = snap.cfg.announce if snap.cfg is not None else None
        targets = plan.garp_targets(new.garp, added, old_announce, cfg.announce)
        if targets:
            bumped = old_announce is not None and old_announce != cfg.announce
            self._announce(targets, "announce" if bumped else "new_addresses")

    async def _iptables_save(self, table: str | None = None, *, counters: bool = True) -> str:
        argv = ["iptables-save"] + (["-c"] if counters else []) + (["-t", table] if table else [])
        return (await run(argv, limit=self.timeout)).stdout.decode()

    async def _restore(
        self,
        tables: Mapping[str, Rules],
        chains: Mapping[str, set[str]],
        state: Mapping[str, ipt.TableState],
        *,
        test: bool,
    ) -> None:
        """One ``iptables-restore --noflush`` for all changed chains of all tables (one
        process, one read of the kernel's ruleset); a failure names the line, its rule and
        the config item that made it."""
        if not tables:
            return
        jumps = {t: ipt.missing_jumps(t, state.get(t)) for t in tables}
        inp = restore_input(tables, chains, jumps)
        argv = ["iptables-restore", "--noflush"] + (["--test"] if test else [])
        try:
            await run(argv, input=inp.text.encode(), limit=self.timeout)
        except CommandError as e:
            raise _Failed(_explain_restore(inp, e)) from None

    async def _test(
        self,
        cfg: RouterConfig,
        tables: Mapping[str, Rules],
        chains: Mapping[str, set[str]],
        current: Mapping[str, ipt.TableState],
        changed: set[str],
    ) -> None:
        staging = self.paths.run_dir / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        _mkdir(staging, 0o755, exist_ok=False)
        try:
            spaths = Paths(run_dir=staging, state_dir=self.paths.state_dir)
            cand = render_files(cfg, spaths, self.env)
            for name, data in cand.items():
                atomic_write(spaths.file(name), data, 0o644)
            _mkdir(spaths.leases.parent, 0o755)
            _mkdir(spaths.www, 0o755)
            checks: list[tuple[str, list[str]]] = []
            if changed & {"dnsmasq_conf", "dhcp_hosts", "hosts"}:
                checks.append(("dnsmasq", ["dnsmasq", "--test", "-C", str(spaths.dnsmasq_conf)]))
            if "haproxy_cfg" in changed:
                checks.append(("haproxy", ["haproxy", "-c", "-q", "-f", str(spaths.haproxy_cfg)]))
            if "apache_conf" in changed:
                checks.append(("apache2", ["apache2", "-t", "-f", str(spaths.apache_conf)]))
            if "sshd_config" in changed and "sshd_config" in cand:
                checks.append(("sshd", ["/usr/sbin/sshd", "-t", "-f", str(spaths.sshd_config)]))

            async def one(name: str, argv: list[str]) -> None:
                try:
                    await run(argv, limit=self.timeout)
                except CommandError as e:
                    raise _Failed(f"{name} config test failed: {e.stderr.strip()[-500:]}") from None

            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._restore(tables, chains, current, test=True))
                for name, argv in checks:
                    tg.create_task(one(name, argv))
        except* _Failed as eg:
            raise _Failed("; ".join(str(e) for e in eg.exceptions)) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_files(self, new: Rendered, changed: set[str]) -> None:
        for name in sorted(changed):
            path = self.paths.file(name)
            data = new.files.get(name)
            if data is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, data, 0o644)

    def _write_vmdata(self, new: Rendered) -> None:
        """Per-guest data in a directory named by its hash; ``www/vmdata`` is a symlink
        swapped atomically (rename over it), so apache never sees a half-written tree."""
        target = f"vmdata.{new.vmdata_id}"
        link = self.paths.www / "vmdata"
        if _readlink(link) == target:
            return
        d = self.paths.www / target
        if not d.exists():
            tmp = self.paths.www / f".{target}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _mkdir(tmp, 0o755, exist_ok=False)
            gid = grp.getgrnam(self.env.apache_group).gr_gid if self.env.apache_group else -1
            for rel, data in sorted(new.vmdata.items()):
                p = tmp / rel
                _mkdir(p.parent, 0o755, parents=True)
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                with os.fdopen(fd, "wb") as f:
                    if gid != -1:
                        os.fchown(f.fileno(), 0, gid)
                    os.fchmod(f.fileno(), 0o640)  # the umask (0077) narrowed os.open's mode
                    f.write(data)
            os.rename(tmp, d)
        self._swap_link(target)

    def _swap_link(self, target: str | None) -> None:
        link = self.paths.www / "vmdata"
        if target is None:
            link.unlink(missing_ok=True)
        else:
            tmp = self.paths.www / ".vmdata.link.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)
        keep = {target}
        for p in self.paths.www.glob("vmdata.*"):  # old trees
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    async def _ensure_network(self, new: Rendered, old: Rendered | None) -> dict[str, set[str]]:
        """Links up, exactly the rendered addresses, the default route, ip_forward;
        returns the addresses added (device -> ``ip/prefix``)."""
        out = await run(["ip", "-j", "addr", "show"], limit=self.timeout)
        current: dict[str, set[str]] = {}
        up: dict[str, bool] = {}
        for link in json.loads(out.stdout or b"[]"):
            dev = link.get("ifname", "")
            up[dev] = "UP" in link.get("flags", [])
            current[dev] = {
                f"{a['local']}/{a['prefixlen']}"
                for a in link.get("addr_info", [])
                if a.get("family") == "inet"
            }
        for dev in new.addresses:
            if dev not in current:
                raise _Failed(f"interface {dev} does not exist")
        cmds = [f"link set dev {dev} up" for dev in sorted(new.addresses) if not up.get(dev)]
        cmds += plan.address_commands(new.addresses, current)
        added = plan.added_addresses(new.addresses, current)
        if new.default_route is not None:
            gw, dev = new.default_route
            r = await run(["ip", "-j", "route", "show", "default"], limit=self.timeout)
            routes = json.loads(r.stdout or b"[]")
            if not any(x.get("gateway") == gw and x.get("dev") == dev for x in routes):
                cmds.append(f"route replace default via {gw} dev {dev}")
        if cmds:
            await run(
                ["ip", "-batch", "-"], input=("\n".join(cmds) + "\n").encode(), limit=self.timeout
            )
        _set_forwarding(new.forwarding)
        return added

    # --- gratuitous ARP ------------------------------------------------------------

    def _announce(self, targets: Mapping[str, tuple[str, ...]], reason: str) -> None:
        """First round now, the others (``garp.SCHEDULE``) from a task the role owns."""
        log.info(
            "event=router_announce reason=%s devices=%s addresses=%s",
            reason,
            ",".join(sorted(targets)),
            sum(len(v) for v in targets.values()),
        )
        t0 = asyncio.get_running_loop().time()
        self._garp_round(targets)
        if len(garp.SCHEDULE) > 1:
            task = asyncio.create_task(self._garp_later(targets, t0), name="router-garp")
            self._garp_tasks.add(task)
            task.add_done_callback(self._garp_tasks.discard)

    async def _garp_later(self, targets: Mapping[str, tuple[str, ...]], t0: float) -> None:
        loop = asyncio.get_running_loop()
        for at in garp.SCHEDULE[1:]:
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            self._garp_round(targets)

    def _garp_round(self, targets: Mapping[str, tuple[str, ...]]) -> None:
        """Never raises: a router that cannot announce still works (peers learn the new
        MAC when their entries expire)."""
        for dev, ips in sorted(targets.items()):
            try:
                self.garp_sent += garp.send(dev, ips)
            except Exception as e:  # OSError, ValueError (no MAC); not CancelledError
                log.warning("event=router_garp_failed dev=%s error=%s", dev, e)

    def _running(self) -> set[str]:
        return {n for n, d in self.daemons.items() if d.running()}

    def _daemon(self, name: str) -> Daemon:
        p = self.paths
        argv = {
            "dnsmasq": ["dnsmasq", "--keep-in-foreground", "-C", str(p.dnsmasq_conf)],
            "haproxy": ["haproxy", "-W", "-db", "-f", str(p.haproxy_cfg)],
            "apache": ["apache2", "-f", str(p.apache_conf), "-DFOREGROUND"],
            "sshd": ["/usr/sbin/sshd", "-D", "-e", "-f", str(p.sshd_config)],
        }[name]

        async def ready() -> bool:
            try:
                await self._probe(name)
            except probes.ProbeError:
                return False
            return True

        return Daemon(name, argv, ready, ready_timeout=self.timeout)

    async def _probe(self, name: str, limit: float = PROBE_LIMIT) -> str:
        cfg = self.cfg
        assert cfg is not None
        me = str(cfg.interfaces.guest.address)  # where dnsmasq and apache listen
        if name == "dnsmasq":
            ans = await probes.resolve(me, self.env.router_name, limit)
            if me not in ans:
                raise probes.ProbeError(f"dnsmasq answered {ans} for {self.env.router_name}")
            return "ok"
        if name == "haproxy":
            return (await probes.haproxy_info(self.paths.haproxy_sock, limit))["Pid"]
        if name == "apache":
            code, _ = await probes.http_get(me, 80, "/sysvm-health", limit)
            if code != 200:
                raise probes.ProbeError(f"apache health answered HTTP {code}")
            return "ok"
        ctl = cfg.interfaces.control
        assert ctl is not None
        return await probes.ssh_banner(str(ctl.ip), ctl.ssh_port, limit)

    async def _probe_patiently(self, name: str) -> str:
        """A verify check that tells slow from broken: a refusal or a wrong answer fails at
        once; no answer in time is asked again with twice the limit, within the role's
        timeout (a router busy applying, or a host busy with many routers, answers late)."""
        limit, spent = PROBE_LIMIT, 0.0
        while True:
            try:
                return await self._probe(name, limit)
            except probes.ProbeError as e:
                spent += limit
                if not e.timed_out or spent + 2 * limit > self.timeout:
                    raise
                log.info("event=probe_slow name=%s waited=%.1f", name, spent)
                limit *= 2

    async def _act(self, actions: Mapping[str, str]) -> None:
        for name in plan.ORDER:
            action = actions.get(name)
            if action is None:
                continue
            log.info("event=daemon_action name=%s action=%s", name, action)
            if action == "stop":
                d = self.daemons.pop(name)
                await d.stop()
            elif action in ("start", "restart"):
                old = self.daemons.pop(name, None)
                if old is not None:
                    await old.stop()
                if name == "apache":  # a pid file naming a zombie makes apache refuse to start
                    (self.paths.run_dir / "apache2.pid").unlink(missing_ok=True)
                d = self._daemon(name)
                self.daemons[name] = d
                await d.start()
            else:
                await self._reload(name)

    async def _reload(self, name: str) -> None:
        d = self.daemons[name]
        if name == "haproxy":
            # The master says "Loading success." / "Loading failure!" on stderr; a failed
            # reload keeps the old workers serving, so the pid alone would only time out.
            old_pid = await self._probe("haproxy")
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            alerts: list[str] = []

            def watch(line: str) -> None:
                if "[ALERT]" in line:
                    alerts.append(line.split(": ", 1)[-1])
                if not done.done() and "Loading success" in line:
                    done.set_result(True)
                elif not done.done() and "Loading failure" in line:
                    done.set_result(False)

            d.watchers.append(watch)
            try:
                d.signal(signal.SIGUSR2)
                async with asyncio.timeout(self.timeout):
                    ok = await done
            except TimeoutError:
                raise _Failed("haproxy reload: no answer from the master") from None
            finally:
                d.watchers.remove(watch)
            if not ok:
                raise _Failed(f"haproxy refused the new config on reload: {'; '.join(alerts[-2:])}")
            await self._until(
                name, lambda v: v != old_pid, "haproxy reload (new worker) did not come up"
            )
            return
        d.signal({"dnsmasq": signal.SIGHUP, "apache": signal.SIGUSR1, "sshd": signal.SIGHUP}[name])
        await self._until(name, lambda v: True, f"{name} not answering after reload")

    async def _until(self, name: str, ok: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                if ok(await self._probe(name)):
                    return
            except probes.ProbeError as e:
                last = str(e)
            d = self.daemons.get(name)
            if d is not None and not d.running():
                raise _Failed(f"{name} exited during reload")
            await asyncio.sleep(0.02)
        raise _Failed(f"{what}{': ' + last if last else ''}")

    async def _verify(self, new: Rendered, *, reread: bool) -> None:
        """Our chains as the kernel has them now (skipped when nothing was restored: the
        read at the start of this apply already matched), then function checks."""
        if reread:
            state = ipt.parse_save(await self._iptables_save(counters=False))
            for t in TABLES:
                desired = new.tables[t].by_chain()
                if not ipt.matches(t, state.get(t), desired):
                    raise _Failed(f"verify {t}: {ipt.diff_summary(t, state.get(t), desired)}")
        for name in plan.ORDER:
            if plan.MAIN_FILE[name] in new.files:
                d = self.daemons.get(name)
                if d is None or not d.running():
                    raise _Failed(f"verify: {name} is not running")
                try:
                    await self._probe_patiently(name)
                except probes.ProbeError as e:
                    raise _Failed(f"verify {name}: {e}") from None

    async def _rollback(
        self, snap: _Snapshot, new: Rendered, changed: set[str], restored: Mapping[str, set[str]]
    ) -> None:
        log.warning(
            "event=router_rollback tables=%s files=%s",
            ",".join(restored),
            ",".join(sorted(changed)),
        )
        problems: list[str] = []
        try:
            for name in sorted(changed):
                path, old = self.paths.file(name), snap.files[name]
                if old is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write(path, old, 0o644)
            self._swap_link(snap.vmdata_target)
        except OSError as e:
            problems.append(f"files: {e}")
        if restored:
            back: dict[str, Rules] = {}
            for t in restored:
                st = snap.tables.get(t)
                lines = tuple(x for c in sorted(st.chains) for x in st.chains[c]) if st else ()
                back[t] = Rules(lines, ("rollback",) * len(lines))
            try:
                now = ipt.parse_save(await self._iptables_save(counters=False))
                await self._restore(back, restored, now, test=False)
            except (_Failed, CommandError) as e:
                problems.append(f"iptables: {e}")
        if snap.rendered is not None:
            with contextlib.suppress(_Failed, CommandError, OSError):
                await self._ensure_network(snap.rendered, new)
        self.cfg, self.rendered = snap.cfg, snap.rendered
        old_files = {n for n, v in snap.files.items() if v is not None}
        actions = plan.daemon_actions(changed, old_files, self._running())
        if self.cfg is None:
            actions = {n: "stop" for n in self._running()}
        try:
            await self._act(actions)
        except (_Failed, CommandError, OSError) as e:
            problems.append(f"daemons: {e}")
        if problems:
            log.error("event=router_rollback_incomplete problems=%s", "; ".join(problems))

    # --- stats ---------------------------------------------------------------------

    def _load_book(self) -> stats.Book:
        path = self.paths.state_dir / STATS_FILE
        try:
            return stats.book_from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return stats.Book()
        except (ValueError, KeyError, TypeError) as e:
            log.error("event=router_stats_unreadable path=%s error=%s", path, e)
            return stats.Book()

    def _save_book(self) -> None:
        self.paths.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps(self.book.to_json(), sort_keys=True).encode()
        atomic_write(self.paths.state_dir / STATS_FILE, data, 0o600)

    def _stats_before_recount(self, current: Mapping[str, ipt.TableState]) -> None:
        """The counting chains are about to be re-made (zeroed): account what they hold,
        then start a new epoch."""
        counters = ipt.stats_counters(current.get("mangle"))
        if counters:
            self.book = stats.record(self.book, stats.Reading(stats.epoch(self.book), counters))
        self.book = stats.new_generation(self.book, boot_id())
        self.book = replace(self.book, last=stats.Reading(stats.epoch(self.book), {}))
        self._save_book()

    async def collect_stats(self) -> None:
        """Read the counters, record the deltas (persisted), send what is pending."""
        async with self._lock:
            state = ipt.parse_save(await self._iptables_save("mangle"))
            reading = stats.Reading(stats.epoch(self.book), ipt.stats_counters(state.get("mangle")))
            self.book = stats.record(self.book, reading)
            self._save_book()
        await self.send_stats()

    async def send_stats(self) -> bool:
        pending = self.book.pending
        if not pending:
            return True
        params = {"boot_id": self.book.boot_id, "batches": [b.to_json() for b in pending]}
        try:
            async with asyncio.timeout(self.timeout):
                res = await self.ctx.request(STATS_METHOD, params)
        except (LinkDown, RequestFailed, TimeoutError) as e:
            log.info(
                "event=router_stats_unsent batches=%s reason=%s", len(pending), type(e).__name__
            )
            return False
        acked = res.get("acked")
        ids = [str(i) for i in acked] if isinstance(acked, list) else [b.id for b in pending]
        async with self._lock:
            self.book = stats.acknowledge(self.book, ids)
            self._save_book()
        return True

    def _stats_interval(self) -> float:
        return self.cfg.stats.interval if self.cfg is not None else 0.0

    async def _stats_loop(self) -> None:
        while True:
            interval = self._stats_interval()
            self._stats_wake.clear()
            if interval <= 0:
                await self._stats_wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._stats_wake.wait()
                    continue  # config changed: re-read the interval
            try:
                await self.collect_stats()
            except Exception as e:  # keep counting next time; CancelledError is not caught
                log.warning("event=router_stats_failed error=%s", e)


def _explain_restore(inp: RestoreInput, e: CommandError) -> str:
    msg = e.stderr.strip().splitlines()
    first = msg[0] if msg else f"exit {e.code}"
    line_no = ipt.error_line(e.stderr)
    where = inp.explain(line_no) if line_no is not None else None
    if where is None:
        return f"iptables-restore failed: {first}"
    table, rule, origin = where
    src = f" (from {origin})" if origin else ""
    return f"iptables-restore ({table}) failed at line {line_no}: {rule!r}{src}: {first}"


def _set_forwarding(on: bool) -> None:
    fwd = Path("/proc/sys/net/ipv4/ip_forward")  # per network namespace
    want = "1" if on else "0"
    if fwd.read_text().strip() != want:
        fwd.write_text(want + "\n")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except (FileNotFoundError, OSError):
        return None


def _mkdir(path: Path, mode: int, *, parents: bool = False, exist_ok: bool = True) -> None:
    """mkdir with ``mode`` whatever the process umask (the agent's unit runs with 0077):
    the daemons' users (dnsmasq, www-data, haproxy) must traverse these directories."""
    made = [path]
    if parents:  # the parents mkdir creates get the umask's mode: set theirs too
        parent = path.parent
        while not parent.exists():
            made.append(parent)
            parent = parent.parent
    path.mkdir(mode=mode, parents=parents, exist_ok=exist_ok)
    for d in made:
        os.chmod(d, mode)
