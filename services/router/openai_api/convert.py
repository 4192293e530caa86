"""OpenAI bodies to gRPC generation requests, and gRPC stream messages to OpenAI JSON.

The HTTP API is a view of `GenerationService`: every accepted field becomes a
field of `StreamGenerateRequest`, and every reply is built from the same stream
messages a gRPC client receives.
"""

from __future__ import annotations

import json
from typing import Any

from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument
from services.router.openai_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

FINISH: dict[int, str] = {
    gen.FINISH_REASON_STOP: "stop",
    gen.FINISH_REASON_STOP_SEQUENCE: "stop",
    gen.FINISH_REASON_LENGTH: "length",
}

Body = ChatCompletionRequest | CompletionRequest


def finish_reason(value: int) -> str:
    """OpenAI's finish_reason for a gRPC one: never empty ("stop" for a cancel)."""
    return FINISH.get(int(value), "stop")


def chat_request(body: ChatCompletionRequest, request_id: str) -> gen.StreamGenerateRequest:
    """The gRPC request of a chat completion."""
    request = gen.StreamGenerateRequest(model=body.model, request_id=request_id)
    for i, message in enumerate(body.messages):
        role = ROLES.get(message.role)
        if role is None:
            raise InvalidArgument(
                f"messages[{i}].role", "must be system, developer, user or assistant"
            )
        request.messages.messages.append(
            gen.ChatMessage(role=role, content=_content(message.content, i))
        )
    _sampling(body, request, body.max_completion_tokens or body.max_tokens)
    if body.logprobs:
        request.logprobs = body.top_logprobs or 0
    return request


def _content(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise InvalidArgument(f"messages[{index}].content", "must be set")
    texts = []
    for part in content:
        text = part.get("text")
        if part.get("type") != "text" or not isinstance(text, str):
            raise InvalidArgument(f"messages[{index}].content", "only text parts are supported")
        texts.append(text)
    return "\n".join(texts)


def completion_request(body: CompletionRequest, request_id: str) -> gen.StreamGenerateRequest:
    """The gRPC request of a text completion (prompt text or token ids)."""
    request = gen.StreamGenerateRequest(model=body.model, request_id=request_id)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
        if len(prompt) != 1:
            raise InvalidArgument("prompt", "one prompt per request (no batches)")
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.token_ids.ids.extend(prompt)  # type: ignore[arg-type]
    _sampling(body, request, body.max_tokens)
    if body.logprobs is not None:
        request.logprobs = body.logprobs
    return request


def _sampling(body: Body, request: gen.StreamGenerateRequest, max_tokens: int | None) -> None:
    s = request.sampling
    if max_tokens is not None:
        s.max_tokens = max_tokens
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(body, name)
        if value is not None:
            setattr(s, name, value)
    if body.ignore_eos is not None:
        s.ignore_eos = body.ignore_eos
    s.stop.extend(body.stop_list())
    s.stop_token_ids.extend(body.stop_token_ids or ())
    if body.n is not None:
        request.n = body.n
    if body.affinity_key:
        request.affinity_key = body.affinity_key
    if body.user:
        request.end_user = body.user
    if body.cache is not None:
        request.cache = _CACHE_MODES[body.cache]
    if body.priority is not None:
        request.priority = body.priority  # the router checks its range and the key's cap
    _response_format(body.response_format, request)


_CACHE_MODES = {
    "default": gen.CACHE_MODE_DEFAULT,
    "bypass": gen.CACHE_MODE_BYPASS,
    "refresh": gen.CACHE_MODE_REFRESH,
}


def _response_format(given: ResponseFormat | None, request: gen.StreamGenerateRequest) -> None:
    """OpenAI's `response_format` onto the gRPC field; the router checks the format."""
    if given is None or given.type == "text":
        return
    out = request.response_format
    if given.type == "json_object":
        out.json_object = True
    elif given.type == "json_schema":
        if given.json_schema is None:
            raise InvalidArgument("response_format", "json_schema needs a json_schema object")
        schema = given.json_schema.schema_
        if isinstance(schema, bool):
            raise InvalidArgument("response_format", "json_schema.schema must be an object")
        out.json_schema = json.dumps(schema)
    else:
        text = given.regex if given.type == "regex" else given.grammar
        if not text:
            raise InvalidArgument("response_format", f"type {given.type} needs its {given.type}")
        setattr(out, given.type, text)


def param_of(field: str | None, body: Body | None) -> str | None:
    """The OpenAI parameter a gRPC field name stands for (errors name it)."""
    if field is None:
        return None
    if field.startswith("sampling."):
        name = field.removeprefix("sampling.")
        if name == "max_tokens" and isinstance(body, ChatCompletionRequest):
            return "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        return name
    if field in ("input", "prompt") or field.startswith(("messages", "token_ids")):
        return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if field == "logprobs" and isinstance(body, ChatCompletionRequest):
        return "top_logprobs"
    if field == "request_id":
        return "X-Request-Id"
    if field == "end_user":
        return "user"
    if field.startswith("response_format"):
        return "response_format"
    return field


def usage(prompt_tokens: int, completion_tokens: int, cached: bool = False) -> dict[str, Any]:
    """OpenAI's usage object; `cached` (a tokenyard extension) when the router's
    response cache answered."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached:
        out["cached"] = True
        out["cached_completion_tokens"] = completion_tokens
    return out


def _token_text(token_id: int, msg: gen.StreamGenerateResponse) -> str:
    # The router has no tokenizer: a message's text is its token's only when it holds one.
    if len(msg.token_ids) == 1 and msg.token_ids[0] == token_id:
        return msg.text
    return f"token_id:{token_id}"


def chat_logprobs(msg: gen.StreamGenerateResponse) -> list[dict[str, Any]]:
    """`logprobs.content` entries of one message."""
    out = []
    for lp in msg.logprobs:
        text = _token_text(lp.token_id, msg)
        out.append(
            {
                "token": text,
                "logprob": lp.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": (t := _token_text(top.token_id, msg)),
                        "logprob": top.logprob,
                        "bytes": list(t.encode()),
                    }
                    for top in lp.top
                ],
            }
        )
    return out


def completion_logprobs(msg: gen.StreamGenerateResponse, offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object of one message (text starting at `offset`)."""
    tokens = [_token_text(lp.token_id, msg) for lp in msg.logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += 0 if token.startswith("token_id:") else len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in msg.logprobs],
        "top_logprobs": [
            {_token_text(top.token_id, msg): top.logprob for top in lp.top} for lp in msg.logprobs
        ],
        "text_offset": offsets,
    }
