"""Append-only audit on PostgreSQL: neither the service role nor the owner rewrites it."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import auth_service_pb2_grpc

from services.auth.bootstrap import bootstrap_admin
from services.auth.db.models import Base
from services.auth.db.service_role import APPEND_ONLY, MUTABLE, READ_ONLY, service_role_sql
from tests.integration.auth.conftest import ADMIN_PASSWORD, make_settings, running
from tests.services import PG_DSN, require

URL = "postgresql+psycopg://{user}@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


@dataclasses.dataclass(frozen=True)
class Deployment:
    """A migrated schema owned by postgres and a service role granted per the docs."""

    schema: str
    role: str

    def url(self, user: str) -> str:
        return URL.format(user=user, schema=self.schema)

    def connect(self, user: str) -> psycopg.Connection[tuple[object, ...]]:
        conn = psycopg.connect(f"{PG_DSN} user={user}", autocommit=True)
        conn.execute(f"SET search_path TO {self.schema}")
        return conn


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    """A fresh schema and login role; both dropped afterwards, even on failure."""
    require("postgres")
    tag = uuid.uuid4().hex[:10]
    dep = Deployment(f"t_{tag}", f"svc_{tag}")
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {dep.schema}")
        conn.execute(f"CREATE ROLE {dep.role} LOGIN")
    try:
        yield dep
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {dep.schema} CASCADE")
            conn.execute(f"DROP OWNED BY {dep.role}")
            conn.execute(f"DROP ROLE IF EXISTS {dep.role}")


def test_the_grants_cover_every_table() -> None:
    """A table added later without a grant decision would fail here, not in production."""
    assert set(Base.metadata.tables) == set(MUTABLE + APPEND_ONLY)
    assert READ_ONLY == ("alembic_version",)


@pytest.mark.postgres
async def test_service_role_cannot_update_delete_or_truncate_audit_rows(
    deployment: Deployment,
) -> None:
    """Attack: whoever holds the auth service's database credentials (a compromised
    replica, a leaked URL) erases their tracks with UPDATE, DELETE or TRUNCATE."""
    owner = make_settings(deployment.url("postgres"))
    await bootstrap_admin(owner, "admin", ADMIN_PASSWORD)  # migrates as the owner
    with deployment.connect("postgres") as conn:
        for statement in service_role_sql(deployment.role, deployment.schema):
            conn.execute(statement)
    service = dataclasses.replace(owner, database_url=deployment.url(deployment.role))
    async with running(service) as (_, channel):  # the service itself runs as the role
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        await stub.Login(auth_pb.LoginRequest(username="admin", password=ADMIN_PASSWORD))
    with deployment.connect(deployment.role) as conn:
        count = conn.execute("SELECT count(*) FROM audit_events").fetchone()
        assert count is not None and int(str(count[0])) >= 2  # bootstrap + login rows
        for attack in (
            "UPDATE audit_events SET actor_user_id = 'someone-else'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(attack)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE alembic_version SET version_num = 'x'")
    with deployment.connect("postgres") as conn:  # the owner is stopped by the triggers
        for attack in ("DELETE FROM audit_events", "TRUNCATE audit_events"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(attack)
        after = conn.execute("SELECT count(*) FROM audit_events").fetchone()
        assert after == count
