"""OpenAI bodies to gRPC requests and back: every accepted field lands where it should."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument
from services.router.openai_api import convert
from services.router.openai_api.errors import from_validation
from services.router.openai_api.schemas import ChatCompletionRequest, CompletionRequest


def chat(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def test_chat_fields_map_to_the_grpc_request() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = chat(
        messages=[
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": parts},
            {"role": "assistant", "content": "ok"},
        ],
        max_tokens=9, max_completion_tokens=5, temperature=0.5, top_p=0.9, top_k=7, min_p=0.1,
        repetition_penalty=1.2, seed=3, stop="END", logprobs=True, top_logprobs=2,
        ignore_eos=True, stop_token_ids=[4], affinity_key="conv-1", user="alice", n=1,
        unknown_field={"ignored": True},
    )  # fmt: skip
    body.refuse_unsupported()
    request = convert.chat_request(body, "rid")
    assert [(m.role, m.content) for m in request.messages.messages] == [
        ("system", "rules"),
        ("user", "a\nb"),
        ("assistant", "ok"),
    ]
    s = request.sampling
    assert s.max_tokens == 5  # max_completion_tokens wins over the deprecated max_tokens
    assert (s.temperature, s.top_k, s.seed, list(s.stop)) == (0.5, 7, 3, ["END"])
    assert s.top_p == pytest.approx(0.9) and s.min_p == pytest.approx(0.1)
    assert s.repetition_penalty == pytest.approx(1.2)
    assert s.ignore_eos and list(s.stop_token_ids) == [4]
    assert request.logprobs == 2 and request.affinity_key == "conv-1"
    assert request.request_id == "rid" and request.model == "m"


def test_unset_fields_stay_unset_for_the_worker_defaults() -> None:
    request = convert.chat_request(chat(), "rid")
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"):
        assert not request.sampling.HasField(name), name
    assert not request.HasField("logprobs")


def test_completion_prompts_text_ids_and_one_element_batches() -> None:
    def grpc_of(prompt: object) -> gen.StreamGenerateRequest:
        body = CompletionRequest.model_validate({"model": "m", "prompt": prompt, "logprobs": 0})
        return convert.completion_request(body, "r")

    assert grpc_of("hello").prompt == "hello"
    assert grpc_of(["hello"]).prompt == "hello"
    assert list(grpc_of([1, 2, 3]).token_ids.ids) == [1, 2, 3]
    assert list(grpc_of([[5, 6]]).token_ids.ids) == [5, 6]
    assert grpc_of("x").HasField("logprobs") and grpc_of("x").logprobs == 0
    with pytest.raises(InvalidArgument) as info:
        grpc_of(["a", "b"])
    assert info.value.field == "prompt"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 0}, "n"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_features_the_contract_lacks_are_refused_by_name(
    fields: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        chat(**fields).refuse_unsupported()
    assert info.value.field == param


def test_what_openai_sends_by_default_is_accepted() -> None:
    chat(
        n=1, frequency_penalty=0, presence_penalty=0, logit_bias={}, tools=[],
        tool_choice="none", response_format={"type": "text"}, priority=0,
    ).refuse_unsupported()  # fmt: skip


def test_completion_only_refusals() -> None:
    for fields, param in (({"echo": True}, "echo"), ({"best_of": 2}, "best_of")):
        body = CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})
        with pytest.raises(InvalidArgument) as info:
            body.refuse_unsupported()
        assert info.value.field == param


def test_validation_errors_name_the_field_as_openai_does() -> None:
    def param(body: object) -> str | None:
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate(body)
        return from_validation(info.value).field

    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert param({**base, "temperature": "hot"}) == "temperature"
    assert param({**base, "seed": -1}) == "seed"
    assert param({**base, "max_tokens": 2**31}) == "max_tokens"
    assert param({"messages": base["messages"]}) == "model"
    assert param({**base, "messages": [{"content": "x"}]}) == "messages[0].role"
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(b"{not json")
    assert from_validation(info.value).field == "body"


def test_grpc_field_names_become_openai_params() -> None:
    body = chat(max_completion_tokens=3)
    assert convert.param_of("sampling.max_tokens", body) == "max_completion_tokens"
    assert convert.param_of("sampling.max_tokens", chat(max_tokens=3)) == "max_tokens"
    assert convert.param_of("sampling.top_p", body) == "top_p"
    assert convert.param_of("input", body) == "messages"
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "p"})
    assert convert.param_of("prompt", completion) == "prompt"
    assert convert.param_of("model", completion) == "model"
    assert convert.param_of(None, completion) is None


def test_the_shared_rules_field_names_become_openai_params() -> None:
    completion = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]})
    assert convert.param_of("token_ids.ids", completion) == "prompt"
    assert convert.param_of("token_ids.ids[1]", completion) == "prompt"
    assert convert.param_of("logprobs", completion) == "logprobs"
    assert convert.param_of("logprobs", chat(logprobs=True)) == "top_logprobs"
    assert convert.param_of("messages.messages[0].role", chat()) == "messages"


def test_finish_reasons_are_never_empty() -> None:
    assert convert.finish_reason(gen.FINISH_REASON_STOP) == "stop"
    assert convert.finish_reason(gen.FINISH_REASON_STOP_SEQUENCE) == "stop"
    assert convert.finish_reason(gen.FINISH_REASON_LENGTH) == "length"
    assert convert.finish_reason(gen.FINISH_REASON_CANCELLED) == "stop"


def test_logprobs_name_a_token_by_its_text_only_when_the_message_holds_one() -> None:
    one = gen.StreamGenerateResponse(text="Hi", token_ids=[7])
    lp = one.logprobs.add(token_id=7, logprob=-0.5)
    lp.top.add(token_id=7, logprob=-0.5)
    lp.top.add(token_id=9, logprob=-1.5)
    [entry] = convert.chat_logprobs(one)
    assert entry["token"] == "Hi" and entry["bytes"] == [72, 105]
    assert [t["token"] for t in entry["top_logprobs"]] == ["Hi", "token_id:9"]

    two = gen.StreamGenerateResponse(text="ab", token_ids=[1, 2])
    two.logprobs.add(token_id=1, logprob=-1.0)
    two.logprobs.add(token_id=2, logprob=-2.0)
    legacy = convert.completion_logprobs(two, offset=10)
    assert legacy["tokens"] == ["token_id:1", "token_id:2"]
    assert legacy["token_logprobs"] == [-1.0, -2.0] and legacy["text_offset"] == [10, 10]


@pytest.mark.parametrize(
    ("given", "field", "value"),
    [
        ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "integer"}}},
         "json_schema", '{"type": "integer"}'),
        ({"type": "json_object"}, "json_object", True),
        ({"type": "regex", "regex": "[0-9]+"}, "regex", "[0-9]+"),
        ({"type": "grammar", "grammar": 'start: "a"'}, "grammar", 'start: "a"'),
    ],
)  # fmt: skip
def test_response_format_maps_onto_the_grpc_field(
    given: dict[str, object], field: str, value: object
) -> None:
    for body in (
        chat(response_format=given),
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "response_format": given}),
    ):
        body.refuse_unsupported()
        request = (
            convert.chat_request(body, "r")
            if isinstance(body, ChatCompletionRequest)
            else convert.completion_request(body, "r")
        )
        assert request.response_format.WhichOneof("format") == field
        assert getattr(request.response_format, field) == value
    assert not convert.chat_request(chat(response_format={"type": "text"}), "r").HasField(
        "response_format"
    )


def test_an_incomplete_response_format_names_it() -> None:
    for given in ({"type": "json_schema"}, {"type": "regex"}):
        with pytest.raises(InvalidArgument) as info:
            convert.chat_request(chat(response_format=given), "r")
        assert info.value.field == "response_format"
    assert convert.param_of("response_format.json_schema", None) == "response_format"
