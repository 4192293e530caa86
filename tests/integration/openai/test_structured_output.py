"""Structured output through real processes: auth, a router, and a tiny-model worker.

The format reaches the worker from every door (gRPC, the Python client, the
official `openai` client); a bad format is refused by the router with the
library's reason, and by the worker too when called directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import grpc
import jsonschema
import openai
import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.client import Client, Message, ResponseFormat, Sampling, TokenyardCallError
from services.common.interceptors import SERVICE_TOKEN_HEADER
from tests.conftest import free_port
from tests.doubles.tiny_model import build_tiny_model
from tests.integration.openai.conftest import Auth, HttpRouter, http_router
from tests.integration.router.conftest import (
    SERVICE_TOKEN,
    TOKENYARD,
    Launcher,
    Proc,
    base_env,
    bearer,
    make_user,
)

MODEL = "tiny"
STATUS = {
    "type": "object",
    "properties": {"status": {"enum": ["open", "closed"]}, "n": {"enum": [1, 2, 3]}},
    "required": ["status", "n"],
    "additionalProperties": False,
}
BAD_SCHEMA = '{"type": "objekt"}'


@pytest.fixture(scope="module")
def worker(auth: Auth, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """`tokenyard inference serve` on the tiny random model (float32, CPU)."""
    folder = tmp_path_factory.mktemp("tiny-structured")
    loaded = build_tiny_model()
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    port = free_port()
    args = [TOKENYARD, "inference", "serve", "--port", str(port), "--model", str(folder),
            "--served-model-name", MODEL, "--device", "cpu"]  # fmt: skip
    env = base_env(TOKENYARD_INFERENCE_DTYPE="float32", OMP_NUM_THREADS="1")
    launcher: Launcher = auth.launcher
    yield launcher.wait_serving(launcher.spawn("worker", args, port, env), timeout=120)


@pytest.fixture(scope="module")
def router(auth: Auth, worker: Proc) -> HttpRouter:
    return http_router(auth.launcher, auth.proc, [worker])


def test_openai_client_json_schema_and_json_object(auth: Auth, router: HttpRouter) -> None:
    client = router.client(make_user(auth.proc, auth.admin).key)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "status?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": STATUS}},
        max_tokens=40,
        n=2,
        seed=3,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), STATUS)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "anything"}],
        response_format={"type": "json_object"},
        max_tokens=4,
    )
    choice = reply.choices[0]
    # A random model rarely closes an object in 4 tokens: LENGTH, and an incomplete prefix.
    assert choice.finish_reason in ("stop", "length")
    assert (choice.message.content or "").startswith("{")


def test_openai_client_bad_schema_is_400_naming_response_format(
    auth: Auth, router: HttpRouter
) -> None:
    client = router.client(make_user(auth.proc, auth.admin).key)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": {"type": "objekt"}},
            },
        )
    assert info.value.status_code == 400
    assert info.value.param == "response_format"
    assert "objekt" in str(info.value.body)


async def test_python_client_regex_streams_to_stop(auth: Auth, router: HttpRouter) -> None:
    key = make_user(auth.proc, auth.admin).key
    async with Client(router.proc.address, key) as client:
        reply = await client.generate(
            messages=[Message("user", "code?")],
            model=MODEL,
            sampling=Sampling(max_tokens=20, temperature=1.0, seed=4),
            response_format=ResponseFormat.of_regex(r"[A-Z]{2}-[0-9]{2}"),
        )
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{2}", reply.text)
        assert reply.finish_reason == "STOP"
        with pytest.raises(TokenyardCallError) as info:
            await client.generate("hi", model=MODEL, response_format=ResponseFormat.of_grammar(
                'start: "a" | missing_rule'))  # fmt: skip
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing_rule" in info.value.message


async def test_grpc_bad_schema_is_invalid_argument_at_router_and_worker(
    auth: Auth, router: HttpRouter, worker: Proc
) -> None:
    key = make_user(auth.proc, auth.admin).key
    request = gen.StreamGenerateRequest(
        model=MODEL, prompt="hi", response_format=gen.ResponseFormat(json_schema=BAD_SCHEMA)
    )
    for address, metadata in (
        (router.proc.address, bearer(key)),
        (worker.address, ((SERVICE_TOKEN_HEADER, SERVICE_TOKEN),)),  # the worker refuses too
    ):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.StreamGenerate(request, metadata=metadata, timeout=30):
                    pytest.fail("a token was sent for a bad format")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "response_format.json_schema" in (info.value.details() or "")
            assert "objekt" in (info.value.details() or "")
            # ... and the service keeps serving.
            good = gen.GenerateRequest(
                model=MODEL, prompt="hi", response_format=gen.ResponseFormat(regex="[a-c]{3}"),
                sampling=gen.SamplingParams(max_tokens=10),
            )  # fmt: skip
            reply = await stub.Generate(good, metadata=metadata, timeout=30)
            assert re.fullmatch("[a-c]{3}", reply.text)
            assert reply.finish_reason == gen.FINISH_REASON_STOP
