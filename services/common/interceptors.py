"""Server interceptors: request id, access log, metrics, errors → statuses.

Only this module turns domain errors (`services.common.errors`) into gRPC
statuses. Anything unexpected becomes INTERNAL with a generic message; the
stack trace goes to the log alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from services.common.errors import TokenyardError, Unauthenticated
from services.common.logs import request_id_var
from services.common.requests import valid_request_id
from services.common.status import grpc_code_name, to_grpc_status

log = logging.getLogger("tokenyard.access")
errlog = logging.getLogger("tokenyard.errors")

REQUEST_ID_HEADER = "x-request-id"
SERVICE_TOKEN_HEADER = "x-tokenyard-service-token"
_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

RPC_REQUESTS = Counter(
    "tokenyard_grpc_requests_total", "gRPC calls served, by method and status.", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "tokenyard_grpc_request_duration_seconds",
    "Time from call start to its end (whole stream for streaming calls).",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

Behaviour = Callable[..., Any]


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    """The single value of `key` in the call's metadata (None when absent)."""
    values = [v for k, v in (context.invocation_metadata() or ()) if k == key]
    return str(values[0]) if values else None


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], err: TokenyardError) -> None:
    """End the call with `err`'s status, message and `google.rpc.Status` details."""
    await context.abort_with_status(to_grpc_status(err))


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour, bool], Behaviour]) -> Any:
    """A copy of `handler` whose behaviour is `wrap(behaviour, streaming_response)`."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False),
            handler.request_deserializer,
            handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True),
        handler.request_deserializer,
        handler.response_serializer,
    )


class StreamClosingInterceptor(grpc.aio.ServerInterceptor):
    """Sends streamed responses with `context.write`, closing the stream in its own task.

    grpc.aio iterates a handler's async generator itself. When a call is cancelled
    while grpc is blocked sending (a client that stopped reading, then cancelled),
    grpc cancels the task at that send and abandons the generator: its cleanup
    (freeing an engine slot, cancelling the upstream call) then waits for garbage
    collection and runs in another task and context. Outermost in the stack, this
    interceptor hands grpc a coroutine instead, writes each message itself, and
    closes the generator in the same task however the call ends.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not (handler.unary_stream or handler.stream_stream):
            return handler

        def wrap(behaviour: Behaviour, streaming: bool) -> Behaviour:
            async def write_all(request: Any, context: Any) -> None:
                result = behaviour(request, context)
                if not hasattr(result, "__aiter__"):  # already writes with context.write
                    await result
                    return
                async with contextlib.aclosing(result):
                    async for message in result:
                        await context.write(message)

            return write_all

        return _rewrap(handler, wrap)  # type: ignore[no-any-return]


