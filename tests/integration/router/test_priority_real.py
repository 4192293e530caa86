"""Priority end to end: real auth, a real worker on the tiny model, a router process.

A worker with two running slots is saturated by two long greedy streams; then a
high-priority stream (its key's role allows 5) preempts one of them and finishes
while both are still going, and the paused stream still ends with exactly the
tokens of an unpreempted run. A sheddable request is refused at once while the
worker is saturated (RESOURCE_EXHAUSTED with RetryInfo) and admitted when idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.common.interceptors import SERVICE_TOKEN_HEADER
from services.common.status import details_of
from tests.conftest import free_port
from tests.integration.router.conftest import (
    SERVICE_TOKEN,
    TOKENYARD,
    Launcher,
    Proc,
    User,
    base_env,
    bearer,
    bootstrap,
    make_user,
)
from tests.integration.stack.tiny_model import build_tiny_model

INTERNAL = ((SERVICE_TOKEN_HEADER, SERVICE_TOKEN),)
LONG = 400  # tokens of each low-priority stream: far more steps than the high one needs


@dataclass
class Stack:
    """The processes of the module, and the admin key."""

    auth: Proc
    worker: Proc
    router: Proc
    admin: str

    def user(self, max_priority: int | None = None) -> User:
        """A fresh user (and key) whose role caps priority at `max_priority` if given."""
        limits = res.Limits() if max_priority is None else res.Limits(max_priority=max_priority)
        return make_user(self.auth, self.admin, limits=limits)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Real auth, one real worker with two running slots, and a router; shared by the module."""
    tmp = tmp_path_factory.mktemp("priority-real")
    model = build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")
    launcher = Launcher(tmp)
    db = tmp / "auth.db"
    admin = bootstrap(db)
    try:
        auth = launcher.auth(db)
        port = free_port()
        args = [TOKENYARD, "inference", "serve", "--model", str(model), "--port", str(port)]
        args += ["--served-model-name", "tiny", "--device", "cpu", "--max-running", "2"]
        worker = launcher.spawn(
            "inference", args, port, base_env(TOKENYARD_INFERENCE_PORT=str(port))
        )
        launcher.wait_serving(worker, timeout=120)
        router = launcher.router(auth, [worker])
        yield Stack(auth, worker, router, admin)
    finally:
        launcher.close()


def greedy(tokens: int, prompt: str, priority: int = 0) -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model="tiny", prompt=prompt, priority=priority)
    req.sampling.max_tokens = tokens
    req.sampling.temperature = 0
    req.sampling.ignore_eos = True
    return req


async def tokens_of(call: grpc.aio.UnaryStreamCall) -> list[int]:  # type: ignore[type-arg]
    return [t async for m in call for t in m.token_ids]


async def test_high_priority_preempts_and_the_paused_stream_completes_identical(
    stack: Stack,
) -> None:
    worker, router = stack.worker, stack.router
    prompts = ["The quick brown fox", "Once upon a time"]
    async with grpc.aio.insecure_channel(worker.address) as channel:
        direct = gen_grpc.GenerationServiceStub(channel)
        expected = [
            await tokens_of(direct.StreamGenerate(greedy(LONG, p), metadata=INTERNAL))
            for p in prompts
        ]
    user = stack.user(max_priority=5)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        lows = [stub.StreamGenerate(greedy(LONG, p), metadata=bearer(user.key)) for p in prompts]
        got: list[list[int]] = [[], []]
        done = [asyncio.Event(), asyncio.Event()]

        async def drain(i: int) -> None:
            while (msg := await lows[i].read()) is not grpc.aio.EOF:
                got[i].extend(msg.token_ids)  # type: ignore[union-attr]
            done[i].set()

        # Both slots taken: each low stream has produced its first tokens.
        firsts = [await lows[i].read() for i in range(2)]
        for i, msg in enumerate(firsts):
            got[i].extend(msg.token_ids)  # type: ignore[union-attr]
        tasks = [asyncio.create_task(drain(i)) for i in range(2)]
        high = await tokens_of(
            stub.StreamGenerate(greedy(8, "Hello", priority=5), metadata=bearer(user.key))
        )
        assert len(high) == 8
        assert not any(d.is_set() for d in done)  # it did not wait for a slot to free
        await asyncio.gather(*tasks)
    assert got == expected  # paused and resumed: the same greedy tokens


async def test_sheddable_refused_when_saturated_and_admitted_when_idle(
    stack: Stack,
) -> None:
    router = stack.router
    user = stack.user()
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        idle = await tokens_of(stub.StreamGenerate(greedy(4, "Hi", -1), metadata=bearer(user.key)))
        assert len(idle) == 4
        busy = [
            stub.StreamGenerate(greedy(LONG, "Busy busy"), metadata=bearer(user.key))
            for _ in range(2)
        ]
        for call in busy:
            await call.read()  # running
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tokens_of(stub.StreamGenerate(greedy(4, "Hi", -1), metadata=bearer(user.key)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details_of(refused.value).retry_after is not None
        for call in busy:
            call.cancel()
