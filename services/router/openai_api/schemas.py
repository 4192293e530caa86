"""The OpenAI request bodies tokenyard accepts, and the fields it refuses.

pydantic checks types and shapes (a string where a number belongs is a 400 naming
the field); value ranges of sampling fields are the router's own
(`services.common.requests`), checked once after conversion. Fields that
depend on features the gRPC contract does not have yet are refused here with a
400 naming them; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import InvalidArgument

# Integer ranges of the gRPC fields they become (int32, uint32, uint64).
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
UInt64 = Annotated[int, Field(ge=0, le=2**64 - 1)]


class StreamOptions(BaseModel):
    """`stream_options`: only `include_usage` changes anything."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: a named schema (`strict` is always honoured)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = ""
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: `text`, `json_object` or `json_schema` (OpenAI's), and as
    tokenyard extensions `regex` and `grammar` (llguidance Lark) with their text."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = None
    grammar: str | None = None


class ChatMessage(BaseModel):
    """One chat turn; content is a string or a list of parts (text only)."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    """Fields chat and text completions share (OpenAI names, tokenyard extensions)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Int32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: UInt64 | None = None
    stop: str | list[str] | None = None
    n: UInt32 | None = None  # samples (choices); the router's max_n caps it
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # tokenyard extensions (as vLLM's): fields of the gRPC SamplingParams.
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[UInt32] | None = None
    affinity_key: str | None = None
    priority: int | None = None
    # The router's response cache for this request (gRPC `cache`); unset: default.
    cache: Literal["default", "bypass", "refresh"] | None = None
    response_format: ResponseFormat | None = None

    def refuse_unsupported(self) -> None:
        """400 naming the first field that needs a feature the contract lacks."""
        if self.n is not None and self.n < 1:
            raise InvalidArgument("n", "must be at least 1")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise InvalidArgument(
                    name, "is not supported; use repetition_penalty (multiplicative, > 0)"
                )
        if self.logit_bias:
            raise InvalidArgument("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options", "is only allowed when stream is true")

    def stop_list(self) -> list[str]:
        """`stop` as a list (OpenAI allows one string)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int32 | None = None
    logprobs: bool = False
    top_logprobs: UInt32 | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise InvalidArgument("tools", "tool calling is not supported")
        if self.functions:
            raise InvalidArgument("functions", "function calling is not supported")
        if self.tool_choice not in (None, "none"):
            raise InvalidArgument("tool_choice", "tool calling is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs", "needs logprobs set to true")


class CompletionRequest(_Common):
    """POST /v1/completions (text or token ids in, text out)."""

    prompt: str | list[str] | list[UInt32] | list[list[UInt32]]
    logprobs: UInt32 | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise InvalidArgument("echo", "is not supported")
        if self.best_of is not None and self.best_of != 1:
            raise InvalidArgument("best_of", "only best_of=1 is supported")
        if self.suffix:
            raise InvalidArgument("suffix", "is not supported (no fill-in-the-middle)")


Endpoint = Literal["chat", "completions"]
