"""Python client of tokenyard's public API (used by `tokenyard generate` and `chat`).

async with Client("127.0.0.1:50051", api_key) as client:
    async for text in client.stream_generate("Hello", sampling=Sampling(max_tokens=32)):
        print(text, end="", flush=True)
"""

from __future__ import annotations

from services.client.client import DEFAULT_ADDRESS, DEFAULT_MODEL, Client
from services.client.errors import TokenyardCallError
from services.client.types import (
    Choice,
    Completion,
    Message,
    ModelInfo,
    Sampling,
    StreamEvent,
    TokenLogprob,
    Usage,
)
from services.common.grammars import ResponseFormat

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_MODEL",
    "Choice",
    "Client",
    "Completion",
    "Message",
    "ModelInfo",
    "ResponseFormat",
    "Sampling",
    "StreamEvent",
    "TokenLogprob",
    "TokenyardCallError",
    "Usage",
]
