"""`priority` from the Python client and `tokenyard generate --priority`, on a real tiny worker.

A worker with one slot, taken by a long stream, refuses a sheddable request
(negative priority) at once; the same request runs on the idle worker. That the
refusal happens shows the priority reached the worker from each door.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from services.cli import build_parser
from services.client import Client, Sampling, TokenyardCallError
from services.stack.terminal import Options, generate
from tests.unit.inference_service.harness import MODEL, serving

pytestmark = pytest.mark.timeout(60)
SHORT = Sampling(max_tokens=4, temperature=0.0, ignore_eos=True)
LONG = Sampling(max_tokens=400, temperature=0.0, ignore_eos=True)


@asynccontextmanager
async def saturated(client: Client) -> AsyncIterator[None]:
    """The worker's only slot taken by a long stream (its first token arrived)."""
    stream = client.stream_events("busy", model=MODEL, sampling=LONG)
    await anext(stream)
    try:
        yield
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_client_sheddable_runs_when_idle_and_is_refused_when_saturated() -> None:
    async with serving(max_running=1) as w, Client(f"127.0.0.1:{w.app.port}", "unused") as client:
        idle = await client.generate("a b", model=MODEL, sampling=SHORT, priority=-1)
        assert idle.usage is not None and idle.usage.completion_tokens == 4
        async with saturated(client):
            with pytest.raises(TokenyardCallError) as refused:
                await client.generate("a b", model=MODEL, sampling=SHORT, priority=-1)
            assert refused.value.reason == "SHED" and refused.value.retry_after is not None
            with pytest.raises(TokenyardCallError):
                async for _ in client.stream_events("a b", model=MODEL, sampling=SHORT,
                                                    priority=-3):  # fmt: skip
                    pass


async def test_tokenyard_generate_priority_reaches_the_worker() -> None:
    args = build_parser().parse_args(["generate", "a b", "--raw", "--priority", "-1"])
    assert args.priority == -1
    assert build_parser().parse_args(["generate", "a b"]).priority == 0
    async with serving(max_running=1) as w, Client(f"127.0.0.1:{w.app.port}", "unused") as client:
        options = Options(
            address=f"127.0.0.1:{w.app.port}",
            api_key="unused",
            model=MODEL,
            sampling=SHORT,
            raw=True,
            priority=-1,
        )
        out, err = io.StringIO(), io.StringIO()
        assert await generate(options, "a b", out, err) == 0
        async with saturated(client):
            out, err = io.StringIO(), io.StringIO()
            assert await generate(options, "a b", out, err) == 1
            assert "RESOURCE_EXHAUSTED" in err.getvalue(), err.getvalue()
