"""Router config parsing and rendering: pure, no I/O."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest

from agent.roles.router import config as rc
from agent.roles.router import iptables as ipt
from agent.roles.router import plan, render

PATHS = render.Paths(run_dir=Path("/run/r"), state_dir=Path("/var/lib/a/router"))
ENV = render.Env(router_name="r-1-VM")


def cfg() -> dict[str, Any]:
    return {
        "interfaces": {
            "control": {"device": "eth0", "ip": "169.254.3.4", "prefix": 16},
            "public": {
                "device": "eth2",
                "ips": ["203.0.113.10", "203.0.113.11"],
                "gateway": "203.0.113.1",
            },
            "guest": {"device": "eth1", "gateway": "10.1.1.1", "cidr": "10.1.1.0/24"},
        },
        "domain": "c1.internal",
        "dns_servers": ["8.8.8.8"],
        "firewall": [
            {
                "public_ip": "203.0.113.10",
                "protocol": "tcp",
                "ports": "22-23",
                "source_cidrs": ["0.0.0.0/0", "10.9.0.0/16"],
            },
            {"public_ip": "203.0.113.10", "protocol": "icmp", "icmp_type": "echo-request"},
            {"public_ip": "203.0.113.11", "protocol": "all"},
        ],
        "egress": {
            "default": "deny",
            "rules": [
                {"protocol": "udp", "ports": 53, "destination_cidrs": ["8.8.8.8/32"]},
                {"protocol": "icmp", "icmp_type": "3/4"},
            ],
        },
        "port_forwarding": [
            {
                "public_ip": "203.0.113.10",
                "protocol": "tcp",
                "public_ports": "2222",
                "guest_ip": "10.1.1.5",
                "guest_ports": 22,
            }
        ],
        "static_nat": [{"public_ip": "203.0.113.11", "guest_ip": "10.1.1.6"}],
        "source_nat": "203.0.113.10",
        "load_balancers": [
            {
                "name": "web",
                "public_ip": "203.0.113.10",
                "public_port": 80,
                "algorithm": "source",
                "members": [{"ip": "10.1.1.5", "port": 8080}],
                "check": True,
            }
        ],
        "dhcp": [{"mac": "02:AA:bb:cc:dd:01", "ip": "10.1.1.5", "hostname": "vm1"}],
        "dns_entries": [{"name": "db.c1.internal", "ip": "10.1.1.7"}],
        "vm_data": [
            {
                "guest_ip": "10.1.1.5",
                "user_data": base64.b64encode(b"hello").decode(),
                "meta_data": {"instance-id": "i-5", "availability-zone": "z1"},
            }
        ],
        "ssh_authorized_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample manager",
        "stats": {"interval": 60},
    }


def test_parse_full_config() -> None:
    c = rc.parse(cfg())
    assert c.interfaces.public.prefix == 24  # default
    assert c.firewall[0].ports == rc.PortRange(22, 23)
    assert c.dhcp[0].mac == "02:aa:bb:cc:dd:01"
    assert c.vm_data[0].user_data == b"hello"
    assert c.vm_data[0].meta_data == (("availability-zone", "z1"), ("instance-id", "i-5"))
    assert c.stats.interval == 60.0
    assert c.egress.default == "deny"


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [
        (lambda c: c.pop("interfaces"), "router.interfaces", "required"),
        (lambda c: c.update(firewal=[]), "router.firewal", "unknown field"),
        (
            lambda c: c["firewall"][1].update(public_ip="203.0.113.99"),
            "router.firewall[1].public_ip",
            "not one of interfaces.public.ips",
        ),
        (lambda c: c["firewall"][0].update(ports="23-22"), "router.firewall[0].ports", "before"),
        (lambda c: c["firewall"][0].update(ports=70000), "router.firewall[0].ports", "range"),
        (lambda c: c["firewall"][2].update(ports=5), "router.firewall[2].ports", "only apply"),
        (
            lambda c: c["firewall"][0].update(source_cidrs=["10.0.0.1/8"]),
            "router.firewall[0].source_cidrs[0]",
            "not an IPv4 network",
        ),
        (lambda c: c["dhcp"][0].update(mac="zz"), "router.dhcp[0].mac", "not a MAC"),
        (lambda c: c["dhcp"][0].update(ip="10.2.0.1"), "router.dhcp[0].ip", "guest network"),
        (lambda c: c["dhcp"].append(dict(c["dhcp"][0])), "router.dhcp[1]", "duplicate mac"),
        (lambda c: c["dhcp"][0].update(hostname="a b"), "router.dhcp[0].hostname", "valid"),
        (lambda c: c["vm_data"][0].update(user_data="@@"), "router.vm_data[0].user_data", "base64"),
        (
            lambda c: c["load_balancers"][0].update(algorithm="random"),
            "router.load_balancers[0].algorithm",
            "not one of",
        ),
        (
            lambda c: c["static_nat"][0].update(public_ip="203.0.113.10"),
            "router.port_forwarding[0].public_ip",
            "static NAT",
        ),
        (lambda c: c["stats"].update(interval=True), "router.stats.interval", "number"),
        (lambda c: c.update(ssh_authorized_key="rm -rf"), "router.ssh_authorized_key", "OpenSSH"),
        (
            lambda c: c["interfaces"]["guest"].update(gateway="10.2.0.1"),
            "router.interfaces.guest.gateway",
            "not in",
        ),
        (
            lambda c: c["interfaces"]["guest"].update(device="eth2"),
            "router.interfaces",
            "different devices",
        ),
    ],
)
def test_parse_errors_name_the_field(mutate: Any, field: str, problem: str) -> None:
    c = cfg()
    mutate(c)
    with pytest.raises(rc.ConfigError) as e:
        rc.parse(c)
    assert e.value.field == field
    assert problem in e.value.problem
    assert str(e.value).startswith(f"{field}: ")


def test_parse_rejects_non_objects() -> None:
    with pytest.raises(rc.ConfigError, match="router: expected an object"):
        rc.parse([])
    c = cfg()
    c["firewall"] = {"a": 1}
    with pytest.raises(rc.ConfigError, match=r"router.firewall: expected a list"):
        rc.parse(c)


def test_render_is_deterministic_and_does_not_depend_on_input_identity() -> None:
    a = render.render(rc.parse(cfg()), PATHS, ENV)
    b = render.render(rc.parse(copy.deepcopy(cfg())), PATHS, ENV)
    assert a == b
    assert render.restore_input(a.tables).text == render.restore_input(b.tables).text


def test_render_iptables_canonical_rules() -> None:
    r = render.render(rc.parse(cfg()), PATHS, ENV)
    f = r.tables["filter"].by_chain()
    m = r.tables["mangle"].by_chain()
    assert m["SVM-FW-IN"] == [
        "-A SVM-FW-IN -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-A SVM-FW-IN -d 203.0.113.10/32 -p tcp -m tcp --dport 22:23 -j RETURN",
        "-A SVM-FW-IN -s 10.9.0.0/16 -d 203.0.113.10/32 -p tcp -m tcp --dport 22:23 -j RETURN",
        # ICMP names become numbers, as iptables-save prints them
        "-A SVM-FW-IN -d 203.0.113.10/32 -p icmp -m icmp --icmp-type 8 -j RETURN",
        "-A SVM-FW-IN -d 203.0.113.11/32 -j RETURN",
        "-A SVM-FW-IN -j DROP",
    ]
    assert m["SVM-PREROUTING"] == [
        "-A SVM-PREROUTING -i eth2 -j SVM-FW-IN",
        "-A SVM-PREROUTING -i eth2 -j SVM-STATS-IN",
    ]
    assert f["SVM-EGRESS"] == [
        "-A SVM-EGRESS -d 8.8.8.8/32 -p udp -m udp --dport 53 -j ACCEPT",
        "-A SVM-EGRESS -p icmp -m icmp --icmp-type 3/4 -j ACCEPT",
        "-A SVM-EGRESS -j DROP",
    ]
    n = r.tables["nat"].by_chain()
    assert n["SVM-PREROUTING"] == [
        "-A SVM-PREROUTING -d 203.0.113.10/32 -i eth2 -p tcp -m tcp --dport 2222"
        " -j DNAT --to-destination 10.1.1.5:22",
        "-A SVM-PREROUTING -d 203.0.113.11/32 -i eth2 -j DNAT --to-destination 10.1.1.6",
    ]
    assert n["SVM-POSTROUTING"] == [
        "-A SVM-POSTROUTING -s 10.1.1.6/32 -o eth2 -j SNAT --to-source 203.0.113.11",
        "-A SVM-POSTROUTING -s 10.1.1.0/24 -o eth2 -j SNAT --to-source 203.0.113.10",
    ]
    assert len(m["SVM-STATS-IN"]) + len(m["SVM-STATS-OUT"]) == 2 * 3  # in + 2 out per IP


def test_restore_input_and_error_line_origin() -> None:
    r = render.render(rc.parse(cfg()), PATHS, ENV)
    inp = render.restore_input(
        {"mangle": r.tables["mangle"], "nat": r.tables["nat"]},
        {"mangle": {"SVM-FW-IN", "SVM-PREROUTING"}, "nat": set(render.CHAINS["nat"])},
        {"mangle": (("PREROUTING", "SVM-PREROUTING"),)},
    )
    lines = inp.text.splitlines()
    assert lines[0] == "*mangle" and lines.count("COMMIT") == 2
    assert ":SVM-FW-IN - [0:0]" in lines and ":SVM-PREROUTING - [0:0]" in lines
    # unchanged chains are neither declared (flushed) nor refilled
    assert ":SVM-STATS-IN - [0:0]" not in lines
    assert not any(x.startswith("-A SVM-STATS-IN") for x in lines)
    assert "-I PREROUTING 1 -j SVM-PREROUTING" in lines
    # the line iptables-restore would report maps back to its table, rule and config item
    rule = r.tables["mangle"].by_chain()["SVM-FW-IN"][3]
    no = lines.index(rule) + 1
    assert inp.explain(no) == ("mangle", rule, "firewall[1]")
    assert inp.explain(1) == ("mangle", "*mangle", None)
    nat_rule = r.tables["nat"].lines[0]
    assert inp.explain(lines.index(nat_rule) + 1) == ("nat", nat_rule, "port_forwarding[0]")
    assert inp.explain(len(lines) + 1) is None


def test_changed_chains() -> None:
    r = render.render(rc.parse(cfg()), PATHS, ENV)
    desired = r.tables["filter"].by_chain()
    st = ipt.TableState(chains=dict(desired), jumps=frozenset(), counters={})
    st.chains["SVM-EGRESS"] = []
    assert ipt.changed_chains("filter", st, desired) == {"SVM-EGRESS"}
    assert ipt.changed_chains("filter", None, desired) == set(render.CHAINS["filter"])


def test_daemon_files() -> None:
    r = render.render(rc.parse(cfg()), PATHS, ENV)
    dns = r.files["dnsmasq_conf"].decode()
    assert "listen-address=10.1.1.1" in dns and "server=8.8.8.8" in dns
    assert "dhcp-range=set:guest,10.1.1.0,static,255.255.255.0,86400" in dns
    assert r.files["dhcp_hosts"] == b"02:aa:bb:cc:dd:01,10.1.1.5,vm1\n"
    assert r.files["hosts"] == b"10.1.1.1 r-1-VM\n10.1.1.5 vm1\n10.1.1.7 db.c1.internal\n"
    ha = r.files["haproxy_cfg"].decode()
    assert "bind 203.0.113.10:80" in ha and "balance source" in ha
    assert "server m0 10.1.1.5:8080 check" in ha
    assert f"stats socket {PATHS.haproxy_sock}" in ha
    ap = r.files["apache_conf"].decode()
    assert "Listen 10.1.1.1:80" in ap and "%{REMOTE_ADDR}" in ap
    ssh = r.files["sshd_config"].decode()
    assert "ListenAddress 169.254.3.4:3922" in ssh and "PasswordAuthentication no" in ssh
    assert r.files["authorized_keys"].startswith(b"ssh-ed25519 ")
    assert r.vmdata == {
        "10.1.1.5/user-data": b"hello",
        "10.1.1.5/meta-data.index": b"availability-zone\ninstance-id\n",
        "10.1.1.5/meta-data/availability-zone": b"z1",
        "10.1.1.5/meta-data/instance-id": b"i-5",
    }
    assert r.addresses["eth2"] == ("203.0.113.10/24", "203.0.113.11/24")
    assert r.default_route == ("203.0.113.1", "eth2")


def test_no_control_nic_means_no_sshd() -> None:
    c = cfg()
    del c["interfaces"]["control"]
    r = render.render(rc.parse(c), PATHS, ENV)
    assert "sshd_config" not in r.files
    assert plan.daemon_actions(set(), set(r.files), {"sshd", "dnsmasq"}) == {
        "sshd": "stop",
        "haproxy": "start",
        "apache": "start",
    }


def test_daemon_actions() -> None:
    files = {"dnsmasq_conf", "haproxy_cfg", "apache_conf", "sshd_config"}
    running = {"dnsmasq", "haproxy", "apache", "sshd"}
    assert plan.daemon_actions(set(), files, running) == {}
    assert plan.daemon_actions({"hosts", "dhcp_hosts"}, files, running) == {"dnsmasq": "reload"}
    assert plan.daemon_actions({"dnsmasq_conf", "hosts"}, files, running) == {"dnsmasq": "restart"}
    assert plan.daemon_actions({"authorized_keys"}, files, running) == {}
    assert plan.daemon_actions({"haproxy_cfg", "sshd_config"}, files, running) == {
        "haproxy": "reload",
        "sshd": "reload",
    }
    assert plan.daemon_actions(set(), files, set()) == {d: "start" for d in plan.ORDER}


def test_address_commands() -> None:
    cmds = plan.address_commands(
        {"eth2": ("203.0.113.10/24", "203.0.113.12/24"), "eth1": ("10.1.1.1/24",)},
        {"eth2": {"203.0.113.10/24", "203.0.113.11/24"}, "eth1": {"10.1.1.1/24"}, "lo": {"x"}},
    )
    assert cmds == ["address del 203.0.113.11/24 dev eth2", "address add 203.0.113.12/24 dev eth2"]


SAVE = """# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [10:1000]
:POSTROUTING ACCEPT [10:1000]
:SVM-FW-IN - [0:0]
:SVM-PREROUTING - [0:0]
:SVM-STATS-IN - [0:0]
:SVM-STATS-OUT - [0:0]
[5:500] -A PREROUTING -j SVM-PREROUTING
[5:500] -A POSTROUTING -j SVM-STATS-OUT
[3:300] -A SVM-STATS-IN -d 203.0.113.10/32 -j RETURN
[1:40] -A SVM-STATS-OUT -o eth2 -m conntrack --ctorigdst 203.0.113.10 -j RETURN
[2:60] -A SVM-STATS-OUT -o eth2 -m conntrack --ctrepldst 203.0.113.10 -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:SVM-INPUT - [0:0]
[0:0] -A INPUT -j SVM-INPUT
[0:0] -A INPUT -j DOCKER
COMMIT
"""


def test_parse_save_counters_jumps_and_match() -> None:
    st = ipt.parse_save(SAVE)
    assert ipt.stats_counters(st["mangle"]) == {"203.0.113.10": (300, 100)}
    assert st["filter"].jumps == frozenset({("INPUT", "SVM-INPUT")})
    assert ipt.missing_jumps("filter", st["filter"]) == (("FORWARD", "SVM-FORWARD"),)
    assert ipt.missing_jumps("mangle", st["mangle"]) == ()
    desired = {
        "SVM-FW-IN": [],
        "SVM-PREROUTING": [],
        "SVM-STATS-IN": ["-A SVM-STATS-IN -d 203.0.113.10/32 -j RETURN"],
        "SVM-STATS-OUT": [
            "-A SVM-STATS-OUT -o eth2 -m conntrack --ctorigdst 203.0.113.10 -j RETURN",
            "-A SVM-STATS-OUT -o eth2 -m conntrack --ctrepldst 203.0.113.10 -j RETURN",
        ],
    }
    assert ipt.matches("mangle", st["mangle"], desired)
    desired["SVM-STATS-IN"] = []
    assert not ipt.matches("mangle", st["mangle"], desired)
    assert "SVM-STATS-IN rule 1" in ipt.diff_summary("mangle", st["mangle"], desired)
    assert not ipt.matches("filter", st["filter"], {})  # chains missing
    assert ipt.error_line("x\nError occurred at line: 12\nTry") == 12
    assert ipt.error_line("boom") is None
