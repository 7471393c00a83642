"""First-start initialisation: :func:`ensure_initialized`.

- the root admin (account ``admin``, domain ``ROOT``, account type 1) with a random API key
  pair;
- ``$SYSVM_HOME/credentials.json`` (``endpoint``, ``apikey``, ``secretkey``), 0600 from
  creation, rewritten atomically on every start (same keys, current endpoint) so a lost file
  comes back;
- a default zone / pod / cluster / host in ranges that cannot clash with the host's network:
  link-local 169.254.0.0/16 for control, 100.64.0.0/24 (shared address space) for the pod,
  198.18.0.0/24 (benchmark range) for public addresses, 10.250.0.0/16 for guests.

Idempotent: each part is created only if missing, inside one transaction.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import uuid
from pathlib import Path
from typing import Any

from manager.store.base import Cluster, Event, Host, Pod, User, Zone

log = logging.getLogger("sysvm.bootstrap")

ADMIN_USERNAME = "admin"
ROOT_DOMAIN_ID = "00000000-0000-0000-0000-000000000001"  # stable id of domain ROOT
CREDENTIALS = "credentials.json"
DEFAULT_API_LISTEN = "127.0.0.1:8080"

DEFAULT_ZONE = {
    "name": "zone1",
    "dns1": "198.18.0.1",
    "internal_dns1": "100.64.0.1",
    "public_cidr": "198.18.0.0/24",
    "guest_cidr": "10.250.0.0/16",
    "linklocal_cidr": "169.254.0.0/16",
}
DEFAULT_POD = {
    "name": "pod1",
    "gateway": "100.64.0.1",
    "netmask": "255.255.255.0",
    "start_ip": "100.64.0.10",
    "end_ip": "100.64.0.250",
}


def _event(kind: str, text: str, now: float, resource_id: str | None = None) -> Event:
    return Event(str(uuid.uuid4()), kind, "INFO", text, None, resource_id, now)


def new_api_keys() -> tuple[str, str]:
    """(apikey, secretkey): 512 random bits each, URL-safe base64 like CloudStack's."""
    return secrets.token_urlsafe(64), secrets.token_urlsafe(64)


def api_endpoint(ctx: Any) -> str:
    """The URL clients use: ``ctx.api_url`` if the context has one, else from
    ``SYSVM_API_LISTEN`` (host:port)."""
    url = getattr(ctx, "api_url", None)
    if isinstance(url, str) and url:
        return url
    listen = os.environ.get("SYSVM_API_LISTEN", DEFAULT_API_LISTEN)
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):  # a wildcard listener is reached on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/client/api"


def write_secret_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replaces ``path``: temp file created 0600, written, fsynced, renamed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def ensure_initialized(ctx: Any) -> dict[str, Any]:
    """Creates what a first start needs; returns what was created (for logs and tests)."""
    store = ctx.store
    now = float(ctx.clock())
    created: dict[str, Any] = {"admin": False, "zone": False}
    async with store.transaction() as tx:
        if await store.get_user_by_username(ADMIN_USERNAME) is None:
            apikey, secretkey = new_api_keys()
            await tx.add_user(
                User(
                    id=str(uuid.uuid4()),
                    account_id=str(uuid.uuid4()),
                    username=ADMIN_USERNAME,
                    account_name=ADMIN_USERNAME,
                    account_type=1,
                    domain_id=ROOT_DOMAIN_ID,
                    apikey=apikey,
                    secretkey=secretkey,
                    state="enabled",
                )
            )
            await tx.add_event(_event("USER.CREATE", "Created root admin user admin", now))
            created["admin"] = True
        if not await store.list_zones():
            zone = Zone(
                id=str(uuid.uuid4()),
                allocation_state="Enabled",
                network_type="Advanced",
                created=now,
                **DEFAULT_ZONE,
            )
            pod = Pod(id=str(uuid.uuid4()), zone_id=zone.id, created=now, **DEFAULT_POD)
            cluster = Cluster(
                id=str(uuid.uuid4()),
                pod_id=pod.id,
                zone_id=zone.id,
                name="cluster1",
                hypervisor="Embedded",
                created=now,
            )
            host = Host(
                id=str(uuid.uuid4()),
                cluster_id=cluster.id,
                pod_id=pod.id,
                zone_id=zone.id,
                name=socket.gethostname() or "host1",
                type="Routing",
                hypervisor="Embedded",
                ip_address="127.0.0.1",
                state="Up",
                created=now,
            )
            await tx.add_zone(zone)
            await tx.add_pod(pod)
            await tx.add_cluster(cluster)
            await tx.add_host(host)
            await tx.add_event(
                _event("ZONE.CREATE", f"Created default zone {zone.name}", now, zone.id)
            )
            created["zone"] = True
    admin = await store.get_user_by_username(ADMIN_USERNAME)
    if admin is None:  # pragma: no cover - just committed
        raise RuntimeError("root admin missing after initialisation")
    home = Path(ctx.home)
    endpoint = api_endpoint(ctx)
    write_secret_json(
        home / CREDENTIALS,
        {"endpoint": endpoint, "apikey": admin.apikey, "secretkey": admin.secretkey},
    )
    log.info(
        "event=initialized admin_created=%s zone_created=%s credentials=%s endpoint=%s",
        created["admin"],
        created["zone"],
        home / CREDENTIALS,
        endpoint,
    )
    return created
