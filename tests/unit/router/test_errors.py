"""Every status of DESIGN.md's error table, as a client of the router sees it."""

from __future__ import annotations

import grpc
import pytest
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.status import details_of
from tests.conftest import eventually
from tests.doubles.fake_auth import principal
from tests.unit.router.conftest import KEY, MODEL, Stack, bearer


def request(**fields: object) -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model=MODEL, prompt="hello")
    req.sampling.max_tokens = 4
    for name, value in fields.items():
        setattr(req, name, value)
    return req


async def status_of(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:  # type: ignore[type-arg]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


async def test_bad_credentials_get_one_identical_message(stack: Stack) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router())
    metadatas = [
        (),
        (("authorization", "Basic abc"),),
        (("authorization", "Bearer ty_sk_not_a_real_key"),),
        bearer("x" * 1000),
    ]
    errors = [await status_of(client.StreamGenerate(request(), metadata=m)) for m in metadatas]
    assert {e.code() for e in errors} == {grpc.StatusCode.UNAUTHENTICATED}
    assert len({e.details() for e in errors}) == 1
    assert not stack.workers[0].generation.requests


async def test_model_not_allowed_is_denied_before_any_worker(stack: Stack) -> None:
    stack.auth.state.add_key("ty_sk_narrow", principal("cred-n", models=("smollm2-*",)))
    await stack.add_worker()
    client = stack.client(await stack.router())
    err = await status_of(client.StreamGenerate(request(), metadata=bearer("ty_sk_narrow")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert MODEL in (err.details() or "")
    assert not stack.workers[0].generation.requests


async def test_missing_generate_permission_is_denied(stack: Stack) -> None:
    stack.auth.state.add_key("ty_sk_lister", principal("cred-l", permissions=("models.list",)))
    await stack.add_worker()
    client = stack.client(await stack.router())
    err = await status_of(client.StreamGenerate(request(), metadata=bearer("ty_sk_lister")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    models = await client.ListModels(gen.ListModelsRequest(), metadata=bearer("ty_sk_lister"))
    assert [m.name for m in models.models] == [MODEL]


def _bad(field: str) -> gen.StreamGenerateRequest:
    req = request()
    s = req.sampling
    if field == "model":
        req.model = ""
    elif field == "input":
        req.ClearField("prompt")
    elif field == "sampling.max_tokens":
        s.max_tokens = 0
    elif field == "sampling.top_p":
        s.top_p = 1.5
    elif field == "sampling.temperature":
        s.temperature = float("nan")
    elif field == "request_id":
        req.request_id = "r" * 129
    elif field == "sampling.stop":
        s.stop.extend(["x"] * 17)
    return req


@pytest.mark.parametrize(
    "field",
    [
        "model",
        "input",
        "sampling.max_tokens",
        "sampling.top_p",
        "sampling.temperature",
        "request_id",
        "sampling.stop",
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(stack: Stack, field: str) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router())
    err = await status_of(client.StreamGenerate(_bad(field), metadata=bearer()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")
    details = details_of(err)
    assert details.metadata.get("field") == field


async def test_invalid_utf8_names_the_field(stack: Stack) -> None:
    await stack.add_worker()
    app = await stack.router()
    channel = grpc.aio.insecure_channel(app.address)
    stack.channels.append(channel)
    raw_call = channel.unary_stream(
        "/tokenyard.generation.v1.GenerationService/StreamGenerate",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    body = request().SerializeToString() + b"\x12\x02\xff\xfe"  # field 2 (prompt), bad bytes
    err = await status_of(raw_call(body, metadata=bearer()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in (err.details() or "")


async def test_unknown_model_is_not_found(stack: Stack) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router())
    err = await status_of(client.StreamGenerate(request(model="no-such"), metadata=bearer()))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such" in (err.details() or "")


async def test_auth_unreachable_fails_closed(stack: Stack) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router())
    await stack.auth.stop()
    err = await status_of(client.StreamGenerate(request(), metadata=bearer()))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert not stack.workers[0].generation.requests


async def test_no_healthy_worker_is_unavailable(stack: Stack) -> None:
    worker = await stack.add_worker()
    app = await stack.router()
    client = stack.client(app)
    await worker.stop()
    await eventually(lambda: not app.pool.for_model(MODEL))
    err = await status_of(client.StreamGenerate(request(), metadata=bearer()))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_rate_limit_is_resource_exhausted_with_retry_and_quota_details(
    stack: Stack,
) -> None:
    limited = principal("cred-r", limits=res.Limits(requests_per_minute=2))
    stack.auth.state.add_key("ty_sk_limited", limited)
    await stack.add_worker()
    client = stack.client(await stack.router())
    for _ in range(2):
        async for _ in client.StreamGenerate(request(), metadata=bearer("ty_sk_limited")):
            pass
    err = await status_of(client.StreamGenerate(request(), metadata=bearer("ty_sk_limited")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = details_of(err)
    assert details.retry_after is not None and details.retry_after > 0
    assert details.quota_violations and details.quota_violations[0][0] == "user:u1"


async def test_quota_used_up_is_resource_exhausted(stack: Stack) -> None:
    p = principal("cred-q", limits=res.Limits(token_quota=100), quota_used=100)
    stack.auth.state.add_key("ty_sk_quota", p)
    await stack.add_worker()
    client = stack.client(await stack.router())
    err = await status_of(client.StreamGenerate(request(), metadata=bearer("ty_sk_quota")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = details_of(err)
    assert details.reason == "QUOTA_EXHAUSTED" and details.retry_after


async def test_max_tokens_over_key_limit_is_invalid_argument(stack: Stack) -> None:
    p = principal("cred-m", limits=res.Limits(max_tokens_per_request=3))
    stack.auth.state.add_key("ty_sk_small", p)
    await stack.add_worker()
    client = stack.client(await stack.router())
    err = await status_of(client.StreamGenerate(request(), metadata=bearer("ty_sk_small")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_tokens" in (err.details() or "")
    unset = request()
    unset.sampling.ClearField("max_tokens")
    tokens = [
        t
        async for m in client.StreamGenerate(unset, metadata=bearer("ty_sk_small"))
        for t in m.token_ids
    ]
    assert len(tokens) == 3  # capped at the key's limit


async def test_every_worker_full_is_resource_exhausted_with_retry(stack: Stack) -> None:
    await stack.add_worker(max_running=1, token_delay=0.05)
    await stack.add_worker(max_running=1, token_delay=0.05)
    client = stack.client(await stack.router())
    long = request()
    long.sampling.max_tokens = 100
    busy = [client.StreamGenerate(long, metadata=bearer()) for _ in range(2)]
    for call in busy:
        await call.read()
    err = await status_of(client.StreamGenerate(request(), metadata=bearer()))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = details_of(err)
    assert details.reason == "WORKERS_FULL" and details.retry_after
    for call in busy:
        call.cancel()


async def test_deadline_exceeded_stops_the_worker(stack: Stack) -> None:
    worker = await stack.add_worker(token_delay=0.02)
    client = stack.client(await stack.router())
    long = request()
    long.sampling.max_tokens = 1000
    err = await status_of(client.StreamGenerate(long, metadata=bearer(), timeout=0.3))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: worker.load.running == 0)


async def test_worker_errors_about_the_request_reach_the_client(stack: Stack) -> None:
    await stack.add_worker(context_length=50)
    client = stack.client(await stack.router())
    big = request()
    big.sampling.max_tokens = 100
    err = await status_of(client.StreamGenerate(big, metadata=bearer()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in (err.details() or "")


async def test_errors_leave_the_router_serving(stack: Stack) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router())
    await status_of(client.StreamGenerate(request(model=""), metadata=bearer()))
    tokens = [
        t async for m in client.StreamGenerate(request(), metadata=bearer(KEY)) for t in m.token_ids
    ]
    assert len(tokens) == 4
