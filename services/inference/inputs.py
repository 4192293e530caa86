"""Turn a request's checked input (prompt, chat messages or token ids) into prompt ids.

Raw prompts are tokenized as given (with the tokenizer's own special tokens, such
as a BOS); chat messages go through the model's chat template with the assistant's
generation prompt appended; token ids are checked against the vocabulary. The
model-free rules (non-empty, bounded, roles set) are `services.common.requests`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.common.requests import Input, check_token_ids


@dataclass(frozen=True)
class RenderedInput:
    """Prompt token ids, and which request field they came from (for error messages)."""

    field: str
    token_ids: list[int]


def render_input(given: Input, tokenizer: Any, vocab_size: int) -> RenderedInput:
    """The prompt ids of a checked input; InvalidArgument names what the model refuses."""
    if given.field == "prompt":
        ids = list(tokenizer(given.prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            raise InvalidArgument("prompt", "tokenizes to no tokens")
        return RenderedInput("prompt", ids)
    if given.field == "messages":
        return RenderedInput("messages", _render_chat(given.messages, tokenizer))
    checked = check_token_ids(given.token_ids, "token_ids.ids", vocab_size)
    return RenderedInput("token_ids", list(checked))


def _render_chat(messages: tuple[tuple[str, str], ...], tokenizer: Any) -> list[int]:
    turns = [{"role": role, "content": content} for role, content in messages]
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("messages", "this model has no chat template: send a prompt")
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        # The template's own raise_exception() messages explain what it expects.
        raise InvalidArgument("messages", f"the chat template refused them: {exc}") from None
    ids = list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidArgument("messages", "render to no tokens")
    return ids
