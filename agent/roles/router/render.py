"""Pure rendering: :class:`~agent.roles.router.config.RouterConfig` → full file contents.

No I/O here. The same config and :class:`Paths` always give the same bytes, so the applier
can compare what it would write with what is in place and leave unchanged things alone.

iptables: we own a fixed set of chains (``SVM-*``, :data:`CHAINS`) and one jump from each
built-in chain we hook (:data:`JUMPS`). Rules are written in the exact form
``iptables-save`` prints them back, so verification is a plain comparison.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.roles.router.config import FirewallRule, Protocol_, RouterConfig

TABLES = ("filter", "nat", "mangle")
PREFIX = "SVM-"
CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("SVM-EGRESS", "SVM-FORWARD", "SVM-INPUT"),
    "nat": ("SVM-POSTROUTING", "SVM-PREROUTING"),
    "mangle": ("SVM-FW-IN", "SVM-PREROUTING", "SVM-STATS-IN", "SVM-STATS-OUT"),
}
STATS_CHAINS = frozenset({"SVM-STATS-IN", "SVM-STATS-OUT"})
# table -> (built-in chain, our chain): one "-A BUILTIN -j OURS" each.
JUMPS: dict[str, tuple[tuple[str, str], ...]] = {
    "filter": (("FORWARD", "SVM-FORWARD"), ("INPUT", "SVM-INPUT")),
    "nat": (("POSTROUTING", "SVM-POSTROUTING"), ("PREROUTING", "SVM-PREROUTING")),
    "mangle": (("POSTROUTING", "SVM-STATS-OUT"), ("PREROUTING", "SVM-PREROUTING")),
}

# iptables-save prints ICMP type names as numbers; render the same so read-back matches.
ICMP_TYPES = {
    "echo-reply": "0",
    "destination-unreachable": "3",
    "source-quench": "4",
    "redirect": "5",
    "echo-request": "8",
    "time-exceeded": "11",
    "parameter-problem": "12",
    "timestamp-request": "13",
    "timestamp-reply": "14",
}


@dataclass(frozen=True, slots=True)
class Paths:
    """Where the router's files live. ``run_dir`` must be traversable by the daemons'
    unprivileged users (0755); ``state_dir`` holds the SSH host key (0700)."""

    run_dir: Path
    state_dir: Path

    @property
    def dnsmasq_conf(self) -> Path:
        return self.run_dir / "dnsmasq.conf"

    @property
    def dhcp_hosts(self) -> Path:
        return self.run_dir / "dhcp-hosts"

    @property
    def hosts(self) -> Path:
        return self.run_dir / "hosts"

    @property
    def leases(self) -> Path:
        return self.run_dir / "dnsmasq" / "leases"

    @property
    def haproxy_cfg(self) -> Path:
        return self.run_dir / "haproxy.cfg"

    @property
    def haproxy_sock(self) -> Path:
        return self.run_dir / "haproxy.sock"

    @property
    def apache_conf(self) -> Path:
        return self.run_dir / "apache2.conf"

    @property
    def www(self) -> Path:
        return self.run_dir / "www"

    @property
    def sshd_config(self) -> Path:
        return self.run_dir / "sshd_config"

    @property
    def authorized_keys(self) -> Path:
        return self.run_dir / "authorized_keys"

    @property
    def host_key(self) -> Path:
        return self.state_dir / "ssh_host_ed25519_key"

    def file(self, name: str) -> Path:
        return self.run_dir / FILE_NAMES[name]


# logical name -> file name under run_dir
FILE_NAMES = {
    "dnsmasq_conf": "dnsmasq.conf",
    "dhcp_hosts": "dhcp-hosts",
    "hosts": "hosts",
    "haproxy_cfg": "haproxy.cfg",
    "apache_conf": "apache2.conf",
    "sshd_config": "sshd_config",
    "authorized_keys": "authorized_keys",
}


@dataclass(frozen=True, slots=True)
class Env:
    """Facts about the machine the renderer needs (looked up once by the caller)."""

    router_name: str = "router"
    apache_user: str | None = "www-data"
    apache_group: str | None = "www-data"
    dnsmasq_user: str | None = "dnsmasq"
    haproxy_user: str | None = "haproxy"
    apache_modules: Path = Path("/usr/lib/apache2/modules")


@dataclass(frozen=True, slots=True)
class Rules:
    """One table's rules: ``lines[i]`` is an ``-A CHAIN ...`` line, ``origins[i]`` says
    which part of the config produced it (for error messages)."""

    lines: tuple[str, ...]
    origins: tuple[str, ...]

    def by_chain(self) -> dict[str, list[str]]:
        return chain_rules(self.lines)


@dataclass(frozen=True, slots=True)
class Rendered:
    tables: dict[str, Rules]
    files: dict[str, bytes]  # logical name (FILE_NAMES) -> content
    vmdata: dict[str, bytes]  # relative path under the vmdata dir -> content
    vmdata_id: str  # hash of vmdata: its directory name, so unchanged data is not rewritten
    addresses: dict[str, tuple[str, ...]]  # device -> sorted "ip/prefix"
    default_route: tuple[str, str] | None  # (gateway, device)
    public_ips: tuple[str, ...]
    probe_name: str = field(default="router")  # a name dnsmasq must answer
    forwarding: bool = True  # ip_forward: does the router route at all?
    garp: dict[str, tuple[str, ...]] = field(default_factory=dict)  # device -> IPs to announce


def chain_rules(lines: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """Group ``-A CHAIN ...`` lines by chain, keeping order; every owned chain present."""
    out: dict[str, list[str]] = {}
    for line in lines:
        chain = line.split(" ", 2)[1]
        out.setdefault(chain, []).append(line)
    return out


# --- iptables ------------------------------------------------------------------------


class _Table:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.origins: list[str] = []

    def add(self, chain: str, spec: str, origin: str) -> None:
        self.lines.append(f"-A {chain} {spec}")
        self.origins.append(origin)

    def rules(self) -> Rules:
        return Rules(tuple(self.lines), tuple(self.origins))


def _net(n: ipaddress.IPv4Network) -> str:
    return f"{n.network_address}/{n.prefixlen}"


def _proto_match(proto: Protocol_, ports: str | None) -> str:
    """``-p tcp -m tcp --dport 80`` (empty for "all")."""
    if proto == "all":
        return ""
    if ports is None:
        return f"-p {proto}"
    return f"-p {proto} -m {proto} --dport {ports}"


def _firewall_specs(rule: FirewallRule) -> list[str]:
    """Matched before DNAT (mangle/PREROUTING), so on the public IP and port the client
    used, with native matches only (conntrack matches cost twice as much to load)."""
    ports = rule.ports.iptables() if rule.ports else None
    match = _proto_match(rule.protocol, ports)
    if rule.protocol == "icmp" and rule.icmp_type is not None:
        match += f" -m icmp --icmp-type {ICMP_TYPES.get(rule.icmp_type, rule.icmp_type)}"
    sources = rule.source_cidrs or (None,)
    out = []
    for src in sources:
        s = "" if src is None or src.prefixlen == 0 else f"-s {_net(src)} "
        out.append(f"{s}-d {rule.public_ip}/32 {match} -j RETURN".replace("  ", " "))
    return out


def render_iptables(cfg: RouterConfig) -> dict[str, Rules]:
    ifs = cfg.interfaces
    guest, ctl = ifs.guest.device, ifs.control
    me = ifs.guest.address  # our own address on the guest network
    f, n, m = _Table(), _Table(), _Table()

    # filter / SVM-INPUT: traffic to the router itself.
    f.add("SVM-INPUT", "-i lo -j ACCEPT", "base")
    f.add("SVM-INPUT", "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "base")
    if ctl is not None:
        f.add(
            "SVM-INPUT",
            f"-d {ctl.ip}/32 -i {ctl.device} -p tcp -m tcp --dport {ctl.ssh_port} -j ACCEPT",
            "interfaces.control",
        )
        f.add("SVM-INPUT", f"-i {ctl.device} -p icmp -j ACCEPT", "interfaces.control")
        f.add("SVM-INPUT", f"-i {ctl.device} -j DROP", "interfaces.control")
    f.add("SVM-INPUT", f"-i {guest} -p udp -m udp --dport 67 -j ACCEPT", "dhcp")
    for proto in ("udp", "tcp"):
        f.add(
            "SVM-INPUT", f"-d {me}/32 -i {guest} -p {proto} -m {proto} --dport 53 -j ACCEPT", "dns"
        )
    f.add("SVM-INPUT", f"-d {me}/32 -i {guest} -p tcp -m tcp --dport 80 -j ACCEPT", "vm_data")
    f.add("SVM-INPUT", f"-i {guest} -p icmp -j ACCEPT", "interfaces.guest")
    f.add("SVM-INPUT", f"-i {guest} -j DROP", "interfaces.guest")

    if ifs.public is None:
        # No public side: nothing to NAT, filter or count. Only a router that is the
        # guests' gateway passes guest-to-guest traffic; nothing else goes through.
        if ifs.guest.is_gateway:
            f.add("SVM-FORWARD", f"-i {guest} -o {guest} -j ACCEPT", "interfaces.guest")
        f.add("SVM-FORWARD", "-j DROP", "interfaces")
        return {"filter": f.rules(), "nat": n.rules(), "mangle": m.rules()}

    pub = ifs.public.device
    f.add("SVM-INPUT", f"-i {pub} -j ACCEPT", "firewall")  # mangle/SVM-FW-IN filtered it

    # filter / SVM-FORWARD: through the router. From outside only to what is DNATed
    # (port forwarding, static NAT); the firewall already ran in mangle/SVM-FW-IN.
    f.add("SVM-FORWARD", "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "base")
    f.add("SVM-FORWARD", f"-i {pub} -o {guest} -m conntrack --ctstate DNAT -j ACCEPT", "firewall")
    f.add("SVM-FORWARD", f"-i {pub} -j DROP", "firewall")
    f.add("SVM-FORWARD", f"-i {guest} -o {pub} -j SVM-EGRESS", "egress")
    f.add("SVM-FORWARD", f"-i {guest} -o {guest} -j ACCEPT", "interfaces.guest")
    f.add("SVM-FORWARD", f"-i {guest} -j DROP", "interfaces.guest")

    # mangle / SVM-PREROUTING: everything arriving on the public NIC goes through the
    # ingress firewall (new flows: RETURN if a rule allows, else DROP), then is counted.
    m.add("SVM-PREROUTING", f"-i {pub} -j SVM-FW-IN", "firewall")
    m.add("SVM-PREROUTING", f"-i {pub} -j SVM-STATS-IN", "stats")
    m.add("SVM-FW-IN", "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN", "firewall")
    for i, rule in enumerate(cfg.firewall):
        for spec in _firewall_specs(rule):
            m.add("SVM-FW-IN", spec, f"firewall[{i}]")
    m.add("SVM-FW-IN", "-j DROP", "firewall")

    # filter / SVM-EGRESS: rules are exceptions to the default.
    target = "DROP" if cfg.egress.default == "allow" else "ACCEPT"
    for i, e in enumerate(cfg.egress.rules):
        ports = e.ports.iptables() if e.ports else None
        match = _proto_match(e.protocol, ports)
        if e.protocol == "icmp" and e.icmp_type is not None:
            match += f" -m icmp --icmp-type {ICMP_TYPES.get(e.icmp_type, e.icmp_type)}"
        for dst in e.destination_cidrs or (None,):
            d = "" if dst is None or dst.prefixlen == 0 else f"-d {_net(dst)} "
            spec = f"{d}{match} -j {target}".replace("  ", " ")
            f.add("SVM-EGRESS", spec.strip(), f"egress.rules[{i}]")
    f.add("SVM-EGRESS", f"-j {'ACCEPT' if cfg.egress.default == 'allow' else 'DROP'}", "egress")

    # nat: port forwarding and static NAT (DNAT), static NAT and source NAT (SNAT).
    for i, pf in enumerate(cfg.port_forwarding):
        gp = pf.guest_ports
        to = f"{pf.guest_ip}:{gp.start}" + (f"-{gp.end}" if gp.end != gp.start else "")
        n.add(
            "SVM-PREROUTING",
            f"-d {pf.public_ip}/32 -i {pub} -p {pf.protocol} -m {pf.protocol} "
            f"--dport {pf.public_ports.iptables()} -j DNAT --to-destination {to}",
            f"port_forwarding[{i}]",
        )
    for i, s in enumerate(cfg.static_nat):
        n.add(
            "SVM-PREROUTING",
            f"-d {s.public_ip}/32 -i {pub} -j DNAT --to-destination {s.guest_ip}",
            f"static_nat[{i}]",
        )
        n.add(
            "SVM-POSTROUTING",
            f"-s {s.guest_ip}/32 -o {pub} -j SNAT --to-source {s.public_ip}",
            f"static_nat[{i}]",
        )
    if cfg.source_nat is not None:
        n.add(
            "SVM-POSTROUTING",
            f"-s {_net(ifs.guest.cidr)} -o {pub} -j SNAT --to-source {cfg.source_nat}",
            "source_nat",
        )

    # mangle: per-public-IP byte counters. In: before DNAT the destination is still the
    # public IP. Out: conntrack says which public IP the flow belongs to (SNAT happens after
    # mangle/POSTROUTING): replies to inbound flows (original destination) and outbound
    # flows (reply destination) — disjoint, so their sum is the IP's outbound bytes.
    for ip in ifs.public.ips:
        m.add("SVM-STATS-IN", f"-d {ip}/32 -j RETURN", f"stats {ip}")
        m.add("SVM-STATS-OUT", f"-o {pub} -m conntrack --ctorigdst {ip} -j RETURN", f"stats {ip}")
        m.add("SVM-STATS-OUT", f"-o {pub} -m conntrack --ctrepldst {ip} -j RETURN", f"stats {ip}")
    return {"filter": f.rules(), "nat": n.rules(), "mangle": m.rules()}


@dataclass(frozen=True, slots=True)
class RestoreInput:
    """``iptables-restore --noflush`` input and, per line, (table, config origin) so a
    failing line number maps back to the rule and the config item that made it."""

    text: str
    origins: tuple[tuple[str, str | None], ...]

    def explain(self, line_no: int) -> tuple[str, str, str | None] | None:
        """(table, line text, origin) of 1-based ``line_no``."""
        lines = self.text.splitlines()
        if not 0 < line_no <= len(lines):
            return None
        table, origin = self.origins[line_no - 1]
        return table, lines[line_no - 1], origin


def restore_input(
    tables: Mapping[str, Rules],
    chains: Mapping[str, Collection[str]] | None = None,
    missing_jumps: Mapping[str, tuple[tuple[str, str], ...]] | None = None,
) -> RestoreInput:
    """One input for several tables. For each table, declares (and so flushes) the owned
    chains in ``chains[table]`` (default: all), appends their rules in order, and inserts
    the missing built-in jumps. Chains not listed are left as they are."""
    lines: list[str] = []
    origins: list[tuple[str, str | None]] = []

    def add(table: str, line: str, origin: str | None = None) -> None:
        lines.append(line)
        origins.append((table, origin))

    for table, rules in tables.items():
        only = set(CHAINS[table] if chains is None else chains.get(table, CHAINS[table]))
        add(table, f"*{table}")
        for c in CHAINS[table]:
            if c in only:
                add(table, f":{c} - [0:0]")
        for line, origin in zip(rules.lines, rules.origins, strict=True):
            if line.split(" ", 2)[1] in only:
                add(table, line, origin)
        for builtin, ours in (missing_jumps or {}).get(table, ()):
            add(table, f"-I {builtin} 1 -j {ours}")
        add(table, "COMMIT")
    return RestoreInput("\n".join(lines) + "\n", tuple(origins))


# --- daemons -------------------------------------------------------------------------


def render_dnsmasq(cfg: RouterConfig, paths: Paths, env: Env) -> dict[str, bytes]:
    g = cfg.interfaces.guest
    lines = [
        "# generated by sysvm-agent (router role); do not edit",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "pid-file=",
        "log-facility=-",
        "bind-interfaces",
        f"interface={g.device}",
        "except-interface=lo",
        f"listen-address={g.address}",
        f"domain={cfg.domain}",
        f"local=/{cfg.domain}/",
        "expand-hosts",
        f"addn-hosts={paths.hosts}",
        f"dhcp-hostsfile={paths.dhcp_hosts}",
        f"dhcp-leasefile={paths.leases}",
        "dhcp-authoritative",
        f"dhcp-range=set:guest,{g.cidr.network_address},static,{g.cidr.netmask},{cfg.dhcp_lease_time}",
        f"dhcp-option=tag:guest,option:router,{g.gateway}",
        f"dhcp-option=tag:guest,option:dns-server,{g.address}",
        f"dhcp-option=tag:guest,option:domain-search,{cfg.domain}",
    ]
    if env.dnsmasq_user:
        lines.append(f"user={env.dnsmasq_user}")
    lines += [f"server={s}" for s in cfg.dns_servers]
    dhcp = [f"{d.mac},{d.ip},{d.hostname}" for d in cfg.dhcp]
    hosts = [f"{g.address} {env.router_name}"]
    hosts += [f"{d.ip} {d.hostname}" for d in cfg.dhcp]
    hosts += [f"{e.ip} {e.name}" for e in cfg.dns_entries]
    return {
        "dnsmasq_conf": _text(lines),
        "dhcp_hosts": _text(dhcp),
        "hosts": _text(hosts),
    }


def render_haproxy(cfg: RouterConfig, paths: Paths, env: Env) -> bytes:
    lines = [
        "# generated by sysvm-agent (router role); do not edit",
        "global",
        "    maxconn 4096",
        f"    stats socket {paths.haproxy_sock} mode 600 level admin expose-fd listeners",
    ]
    if env.haproxy_user:
        lines += [f"    user {env.haproxy_user}", f"    group {env.haproxy_user}"]
    lines += [
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
    ]
    for lb in cfg.load_balancers:
        lines += [
            "",
            f"frontend lb-{lb.name}",
            f"    bind {lb.public_ip}:{lb.public_port}",
            f"    default_backend be-{lb.name}",
            "",
            f"backend be-{lb.name}",
            f"    balance {lb.algorithm}",
        ]
        check = " check" if lb.check else ""
        for i, mem in enumerate(lb.members):
            lines.append(f"    server m{i} {mem.ip}:{mem.port}{check}")
    return _text(lines)


def render_apache(cfg: RouterConfig, paths: Paths, env: Env) -> bytes:
    g = cfg.interfaces.guest
    mods = env.apache_modules
    lines = [
        "# generated by sysvm-agent (router role); do not edit",
        "# Serves CloudStack-style user-data/meta-data; the guest is known by its source IP.",
        f"LoadModule mpm_event_module {mods}/mod_mpm_event.so",
        f"LoadModule authz_core_module {mods}/mod_authz_core.so",
        f"LoadModule rewrite_module {mods}/mod_rewrite.so",
        "ServerName router",
        f"Listen {g.address}:80",
        f"PidFile {paths.run_dir}/apache2.pid",
        f"DefaultRuntimeDir {paths.run_dir}",
        f"Mutex file:{paths.run_dir} default",
        # a file, not /dev/stderr: under uvloop the agent's child stderr is a socket, which
        # apache cannot open by path (ENXIO)
        f"ErrorLog {paths.run_dir}/apache-error.log",
        "LogLevel warn",
        "ServerTokens Prod",
        "ServerSignature Off",
        "StartServers 1",
        "ServerLimit 2",
        "ThreadsPerChild 16",
        "MaxRequestWorkers 32",
        "MinSpareThreads 4",
        "MaxSpareThreads 16",
    ]
    if env.apache_user:
        lines.append(f"User {env.apache_user}")
    if env.apache_group:
        lines.append(f"Group {env.apache_group}")
    lines += [
        f"DocumentRoot {paths.www}",
        "<Directory />",
        "    Require all denied",
        "    AllowOverride None",
        "    Options None",
        "</Directory>",
        f"<Directory {paths.www}>",
        "    Require all granted",
        "    Options FollowSymLinks",
        "</Directory>",
        "RewriteEngine On",
        "RewriteRule ^/latest/user-data/?$ /vmdata/%{REMOTE_ADDR}/user-data [L]",
        "RewriteRule ^/latest/meta-data/?$ /vmdata/%{REMOTE_ADDR}/meta-data.index [L]",
        "RewriteRule ^/latest/meta-data/([A-Za-z0-9_.-]+)$ /vmdata/%{REMOTE_ADDR}/meta-data/$1 [L]",
        "RewriteRule ^/sysvm-health$ /health [L]",
        "RewriteRule ^ - [F]",
    ]
    return _text(lines)


def render_sshd(cfg: RouterConfig, paths: Paths) -> bytes:
    ctl = cfg.interfaces.control
    lines = ["# generated by sysvm-agent (router role); do not edit"]
    if ctl is not None:
        lines += [f"Port {ctl.ssh_port}", f"ListenAddress {ctl.ip}:{ctl.ssh_port}"]
    lines += [
        f"HostKey {paths.host_key}",
        "PidFile none",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        f"AuthorizedKeysFile {paths.authorized_keys}",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "Subsystem sftp internal-sftp",
    ]
    return _text(lines)


def render_vmdata(cfg: RouterConfig) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for v in cfg.vm_data:
        ip = str(v.guest_ip)
        out[f"{ip}/user-data"] = v.user_data
        out[f"{ip}/meta-data.index"] = _text([k for k, _ in v.meta_data])
        for k, val in v.meta_data:
            out[f"{ip}/meta-data/{k}"] = val.encode()
    return out


def render_addresses(cfg: RouterConfig) -> dict[str, tuple[str, ...]]:
    ifs = cfg.interfaces
    out: dict[str, tuple[str, ...]] = {}
    if ifs.public is not None:
        pub = ifs.public
        out[pub.device] = tuple(sorted(f"{ip}/{pub.prefix}" for ip in pub.ips))
    out[ifs.guest.device] = (f"{ifs.guest.address}/{ifs.guest.cidr.prefixlen}",)
    if ifs.control is not None:
        out[ifs.control.device] = (f"{ifs.control.ip}/{ifs.control.prefix}",)
    return out


def render_default_route(cfg: RouterConfig) -> tuple[str, str] | None:
    """(gateway, device): via the public gateway; without a public NIC, via the guest
    network's gateway when that is not us (so dnsmasq reaches its upstream servers)."""
    ifs = cfg.interfaces
    if ifs.public is not None:
        return (str(ifs.public.gateway), ifs.public.device) if ifs.public.gateway else None
    if not ifs.guest.is_gateway:
        return str(ifs.guest.gateway), ifs.guest.device
    return None


