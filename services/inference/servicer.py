"""GenerationService on a worker: proto in, proto out, over `Worker`.

The router is the only caller. A call's gRPC deadline becomes the engine
request's deadline; a cancelled call closes the engine stream, which frees the
sequence's slot within one decode step.

Usage semantics the router relies on: `usage.completion_tokens` counts every
generated token of the request, including `continuation_token_ids` (which also
count toward `max_tokens`); `prompt_tokens` counts the input alone. Responses
carry only the tokens and text this call produced: continuation text is never
sent again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.common.errors import InvalidArgument
from services.common.logs import request_id_var
from services.common.requests import page_size_of
from services.inference.streaming import collect
from services.inference.worker import Worker

SERVICE_NAME = "tokenyard.generation.v1.GenerationService"


def deadline_of(context: Any) -> float | None:
    """The call's deadline as a `time.monotonic()` instant (None without one)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GenerationServicer(gen_grpc.GenerationServiceServicer):
    """Generate, StreamGenerate, ListModels and CountTokens for this worker's model."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def Generate(self, request: gen.GenerateRequest, context: Any) -> gen.GenerateResponse:
        prep = await self.worker.prepare(request)
        request_id_var.set(prep.request_id)
        messages: list[gen.StreamGenerateResponse] = []
        stream = self.worker.generate(prep, deadline_of(context))
        async with contextlib.aclosing(stream):
            async for message in stream:
                messages.append(message)
        return collect(prep.request_id, self.worker.info.model, messages)

    async def StreamGenerate(
        self, request: gen.StreamGenerateRequest, context: Any
    ) -> AsyncIterator[gen.StreamGenerateResponse]:
        prep = await self.worker.prepare(request)
        request_id_var.set(prep.request_id)
        stream = self.worker.generate(prep, deadline_of(context))
        async with contextlib.aclosing(stream):
            async for message in stream:
                yield message

    async def ListModels(
        self, request: gen.ListModelsRequest, context: Any
    ) -> gen.ListModelsResponse:
        page_size_of(request.page_size)  # one model: any valid size holds the page
        if request.page_token:
            raise InvalidArgument("page_token", "unknown page token")
        info = self.worker.info
        stats = self.worker.engine.stats()
        model = gen.Model(
            name=info.model,
            context_length=info.context_length,
            workers=0 if self.worker.draining else 1,
            max_running=info.max_running,
            running=stats.running,
            queued=stats.queued,
        )
        return gen.ListModelsResponse(models=[model])

    async def CountTokens(
        self, request: gen.CountTokensRequest, context: Any
    ) -> gen.CountTokensResponse:
        count = await self.worker.count_tokens(request)
        return gen.CountTokensResponse(
            model=self.worker.info.model,
            token_count=count,
            context_length=self.worker.info.context_length,
        )
