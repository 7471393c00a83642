"""Accounts: listDomains, listAccounts, listUsers, registerUserKeys (key rotation)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from manager.api.dispatch import Call, Param, PType, api_command, is_root_admin, keyword_match
from manager.api.responses import ListResult, param_error
from manager.bootstrap import (
    ADMIN_USERNAME,
    CREDENTIALS,
    ROOT_DOMAIN_ID,
    api_endpoint,
    new_api_keys,
    write_secret_json,
)
from manager.store.base import Event, User

ROOT_DOMAIN = "ROOT"
ROLE_TYPE = {1: "Admin", 0: "User", 2: "DomainAdmin"}


def user_view(u: User) -> dict[str, Any]:
    return {
        "id": u.id,
        "username": u.username,
        "account": u.account_name,
        "accountid": u.account_id,
        "accounttype": u.account_type,
        "roletype": ROLE_TYPE.get(u.account_type, "User"),
        "domainid": u.domain_id,
        "domain": ROOT_DOMAIN,
        "state": u.state,
        "apikey": u.apikey,  # as CloudStack shows it to admins; the secret never is
    }


def account_view(u: User) -> dict[str, Any]:
    return {
        "id": u.account_id,
        "name": u.account_name,
        "accounttype": u.account_type,
        "roletype": ROLE_TYPE.get(u.account_type, "User"),
        "domainid": u.domain_id,
        "domain": ROOT_DOMAIN,
        "state": u.state,
        "user": [user_view(u)],
    }


@api_command(
    "listDomains",
    "Lists domains and provides detailed information for listed domains",
    params=(
        Param("id", PType.UUID, description="List domain by domain ID."),
        Param("name", description="List domain by domain name."),
    ),
    listing=True,
    response_fields=("id", "name", "level", "path", "haschild"),
)
async def list_domains(call: Call) -> ListResult:
    a = call.args
    root = {"id": ROOT_DOMAIN_ID, "name": ROOT_DOMAIN, "level": 0, "path": ROOT_DOMAIN,
            "haschild": False, "state": "Active"}  # fmt: skip
    ok = (
        a.get("id") in (None, ROOT_DOMAIN_ID)
        and a.get("name") in (None, ROOT_DOMAIN)
        and keyword_match(a.get("keyword"), ROOT_DOMAIN)
    )
    return ListResult("domain", [root] if ok else [])


@api_command(
    "listAccounts",
    "Lists accounts and provides detailed account information for listed accounts",
    params=(
        Param("id", PType.UUID, description="list account by account ID"),
        Param("name", description="list account by account name"),
        Param("domainid", PType.UUID, description="list only resources belonging to the domain"),
    ),
    listing=True,
    response_fields=("id", "name", "accounttype", "domainid", "domain", "state"),
)
async def list_accounts(call: Call) -> ListResult:
    a = call.args
    mine_only = not is_root_admin(call.user)
    out = [
        account_view(u)
        for u in await call.ctx.store.list_users()
        if (not mine_only or u.account_id == call.user.account_id)
        and a.get("id") in (None, u.account_id)
        and a.get("name") in (None, u.account_name)
        and a.get("domainid") in (None, u.domain_id)
        and keyword_match(a.get("keyword"), u.account_name)
    ]
    return ListResult("account", out)


@api_command(
    "listUsers",
    "Lists user accounts",
    params=(
        Param("id", PType.UUID, description="List user by ID."),
        Param("username", description="List user by the username"),
        Param("account", description="list users of this account"),
        Param("domainid", PType.UUID, description="list only resources belonging to the domain"),
        Param("state", description="List users by state of the user account."),
    ),
    listing=True,
    response_fields=("id", "username", "account", "accounttype", "domainid", "state", "apikey"),
)
async def list_users(call: Call) -> ListResult:
    a = call.args
    mine_only = not is_root_admin(call.user)
    out = [
        user_view(u)
        for u in await call.ctx.store.list_users()
        if (not mine_only or u.account_id == call.user.account_id)
        and a.get("id") in (None, u.id)
        and a.get("username") in (None, u.username)
        and a.get("account") in (None, u.account_name)
        and a.get("domainid") in (None, u.domain_id)
        and (a.get("state") is None or a["state"].lower() == u.state.lower())
        and keyword_match(a.get("keyword"), u.username, u.account_name)
    ]
    return ListResult("user", out)


@api_command(
    "registerUserKeys",
    "Generates a new API key pair for a user; the old pair stops working at once",
    params=(Param("id", PType.UUID, required=True, description="User id"),),
    response_fields=("apikey", "secretkey"),
)
async def register_user_keys(call: Call) -> dict[str, Any]:
    user_id: str = call.args["id"]
    users = {u.id: u for u in await call.ctx.store.list_users()}
    if user_id not in users or (not is_root_admin(call.user) and user_id != call.user.id):
        raise param_error(f"Unable to find user by id {user_id}")
    apikey, secretkey = new_api_keys()
    async with call.ctx.store.transaction() as tx:
        await tx.set_user_keys(user_id, apikey, secretkey)
        await tx.add_event(
            Event(
                id=str(uuid.uuid4()),
                type="REGISTER.USER.KEY",
                level="INFO",
                description=f"Registered new API keys for user {users[user_id].username}",
                account_id=call.user.account_id,
                resource_id=user_id,
                created=call.ctx.clock(),
            )
        )
    if users[user_id].username == ADMIN_USERNAME:  # keep the operator's file working
        write_secret_json(
            Path(call.ctx.home) / CREDENTIALS,
            {"endpoint": api_endpoint(call.ctx), "apikey": apikey, "secretkey": secretkey},
        )
    return {"userkeys": {"apikey": apikey, "secretkey": secretkey}}
