"""`tokenyard users|roles|keys|usage|audit …`: the auth admin API from a shell.

Talks gRPC to the auth service (TOKENYARD_AUTH_ADDRESS or --address) with the
API key in TOKENYARD_API_KEY, or by default the admin key `tokenyard up` keeps in
its state folder; prints tables; an error is one line and a non-zero exit, never
a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.settings import add_flags, parse_address, setting
from services.stack.state import ADMIN_KEY, key_in_state, state_dir_setting

DEFAULT_ADDRESS = "127.0.0.1:50052"


@dataclass(frozen=True, kw_only=True)
class AdminClientSettings:
    """Where the auth service is and which key to call it with."""

    address: str = setting(
        "TOKENYARD_AUTH_ADDRESS",
        parse_address,
        default=DEFAULT_ADDRESS,
        flag="--address",
        help="host:port of the auth service, for the admin commands.",
    )
    api_key: str | None = setting(
        "TOKENYARD_API_KEY",
        default=None,
        secret=True,
        help="API key (or session token) of the caller (default for the admin commands: "
        "the local stack's admin key in the state folder).",
    )
    state_dir: Path = state_dir_setting()


def register(subparsers: Any) -> None:
    """Add the users, roles, keys, usage and audit command groups."""
    common = argparse.ArgumentParser(add_help=False)
    add_flags(common, AdminClientSettings)

    users = subparsers.add_parser("users", help="manage users").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    p = users.add_parser("list", parents=[common], help="list users")
    p.set_defaults(handler=_run(_users_list))
    p = users.add_parser("get", parents=[common], help="show one user")
    p.add_argument("user_id")
    p.set_defaults(handler=_run(_users_get))
    p = users.add_parser("create", parents=[common], help="create a user")
    p.add_argument("username")
    p.add_argument("--role", action="append", default=[], help="role to grant (repeatable)")
    p.add_argument("--display-name", default="")
    p.add_argument("--service-account", action="store_true", help="no password; ty_svc_ keys")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(handler=_run(_users_create))
    p = users.add_parser("update", parents=[common], help="change a user")
    p.add_argument("user_id")
    p.add_argument("--display-name", default=None)
    p.add_argument("--roles", default=None, help="comma-separated roles (replaces)")
    p.add_argument("--disabled", choices=["true", "false"], default=None)
    p.set_defaults(handler=_run(_users_update))
    p = users.add_parser("delete", parents=[common], help="delete a user and revoke their keys")
    p.add_argument("user_id")
    p.set_defaults(handler=_run(_users_delete))

    roles = subparsers.add_parser("roles", help="manage roles").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    p = roles.add_parser("list", parents=[common], help="list roles")
    p.set_defaults(handler=_run(_roles_list))
    for action in ("create", "update"):
        p = roles.add_parser(action, parents=[common], help=f"{action} a role")
        p.add_argument("name")
        p.add_argument("--description", default=None)
        p.add_argument("--permission", action="append", default=None, help="repeatable")
        p.add_argument("--model", action="append", default=None, help="pattern, repeatable")
        _limit_flags(p)
        p.set_defaults(handler=_run(_roles_create if action == "create" else _roles_update))
    p = roles.add_parser("delete", parents=[common], help="delete a role no one holds")
    p.add_argument("name")
    p.set_defaults(handler=_run(_roles_delete))

    keys = subparsers.add_parser("keys", help="manage API keys").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    p = keys.add_parser("list", parents=[common], help="list keys (yours or --user's)")
    p.add_argument("--user", default="")
    p.add_argument("--all", action="store_true", help="include revoked and expired keys")
    p.set_defaults(handler=_run(_keys_list))
    p = keys.add_parser("create", parents=[common], help="create a key; prints its secret once")
    p.add_argument("name")
    p.add_argument("--user", default="")
    p.add_argument("--permission", action="append", default=[], help="repeatable")
    p.add_argument("--model", action="append", default=[], help="pattern, repeatable")
    p.add_argument("--expires-in", type=float, default=None, help="seconds until it expires")
    _limit_flags(p)
    p.set_defaults(handler=_run(_keys_create))
    for action in ("revoke", "delete"):
        p = keys.add_parser(action, parents=[common], help=f"{action} a key")
        p.add_argument("key_id")
        p.set_defaults(handler=_run(_keys_revoke if action == "revoke" else _keys_delete))
    p = keys.add_parser("rotate", parents=[common], help="replace a key; old one lives on")
    p.add_argument("key_id")
    p.add_argument("--grace", type=float, default=None, help="seconds the old key keeps working")
    p.set_defaults(handler=_run(_keys_rotate))

    p = subparsers.add_parser("usage", parents=[common], help="token usage by day, key, model")
    p.add_argument("--user", default="")
    p.add_argument("--model", default="")
    p.set_defaults(handler=_run(_usage))

    p = subparsers.add_parser("audit", parents=[common], help="the security audit log")
    p.add_argument("--action", default="")
    p.add_argument("--actor", default="")
    p.add_argument("--object", default="")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=_run(_audit))


def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, default=None, help="requests per minute")
    p.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    p.add_argument("--streams", type=int, default=None, help="concurrent streams")
    p.add_argument("--max-tokens", type=int, default=None, help="max tokens per request")
    p.add_argument("--quota", type=int, default=None, help="token quota per period")
    p.add_argument("--quota-period", choices=["day", "month"], default="day")
    p.add_argument(
        "--response-cache",
        choices=["on", "off"],
        default=None,
        help="let the router's response cache answer repeated deterministic requests",
    )


Action = Callable[[Any, argparse.Namespace], Awaitable[None]]


def _run(action: Action) -> Callable[[argparse.Namespace], int]:
    """Wrap an async action: settings, channel, one-line errors."""

    def handler(args: argparse.Namespace) -> int:
        import grpc

        from services.common.settings import load_settings

        settings = load_settings(AdminClientSettings, os.environ, vars(args))
        key = settings.api_key or key_in_state(settings.state_dir, ADMIN_KEY)
        try:
            asyncio.run(_call(action, settings.address, key, args))
        except grpc.aio.AioRpcError as exc:
            print(f"tokenyard: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as exc:
            print(f"tokenyard: {exc}", file=sys.stderr)
            return 1
        return 0

    return handler


async def _call(action: Action, address: str, key: str, args: argparse.Namespace) -> None:
    from services.auth.client import AdminClient

    async with AdminClient(address, key) as client:
        await action(client, args)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print aligned columns."""
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _limits(args: argparse.Namespace) -> Any:
    from tokenyard.auth.v1 import resources_pb2

    out = resources_pb2.Limits()
    for flag, name in (
        ("rpm", "requests_per_minute"),
        ("tpm", "tokens_per_minute"),
        ("streams", "concurrent_streams"),
        ("max_tokens", "max_tokens_per_request"),
        ("quota", "token_quota"),
    ):
        value = getattr(args, flag)
        if value is not None:
            if value < 0:
                raise ValueError(f"--{flag.replace('_', '-')} must not be negative")
            setattr(out, name, value)
    if args.response_cache is not None:
        out.response_cache = args.response_cache == "on"
    if args.quota is not None:
        month = args.quota_period == "month"
        out.quota_period = (
            resources_pb2.QUOTA_PERIOD_MONTH if month else resources_pb2.QUOTA_PERIOD_DAY
        )
    return out


