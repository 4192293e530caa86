"""Assemble the auth gRPC server: core, servicers, internal-token protection.

`start_auth(settings)` is what `tokenyard auth serve` and the tests call.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenyard.auth.v1 import (
    api_key_service_pb2_grpc,
    audit_service_pb2_grpc,
    auth_service_pb2_grpc,
    role_service_pb2_grpc,
    usage_service_pb2_grpc,
    user_service_pb2_grpc,
)

from services.auth import servicers
from services.auth.core import AuthCore
from services.auth.settings import AuthSettings
from services.common.lenient import lenient
from services.common.server import GrpcServer, internal_token_methods

PACKAGE = "tokenyard.auth.v1"
INTERNAL_METHODS = internal_token_methods(
    f"{PACKAGE}.AuthService/Authenticate",
    f"{PACKAGE}.AuthService/WatchRevocations",
    f"{PACKAGE}.UsageService/RecordUsage",
)


@dataclass
class AuthApp:
    """A running auth service: its server, port and core."""

    server: GrpcServer
    core: AuthCore
    port: int

    @property
    def address(self) -> str:
        """host:port to dial."""
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, end revocation streams (routers reconnect elsewhere),
        stop serving, then close the core (flushes last-used times)."""
        await self.server.health.enter_graceful_shutdown()
        await self.core.hub.stop()
        await self.server.stop(grace)
        await self.core.close()


async def start_auth(settings: AuthSettings, core: AuthCore | None = None) -> AuthApp:
    """Check the schema, start background tasks and serve; health turns SERVING."""
    core = core or AuthCore(settings)
    try:
        await core.start()
    except BaseException:
        await core.close()
        raise
    server = GrpcServer(
        settings.server,
        service_token=settings.internal.service_token,
        token_methods=INTERNAL_METHODS,
        quiet_methods=INTERNAL_METHODS,  # one per router call: successes at DEBUG
    )
    pairs = [
        (auth_service_pb2_grpc.add_AuthServiceServicer_to_server, servicers.AuthServicer, "Auth"),
        (user_service_pb2_grpc.add_UserServiceServicer_to_server, servicers.UserServicer, "User"),
        (role_service_pb2_grpc.add_RoleServiceServicer_to_server, servicers.RoleServicer, "Role"),
        (
            api_key_service_pb2_grpc.add_ApiKeyServiceServicer_to_server,
            servicers.ApiKeyServicer,
            "ApiKey",
        ),
        (
            usage_service_pb2_grpc.add_UsageServiceServicer_to_server,
            servicers.UsageServicer,
            "Usage",
        ),
        (
            audit_service_pb2_grpc.add_AuditServiceServicer_to_server,
            servicers.AuditServicer,
            "Audit",
        ),
    ]
    for register, cls, name in pairs:
        # lenient: a string field holding invalid UTF-8 is INVALID_ARGUMENT, not UNKNOWN.
        server.add(lenient(register), cls(core), f"{PACKAGE}.{name}Service")
    try:
        port = await server.start()
    except BaseException:
        await core.close()
        raise
    await server.set_serving(True)
    return AuthApp(server, core, port)
