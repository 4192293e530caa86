"""Audit flood: failed logins and denials are all counted, but only a few become rows."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import user_service_pb2 as users_pb

from services.auth.app import AuthApp
from services.auth.bootstrap import bootstrap_admin
from services.auth.core import AuthCore
from services.auth.db.models import AuditTallyRow
from services.auth.domain.audit_flood import peer_host, record_throttled
from services.auth.settings import AuthSettings
from tests.integration.auth.conftest import ADMIN_PASSWORD, Auth
from tests.integration.auth.helpers import make_user, md

ROWS = 3


@dataclasses.dataclass
class Clock:
    """A clock the test moves by hand."""

    now: datetime = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def flood(settings: AuthSettings) -> AsyncIterator[tuple[Auth, Clock]]:
    """A real auth server writing ROWS audit rows per peer and user a minute, on a test clock."""
    settings = dataclasses.replace(settings, audit_rows_per_minute=ROWS, lockout_threshold=1000)
    admin_key = await bootstrap_admin(settings, "admin", ADMIN_PASSWORD)
    clock = Clock()
    app = AuthApp(settings, AuthCore(settings, clock=clock))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield Auth(app, settings, channel, admin_key), clock
    finally:
        await channel.close()
        await app.stop(0)


async def rows(svc: Auth, action: str) -> int:
    reply = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(action=action, page_size=1000), metadata=svc.admin
    )
    return len(reply.events)


async def tallies(svc: Auth, action: str) -> dict[tuple[str, str, datetime], int]:
    def query(session: Session) -> dict[tuple[str, str, datetime], int]:
        got = session.scalars(select(AuditTallyRow).where(AuditTallyRow.action == action))
        return {(t.scope, t.subject, t.window_start): t.count for t in got}

    return await svc.app.core.db.read(query)


async def failed_login(svc: Auth, username: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await svc.auth.Login(auth_pb.LoginRequest(username=username, password="guess-guess"))


async def test_failed_login_spray_is_counted_not_written(flood: tuple[Auth, Clock]) -> None:
    """Attack: an unauthenticated client sprays failed logins (60 names in a minute),
    one audit row each, filling the disk and burying real events."""
    svc, clock = flood
    await asyncio.gather(*(failed_login(svc, f"nobody-{i}") for i in range(60)))
    assert await rows(svc, "login.failure") == ROWS
    counts = await tallies(svc, "login.failure")
    minute = clock.now.replace(second=0)
    assert counts[("peer", "ipv4:127.0.0.1", minute)] == 60
    assert sum(n for (scope, _, _), n in counts.items() if scope == "user") == 60
    clock.now += timedelta(minutes=1)
    await failed_login(svc, "nobody-0")
    assert await rows(svc, "login.failure") == ROWS + 1
    assert (await tallies(svc, "login.failure"))[
        ("peer", "ipv4:127.0.0.1", minute + timedelta(minutes=1))
    ] == 1


async def test_permission_denials_are_counted_per_user(flood: tuple[Auth, Clock]) -> None:
    """Attack: a key holder without users.admin calls ListUsers in a loop; every denial
    was an audit row."""
    svc, _ = flood
    user, key = await make_user(svc, "prober", ["generate"])
    for _ in range(30):
        with pytest.raises(grpc.aio.AioRpcError):
            await svc.users.ListUsers(users_pb.ListUsersRequest(), metadata=md(key))
    assert await rows(svc, "permission.denied") == ROWS
    counts = await tallies(svc, "permission.denied")
    assert [n for (scope, who, _), n in counts.items() if scope == "user" and who == user] == [30]


async def test_one_user_attacked_from_many_peers_is_counted_per_user(
    flood: tuple[Auth, Clock],
) -> None:
    """Attack: a botnet (one peer per guess) on one account: the per-user counter
    catches what per-peer counting alone would write as one row per peer."""
    svc, clock = flood

    def spray(session: Session) -> int:
        return sum(
            record_throttled(
                session,
                "login.failure",
                user="victim-id",
                peer=f"ipv4:10.0.{i // 250}.{i % 250}:{40000 + i}",
                now=clock.now,
                rows_per_minute=ROWS,
            )
            for i in range(500)
        )

    assert await svc.app.core.db.write(spray) == ROWS
    counts = await tallies(svc, "login.failure")
    assert counts[("user", "victim-id", clock.now.replace(second=0))] == 500
    assert sum(n for (scope, _, _), n in counts.items() if scope == "peer") == 500


def test_peer_host_drops_the_ephemeral_port() -> None:
    """Each connection has its own source port: counting per port is counting nothing."""
    assert peer_host("ipv4:10.0.0.7:53211") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:40000") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"
