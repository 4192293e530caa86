"""The rules of a generation request, in one place: limits, messages and field names.

The router checks every request with them before any worker is involved; a worker
checks again with the same rules (nothing but the router calls it, yet it trusts
no caller), then adds what only the model knows: the vocabulary and the context.
The engine only asserts (`sampling_error`). An error is an `InvalidArgument` naming
the field by its proto path (``sampling.stop[1]``, ``messages.messages[0].role``);
a bound on the input as a whole names the input (``messages``, ``token_ids``).
No torch here: the router imports this module.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument
from services.common.grammars import JSON_OBJECT, ResponseFormat, format_problem
from services.common.settings import parse_positive_int, setting

MAX_REQUEST_ID = 128
MAX_AFFINITY_KEY = 256
MAX_END_USER = 256  # the caller's id for its end user (OpenAI's `user`), kept with usage
MAX_STOP = 16
MAX_STOP_BYTES = 256
MAX_STOP_TOKEN_IDS = 64  # a worker checks each generated token against every one
MAX_MESSAGES = 1024  # chat turns in one request
MAX_LOGPROBS = 20
MAX_RESPONSE_FORMAT_BYTES = 64 * 1024  # a schema, regex or grammar (UTF-8)
DEFAULT_MAX_N = 16  # samples per request (`n`); the router's and the worker's setting


def max_n_setting() -> Any:
    """The `TOKENYARD_{service}_MAX_N` / `--max-n` setting of the router and the worker."""
    return setting(
        "TOKENYARD_{service}_MAX_N",
        parse_positive_int,
        default=DEFAULT_MAX_N,
        flag="--max-n",
        help="Most samples one generation request may ask for (`n`); above it "
        "INVALID_ARGUMENT naming n.",
    )


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# SamplingParams' optional fields, unset meaning `Sampling`'s default.
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens; `max_tokens` None means "the rest of the context".

    temperature 0 means greedy; top_k 0 and top_p 1 disable those filters; `seed`
    makes the stream reproducible (alone or batched, and across a resume); `logprobs`
    asks for the chosen token's log-probability plus that many top alternatives.
    The engine needs `max_tokens` resolved (the worker does it against the context).
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: int | None = None


@dataclass(frozen=True)
class Input:
    """A request's input: `field` says which of prompt, messages or token_ids it is."""

    field: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) per chat turn
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A Generate/StreamGenerate request that passed every rule not needing the model."""

    model: str
    input: Input
    sampling: Sampling
    request_id: str  # "" when the caller left it to the server
    affinity_key: str
    continuation_ids: tuple[int, ...]
    end_user: str = ""
    n: int = 1  # samples sharing one prefill; sample i is seeded with seed + i
    cache: int = 0  # gen.CacheMode: how the router's response cache may answer
    response_format: ResponseFormat | None = None  # None: free text


def deterministic(s: Sampling) -> bool:
    """Whether a request with this sampling always gives the same answer from the same
    weights: greedy (temperature 0 or top_k 1) or seeded. Only such requests are cached."""
    return s.temperature == 0 or s.top_k == 1 or s.seed is not None


class HasInput(Protocol):
    """Any request with the `input` oneof (Generate, StreamGenerate, CountTokens)."""

    model: str
    prompt: str
    messages: gen.ChatMessages
    token_ids: gen.TokenIds

    def WhichOneof(self, name: Any) -> Any:
        """The name of the set member of a oneof, or None."""


def sampling_error(s: Sampling) -> tuple[str, str] | None:
    """The first sampling value out of range, as (field, message); None when all are fine."""
    if s.max_tokens is not None and s.max_tokens <= 0:
        return "sampling.max_tokens", "must be at least 1"
    if not math.isfinite(s.temperature):
        return "sampling.temperature", "must be a finite number"
    if s.temperature < 0:
        return "sampling.temperature", "must be at least 0"
    if not 0.0 < s.top_p <= 1.0:  # NaN fails this too
        return "sampling.top_p", "must be in (0, 1]"
    if s.top_k < 0:
        return "sampling.top_k", "must be at least 0 (0 disables)"
    if not 0.0 <= s.min_p <= 1.0:
        return "sampling.min_p", "must be in [0, 1]"
    if not math.isfinite(s.repetition_penalty):
        return "sampling.repetition_penalty", "must be a finite number"
    if s.repetition_penalty <= 0:
        return "sampling.repetition_penalty", "must be greater than 0"
    if len(s.stop) > MAX_STOP:
        return "sampling.stop", f"at most {MAX_STOP} stop strings (got {len(s.stop)})"
    for index, stop in enumerate(s.stop):
        if not stop:
            return f"sampling.stop[{index}]", "must not be empty"
        if len(stop.encode()) > MAX_STOP_BYTES:
            return f"sampling.stop[{index}]", f"at most {MAX_STOP_BYTES} bytes"
    if s.logprobs is not None and not 0 <= s.logprobs <= MAX_LOGPROBS:
        return "logprobs", f"at most {MAX_LOGPROBS} alternatives"
    return None


def sampling_of(params: gen.SamplingParams, logprobs: int | None) -> Sampling:
    """The checked sampling of a request (its `sampling` and `logprobs` fields)."""
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
    given: dict[str, Any] = {name: getattr(params, name) for name in _OPTIONAL}
    sampling = Sampling(
        **{name: value for name, value in given.items() if params.HasField(name)},
        stop=tuple(params.stop),
        stop_token_ids=frozenset(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=logprobs,
    )
    problem = sampling_error(sampling)
    if problem is not None:
        raise InvalidArgument(*problem)
    return sampling


def valid_request_id(value: str) -> bool:
    """Whether `value` may serve as a request id (a header's, or the field's when set)."""
    return 0 < len(value) <= MAX_REQUEST_ID and value.isprintable()


def check_model(model: str) -> str:
    """The model name a request must carry."""
    if not model:
        raise InvalidArgument("model", "required: name the model (see ListModels)")
    return model


def input_of(request: HasInput) -> Input:
    """The request's one input, non-empty, its chat turns bounded and each with a role."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        return Input("prompt", prompt=request.prompt)
    if kind == "messages":
        turns = request.messages.messages
        if not turns:
            raise InvalidArgument("messages.messages", "must hold at least one message")
        if len(turns) > MAX_MESSAGES:
            raise InvalidArgument("messages", f"at most {MAX_MESSAGES} messages")
        for index, turn in enumerate(turns):
            if not turn.role:
                raise InvalidArgument(f"messages.messages[{index}].role", "must not be empty")
        return Input("messages", messages=tuple((t.role, t.content) for t in turns))
    if kind == "token_ids":
        if not request.token_ids.ids:
            raise InvalidArgument("token_ids.ids", "must not be empty")
        return Input("token_ids", token_ids=tuple(request.token_ids.ids))
    raise InvalidArgument("input", "set exactly one of prompt, messages or token_ids")


