"""The unary reply of a generation from its stream messages: one choice per sample.

The worker and the router both join stream messages into a `GenerateResponse`;
messages carry `index` (which of the n samples), the reply lists the samples in
index order and repeats choice 0 in its top-level fields for older clients.
"""

from __future__ import annotations

from tokenyard.generation.v1 import generation_service_pb2 as gen


def add_to_choice(choices: dict[int, gen.Choice], message: gen.StreamGenerateResponse) -> None:
    """Append one stream message to its sample's choice."""
    choice = choices.get(message.index)
    if choice is None:
        choice = choices[message.index] = gen.Choice(index=message.index)
    choice.text += message.text
    choice.token_ids.extend(message.token_ids)
    choice.logprobs.extend(message.logprobs)
    if message.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
        choice.finish_reason = message.finish_reason


def finish_choices(out: gen.GenerateResponse, choices: dict[int, gen.Choice]) -> None:
    """Set `out.choices` in index order and repeat choice 0 in the top-level fields."""
    out.choices.extend(choices[i] for i in sorted(choices))
    first = choices.get(0)
    if first is not None:
        out.text = first.text
        out.token_ids.extend(first.token_ids)
        out.logprobs.extend(first.logprobs)
        out.finish_reason = first.finish_reason
