"""Lockout under concurrency: at most `threshold` guesses are verified per window."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb

from services.auth.bootstrap import bootstrap_admin
from services.auth.settings import Argon2Settings, AuthSettings
from tests.integration.auth.conftest import ADMIN_PASSWORD, Auth, running
from tests.integration.auth.helpers import make_user

THRESHOLD = 5
PASSWORD = "victim-password-1"


@dataclasses.dataclass
class Verifications:
    """Passwords checked against a real hash (the dummy for unknown users not counted)."""

    count: int = 0


@pytest.fixture
async def locking(settings: AuthSettings) -> AsyncIterator[tuple[Auth, Verifications]]:
    """A real auth server locking after THRESHOLD failures, its verifications counted."""
    # OWASP's minimum argon2 cost: a verification takes as long as it does in production,
    # which is the window concurrent guesses exploit.
    settings = dataclasses.replace(
        settings,
        lockout_threshold=THRESHOLD,
        lockout_seconds=600.0,
        argon2=Argon2Settings(time_cost=2, memory_kib=19_456, parallelism=1),
    )
    admin_key = await bootstrap_admin(settings, "admin", ADMIN_PASSWORD)
    async with running(settings) as (app, channel):
        seen = Verifications()
        verify = app.core.passwords.verify

        def counting(stored: str | None, password: str) -> bool:
            if stored is not None:
                seen.count += 1
            return verify(stored, password)

        app.core.passwords.verify = counting  # type: ignore[method-assign]
        yield Auth(app, settings, channel, admin_key), seen


async def login_codes(svc: Auth, passwords: list[str]) -> list[grpc.StatusCode]:
    """Log in as the victim with every password at once; the status of each."""

    async def one(password: str) -> grpc.StatusCode:
        try:
            await svc.auth.Login(auth_pb.LoginRequest(username="victim", password=password))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    return list(await asyncio.gather(*(one(p) for p in passwords)))


async def test_concurrent_guesses_stop_at_the_threshold(
    locking: tuple[Auth, Verifications],
) -> None:
    """Attack: 40 concurrent wrong passwords were all verified (none refused as locked),
    and a correct password sent inside the next batch still logged in."""
    svc, seen = locking
    await make_user(svc, "victim", ["generate"], password=PASSWORD)
    codes = await login_codes(svc, [f"wrong-password-{i}" for i in range(40)])
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert seen.count == THRESHOLD
    guesses = [f"wrong-password-again-{i}" for i in range(39)]
    guesses.insert(20, PASSWORD)
    codes = await login_codes(svc, guesses)
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert seen.count == THRESHOLD
    events = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(action="login.lockout", page_size=100),
        metadata=svc.admin,
    )
    assert len(events.events) == 1 and events.events[0].details["failures"] == str(THRESHOLD)


async def test_a_correct_password_within_the_threshold_still_logs_in(
    locking: tuple[Auth, Verifications],
) -> None:
    """The reservation counts attempts, not successes: a success below the threshold
    resets the count, so the owner is not locked out by their own typo."""
    svc, seen = locking
    await make_user(svc, "victim", ["generate"], password=PASSWORD)
    await login_codes(svc, [f"typo-{i}" for i in range(THRESHOLD - 1)])
    assert await login_codes(svc, [PASSWORD]) == [grpc.StatusCode.OK]
    assert await login_codes(svc, ["typo-again"]) == [grpc.StatusCode.UNAUTHENTICATED]
    assert await login_codes(svc, [PASSWORD]) == [grpc.StatusCode.OK]
    assert seen.count == THRESHOLD + 2
