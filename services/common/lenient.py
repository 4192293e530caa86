"""Requests that do not decode get INVALID_ARGUMENT naming the field, not UNKNOWN.

grpcio answers a request its deserializer rejects with UNKNOWN and protobuf's
message. A proto3 string holding invalid UTF-8 is such a request (clients in some
languages can send one). Registering a service through `lenient` makes the
deserializer keep the bytes instead; the handler then raises InvalidArgument
with the path of the offending field (``messages.messages[0].content``), which
the error interceptor sends like any other bad field.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.common.errors import InvalidArgument

_LENGTH_DELIMITED = 2
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Undecodable:
    """The bytes of a request that failed to decode, with the message type expected."""

    descriptor: Descriptor
    data: bytes

    def error(self) -> InvalidArgument:
        """The InvalidArgument to answer with."""
        field = bad_utf8_field(self.descriptor, self.data)
        if field is not None:
            return InvalidArgument(field, "invalid UTF-8")
        return InvalidArgument("request", "not a valid encoded message")


def decode(kind: type[M], data: bytes) -> M:
    """`data` as a `kind`, or the InvalidArgument naming the field that spoils it."""
    try:
        return kind.FromString(data)
    except DecodeError:
        raise Undecodable(cast(Descriptor, kind.DESCRIPTOR), data).error() from None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise IndexError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Path of the first string field in `data` that is not valid UTF-8, if any."""
    pos = 0
    seen: dict[int, int] = {}
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
                continue
            if wire in (1, 5):
                pos += 8 if wire == 1 else 4
                continue
            if wire != _LENGTH_DELIMITED:
                return None
            length, pos = _varint(data, pos)
            chunk, pos = data[pos : pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if field.is_repeated:
                index = seen.get(number, 0)
                seen[number] = index + 1
                name += f"[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
                found = bad_utf8_field(field.message_type, chunk, name + ".")
                if found is not None:
                    return found
    except IndexError:
        return None
    return None


def _deserializer(original: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    cls = getattr(original, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    if descriptor is None:
        return original

    def parse(data: bytes) -> Any:
        try:
            return original(data)
        except DecodeError:
            return Undecodable(descriptor, data)

    return parse


def _handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = _deserializer(handler.request_deserializer)
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def call(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                raise request.error()
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(call, deserialize, handler.response_serializer)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream
        if not inspect.isasyncgenfunction(streaming):  # writes with context.write

            async def written(request: Any, context: Any) -> None:
                if isinstance(request, Undecodable):
                    raise request.error()
                await streaming(request, context)

            return grpc.unary_stream_rpc_method_handler(
                written, deserialize, handler.response_serializer
            )

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                raise request.error()
            # Closed here, in the call's task, when the caller closes this generator.
            async with contextlib.aclosing(streaming(request, context)) as items:
                async for item in items:
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            stream, deserialize, handler.response_serializer
        )
    return handler  # client-streaming RPCs decode message by message; none here


class _Registrar:
    """Stands in for the server while a generated add_*_to_server registers handlers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: add_registered_method_handlers registers the wrapped ones."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {name: _handler(h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)


def lenient(
    register: Callable[[Any, Any], None],
) -> Callable[[Any, grpc.aio.Server], None]:
    """Wrap a generated `add_XServicer_to_server` so bad request bytes name their field."""

    def add(servicer: Any, server: grpc.aio.Server) -> None:
        register(servicer, _Registrar(server))

    return add
