"""The worker pool: DNS discovery, ejection and return, graceful stop, metrics."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY
from tokenyard.generation.v1 import generation_service_pb2 as gen

from tests.conftest import eventually
from tests.doubles.fake_worker import FakeWorker, FakeWorkerConfig
from tests.unit.router.conftest import MODEL, Stack, bearer


def request(max_tokens: int = 3) -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model=MODEL, prompt="hello")
    req.sampling.max_tokens = max_tokens
    return req


async def run(stack: Stack, client: object, n: int = 1) -> None:
    for _ in range(n):
        async for _ in client.StreamGenerate(request(), metadata=bearer()):  # type: ignore[attr-defined]
            pass


async def test_workers_found_by_dns_name(stack: Stack) -> None:
    worker = await stack.add_worker()
    app = await stack.router(workers=(), worker_dns=f"localhost:{worker.port}", wait=False)
    await eventually(lambda: bool(app.pool.for_model(MODEL)))
    assert f"127.0.0.1:{worker.port}" in app.pool.workers
    await run(stack, stack.client(app))
    assert len(worker.generation.requests) == 1


async def test_a_failed_worker_is_ejected_and_probed_back_in(stack: Stack) -> None:
    flaky = await stack.add_worker()
    steady = await stack.add_worker()
    app = await stack.router(policy="round_robin")
    client = stack.client(app)
    port = flaky.port
    await flaky.stop()
    await run(stack, client, 4)  # all served by the steady worker, invisibly
    assert len(steady.generation.requests) == 4
    back = FakeWorker(FakeWorkerConfig(), port=port)
    await back.start()
    stack.workers.append(back)
    await eventually(lambda: len(app.pool.for_model(MODEL)) == 2, timeout=10)
    await run(stack, client, 4)
    assert back.generation.requests  # in rotation again


async def test_graceful_stop_flushes_usage(stack: Stack) -> None:
    await stack.add_worker()
    app = await stack.router(usage_flush_interval=3600.0)
    await run(stack, stack.client(app), 2)
    assert not stack.auth.state.usage
    stack.routers.remove(app)
    await app.stop(1.0)
    assert len(stack.auth.state.usage) == 2


async def test_metrics_count_requests_tokens_and_worker_health(stack: Stack) -> None:
    worker = await stack.add_worker()
    client = stack.client(await stack.router())

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = sample(
        "tokenyard_router_requests_total", method="StreamGenerate", model=MODEL, code="OK"
    )
    tokens = sample("tokenyard_router_completion_tokens_total", model=MODEL)
    await run(stack, client, 2)
    after = sample(
        "tokenyard_router_requests_total", method="StreamGenerate", model=MODEL, code="OK"
    )
    assert after - before == 2
    await eventually(
        lambda: sample("tokenyard_router_completion_tokens_total", model=MODEL) - tokens == 6
    )
    assert sample("tokenyard_router_worker_healthy", worker=worker.address, model=MODEL) == 1
    assert sample("tokenyard_router_time_to_first_token_seconds_count", model=MODEL) >= 2
    assert sample("tokenyard_router_auth_cache_total", result="hit") >= 1
    labels = {"method": "StreamGenerate", "model": "", "code": "UNAUTHENTICATED"}
    refused = sample("tokenyard_router_requests_total", **labels)
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in client.StreamGenerate(request(), metadata=bearer("ty_sk_nobody")):
            pass
    assert sample("tokenyard_router_requests_total", **labels) == refused + 1
