"""listTemplates and registerTemplate for system VM templates (:mod:`manager.templates`).

``registerTemplate`` registers a built image (``scripts/build-image``) by image id, path
under ``build/image/`` or ``file://`` URL, for one hypervisor (Embedded: format DIR, KVM:
RAW), ``templatetype=SYSTEM``; a bad request is a 431. ``router.template.<hypervisor>``
names the template new system VMs use.
"""

from __future__ import annotations

from typing import Any

from manager.api.commands.infra import names
from manager.api.dispatch import Call, Param, PType, api_command, keyword_match
from manager.api.responses import ListResult, param_error
from manager.templates import (
    TemplateError,
    add_template,
    check_registration,
    default_image_root,
    list_templates,
    template_view,
)

# CloudStack's templatefilter values. System templates are listed under "all" (root admin)
# or when templatetype=SYSTEM is asked for; user templates do not exist here.
TEMPLATE_FILTERS = (
    "featured",
    "self",
    "selfexecutable",
    "sharedexecutable",
    "executable",
    "community",
    "all",
)

_FIELDS = (
    "id",
    "name",
    "displaytext",
    "format",
    "hypervisor",
    "templatetype",
    "isready",
    "status",
    "zoneid",
    "zonename",
    "crossZones",
    "size",
    "checksum",
    "created",
    "version",
    "url",
)


def visible(template_type: str, templatefilter: str, asked_type: str | None) -> bool:
    """Pure: does a template of ``template_type`` show under this filter?"""
    if asked_type is not None and asked_type.upper() != template_type:
        return False
    return templatefilter == "all" or asked_type is not None


@api_command(
    "listTemplates",
    "List all public, private, and privileged templates.",
    params=(
        Param(
            "templatefilter",
            required=True,
            choices=TEMPLATE_FILTERS,
            description="possible values are featured, self, selfexecutable, "
            "sharedexecutable, executable, community and all",
        ),
        Param("id", PType.UUID, description="the template ID"),
        Param("name", description="the template name"),
        Param("hypervisor", description="the hypervisor for which to restrict the search"),
        Param("zoneid", PType.UUID, description="list templates by zoneId"),
        Param(
            "templatetype",
            description="the type of the template: USER, SYSTEM, ROUTING...",
            choices=("USER", "SYSTEM", "BUILTIN", "PERHOST", "ROUTING"),
        ),
        Param("isready", PType.BOOLEAN, description="only templates ready to deploy"),
    ),
    listing=True,
    response_fields=_FIELDS,
    admin=True,
)
async def list_templates_cmd(call: Call) -> ListResult:
    a = call.args
    zones, _, _ = await names(call)
    out: list[dict[str, Any]] = []
    for t in await list_templates(call.ctx.store):
        if not visible(t.template_type, a["templatefilter"], a.get("templatetype")):
            continue
        if a.get("id") not in (None, t.id) or a.get("name") not in (None, t.name):
            continue
        if "hypervisor" in a and a["hypervisor"].lower() != t.hypervisor.lower():
            continue
        if "zoneid" in a and t.zone_id not in (None, a["zoneid"]):
            continue
        if a.get("isready") is False or not keyword_match(a.get("keyword"), t.name):
            continue
        out.append(template_view(t, zones, show_url=True))
    return ListResult("template", out)


@api_command(
    "registerTemplate",
    "Registers an existing template into the CloudStack cloud (here: a system VM image "
    "built by scripts/build-image).",
    params=(
        Param("name", required=True, description="the name of the template"),
        Param("displaytext", description="the display text of the template"),
        Param(
            "url",
            required=True,
            length=4096,
            description="the image: its id or path under build/image/, or a file:// URL",
        ),
        Param("format", required=True, description="DIR (Embedded) or RAW (KVM)"),
        Param("hypervisor", required=True, description="the target hypervisor: Embedded, KVM"),
        Param("zoneid", description="the zone of the template; -1 or absent: every zone"),
        Param("templatetype", description="SYSTEM (the only type that can be registered)"),
        Param("ostypeid", description="accepted for compatibility"),
        Param("checksum", description="the image hash, optionally {SHA-256}-prefixed"),
        Param("ispublic", PType.BOOLEAN, description="accepted for compatibility"),
        Param("isfeatured", PType.BOOLEAN, description="accepted for compatibility"),
        Param("isextractable", PType.BOOLEAN, description="accepted for compatibility"),
        Param("passwordenabled", PType.BOOLEAN, description="accepted for compatibility"),
        Param("requireshvm", PType.BOOLEAN, description="accepted for compatibility"),
        Param("bits", PType.INTEGER, description="accepted for compatibility (64)"),
    ),
    response_fields=_FIELDS,
    admin=True,
)
async def register_template(call: Call) -> dict[str, Any]:
    zones, _, _ = await names(call)
    try:
        reg = check_registration(call.args, image_root=default_image_root(), zone_ids=list(zones))
        async with call.ctx.store.transaction() as tx:
            t = await add_template(tx, reg, now=call.ctx.clock(), account_id=call.user.account_id)
    except TemplateError as e:
        raise param_error(str(e)) from e
    return {"count": 1, "template": [template_view(t, zones, show_url=True)]}
