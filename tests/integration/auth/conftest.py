"""Auth integration fixtures: a fresh database per test (SQLite file or a
PostgreSQL schema, dropped afterwards), a real auth gRPC server on loopback,
and an admin key made by the real bootstrap."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from tokenyard.auth.v1 import (
    api_key_service_pb2_grpc,
    audit_service_pb2_grpc,
    auth_service_pb2_grpc,
    role_service_pb2_grpc,
    usage_service_pb2_grpc,
    user_service_pb2_grpc,
)

from services.auth import migrate
from services.auth.app import AuthApp
from services.auth.bootstrap import bootstrap_admin
from services.auth.db.engine import Database
from services.auth.settings import Argon2Settings, AuthServerSettings, AuthSettings
from tests.services import pg_schema

PEPPER = "pepper-for-tests-0123456789"
ADMIN_PASSWORD = "admin-password-1"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'auth.db'}"
        return
    with pg_schema() as (url, _):
        yield url


def make_settings(database_url: str, **changes: Any) -> AuthSettings:
    """Settings for tests: cheap argon2, port 0, fast polling, no principal cache."""
    base = AuthSettings(
        server=AuthServerSettings(port=0, grace_period=0.0),
        argon2=Argon2Settings(time_cost=1, memory_kib=64, parallelism=1),
        database_url=database_url,
        key_pepper=PEPPER,
        principal_cache_ttl=0.0,
        revocation_poll_seconds=0.1,
        lockout_threshold=3,
    )
    return dataclasses.replace(base, **changes)


def md(credential: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `credential`."""
    return (("authorization", f"Bearer {credential}"),)


@dataclass
class Auth:
    """A running auth service and clients for it."""

    app: AuthApp
    settings: AuthSettings
    channel: grpc.aio.Channel
    admin_key: str

    @property
    def auth(self) -> auth_service_pb2_grpc.AuthServiceStub:
        return auth_service_pb2_grpc.AuthServiceStub(self.channel)

    @property
    def users(self) -> user_service_pb2_grpc.UserServiceStub:
        return user_service_pb2_grpc.UserServiceStub(self.channel)

    @property
    def roles(self) -> role_service_pb2_grpc.RoleServiceStub:
        return role_service_pb2_grpc.RoleServiceStub(self.channel)

    @property
    def keys(self) -> api_key_service_pb2_grpc.ApiKeyServiceStub:
        return api_key_service_pb2_grpc.ApiKeyServiceStub(self.channel)

    @property
    def usage(self) -> usage_service_pb2_grpc.UsageServiceStub:
        return usage_service_pb2_grpc.UsageServiceStub(self.channel)

    @property
    def audit(self) -> audit_service_pb2_grpc.AuditServiceStub:
        return audit_service_pb2_grpc.AuditServiceStub(self.channel)

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        return md(self.admin_key)


async def start(settings: AuthSettings) -> tuple[AuthApp, grpc.aio.Channel]:
    """Start an auth server on a free port with `settings` and a channel to it."""
    app = AuthApp(settings)
    await app.start()
    return app, grpc.aio.insecure_channel(app.address)


@contextlib.asynccontextmanager
async def running(settings: AuthSettings) -> AsyncIterator[tuple[AuthApp, grpc.aio.Channel]]:
    """`start`, then stop and close on exit."""
    app, channel = await start(settings)
    try:
        yield app, channel
    finally:
        await channel.close()
        await app.stop(0)


def migrate_db(url: str) -> None:
    """Apply the migrations to `url`."""
    db = Database(url)
    try:
        migrate.upgrade(db.engine)
    finally:
        db.close()


@pytest.fixture
async def settings(database_url: str) -> AuthSettings:
    """Test settings on the fresh database."""
    return make_settings(database_url)


@pytest.fixture
async def svc(settings: AuthSettings) -> AsyncIterator[Auth]:
    """Migrated database, bootstrapped admin, running server."""
    admin_key = await bootstrap_admin(settings, "admin", ADMIN_PASSWORD)
    async with running(settings) as (app, channel):
        yield Auth(app, settings, channel, admin_key)