def response_format_of(
    request: gen.GenerateRequest | gen.StreamGenerateRequest,
) -> ResponseFormat | None:
    """The request's checked output format (None: free text).

    The format must compile: a malformed or unsupported schema, regex or grammar is
    refused here with llguidance's reason, before any token is generated.
    """
    if not request.HasField("response_format"):
        return None
    given = request.response_format
    kind = given.WhichOneof("format")
    if kind is None:
        raise InvalidArgument(
            "response_format", "set one of json_schema, json_object, regex or grammar"
        )
    if kind == JSON_OBJECT:
        if not given.json_object:
            raise InvalidArgument("response_format.json_object", "must be true when set")
        return ResponseFormat(JSON_OBJECT)
    text: str = getattr(given, kind)
    field = f"response_format.{kind}"
    if not text:
        raise InvalidArgument(field, "must not be empty")
    if len(text.encode()) > MAX_RESPONSE_FORMAT_BYTES:
        raise InvalidArgument(field, f"at most {MAX_RESPONSE_FORMAT_BYTES} bytes")
    checked = ResponseFormat(kind, text)
    problem = format_problem(checked)
    if problem is not None:
        raise InvalidArgument(field, f"cannot constrain the output: {problem}")
    return checked


def samples_of(requested: int, max_n: int) -> int:
    """The request's `n` (0 means 1), at most `max_n`."""
    n = requested or 1
    if n > max_n:
        raise InvalidArgument("n", f"at most {max_n} samples per request (got {n})")
    return n


