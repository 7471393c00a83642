"""Console tokens: pure decisions and the in-memory storage, driven without an event loop
(the coroutines never suspend; `run` asserts that)."""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from manager.consoleproxy import tokens
from manager.store.base import TokenOutcome

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("coroutine suspended: unit code must not do I/O")


@dataclass
class Records:
    targets: dict[str, tokens.ConsoleTarget] = field(default_factory=dict)

    async def console_target(self, vm_id: str) -> tokens.ConsoleTarget | None:
        return self.targets.get(vm_id)


VM = "11111111-2222-3333-4444-555555555555"
OTHER = "99999999-2222-3333-4444-555555555555"


def setup() -> tuple[tokens.MemoryTokenStorage, Records]:
    storage = tokens.MemoryTokenStorage()
    records = Records({VM: tokens.ConsoleTarget(VM, "acct", "10.1.1.5", 5901, "s3cret!!")})
    return storage, records


def test_token_has_enough_entropy_and_is_stored_hashed() -> None:
    storage, _ = setup()
    token = run(tokens.mint(storage, vm_id=VM, account_id="acct", now=100.0))
    assert len(token) >= 22 and tokens.parse_token(token) == token
    assert tokens.TOKEN_BYTES * 8 >= 128
    (rec,) = storage._tokens.values()
    assert rec.token_hash == tokens.hash_token(token) and token.encode() not in rec.token_hash
    assert rec.expires_at == 100.0 + tokens.DEFAULT_TTL
    assert token not in repr(rec)


def test_authorize_returns_target_from_records_once() -> None:
    storage, records = setup()
    token = run(tokens.mint(storage, vm_id=VM, account_id="acct", now=100.0))
    target = run(tokens.authorize(storage, records, token=token, vm_id=VM, now=101.0))
    assert (target.host, target.port, target.password) == ("10.1.1.5", 5901, "s3cret!!")
    assert "s3cret" not in repr(target)
    with pytest.raises(tokens.ConsoleRefused) as e:
        run(tokens.authorize(storage, records, token=token, vm_id=VM, now=102.0))
    assert e.value.code == "used"


@pytest.mark.parametrize(
    ("before_used", "expires", "vm", "want"),
    [
        (None, 200.0, VM, TokenOutcome.OK),
        (150.0, 200.0, VM, TokenOutcome.USED),
        (None, 150.0, VM, TokenOutcome.EXPIRED),
        (None, 161.0, OTHER, TokenOutcome.WRONG_VM),
    ],
)
def test_token_outcome(
    before_used: float | None, expires: float, vm: str, want: TokenOutcome
) -> None:
    rec = tokens.ConsoleToken(b"h" * 32, VM, "acct", 100.0, expires, before_used)
    assert tokens.token_outcome(rec, vm, 160.0) is want
    assert tokens.token_outcome(None, vm, 160.0) is TokenOutcome.UNKNOWN


def test_refusals() -> None:
    storage, records = setup()
    refuse = lambda **kw: run(tokens.authorize(storage, records, now=500.0, **kw))  # noqa: E731
    with pytest.raises(tokens.ConsoleRefused, match="unknown"):
        refuse(token="A" * 32, vm_id=VM)
    with pytest.raises(tokens.ConsoleRefused, match="unknown"):
        refuse(token="short", vm_id=VM)
    with pytest.raises(tokens.ConsoleRefused, match="unknown"):
        refuse(token=None, vm_id=VM)
    with pytest.raises(tokens.ConsoleRefused, match="bad_request"):
        refuse(token="A" * 32, vm_id="../etc")
    t_exp = run(tokens.mint(storage, vm_id=VM, account_id="acct", now=0.0, ttl=10))
    with pytest.raises(tokens.ConsoleRefused, match="expired"):
        refuse(token=t_exp, vm_id=VM)
    t_other = run(tokens.mint(storage, vm_id=VM, account_id="acct", now=499.0))
    with pytest.raises(tokens.ConsoleRefused, match="another VM"):
        refuse(token=t_other, vm_id=OTHER)
    # A wrong-VM presentation burns the token too.
    with pytest.raises(tokens.ConsoleRefused, match="used"):
        refuse(token=t_other, vm_id=VM)
    # VM gone from the records (stopped/destroyed) -> refused even with a fresh token.
    t_gone = run(tokens.mint(storage, vm_id=OTHER, account_id="acct", now=499.0))
    with pytest.raises(tokens.ConsoleRefused, match="vm_gone"):
        refuse(token=t_gone, vm_id=OTHER)
    # VM moved to another account after the token was minted.
    t_acct = run(tokens.mint(storage, vm_id=VM, account_id="someone-else", now=499.0))
    with pytest.raises(tokens.ConsoleRefused, match="account"):
        refuse(token=t_acct, vm_id=VM)


def test_tokens_die_with_vm_and_purge() -> None:
    storage, records = setup()
    t = run(tokens.mint(storage, vm_id=VM, account_id="acct", now=0.0))
    run(tokens.mint(storage, vm_id=OTHER, account_id="acct", now=0.0))
    assert run(storage.drop_vm(VM)) == 1
    with pytest.raises(tokens.ConsoleRefused, match="unknown"):
        run(tokens.authorize(storage, records, token=t, vm_id=VM, now=1.0))
    assert run(storage.purge(now=10_000.0)) == 1 and len(storage) == 0


def test_handle_request_adds_resume_token_and_validates_ttl() -> None:
    storage, records = setup()
    t = run(tokens.mint(storage, vm_id=VM, account_id="acct", now=0.0))
    reply = run(tokens.handle_authorize_request(storage, records, {"token": t, "vm_id": VM}, 1.0))
    assert reply["host"] == "10.1.1.5" and reply["password"] == "s3cret!!"
    resume = reply["resume_token"]
    assert resume != t
    again = run(
        tokens.handle_authorize_request(storage, records, {"token": resume, "vm_id": VM}, 2.0)
    )
    assert again["port"] == 5901
    with pytest.raises(ValueError):
        run(tokens.mint(storage, vm_id=VM, account_id="acct", now=0.0, ttl=0))
    with pytest.raises(ValueError):
        run(tokens.mint(storage, vm_id=VM, account_id="acct", now=0.0, ttl=tokens.MAX_TTL + 1))
