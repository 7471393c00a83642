"""Pure parsing of ``iptables-save`` / ``iptables-restore`` output (no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.roles.router.render import CHAINS, JUMPS, PREFIX

_ERR_LINE = re.compile(r"Error occurred at line: (\d+)")
_COUNTED = re.compile(r"^\[(\d+):(\d+)\] (.*)$")


@dataclass(frozen=True, slots=True)
class TableState:
    """Our part of one table as read back: owned chains' rules (no counters), which
    built-in jumps exist, and (if read with ``-c``) per-rule counters of owned chains."""

    chains: dict[str, list[str]]
    jumps: frozenset[tuple[str, str]]
    counters: dict[str, list[tuple[int, int]]]  # chain -> [(packets, bytes)] by position


def split_tables(save: str) -> dict[str, list[str]]:
    """``iptables-save`` output → table name → its lines (between ``*t`` and COMMIT)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in save.splitlines():
        if line.startswith("*"):
            current = out.setdefault(line[1:].strip(), [])
        elif line == "COMMIT":
            current = None
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return out


def parse_table(table: str, lines: list[str]) -> TableState:
    chains: dict[str, list[str]] = {}
    counters: dict[str, list[tuple[int, int]]] = {}
    jumps: set[tuple[str, str]] = set()
    wanted_jumps = set(JUMPS.get(table, ()))
    for raw in lines:
        pk = by = 0
        line = raw
        m = _COUNTED.match(raw)
        if m:
            pk, by, line = int(m.group(1)), int(m.group(2)), m.group(3)
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name.startswith(PREFIX):
                chains.setdefault(name, [])
                counters.setdefault(name, [])
            continue
        if not line.startswith("-A "):
            continue
        chain = line.split(" ", 2)[1]
        if chain.startswith(PREFIX):
            chains.setdefault(chain, []).append(line)
            counters.setdefault(chain, []).append((pk, by))
        else:
            parts = line.split()
            if len(parts) == 4 and parts[2] == "-j" and (chain, parts[3]) in wanted_jumps:
                jumps.add((chain, parts[3]))
    return TableState(chains=chains, jumps=frozenset(jumps), counters=counters)


def parse_save(save: str) -> dict[str, TableState]:
    return {t: parse_table(t, lines) for t, lines in split_tables(save).items()}


def missing_jumps(table: str, state: TableState | None) -> tuple[tuple[str, str], ...]:
    have = state.jumps if state else frozenset()
    return tuple(j for j in JUMPS[table] if j not in have)


def matches(table: str, state: TableState | None, desired: dict[str, list[str]]) -> bool:
    """Is our part of ``table`` exactly as desired (chains, rules, jumps)?"""
    if state is None:
        return False
    for chain in CHAINS[table]:
        if chain not in state.chains:
            return False
        if state.chains[chain] != desired.get(chain, []):
            return False
    return not missing_jumps(table, state)


def changed_chains(table: str, state: TableState | None, desired: dict[str, list[str]]) -> set[str]:
    """Owned chains of ``table`` whose rules differ from ``desired`` (or are missing)."""
    have = state.chains if state else {}
    return {c for c in CHAINS[table] if c not in have or have[c] != desired.get(c, [])}


def diff_summary(table: str, state: TableState | None, desired: dict[str, list[str]]) -> str:
    """First difference between read-back and desired, for an error message."""
    have = state.chains if state else {}
    for chain in CHAINS[table]:
        if chain not in have:
            return f"chain {chain} missing"
        got, want = have[chain], desired.get(chain, [])
        for i in range(max(len(got), len(want))):
            g = got[i] if i < len(got) else "<none>"
            w = want[i] if i < len(want) else "<none>"
            if g != w:
                return f"{chain} rule {i + 1}: kernel has {g!r}, wanted {w!r}"
    missing = missing_jumps(table, state)
    if missing:
        return f"jump {missing[0][0]} -> {missing[0][1]} missing"
    return "no difference"


def error_line(stderr: str) -> int | None:
    m = _ERR_LINE.search(stderr)
    return int(m.group(1)) if m else None


def stats_counters(state: TableState | None) -> dict[str, tuple[int, int]]:
    """mangle SVM-STATS-IN/OUT counters → public IP → (bytes in, bytes out)."""
    out: dict[str, list[int]] = {}
    if state is None:
        return {}
    for chain, idx in (("SVM-STATS-IN", 0), ("SVM-STATS-OUT", 1)):
        for line, (_pk, by) in zip(
            state.chains.get(chain, []), state.counters.get(chain, []), strict=False
        ):
            ip = _stats_ip(line)
            if ip is not None:
                out.setdefault(ip, [0, 0])[idx] += by
    return {ip: (v[0], v[1]) for ip, v in out.items()}


def _stats_ip(line: str) -> str | None:
    parts = line.split()
    for flag in ("-d", "--ctorigdst", "--ctrepldst"):
        if flag in parts:
            i = parts.index(flag)
            if i + 1 < len(parts):
                return parts[i + 1].removesuffix("/32")
    return None
