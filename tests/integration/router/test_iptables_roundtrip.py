"""Every kind of rule the renderer writes reads back from the kernel exactly as written
(the applier's verification and "apply twice changes nothing" rely on it), and the
restore only touches our chains."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.roles.router import config as rc
from agent.roles.router import iptables as ipt
from agent.roles.router import render
from agent.roles.router.proc import CommandError
from tests.integration.router.conftest import sh

pytestmark = pytest.mark.integration


@pytest.fixture
async def ns(netns_prefix: str) -> AsyncIterator[str]:
    name = f"{netns_prefix}rt"
    await sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        await sh("ip", "netns", "del", name, check=False)


def every_rule_kind() -> dict[str, object]:
    pub = ["203.0.113.10", "203.0.113.11", "203.0.113.12"]
    return {
        "interfaces": {
            "control": {"device": "eth0", "ip": "169.254.3.4"},
            "public": {"device": "eth2", "ips": pub},
            "guest": {"device": "eth1", "gateway": "10.1.1.1", "cidr": "10.1.1.0/24"},
        },
        "firewall": [
            {"public_ip": pub[0], "protocol": "tcp", "ports": 22},
            {"public_ip": pub[0], "protocol": "tcp", "ports": "1000-2000"},
            {
                "public_ip": pub[0],
                "protocol": "udp",
                "ports": [53, 53],
                "source_cidrs": ["0.0.0.0/0"],
            },
            {"public_ip": pub[0], "protocol": "udp", "source_cidrs": ["10.0.0.0/8", "1.2.3.4/32"]},
            {"public_ip": pub[1], "protocol": "icmp"},
            {"public_ip": pub[1], "protocol": "icmp", "icmp_type": "echo-request"},
            {"public_ip": pub[1], "protocol": "icmp", "icmp_type": "3/4"},
            {"public_ip": pub[1], "protocol": "icmp", "icmp_type": "any"},
            {"public_ip": pub[2], "protocol": "all", "source_cidrs": ["192.168.0.0/16"]},
        ],
        "egress": {
            "default": "deny",
            "rules": [
                {"protocol": "tcp", "ports": "80-81", "destination_cidrs": ["0.0.0.0/0"]},
                {"protocol": "udp", "ports": 123},
                {"protocol": "icmp", "icmp_type": "time-exceeded"},
                {"protocol": "all", "destination_cidrs": ["10.9.0.0/16"]},
            ],
        },
        "port_forwarding": [
            {
                "public_ip": pub[0],
                "protocol": "tcp",
                "public_ports": 2222,
                "guest_ip": "10.1.1.5",
                "guest_ports": 22,
            },
            {
                "public_ip": pub[0],
                "protocol": "udp",
                "public_ports": "5000-5010",
                "guest_ip": "10.1.1.5",
                "guest_ports": "6000-6010",
            },
        ],
        "static_nat": [{"public_ip": pub[1], "guest_ip": "10.1.1.6"}],
        "source_nat": pub[0],
    }


async def test_every_rule_kind_reads_back_as_written(ns: str) -> None:
    cfg = rc.parse(every_rule_kind())
    paths = render.Paths(Path("/run/unused"), Path("/run/unused"))
    r = render.render(cfg, paths, render.Env())
    # Someone else's rules in the same tables must survive our restores.
    foreign = "*filter\n:OTHER - [0:0]\n-A INPUT -j OTHER\n-A OTHER -j RETURN\nCOMMIT\n"
    await sh("ip", "netns", "exec", ns, "iptables-restore", "--noflush", input=foreign)
    inp = render.restore_input(r.tables, None, {t: render.JUMPS[t] for t in render.TABLES})
    await sh("ip", "netns", "exec", ns, "iptables-restore", "--noflush", "--test", input=inp.text)
    await sh("ip", "netns", "exec", ns, "iptables-restore", "--noflush", input=inp.text)
    state = ipt.parse_save(await sh("ip", "netns", "exec", ns, "iptables-save", "-c"))
    for t in render.TABLES:
        desired = r.tables[t].by_chain()
        assert ipt.matches(t, state.get(t), desired), ipt.diff_summary(t, state.get(t), desired)
    # Restoring again with one chain changed touches only that chain.
    c2 = every_rule_kind()
    c2["egress"] = {"default": "allow"}
    r2 = render.render(rc.parse(c2), paths, render.Env())
    changed = {
        t: ipt.changed_chains(t, state.get(t), r2.tables[t].by_chain()) for t in render.TABLES
    }
    assert changed == {"filter": {"SVM-EGRESS"}, "nat": set(), "mangle": set()}
    inp2 = render.restore_input({"filter": r2.tables["filter"]}, changed)
    await sh("ip", "netns", "exec", ns, "iptables-restore", "--noflush", input=inp2.text)
    save = await sh("ip", "netns", "exec", ns, "iptables-save")
    state2 = ipt.parse_save(save)
    assert ipt.matches("filter", state2["filter"], r2.tables["filter"].by_chain())
    assert "-A INPUT -j OTHER" in save and "-A OTHER -j RETURN" in save
    assert save.count("-A INPUT -j SVM-INPUT") == 1


async def test_a_bad_line_is_reported_with_its_rule(ns: str) -> None:
    c = every_rule_kind()
    c["firewall"].append(  # type: ignore[attr-defined]
        {"public_ip": "203.0.113.11", "protocol": "icmp", "icmp_type": "bogus-type"}
    )
    r = render.render(rc.parse(c), render.Paths(Path("/x"), Path("/x")), render.Env())
    inp = render.restore_input(r.tables)
    with pytest.raises(CommandError) as e:
        await sh(
            "ip", "netns", "exec", ns, "iptables-restore", "--noflush", "--test", input=inp.text
        )
    line = ipt.error_line(e.value.stderr)
    assert line is not None
    table, rule, origin = inp.explain(line) or ("", "", None)
    assert table == "mangle" and "--icmp-type bogus-type" in rule and origin == "firewall[9]"