class ClosingInnerStreams(grpc.aio.ServerInterceptor):
    """Runs a third-party interceptor, closing the streams it iterates in the call's task.

    OpenTelemetry's server interceptor re-yields the handler's stream but does not
    close it when it is closed itself, so the stream's cleanup (the worker's spans,
    the request-id context, the engine slot) was left to asyncio's finaliser in a
    new task, where resetting context variables fails. This hands `inner` streams
    it tracks and closes them, innermost first, right before `inner`'s own.
    """

    def __init__(self, inner: grpc.aio.ServerInterceptor) -> None:
        self._inner = inner

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        opened: list[Any] = []  # this call's streams handed to `inner`

        def track(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if not streaming:
                return behaviour

            def open_stream(request: Any, context: Any) -> Any:
                result = behaviour(request, context)
                if hasattr(result, "aclose"):
                    opened.append(result)
                return result

            return open_stream

        async def tracked(inner_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            handler = await continuation(inner_details)
            return handler if handler is None else _rewrap(handler, track)

        handler = await self._inner.intercept_service(tracked, details)
        if handler is None:
            return handler

        def wrap(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if not streaming:
                return behaviour

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                outer = behaviour(request, context)
                try:
                    async for item in outer:
                        yield item
                finally:
                    for inner in reversed(opened):
                        await inner.aclose()
                    await outer.aclose()

            return stream

        return _rewrap(handler, wrap)  # type: ignore[no-any-return]


class ServerErrorInterceptor(grpc.aio.ServerInterceptor):
    """Request id, one access-log line per call, metrics, and error mapping.

    Successful calls of `quiet_methods` (full names; high-rate internal RPCs such
    as router → auth Authenticate) are logged at DEBUG; their failures stay INFO.
    """

    def __init__(self, quiet_methods: Collection[str] = ()) -> None:
        self._quiet_ok = frozenset(quiet_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        quiet = method.startswith(_QUIET_PREFIXES)
        quiet_ok = method in self._quiet_ok

        def wrap(behaviour: Behaviour, streaming: bool) -> Behaviour:
            if streaming:

                async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                    state = _Call(method, context, quiet, quiet_ok)
                    try:
                        result = behaviour(request, context)
                        if hasattr(result, "__aiter__"):
                            async with contextlib.aclosing(result):  # in this task
                                async for item in result:
                                    yield item
                        else:  # a coroutine that writes with context.write
                            await result
                    except BaseException as exc:
                        await state.fail(exc)
                    finally:
                        state.finish()

                return stream

            async def unary(request: Any, context: Any) -> Any:
                state = _Call(method, context, quiet, quiet_ok)
                try:
                    return await behaviour(request, context)
                except BaseException as exc:
                    await state.fail(exc)
                finally:
                    state.finish()

            return unary

        return _rewrap(handler, wrap)  # type: ignore[no-any-return]


class _Call:
    """Bookkeeping of one call: its request id, timing and final status."""

    def __init__(self, method: str, context: Any, quiet: bool, quiet_ok: bool = False) -> None:
        self.method, self.context, self.quiet, self.quiet_ok = method, context, quiet, quiet_ok
        # Read now: peer() on a call torn down by a server stop can crash grpc's cython layer.
        self.peer = context.peer()
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.recorded = False
        given = metadata_value(context, REQUEST_ID_HEADER) or ""
        self.request_id = given if valid_request_id(given) else uuid.uuid4().hex
        self.token = request_id_var.set(self.request_id)

    async def fail(self, exc: BaseException) -> None:
        """Map `exc` to a status and end the call with it (re-raises control flow)."""
        if isinstance(exc, TokenyardError):
            self.code = exc.code
            self.record()  # before the status goes out: the client may act on it at once
            await abort_with(self.context, exc)
        if isinstance(exc, grpc.aio.AbortError | GeneratorExit):
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        if isinstance(exc, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        self.code = grpc.StatusCode.INTERNAL
        errlog.error(
            "unexpected error in %s", self.method, exc_info=exc, extra={"method": self.method}
        )
        self.record()
        await self.context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {self.request_id})"
        )

    def record(self) -> None:
        """Count the call and write its access-log line, once."""
        if self.recorded:
            return
        self.recorded = True
        elapsed = time.perf_counter() - self.start
        name = grpc_code_name(self.code)
        RPC_REQUESTS.labels(self.method, name).inc()
        RPC_SECONDS.labels(self.method).observe(elapsed)
        quiet = self.quiet or (self.quiet_ok and self.code == grpc.StatusCode.OK)
        level = logging.DEBUG if quiet else logging.INFO
        log.log(
            level,
            "%s %s",
            self.method,
            name,
            extra={
                "method": self.method,
                "code": name,
                "duration_ms": round(elapsed * 1000, 3),
                "peer": self.peer,
                "request_id": self.request_id,
            },
        )

    def finish(self) -> None:
        """End of the call: record it (if an error did not already) and reset the request id."""
        self.record()
        # A generator finalised outside its call's task runs in another context,
        # where the token cannot be reset; that context is discarded anyway.
        with contextlib.suppress(ValueError):
            request_id_var.reset(self.token)


class ServiceTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses internal RPCs that do not carry the shared service token.

    `methods` lists the full method names to protect; None protects every method
    but health and reflection (a worker: only the router may call it).
    """

    def __init__(self, token: str, methods: Collection[str] | None = None) -> None:
        self._token = token.encode()
        self._methods = set(methods) if methods is not None else None

    def _protected(self, method: str) -> bool:
        if self._methods is not None:
            return method in self._methods
        return not method.startswith(_QUIET_PREFIXES)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or not self._protected(method):
            return handler
        given = ""
        for key, value in details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == SERVICE_TOKEN_HEADER and isinstance(value, str):
                given = value
        if hmac.compare_digest(given.encode(), self._token):
            return handler

        def wrap(behaviour: Behaviour, streaming: bool) -> Behaviour:
            err = Unauthenticated(
                "this internal endpoint needs the service credential", reason="SERVICE_TOKEN"
            )
            if streaming:

                async def refuse_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                    await abort_with(context, err)
                    yield  # pragma: no cover - abort raises

                return refuse_stream

            async def refuse(request: Any, context: Any) -> Any:
                await abort_with(context, err)

            return refuse

        return _rewrap(handler, wrap)  # type: ignore[no-any-return]
