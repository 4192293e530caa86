"""Plain values the client takes and returns, free of protobuf types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.grammars import JSON_OBJECT, ResponseFormat


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Sampling options; None leaves the server default (unlike an explicit zero)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool | None = None

    def to_proto(self) -> gen.SamplingParams:
        """The `SamplingParams` message, with only the set fields present."""
        fields: dict[str, Any] = {
            name: value
            for name, value in (
                ("max_tokens", self.max_tokens),
                ("temperature", self.temperature),
                ("top_p", self.top_p),
                ("top_k", self.top_k),
                ("min_p", self.min_p),
                ("repetition_penalty", self.repetition_penalty),
                ("seed", self.seed),
                ("ignore_eos", self.ignore_eos),
            )
            if value is not None
        }
        return gen.SamplingParams(
            stop=list(self.stop), stop_token_ids=list(self.stop_token_ids), **fields
        )


def format_proto(given: ResponseFormat | None) -> gen.ResponseFormat | None:
    """The `ResponseFormat` message of a format (None: free text)."""
    if given is None:
        return None
    if given.kind == JSON_OBJECT:
        return gen.ResponseFormat(json_object=True)
    out = gen.ResponseFormat()
    setattr(out, given.kind, given.text)
    return out


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class Usage:
    """Tokens consumed and produced by one generation."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    cached: bool = False  # answered from the router's response cache
    cached_completion_tokens: int = 0  # of completion_tokens, replayed from that cache


@dataclass(frozen=True)
class TokenLogprob:
    """The log probability of one generated token and its top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """One message of a streamed generation; the last has `finish_reason` and `usage`."""

    text: str
    token_ids: tuple[int, ...]
    request_id: str
    model: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # on the last event of its sample
    usage: Usage | None = None  # on the last event of the stream
    index: int = 0  # which sample (n > 1)


@dataclass(frozen=True)
class Choice:
    """One sample of a whole generation."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A whole generation (`Generate`): `choices` holds the n samples, the other
    fields repeat choice 0; `usage` counts the prompt once and every sample."""

    text: str
    token_ids: tuple[int, ...]
    request_id: str
    model: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: tuple[TokenLogprob, ...] = ()
    choices: tuple[Choice, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """A model the caller may use and the capacity behind it."""

    name: str
    context_length: int
    workers: int
    max_running: int
    running: int
    queued: int


@dataclass(frozen=True)
class Input:
    """Exactly one of a prompt, chat messages or token ids."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    token_ids: tuple[int, ...] | None = None

    @classmethod
    def of(
        cls,
        prompt: str | None,
        messages: Sequence[Message] | None,
        token_ids: Sequence[int] | None,
    ) -> Input:
        """Check that exactly one input is given."""
        given = [x is not None for x in (prompt, messages, token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or token_ids")
        return cls(
            prompt=prompt,
            messages=tuple(messages) if messages is not None else None,
            token_ids=tuple(token_ids) if token_ids is not None else None,
        )

    def fields(self) -> dict[str, Any]:
        """Keyword arguments for a request message's `input` oneof."""
        if self.prompt is not None:
            return {"prompt": self.prompt}
        if self.messages is not None:
            turns = [gen.ChatMessage(role=m.role, content=m.content) for m in self.messages]
            return {"messages": gen.ChatMessages(messages=turns)}
        return {"token_ids": gen.TokenIds(ids=list(self.token_ids or ()))}


def finish_reason_name(value: int) -> str | None:
    """`STOP`, `LENGTH`… for a FinishReason value; None while unfinished."""
    if value == gen.FINISH_REASON_UNSPECIFIED:
        return None
    return str(gen.FinishReason.Name(value)).removeprefix("FINISH_REASON_")


def logprobs_of(items: Sequence[gen.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    """Plain logprob values from their messages."""
    return tuple(
        TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=tuple((t.token_id, t.logprob) for t in lp.top),
        )
        for lp in items
    )


def usage_of(message: Any) -> Usage | None:
    """Usage from a response message, None when the field is absent."""
    if not message.HasField("usage"):
        return None
    u = message.usage
    return Usage(
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_prompt_tokens,
        cached=u.cached,
        cached_completion_tokens=u.cached_completion_tokens,
    )


CACHE_MODES = {
    "default": gen.CACHE_MODE_DEFAULT,
    "bypass": gen.CACHE_MODE_BYPASS,
    "refresh": gen.CACHE_MODE_REFRESH,
}


def cache_mode(name: str) -> gen.CacheMode:
    """The CacheMode of `cache=`: "default", "bypass" or "refresh"."""
    try:
        return CACHE_MODES[name]
    except KeyError:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {name!r}") from None
