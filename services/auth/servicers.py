"""gRPC servicers of tokenyard.auth.v1: proto in, domain call, proto out.

Every RPC but the internal ones (Authenticate, RecordUsage, WatchRevocations)
authenticates its caller from `authorization: Bearer <credential>` first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import api_key_service_pb2_grpc as keys_grpc
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import audit_service_pb2_grpc as audit_grpc
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import auth_service_pb2_grpc as auth_grpc
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import role_service_pb2_grpc as roles_grpc
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.auth.v1 import usage_service_pb2_grpc as usage_grpc
from tokenyard.auth.v1 import user_service_pb2 as users_pb
from tokenyard.auth.v1 import user_service_pb2_grpc as users_grpc

from services.auth import convert
from services.auth.core import AuthCore
from services.auth.domain.audit_log import AuditLog, AuditQuery
from services.auth.domain.keys import Keys, KeySpec
from services.auth.domain.principal import Caller
from services.auth.domain.roles import Roles, RoleSpec
from services.auth.domain.usage import Record, Usage, UsageQuery
from services.auth.domain.users import NewUser, UserChange, Users
from services.common.errors import InvalidArgument, Unauthenticated

Ctx = Any  # grpc.aio.ServicerContext
MAX_METADATA_BYTES = 8192
AUTH_HEADER = "authorization"


def bearer(context: Ctx) -> str:
    """The credential of `authorization: Bearer <credential>`: exactly one header."""
    metadata = tuple(context.invocation_metadata() or ())
    size = sum(len(k) + len(v) for k, v in metadata)
    if size > MAX_METADATA_BYTES:
        raise InvalidArgument("metadata", f"request metadata is over {MAX_METADATA_BYTES} bytes")
    values = [v for k, v in metadata if k == AUTH_HEADER]
    if not values:
        raise Unauthenticated(
            "missing credential: send 'authorization: Bearer <api key>'", reason="NO_CREDENTIAL"
        )
    if len(values) > 1:
        raise Unauthenticated("send exactly one authorization header", reason="DUPLICATE_HEADER")
    value = values[0]
    if not isinstance(value, str) or not value.startswith("Bearer "):
        raise Unauthenticated(
            "authorization header must be 'Bearer <credential>'", reason="BAD_AUTH_SCHEME"
        )
    return value[len("Bearer ") :].strip()


async def caller_of(core: AuthCore, context: Ctx) -> Caller:
    """The authenticated caller of this RPC."""
    return await core.caller(bearer(context), str(context.peer() or ""))


class AuthServicer(auth_grpc.AuthServiceServicer):
    """Authenticate, Login, Logout, WhoAmI, WatchRevocations."""

    def __init__(self, core: AuthCore) -> None:
        self.core = core

    async def Authenticate(
        self, request: auth_pb.AuthenticateRequest, context: Ctx
    ) -> auth_pb.AuthenticateResponse:
        principal = await self.core.authenticate(request.credential)
        return auth_pb.AuthenticateResponse(
            principal=convert.principal_to_proto(principal),
            cache_ttl=convert.duration(self.core.settings.cache_ttl),
        )

    async def Login(self, request: auth_pb.LoginRequest, context: Ctx) -> auth_pb.LoginResponse:
        result = await self.core.login(
            request.username, request.password, str(context.peer() or "")
        )
        return auth_pb.LoginResponse(
            session_token=result.token,
            expire_time=convert.ts(result.expire_time),
            user=convert.user_to_proto(result.user),
        )

    async def Logout(self, request: auth_pb.LogoutRequest, context: Ctx) -> auth_pb.LogoutResponse:
        await self.core.logout(await caller_of(self.core, context))
        return auth_pb.LogoutResponse()

    async def WhoAmI(self, request: auth_pb.WhoAmIRequest, context: Ctx) -> auth_pb.WhoAmIResponse:
        caller = await caller_of(self.core, context)
        return auth_pb.WhoAmIResponse(principal=convert.principal_to_proto(caller.principal))

    async def WatchRevocations(
        self, request: auth_pb.WatchRevocationsRequest, context: Ctx
    ) -> AsyncIterator[auth_pb.WatchRevocationsResponse]:
        async for batch in self.core.hub.watch():
            yield auth_pb.WatchRevocationsResponse(
                credential_ids=sorted(batch.credential_ids),
                user_ids=sorted(batch.user_ids),
                reset=batch.reset,
            )


class UserServicer(users_grpc.UserServiceServicer):
    """User administration."""

    def __init__(self, core: AuthCore) -> None:
        self.core, self.users = core, Users(core)

    async def CreateUser(
        self, request: users_pb.CreateUserRequest, context: Ctx
    ) -> users_pb.CreateUserResponse:
        caller = await caller_of(self.core, context)
        new = NewUser(
            request.username,
            request.password,
            request.display_name,
            tuple(request.roles),
            request.service_account,
            request.request_id,
        )
        user = await self.users.create(caller, new)
        return users_pb.CreateUserResponse(user=convert.user_to_proto(user))

    async def GetUser(
        self, request: users_pb.GetUserRequest, context: Ctx
    ) -> users_pb.GetUserResponse:
        caller = await caller_of(self.core, context)
        user = await self.users.get(caller, request.user_id)
        return users_pb.GetUserResponse(user=convert.user_to_proto(user))

    async def ListUsers(
        self, request: users_pb.ListUsersRequest, context: Ctx
    ) -> users_pb.ListUsersResponse:
        caller = await caller_of(self.core, context)
        rows, token = await self.users.list_page(caller, request.page_size, request.page_token)
        return users_pb.ListUsersResponse(
            users=[convert.user_to_proto(u) for u in rows], next_page_token=token
        )

    async def UpdateUser(
        self, request: users_pb.UpdateUserRequest, context: Ctx
    ) -> users_pb.UpdateUserResponse:
        caller = await caller_of(self.core, context)
        u = request.user
        change = UserChange(
            u.user_id,
            tuple(request.update_mask.paths),
            u.display_name,
            tuple(u.roles),
            u.disabled,
            request.password,
        )
        user = await self.users.update(caller, change)
        return users_pb.UpdateUserResponse(user=convert.user_to_proto(user))

    async def DeleteUser(
        self, request: users_pb.DeleteUserRequest, context: Ctx
    ) -> users_pb.DeleteUserResponse:
        caller = await caller_of(self.core, context)
        await self.users.delete(caller, request.user_id)
        return users_pb.DeleteUserResponse()


def role_spec(role: Any) -> RoleSpec:
    """A RoleSpec from a Role message."""
    return RoleSpec(
        role.name,
        role.description,
        tuple(role.permissions),
        tuple(role.allowed_models),
        convert.limits_from_proto(role.limits),
    )


class RoleServicer(roles_grpc.RoleServiceServicer):
    """Role administration."""

    def __init__(self, core: AuthCore) -> None:
        self.core, self.roles = core, Roles(core)

    async def CreateRole(
        self, request: roles_pb.CreateRoleRequest, context: Ctx
    ) -> roles_pb.CreateRoleResponse:
        caller = await caller_of(self.core, context)
        role = await self.roles.create(caller, role_spec(request.role), request.request_id)
        return roles_pb.CreateRoleResponse(role=convert.role_to_proto(role))

    async def GetRole(
        self, request: roles_pb.GetRoleRequest, context: Ctx
    ) -> roles_pb.GetRoleResponse:
        caller = await caller_of(self.core, context)
        role = await self.roles.get(caller, request.name)
        return roles_pb.GetRoleResponse(role=convert.role_to_proto(role))

    async def ListRoles(
        self, request: roles_pb.ListRolesRequest, context: Ctx
    ) -> roles_pb.ListRolesResponse:
        caller = await caller_of(self.core, context)
        rows, token = await self.roles.list_page(caller, request.page_size, request.page_token)
        return roles_pb.ListRolesResponse(
            roles=[convert.role_to_proto(r) for r in rows], next_page_token=token
        )

    async def UpdateRole(
        self, request: roles_pb.UpdateRoleRequest, context: Ctx
    ) -> roles_pb.UpdateRoleResponse:
        caller = await caller_of(self.core, context)
        role = await self.roles.update(
            caller, role_spec(request.role), list(request.update_mask.paths)
        )
        return roles_pb.UpdateRoleResponse(role=convert.role_to_proto(role))

    async def DeleteRole(
        self, request: roles_pb.DeleteRoleRequest, context: Ctx
    ) -> roles_pb.DeleteRoleResponse:
        caller = await caller_of(self.core, context)
        await self.roles.delete(caller, request.name)
        return roles_pb.DeleteRoleResponse()


class ApiKeyServicer(keys_grpc.ApiKeyServiceServicer):
    """API key management."""

    def __init__(self, core: AuthCore) -> None:
        self.core, self.keys = core, Keys(core)

    async def CreateApiKey(
        self, request: keys_pb.CreateApiKeyRequest, context: Ctx
    ) -> keys_pb.CreateApiKeyResponse:
        caller = await caller_of(self.core, context)
        spec = KeySpec(
            request.name,
            tuple(request.permissions),
            tuple(request.allowed_models),
            convert.limits_from_proto(request.limits),
            convert.opt_ts(request, "expire_time", "expire_time"),
        )
        made = await self.keys.create(caller, request.user_id, spec, request.request_id)
        return keys_pb.CreateApiKeyResponse(
            api_key=convert.key_to_proto(made.key), secret=made.secret
        )

    async def GetApiKey(
        self, request: keys_pb.GetApiKeyRequest, context: Ctx
    ) -> keys_pb.GetApiKeyResponse:
        caller = await caller_of(self.core, context)
        key = await self.keys.get(caller, request.key_id)
        return keys_pb.GetApiKeyResponse(api_key=convert.key_to_proto(key))

    async def ListApiKeys(
        self, request: keys_pb.ListApiKeysRequest, context: Ctx
    ) -> keys_pb.ListApiKeysResponse:
        caller = await caller_of(self.core, context)
        rows, token = await self.keys.list_page(
            caller, request.user_id, request.page_size, request.page_token, request.show_inactive
        )
        return keys_pb.ListApiKeysResponse(
            api_keys=[convert.key_to_proto(k) for k in rows], next_page_token=token
        )

    async def UpdateApiKey(
        self, request: keys_pb.UpdateApiKeyRequest, context: Ctx
    ) -> keys_pb.UpdateApiKeyResponse:
        caller = await caller_of(self.core, context)
        k = request.api_key
        spec = KeySpec(
            k.name,
            tuple(k.permissions),
            tuple(k.allowed_models),
            convert.limits_from_proto(k.limits),
            convert.opt_ts(k, "expire_time", "api_key.expire_time"),
        )
        key = await self.keys.update(caller, k.key_id, spec, list(request.update_mask.paths))
        return keys_pb.UpdateApiKeyResponse(api_key=convert.key_to_proto(key))

    async def DeleteApiKey(
        self, request: keys_pb.DeleteApiKeyRequest, context: Ctx
    ) -> keys_pb.DeleteApiKeyResponse:
        caller = await caller_of(self.core, context)
        await self.keys.revoke(caller, request.key_id, delete=True)
        return keys_pb.DeleteApiKeyResponse()

    async def RevokeApiKey(
        self, request: keys_pb.RevokeApiKeyRequest, context: Ctx
    ) -> keys_pb.RevokeApiKeyResponse:
        caller = await caller_of(self.core, context)
        key = await self.keys.revoke(caller, request.key_id)
        return keys_pb.RevokeApiKeyResponse(api_key=convert.key_to_proto(key))

    async def RotateApiKey(
        self, request: keys_pb.RotateApiKeyRequest, context: Ctx
    ) -> keys_pb.RotateApiKeyResponse:
        caller = await caller_of(self.core, context)
        grace = None
        if request.HasField("grace_period"):
            try:
                grace = request.grace_period.ToTimedelta()
            except (OverflowError, ValueError):
                raise InvalidArgument("grace_period", "duration out of range") from None
        made = await self.keys.rotate(caller, request.key_id, grace, request.request_id)
        return keys_pb.RotateApiKeyResponse(
            api_key=convert.key_to_proto(made.key),
            secret=made.secret,
            previous_api_key=convert.key_to_proto(made.previous) if made.previous else None,
        )


class UsageServicer(usage_grpc.UsageServiceServicer):
    """Usage recording (routers) and reporting."""

    def __init__(self, core: AuthCore) -> None:
        self.core, self.usage = core, Usage(core)

    async def RecordUsage(
        self, request: usage_pb.RecordUsageRequest, context: Ctx
    ) -> usage_pb.RecordUsageResponse:
        records = [
            Record(
                r.request_id,
                r.credential_id,
                r.user_id,
                r.model,
                r.prompt_tokens,
                r.completion_tokens,
                convert.opt_ts(r, "start_time", f"records[{i}].start_time"),
                convert.opt_ts(r, "end_time", f"records[{i}].end_time"),
                r.status,
                r.end_user,
                r.cached_completion_tokens,
            )
            for i, r in enumerate(request.records)
        ]
        accepted, duplicates = await self.usage.record(records)
        return usage_pb.RecordUsageResponse(accepted=accepted, duplicates=duplicates)

    async def GetUsage(
        self, request: usage_pb.GetUsageRequest, context: Ctx
    ) -> usage_pb.GetUsageResponse:
        caller = await caller_of(self.core, context)
        q = UsageQuery(
            request.user_id,
            request.credential_id,
            request.model,
            convert.opt_ts(request, "start_time", "start_time"),
            convert.opt_ts(request, "end_time", "end_time"),
            request.end_user,
        )
        rows = await self.usage.get(caller, q)
        return usage_pb.GetUsageResponse(
            rows=[convert.usage_to_proto(r) for r in rows],
            total_requests=sum(r.requests for r in rows),
            total_prompt_tokens=sum(r.prompt_tokens for r in rows),
            total_completion_tokens=sum(r.completion_tokens for r in rows),
            total_cached_completion_tokens=sum(r.cached_completion_tokens for r in rows),
        )


class AuditServicer(audit_grpc.AuditServiceServicer):
    """Audit log reads."""

    def __init__(self, core: AuthCore) -> None:
        self.core, self.log = core, AuditLog(core)

    async def ListAuditEvents(
        self, request: audit_pb.ListAuditEventsRequest, context: Ctx
    ) -> audit_pb.ListAuditEventsResponse:
        caller = await caller_of(self.core, context)
        q = AuditQuery(
            request.page_size,
            request.page_token,
            request.actor_user_id,
            request.action,
            request.object_id,
            convert.opt_ts(request, "start_time", "start_time"),
            convert.opt_ts(request, "end_time", "end_time"),
        )
        rows, token = await self.log.list_page(caller, q)
        return audit_pb.ListAuditEventsResponse(
            events=[convert.audit_to_proto(e) for e in rows], next_page_token=token
        )
