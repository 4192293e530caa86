"""GenerationService on the public port: proto in, proto (or relayed bytes) out.

Requests are registered with an identity deserializer and decoded here
(`lenient.decode`), so that invalid UTF-8 is INVALID_ARGUMENT naming the field,
and streamed responses with a serializer that passes bytes through, so worker
messages are relayed as they came. Everything else is `services.router.core`.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.choices import add_to_choice, finish_choices
from services.common.interceptors import metadata_value
from services.common.lenient import decode
from services.router.core import RouterCore
from services.router.relay import StreamState

SERVICE_NAME = "tokenyard.generation.v1.GenerationService"


def _identity(raw: bytes) -> bytes:
    return raw


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RouterServicer:
    """The public GenerationService."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def StreamGenerate(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        request = decode(gen.StreamGenerateRequest, raw)
        await self.core.generate(
            metadata_value(context, "authorization"),
            request,
            context.write,
            deadline=_deadline(context),
            method="StreamGenerate",
        )

    async def Generate(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gen.GenerateResponse:
        unary = decode(gen.GenerateRequest, raw)
        request = gen.StreamGenerateRequest.FromString(unary.SerializeToString())
        reply = gen.GenerateResponse()
        choices: dict[int, gen.Choice] = {}

        async def collect(payload: bytes | gen.StreamGenerateResponse) -> None:
            message = (
                gen.StreamGenerateResponse.FromString(payload)
                if isinstance(payload, bytes)
                else payload
            )
            add_to_choice(choices, message)
            if message.HasField("usage"):
                reply.usage.CopyFrom(message.usage)

        state: StreamState = await self.core.generate(
            metadata_value(context, "authorization"),
            request,
            collect,
            deadline=_deadline(context),
            method="Generate",
        )
        del state
        finish_choices(reply, choices)
        reply.request_id = request.request_id
        reply.model = request.model
        return reply

    async def CountTokens(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        request = decode(gen.CountTokensRequest, raw)
        return await self.core.count_tokens(
            metadata_value(context, "authorization"), request, context.time_remaining()
        )

    async def ListModels(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gen.ListModelsResponse:
        request = decode(gen.ListModelsRequest, raw)
        return await self.core.list_models(metadata_value(context, "authorization"), request)


def add_router_servicer(servicer: RouterServicer, server: grpc.aio.Server) -> None:
    """Register the servicer with raw-bytes requests and pass-through responses."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_identity, response_serializer=_serialize
        ),
        "StreamGenerate": grpc.unary_stream_rpc_method_handler(
            servicer.StreamGenerate, request_deserializer=_identity, response_serializer=_serialize
        ),
        "CountTokens": grpc.unary_unary_rpc_method_handler(
            servicer.CountTokens, request_deserializer=_identity, response_serializer=_serialize
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=_identity, response_serializer=_serialize
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
