"""Enrolment tokens and boot data.

A token is 192 random bits (``secrets.token_urlsafe(24)``), handed to a new VM in its boot
data and stored by the manager only as ``sha256(token)`` with an expiry
(``sysvm.enrolment.token.ttl``). The store consumes it atomically (single use); the lookup is
by hash, so the secret itself is never compared byte by byte, and the hash compare that
:func:`token_matches` does for callers holding a hash is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from manager.store.base import SystemVm, TokenOutcome, Tx

TOKEN_BYTES = 24  # 192 bits
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
_VM_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_matches(token: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(token_hash(token), stored_hash)


def well_formed_token(token: object) -> bool:
    """Pure: cheap shape check before touching the store (base64url, 128+ bits)."""
    return isinstance(token, str) and _TOKEN_RE.match(token) is not None


def well_formed_vm_id(vm_id: object) -> bool:
    return isinstance(vm_id, str) and _VM_ID_RE.match(vm_id) is not None


async def issue_token(tx: Tx, vm_id: str, ttl: float, now: float) -> str:
    """Creates a token for ``vm_id`` (replacing any unused older one) and returns it. The
    caller puts it into the VM's boot data and never logs it."""
    token = new_token()
    await tx.add_enrolment_token(vm_id, token_hash(token), now + ttl)
    return token


async def consume_token(tx: Tx, vm_id: str, token: str, now: float) -> TokenOutcome:
    if not well_formed_token(token):
        return TokenOutcome.UNKNOWN
    return await tx.consume_enrolment_token(token_hash(token), vm_id, now)


def make_bootdata(
    vm: SystemVm,
    *,
    manager_urls: Sequence[str],
    ca_fingerprint: str,
    token: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Pure: the boot data object of docs/internals.md."""
    return {
        "vm_id": vm.id,
        "name": vm.name,
        "role": str(vm.role.value),
        "zone_id": vm.zone_id,
        "manager_urls": list(manager_urls),
        "ca_fingerprint": ca_fingerprint,
        "token": token,
        "extra": dict(extra or {}),
    }


def bootdata_cmdline(bootdata: Mapping[str, Any]) -> str:
    """``sysvm.bootdata=<base64url(JSON)>`` for a kernel command line."""
    raw = json.dumps(bootdata, separators=(",", ":")).encode()
    return "sysvm.bootdata=" + base64.urlsafe_b64encode(raw).decode().rstrip("=")
