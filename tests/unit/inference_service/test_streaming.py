"""The response assembler on its own: engine events in, stream messages out."""

from __future__ import annotations

from typing import Any

import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.inference.engine.types import NO_TOKEN, TokenEvent
from services.inference.streaming import ResponseAssembler, collect
from tests.doubles.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def events(ids: list[int], finish: str | None = None, cached: int = 0) -> list[TokenEvent]:
    out = [
        TokenEvent(t, -0.5, ((t, -0.5),), None, cached if i == 0 else 0) for i, t in enumerate(ids)
    ]
    if finish is not None:
        last = out[-1] if out else None
        if last is None:
            out = [TokenEvent(NO_TOKEN, None, (), finish)]
        else:
            out[-1] = TokenEvent(last.token_id, last.logprob, last.top_logprobs, finish)
    return out


def assembler(tokenizer: Any, **kw: Any) -> ResponseAssembler:
    return ResponseAssembler(
        tokenizer=tokenizer, request_id="r1", model="m", prompt_ids=[5, 6, 7], **kw
    )


def test_cancelled_stream_ends_with_cancelled_and_releases_held_text(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello wor")
    asm = assembler(tokenizer, stops=["world"])
    first = asm.feed(events(ids, cached=2))
    assert first is not None
    assert first.text == "Hello "  # "wor" may start "world": held back
    last = asm.feed(events([], finish="cancelled"))
    assert last is not None
    assert last.finish_reason == gen.FINISH_REASON_CANCELLED
    assert last.text == "wor"
    assert last.usage.completion_tokens == len(ids)
    assert last.usage.prompt_tokens == 3
    assert last.usage.cached_prompt_tokens == 2


def test_events_after_a_stop_string_are_ignored(tokenizer: Any) -> None:
    ids = tokenizer.encode("The capital of France is Paris.")
    asm = assembler(tokenizer, stops=["capital"])
    message = asm.feed(events(ids))
    assert message is not None
    assert message.finish_reason == gen.FINISH_REASON_STOP_SEQUENCE
    assert message.text == "The "
    assert list(message.token_ids) == ids[:2]
    assert asm.stopped_by_string
    assert asm.feed(events(ids)) is None
    assert asm.totals.completion_tokens == 2


def test_logprobs_only_when_asked(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hi")
    plain = assembler(tokenizer).feed(events(ids, finish="length"))
    asked = assembler(tokenizer, logprobs=True).feed(events(ids, finish="length"))
    assert plain is not None and asked is not None
    assert not plain.logprobs
    assert [lp.token_id for lp in asked.logprobs] == ids
    assert asked.logprobs[0].top[0].logprob == pytest.approx(-0.5)


def test_continuation_ending_in_eos_finishes_at_once(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    asm = assembler(tokenizer, continuation_ids=[9, eos], eos_token_ids=frozenset({eos}))
    assert asm.finished
    final = asm.final()
    assert final.finish_reason == gen.FINISH_REASON_STOP
    assert final.usage.completion_tokens == 2
    ignoring = assembler(
        tokenizer, continuation_ids=[9, eos], eos_token_ids=frozenset({eos}), ignore_eos=True
    )
    assert not ignoring.finished


def test_collect_joins_messages(tokenizer: Any) -> None:
    ids = tokenizer.encode("Once upon a time")
    asm = assembler(tokenizer)
    parts = [asm.feed(events([t])) for t in ids[:-1]]
    parts.append(asm.feed(events([ids[-1]], finish="stop")))
    reply = collect("r1", "m", [p for p in parts if p is not None])
    assert reply.text == "Once upon a time"
    assert list(reply.token_ids) == ids
    assert reply.finish_reason == gen.FINISH_REASON_STOP
    assert reply.usage.completion_tokens == len(ids)
