"""Workers failing under streams: SIGKILL mid-stream, drain while streaming."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc
from tokenyard.inference.v1 import worker_service_pb2 as wrk
from tokenyard.inference.v1 import worker_service_pb2_grpc as wrk_grpc

from tests.conftest import eventually
from tests.integration.router.conftest import bearer
from tests.reliability.conftest import SERVICE_MD, Proc, Stack, load_of, stack_for
from tests.reliability.streams import (
    CLEAN,
    Progress,
    run_stream,
    settled_usage,
    tally,
    wait_idle,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Proc, str]]:
    """One SQLite auth for the module, an admin key, and five workers starting meanwhile."""
    with stack_for(tmp_path_factory.mktemp("worker-faults")) as stack:
        stack.pending = [stack.engine_worker(delay=0.02, wait=False) for _ in range(5)]  # type: ignore[attr-defined]
        url = f"sqlite:///{stack.tmp / 'auth.db'}"
        admin = stack.bootstrap(url)
        auth = stack.auth_url(url)
        yield stack, auth, admin


def take(stack: Stack, n: int) -> list[Proc]:
    """`n` of the workers started by `base`, once serving."""
    pending: list[Proc] = stack.pending  # type: ignore[attr-defined]
    taken, pending[:] = pending[:n], pending[n:]
    return [stack.wait_serving(w) for w in taken]


async def test_sigkill_of_a_worker_under_32_streams(
    base: tuple[Stack, Proc, str], report: dict[str, object]
) -> None:
    stack, auth, admin = base
    user = stack.user(auth, admin)
    workers = take(stack, 3)
    router = stack.start_router(auth, workers)
    n, length = 32, 150
    progress = Progress(threshold=10, total=n)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        tasks = [
            asyncio.create_task(
                run_stream(stub, f"stream {i}", length, user.key, on_message=progress.watcher(i))
            )
            for i in range(n)
        ]
        await asyncio.wait_for(progress.event.wait(), 60)
        loads = [load_of(w).running for w in workers]
        victim = workers[loads.index(max(loads))]
        victim.signal(signal.SIGKILL)
        outcomes = await asyncio.gather(*tasks)
    counts = tally(outcomes)
    resumed = max(loads)
    report["worker SIGKILL, 32 streams"] = dict(
        counts, streams=n, on_killed_worker=resumed, exact=sum(o.exact for o in outcomes)
    )
    assert not counts.get("HUNG"), counts
    assert set(counts) <= CLEAN, counts
    # Two workers with room for every stream remain: all streams complete, without a gap.
    assert all(o.exact for o in outcomes), [(o.prompt, o.status, o.text) for o in outcomes]
    usage = await settled_usage(auth, admin, user.user_id, n)
    assert usage.total_requests == n
    assert usage.total_completion_tokens == sum(o.tokens for o in outcomes)
    assert usage.total_prompt_tokens == sum(len(o.prompt.encode()) for o in outcomes)
    alive = [w for w in workers if w is not victim]
    assert await wait_idle(alive) == {w.address: 0 for w in alive}


async def routable_workers(stub: gen_grpc.GenerationServiceStub, key: str, count: int) -> None:
    """Wait until ListModels reports `count` workers the router may send new requests to."""

    async def listed() -> bool:
        reply = await stub.ListModels(gen.ListModelsRequest(), metadata=bearer(key))
        return (reply.models[0].workers if reply.models else 0) == count

    await eventually(listed, interval=0.05, what=f"{count} routable workers")


async def test_a_drained_worker_finishes_its_streams_and_gets_no_new_ones(
    base: tuple[Stack, Proc, str], report: dict[str, object]
) -> None:
    stack, auth, admin = base
    user = stack.user(auth, admin)
    drained, other = take(stack, 2)
    router = stack.start_router(auth, [drained, other])
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        progress = Progress(threshold=5, total=8)
        first = [
            asyncio.create_task(
                run_stream(stub, f"old {i}", 150, user.key, on_message=progress.watcher(i))
            )
            for i in range(8)
        ]
        await asyncio.wait_for(progress.event.wait(), 60)
        on_drained = load_of(drained).running
        assert on_drained > 0  # least_load spread the streams over both workers
        async with grpc.aio.insecure_channel(drained.address) as wchannel:
            reply = await wrk_grpc.WorkerServiceStub(wchannel).Drain(
                wrk.DrainRequest(), metadata=SERVICE_MD
            )
        assert reply.remaining == on_drained
        await routable_workers(stub, user.key, 1)  # the router heard `draining` on WatchLoad
        second = [asyncio.create_task(run_stream(stub, f"new {i}", 40, user.key)) for i in range(8)]
        peak = 0
        while not all(t.done() for t in second):
            peak = max(peak, (await asyncio.to_thread(load_of, drained)).running)
            await asyncio.sleep(0.05)
        old, new = await asyncio.gather(*first), await asyncio.gather(*second)
    report["worker drained while streaming"] = dict(
        tally(old + new), streams=16, on_drained_worker=on_drained
    )
    assert all(o.exact for o in old), [(o.status, o.text) for o in old]
    assert all(o.exact for o in new), [(o.status, o.text) for o in new]
    assert peak <= on_drained  # nothing new started there
    assert "moving the request" not in router.output()  # old streams finished in place
    assert await wait_idle([drained, other]) == {drained.address: 0, other.address: 0}
    with grpc.insecure_channel(drained.address) as hc:
        health = health_pb2_grpc.HealthStub(hc).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
