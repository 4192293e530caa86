from __future__ import annotations

from tokenyard.generation.v1 import generation_service_pb2 as gen

from tests.doubles.fake_worker import expected_token
from tests.unit.router.conftest import MODEL, Stack, bearer


async def test_stream_relays_tokens(stack: Stack) -> None:
    await stack.add_worker()
    await stack.add_worker()
    app = await stack.router()
    client = stack.client(app)
    req = gen.StreamGenerateRequest(model=MODEL, prompt="hello world")
    req.sampling.max_tokens = 5
    got = []
    last = None
    async for msg in client.StreamGenerate(req, metadata=bearer()):
        got.extend(msg.token_ids)
        last = msg
    assert got == [expected_token(req, i) for i in range(5)]
    assert last is not None and last.finish_reason == gen.FINISH_REASON_LENGTH
