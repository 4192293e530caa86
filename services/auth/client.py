"""A small async client of the auth admin API (used by the admin CLI and tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import api_key_service_pb2_grpc as keys_grpc
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import audit_service_pb2_grpc as audit_grpc
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import role_service_pb2_grpc as roles_grpc
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.auth.v1 import usage_service_pb2_grpc as usage_grpc
from tokenyard.auth.v1 import user_service_pb2 as users_pb
from tokenyard.auth.v1 import user_service_pb2_grpc as users_grpc

from services.common.channels import make_channel


class AdminClient:
    """Calls the auth admin services with one API key; lists follow every page."""

    def __init__(self, address: str, api_key: str) -> None:
        self.channel = make_channel(address, tracing=False)
        self.md = (("authorization", f"Bearer {api_key}"),)
        self.users = users_grpc.UserServiceStub(self.channel)
        self.roles = roles_grpc.RoleServiceStub(self.channel)
        self.keys = keys_grpc.ApiKeyServiceStub(self.channel)
        self.usage_stub = usage_grpc.UsageServiceStub(self.channel)
        self.audit_stub = audit_grpc.AuditServiceStub(self.channel)

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.channel.close()

    async def list_users(self) -> list[Any]:
        out: list[Any] = []
        token = ""
        while True:
            page = await self.users.ListUsers(
                users_pb.ListUsersRequest(page_size=1000, page_token=token), metadata=self.md
            )
            out += page.users
            token = page.next_page_token
            if not token:
                return out

    async def get_user(self, user_id: str) -> Any:
        reply = await self.users.GetUser(users_pb.GetUserRequest(user_id=user_id), metadata=self.md)
        return reply.user

    async def create_user(
        self, username: str, password: str, roles: list[str], display: str, service: bool
    ) -> Any:
        req = users_pb.CreateUserRequest(
            username=username,
            password=password,
            roles=roles,
            display_name=display,
            service_account=service,
        )
        return (await self.users.CreateUser(req, metadata=self.md)).user

    async def update_user(
        self, user_id: str, display: str | None, roles: list[str] | None, disabled: bool | None
    ) -> Any:
        user = resources_pb2.User(user_id=user_id)
        paths: list[str] = []
        if display is not None:
            user.display_name, paths = display, [*paths, "display_name"]
        if roles is not None:
            user.roles.extend(roles)
            paths.append("roles")
        if disabled is not None:
            user.disabled, paths = disabled, [*paths, "disabled"]
        req = users_pb.UpdateUserRequest(
            user=user, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return (await self.users.UpdateUser(req, metadata=self.md)).user

    async def delete_user(self, user_id: str) -> None:
        await self.users.DeleteUser(users_pb.DeleteUserRequest(user_id=user_id), metadata=self.md)

    async def list_roles(self) -> list[Any]:
        out: list[Any] = []
        token = ""
        while True:
            page = await self.roles.ListRoles(
                roles_pb.ListRolesRequest(page_size=1000, page_token=token), metadata=self.md
            )
            out += page.roles
            token = page.next_page_token
            if not token:
                return out

    async def create_role(
        self, name: str, description: str, perms: list[str], models: list[str], limits: Any
    ) -> Any:
        role = resources_pb2.Role(
            name=name,
            description=description,
            permissions=perms,
            allowed_models=models,
            limits=limits,
        )
        reply = await self.roles.CreateRole(roles_pb.CreateRoleRequest(role=role), metadata=self.md)
        return reply.role

    async def update_role(
        self,
        name: str,
        description: str | None,
        perms: list[str] | None,
        models: list[str] | None,
        limits: Any | None,
    ) -> Any:
        role = resources_pb2.Role(name=name)
        paths: list[str] = []
        if description is not None:
            role.description = description
            paths.append("description")
        if perms is not None:
            role.permissions.extend(perms)
            paths.append("permissions")
        if models is not None:
            role.allowed_models.extend(models)
            paths.append("allowed_models")
        if limits is not None:
            role.limits.CopyFrom(limits)
            paths.append("limits")
        req = roles_pb.UpdateRoleRequest(
            role=role, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return (await self.roles.UpdateRole(req, metadata=self.md)).role

    async def delete_role(self, name: str) -> None:
        await self.roles.DeleteRole(roles_pb.DeleteRoleRequest(name=name), metadata=self.md)

    async def list_keys(self, user_id: str, show_inactive: bool) -> list[Any]:
        out: list[Any] = []
        token = ""
        while True:
            page = await self.keys.ListApiKeys(
                keys_pb.ListApiKeysRequest(
                    user_id=user_id, page_size=1000, page_token=token, show_inactive=show_inactive
                ),
                metadata=self.md,
            )
            out += page.api_keys
            token = page.next_page_token
            if not token:
                return out

    async def create_key(  # noqa: PLR0917 - mirrors the CLI flags
        self,
        name: str,
        user_id: str,
        perms: list[str],
        models: list[str],
        limits: Any,
        expires_in: float | None,
    ) -> tuple[Any, str]:
        req = keys_pb.CreateApiKeyRequest(
            name=name, user_id=user_id, permissions=perms, allowed_models=models, limits=limits
        )
        if expires_in is not None:
            when = timestamp_pb2.Timestamp()
            when.FromDatetime(datetime.now(UTC) + timedelta(seconds=expires_in))
            req.expire_time.CopyFrom(when)
        reply = await self.keys.CreateApiKey(req, metadata=self.md)
        return reply.api_key, reply.secret

    async def revoke_key(self, key_id: str) -> Any:
        reply = await self.keys.RevokeApiKey(
            keys_pb.RevokeApiKeyRequest(key_id=key_id), metadata=self.md
        )
        return reply.api_key

    async def delete_key(self, key_id: str) -> None:
        await self.keys.DeleteApiKey(keys_pb.DeleteApiKeyRequest(key_id=key_id), metadata=self.md)

    async def rotate_key(self, key_id: str, grace: float | None) -> Any:
        req = keys_pb.RotateApiKeyRequest(key_id=key_id)
        if grace is not None:
            d = duration_pb2.Duration()
            d.FromNanoseconds(int(grace * 1e9))
            req.grace_period.CopyFrom(d)
        return await self.keys.RotateApiKey(req, metadata=self.md)

    async def usage(self, user_id: str, model: str) -> Any:
        req = usage_pb.GetUsageRequest(user_id=user_id, model=model)
        return await self.usage_stub.GetUsage(req, metadata=self.md)

    async def audit(self, action: str, actor: str, object_id: str, limit: int) -> list[Any]:
        req = audit_pb.ListAuditEventsRequest(
            page_size=limit, action=action, actor_user_id=actor, object_id=object_id
        )
        return list((await self.audit_stub.ListAuditEvents(req, metadata=self.md)).events)
