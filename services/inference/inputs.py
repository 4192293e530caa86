"""Turn a request's input (prompt, chat messages or token ids) into prompt token ids.

Raw prompts are tokenized as given (with the tokenizer's own special tokens, such
as a BOS); chat messages go through the model's chat template with the assistant's
generation prompt appended; token ids are checked against the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument
from services.inference.validation import check_token_ids

MAX_MESSAGES = 1024


class HasInput(Protocol):
    """Any request with the `input` oneof (Generate, StreamGenerate, CountTokens)."""

    prompt: str
    messages: gen.ChatMessages
    token_ids: gen.TokenIds

    def WhichOneof(self, name: Any) -> Any:
        """The name of the set member of a oneof, or None."""


@dataclass(frozen=True)
class RenderedInput:
    """Prompt token ids, and which request field they came from (for error messages)."""

    field: str
    token_ids: list[int]


def render_input(request: HasInput, tokenizer: Any, vocab_size: int) -> RenderedInput:
    """The prompt ids of `request`'s input; InvalidArgument names any bad field."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        ids = list(tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            raise InvalidArgument("prompt", "tokenizes to no tokens")
        return RenderedInput("prompt", ids)
    if kind == "messages":
        return RenderedInput("messages", _render_chat(request.messages, tokenizer))
    if kind == "token_ids":
        if not request.token_ids.ids:
            raise InvalidArgument("token_ids.ids", "must not be empty")
        return RenderedInput(
            "token_ids", check_token_ids(request.token_ids.ids, "token_ids.ids", vocab_size)
        )
    raise InvalidArgument("input", "set exactly one of prompt, messages or token_ids")


def _render_chat(chat: gen.ChatMessages, tokenizer: Any) -> list[int]:
    if not chat.messages:
        raise InvalidArgument("messages.messages", "must hold at least one message")
    if len(chat.messages) > MAX_MESSAGES:
        raise InvalidArgument("messages.messages", f"at most {MAX_MESSAGES} messages")
    turns: list[dict[str, str]] = []
    for index, message in enumerate(chat.messages):
        if not message.role:
            raise InvalidArgument(f"messages.messages[{index}].role", "must not be empty")
        turns.append({"role": message.role, "content": message.content})
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
