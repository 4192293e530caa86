"""Bad requests get INVALID_ARGUMENT (NOT_FOUND for the model) naming the field."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.status import details_of
from tests.unit.inference_service.harness import MODEL, Running, serving

CONTEXT = 512  # the tiny model's


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker() -> AsyncIterator[Running]:
    async with serving() as running:
        yield running


def sampling(**fields: Any) -> gen.SamplingParams:
    return gen.SamplingParams(**fields)


def messages(*turns: tuple[str, str]) -> gen.ChatMessages:
    return gen.ChatMessages(messages=[gen.ChatMessage(role=r, content=c) for r, c in turns])


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # (case id, request fields, field named, words in the message)
    ("max_tokens 0", {"sampling": sampling(max_tokens=0)}, "sampling.max_tokens", "at least 1"),
    ("max_tokens <0", {"sampling": sampling(max_tokens=-5)}, "sampling.max_tokens", "at least 1"),
    (
        "max_tokens beyond context",
        {"sampling": sampling(max_tokens=CONTEXT)},
        "sampling.max_tokens",
        "context length 512",
    ),
    ("temperature <0", {"sampling": sampling(temperature=-0.1)}, "sampling.temperature", "0"),
    ("temperature NaN", {"sampling": sampling(temperature=math.nan)}, "sampling.temperature", ""),
    ("top_p 0", {"sampling": sampling(top_p=0.0)}, "sampling.top_p", "must be in (0, 1]"),
    ("top_p >1", {"sampling": sampling(top_p=1.5)}, "sampling.top_p", "must be in (0, 1]"),
    ("top_p NaN", {"sampling": sampling(top_p=math.nan)}, "sampling.top_p", "(0, 1]"),
    ("top_k <0", {"sampling": sampling(top_k=-1)}, "sampling.top_k", "at least 0"),
    ("min_p <0", {"sampling": sampling(min_p=-0.5)}, "sampling.min_p", "[0, 1]"),
    ("min_p >1", {"sampling": sampling(min_p=1.01)}, "sampling.min_p", "[0, 1]"),
    (
        "repetition_penalty 0",
        {"sampling": sampling(repetition_penalty=0.0)},
        "sampling.repetition_penalty",
        "greater than 0",
    ),
    (
        "repetition_penalty <0",
        {"sampling": sampling(repetition_penalty=-1.0)},
        "sampling.repetition_penalty",
        "greater than 0",
    ),
    (
        "17 stop strings",
        {"sampling": sampling(stop=[f"s{i}" for i in range(17)])},
        "sampling.stop",
        "at most 16",
    ),
    (
        "stop too long",
        {"sampling": sampling(stop=["ok", "x" * 257])},
        "sampling.stop[1]",
        "256 bytes",
    ),
    ("empty stop", {"sampling": sampling(stop=[""])}, "sampling.stop[0]", "empty"),
    (
        "stop token id out of vocab",
        {"sampling": sampling(stop_token_ids=[384])},
        "sampling.stop_token_ids[0]",
        "vocabulary",
    ),
    ("no input", {"prompt": None}, "input", "prompt, messages or token_ids"),
    ("empty prompt", {"prompt": ""}, "prompt", "empty"),
    ("empty messages", {"messages": gen.ChatMessages()}, "messages.messages", "at least one"),
    ("empty role", {"messages": messages(("", "hi"))}, "messages.messages[0].role", "empty"),
    ("empty token ids", {"token_ids": gen.TokenIds()}, "token_ids.ids", "empty"),
    (
        "token id out of vocab",
        {"token_ids": gen.TokenIds(ids=[5, 384])},
        "token_ids.ids[1]",
        "vocabulary (size 384)",
    ),
    (
        "continuation id out of vocab",
        {"continuation_token_ids": [1, 2, 99999]},
        "continuation_token_ids[2]",
        "vocabulary",
    ),
    (
        "continuation reaches max_tokens",
        {"continuation_token_ids": [1, 2, 3], "sampling": sampling(max_tokens=3)},
        "continuation_token_ids",
        "nothing left",
    ),
    (
        "prompt longer than context",
        {"token_ids": gen.TokenIds(ids=[7] * CONTEXT)},
        "token_ids",
        "context holds 512",
    ),
    (
        "text prompt longer than context",
        {"prompt": "The quick brown fox jumps over the lazy dog. " * 100},
        "prompt",
        "context holds 512",
    ),
    ("too many logprobs", {"logprobs": 21}, "logprobs", "at most 20"),
    ("request id too long", {"request_id": "r" * 129}, "request_id", "128"),
    ("model missing", {"model": ""}, "model", "required"),
]


def build(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "prompt": "hello"}
    for key, value in fields.items():
        if key in ("prompt", "messages", "token_ids"):
            out.pop("prompt", None)
        if value is not None:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("fields", "field", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_request_names_the_field(
    worker: Running, fields: dict[str, Any], field: str, words: str
) -> None:
    fields = build(fields)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: worker.gen.Generate(gen.GenerateRequest(**fields)),
        lambda: worker.gen.StreamGenerate(gen.StreamGenerateRequest(**fields)).read(),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        details = details_of(caught.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details.message
        assert details.message.startswith(f"{field}: ")
        assert words in details.message
        assert details.metadata["field"] == field


async def test_unknown_model_is_not_found(worker: Running) -> None:
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: worker.gen.Generate(gen.GenerateRequest(model="gpt-9", prompt="hi")),
        lambda: worker.gen.CountTokens(gen.CountTokensRequest(model="gpt-9", prompt="hi")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        details = details_of(caught.value)
        assert details.code == grpc.StatusCode.NOT_FOUND
        assert details.reason == "MODEL_NOT_FOUND"
        assert details.metadata["field"] == "model"
        assert "gpt-9" in details.message


async def test_count_tokens_checks_its_input(worker: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.gen.CountTokens(
            gen.CountTokensRequest(model=MODEL, token_ids=gen.TokenIds(ids=[400]))
        )
    assert details_of(caught.value).metadata["field"] == "token_ids.ids[0]"
    # An input over the context is still counted (that is how a caller finds out).
    long = await worker.gen.CountTokens(
        gen.CountTokensRequest(model=MODEL, token_ids=gen.TokenIds(ids=[7] * 600))
    )
    assert long.token_count == 600


async def test_list_models_page_checks(worker: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.gen.ListModels(gen.ListModelsRequest(page_size=-1))
    assert details_of(caught.value).metadata["field"] == "page_size"


async def test_list_models_page_size_rule_is_the_routers(worker: Running) -> None:
    # Over the maximum means the maximum (as the router has it), not an error.
    reply = await worker.gen.ListModels(gen.ListModelsRequest(page_size=10**6))
    assert [m.name for m in reply.models] == [MODEL]


async def test_invalid_utf8_is_refused_and_worker_keeps_serving(worker: Running) -> None:
    # Python clients cannot even build such a message; another language's client
    # could send one, so send the bytes by hand: field 2 (prompt), bytes ff fe.
    raw = gen.GenerateRequest(model=MODEL).SerializeToString() + b"\x12\x02\xff\xfe"
    call = worker.channel.unary_unary(
        "/tokenyard.generation.v1.GenerationService/Generate",
        request_serializer=None,
        response_deserializer=gen.GenerateResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(raw)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "prompt: invalid UTF-8"
    with pytest.raises(UnicodeEncodeError):
        gen.GenerateRequest(prompt="\udc80").SerializeToString()


async def test_worker_keeps_serving_after_bad_requests(worker: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await worker.gen.Generate(
            gen.GenerateRequest(model=MODEL, prompt="x", sampling=sampling(top_p=2.0))
        )
    reply = await worker.gen.Generate(
        gen.GenerateRequest(
            model=MODEL, prompt="x", sampling=sampling(max_tokens=2, ignore_eos=True)
        )
    )
    assert reply.usage.completion_tokens == 2


async def test_invalid_utf8_in_a_chat_message_names_its_path(worker: Running) -> None:
    ok_turn = gen.ChatMessage(role="user", content="hi").SerializeToString()
    bad_turn = gen.ChatMessage(role="user").SerializeToString() + b"\x12\x01\xc3"
    chat = b"\x0a" + bytes([len(ok_turn)]) + ok_turn + b"\x0a" + bytes([len(bad_turn)]) + bad_turn
    raw = (
        gen.StreamGenerateRequest(model=MODEL).SerializeToString()
        + b"\x1a"
        + bytes([len(chat)])
        + chat
    )
    call = worker.channel.unary_stream(
        "/tokenyard.generation.v1.GenerationService/StreamGenerate",
        request_serializer=None,
        response_deserializer=gen.StreamGenerateResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(raw).read()
    details = details_of(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.metadata["field"] == "messages.messages[1].content"
