"""One generation over HTTP: a JSON reply, or server-sent events as tokens arrive.

The generation runs through `RouterCore.generate`, the gRPC path's own: auth,
limits, routing, failover, usage. The HTTP status is chosen when the first
message arrives, so an error before it is a real 4xx/5xx with OpenAI's envelope;
an error after it is a `data: {"error": ...}` event, then `data: [DONE]`. A
client that disconnects cancels the generation (the worker frees its slot and
the tokens sent are billed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import TokenyardError
from services.router.core import RouterCore
from services.router.openai_api import convert
from services.router.openai_api.errors import error_body, retry_headers
from services.router.openai_api.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("tokenyard.router.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DONE = b"data: [DONE]\n\n"
_parse = gen.StreamGenerateResponse.FromString


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def json_response_start(status: int, headers: dict[str, str], length: int) -> Message:
    """http.response.start of a JSON body of `length` bytes."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http.response.start", "status": status, "headers": raw}


async def send_json(send: Send, status: int, body: Any, headers: dict[str, str]) -> None:
    """A whole JSON response."""
    raw = _dumps(body)
    await send(json_response_start(status, headers, len(raw)))
    await send({"type": "http.response.body", "body": raw})


@dataclass
class Outcome:
    """What the access log reports of one generation."""

    status: int = 200
    error: TokenyardError | None = None


@dataclass
class Generation:
    """An ASGI response running one generation (chat or text completion)."""

    core: RouterCore
    authorization: str | None
    body: ChatCompletionRequest | CompletionRequest
    request: gen.StreamGenerateRequest
    method: str
    force_usage: bool = False
    outcome: Outcome = field(default_factory=Outcome)
    _started: bool = False
    # Per sample (choice index): text, messages with logprobs, text offset, finish.
    _text: dict[int, list[str]] = field(default_factory=dict)
    _logprobs: dict[int, list[gen.StreamGenerateResponse]] = field(default_factory=dict)
    _offset: dict[int, int] = field(default_factory=dict)
    _finish: dict[int, int] = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return isinstance(self.body, ChatCompletionRequest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.created = int(time.time())
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        self.id = prefix + self.request.request_id
        run = asyncio.ensure_future(self._run(send))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not run.done():
                self.outcome.status = 499  # the client went away: the generation is cancelled
                run.cancel()
                await asyncio.wait({run})
        if not run.cancelled():
            run.result()  # a failure other than a domain error goes up to the server

    async def _run(self, send: Send) -> None:
        try:
            state = await self.core.generate(
                self.authorization, self.request, lambda m: self._emit(send, m),
                deadline=None, method=self.method,
            )  # fmt: skip
        except TokenyardError as exc:
            await self._fail(send, exc)
            return
        prompt = state.prompt_tokens or 0
        usage = convert.usage(prompt, len(state.tokens), cached=bool(state.cached_tokens))
        if not self.body.stream:
            await send_json(send, 200, self._whole(usage), self._headers())
            return
        if not self._started:
            await self._start_stream(send)
        options = self.body.stream_options
        if self.force_usage or (options is not None and options.include_usage):
            last = self._chunk([], usage=usage)
            chunk = b"data: " + last + b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": self.request.request_id}

    async def _fail(self, send: Send, exc: TokenyardError) -> None:
        self.outcome.error = exc
        status, body = error_body(exc, convert.param_of(exc.field, self.body))
        if not self._started:
            self.outcome.status = status
            await send_json(send, status, body, {**self._headers(), **retry_headers(exc)})
            return
        payload = b"data: " + _dumps(body) + b"\n\n" + DONE
        await send({"type": "http.response.body", "body": payload, "more_body": False})

    async def _start_stream(self, send: Send) -> None:
        self._started = True
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", self.request.request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _emit(self, send: Send, payload: bytes | gen.StreamGenerateResponse) -> None:
        msg = _parse(payload) if isinstance(payload, bytes) else payload
        index = msg.index
        if not self.body.stream:
            self._text.setdefault(index, []).append(msg.text)
            if msg.logprobs:
                self._logprobs.setdefault(index, []).append(msg)
            if msg.finish_reason:
                self._finish[index] = msg.finish_reason
            return
        if not self._started:
            await self._start_stream(send)
        first = index not in self._offset  # this choice's first chunk
        offset = self._offset.get(index, 0)
        self._offset[index] = offset + len(msg.text)
        reason = convert.finish_reason(msg.finish_reason) if msg.finish_reason else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if msg.text or first:
                delta["content"] = msg.text
            logprobs = {"content": convert.chat_logprobs(msg)} if msg.logprobs else None
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            lp = convert.completion_logprobs(msg, offset) if msg.logprobs else None
            choice = {"index": index, "text": msg.text, "logprobs": lp, "finish_reason": reason}
        chunk = b"data: " + self._chunk([choice]) + b"\n\n"
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.request.model,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return _dumps(obj)

    def _whole(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.request.model,
            "choices": [self._choice(i) for i in sorted(self._text.keys() | {0})],
            "usage": usage,
        }

    def _choice(self, index: int) -> dict[str, Any]:
        """One sample of the whole (non-streamed) reply."""
        text = "".join(self._text.get(index, ()))
        reason = convert.finish_reason(self._finish.get(index, 0))
        messages = self._logprobs.get(index)
        if self.chat:
            logprobs = None
            if messages:
                logprobs = {"content": [e for m in messages for e in convert.chat_logprobs(m)]}
            message = {"role": "assistant", "content": text}
            return {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        lp = _merge_completion_logprobs(messages) if messages else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}


def _merge_completion_logprobs(messages: list[gen.StreamGenerateResponse]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = 0
    for msg in messages:
        part = convert.completion_logprobs(msg, offset)
        offset += len(msg.text)
        for key, values in part.items():
            merged[key].extend(values)
    return merged


async def _disconnect(receive: Receive) -> None:
    """Returns when the client closed the connection."""
    while (await receive())["type"] != "http.disconnect":
        pass
