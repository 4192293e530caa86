"""One `tokenyard up` serving two models from a models file: routing by name,
ListModels, keys restricted to one model, per-model context limits, aliases, and
usage rows under one name per model. Tests run in file order."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import api_key_service_pb2_grpc as keys_grpc
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import role_service_pb2_grpc as roles_grpc
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.auth.v1 import usage_service_pb2_grpc as usage_grpc
from tokenyard.auth.v1 import user_service_pb2 as users_pb
from tokenyard.auth.v1 import user_service_pb2_grpc as users_grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from tests.conftest import eventually
from tests.integration.stack.launcher import READY, StackProcess, run_cli
from tests.integration.stack.tiny_model import build_tiny_model

SHORT_CONTEXT = 64  # tiny-b's context; tiny-a has 512


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    root = tmp_path_factory.mktemp("two-models")
    other = build_tiny_model(root / "tiny-b", seed=1, context=SHORT_CONTEXT)
    models = root / "models.toml"
    models.write_text(
        f'[[models]]\nname = "tiny-a"\nsource = "{tiny_model}"\nworkers = 1\n'
        f'aliases = ["a-latest"]\n[[models]]\nname = "tiny-b"\nsource = "{other}"\nworkers = 1\n'
    )
    proc = StackProcess(root / "state", None, models=2, extra=["--models-file", str(models)])
    try:
        proc.wait_for(READY)
        yield proc
    finally:
        proc.stop()


@dataclass(frozen=True)
class User:
    user_id: str
    key: str


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def make_user(
    stack: StackProcess,
    models: list[str],
    key_models: list[str] | None = None,
    key_limits: res.Limits | None = None,
) -> User:
    """A role allowed only `models`, a user holding it and their key (narrowed to
    `key_models`, with `key_limits`), made by the admin."""
    admin = bearer((stack.state_dir / "admin-key").read_text().strip())
    name = f"u{uuid.uuid4().hex[:10]}"
    with grpc.insecure_channel(f"127.0.0.1:{stack.auth_port}") as channel:
        role = res.Role(
            name=f"r-{name}", permissions=["generate", "models.list"], allowed_models=models
        )
        roles_grpc.RoleServiceStub(channel).CreateRole(
            roles_pb.CreateRoleRequest(role=role), metadata=admin
        )
        user = users_grpc.UserServiceStub(channel).CreateUser(
            users_pb.CreateUserRequest(username=name, password="user-pass-123", roles=[role.name]),
            metadata=admin,
        )
        made = keys_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(
                user_id=user.user.user_id,
                name="k",
                allowed_models=key_models or [],
                limits=key_limits or res.Limits(),
            ),
            metadata=admin,
        )
    return User(user.user.user_id, made.secret)


Tokens = list[tuple[int, float]]


def generate(stack: StackProcess, key: str, model: str, prompt: str = "Hello there") -> Tokens:
    """Greedy (token id, logprob) of 8 tokens from `model` through the router.

    Random tiny models often echo the same token, so the text alone cannot tell
    two of them apart; the logprobs (the model's own numbers) can.
    """
    request = gen.StreamGenerateRequest(model=model, prompt=prompt, logprobs=0)
    request.sampling.max_tokens, request.sampling.temperature = 8, 0
    request.sampling.ignore_eos = True
    with grpc.insecure_channel(stack.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        replies = list(stub.StreamGenerate(request, metadata=bearer(key), timeout=60))
    assert replies[-1].usage.completion_tokens == 8
    return [(t.token_id, t.logprob) for r in replies for t in r.logprobs]


def same(a: Tokens, b: Tokens) -> bool:
    """The same tokens with the same logprobs (to float noise)."""
    return [t for t, _ in a] == [t for t, _ in b] and all(
        abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True)
    )


def list_models(stack: StackProcess, key: str) -> dict[str, gen.Model]:
    with grpc.insecure_channel(stack.address) as channel:
        reply = gen_grpc.GenerationServiceStub(channel).ListModels(
            gen.ListModelsRequest(), metadata=bearer(key), timeout=30
        )
    return {m.name: m for m in reply.models}


def demo_key(stack: StackProcess) -> str:
    return (stack.state_dir / "demo-key").read_text().strip()


def test_the_banner_names_both_models_and_list_models_shows_their_workers(
    stack: StackProcess,
) -> None:
    assert "1 worker(s) serving tiny-a (also a-latest), 1 worker(s) serving tiny-b" in stack.output
    models = list_models(stack, demo_key(stack))
    assert sorted(models) == ["tiny-a", "tiny-b"]  # aliases are names, not models
    assert [models[n].workers for n in ("tiny-a", "tiny-b")] == [1, 1]
    assert models["tiny-a"].context_length > SHORT_CONTEXT >= models["tiny-b"].context_length


def test_each_name_reaches_its_own_model_and_an_alias_reaches_its_model(
    stack: StackProcess,
) -> None:
    key = demo_key(stack)
    a, b = generate(stack, key, "tiny-a"), generate(stack, key, "tiny-b")
    assert len(a) == len(b) == 8
    assert not same(a, b)  # two models with other weights
    assert same(generate(stack, key, "a-latest"), a)
    assert same(generate(stack, key, "tiny-a"), a)
    with grpc.insecure_channel(stack.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        counted = stub.CountTokens(
            gen.CountTokensRequest(model="a-latest", prompt="Hello there"), metadata=bearer(key)
        )
    assert counted.token_count > 0
    with grpc.insecure_channel(stack.address) as channel, pytest.raises(grpc.RpcError) as caught:
        stub = gen_grpc.GenerationServiceStub(channel)
        stub.Generate(gen.GenerateRequest(model="tiny-c", prompt="x"), metadata=bearer(key))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_alias_is_a_name_of_its_model_over_http(stack: StackProcess) -> None:
    import openai

    base_url = f"http://127.0.0.1:{stack.http_port}/v1"
    with openai.OpenAI(base_url=base_url, api_key=demo_key(stack), max_retries=0) as client:
        assert sorted(m.id for m in client.models.list()) == ["tiny-a", "tiny-b"]
        assert client.models.retrieve("a-latest").id == "tiny-a"
        done = client.completions.create(model="a-latest", prompt="Hi", max_tokens=2)
    assert done.model == "tiny-a" and done.usage is not None
    assert done.usage.completion_tokens <= 2


def test_limits_are_the_models_own(stack: StackProcess) -> None:
    """A prompt over tiny-b's short context is refused for tiny-b only."""
    key, prompt = demo_key(stack), "word " * (SHORT_CONTEXT + 8)
    assert generate(stack, key, "tiny-a", prompt)
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack, key, "tiny-b", prompt)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_key_for_one_model_cannot_reach_the_other(stack: StackProcess) -> None:
    only_a = make_user(stack, ["tiny-a"])
    assert list(list_models(stack, only_a.key)) == ["tiny-a"]
    generate(stack, only_a.key, "tiny-a")
    generate(stack, only_a.key, "a-latest")  # the alias is the same model
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack, only_a.key, "tiny-b")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    only_b = make_user(stack, ["tiny-b"])
    with pytest.raises(grpc.RpcError) as caught:  # an alias is no way around a role
        generate(stack, only_b.key, "a-latest")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_key_for_one_model_carries_that_models_own_limits(stack: StackProcess) -> None:
    """A budget for one model: a key narrowed to it with its own request rate."""
    limited = make_user(stack, ["*"], ["tiny-a"], res.Limits(requests_per_minute=2))
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack, limited.key, "tiny-b")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    generate(stack, limited.key, "tiny-a")
    generate(stack, limited.key, "a-latest")  # counted against the same key and model
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack, limited.key, "tiny-a")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    generate(stack, demo_key(stack), "tiny-a")  # other keys are not held back


