"""PostgreSQL connections killed under load: auth recovers on its own, no usage lost."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import psycopg
import pytest
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.auth.v1 import usage_service_pb2_grpc as usage_grpc
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from tests.conftest import eventually
from tests.integration.router.conftest import bearer
from tests.reliability.conftest import Stack
from tests.reliability.streams import (
    Outcome,
    lanes,
    more_outcomes,
    run_stream,
    settled_usage,
    tally,
)
from tests.services import PG_DSN

pytestmark = pytest.mark.postgres

# Statuses an auth call may get while its database connection is cut: retryable ones.
TRANSIENT = {"OK", "UNAVAILABLE"}


def terminate(application_name: str) -> int:
    """pg_terminate_backend every connection auth holds; returns how many."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    return len(rows)


async def more_reads(side: Counter[str], count: int, timeout: float = 120.0) -> None:
    """Wait until `count` more of auth's own reads ended (whatever their status)."""
    target = sum(side.values()) + count
    await eventually(lambda: sum(side.values()) >= target, timeout, 0.02, "auth's reads")


async def test_auth_survives_its_postgres_connections_being_terminated(
    pg_schema: tuple[str, str], stack: Stack, report: dict[str, object]
) -> None:  # pg_schema first: the processes stop before the schema is dropped
    url, app_name = pg_schema
    admin = stack.bootstrap(url)
    auth = stack.auth_url(url, TOKENYARD_AUTH_PRINCIPAL_CACHE_TTL="0")
    user = stack.user(auth, admin)
    fresh = [stack.user(auth, admin) for _ in range(3)]
    worker = stack.engine_worker(delay=0.01)
    router = stack.start_router(auth, [worker])
    side: Counter[str] = Counter()
    killed: list[int] = []
    async with (
        grpc.aio.insecure_channel(router.address) as channel,
        grpc.aio.insecure_channel(auth.address) as auth_channel,
    ):
        stub = gen_grpc.GenerationServiceStub(channel)
        usage_stub = usage_grpc.UsageServiceStub(auth_channel)
        assert (await run_stream(stub, "warm", 3, user.key)).exact
        stop = asyncio.Event()

        async def reads() -> None:  # auth's own reads (no cache) while connections die
            while not stop.is_set():
                try:
                    await usage_stub.GetUsage(
                        usage_pb.GetUsageRequest(user_id=user.user_id), metadata=bearer(admin)
                    )
                    side["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    side[exc.code().name] += 1
                await asyncio.sleep(0.02)

        outcomes: list[Outcome] = []
        load = asyncio.create_task(lanes(stub, user.key, stop, 8, outcomes))
        reader = asyncio.create_task(reads())
        try:
            for _ in range(4):
                await more_reads(side, 5)  # auth reads (and holds connections) again
                await more_outcomes(outcomes, 8)
                killed.append(await asyncio.to_thread(terminate, app_name))
            await more_reads(side, 5)
            await more_outcomes(outcomes, 8)
        finally:
            stop.set()
            await load
            await reader
        # Keys the router never saw: each needs auth's database now, without a restart.
        after = [await run_stream(stub, f"fresh {i}", 3, u.key) for i, u in enumerate(fresh)]
    counts = tally(outcomes)
    report["PostgreSQL backends terminated under load"] = dict(
        counts, streams=len(outcomes), terminated=killed, auth_reads=dict(side)
    )
    assert sum(killed) > 0
    assert auth.popen.poll() is None  # the same process, not restarted
    assert set(side) <= TRANSIENT, side  # a cut connection is never INTERNAL
    assert all(o.exact for o in outcomes), counts  # cached keys: streams unaffected
    assert all(o.exact for o in after), [(o.status, o.text) for o in after]
    usage = await settled_usage(auth, admin, user.user_id, len(outcomes) + 1)
    assert usage.total_requests == len(outcomes) + 1
    assert usage.total_completion_tokens == sum(o.tokens for o in outcomes) + 3
