"""Pure parts of the drivers and the image recipe: names, specs, argv, cleanup rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager.hypervisor.base import (
    DriverError,
    NicSpec,
    VmSpec,
    boot_data_for,
    bridge_name,
    mac_for,
    netns_name,
    tap_name,
    validate_spec,
    veth_name,
)
from manager.hypervisor.cleanup import owned_link, owned_process
from manager.hypervisor.nspawn import nspawn_argv, overlay_options
from manager.hypervisor.qemu import qemu_argv
from systemvm_image.build import hash_files, parse_packages, release_text

VM = "3f2c9a56-0d7e-4a8e-9a55-1b2c3d4e5f60"


def spec(**kw: object) -> VmSpec:
    base: dict[str, object] = {
        "vm_id": VM, "name": "v-1-VM", "role": "consoleproxy", "boot_data": {"vm_id": VM},
        "nics": (NicSpec("control", "svb1234c", "169.254.0.5/16", bridge_address="169.254.0.1/16"),),  # noqa: E501
    }  # fmt: skip
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_names_fit_ifnamsiz_and_carry_the_prefix() -> None:
    for name in (veth_name("t12345n", VM, 9), tap_name("t12345n", VM, 0),
                 bridge_name("t12345n", "zone", "control")):  # fmt: skip
        assert len(name) <= 15 and name.startswith("t12345n")
        assert owned_link("t12345n", name)
    assert not owned_link("t12345n", "t12345nx")
    assert not owned_link("t1234", veth_name("t12345", VM, 0))
    assert netns_name("sv", VM) == netns_name("sv", VM) != netns_name("sv", VM + "x")
    with pytest.raises(DriverError, match="prefix"):
        veth_name("TooLongPrefix", VM, 0)
    with pytest.raises(DriverError, match="kind"):
        bridge_name("sv", "z", "bogus")


def test_mac_is_stable_local_unicast() -> None:
    mac = mac_for(VM, 0)
    assert mac == mac_for(VM, 0) != mac_for(VM, 1)
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b1


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"vm_id": "../etc"}, "bad vm id"),
        ({"memory_mb": 8}, "memory"),
        ({"nics": (NicSpec("control", "br", "not-an-ip"),)}, "not ADDR/PREFIX"),
        ({"nics": (NicSpec("weird", "br"),)}, "unknown kind"),
        ({"nics": (NicSpec("public", "br", default_route=True),)}, "without gateway"),
        ({"nics": (NicSpec("public", "b r"),)}, "bad bridge"),
    ],
)
def test_bad_specs_are_clear_errors(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(DriverError, match=msg):
        validate_spec(spec(**kw))


def test_boot_data_gets_nics_unless_given() -> None:
    bd = boot_data_for(spec())
    assert bd["extra"]["nics"][0] == {
        "name": "eth0", "kind": "control", "mac": mac_for(VM, 0),
        "address": "169.254.0.5/16", "gateway": None, "default_route": False,
    }  # fmt: skip
    given = boot_data_for(spec(boot_data={"vm_id": VM, "extra": {"nics": []}}))
    assert given["extra"]["nics"] == []


def test_nspawn_argv_mounts_boot_data_read_only_and_uses_the_netns() -> None:
    argv = nspawn_argv(prefix="sv", spec=spec(), root=Path("/r"), bootdata=Path("/b.json"),
                       netns="sv-abc")  # fmt: skip
    assert "--bind-ro=/b.json:/etc/sysvm/bootdata.json" in argv
    assert "--network-namespace-path=/run/netns/sv-abc" in argv
    assert {"--keep-unit", "--register=no", "--boot"} <= set(argv)
    assert owned_process("sv", argv) and not owned_process("sx", argv)
    with pytest.raises(DriverError):
        overlay_options(Path("/a,b"), Path("/u"), Path("/w"))


def test_qemu_argv_has_fw_cfg_boot_data_taps_and_serial_log() -> None:
    argv = qemu_argv(prefix="sv", spec=spec(), vmdir=Path("/vm"), image_dir=Path("/img"),
                     accel="tcg")  # fmt: skip
    joined = " ".join(argv)
    assert "-fw_cfg name=opt/sysvm/bootdata,file=/vm/bootdata.json" in joined
    assert f"ifname={tap_name('sv', VM, 0)}" in joined
    assert "path=/vm/console.log" in joined and "accel=tcg" in joined
    assert owned_process("sv", argv)


def test_package_list_parsing() -> None:
    assert parse_packages("# c\nfoo   # why\n\nbar-1.0+x\n") == ["foo", "bar-1.0+x"]
    with pytest.raises(RuntimeError, match="duplicate"):
        parse_packages("a\na\n")
    with pytest.raises(RuntimeError, match="not a package"):
        parse_packages("rm -rf\n")


def test_image_hash_tracks_content_and_release_is_one_line() -> None:
    a = hash_files([("x", b"1"), ("y", b"2")], "base")
    assert a == hash_files([("y", b"2"), ("x", b"1")], "base")
    assert a != hash_files([("x", b"1"), ("y", b"3")], "base")
    assert a != hash_files([("x", b"1"), ("y", b"2")], "other")
    assert release_text("0.1.0", "abc") == "0.1.0+abc\n"


def test_shipped_package_list_is_valid() -> None:
    names = parse_packages(
        (Path(__file__).parents[3] / "systemvm_image" / "packages.txt").read_text()
    )
    assert {"systemd-sysv", "python3", "dnsmasq", "haproxy", "apache2", "openssh-server"} <= set(
        names
    )


def test_load_drivers_maps_hypervisor_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    monkeypatch.setenv("SYSVM_HOST_PREFIX", "sv")
    from manager.hypervisor import load_drivers

    drivers = load_drivers(SimpleNamespace(home=tmp_path))
    assert {k: d.name for k, d in drivers.items()} == {
        "Embedded": "nspawn",
        "KVM": "qemu",
        "Process": "process",
    }
    assert all(getattr(d, "prefix", None) == "sv" for d in drivers.values())


def test_wheel_check_names_files_left_out() -> None:
    from systemvm_image.build import missing_from_wheel

    srcs = [("agent/a.py:644", b""), ("agent/static/x.js:644", b""), ("systemvm_image/b:644", b"")]
    assert missing_from_wheel(srcs, ["agent/a.py"]) == ["agent/static/x.js"]
