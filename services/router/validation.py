"""Cheap request checks made before any routing, each naming the bad field.

Requests arrive as raw bytes so that one with invalid UTF-8 in a string field is
answered INVALID_ARGUMENT naming that field rather than a generic decoding
failure. The worker validates again; the context-length check is the worker's.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.message import DecodeError
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument

MAX_REQUEST_ID = 128
MAX_AFFINITY_KEY = 256
MAX_STOP = 16
MAX_STOP_BYTES = 256
MAX_STOP_TOKEN_IDS = 64  # a worker checks each generated token against every one
MAX_MESSAGES = 1024  # chat turns in one request

# String fields by path: (field number, ...) -> name, for locating invalid UTF-8.
_STRING_FIELDS = {
    (1,): "model",
    (2,): "prompt",
    (7,): "request_id",
    (8,): "affinity_key",
    (3, 1, 1): "messages.role",
    (3, 1, 2): "messages.content",
    (5, 8): "sampling.stop",
}
_MESSAGE_FIELDS = {(3,), (3, 1), (5,)}


def parse_request(raw: bytes, kind: type[Any]) -> Any:
    """Decode a request, or INVALID_ARGUMENT naming the field that is not valid UTF-8."""
    try:
        return kind.FromString(raw)
    except DecodeError:
        field = invalid_utf8_field(raw) or "request"
        raise InvalidArgument(field, "not valid UTF-8 or not a valid message") from None


def invalid_utf8_field(raw: bytes, path: tuple[int, ...] = ()) -> str | None:
    """The name of the first string field of `raw` holding invalid UTF-8 (wire-format walk)."""
    pos = 0
    try:
        while pos < len(raw):
            key, pos = _varint(raw, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(raw, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(raw, pos)
                chunk, pos = raw[pos : pos + size], pos + size
                here = (*path, number)
                if here in _STRING_FIELDS:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return _STRING_FIELDS[here]
                elif here in _MESSAGE_FIELDS:
                    found = invalid_utf8_field(chunk, here)
                    if found:
                        return found
            else:
                return None
    except IndexError:
        return None
    return None


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def validate_input(request: Any) -> None:
    """model and exactly one non-empty input (Generate, StreamGenerate, CountTokens)."""
    if not request.model:
        raise InvalidArgument("model", "must be set")
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input", "one of prompt, messages or token_ids is required")
    if kind == "prompt" and not request.prompt:
        raise InvalidArgument("prompt", "must not be empty")
    if kind == "messages" and not request.messages.messages:
        raise InvalidArgument("messages", "must hold at least one message")
    if kind == "token_ids" and not request.token_ids.ids:
        raise InvalidArgument("token_ids", "must hold at least one id")


def validate_generation(request: gen.StreamGenerateRequest | gen.GenerateRequest) -> None:
    """Every cheap check of a generation request."""
    validate_input(request)
    s = request.sampling
    if s.HasField("max_tokens") and s.max_tokens <= 0:
        raise InvalidArgument("sampling.max_tokens", "must be at least 1")
    if s.HasField("temperature") and (math.isnan(s.temperature) or s.temperature < 0):
        raise InvalidArgument("sampling.temperature", "must be a number >= 0")
    if s.HasField("top_p") and not 0 < s.top_p <= 1:  # also false for NaN
        raise InvalidArgument("sampling.top_p", "must be in (0, 1]")
    if s.HasField("top_k") and s.top_k < 0:
        raise InvalidArgument("sampling.top_k", "must be >= 0")
    if s.HasField("min_p") and not 0 <= s.min_p <= 1:
        raise InvalidArgument("sampling.min_p", "must be in [0, 1]")
    if s.HasField("repetition_penalty") and not (
        math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0
    ):
        raise InvalidArgument("sampling.repetition_penalty", "must be > 0")
    if len(s.stop) > MAX_STOP:
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP} strings")
    for stop in s.stop:
        if not stop or len(stop.encode()) > MAX_STOP_BYTES:
            raise InvalidArgument("sampling.stop", f"each must be 1 to {MAX_STOP_BYTES} bytes")
    if len(request.request_id) > MAX_REQUEST_ID or not request.request_id.isprintable():
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID} printable characters")
    if len(request.affinity_key) > MAX_AFFINITY_KEY:
        raise InvalidArgument("affinity_key", f"at most {MAX_AFFINITY_KEY} characters")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
    if request.continuation_token_ids:
        # The router's own resume mechanism: from a caller it would be unbilled prefill.
        raise InvalidArgument("continuation_token_ids", "is not accepted from callers")


def validate_size(request: Any, context_length: int | None) -> None:
    """Repeated inputs within what one model call can use (context_length None: unknown)."""
    kind = request.WhichOneof("input")
    if kind == "messages" and len(request.messages.messages) > MAX_MESSAGES:
        raise InvalidArgument("messages", f"at most {MAX_MESSAGES} messages")
    if kind == "token_ids" and context_length and len(request.token_ids.ids) > context_length:
        raise InvalidArgument("token_ids", f"more ids than the model's {context_length} context")
