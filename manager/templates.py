"""System VM templates: which built image a new system VM boots.

A template names one image directory made by ``scripts/build-image`` (``rootfs/`` for the
``Embedded`` hypervisor, ``disk.img`` + ``vmlinuz`` + ``initrd.img`` for ``KVM``) for one
hypervisor, in one zone or every zone (table ``templates``, ``sql/020_templates.sql``).

- :func:`setup` (manager start) registers the image at ``$SYSVM_IMAGE`` /
  ``build/image/current`` as ``systemvm-<image version>`` for Embedded and KVM (built-in,
  ``templatetype=SYSTEM``) unless that version is registered already.
- :func:`check_registration` (pure) validates what ``registerTemplate`` got.
- :func:`choose` (pure) picks the template of a new system VM: the one named by
  ``router.template.<hypervisor>`` (zone > global), else — while that setting keeps its
  default — the newest built-in template for the hypervisor.

The driver keeps using a VM's image for its whole life (the per-VM ``image`` pin file of the
host drivers), so changing the setting affects new VMs only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger("sysvm.templates")

SYSTEM = "SYSTEM"
USER = "USER"
TEMPLATE_TYPES = (SYSTEM, USER)
# hypervisor -> (format, files the image directory must hold)
IMAGE_HYPERVISORS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "Embedded": ("DIR", ("rootfs/etc/sysvm-release",)),
    "KVM": ("RAW", ("disk.img", "vmlinuz", "initrd.img")),
}
SETTING_FOR = {"Embedded": "router.template.embedded", "KVM": "router.template.kvm"}
_IMAGE_ID = re.compile(r"^[0-9a-f]{6,64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,254}$")


class TemplateError(ValueError):
    """A registration or a choice that cannot work; the message is fit for ``errortext``."""


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    name: str
    display_text: str
    url: str
    image_dir: str
    image_version: str
    format: str
    hypervisor: str
    zone_id: str | None  # None: every zone
    template_type: str
    size: int
    checksum: str
    builtin: bool
    account_id: str | None
    created: float


@dataclass(frozen=True, slots=True)
class Registration:
    """A validated registerTemplate request (paths resolved, version read)."""

    name: str
    display_text: str
    url: str
    image_dir: str
    image_version: str
    format: str
    hypervisor: str
    zone_id: str | None
    template_type: str
    size: int
    checksum: str


# ---------------------------------------------------------------- pure


def default_image_root() -> Path:
    """Where ``scripts/build-image`` puts images (``$SYSVM_IMAGE_DIR`` or build/image)."""
    env = os.environ.get("SYSVM_IMAGE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "build" / "image"


def url_to_path(url: str, image_root: Path) -> Path:
    """``file:///abs/dir``, ``/abs/dir``, ``<image id>`` or a path relative to the image
    root (``current``, ``811334ddbc77``) -> the directory (not yet checked)."""
    text = url.strip()
    if not text:
        raise TemplateError("url must not be empty")
    parts = urlsplit(text)
    if parts.scheme in ("http", "https", "ftp", "scp", "metalink"):
        raise TemplateError(
            f"url {text!r}: system VM templates are local images here (build one with "
            "scripts/build-image and register its image id, path or file:// URL)"
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise TemplateError(f"url {text!r}: file URLs must name a local path")
        return Path(unquote(parts.path))
    if parts.scheme:
        raise TemplateError(f"url {text!r}: unsupported scheme {parts.scheme!r}")
    p = Path(text)
    if p.is_absolute():
        return p
    if ".." in p.parts:
        raise TemplateError(f"url {text!r}: '..' is not allowed")
    return image_root / p


def check_registration(
    args: Mapping[str, Any],
    *,
    image_root: Path,
    zone_ids: Sequence[str],
    read_manifest: Any = None,
) -> Registration:
    """Validates registerTemplate's arguments (typed by the API layer) and resolves the
    image. ``read_manifest(path) -> dict`` is injectable for tests (default: reads
    ``manifest.json`` and checks the files the hypervisor needs)."""
    name = str(args.get("name", "")).strip()
    if not _NAME.match(name):
        raise TemplateError(f"name {name!r}: 1-255 characters, letters, digits, ' ._()+-'")
    display = str(args.get("displaytext") or name).strip()[:4096]
    hypervisor = str(args.get("hypervisor", ""))
    hv = next((h for h in IMAGE_HYPERVISORS if h.lower() == hypervisor.lower()), None)
    if hv is None:
        raise TemplateError(
            f"hypervisor {hypervisor!r}: system VM templates exist for "
            f"{', '.join(IMAGE_HYPERVISORS)}"
        )
    want_format, _files = IMAGE_HYPERVISORS[hv]
    fmt = str(args.get("format", "")).upper()
    if fmt != want_format:
        raise TemplateError(
            f"format {fmt or '(none)'!r}: a {hv} system VM template is {want_format}"
        )
    ttype = str(args.get("templatetype") or SYSTEM).upper()
    if ttype != SYSTEM:
        raise TemplateError(f"templatetype {ttype!r}: only SYSTEM templates can be registered")
    zone = args.get("zoneid")
    zone_id: str | None = None
    if zone not in (None, "", "-1"):
        if zone not in zone_ids:
            raise TemplateError(f"zoneid {zone!r}: no such zone")
        zone_id = str(zone)
    url = str(args.get("url", ""))
    path = url_to_path(url, image_root)
    reader = read_manifest or (lambda p: read_image(p, hv))
    manifest = reader(path)
    version = str(manifest.get("version", ""))
    if not version:
        raise TemplateError(f"url {url!r}: the image's manifest has no version")
    checksum = str(args.get("checksum") or "")
    image_hash = str(manifest.get("image_hash", ""))
    if checksum:
        algo, _, value = checksum.partition("}")
        value = value if algo.startswith("{") else checksum
        if value.lower() != image_hash.lower():
            raise TemplateError(f"checksum does not match the image (its hash is {image_hash})")
    return Registration(
        name=name,
        display_text=display,
        url=url,
        image_dir=str(manifest.get("_dir", path)),
        image_version=version,
        format=fmt,
        hypervisor=hv,
        zone_id=zone_id,
        template_type=ttype,
        size=int(manifest.get("disk_bytes" if hv == "KVM" else "rootfs_bytes", 0) or 0),
        checksum=image_hash,
    )


def read_image(path: Path, hypervisor: str) -> dict[str, Any]:
    """The image's manifest (plus ``_dir``: the resolved directory); TemplateError if the
    directory is not a built image usable by ``hypervisor``."""
    real = path.resolve()
    try:
        manifest = json.loads((real / "manifest.json").read_text())
    except FileNotFoundError:
        raise TemplateError(f"{path}: not a system VM image (no manifest.json)") from None
    except (OSError, ValueError) as e:
        raise TemplateError(f"{path}: unreadable manifest.json ({e})") from None
    if not isinstance(manifest, dict):
        raise TemplateError(f"{path}: manifest.json is not an object")
    for f in IMAGE_HYPERVISORS[hypervisor][1]:
        if not (real / f).exists():
            raise TemplateError(f"{path}: no {f} (not usable on {hypervisor})")
    manifest["_dir"] = str(real)
    return manifest


def choose(
    templates: Sequence[Template],
    *,
    hypervisor: str,
    zone_id: str,
    wanted: str,
    wanted_is_default: bool,
) -> Template | None:
    """The template a new system VM on ``hypervisor`` in ``zone_id`` uses (pure).

    ``wanted`` is ``router.template.<hypervisor>`` for the zone. A template of that name
    wins; while the setting keeps its default value and no template has that name, the
    newest built-in template does; None if there is none (the driver's default image).
    A name that was set explicitly but matches nothing raises TemplateError."""
    usable = [t for t in templates if t.hypervisor == hypervisor and t.zone_id in (None, zone_id)]
    named = [t for t in usable if t.name == wanted]
    if named:
        return max(named, key=lambda t: (t.zone_id is not None, t.created))
    if not wanted_is_default:
        raise TemplateError(
            f"{SETTING_FOR.get(hypervisor, 'router.template')} names template {wanted!r}, "
            f"which is not registered for {hypervisor} in zone {zone_id}"
        )
    builtin = [t for t in usable if t.builtin]
    return max(builtin, key=lambda t: t.created) if builtin else None


def builtin_name(version: str) -> str:
    return f"systemvm-{version}"


def template_view(t: Template, zones: Mapping[str, str], *, show_url: bool) -> dict[str, Any]:
    """listTemplates / registerTemplate shape (CloudStack's field names)."""
    view: dict[str, Any] = {
        "id": t.id,
        "name": t.name,
        "displaytext": t.display_text,
        "ispublic": False,
        "isfeatured": False,
        "isextractable": False,
        "passwordenabled": False,
        "isready": True,
        "status": "Download Complete",
        "format": t.format,
        "hypervisor": t.hypervisor,
        "templatetype": t.template_type,
        "crossZones": t.zone_id is None,
        "zoneid": t.zone_id,
        "zonename": zones.get(t.zone_id) if t.zone_id else None,
        "account": "system",
        "domain": "ROOT",
        "size": t.size,
        "checksum": t.checksum,
        "ostypename": "Debian GNU/Linux 13 (64-bit)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(t.created)),
        "version": t.image_version,
        "requireshvm": t.hypervisor == "KVM",
        "bits": 64,
    }
    if show_url:
        view["url"] = t.url
    return {k: v for k, v in view.items() if v is not None}


# ---------------------------------------------------------------- store (I/O)

_COLUMNS = (
    "id, name, display_text, url, image_dir, image_version, format, hypervisor, zone_id, "
    "template_type, size, checksum, builtin, account_id, created"
)


def _row(r: Mapping[str, Any]) -> Template:
    return Template(
        id=r["id"],
        name=r["name"],
        display_text=r["display_text"],
        url=r["url"],
        image_dir=r["image_dir"],
        image_version=r["image_version"],
        format=r["format"],
        hypervisor=r["hypervisor"],
        zone_id=r["zone_id"],
        template_type=r["template_type"],
        size=int(r["size"]),
        checksum=r["checksum"],
        builtin=bool(r["builtin"]),
        account_id=r["account_id"],
        created=float(r["created"]),
    )


async def list_templates(store: Any) -> list[Template]:
    rows = await store.fetchall(
        f"SELECT {_COLUMNS} FROM templates WHERE removed IS NULL ORDER BY created, name"  # noqa: S608
    )
    return [_row(r) for r in rows]


async def get_template(store: Any, template_id: str) -> Template | None:
    rows = await store.fetchall(
        f"SELECT {_COLUMNS} FROM templates WHERE id = ?",  # noqa: S608 - constant columns
        (template_id,),
    )
    return _row(rows[0]) if rows else None


async def add_template(
    tx: Any, reg: Registration, *, now: float, builtin: bool = False, account_id: str | None = None
) -> Template:
    """Inserts a template; TemplateError if the name is taken for that hypervisor/zone."""
    clash = await tx.fetchall(
        "SELECT id FROM templates WHERE removed IS NULL AND name = ? AND hypervisor = ?"
        " AND (zone_id IS ? OR zone_id IS NULL OR ? IS NULL)",
        (reg.name, reg.hypervisor, reg.zone_id, reg.zone_id),
    )
    if clash:
        raise TemplateError(f"a {reg.hypervisor} template named {reg.name!r} exists already")
    t = Template(
        id=str(uuid.uuid4()),
        name=reg.name,
        display_text=reg.display_text,
        url=reg.url,
        image_dir=reg.image_dir,
        image_version=reg.image_version,
        format=reg.format,
        hypervisor=reg.hypervisor,
        zone_id=reg.zone_id,
        template_type=reg.template_type,
        size=reg.size,
        checksum=reg.checksum,
        builtin=builtin,
        account_id=account_id,
        created=now,
    )
    await tx.execute(
        f"INSERT INTO templates ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
        (
            t.id, t.name, t.display_text, t.url, t.image_dir, t.image_version, t.format,
            t.hypervisor, t.zone_id, t.template_type, t.size, t.checksum, int(builtin),
            account_id, now,
        ),
    )  # fmt: skip
    return t


async def register_builtin(ctx: Any, image_dir: Path | None = None) -> list[Template]:
    """Registers the built image (default ``$SYSVM_IMAGE`` or build/image/current) as
    ``systemvm-<version>`` for every hypervisor it can boot on, once per version."""
    from manager.hypervisor.nspawn import default_image_dir

    path = image_dir or default_image_dir()
    if not (path / "manifest.json").exists():
        log.warning("event=template_image_missing path=%s hint=run_scripts/build-image", path)
        return []
    existing = {(t.image_version, t.hypervisor) for t in await list_templates(ctx.store)}
    added: list[Template] = []
    now = float(ctx.clock())
    async with ctx.store.transaction() as tx:
        for hv, (fmt, _files) in IMAGE_HYPERVISORS.items():
            try:
                manifest = read_image(path, hv)
            except TemplateError as e:
                log.info("event=template_not_for_hypervisor hypervisor=%s reason=%s", hv, e)
                continue
            version = str(manifest.get("version", ""))
            if not version or (version, hv) in existing:
                continue
            reg = Registration(
                name=builtin_name(version),
                display_text=f"System VM template {version} ({hv})",
                url=f"file://{manifest['_dir']}",
                image_dir=str(manifest["_dir"]),
                image_version=version,
                format=fmt,
                hypervisor=hv,
                zone_id=None,
                template_type=SYSTEM,
                size=int(manifest.get("disk_bytes" if hv == "KVM" else "rootfs_bytes", 0) or 0),
                checksum=str(manifest.get("image_hash", "")),
            )
            added.append(await add_template(tx, reg, now=now, builtin=True))
    for t in added:
        log.info(
            "event=template_registered id=%s name=%s hypervisor=%s builtin=true",
            t.id, t.name, t.hypervisor,
        )  # fmt: skip
    return added


async def template_for_new_vm(ctx: Any, zone_id: str, hypervisor: str) -> Template | None:
    """:func:`choose` over the store and the zone's ``router.template.<hypervisor>``."""
    setting = SETTING_FOR.get(hypervisor)
    if setting is None:
        return None
    wanted = str(ctx.settings.get(setting, zone_id))
    default = ctx.settings.setting(setting).default
    return choose(
        await list_templates(ctx.store),
        hypervisor=hypervisor,
        zone_id=zone_id,
        wanted=wanted,
        wanted_is_default=wanted == default,
    )


async def setup(ctx: Any) -> None:
    """Manager start: register the built image (a missing image is logged, not fatal)."""
    try:
        await register_builtin(ctx)
    except TemplateError as e:
        log.error("event=template_builtin_failed error=%s", e)
