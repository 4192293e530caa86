"""The official `openai` client against a real router, real auth and test-double workers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import openai
import pytest
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from tests.conftest import eventually
from tests.doubles.fake_worker import expected_token, token_text
from tests.integration.openai.conftest import MODEL, Auth, HttpRouter, http_router, ledger
from tests.integration.router.conftest import Launcher, bearer, make_user


def expected_text(request: gen.StreamGenerateRequest, count: int) -> str:
    """What every test-double worker generates for `request`."""
    return "".join(token_text(expected_token(request, i)) for i in range(count))


def prompt_request(prompt: str, max_tokens: int) -> gen.StreamGenerateRequest:
    request = gen.StreamGenerateRequest(model=MODEL, prompt=prompt)
    request.sampling.max_tokens = max_tokens
    return request


async def running_on_router(address: str, key: str) -> int:
    """Sequences the router's workers report running for MODEL (via gRPC ListModels)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await gen_grpc.GenerationServiceStub(channel).ListModels(
            gen.ListModelsRequest(), metadata=bearer(key)
        )
    return sum(m.running for m in reply.models if m.name == MODEL)


def idle_on(router: HttpRouter, key: str) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: no sequence of MODEL runs on the router's workers.

    The generations these tests cut would run 100 s (2000 tokens at 20/s), longer than
    `eventually` waits, so only a propagated cancel makes the check hold in time.
    """

    async def idle() -> bool:
        return await running_on_router(router.proc.address, key) == 0

    return idle


def test_models_list_retrieve_and_unknown_model(auth: Auth, router: HttpRouter) -> None:
    user = make_user(auth.proc, auth.admin)
    client = router.client(user.key)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


async def test_chat_stream_text_equals_grpc_and_usage_equals_the_ledger(
    auth: Auth, router: HttpRouter
) -> None:
    user = make_user(auth.proc, auth.admin)
    messages: list[Any] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    client = router.async_client(user.key)
    chunks = []
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=7,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        chunks.append(chunk)
    await client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert {c.choices[0].finish_reason for c in chunks[:-2]} == {None}  # never ""
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None

    grpc_request = gen.StreamGenerateRequest(model=MODEL)
    for m in messages:
        grpc_request.messages.messages.append(gen.ChatMessage(role=m["role"], content=m["content"]))
    grpc_request.sampling.max_tokens = 7
    grpc_request.sampling.temperature = 0
    async with grpc.aio.insecure_channel(router.proc.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        grpc_text = "".join(
            [m.text async for m in stub.StreamGenerate(grpc_request, metadata=bearer(user.key))]
        )
    assert text == grpc_text == expected_text(grpc_request, 7)

    recorded = await ledger(auth, user.user_id, requests=2)
    assert recorded.total_requests == 2  # the HTTP stream and the gRPC one
    assert last.usage.completion_tokens == 7
    assert recorded.total_completion_tokens == 2 * last.usage.completion_tokens
    assert recorded.total_prompt_tokens == 2 * last.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + 7


def test_completions_stream_and_whole_reply(auth: Auth, router: HttpRouter) -> None:
    user = make_user(auth.proc, auth.admin)
    client = router.client(user.key)
    want = expected_text(prompt_request("once upon a time", 5), 5)

    whole = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=5)
    assert whole.choices[0].text == want
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    assert whole.usage.prompt_tokens == 4  # the double counts words

    stream = client.completions.create(
        model=MODEL, prompt=["once upon a time"], max_tokens=5, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # not asked for

    by_ids = client.completions.create(model=MODEL, prompt=[11, 12, 13], max_tokens=3)
    request = gen.StreamGenerateRequest(model=MODEL)
    request.token_ids.ids.extend([11, 12, 13])
    assert by_ids.choices[0].text == expected_text(request, 3)


def test_n_samples_are_choices_whole_and_streamed(auth: Auth, router: HttpRouter) -> None:
    user = make_user(auth.proc, auth.admin)
    client = router.client(user.key)
    request = prompt_request("once upon a time", 4)
    request.sampling.seed = 5

    def sample(index: int) -> str:  # the double seeds sample i with seed + i, as a worker does
        return "".join(token_text(expected_token(request, i, index)) for i in range(4))

    whole = client.completions.create(
        model=MODEL, prompt="once upon a time", max_tokens=4, seed=5, n=2
    )
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [
        (0, sample(0), "length"),
        (1, sample(1), "length"),
    ]
    assert sample(0) != sample(1)
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (4, 8)

    chat = prompt_request("x", 3)
    chat.ClearField("prompt")
    chat.messages.messages.add(role="user", content="hi")
    chat.sampling.seed = 9
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        seed=9,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    roles: dict[int, str | None] = {}
    ends: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            roles.setdefault(choice.index, choice.delta.role)
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                ends[choice.index] = choice.finish_reason
    want = {i: "".join(token_text(expected_token(chat, p, i)) for p in range(3)) for i in (0, 1)}
    assert texts == want
    assert roles == {0: "assistant", 1: "assistant"}
    assert ends == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 6


def test_bad_key_is_an_authentication_error_in_the_envelope(auth: Auth, router: HttpRouter) -> None:
    for key in ("ty_sk_notarealkey0000000000000000", "garbage"):
        with pytest.raises(openai.AuthenticationError) as info:
            router.client(key).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.status_code == 401
        assert info.value.body == {
            "message": "invalid or missing credential",
            "type": "authentication_error",
            "param": None,
            "code": "unauthenticated",
        }
        with pytest.raises(openai.AuthenticationError):
            router.client(key).models.list()


def test_key_restricted_to_another_model_is_permission_denied(
    auth: Auth, router: HttpRouter
) -> None:
    user = make_user(auth.proc, auth.admin, models=("some-other-model",))
    with pytest.raises(openai.PermissionDeniedError) as info:
        router.client(user.key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 403
    assert info.value.code == "model_not_allowed"
    assert [m.id for m in router.client(user.key).models.list()] == []


def test_priority_above_the_keys_cap_is_permission_denied_and_within_it_runs(
    auth: Auth, router: HttpRouter
) -> None:
    user = make_user(auth.proc, auth.admin)  # no max_priority anywhere: the cap is 0
    client = router.client(user.key)
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, extra_body={"priority": 1}
        )
    assert info.value.status_code == 403
    assert info.value.param == "priority"
    assert info.value.code == "priority_limit"
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_body={"priority": -1}
    )
    assert reply.choices[0].finish_reason == "length"


IMAGE_PARAM = "messages[0].content"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"n": 17}, "n"),  # above the router's max_n
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
            "response_format",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, IMAGE_PARAM),
        ({"messages": []}, "messages"),
        # The router's own rules (services.common.requests), before any worker:
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"priority": 1001}, "priority"),
    ],
)
def test_a_bad_field_is_a_bad_request_naming_it(
    auth: Auth, router: HttpRouter, extra: dict[str, object], param: str
) -> None:
    user = make_user(auth.proc, auth.admin)
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **extra}
    messages = body.pop("messages")
    with pytest.raises(openai.BadRequestError) as info:
        router.client(user.key).chat.completions.create(
            model=MODEL,
            messages=messages,
            extra_body=body,
        )
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"


def test_over_the_request_rate_is_a_rate_limit_error_with_retry_after(
    auth: Auth, router: HttpRouter
) -> None:
    user = make_user(auth.proc, auth.admin, limits=res.Limits(requests_per_minute=2))
    client = router.client(user.key)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert info.value.status_code == 429
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.body["type"] == "rate_limit_error"  # type: ignore[index]


async def test_a_client_leaving_mid_stream_frees_its_slot_and_is_billed(
    auth: Auth, launcher: Launcher
) -> None:
    user = make_user(auth.proc, auth.admin, limits=res.Limits(concurrent_streams=1))
    worker = launcher.fake_worker("--token-delay", "0.05")
    router = http_router(launcher, auth.proc, [worker])
    client = router.async_client(user.key)
    stream = await client.completions.create(
        model=MODEL, prompt="a long story", max_tokens=2000, stream=True
    )
    received = 0
    async for chunk in stream:
        received += len(chunk.choices[0].text.split())
        if received >= 3:
            break
    await stream.close()  # 2000 tokens at 20/s: only a cancel ends it within the test
    await eventually(idle_on(router, user.key), what="the cut generation stopping")
    # The one concurrency slot is free again (settled just after the cancel): the next
    # stream is admitted. Refusals until then are retried; a held slot fails the test.
    replies: list[Any] = []

    async def admitted() -> bool:
        try:
            replies.append(
                await client.completions.create(model=MODEL, prompt="next", max_tokens=2)
            )
        except openai.RateLimitError:
            return False
        return True

    await eventually(admitted, interval=0.05, what="the cut stream's slot being freed")
    assert replies[0].choices[0].text == expected_text(prompt_request("next", 2), 2)
    await client.close()
    recorded = await ledger(auth, user.user_id, requests=2)
    assert recorded.total_requests == 2
    cut = recorded.total_completion_tokens - 2
    assert received <= cut < 2000


async def test_a_client_giving_up_on_a_whole_reply_cancels_the_generation(
    auth: Auth, launcher: Launcher
) -> None:
    user = make_user(auth.proc, auth.admin)
    worker = launcher.fake_worker("--token-delay", "0.05")
    router = http_router(launcher, auth.proc, [worker])
    client = router.async_client(user.key)
    with pytest.raises(openai.APITimeoutError):
        await client.completions.create(
            model=MODEL, prompt="too long to wait for", max_tokens=2000, timeout=1.0
        )
    await eventually(idle_on(router, user.key), what="the abandoned generation stopping")
    recorded = await ledger(auth, user.user_id, requests=1)
    assert recorded.total_requests == 1 and 0 < recorded.total_completion_tokens < 2000


def test_a_worker_dying_mid_stream_is_invisible_to_the_client(
    auth: Auth, launcher: Launcher
) -> None:
    user = make_user(auth.proc, auth.admin)
    workers = [
        launcher.fake_worker("--token-delay", "0.02", "--die-after-tokens", "6", wait=False)
        for _ in range(2)
    ]
    for worker in workers:
        launcher.wait_serving(worker)
    router = http_router(launcher, auth.proc, workers)
    stream = router.client(user.key).completions.create(
        model=MODEL, prompt="resume me", max_tokens=10, stream=True
    )
    text = "".join(c.choices[0].text for c in stream)
    assert text == expected_text(prompt_request("resume me", 10), 10)
    assert sum(w.popen.poll() is not None for w in workers) == 1  # one died, one took over


async def test_the_user_field_is_recorded_as_the_end_user_of_the_usage(
    auth: Auth, router: HttpRouter
) -> None:
    """OpenAI's `user` is kept with each request's usage, so GetUsage reports per end user."""
    user = make_user(auth.proc, auth.admin)
    client = router.async_client(user.key)
    hello: list[Any] = [{"role": "user", "content": "hello"}]
    try:
        for end_user in ("alice", "alice", "bob"):
            await client.chat.completions.create(
                model=MODEL, messages=hello, max_tokens=3, user=end_user
            )
        await client.completions.create(model=MODEL, prompt="no end user", max_tokens=2)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=MODEL, messages=hello, max_tokens=3, user="x" * 257
            )
        assert caught.value.param == "user"
    finally:
        await client.close()
    everyone = await ledger(auth, user.user_id, requests=4)
    assert everyone.total_requests == 4
    alice = await ledger(auth, user.user_id, requests=2, end_user="alice")
    assert (alice.total_requests, alice.total_completion_tokens) == (2, 6)
    bob = await ledger(auth, user.user_id, requests=1, end_user="bob")
    assert (bob.total_requests, bob.total_completion_tokens) == (1, 3)
