"""`Client`: call tokenyard's public GenerationService from Python.

One channel per client with the API key in every call's metadata, a deadline on
every call, retries while the service is UNAVAILABLE before anything was
received, and `TokenyardCallError` (status, message, google.rpc details) instead
of raw gRPC errors.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.client.errors import TokenyardCallError, from_rpc_error
from services.client.types import (
    Choice,
    Completion,
    Input,
    Message,
    ModelInfo,
    Sampling,
    StreamEvent,
    cache_mode,
    finish_reason_name,
    format_proto,
    logprobs_of,
    usage_of,
)
from services.common.channels import make_channel
from services.common.grammars import ResponseFormat

T = TypeVar("T")
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MODEL = "smollm2-135m"


class Client:
    """A connection to a tokenyard router; use as `async with Client(...) as c:`.

    `timeout` bounds a whole generation, `unary_timeout` the short calls;
    `retries` is how many more times a call is tried on UNAVAILABLE before its
    first response (waiting RetryInfo's delay when given, else a jittered backoff).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        api_key: str | None = None,
        *,
        tls: bool = False,
        tls_ca: Path | None = None,
        timeout: float = 300.0,
        unary_timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.25,
    ) -> None:
        metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        creds = None
        if tls or tls_ca is not None:
            creds = grpc.ssl_channel_credentials(tls_ca.read_bytes() if tls_ca else None)
        self._channel = make_channel(
            address, credentials=creds, metadata=metadata, default_timeout=None, tracing=False
        )
        self._stub = gen_grpc.GenerationServiceStub(self._channel)
        self.timeout, self.unary_timeout = timeout, unary_timeout
        self.retries, self.backoff = retries, backoff

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (cancels calls still running)."""
        await self._channel.close()

    async def _delay(self, attempt: int, err: TokenyardCallError) -> None:
        wait = err.retry_after
        if wait is None:
            wait = min(self.backoff * 2**attempt, 5.0) * (0.5 + random.random() / 2)
        await asyncio.sleep(wait)

    async def _unary(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if err.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise err from None
            await self._delay(attempt, err)
            attempt += 1

    async def stream_events(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        model: str = DEFAULT_MODEL,
        sampling: Sampling | None = None,
        logprobs: int | None = None,
        request_id: str = "",
        affinity_key: str = "",
        timeout: float | None = None,
        n: int = 1,
        cache: str = "default",
        response_format: ResponseFormat | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Stream a generation as events: text delta, token ids, logprobs, and at the end
        `finish_reason` and `usage`. Closing the iterator cancels the generation.
        `cache`: "default", "bypass" or "refresh" (the router's response cache, when the
        key enables it; a hit says `usage.cached`).
        With `n` > 1 the samples' events interleave, each with its `index`; each sample
        ends with its own `finish_reason`, and the last event carries `usage`.
        `response_format` constrains the output (JSON Schema, JSON object, regex or
        grammar); the generation then ends "STOP" once the output is complete."""
        request = gen.StreamGenerateRequest(
            model=model,
            sampling=(sampling or Sampling()).to_proto(),
            request_id=request_id,
            affinity_key=affinity_key,
            logprobs=logprobs,
            n=n,
            cache=cache_mode(cache),
            response_format=format_proto(response_format),
            **Input.of(prompt, messages, token_ids).fields(),
        )
        attempt = 0
        while True:
            call = self._stub.StreamGenerate(request, timeout=timeout or self.timeout)
            received = False
            try:
                async for reply in call:
                    received = True
                    yield StreamEvent(
                        text=reply.text,
                        token_ids=tuple(reply.token_ids),
                        request_id=reply.request_id,
                        model=reply.model,
                        logprobs=logprobs_of(reply.logprobs),
                        finish_reason=finish_reason_name(reply.finish_reason),
                        usage=usage_of(reply),
                        index=reply.index,
                    )
                return
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                retry = err.code == grpc.StatusCode.UNAVAILABLE and not received
                if not retry or attempt >= self.retries:
                    raise err from None
            finally:
                call.cancel()
            await self._delay(attempt, err)
            attempt += 1

    async def stream_generate(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[str]:
        """Stream the text deltas of a generation (see `stream_events` for the options)."""
        async for event in self.stream_events(prompt, **kwargs):
            if event.text:
                yield event.text

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        model: str = DEFAULT_MODEL,
        sampling: Sampling | None = None,
        logprobs: int | None = None,
        request_id: str = "",
        affinity_key: str = "",
        timeout: float | None = None,
        n: int = 1,
        cache: str = "default",
        response_format: ResponseFormat | None = None,
    ) -> Completion:
        """Run a generation to the end and return it whole (`n` samples in `choices`).

        `response_format`: as for `stream_events`."""
        request = gen.GenerateRequest(
            model=model,
            sampling=(sampling or Sampling()).to_proto(),
            request_id=request_id,
            affinity_key=affinity_key,
            logprobs=logprobs,
            n=n,
            cache=cache_mode(cache),
            response_format=format_proto(response_format),
            **Input.of(prompt, messages, token_ids).fields(),
        )
        reply = await self._unary(
            lambda: self._stub.Generate(request, timeout=timeout or self.timeout)
        )
        return Completion(
            text=reply.text,
            token_ids=tuple(reply.token_ids),
            request_id=reply.request_id,
            model=reply.model,
            finish_reason=finish_reason_name(reply.finish_reason),
            usage=usage_of(reply),
            logprobs=logprobs_of(reply.logprobs),
            choices=tuple(
                Choice(
                    index=c.index,
                    text=c.text,
                    token_ids=tuple(c.token_ids),
                    finish_reason=finish_reason_name(c.finish_reason),
                    logprobs=logprobs_of(c.logprobs),
                )
                for c in reply.choices
            ),
        )

    async def list_models(self) -> list[ModelInfo]:
        """Every model the key may use, following pages."""
        out: list[ModelInfo] = []
        token = ""
        while True:
            request = gen.ListModelsRequest(page_token=token)
            reply = await self._unary(
                lambda r=request: self._stub.ListModels(r, timeout=self.unary_timeout)  # type: ignore[misc]
            )
            out.extend(
                ModelInfo(m.name, m.context_length, m.workers, m.max_running, m.running, m.queued)
                for m in reply.models
            )
            token = reply.next_page_token
            if not token:
                return out

    async def count_tokens(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        model: str = DEFAULT_MODEL,
    ) -> int:
        """How many tokens the input is for `model` (chat template included)."""
        request = gen.CountTokensRequest(
            model=model, **Input.of(prompt, messages, token_ids).fields()
        )
        reply = await self._unary(
            lambda: self._stub.CountTokens(request, timeout=self.unary_timeout)
        )
        return int(reply.token_count)
