"""Pure decisions of the applier: what to do with each daemon, which addresses to change."""

from __future__ import annotations

from collections.abc import Mapping, Set

# daemon -> files whose change needs a full restart / a reload (signal or re-exec)
RESTART_ON: dict[str, frozenset[str]] = {
    "dnsmasq": frozenset({"dnsmasq_conf"}),
    "haproxy": frozenset(),
    "apache": frozenset(),
    "sshd": frozenset(),
}
RELOAD_ON: dict[str, frozenset[str]] = {
    "dnsmasq": frozenset({"dhcp_hosts", "hosts"}),  # SIGHUP re-reads hosts + dhcp-hostsfile
    "haproxy": frozenset({"haproxy_cfg"}),  # SIGUSR2 to the master: new workers, no drop
    "apache": frozenset({"apache_conf"}),  # SIGUSR1: graceful
    "sshd": frozenset({"sshd_config"}),  # SIGHUP: re-exec with the new config
}
# The file a daemon needs; if it is not rendered, the daemon is not wanted.
MAIN_FILE = {
    "dnsmasq": "dnsmasq_conf",
    "haproxy": "haproxy_cfg",
    "apache": "apache_conf",
    "sshd": "sshd_config",
}
ORDER = ("dnsmasq", "haproxy", "apache", "sshd")


def daemon_actions(changed: Set[str], files: Set[str], running: Set[str]) -> dict[str, str]:
    """``changed``: logical files whose content changes; ``files``: files rendered;
    ``running``: daemons up now. → daemon -> start|restart|reload|stop (absent: leave)."""
    out: dict[str, str] = {}
    for d in ORDER:
        wanted = MAIN_FILE[d] in files
        if not wanted:
            if d in running:
                out[d] = "stop"
        elif d not in running:
            out[d] = "start"
        elif changed & RESTART_ON[d]:
            out[d] = "restart"
        elif changed & RELOAD_ON[d]:
            out[d] = "reload"
    return out


def address_commands(
    desired: Mapping[str, tuple[str, ...]], current: Mapping[str, Set[str]]
) -> list[str]:
    """``ip -batch`` lines to make each desired device carry exactly the desired IPv4
    addresses (``ip/prefix``). Devices not in ``desired`` are left alone."""
    cmds: list[str] = []
    for dev in sorted(desired):
        want = set(desired[dev])
        have = set(current.get(dev, set()))
        for a in sorted(have - want):
            cmds.append(f"address del {a} dev {dev}")
        for a in sorted(want - have):
            cmds.append(f"address add {a} dev {dev}")
    return cmds


def added_addresses(
    desired: Mapping[str, tuple[str, ...]], current: Mapping[str, Set[str]]
) -> dict[str, set[str]]:
    """Per device, the desired addresses (``ip/prefix``) it does not carry yet."""
    out: dict[str, set[str]] = {}
    for dev in sorted(desired):
        new = set(desired[dev]) - set(current.get(dev, set()))
        if new:
            out[dev] = new
    return out


def garp_targets(
    announceable: Mapping[str, tuple[str, ...]],
    added: Mapping[str, Set[str]],
    old_announce: int | None,
    new_announce: int,
) -> dict[str, tuple[str, ...]]:
    """device -> IPs to send gratuitous ARP for after an apply: all announceable ones
    (guest and public, never control) when the manager bumped ``announce`` since the
    previous apply of this agent (``old_announce``; None = first apply), else those just
    added (``ip/prefix``, a boot or a config change). Nothing new → nothing sent."""
    everything = old_announce is not None and old_announce != new_announce
    out: dict[str, tuple[str, ...]] = {}
    for dev in sorted(announceable):
        ips = announceable[dev]
        if not everything:
            fresh = {a.split("/", 1)[0] for a in added.get(dev, set())}
            ips = tuple(ip for ip in ips if ip in fresh)
        if ips:
            out[dev] = ips
    return out
