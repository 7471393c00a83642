"""System VM templates: URL resolution, registration checks, which template a new VM uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from manager.templates import (
    Template,
    TemplateError,
    builtin_name,
    check_registration,
    choose,
    read_image,
    template_view,
    url_to_path,
)

ROOT = Path("/srv/images")
MANIFEST = {"version": "0.1.0+abc123def456", "image_hash": "ab" * 32, "rootfs_bytes": 7}


def args(**over: Any) -> dict[str, Any]:
    base = {"name": "sysvm-2", "displaytext": "d", "url": "abc123def456", "format": "DIR",
            "hypervisor": "Embedded", "templatetype": "SYSTEM"}  # fmt: skip
    base.update(over)
    return base


def check(**over: Any) -> Any:
    seen: list[Path] = []

    def reader(p: Path) -> dict[str, Any]:
        seen.append(p)
        return dict(MANIFEST)

    reg = check_registration(args(**over), image_root=ROOT, zone_ids=["z1"], read_manifest=reader)
    return reg, seen


def tpl(tid: str, name: str, *, hv: str = "Embedded", zone: str | None = None,
        builtin: bool = False, created: float = 0) -> Template:  # fmt: skip
    return Template(
        id=tid, name=name, display_text=name, url="", image_dir=f"/i/{tid}",
        image_version="v", format="DIR", hypervisor=hv, zone_id=zone, template_type="SYSTEM",
        size=0, checksum="", builtin=builtin, account_id=None, created=created,
    )  # fmt: skip


# ---------------------------------------------------------------- url_to_path


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("abc123def456", ROOT / "abc123def456"),
        ("current", ROOT / "current"),
        ("/abs/image", Path("/abs/image")),
        ("file:///abs/image", Path("/abs/image")),
        ("file://localhost/abs/my%20image", Path("/abs/my image")),
    ],
)
def test_url_forms(url: str, path: Path) -> None:
    assert url_to_path(url, ROOT) == path


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://example.com/t.qcow2", "local images"),
        ("http://example.com/t.qcow2", "local images"),
        ("file://otherhost/x", "local path"),
        ("nfs://x/y", "unsupported scheme"),
        ("../../etc", "'..'"),
        ("  ", "empty"),
    ],
)
def test_bad_urls(url: str, why: str) -> None:
    with pytest.raises(TemplateError, match=why):
        url_to_path(url, ROOT)


# ---------------------------------------------------------------- check_registration


def test_a_good_registration_resolves_the_image() -> None:
    reg, seen = check()
    assert seen == [ROOT / "abc123def456"]
    assert (reg.name, reg.hypervisor, reg.format, reg.template_type) == (
        "sysvm-2", "Embedded", "DIR", "SYSTEM",
    )  # fmt: skip
    assert reg.image_version == MANIFEST["version"] and reg.zone_id is None and reg.size == 7


def test_case_insensitive_hypervisor_and_format_zone_and_checksum() -> None:
    reg, _ = check(hypervisor="kvm", format="raw", zoneid="z1", checksum="{SHA-256}" + "AB" * 32)
    assert (reg.hypervisor, reg.format, reg.zone_id) == ("KVM", "RAW", "z1")
    reg, _ = check(zoneid="-1", templatetype=None)
    assert reg.zone_id is None and reg.template_type == "SYSTEM"


@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "name"),
        ({"hypervisor": "XenServer"}, "Embedded, KVM"),
        ({"format": "QCOW2"}, "is DIR"),
        ({"hypervisor": "KVM", "format": "DIR"}, "is RAW"),
        ({"templatetype": "USER"}, "only SYSTEM"),
        ({"zoneid": "nope"}, "no such zone"),
        ({"checksum": "{SHA-256}" + "cd" * 32}, "checksum"),
        ({"url": "https://x/y"}, "local images"),
    ],
)
def test_bad_registrations(over: dict[str, Any], why: str) -> None:
    with pytest.raises(TemplateError, match=why):
        check(**over)


def test_read_image_checks_the_files_the_hypervisor_needs(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"no manifest\.json"):
        read_image(tmp_path, "Embedded")
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    with pytest.raises(TemplateError, match="rootfs/etc/sysvm-release"):
        read_image(tmp_path, "Embedded")
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "sysvm-release").write_text("x\n")
    assert read_image(tmp_path, "Embedded")["_dir"] == str(tmp_path.resolve())
    with pytest.raises(TemplateError, match=r"disk\.img"):
        read_image(tmp_path, "KVM")
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(TemplateError, match="not an object"):
        read_image(tmp_path, "Embedded")


# ---------------------------------------------------------------- choose


def test_the_named_template_wins_and_a_zone_one_beats_a_global_one() -> None:
    ts = [tpl("g", "custom", created=1), tpl("z", "custom", zone="z1", created=0),
          tpl("b", builtin_name("1"), builtin=True, created=5)]  # fmt: skip
    got = choose(ts, hypervisor="Embedded", zone_id="z1", wanted="custom", wanted_is_default=False)
    assert got is not None and got.id == "z"
    got = choose(ts, hypervisor="Embedded", zone_id="z2", wanted="custom", wanted_is_default=False)
    assert got is not None and got.id == "g"


def test_the_default_setting_means_the_newest_builtin_for_the_hypervisor() -> None:
    ts = [tpl("old", "systemvm-1", builtin=True, created=1),
          tpl("new", "systemvm-2", builtin=True, created=2),
          tpl("kvm", "systemvm-3", hv="KVM", builtin=True, created=3),
          tpl("mine", "custom", created=4)]  # fmt: skip
    got = choose(ts, hypervisor="Embedded", zone_id="z1", wanted="SystemVM Template (Embedded)",
                 wanted_is_default=True)  # fmt: skip
    assert got is not None and got.id == "new"
    assert (
        choose([], hypervisor="Embedded", zone_id="z1", wanted="x", wanted_is_default=True) is None
    )


def test_an_explicit_name_that_matches_nothing_is_an_error() -> None:
    ts = [tpl("k", "custom", hv="KVM"), tpl("z", "custom", zone="z2")]
    with pytest.raises(TemplateError, match=r"router\.template\.embedded names template 'custom'"):
        choose(ts, hypervisor="Embedded", zone_id="z1", wanted="custom", wanted_is_default=False)


def test_template_view_uses_cloudstack_names() -> None:
    v = template_view(tpl("a", "n", zone="z1"), {"z1": "zone1"}, show_url=False)
    assert v["templatetype"] == "SYSTEM" and v["zonename"] == "zone1" and v["isready"] is True
    assert v["crossZones"] is False and "url" not in v
    v = template_view(tpl("a", "n"), {}, show_url=True)
    assert v["crossZones"] is True and "zoneid" not in v and "url" in v