def _has_limits(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, f) is not None
        for f in ("rpm", "tpm", "streams", "max_tokens", "quota", "response_cache")
    )


def _when(parent: Any, field: str, unset: str = "-") -> str:
    if not parent.HasField(field):
        return unset
    return str(getattr(parent, field).ToDatetime().strftime("%Y-%m-%d %H:%M"))


def _user_rows(users: Sequence[Any]) -> list[list[object]]:
    return [
        [u.user_id, u.username, ",".join(u.roles) or "-", "yes" if u.disabled else "no",
         "service" if u.service_account else "person"]
        for u in users
    ]  # fmt: skip


USER_HEADERS = ("ID", "USERNAME", "ROLES", "DISABLED", "KIND")


async def _users_list(c: Any, args: argparse.Namespace) -> None:
    table(USER_HEADERS, _user_rows(await c.list_users()))


async def _users_get(c: Any, args: argparse.Namespace) -> None:
    table(USER_HEADERS, _user_rows([await c.get_user(args.user_id)]))


async def _users_create(c: Any, args: argparse.Namespace) -> None:
    password = ""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif not args.service_account:
        password = getpass.getpass(f"password for {args.username}: ")
    user = await c.create_user(
        args.username, password, args.role, args.display_name, args.service_account
    )
    table(USER_HEADERS, _user_rows([user]))


