"""Turn engine token events into StreamGenerateResponse messages.

Text goes out incrementally and is always whole: a token that ends inside a UTF-8
character waits for the rest, and text that could be the start of a stop string is
held back until it either completes the stop string (the generation ends there and
the stop string is never sent) or cannot any more. The last message carries the
finish reason and usage.

Continuation tokens (a resumed stream) are replayed through the same pipeline with
their output discarded: the detokenizer and the held-back text end up exactly as
they were on the worker that produced them, so no text is repeated or lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.choices import add_to_choice, finish_choices
from services.inference.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.inference.engine.types import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    NO_TOKEN,
    TokenEvent,
)

FINISH_REASONS = {
    FINISH_STOP: gen.FINISH_REASON_STOP,
    FINISH_LENGTH: gen.FINISH_REASON_LENGTH,
    FINISH_CANCELLED: gen.FINISH_REASON_CANCELLED,
}


@dataclass
class Totals:
    """Usage of one request so far."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    def usage(self) -> gen.Usage:
        """As the proto message."""
        return gen.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
        )


@dataclass
class ResponseAssembler:
    """Builds the stream messages of one request from its engine events.

    `completion_tokens` counts every generated token of the request, including the
    continuation tokens an earlier attempt produced (they count toward max_tokens
    too), so the last message's usage covers the whole stream the client saw.
    """

    tokenizer: Any
    request_id: str
    model: str
    prompt_ids: Sequence[int]
    continuation_ids: Sequence[int] = ()
    stops: Sequence[str] = ()
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: bool = False
    finish_reason: gen.FinishReason = gen.FINISH_REASON_UNSPECIFIED
    totals: Totals = field(init=False)
    _detok: IncrementalDetokenizer = field(init=False)
    _stops: StopStringMatcher = field(init=False)
    _first: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.totals = Totals(len(self.prompt_ids), len(self.continuation_ids))
        self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids)
        self._stops = StopStringMatcher(self.stops)
        if self.continuation_ids:
            self._stops.feed(self._detok.feed(self.continuation_ids))
            last = self.continuation_ids[-1]
            if self._stops.stopped is not None:
                self.finish_reason = gen.FINISH_REASON_STOP_SEQUENCE
            elif last in self.stop_token_ids or (
                last in self.eos_token_ids and not self.ignore_eos
            ):
                self.finish_reason = gen.FINISH_REASON_STOP

    @property
    def finished(self) -> bool:
        """True once the last message is built (or the continuation had already ended)."""
        return self.finish_reason != gen.FINISH_REASON_UNSPECIFIED

    @property
    def stopped_by_string(self) -> bool:
        """True when a stop string ended the generation (the engine must be told)."""
        return self.finish_reason == gen.FINISH_REASON_STOP_SEQUENCE

    def final(self) -> gen.StreamGenerateResponse:
        """The last message for a generation that ends with no new event."""
        return gen.StreamGenerateResponse(
            request_id=self.request_id,
            model=self.model,
            finish_reason=self.finish_reason,
            usage=self.totals.usage(),
        )

    def feed(self, events: Sequence[TokenEvent]) -> gen.StreamGenerateResponse | None:
        """The message for one batch of events; None when it carries nothing new."""
        if self.finished:
            return None
        out = gen.StreamGenerateResponse(request_id=self.request_id, model=self.model)
        text: list[str] = []
        for event in events:
            if self.finished:
                break
            if self._first:
                self._first = False
                self.totals.cached_prompt_tokens = min(
                    event.cached_prompt_tokens, self.totals.prompt_tokens
                )
            if event.token_id != NO_TOKEN:
                self._add_token(out, event, text)
            if not self.finished and event.finish is not None:
                text.append(self._stops.feed(self._detok.flush()))
                if self._stops.stopped is not None:
                    self.finish_reason = gen.FINISH_REASON_STOP_SEQUENCE
                else:
                    text.append(self._stops.flush())
                    self.finish_reason = FINISH_REASONS.get(event.finish, gen.FINISH_REASON_STOP)
        out.text = "".join(text)
        if self.finished:
            out.finish_reason = self.finish_reason
            out.usage.CopyFrom(self.totals.usage())
            return out
        return out if (out.text or out.token_ids) else None

    def _add_token(
        self, out: gen.StreamGenerateResponse, event: TokenEvent, text: list[str]
    ) -> None:
        out.token_ids.append(event.token_id)
        self.totals.completion_tokens += 1
        if self.logprobs and event.logprob is not None:
            out.logprobs.append(
                gen.TokenLogprob(
                    token_id=event.token_id,
                    logprob=event.logprob,
                    top=[gen.TopLogprob(token_id=t, logprob=lp) for t, lp in event.top_logprobs],
                )
            )
        text.append(self._stops.feed(self._detok.feed([event.token_id])))
        if self._stops.stopped is not None:
            self.finish_reason = gen.FINISH_REASON_STOP_SEQUENCE


class SampleSet:
    """The n samples of one request: one assembler each, messages tagged with `index`.

    Each sample's last message carries its finish reason; the stream's last message
    (the one ending the last sample) also carries the usage of the whole request:
    the prompt once and the completions of every sample.
    """

    def __init__(self, assemblers: Sequence[ResponseAssembler]) -> None:
        self.assemblers = list(assemblers)

    @property
    def finished(self) -> bool:
        """True once every sample has its last message."""
        return all(a.finished for a in self.assemblers)

    def totals(self) -> Totals:
        """Usage of the request so far (the prompt counted once)."""
        first = self.assemblers[0].totals
        return Totals(
            first.prompt_tokens,
            sum(a.totals.completion_tokens for a in self.assemblers),
            first.cached_prompt_tokens,
        )

    def feed(self, events: Sequence[TokenEvent]) -> list[gen.StreamGenerateResponse]:
        """The messages for one batch of events, one per sample with something new."""
        by_index: dict[int, list[TokenEvent]] = {}
        for event in events:
            by_index.setdefault(event.index, []).append(event)
        out: list[gen.StreamGenerateResponse] = []
        for index, batch in by_index.items():
            message = self.assemblers[index].feed(batch)
            if message is None:
                continue
            message.index = index
            if message.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
                if self.finished:
                    message.usage.CopyFrom(self.totals().usage())
                else:
                    message.ClearField("usage")
            out.append(message)
        return out


def collect(
    request_id: str, model: str, messages: Sequence[gen.StreamGenerateResponse]
) -> gen.GenerateResponse:
    """Join a stream's messages into the unary GenerateResponse (choice 0 on top)."""
    out = gen.GenerateResponse(request_id=request_id, model=model)
    choices: dict[int, gen.Choice] = {}
    for message in messages:
        add_to_choice(choices, message)
        if message.HasField("usage"):
            out.usage.CopyFrom(message.usage)
    finish_choices(out, choices)
    return out
