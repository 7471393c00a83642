"""One-time console tokens.

A console URL carries ``vm=<vm id>&token=<token>``. The token is 192 random bits
(``secrets.token_urlsafe(24)``); the manager stores only ``sha256(token)`` with the VM id, the
account that asked for it, and an expiry (short: ``DEFAULT_TTL``). The browser presents it on
the websocket upgrade to a console proxy VM, which sends ``console.authorize`` to the manager
before it upgrades; :func:`authorize` consumes the token (single use: the second
presentation is refused even if the first failed later on) and answers with the VNC target
taken **only** from the manager's records at that moment (host, port, password) — never from
the URL. Tokens of a destroyed VM die with it (:meth:`TokenStorage.drop_vm`, and the record
lookup refuses a VM that is gone).

Decisions are pure (:func:`token_outcome`, :func:`parse_token`); I/O is behind two small
protocols: :class:`TokenStorage` (the lead wires it to SQLite; :class:`MemoryTokenStorage`
serves tests and single-process use) and :class:`ConsoleRecords` (VM id -> current target).

A SQLite shape for :class:`TokenStorage` (migration range 110-119)::

    CREATE TABLE console_token (token_hash BLOB PRIMARY KEY, vm_id TEXT NOT NULL,
        account_id TEXT NOT NULL, created REAL NOT NULL, expires_at REAL NOT NULL,
        used_at REAL);
    CREATE INDEX console_token_vm ON console_token (vm_id);

``take`` in one write transaction: ``SELECT`` the row, then ``UPDATE ... SET used_at = ?
WHERE token_hash = ? AND used_at IS NULL``; return the row as selected.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeGuard

from manager.store.base import TokenOutcome

TOKEN_BYTES = 24  # 192 bits
DEFAULT_TTL = 60.0  # seconds between minting and the websocket upgrade
MAX_TTL = 600.0
RESUME_TTL = 300.0  # a Reconnect within this long after a session started needs no new link
# token_urlsafe(24) is 32 characters; accept a little range so a format change is not fatal.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")
_VM_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")


class ConsoleRefused(Exception):
    """A console connection is refused. ``code`` is a short machine word (one of
    :class:`TokenOutcome` values, or ``vm_gone``, ``account``, ``bad_request``); ``reason`` is
    safe to show (it never contains the token or a password)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ConsoleToken:
    token_hash: bytes  # sha256(token)
    vm_id: str
    account_id: str
    created: float
    expires_at: float
    used_at: float | None = None


@dataclass(frozen=True, slots=True)
class ConsoleTarget:
    """Where a VM's console is, from the manager's records (never from a client)."""

    vm_id: str
    account_id: str
    host: str
    port: int
    password: str  # VNC password; "" when the hypervisor asks for none

    def as_reply(self) -> dict[str, Any]:
        """The ``console.authorize`` response body sent to the console proxy VM."""
        return {
            "vm_id": self.vm_id,
            "account_id": self.account_id,
            "host": self.host,
            "port": self.port,
            "password": self.password,
        }

    def __repr__(self) -> str:  # never print the password
        return f"ConsoleTarget(vm_id={self.vm_id!r}, host={self.host!r}, port={self.port})"


class TokenStorage(Protocol):
    async def add(self, token: ConsoleToken) -> None: ...

    async def take(self, token_hash: bytes, now: float) -> ConsoleToken | None:
        """Atomically marks the token used (``used_at = now`` if not yet used) and returns
        the record **as it was before** (so ``used_at is None`` means this call consumed
        it); ``None`` if there is no such token."""
        ...

    async def drop_vm(self, vm_id: str) -> int:
        """Deletes every token of the VM (it was destroyed); returns how many."""
        ...

    async def purge(self, now: float, keep: float = 3600.0) -> int:
        """Deletes tokens that expired more than ``keep`` seconds ago."""
        ...


class ConsoleRecords(Protocol):
    async def console_target(self, vm_id: str) -> ConsoleTarget | None:
        """The VM's console as the manager's records say now; ``None`` when the VM is
        unknown, destroyed or not running."""
        ...


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def parse_token(raw: object) -> str | None:
    """The token if it is well formed, else ``None`` (a forged token of the wrong shape is
    refused without a storage lookup)."""
    if isinstance(raw, str) and _TOKEN_RE.fullmatch(raw):
        return raw
    return None


def valid_vm_id(raw: object) -> TypeGuard[str]:
    return isinstance(raw, str) and _VM_ID_RE.fullmatch(raw) is not None


def token_outcome(before: ConsoleToken | None, vm_id: str, now: float) -> TokenOutcome:
    """Pure: what a presentation of a token means, given its record before this use."""
    if before is None:
        return TokenOutcome.UNKNOWN
    if before.used_at is not None:
        return TokenOutcome.USED
    if now >= before.expires_at:
        return TokenOutcome.EXPIRED
    if not hmac.compare_digest(before.vm_id.encode(), vm_id.encode()):
        return TokenOutcome.WRONG_VM
    return TokenOutcome.OK