async def test_usage_rows_carry_one_name_per_model(stack: StackProcess) -> None:
    user = make_user(stack, ["*"])
    for model in ("tiny-a", "a-latest", "tiny-b"):
        generate(stack, user.key, model)
    admin = bearer((stack.state_dir / "admin-key").read_text().strip())
    reply = usage_pb.GetUsageResponse()
    with grpc.insecure_channel(f"127.0.0.1:{stack.auth_port}") as channel:
        usage = usage_grpc.UsageServiceStub(channel)

        def recorded() -> bool:
            nonlocal reply
            reply = usage.GetUsage(usage_pb.GetUsageRequest(user_id=user.user_id), metadata=admin)
            return bool(reply.total_requests >= 3)

        await eventually(recorded, interval=0.2, what="the three requests in the usage ledger")
        only_b = usage.GetUsage(
            usage_pb.GetUsageRequest(user_id=user.user_id, model="tiny-b"), metadata=admin
        )
    by_model = {row.model: row for row in reply.rows}
    assert sorted(by_model) == ["tiny-a", "tiny-b"]
    assert by_model["tiny-a"].requests == 2 and by_model["tiny-b"].requests == 1
    assert by_model["tiny-a"].completion_tokens == 16
    assert only_b.total_requests == 1


def test_conflicting_model_flags_stop_the_start_with_one_line(tmp_path: Path) -> None:
    done = run_cli("up", "--state-dir", str(tmp_path / "state"), "--models", "a", "--model", "b")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tokenyard: configuration error: --model and --models: give one way of naming the models"
    ]
    assert not (tmp_path / "state").exists()


@pytest.mark.slow
def test_the_demo_model_and_a_tiny_model_behind_one_router(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`--models smollm2-135m,tiny=FOLDER`: the real demo model next to a random one."""
    extra = ["--models", f"smollm2-135m,tiny={tiny_model}"]
    proc = StackProcess(tmp_path / "state", None, models=2, extra=extra)
    try:
        proc.wait_for(READY, timeout=300)
        key = demo_key(proc)
        assert sorted(list_models(proc, key)) == ["smollm2-135m", "tiny"]
        demo, tiny = generate(proc, key, "smollm2-135m"), generate(proc, key, "tiny")
    finally:
        assert proc.stop() == 0
    assert not same(demo, tiny)