async def _users_update(c: Any, args: argparse.Namespace) -> None:
    roles = None if args.roles is None else [r for r in args.roles.split(",") if r]
    disabled = None if args.disabled is None else args.disabled == "true"
    user = await c.update_user(args.user_id, args.display_name, roles, disabled)
    table(USER_HEADERS, _user_rows([user]))


async def _users_delete(c: Any, args: argparse.Namespace) -> None:
    await c.delete_user(args.user_id)
    print(f"deleted user {args.user_id}")


def _role_rows(roles: Sequence[Any]) -> list[list[object]]:
    return [
        [r.name, ",".join(r.permissions) or "-", ",".join(r.allowed_models) or "-",
         str(r.limits).replace("\n", " ").strip() or "-"]
        for r in roles
    ]  # fmt: skip


ROLE_HEADERS = ("NAME", "PERMISSIONS", "MODELS", "LIMITS")


async def _roles_list(c: Any, args: argparse.Namespace) -> None:
    table(ROLE_HEADERS, _role_rows(await c.list_roles()))


async def _roles_create(c: Any, args: argparse.Namespace) -> None:
    role = await c.create_role(
        args.name, args.description or "", args.permission or [], args.model or [], _limits(args)
    )
    table(ROLE_HEADERS, _role_rows([role]))


async def _roles_update(c: Any, args: argparse.Namespace) -> None:
    limits = _limits(args) if _has_limits(args) else None
    role = await c.update_role(args.name, args.description, args.permission, args.model, limits)
    table(ROLE_HEADERS, _role_rows([role]))


async def _roles_delete(c: Any, args: argparse.Namespace) -> None:
    await c.delete_role(args.name)
    print(f"deleted role {args.name}")


KEY_HEADERS = ("ID", "NAME", "HINT", "PERMISSIONS", "EXPIRES", "REVOKED", "LAST USED")


def _key_rows(keys: Sequence[Any]) -> list[list[object]]:
    return [
        [k.key_id, k.name, k.hint, ",".join(k.permissions) or "(owner's)",
         _when(k, "expire_time", "never"), "yes" if k.HasField("revoke_time") else "no",
         _when(k, "last_used_time")]
        for k in keys
    ]  # fmt: skip


async def _keys_list(c: Any, args: argparse.Namespace) -> None:
    table(KEY_HEADERS, _key_rows(await c.list_keys(args.user, args.all)))


async def _keys_create(c: Any, args: argparse.Namespace) -> None:
    key, secret = await c.create_key(
        args.name, args.user, args.permission, args.model, _limits(args), args.expires_in
    )
    table(KEY_HEADERS, _key_rows([key]))
    print(f"\nsecret (shown once, store it now):\n{secret}")


async def _keys_revoke(c: Any, args: argparse.Namespace) -> None:
    table(KEY_HEADERS, _key_rows([await c.revoke_key(args.key_id)]))


async def _keys_delete(c: Any, args: argparse.Namespace) -> None:
    await c.delete_key(args.key_id)
    print(f"deleted key {args.key_id}")


async def _keys_rotate(c: Any, args: argparse.Namespace) -> None:
    reply = await c.rotate_key(args.key_id, args.grace)
    table(KEY_HEADERS, _key_rows([reply.previous_api_key, reply.api_key]))
    print(f"\nnew secret (shown once, store it now):\n{reply.secret}")


async def _usage(c: Any, args: argparse.Namespace) -> None:
    reply = await c.usage(args.user, args.model)
    table(
        ("DAY", "USER", "CREDENTIAL", "MODEL", "REQUESTS", "PROMPT", "COMPLETION"),
        [[r.day, r.user_id, r.credential_id, r.model, r.requests, r.prompt_tokens,
          r.completion_tokens] for r in reply.rows],
    )  # fmt: skip
    print(
        f"total: {reply.total_requests} requests, {reply.total_prompt_tokens} prompt + "
        f"{reply.total_completion_tokens} completion tokens"
    )


async def _audit(c: Any, args: argparse.Namespace) -> None:
    events = await c.audit(args.action, args.actor, args.object, args.limit)
    table(
        ("TIME", "ACTION", "OUTCOME", "ACTOR", "OBJECT", "PEER"),
        [[_when(e, "event_time"), e.action, e.outcome, e.actor_user_id or "-",
          f"{e.object_type}:{e.object_id}", e.peer] for e in events],
    )  # fmt: skip
