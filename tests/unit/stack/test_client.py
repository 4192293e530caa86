"""The Python client against a real in-process gRPC server speaking the public API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.client import Client, Message, Sampling, TokenyardCallError
from services.common import errors
from services.common.config import ServerSettings
from services.common.interceptors import metadata_value
from services.common.server import GrpcServer

SERVICE = "tokenyard.generation.v1.GenerationService"
KEY = "ty_sk_test"


class Servicer(gen_grpc.GenerationServiceServicer):
    """Echoes what it was sent; fails UNAVAILABLE `unavailable` times first."""

    def __init__(self) -> None:
        self.unavailable = 0
        self.calls = 0
        self.fail_mid_stream = False
        self.last: Any = None
        self.cancelled = asyncio.Event()

    def _check(self, context: Any) -> None:
        self.calls += 1
        if metadata_value(context, "authorization") != f"Bearer {KEY}":
            raise errors.Unauthenticated()
        if self.unavailable > 0:
            self.unavailable -= 1
            raise errors.Unavailable("no worker", retry_after=0.01)

    async def StreamGenerate(
        self, request: gen.StreamGenerateRequest, context: Any
    ) -> AsyncIterator[gen.StreamGenerateResponse]:
        self._check(context)
        self.last = request
        if request.model == "limited":
            raise errors.ResourceExhausted(
                "rate limit", reason="RATE_LIMITED", retry_after=2.0, quota_subject="key"
            )
        words = ["Hello", ",", " world"]
        try:
            for i, word in enumerate(words):
                yield gen.StreamGenerateResponse(
                    request_id="r1", model=request.model, text=word, token_ids=[i]
                )
                if self.fail_mid_stream:
                    raise errors.Unavailable("worker lost")
                if request.model == "slow":
                    await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield gen.StreamGenerateResponse(
            request_id="r1",
            model=request.model,
            finish_reason=gen.FINISH_REASON_LENGTH,
            usage=gen.Usage(prompt_tokens=4, completion_tokens=3),
        )

    async def Generate(self, request: gen.GenerateRequest, context: Any) -> gen.GenerateResponse:
        self._check(context)
        if request.sampling.HasField("top_p") and request.sampling.top_p > 1:
            raise errors.InvalidArgument("sampling.top_p", "must be in (0, 1]")
        return gen.GenerateResponse(
            request_id="r2",
            model=request.model,
            text="done",
            finish_reason=gen.FINISH_REASON_STOP,
            usage=gen.Usage(prompt_tokens=2, completion_tokens=1),
        )

    async def ListModels(
        self, request: gen.ListModelsRequest, context: Any
    ) -> gen.ListModelsResponse:
        self._check(context)
        if not request.page_token:
            return gen.ListModelsResponse(
                models=[gen.Model(name="a", context_length=8, workers=1)], next_page_token="p2"
            )
        return gen.ListModelsResponse(models=[gen.Model(name="b", context_length=16, workers=2)])

    async def CountTokens(
        self, request: gen.CountTokensRequest, context: Any
    ) -> gen.CountTokensResponse:
        self._check(context)
        which = request.WhichOneof("input")
        count = len(request.messages.messages) * 10 if which == "messages" else 3
        return gen.CountTokensResponse(model=request.model, token_count=count)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Servicer, str]]:
    srv = GrpcServer(ServerSettings(grace_period=0.5))
    servicer = Servicer()
    srv.add(gen_grpc.add_GenerationServiceServicer_to_server, servicer, SERVICE)
    port = await srv.start()
    await srv.set_serving(True)
    yield servicer, f"127.0.0.1:{port}"
    await srv.stop(0)


async def test_stream_generate_yields_text_deltas_and_sends_sampling(
    server: tuple[Servicer, str],
) -> None:
    servicer, address = server
    async with Client(address, KEY) as client:
        pieces = [
            p
            async for p in client.stream_generate(
                "hi", model="m", sampling=Sampling(max_tokens=3, temperature=0.0, stop=("x",))
            )
        ]
    assert pieces == ["Hello", ",", " world"]
    sent = servicer.last.sampling
    assert sent.max_tokens == 3 and sent.HasField("temperature") and sent.temperature == 0.0
    assert not sent.HasField("top_p") and list(sent.stop) == ["x"]


async def test_stream_events_end_with_finish_reason_and_usage(
    server: tuple[Servicer, str],
) -> None:
    _, address = server
    async with Client(address, KEY) as client:
        events = [e async for e in client.stream_events(messages=[Message("user", "hi")])]
    assert events[-1].finish_reason == "LENGTH"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 3
    assert all(e.finish_reason is None for e in events[:-1])


async def test_unavailable_before_first_token_is_retried(server: tuple[Servicer, str]) -> None:
    servicer, address = server
    servicer.unavailable = 2
    async with Client(address, KEY, retries=3) as client:
        text = "".join([p async for p in client.stream_generate("hi")])
        servicer.unavailable = 1
        models = await client.list_models()
    assert text == "Hello, world"
    assert [m.name for m in models] == ["a", "b"]


async def test_unavailable_after_the_first_token_is_raised_not_retried(
    server: tuple[Servicer, str],
) -> None:
    servicer, address = server
    servicer.fail_mid_stream = True
    got: list[str] = []
    async with Client(address, KEY) as client:
        with pytest.raises(TokenyardCallError) as info:
            async for piece in client.stream_generate("hi"):
                got.append(piece)
    assert got == ["Hello"]
    assert info.value.status == "UNAVAILABLE" and servicer.calls == 1


async def test_retries_are_bounded(server: tuple[Servicer, str]) -> None:
    servicer, address = server
    servicer.unavailable = 10
    async with Client(address, KEY, retries=2) as client:
        with pytest.raises(TokenyardCallError) as info:
            await client.generate("hi")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 3


async def test_errors_carry_status_reason_field_and_retry_delay(
    server: tuple[Servicer, str],
) -> None:
    _, address = server
    async with Client(address, KEY) as client:
        with pytest.raises(TokenyardCallError) as bad:
            await client.generate("hi", sampling=Sampling(top_p=2.0))
        with pytest.raises(TokenyardCallError) as limited:
            async for _ in client.stream_generate("hi", model="limited"):
                pass
    assert bad.value.status == "INVALID_ARGUMENT"
    assert bad.value.metadata["field"] == "sampling.top_p"
    assert "sampling.top_p" in bad.value.message
    assert limited.value.reason == "RATE_LIMITED" and limited.value.retry_after == 2.0


async def test_wrong_key_is_unauthenticated_and_not_retried(
    server: tuple[Servicer, str],
) -> None:
    servicer, address = server
    async with Client(address, "ty_sk_wrong") as client:
        with pytest.raises(TokenyardCallError) as info:
            await client.count_tokens("hi")
    assert info.value.status == "UNAUTHENTICATED" and servicer.calls == 1
    assert "ty_sk_wrong" not in str(info.value)


async def test_closing_the_stream_cancels_the_call(server: tuple[Servicer, str]) -> None:
    servicer, address = server
    async with Client(address, KEY) as client:
        stream = client.stream_generate("hi", model="slow")
        assert await anext(stream) == "Hello"
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(servicer.cancelled.wait(), 5)
        assert await client.count_tokens(messages=[Message("user", "a")]) == 10


async def test_exactly_one_input_is_required(server: tuple[Servicer, str]) -> None:
    _, address = server
    async with Client(address, KEY) as client:
        with pytest.raises(ValueError, match="exactly one"):
            await client.generate("hi", token_ids=[1])


async def test_tokenyard_generate_prints_text_then_a_stats_line(
    server: tuple[Servicer, str],
) -> None:
    import io

    from services.stack.terminal import Options, generate

    _, address = server
    out, err = io.StringIO(), io.StringIO()
    options = Options(address=address, api_key=KEY, model="m", sampling=Sampling(max_tokens=3))
    assert await generate(options, "hi", out, err) == 0
    assert out.getvalue() == "Hello, world\n"
    stats = err.getvalue().strip()
    assert stats.startswith("[ttft ") and "prompt 4 tokens · completion 3 tokens · LENGTH" in stats


async def test_tokenyard_generate_prints_the_status_not_a_traceback(
    server: tuple[Servicer, str],
) -> None:
    import io

    from services.stack.terminal import Options, generate

    _, address = server
    out, err = io.StringIO(), io.StringIO()
    options = Options(address=address, api_key=KEY, model="limited", sampling=Sampling())
    assert await generate(options, "hi", out, err) == 1
    assert err.getvalue() == (
        "error: RESOURCE_EXHAUSTED: rate limit (reason RATE_LIMITED, retry after 2.0 s)\n"
    )
