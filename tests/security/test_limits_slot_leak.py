"""Item 12.9: a concurrency slot is settled whatever ends the request."""

from __future__ import annotations

import grpc
import pytest
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.router.core import RouterCore
from services.router.testing.fake_auth import principal
from tests.security import router_fixtures
from tests.security.router_fixtures import SecurityStack, bearer, drain, eventually, outcome
from tests.unit.router.conftest import MODEL

stack = router_fixtures.stack  # the fixture, on each limits backend

KEY = "ty_sk_slotleak00000000000000000001"


def stream(max_tokens: int) -> gen.StreamGenerateRequest:
    request = gen.StreamGenerateRequest(model=MODEL, prompt="hello")
    request.sampling.max_tokens = max_tokens
    return request


async def test_an_unexpected_error_while_settling_frees_the_slot(
    stack: SecurityStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack on availability: a stream cut before the worker reported usage makes the
    router count its prompt; an unexpected error there (not a domain error) skipped
    settlement, so the key's only concurrency slot leaked and every later request was
    refused. Settlement runs in `finally`: the next request is admitted."""
    await stack.add_worker(token_delay=0.05)
    stack.auth.state.add_key(KEY, principal("cred-leak", limits=res.Limits(concurrent_streams=1)))
    app = await stack.limited_router()
    client = stack.client(app)

    async def broken(self: RouterCore, request: object, timeout: float) -> bytes:
        raise RuntimeError("injected: not a domain error")

    monkeypatch.setattr(RouterCore, "count_tokens_raw", broken)
    call = client.StreamGenerate(stream(1000), metadata=bearer(KEY))
    await call.read()  # admitted and running
    call.cancel()  # cut before the worker's last message: the router counts the prompt

    async def admitted() -> bool:
        code = await outcome(drain(client.StreamGenerate(stream(1), metadata=bearer(KEY))))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return bool(code == grpc.StatusCode.OK)

    await eventually(admitted)
    await app.core.drain_background()
    assert len(stack.auth.state.usage) >= 1  # the cut stream is still on the ledger
