"""``manager.hypervisor.cgroups``: which cgroups and limit files a VM gets (pure), the
shell that makes a process join them before it execs (run for real), and the limiter on a
directory tree laid out as a cgroup filesystem (the real kernel files are written by the
nspawn system test, which reads the limits back from the container's own cgroups)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from manager.hypervisor.cgroups import (
    CgroupLimiter,
    Layout,
    join_argv,
    layout_from,
    limit_files,
    parse_proc_cgroup,
)

V1 = """12:pids:/
9:name=systemd:/
4:memory:/process_api/abc
2:cpu,cpuacct:/
0::/
"""


def test_proc_cgroup_lines_name_each_controller() -> None:
    own = parse_proc_cgroup(V1)
    assert own == {"pids": "/", "memory": "/process_api/abc", "cpu": "/", "cpuacct": "/", "": "/"}
    assert parse_proc_cgroup("0::/system.slice/sysvm-manager.service\n") == {
        "": "/system.slice/sysvm-manager.service"
    }
    assert parse_proc_cgroup("garbage\n") == {}


def test_layouts_v1_v2_and_none(tmp_path: Path) -> None:
    v1 = layout_from(tmp_path, parse_proc_cgroup(V1), None)
    assert v1 == Layout(
        1, tmp_path, {"memory": tmp_path / "memory/process_api/abc", "cpu": tmp_path / "cpu"}
    )
    own2 = parse_proc_cgroup("0::/system.slice/m.service\n")
    v2 = layout_from(tmp_path, own2, "cpuset cpu io memory pids\n")
    assert v2 == Layout(2, tmp_path, {"": tmp_path / "system.slice/m.service"})
    assert layout_from(tmp_path, own2, "cpuset io pids\n") is None  # no memory, no cpu
    assert layout_from(tmp_path, {"memory": "/"}, None) is None  # v1 without cpu


def test_limit_files_values() -> None:
    assert limit_files(1, 512, 1) == {
        "memory": {"memory.limit_in_bytes": "536870912"},
        "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"},
    }
    assert limit_files(2, 768, 2) == {"": {"memory.max": "805306368", "cpu.max": "200000 100000"}}
    with pytest.raises(ValueError, match="positive"):
        limit_files(1, 0, 1)


def test_join_argv_writes_its_pid_then_execs(tmp_path: Path) -> None:
    a, b = tmp_path / "a.procs", tmp_path / "b.procs"
    argv = join_argv([a, b], ["/bin/sh", "-c", 'echo "$$ $1"', "x", "with space"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout
    pid, arg = out.split(maxsplit=1)
    assert a.read_text().strip() == pid == b.read_text().strip()  # exec: the same process
    assert arg.strip() == "with space"
    bad = join_argv([tmp_path / "missing" / "cgroup.procs"], ["/bin/true"])
    assert subprocess.run(bad, capture_output=True, timeout=10).returncode == 125


def v1_tree(root: Path) -> Layout:
    for d in ("memory/process_api/abc", "cpu"):
        (root / d).mkdir(parents=True)
    layout = layout_from(root, parse_proc_cgroup(V1), None)
    assert layout is not None
    return layout


def test_limiter_creates_fills_and_removes(tmp_path: Path) -> None:
    lim = CgroupLimiter(v1_tree(tmp_path))
    procs = lim.create("sysvm-x", 512, 2)
    mem, cpu = tmp_path / "memory/process_api/abc/sysvm-x", tmp_path / "cpu/sysvm-x"
    assert procs == [mem / "cgroup.procs", cpu / "cgroup.procs"]
    assert (mem / "memory.limit_in_bytes").read_text() == "536870912\n"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "200000\n"
    assert lim.create("sysvm-x", 256, 1) == procs  # a reboot: the same cgroups, new limits
    assert (mem / "memory.limit_in_bytes").read_text() == "268435456\n"
    # a kernel cgroup directory holds only kernel files; this tree needs them gone first
    for d in (mem, cpu):
        for f in d.iterdir():
            f.unlink()
    assert lim.remove("sysvm-x") and not mem.exists() and not cpu.exists()
    assert lim.remove("sysvm-x")  # already gone


def test_a_busy_cgroup_stays_and_is_reported(tmp_path: Path) -> None:
    lim = CgroupLimiter(v1_tree(tmp_path))
    lim.create("sysvm-y", 512, 1)
    assert not lim.remove("sysvm-y")  # not empty (here: files; in the kernel: tasks)


def test_without_controllers_vms_run_unlimited(tmp_path: Path) -> None:
    lim = CgroupLimiter(None)
    assert lim.create("sysvm-z", 512, 1) == [] and lim.unavailable
    broken = CgroupLimiter(Layout(1, tmp_path, {"memory": tmp_path / "nope", "cpu": tmp_path}))
    assert broken.create("sysvm-z", 512, 1) == []  # cannot write: logged, no limits
    assert "FileNotFoundError" in broken.unavailable


def test_v2_moves_the_manager_out_before_handing_controllers_down(tmp_path: Path) -> None:
    base = tmp_path / "system.slice/m.service"
    base.mkdir(parents=True)
    (base / "cgroup.subtree_control").write_text("")
    (base / "cgroup.procs").write_text("4242\n")
    lim = CgroupLimiter(Layout(2, tmp_path, {"": base}))
    procs = lim.create("sysvm-v", 768, 2)
    assert procs == [base / "sysvm-v/cgroup.procs"]
    assert (base / "manager/cgroup.procs").read_text().strip().isdigit()
    assert (base / "cgroup.subtree_control").read_text() == "+memory +cpu\n"
    assert (base / "sysvm-v/cpu.max").read_text() == "200000 100000\n"


def test_owned_lists_only_this_prefix(tmp_path: Path) -> None:
    lim = CgroupLimiter(v1_tree(tmp_path))
    for name in ("sysvm-sv-aaaaaa", "sysvm-svx-bbbbbb", "other"):
        lim.create(name, 512, 1)
    owned = lim.owned("sv")
    assert [p.name for p in owned] == ["sysvm-sv-aaaaaa", "sysvm-sv-aaaaaa"]
    assert {p.parent for p in owned} == {tmp_path / "cpu", tmp_path / "memory/process_api/abc"}
    assert CgroupLimiter(None).owned("sv") == []