_REFUSAL_TEXT = {
    TokenOutcome.UNKNOWN: "unknown console token",
    TokenOutcome.USED: "console token already used; request a new console link",
    TokenOutcome.EXPIRED: "console token expired; request a new console link",
    TokenOutcome.WRONG_VM: "console token is for another VM",
}


async def mint(
    storage: TokenStorage,
    *,
    vm_id: str,
    account_id: str,
    now: float,
    ttl: float = DEFAULT_TTL,
) -> str:
    """Creates a token for ``vm_id`` on behalf of ``account_id``; returns the token (shown
    to the caller once, stored only hashed)."""
    if not valid_vm_id(vm_id):
        raise ValueError("bad vm id")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"token ttl must be in (0, {MAX_TTL:g}] seconds")
    token = new_token()
    await storage.add(
        ConsoleToken(
            token_hash=hash_token(token),
            vm_id=vm_id,
            account_id=account_id,
            created=now,
            expires_at=now + ttl,
        )
    )
    return token


async def authorize(
    storage: TokenStorage,
    records: ConsoleRecords,
    *,
    token: object,
    vm_id: object,
    now: float,
) -> ConsoleTarget:
    """Consumes ``token`` (presented for ``vm_id``) and returns the VM's console target from
    the records. Raises :class:`ConsoleRefused` otherwise."""
    if not valid_vm_id(vm_id):
        raise ConsoleRefused("bad_request", "missing or malformed vm id")
    parsed = parse_token(token)
    if parsed is None:
        raise ConsoleRefused(TokenOutcome.UNKNOWN.value, _REFUSAL_TEXT[TokenOutcome.UNKNOWN])
    before = await storage.take(hash_token(parsed), now)
    outcome = token_outcome(before, vm_id, now)
    if outcome is not TokenOutcome.OK:
        raise ConsoleRefused(outcome.value, _REFUSAL_TEXT[outcome])
    assert before is not None
    target = await records.console_target(vm_id)
    if target is None:
        raise ConsoleRefused("vm_gone", "the VM is not running (destroyed or stopped)")
    if not hmac.compare_digest(target.account_id.encode(), before.account_id.encode()):
        raise ConsoleRefused("account", "the VM no longer belongs to the account")
    return target


async def handle_authorize_request(
    storage: TokenStorage,
    records: ConsoleRecords,
    params: Mapping[str, Any],
    now: float,
    *,
    resume_ttl: float = RESUME_TTL,
) -> dict[str, Any]:
    """The manager's handler body for the agent request ``console.authorize``.

    params: ``{"token": str, "vm_id": str, "client": "ip", "origin": str, "proxy_vm_id": str}``
    (``client``/``origin`` are for the manager's logs/events). Returns
    :meth:`ConsoleTarget.as_reply` plus ``resume_token``: a new one-time token for the same
    VM and account (TTL ``resume_ttl``) that the proxy keeps in an HttpOnly cookie so the
    page's Reconnect button works once without a new link. Raises :class:`ConsoleRefused`
    (the link sends its ``str()``, ``"<code>: <reason>"``, as the ``error`` of an
    ``ok=False`` response)."""
    target = await authorize(
        storage, records, token=params.get("token"), vm_id=params.get("vm_id"), now=now
    )
    reply = target.as_reply()
    if resume_ttl > 0:
        reply["resume_token"] = await mint(
            storage, vm_id=target.vm_id, account_id=target.account_id, now=now, ttl=resume_ttl
        )
    return reply


class MemoryTokenStorage:
    """In-process :class:`TokenStorage` (tests, single-process tools). Single event loop:
    each method runs without awaiting, so ``take`` is atomic."""

    def __init__(self) -> None:
        self._tokens: dict[bytes, ConsoleToken] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    async def add(self, token: ConsoleToken) -> None:
        self._tokens[token.token_hash] = token

    async def take(self, token_hash: bytes, now: float) -> ConsoleToken | None:
        before = self._tokens.get(token_hash)
        if before is not None and before.used_at is None:
            self._tokens[token_hash] = replace(before, used_at=now)
        return before

    async def drop_vm(self, vm_id: str) -> int:
        doomed = [h for h, t in self._tokens.items() if t.vm_id == vm_id]
        for h in doomed:
            del self._tokens[h]
        return len(doomed)

    async def purge(self, now: float, keep: float = 3600.0) -> int:
        doomed = [h for h, t in self._tokens.items() if t.expires_at + keep < now]
        for h in doomed:
            del self._tokens[h]
        return len(doomed)
