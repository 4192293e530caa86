"""Item 12.8: the usage ledger equals the usage the client was shown, failover included.

Real processes: auth on SQLite, two fake-engine workers (the real worker gRPC
layer and usage accounting over a fake engine) and the router; the ledger is
auth's GetUsage. Every log is scanned for secrets when the stack stops.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from tests.integration.router.conftest import bearer
from tests.reliability.conftest import MODEL, Proc, kill, load_of, stack_for
from tests.reliability.fake_engine_worker import expected_text, fake_token
from tests.reliability.streams import usage_after


async def ledger_after(
    auth: Proc, admin: str, user_id: str, requests: int
) -> usage_pb.GetUsageResponse:
    """Auth's totals for the user once `requests` records arrived, and no more."""
    reply = await usage_after(auth, admin, user_id, requests)
    assert reply.total_requests == requests
    return reply


def request(prompt: str, max_tokens: int) -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model=MODEL, prompt=prompt)
    req.sampling.max_tokens = max_tokens
    return req


async def shown(
    call: grpc.aio.UnaryStreamCall, on_token: object = None
) -> tuple[int, gen.Usage, int]:
    """(finish reason, usage on the last message, tokens received) of a stream."""
    finish, usage, tokens = 0, gen.Usage(), 0
    async for msg in call:
        tokens += len(msg.token_ids)
        if callable(on_token):
            await on_token(tokens)
        if msg.finish_reason:
            finish = msg.finish_reason
            usage.CopyFrom(msg.usage)
    return finish, usage, tokens


async def test_the_ledger_equals_the_usage_shown_for_every_finish_reason(tmp_path: Path) -> None:
    """Attack: usage the client is shown and usage billed came from different counts
    (smuggled continuation ids: shown 4 + 1,004, billed 8). For a stream ending by
    length, stop sequence, a unary call, and a stream whose worker died
    mid-way and was resumed elsewhere, auth's ledger records exactly what the client
    was shown."""
    with stack_for(tmp_path) as stack:
        pending = [stack.engine_worker(delay=0.03, wait=False) for _ in range(2)]
        url = f"sqlite:///{tmp_path / 'auth.db'}"
        admin = stack.bootstrap(url)
        auth = stack.auth_url(url)
        workers = [stack.wait_serving(w) for w in pending]
        user = stack.user(auth, admin)
        router = stack.start_router(auth, workers)
        md = bearer(user.key)
        billed: list[tuple[str, int, int]] = []
        seen: list[tuple[str, int, int]] = []

        async def check(case: str, usage: gen.Usage) -> None:
            seen.append((case, usage.prompt_tokens, usage.completion_tokens))
            ledger = await ledger_after(auth, admin, user.user_id, len(seen))
            before = (sum(p for _, p, _ in billed), sum(c for _, _, c in billed))
            billed.append(
                (
                    case,
                    ledger.total_prompt_tokens - before[0],
                    ledger.total_completion_tokens - before[1],
                )
            )
            assert billed[-1] == seen[-1]

        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            finish, usage, tokens = await shown(
                stub.StreamGenerate(request("by length", 6), metadata=md)
            )
            assert (finish, usage.completion_tokens, tokens) == (gen.FINISH_REASON_LENGTH, 6, 6)
            await check("length", usage)

            text = expected_text("by stop string", 12)
            req = request("by stop string", 12)
            req.sampling.stop.append(text[4:6])
            finish, usage, tokens = await shown(stub.StreamGenerate(req, metadata=md))
            assert finish == gen.FINISH_REASON_STOP_SEQUENCE
            assert usage.completion_tokens == tokens
            await check("stop sequence", usage)

            stop_at = fake_token(list(b"by stop token"), 3)  # positions 0-2 differ from it
            req = request("by stop token", 12)
            req.sampling.stop_token_ids.append(stop_at)
            finish, usage, tokens = await shown(stub.StreamGenerate(req, metadata=md))
            assert (finish, usage.completion_tokens, tokens) == (gen.FINISH_REASON_STOP, 4, 4)
            await check("stop token", usage)

            unary = gen.GenerateRequest(model=MODEL, prompt="unary call")
            unary.sampling.max_tokens = 5
            reply = await stub.Generate(unary, metadata=md)
            assert reply.usage.completion_tokens == len(reply.token_ids) == 5
            await check("unary", reply.usage)

            killed: list[Proc] = []

            async def kill_the_busy_worker(received: int) -> None:
                if received >= 5 and not killed:
                    busy = [w for w in workers if (await asyncio.to_thread(load_of, w)).running]
                    assert len(busy) == 1
                    kill(busy[0])
                    killed.append(busy[0])

            call = stub.StreamGenerate(request("resumed elsewhere", 40), metadata=md)
            finish, usage, tokens = await shown(call, kill_the_busy_worker)
            assert killed, "no worker was killed mid-stream"
            assert (finish, usage.completion_tokens, tokens) == (gen.FINISH_REASON_LENGTH, 40, 40)
            await check("failover", usage)
