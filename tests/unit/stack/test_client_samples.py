"""`n` from the Python client and `tokenyard generate --n`, against a real tiny worker."""

from __future__ import annotations

import io

import pytest

from services.cli import build_parser
from services.client import Client, Sampling
from services.stack.terminal import Options, generate
from tests.unit.inference_service.harness import MODEL, serving

pytestmark = pytest.mark.timeout(60)
SAMPLED = Sampling(max_tokens=5, temperature=1.0, top_k=50, ignore_eos=True, seed=11)


async def test_client_generate_and_stream_with_n() -> None:
    async with serving() as w, Client(f"127.0.0.1:{w.app.port}", "unused") as client:
        whole = await client.generate("a b", model=MODEL, sampling=SAMPLED, n=2)
        events = [e async for e in client.stream_events("a b", model=MODEL, sampling=SAMPLED, n=2)]
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].text == whole.text and whole.choices[0].text != whole.choices[1].text
    assert [c.finish_reason for c in whole.choices] == ["LENGTH", "LENGTH"]
    assert whole.usage is not None and whole.usage.completion_tokens == 10
    streamed = {i: tuple(t for e in events if e.index == i for t in e.token_ids) for i in (0, 1)}
    assert streamed == {c.index: c.token_ids for c in whole.choices}
    assert [e.usage is not None for e in events].count(True) == 1


async def test_tokenyard_generate_n_prints_each_sample() -> None:
    args = build_parser().parse_args(["generate", "a b", "--raw", "--n", "2", "--seed", "11"])
    assert args.n == 2
    async with serving() as w, Client(f"127.0.0.1:{w.app.port}", "unused") as client:
        whole = await client.generate("a b", model=MODEL, sampling=SAMPLED, n=2)
        out, err = io.StringIO(), io.StringIO()
        options = Options(
            address=f"127.0.0.1:{w.app.port}",
            api_key="unused",
            model=MODEL,
            sampling=SAMPLED,
            raw=True,
            n=2,
        )
        assert await generate(options, "a b", out, err) == 0
    expected = "".join(f"--- sample {c.index} (LENGTH) ---\n{c.text}\n" for c in whole.choices)
    assert out.getvalue() == expected
    assert "completion 10 tokens" in err.getvalue()