def generation_request(
    request: gen.GenerateRequest | gen.StreamGenerateRequest,
    *,
    from_caller: bool,
    max_n: int = DEFAULT_MAX_N,
) -> GenerationRequest:
    """The checked request; `from_caller`: a public caller, who may not resume a stream.

    `max_n` caps the samples per request (the service's setting).
    """
    model = check_model(request.model)
    given_input = input_of(request)
    logprobs = request.logprobs if request.HasField("logprobs") else None
    sampling = sampling_of(request.sampling, logprobs)
    if request.request_id and not valid_request_id(request.request_id):
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID} printable characters")
    if len(request.affinity_key) > MAX_AFFINITY_KEY:
        raise InvalidArgument("affinity_key", f"at most {MAX_AFFINITY_KEY} characters")
    if len(request.end_user) > MAX_END_USER or not request.end_user.isprintable():
        raise InvalidArgument("end_user", f"at most {MAX_END_USER} printable characters")
    if from_caller and request.continuation_token_ids:
        # The router's own resume mechanism: from a caller it would be unbilled prefill.
        raise InvalidArgument("continuation_token_ids", "is not accepted from callers")
    n = samples_of(request.n, max_n)
    if request.cache not in gen.CacheMode.values():
        raise InvalidArgument("cache", f"unknown cache mode {request.cache}")
    if n > 1 and request.continuation_token_ids:
        raise InvalidArgument("continuation_token_ids", "cannot resume a request with n > 1")
    response_format = response_format_of(request)
    return GenerationRequest(
        model=model,
        input=given_input,
        sampling=sampling,
        request_id=request.request_id,
        affinity_key=request.affinity_key,
        continuation_ids=tuple(request.continuation_token_ids),
        end_user=request.end_user,
        n=n,
        cache=request.cache,
        response_format=response_format,
    )


async def generation_request_off_loop(
    request: gen.GenerateRequest | gen.StreamGenerateRequest,
    *,
    from_caller: bool,
    max_n: int = DEFAULT_MAX_N,
) -> GenerationRequest:
    """`generation_request` for an event loop: a `response_format` is compiled on a
    thread, since a large schema can take a second (64 KiB of properties: ~0.6 s)."""
    if request.HasField("response_format"):
        return await asyncio.to_thread(
            generation_request, request, from_caller=from_caller, max_n=max_n
        )
    return generation_request(request, from_caller=from_caller, max_n=max_n)


def check_size(given: Input, context_length: int | None) -> None:
    """Token ids no more than the model's context can hold (None: not known yet)."""
    if given.field == "token_ids" and context_length and len(given.token_ids) > context_length:
        raise InvalidArgument("token_ids", f"more ids than the model's {context_length} context")


def check_token_ids(ids: Sequence[int], field: str, vocab_size: int) -> tuple[int, ...]:
    """Token ids must lie inside the model's vocabulary."""
    for index, token in enumerate(ids):
        if token >= vocab_size:
            raise InvalidArgument(
                f"{field}[{index}]",
                f"token id {token} is outside the vocabulary (size {vocab_size})",
            )
    return tuple(ids)


def resolve_max_tokens(
    requested: int | None,
    *,
    input_field: str,
    prompt_tokens: int,
    continuation_tokens: int,
    context_length: int,
) -> int:
    """The token budget of the request; it counts continuation tokens as generated.

    Prompt plus budget must fit the context, and the budget must leave at least one
    token to generate after the continuation.
    """
    if prompt_tokens >= context_length:
        raise InvalidArgument(
            input_field,
            f"the input is {prompt_tokens} tokens; the context holds {context_length} "
            "(prompt plus completion), leaving nothing to generate",
        )
    room = context_length - prompt_tokens
    if requested is None:
        max_tokens = room
    elif requested > room:
        raise InvalidArgument(
            "sampling.max_tokens",
            f"{requested} plus the {prompt_tokens}-token input exceeds the "
            f"context length {context_length} (at most {room})",
        )
    else:
        max_tokens = requested
    if continuation_tokens >= max_tokens:
        raise InvalidArgument(
            "continuation_token_ids",
            f"{continuation_tokens} tokens already reach the budget of {max_tokens}: "
            "nothing left to generate",
        )
    return max_tokens


def page_size_of(requested: int) -> int:
    """A ListModels page size: 0 means the default, more than the maximum the maximum."""
    if requested < 0:
        raise InvalidArgument("page_size", "must be >= 0")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
