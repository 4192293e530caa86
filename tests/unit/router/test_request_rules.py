"""The router applies every request rule itself, before any worker sees the request."""

from __future__ import annotations

import math

import grpc
import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.status import details_of
from tests.unit.router.conftest import MODEL, Stack, bearer

SERVICE = "/tokenyard.generation.v1.GenerationService/"


def _length_delimited(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


def _bad_stop() -> bytes:
    sampling = gen.SamplingParams(stop=["ok"]).SerializeToString() + _length_delimited(8, b"\xc3")
    return gen.StreamGenerateRequest(model=MODEL, prompt="hi").SerializeToString() + (
        _length_delimited(5, sampling)
    )


def _bad_chat_content() -> bytes:
    ok = gen.ChatMessage(role="user", content="hi").SerializeToString()
    bad = gen.ChatMessage(role="user").SerializeToString() + _length_delimited(2, b"\xff")
    chat = _length_delimited(1, ok) + _length_delimited(1, bad)
    return gen.StreamGenerateRequest(model=MODEL).SerializeToString() + _length_delimited(3, chat)


@pytest.mark.parametrize(
    ("method", "raw", "field"),
    [
        # Field 2 of ListModelsRequest is page_token (the old table called it "prompt").
        ("ListModels", _length_delimited(2, b"\xff\xfe"), "page_token"),
        (
            "CountTokens",
            gen.CountTokensRequest(model=MODEL).SerializeToString() + _length_delimited(2, b"\xff"),
            "prompt",
        ),
        ("StreamGenerate", _bad_chat_content(), "messages.messages[1].content"),
        ("StreamGenerate", _bad_stop(), "sampling.stop[1]"),
    ],
)
async def test_invalid_utf8_names_the_field_it_is_in(
    stack: Stack, method: str, raw: bytes, field: str
) -> None:
    worker = await stack.add_worker()
    app = await stack.router()
    channel = grpc.aio.insecure_channel(app.address)
    stack.channels.append(channel)
    if method == "StreamGenerate":
        call = channel.unary_stream(SERVICE + method)(raw, metadata=bearer())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(SERVICE + method)(raw, metadata=bearer())
    details = details_of(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.metadata["field"] == field
    assert details.message == f"{field}: invalid UTF-8"
    assert not worker.generation.requests


def _request(**fields: object) -> gen.StreamGenerateRequest:
    request = gen.StreamGenerateRequest(model=MODEL, prompt="hello")
    request.sampling.max_tokens = 4
    for name, value in fields.items():
        if name.startswith("sampling."):
            getattr(request.sampling, name.removeprefix("sampling.")).extend(value)
        else:
            setattr(request, name, value)
    return request


def _chat_without_role() -> gen.StreamGenerateRequest:
    request = _request()
    request.messages.messages.append(gen.ChatMessage(content="hi"))
    return request


def _infinite_temperature() -> gen.StreamGenerateRequest:
    request = _request()
    request.sampling.temperature = math.inf
    return request


# Rules only the worker applied before they had one home: the router refuses them now.
@pytest.mark.parametrize(
    ("request_", "field", "words"),
    [
        (_request(logprobs=21), "logprobs", "at most 20"),
        (_infinite_temperature(), "sampling.temperature", "finite"),
        (_chat_without_role(), "messages.messages[0].role", "must not be empty"),
        (_request(**{"sampling.stop": ["ok", ""]}), "sampling.stop[1]", "must not be empty"),
    ],
    ids=["logprobs", "temperature inf", "empty role", "empty stop"],
)
async def test_rules_once_the_workers_alone_refuse_at_the_router(
    stack: Stack, request_: gen.StreamGenerateRequest, field: str, words: str
) -> None:
    worker = await stack.add_worker()
    client = stack.client(await stack.router())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in client.StreamGenerate(request_, metadata=bearer()):
            pass
    details = details_of(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.metadata["field"] == field
    assert words in details.message
    assert not worker.generation.requests
