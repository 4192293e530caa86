"""Load, cancellation, deadlines, a full worker, drain, Describe and the service token."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.inference.v1 import worker_service_pb2 as wpb

from services.common.config import InternalSettings
from services.common.interceptors import SERVICE_TOKEN_HEADER
from services.common.status import details_of
from services.inference.model_loading import LoadedModel
from tests.doubles.tiny_model import build_tiny_model
from tests.unit.inference_service.harness import MODEL, request, serving

LONG = 3000  # tokens: far more than a test waits for


@pytest.fixture(scope="module")
def long_model() -> LoadedModel:
    """The tiny model with a context long enough for generations that outlast a test."""
    return build_tiny_model(context_length=4096)


def long_request(max_tokens: int = LONG) -> gen.StreamGenerateRequest:
    return request(prompt="go", sampling=gen.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def test_cancel_frees_the_slot(
    long_model: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    # The client reads once and stops, so the worker is mostly inside a send when
    # the cancel lands. The slot must come back through the call's own cleanup,
    # not when garbage collection finds an abandoned generator: collection is off.
    # Every layer closes the generator it iterates in the call's task, so the trace
    # context is detached where it was attached (OpenTelemetry logs it otherwise).
    caplog.set_level(logging.ERROR)
    gc.disable()
    try:
        async with serving(long_model, max_running=1) as w:
            call = w.gen.StreamGenerate(long_request())
            await call.read()
            await w.watch_until(lambda r: r.running == 1)
            await asyncio.sleep(0.2)  # let the worker run ahead of the idle reader
            call.cancel()
            report = await w.watch_until(lambda r: r.running == 0)
            stats = w.app.engine.stats()
    finally:
        gc.enable()
    assert report.free_slots == 1
    assert stats.total_cancelled == 1
    assert stats.total_generated_tokens < LONG
    assert "Failed to detach context" not in caplog.text


async def test_deadline_stops_generation(long_model: LoadedModel) -> None:
    async with serving(long_model, max_running=1) as w:
        unary = gen.GenerateRequest.FromString(long_request().SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await w.gen.Generate(unary, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await w.watch_until(lambda r: r.running == 0 and r.queued == 0)
        stats = w.app.engine.stats()
    assert stats.total_cancelled == 1
    assert stats.total_generated_tokens < LONG


async def test_full_worker_answers_resource_exhausted_with_retry_info(
    long_model: LoadedModel,
) -> None:
    async with serving(long_model, max_running=1, max_queued=1) as w:
        first = w.gen.StreamGenerate(long_request())
        await first.read()
        second = w.gen.StreamGenerate(long_request())
        await w.watch_until(lambda r: r.running == 1 and r.queued == 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await w.gen.Generate(gen.GenerateRequest(model=MODEL, prompt="hi"))
        details = details_of(caught.value)
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "WORKER_FULL"
        assert details.retry_after is not None and details.retry_after > 0
        first.cancel()
        second.cancel()
        # The slots come back: a new request runs to the end.
        await w.watch_until(lambda r: r.running == 0 and r.queued == 0)
        reply = await w.gen.Generate(
            gen.GenerateRequest(
                model=MODEL, prompt="hi", sampling=gen.SamplingParams(max_tokens=2, ignore_eos=True)
            )
        )
    assert reply.usage.completion_tokens == 2


async def test_drain_refuses_new_work_finishes_running_then_not_serving(
    long_model: LoadedModel,
) -> None:
    async with serving(long_model, max_running=2) as w:
        health = health_pb2_grpc.HealthStub(w.channel)
        running = w.gen.StreamGenerate(long_request(max_tokens=1500))
        await running.read()
        drained = await w.worker.Drain(wpb.DrainRequest())
        assert drained.remaining == 1
        check = await health.Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await w.gen.Generate(gen.GenerateRequest(model=MODEL, prompt="hi"))
        details = details_of(caught.value)
        assert details.code == grpc.StatusCode.UNAVAILABLE
        assert details.reason == "DRAINING"
        report = await w.watch_until(lambda r: r.draining)
        assert report.running == 1
        # The running stream goes on to its end.
        messages = []
        while (message := await running.read()) is not grpc.aio.EOF:
            messages.append(message)
        assert messages[-1].finish_reason == gen.FINISH_REASON_LENGTH
        assert messages[-1].usage.completion_tokens == 1500
        watch = health.Watch(health_pb2.HealthCheckRequest())
        async for status in watch:
            if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        watch.cancel()
        models = await w.gen.ListModels(gen.ListModelsRequest())
    assert models.models[0].workers == 0


async def test_describe() -> None:
    async with serving(served_model_name="m1", max_running=3, max_queued=5) as w:
        info = await w.worker.Describe(wpb.DescribeRequest())
    assert info.model == "m1"
    assert info.context_length == 512
    assert info.vocab_size == 384
    assert (info.max_running, info.max_queued) == (3, 5)
    assert info.device == "cpu"
    assert info.dtype == "float32"
    assert info.prefix_cache is True
    assert info.execution_path == wpb.EXECUTION_PATH_FAST
    assert info.version
    assert info.worker_id.startswith("127.0.0.1:")


async def test_watch_load_reports_at_once_on_change_and_while_busy(
    long_model: LoadedModel,
) -> None:
    async with serving(long_model, max_running=2) as w:
        watch = w.worker.WatchLoad(wpb.WatchLoadRequest(interval_ms=20))
        first = await watch.read()
        assert (first.running, first.queued, first.free_slots) == (0, 0, 2)
        assert first.report_time.seconds > 0
        call = w.gen.StreamGenerate(long_request())
        await call.read()
        busy: list[Any] = []
        while len(busy) < 3:  # reports keep coming while nothing changes
            report = await watch.read()
            if report.running == 1:
                busy.append(report)
        assert busy[-1].free_slots == 1
        assert busy[-1].pending_tokens > 0
        assert busy[-1].prefix_cache_queries == 1
        call.cancel()
        while (await watch.read()).running != 0:
            pass
        watch.cancel()


async def test_service_token_guards_every_rpc_but_health() -> None:
    internal = InternalSettings(service_token="worker-secret-123")
    async with serving(internal=internal) as w:
        good = ((SERVICE_TOKEN_HEADER, "worker-secret-123"),)
        calls: list[Any] = [
            lambda md: w.gen.Generate(gen.GenerateRequest(model=MODEL, prompt="x"), metadata=md),
            lambda md: w.gen.StreamGenerate(long_request(2), metadata=md).read(),
            lambda md: w.gen.CountTokens(
                gen.CountTokensRequest(model=MODEL, prompt="x"), metadata=md
            ),
            lambda md: w.gen.ListModels(gen.ListModelsRequest(), metadata=md),
            lambda md: w.worker.Describe(wpb.DescribeRequest(), metadata=md),
            lambda md: w.worker.WatchLoad(wpb.WatchLoadRequest(), metadata=md).read(),
            lambda md: w.worker.Drain(wpb.DrainRequest(), metadata=md),
        ]
        for call in calls:
            for metadata in ((), ((SERVICE_TOKEN_HEADER, "wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "worker-secret" not in (caught.value.details() or "")
        for call in calls[:-1]:
            assert await asyncio.wait_for(call(good), 30)
        health = health_pb2_grpc.HealthStub(w.channel)
        status = await health.Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_load_reports_carry_kv_cache_usage_and_queue_time(long_model: LoadedModel) -> None:
    async with serving(long_model, max_running=1) as w:
        running = w.gen.StreamGenerate(long_request())
        await running.read()
        waiting = w.gen.StreamGenerate(long_request(max_tokens=2))  # queued behind it
        busy = await w.watch_until(lambda r: r.running == 1 and r.queued == 1)
        assert 0 < busy.kv_cache_usage <= 1
        running.cancel()
        assert [m async for m in waiting][-1].finish_reason == gen.FINISH_REASON_LENGTH
        report = await w.watch_until(lambda r: r.running == 0 and r.queue_time_p95_seconds > 0)
    assert report.kv_cache_usage == 0
    assert 0 <= report.queue_time_p50_seconds <= report.queue_time_p95_seconds
