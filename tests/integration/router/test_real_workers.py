"""The router in front of real inference workers (`tokenyard inference serve`, tiny model)."""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc
from tokenyard.inference.v1 import worker_service_pb2 as wrk
from tokenyard.inference.v1 import worker_service_pb2_grpc as wrk_grpc

from services.common.interceptors import SERVICE_TOKEN_HEADER
from services.router.policies import Candidate, affinity_key
from tests.conftest import free_port
from tests.integration.router.conftest import (
    SERVICE_TOKEN,
    TOKENYARD,
    Launcher,
    Proc,
    base_env,
    bearer,
    bootstrap,
    make_user,
)
from tests.integration.stack.tiny_model import build_tiny_model

INTERNAL = ((SERVICE_TOKEN_HEADER, SERVICE_TOKEN),)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Launcher, Proc, str, Path]]:
    """Real auth and the tiny model folder, shared by the module."""
    tmp = tmp_path_factory.mktemp("router-real")
    model = build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")
    launcher = Launcher(tmp)
    db = tmp / "auth.db"
    admin = bootstrap(db)
    auth = launcher.auth(db)
    try:
        yield launcher, auth, admin, model
    finally:
        launcher.close()


def real_worker(launcher: Launcher, model: Path) -> Proc:
    port = free_port()
    args = [TOKENYARD, "inference", "serve", "--model", str(model), "--port", str(port)]
    args += ["--served-model-name", "tiny", "--device", "cpu"]
    env = base_env(TOKENYARD_INFERENCE_PORT=str(port))
    return launcher.spawn("inference", args, port, env)


def greedy(tokens: int, prompt: str = "The quick brown fox") -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model="tiny", prompt=prompt)
    req.sampling.max_tokens = tokens
    req.sampling.temperature = 0
    req.sampling.ignore_eos = True
    req.affinity_key = "resume-test"
    return req


async def tokens_of(call: grpc.aio.UnaryStreamCall) -> list[int]:  # type: ignore[type-arg]
    return [t async for m in call for t in m.token_ids]


def failovers(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tokenyard_router_failovers_total") and "mid_stream" in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_killed_real_worker_is_resumed_with_identical_greedy_output(
    stack: tuple[Launcher, Proc, str, Path], launcher: Launcher
) -> None:
    _, auth, admin, model = stack
    user = make_user(auth, admin)
    workers = [real_worker(launcher, model) for _ in range(2)]
    for w in workers:
        launcher.wait_serving(w, timeout=120)
    metrics_port = free_port()
    router = launcher.router(
        auth,
        workers,
        TOKENYARD_ROUTER_POLICY="affinity_key",
        TOKENYARD_ROUTER_METRICS_PORT=str(metrics_port),
    )
    ids = {}
    for w in workers:
        async with grpc.aio.insecure_channel(w.address) as channel:
            described = await wrk_grpc.WorkerServiceStub(channel).Describe(
                wrk.DescribeRequest(), metadata=INTERNAL
            )
            ids[described.worker_id] = w
    first = affinity_key([Candidate(i) for i in ids], "resume-test")[0].worker_id
    doomed, survivor = ids[first], next(w for i, w in ids.items() if i != first)
    request = greedy(440)

    # The reference: the whole generation on one worker, uninterrupted.
    async with grpc.aio.insecure_channel(survivor.address) as channel:
        direct = gen_grpc.GenerationServiceStub(channel)
        expected = await tokens_of(direct.StreamGenerate(request, metadata=INTERNAL))
    assert len(expected) == 440

    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        short = await tokens_of(stub.StreamGenerate(greedy(12), metadata=bearer(user.key)))
        assert short == expected[:12]  # through the router: the same greedy tokens
        call = stub.StreamGenerate(request, metadata=bearer(user.key))
        got: list[int] = []
        async for msg in call:
            if not got:
                doomed.signal(signal.SIGKILL)
            got.extend(msg.token_ids)
    assert got == expected
    assert failovers(metrics_port) >= 1  # the stream really moved mid-way
