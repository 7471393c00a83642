"""A change pushed to many routers at once, end to end: ``scripts/bench/router_push.py``
at a small size (a real ``sysvm-manager`` process driven through its API with ``cs``,
routers on the External hypervisor played over real mTLS, every config run through the
router role's parser, and the bare-websockets baseline). The bench raises if any router
misses a change, refuses a config or a job fails — the lost-push race this found stays
caught here."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[3] / "scripts" / "bench" / "router_push.py"


async def test_rule_changes_and_a_setting_reach_every_router() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH), "-n", "12", "--rounds", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode()
    assert proc.returncode == 0, text[-4000:]
    assert text.count("event=rules_round") == 2 and text.count("event=setting_round") == 2, text
    assert text.count("event=baseline_round") == 2, text
    row = re.search(
        r"12 createFirewallRule at once -> all 12 routers acked \|\s+(\d+) \|\s+(\d+)", text
    )
    assert row is not None, text
    assert int(row.group(1)) > 0  # ms; the baseline (a few ms) may round to anything
    assert "event=manager_stopped rc=0" in text, text
