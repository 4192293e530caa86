"""Item 12.9: a concurrency slot is settled whatever ends the request."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.router.core import RouterCore
from services.router.relay import Relay
from tests.doubles.fake_auth import principal
from tests.security import router_fixtures
from tests.security.router_fixtures import SecurityStack, bearer, drain, eventually, outcome
from tests.unit.router.conftest import MODEL

stack = router_fixtures.stack  # the fixture, on each limits backend

KEY = "ty_sk_slotleak00000000000000000001"


def stream(max_tokens: int) -> gen.StreamGenerateRequest:
    request = gen.StreamGenerateRequest(model=MODEL, prompt="hello")
    request.sampling.max_tokens = max_tokens
    return request


@pytest.mark.parametrize("where", ["count_tokens_raw", "_count_prompt"])
async def test_an_unexpected_error_while_settling_frees_the_slot(
    stack: SecurityStack, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Attack on availability: a stream cut before the worker reported usage makes the
    router count its prompt; an unexpected error there (not a domain error) skipped
    settlement, so the key's only concurrency slot leaked and every later request was
    refused. Settlement runs in `finally`: the next request is admitted."""
    await stack.add_worker(token_delay=0.05)
    stack.auth.state.add_key(KEY, principal("cred-leak", limits=res.Limits(concurrent_streams=1)))
    app = await stack.limited_router()
    client = stack.client(app)
    raised = asyncio.Event()

    async def broken(self: RouterCore, *args: object, **kwargs: object) -> Any:
        raised.set()
        raise RuntimeError("injected: not a domain error")

    monkeypatch.setattr(RouterCore, where, broken)
    call = client.StreamGenerate(stream(1000), metadata=bearer(KEY))
    await call.read()  # admitted and running
    call.cancel()  # cut before the worker's last message: the router counts the prompt
    await asyncio.wait_for(raised.wait(), 10)
    monkeypatch.undo()

    async def admitted() -> bool:
        code = await outcome(drain(client.StreamGenerate(stream(1), metadata=bearer(KEY))))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return bool(code == grpc.StatusCode.OK)

    await eventually(admitted)

    async def both_recorded() -> bool:  # the cut stream is still on the ledger
        return len(stack.auth.state.usage) == 2

    await eventually(both_recorded)


async def test_an_unexpected_error_in_the_relay_frees_the_slot(
    stack: SecurityStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error while relaying (INTERNAL to the caller) still settles: the
    slot is free for the next request at once."""
    await stack.add_worker()
    stack.auth.state.add_key(KEY, principal("cred-leak", limits=res.Limits(concurrent_streams=1)))
    app = await stack.limited_router()
    client = stack.client(app)

    async def broken(self: Relay, *args: object, **kwargs: object) -> None:
        raise RuntimeError("injected: not a domain error")

    monkeypatch.setattr(Relay, "run", broken)
    code = await outcome(drain(client.StreamGenerate(stream(1), metadata=bearer(KEY))))
    assert code == grpc.StatusCode.INTERNAL
    monkeypatch.undo()
    await app.core.drain_background()
    assert await outcome(drain(client.StreamGenerate(stream(1), metadata=bearer(KEY)))) == (
        grpc.StatusCode.OK
    )
