"""Small helpers for auth tests: expected errors, users with roles and keys."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import user_service_pb2 as users_pb

from services.common.status import details_of
from tests.integration.auth.conftest import Auth, md


async def expect(call: Awaitable[Any], code: grpc.StatusCode, *words: str) -> grpc.aio.AioRpcError:
    """Await `call`, which must fail with `code` and a message holding each of `words`."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == code, (exc.code(), exc.details())
        for word in words:
            assert word in (exc.details() or ""), (word, exc.details())
        return exc
    raise AssertionError(f"expected {code.name}")


def field_of(exc: grpc.aio.AioRpcError) -> str:
    """The field named in the error's google.rpc.ErrorInfo."""
    details = details_of(exc)
    return details.metadata.get("field", "")


async def make_role(
    svc: Auth,
    name: str,
    perms: list[str],
    models: list[str] | None = None,
    limits: resources_pb2.Limits | None = None,
) -> resources_pb2.Role:
    """Create a role as the admin."""
    role = resources_pb2.Role(
        name=name, permissions=perms, allowed_models=models or ["*"], limits=limits
    )
    reply = await svc.roles.CreateRole(roles_pb.CreateRoleRequest(role=role), metadata=svc.admin)
    out: resources_pb2.Role = reply.role
    return out


async def make_user(
    svc: Auth,
    username: str,
    perms: list[str],
    *,
    models: list[str] | None = None,
    limits: resources_pb2.Limits | None = None,
    password: str = "user-password-1",
) -> tuple[str, str]:
    """A user holding a fresh role with `perms`, and an API key of theirs: (user_id, key)."""
    await make_role(svc, f"r-{username}", perms, models, limits)
    reply = await svc.users.CreateUser(
        users_pb.CreateUserRequest(username=username, password=password, roles=[f"r-{username}"]),
        metadata=svc.admin,
    )
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(user_id=reply.user.user_id, name="k"), metadata=svc.admin
    )
    return reply.user.user_id, made.secret


__all__ = ["expect", "field_of", "make_role", "make_user", "md"]
