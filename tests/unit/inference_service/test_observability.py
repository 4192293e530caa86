"""Spans and Prometheus metrics of a generation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.telemetry import configure_telemetry
from tests.unit.inference_service.harness import MODEL, serving

SECRET_PROMPT = "my very private prompt text"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    configure_telemetry("inference-test", None).add_span_processor(processor)
    yield exporter
    processor.shutdown()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_spans_carry_request_id_and_model_never_the_prompt(
    spans: InMemorySpanExporter,
) -> None:
    async with serving() as w:
        await w.gen.Generate(
            gen.GenerateRequest(
                model=MODEL,
                prompt=SECRET_PROMPT,
                request_id="trace-me-1",
                sampling=gen.SamplingParams(max_tokens=4, ignore_eos=True),
            )
        )
    finished = {s.name: s for s in spans.get_finished_spans()}
    for name in ("inference.generate", "inference.queue", "inference.prefill", "inference.decode"):
        attributes = finished[name].attributes
        assert attributes is not None
        assert attributes["tokenyard.request_id"] == "trace-me-1"
        assert attributes["gen_ai.request.model"] == MODEL
    root = finished["inference.generate"]
    assert root.attributes is not None
    assert root.attributes["gen_ai.usage.output_tokens"] == 4
    assert finished["inference.decode"].parent is not None
    assert finished["inference.decode"].parent.span_id == root.context.span_id
    queue, prefill, decode = (finished[f"inference.{n}"] for n in ("queue", "prefill", "decode"))
    given = [queue.start_time, queue.end_time, prefill.start_time, prefill.end_time]
    given.append(decode.start_time)
    times = [t for t in given if t is not None]
    assert len(times) == len(given)
    # Back to back: queueing ends where prefill starts, decode follows prefill.
    assert times == sorted(times) and times[1] == times[2]
    for span in spans.get_finished_spans():
        assert SECRET_PROMPT not in str(dict(span.attributes or {}))


async def test_metrics_count_tokens_and_latency() -> None:
    before = {
        "in": sample("tokenyard_inference_prompt_tokens_total"),
        "out": sample("tokenyard_inference_generated_tokens_total"),
        "ttft": sample("tokenyard_inference_time_to_first_token_seconds_count"),
        "itl": sample("tokenyard_inference_inter_token_latency_seconds_count"),
        "queue": sample("tokenyard_inference_queue_seconds_count"),
        "length": sample("tokenyard_inference_requests_total", finish_reason="LENGTH"),
    }
    async with serving() as w:
        reply = await w.gen.Generate(
            gen.GenerateRequest(
                model=MODEL,
                prompt="hello",
                sampling=gen.SamplingParams(max_tokens=5, ignore_eos=True),
            )
        )
        w.app.sampler.sample()
    assert sample("tokenyard_inference_prompt_tokens_total") - before["in"] == (
        reply.usage.prompt_tokens
    )
    assert sample("tokenyard_inference_generated_tokens_total") - before["out"] == 5
    assert sample("tokenyard_inference_time_to_first_token_seconds_count") - before["ttft"] == 1
    assert sample("tokenyard_inference_inter_token_latency_seconds_count") - before["itl"] == 4
    assert sample("tokenyard_inference_queue_seconds_count") - before["queue"] == 1
    assert (
        sample("tokenyard_inference_requests_total", finish_reason="LENGTH") - before["length"] == 1
    )
    assert REGISTRY.get_sample_value("tokenyard_inference_running_sequences") == 0
    assert REGISTRY.get_sample_value("tokenyard_inference_queue_depth") == 0
    assert REGISTRY.get_sample_value("tokenyard_inference_prefix_cache_queries_total") is not None
