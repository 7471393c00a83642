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
