"""Generation through real gRPC against a worker on a tiny model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen

from tests.doubles.tiny_model import build_tokenizer
from tests.unit.inference_service.harness import (
    MODEL,
    as_generate,
    request,
    scripted_model,
    serving,
    stream_all,
)

SCRIPT = "The capital of France is Paris."
UNICODE_SCRIPT = "你好猫🙂 café!"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def greedy(max_tokens: int, **sampling: Any) -> gen.SamplingParams:
    return gen.SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)


async def test_stream_deltas_concatenate_to_generate_text() -> None:
    async with serving() as w:
        req = request(prompt="Once upon a time", sampling=greedy(40, ignore_eos=True))
        messages = await stream_all(w.gen, req)
        unary = await w.gen.Generate(as_generate(req))
    assert len(messages) > 1
    assert "".join(m.text for m in messages) == unary.text
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert all(m.finish_reason == gen.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert not any(m.HasField("usage") for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == gen.FINISH_REASON_LENGTH == unary.finish_reason
    assert last.usage.completion_tokens == 40 == len(unary.token_ids)
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens > 0
    assert {m.model for m in messages} == {MODEL}


async def test_request_id_is_echoed_or_generated() -> None:
    async with serving() as w:
        mine = await stream_all(w.gen, request(prompt="hi", request_id="abc-1", sampling=greedy(3)))
        theirs = await w.gen.Generate(gen.GenerateRequest(model=MODEL, prompt="hi"))
    assert {m.request_id for m in mine} == {"abc-1"}
    assert len(theirs.request_id) >= 16


async def test_seeded_sampling_repeats() -> None:
    async with serving() as w:
        sampling = gen.SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7)
        one = await w.gen.Generate(gen.GenerateRequest(model=MODEL, prompt="a", sampling=sampling))
        two = await w.gen.Generate(gen.GenerateRequest(model=MODEL, prompt="a", sampling=sampling))
    assert one.token_ids == two.token_ids


async def test_eos_ends_with_stop_and_exact_text(tokenizer: Any) -> None:
    script = scripted_model(tokenizer, SCRIPT)
    async with serving(script.loaded) as w:
        req = request(token_ids=gen.TokenIds(ids=[script.start_id]), sampling=greedy(100))
        messages = await stream_all(w.gen, req)
    assert "".join(m.text for m in messages) == SCRIPT
    assert messages[-1].finish_reason == gen.FINISH_REASON_STOP
    # The EOS token is reported (and counted) but adds no text.
    assert messages[-1].usage.completion_tokens == len(script.token_ids) + 1
    assert messages[-1].usage.prompt_tokens == 1


async def test_chinese_and_emoji_never_split(tokenizer: Any) -> None:
    script = scripted_model(tokenizer, UNICODE_SCRIPT)
    assert len(script.token_ids) > len(UNICODE_SCRIPT)  # characters do span tokens
    async with serving(script.loaded) as w:
        req = request(token_ids=gen.TokenIds(ids=[script.start_id]), sampling=greedy(100))
        messages = await stream_all(w.gen, req)
    deltas = [m.text for m in messages]
    assert "".join(deltas) == UNICODE_SCRIPT
    assert not any("\ufffd" in d for d in deltas)
    # However tokens are grouped into messages (that depends on timing), the text so
    # far never runs ahead of the complete characters of the tokens so far: a
    # partial character waits for the rest of its tokens.
    ids: list[int] = []
    text = ""
    for m in messages:
        ids += list(m.token_ids)
        text += m.text
        assert tokenizer.decode(ids).rstrip("\ufffd").startswith(text)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("e is P", "The capital of Franc"),  # spans " France", " is", " ", "Par"
        ("Paris", "The capital of France is "),  # spans "Par" + "is"
        ("capital", "The "),
        ("zzz", SCRIPT),  # never produced: everything, held text released at the end
        ("s.", "The capital of France is Pari"),  # "is" + "." after a false start
    ],
)
async def test_stop_strings_across_token_boundaries(
    tokenizer: Any, stop: str, expected: str
) -> None:
    script = scripted_model(tokenizer, SCRIPT)
    async with serving(script.loaded) as w:
        req = request(
            token_ids=gen.TokenIds(ids=[script.start_id]), sampling=greedy(100, stop=[stop])
        )
        messages = await stream_all(w.gen, req)
        unary = await w.gen.Generate(as_generate(req))
    deltas = [m.text for m in messages]
    assert "".join(deltas) == expected == unary.text
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert stop not in emitted
    reason = gen.FINISH_REASON_STOP if stop == "zzz" else gen.FINISH_REASON_STOP_SEQUENCE
    assert messages[-1].finish_reason == reason == unary.finish_reason
    assert messages[-1].usage.completion_tokens == len(unary.token_ids)


async def test_stop_token_id_ends_generation(tokenizer: Any) -> None:
    script = scripted_model(tokenizer, SCRIPT)
    stop_id = script.token_ids[3]  # " France"
    async with serving(script.loaded) as w:
        req = request(
            token_ids=gen.TokenIds(ids=[script.start_id]),
            sampling=greedy(100, stop_token_ids=[stop_id]),
        )
        reply = await w.gen.Generate(as_generate(req))
    assert list(reply.token_ids) == script.token_ids[:4]
    assert reply.finish_reason == gen.FINISH_REASON_STOP


async def test_continuation_resumes_without_repeating_text(tokenizer: Any) -> None:
    script = scripted_model(tokenizer, UNICODE_SCRIPT)
    prompt = gen.TokenIds(ids=[script.start_id])
    # A cut inside the emoji: the first attempt cannot have sent that character yet.
    cut = next(
        i
        for i in range(1, len(script.token_ids))
        if "猫" in (text := tokenizer.decode(script.token_ids[:i])) and text.endswith("\ufffd")
    )
    async with serving(script.loaded) as w:
        full = await w.gen.Generate(
            gen.GenerateRequest(model=MODEL, token_ids=prompt, sampling=greedy(100))
        )
        # The first attempt dies mid-stream (as a crashed worker would) after `cut` tokens.
        sent_text, sent_ids = "", []
        call = w.gen.StreamGenerate(request(token_ids=prompt, sampling=greedy(100)))
        async for message in call:
            sent_text += message.text
            sent_ids += list(message.token_ids)
            if len(sent_ids) >= cut:
                break
        call.cancel()
        resumed = await stream_all(
            w.gen,
            request(token_ids=prompt, continuation_token_ids=sent_ids, sampling=greedy(100)),
        )
    assert "\ufffd" not in sent_text
    assert sent_text + "".join(m.text for m in resumed) == full.text == UNICODE_SCRIPT
    new_ids = [t for m in resumed for t in m.token_ids]
    assert sent_ids + new_ids == list(full.token_ids)
    # completion_tokens counts the whole request's tokens, continuation included.
    assert resumed[-1].usage.completion_tokens == full.usage.completion_tokens


async def test_continuation_holding_a_stop_string_ends_at_once(tokenizer: Any) -> None:
    script = scripted_model(tokenizer, SCRIPT)
    async with serving(script.loaded) as w:
        messages = await stream_all(
            w.gen,
            request(
                token_ids=gen.TokenIds(ids=[script.start_id]),
                continuation_token_ids=script.token_ids[:4],
                sampling=greedy(100, stop=["capital"]),
            ),
        )
    assert len(messages) == 1
    assert messages[0].finish_reason == gen.FINISH_REASON_STOP_SEQUENCE
    assert messages[0].text == "" and not messages[0].token_ids


async def test_logprobs_per_token() -> None:
    async with serving() as w:
        reply = await w.gen.Generate(
            gen.GenerateRequest(model=MODEL, prompt="abc", sampling=greedy(5), logprobs=3)
        )
        plain = await w.gen.Generate(
            gen.GenerateRequest(model=MODEL, prompt="abc", sampling=greedy(5))
        )
    assert [lp.token_id for lp in reply.logprobs] == list(reply.token_ids)
    for lp in reply.logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        # Greedy: the chosen token is the most likely one.
        assert lp.top[0].token_id == lp.token_id
    assert not plain.logprobs


async def test_chat_messages_use_the_chat_template(tokenizer: Any) -> None:
    chat = gen.ChatMessages(messages=[gen.ChatMessage(role="user", content="hi")])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    async with serving() as w:
        count = await w.gen.CountTokens(gen.CountTokensRequest(model=MODEL, messages=chat))
        reply = await w.gen.Generate(
            gen.GenerateRequest(model=MODEL, messages=chat, sampling=greedy(3))
        )
    expected = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert count.token_count == expected == reply.usage.prompt_tokens
    assert count.context_length == 512


async def test_prefix_cache_reports_cached_prompt_tokens() -> None:
    prompt = "Continuous batching lets requests join and leave between decode steps. " * 3
    async with serving() as w:
        first = await w.gen.Generate(
            gen.GenerateRequest(model=MODEL, prompt=prompt, sampling=greedy(2))
        )
        second = await w.gen.Generate(
            gen.GenerateRequest(model=MODEL, prompt=prompt, sampling=greedy(2))
        )
    assert first.usage.cached_prompt_tokens == 0
    assert 0 < second.usage.cached_prompt_tokens < second.usage.prompt_tokens


async def test_list_models_and_count_tokens() -> None:
    async with serving(served_model_name="house-model") as w:
        models = await w.gen.ListModels(gen.ListModelsRequest())
        count = await w.gen.CountTokens(
            gen.CountTokensRequest(model="house-model", token_ids=gen.TokenIds(ids=[1, 2, 3]))
        )
    assert [m.name for m in models.models] == ["house-model"]
    assert models.models[0].context_length == 512
    assert models.models[0].max_running == 4
    assert models.models[0].workers == 1
    assert count.token_count == 3


async def test_concurrent_requests_get_their_own_tokens() -> None:
    prompts = [f"request number {i}: " + "ab" * i for i in range(8)]
    chat = [gen.ChatMessages(messages=[gen.ChatMessage(role="user", content=p)]) for p in prompts]
    async with serving(max_running=4, max_queued=8) as w:
        alone = [
            await w.gen.Generate(gen.GenerateRequest(model=MODEL, messages=c, sampling=greedy(12)))
            for c in chat
        ]
        together = await asyncio.gather(
            *(
                stream_all(w.gen, request(messages=c, sampling=greedy(12), request_id=f"r{i}"))
                for i, c in enumerate(chat)
            )
        )
    for i, (one, many) in enumerate(zip(alone, together, strict=True)):
        assert {m.request_id for m in many} == {f"r{i}"}
        assert [t for m in many for t in m.token_ids] == list(one.token_ids)
        assert "".join(m.text for m in many) == one.text