def render_garp(cfg: RouterConfig) -> dict[str, tuple[str, ...]]:
    """device -> the addresses others must reach at our MAC, which another router may
    have held before us: the guest address and the public IPs (not the control NIC's)."""
    ifs = cfg.interfaces
    out: dict[str, tuple[str, ...]] = {ifs.guest.device: (str(ifs.guest.address),)}
    if ifs.public is not None:
        out[ifs.public.device] = tuple(str(ip) for ip in ifs.public.ips)
    return out


def render_files(cfg: RouterConfig, paths: Paths, env: Env) -> dict[str, bytes]:
    """The daemons' files (logical name -> content)."""
    files = render_dnsmasq(cfg, paths, env)
    files["haproxy_cfg"] = render_haproxy(cfg, paths, env)
    files["apache_conf"] = render_apache(cfg, paths, env)
    if cfg.interfaces.control is not None:
        files["sshd_config"] = render_sshd(cfg, paths)
        key = cfg.ssh_authorized_key
        files["authorized_keys"] = _text([key] if key else [])
    return files


def render(cfg: RouterConfig, paths: Paths, env: Env) -> Rendered:
    files = render_files(cfg, paths, env)
    vmdata = render_vmdata(cfg)
    h = hashlib.sha256()
    for k in sorted(vmdata):
        h.update(k.encode() + b"\0" + hashlib.sha256(vmdata[k]).digest())
    ifs = cfg.interfaces
    return Rendered(
        tables=render_iptables(cfg),
        files=files,
        vmdata=vmdata,
        vmdata_id=h.hexdigest()[:16],
        addresses=render_addresses(cfg),
        default_route=render_default_route(cfg),
        public_ips=tuple(str(ip) for ip in ifs.public.ips) if ifs.public else (),
        probe_name=env.router_name,
        forwarding=ifs.public is not None or ifs.guest.is_gateway,
        garp=render_garp(cfg),
    )


def _text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode() if lines else b""
