"""Assemble the auth gRPC server: core, servicers, internal-token protection.

`AuthApp(settings)` is what `tokenyard auth serve` and the tests run.
"""

from __future__ import annotations

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


class AuthApp:
    """The auth service: its core (database, caches, revocation hub) and gRPC server."""

    def __init__(self, settings: AuthSettings, core: AuthCore | None = None) -> None:
        self.settings = settings
        self.core = core or AuthCore(settings)
        self.server = GrpcServer(
            settings.server,
            service_token=settings.internal.service_token,
            token_methods=INTERNAL_METHODS,
            quiet_methods=INTERNAL_METHODS,  # one per router call: successes at DEBUG
        )
        for register, servicer, name in (
            (
                auth_service_pb2_grpc.add_AuthServiceServicer_to_server,
                servicers.AuthServicer,
                "Auth",
            ),
            (
                user_service_pb2_grpc.add_UserServiceServicer_to_server,
                servicers.UserServicer,
                "User",
            ),
            (
                role_service_pb2_grpc.add_RoleServiceServicer_to_server,
                servicers.RoleServicer,
                "Role",
            ),
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
        ):
            # lenient: a string field holding invalid UTF-8 is INVALID_ARGUMENT, not UNKNOWN.
            self.server.add(lenient(register), servicer(self.core), f"{PACKAGE}.{name}Service")
        self.port = 0

    @property
    def address(self) -> str:
        """host:port to dial."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> int:
        """Check the schema, start background tasks and serve; health turns SERVING."""
        try:
            await self.core.start()
            self.port = await self.server.start()
        except BaseException:
            await self.core.close()
            raise
        await self.server.set_serving(True)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, end revocation streams (routers reconnect elsewhere),
        stop serving, then close the core (flushes last-used times)."""
        await self.server.health.enter_graceful_shutdown()
        await self.core.hub.stop()
        await self.server.stop(grace)
        await self.core.close()
