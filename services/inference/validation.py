"""Checks of a generation request before it reaches the engine.

Every failure is an `InvalidArgument` naming the offending field
(``sampling.top_p: must be in (0, 1]``) or a `NotFound` for a model this worker
does not serve, so the caller learns what to fix and the worker keeps serving.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument, NotFound

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_LOGPROBS = 20
MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class SamplingChoice:
    """Validated sampling fields; `max_tokens` None means "the rest of the context"."""

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


def check_model(requested: str, served: str) -> None:
    """The request must name the one model this worker serves."""
    if not requested:
        raise InvalidArgument("model", "required: name the model (see ListModels)")
    if requested != served:
        raise NotFound(
            f"model: {requested!r} is not served by this worker (it serves {served!r})",
            reason="MODEL_NOT_FOUND",
            field="model",
        )


def request_id_of(given: str) -> str:
    """The client's request id, or a fresh one when empty."""
    if len(given) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID} characters")
    if given and not given.isprintable():
        raise InvalidArgument("request_id", "must be printable text")
    return given or uuid.uuid4().hex


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number")
    return value


def check_token_ids(ids: Sequence[int], field: str, vocab_size: int) -> list[int]:
    """Token ids must lie inside the model's vocabulary."""
    for index, token in enumerate(ids):
        if token >= vocab_size:
            raise InvalidArgument(
                f"{field}[{index}]",
                f"token id {token} is outside the vocabulary (size {vocab_size})",
            )
    return list(ids)


def sampling_choice(
    sampling: gen.SamplingParams, logprobs: int | None, vocab_size: int
) -> SamplingChoice:
    """Range-check the sampling fields that do not depend on the prompt."""
    max_tokens: int | None = None
    if sampling.HasField("max_tokens"):
        max_tokens = sampling.max_tokens
        if max_tokens <= 0:
            raise InvalidArgument("sampling.max_tokens", "must be at least 1")
    temperature = 1.0
    if sampling.HasField("temperature"):
        temperature = _finite("sampling.temperature", sampling.temperature)
        if temperature < 0:
            raise InvalidArgument("sampling.temperature", "must be at least 0")
    top_p = 1.0
    if sampling.HasField("top_p"):
        top_p = sampling.top_p
        if not (0.0 < top_p <= 1.0):  # NaN fails this too
            raise InvalidArgument("sampling.top_p", "must be in (0, 1]")
    top_k = sampling.top_k if sampling.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument("sampling.top_k", "must be at least 0 (0 disables)")
    min_p = 0.0
    if sampling.HasField("min_p"):
        min_p = sampling.min_p
        if not (0.0 <= min_p <= 1.0):
            raise InvalidArgument("sampling.min_p", "must be in [0, 1]")
    penalty = 1.0
    if sampling.HasField("repetition_penalty"):
        penalty = _finite("sampling.repetition_penalty", sampling.repetition_penalty)
        if penalty <= 0:
            raise InvalidArgument("sampling.repetition_penalty", "must be greater than 0")
    stops = tuple(sampling.stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgument(
            "sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings (got {len(stops)})"
        )
    for index, stop in enumerate(stops):
        if not stop:
            raise InvalidArgument(f"sampling.stop[{index}]", "must not be empty")
        if len(stop.encode()) > MAX_STOP_BYTES:
            raise InvalidArgument(f"sampling.stop[{index}]", f"at most {MAX_STOP_BYTES} bytes")
    stop_ids = check_token_ids(sampling.stop_token_ids, "sampling.stop_token_ids", vocab_size)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise InvalidArgument("logprobs", f"at most {MAX_LOGPROBS} alternatives")
    return SamplingChoice(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        min_p=float(min_p),
        repetition_penalty=float(penalty),
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=stops,
        stop_token_ids=frozenset(stop_ids),
        ignore_eos=sampling.ignore_eos,
        logprobs=logprobs,
    )


def resolve_max_tokens(
    choice: SamplingChoice,
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
    if choice.max_tokens is None:
        max_tokens = room
    elif choice.max_tokens > room:
        raise InvalidArgument(
            "sampling.max_tokens",
            f"{choice.max_tokens} plus the {prompt_tokens}-token input exceeds the "
            f"context length {context_length} (at most {room})",
        )
    else:
        max_tokens = choice.max_tokens
    if continuation_tokens >= max_tokens:
        raise InvalidArgument(
            "continuation_token_ids",
            f"{continuation_tokens} tokens already reach the budget of {max_tokens}: "
            "nothing left to generate",
        )
    return max_tokens
