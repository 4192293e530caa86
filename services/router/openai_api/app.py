"""The OpenAI-compatible HTTP API: a view of the router's GenerationService.

GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/completions and GET /health. Every call authenticates with
`Authorization: Bearer <key>` through the router's cached Authenticate; each
request gets an id (X-Request-Id in and out) carried in logs and traces; one
access-log line and metrics per call, labelled by protocol.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import InvalidArgument, NotFound, TokenyardError
from services.common.logs import request_id_var
from services.common.requests import valid_request_id
from services.common.telemetry import tracer
from services.router.core import RouterCore
from services.router.openai_api import convert
from services.router.openai_api.errors import envelope, error_body, from_validation, retry_headers
from services.router.openai_api.generation import Generation
from services.router.openai_api.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("tokenyard.access")
errlog = logging.getLogger("tokenyard.router.http")

HTTP_REQUESTS = Counter(
    "tokenyard_router_http_requests_total",
    "OpenAI-compatible HTTP requests, by route and HTTP status.",
    ["route", "status"],
)
HTTP_SECONDS = Histogram(
    "tokenyard_router_http_request_seconds",
    "Duration of OpenAI-compatible HTTP requests (whole streams included), by route.",
    ["route"],
)

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class HttpOptions:
    """What the HTTP API needs besides the router core."""

    force_usage: bool = False
    max_body_bytes: int = 16 * 1024 * 1024


def build_app(core: RouterCore, options: HttpOptions) -> Starlette:
    """The Starlette application serving the OpenAI-compatible API over `core`."""
    api = _Api(core, options)
    routes = [
        Route("/health", api.call("health", api.health), methods=["GET"]),
        Route("/v1/models", api.call("models", api.models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.call("model", api.model), methods=["GET"]),
        Route("/v1/chat/completions", api.call("chat", api.chat), methods=["POST"]),
        Route("/v1/completions", api.call("completions", api.completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(envelope(f"no route {request.url.path}", 404, code="not_found"), 404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    body = envelope(f"{request.method} is not allowed here", 405, code="method_not_allowed")
    return JSONResponse(body, 405)


class _Api:
    def __init__(self, core: RouterCore, options: HttpOptions) -> None:
        self.core, self.options = core, options
        self.tracer = tracer("tokenyard.router.http")

    def call(self, route: str, handler: Handler) -> Handler:
        """`handler` with the request id, a span, error mapping, access log and metrics."""

        async def endpoint(request: Request) -> Response:
            return _Call(self, route, handler, request)

        return endpoint

    async def _respond(self, request: Request, handler: Handler, request_id: str) -> Response:
        try:
            return await handler(request)
        except TokenyardError as exc:
            request.state.reason = exc.reason
            status, body = error_body(exc, exc.field)
            headers = {"x-request-id": request_id, **retry_headers(exc)}
            return JSONResponse(body, status, headers=headers)
        except Exception:
            errlog.exception("unexpected error in %s %s", request.method, request.url.path)
            body = envelope(f"internal error (request id {request_id})", 500)
            return JSONResponse(body, 500, headers={"x-request-id": request_id})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _all_models(self, request: Request) -> list[gen.Model]:
        authorization = request.headers.get("authorization")
        page = gen.ListModelsRequest(page_size=1000)
        models: list[gen.Model] = []
        while True:
            reply = await self.core.list_models(authorization, page)
            models += reply.models
            if not reply.next_page_token:
                return models
            page.page_token = reply.next_page_token

    async def models(self, request: Request) -> Response:
        data = [_model(m) for m in await self._all_models(request)]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model_id"]
        wanted = self.core.canonical(name)  # an alias shows its model
        for found in await self._all_models(request):
            if found.name == wanted:
                return JSONResponse(_model(found))
        raise NotFound(f"model {name!r} is not served", reason="MODEL_NOT_FOUND", field="model")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest, "http.ChatCompletions")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest, "http.Completions")

    async def _generate(
        self, request: Request, kind: type[ChatCompletionRequest | CompletionRequest], method: str
    ) -> Response:
        authorization = request.headers.get("authorization")
        await self.core.principal(authorization)  # 401 before any complaint about the body
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.options.max_body_bytes:
            raise InvalidArgument("body", f"larger than {self.options.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > self.options.max_body_bytes:
            raise InvalidArgument("body", f"larger than {self.options.max_body_bytes} bytes")
        try:
            body = kind.model_validate_json(raw)
        except ValidationError as exc:
            raise from_validation(exc) from None
        body.refuse_unsupported()
        request_id = request.state.request_id
        if isinstance(body, ChatCompletionRequest):
            grpc_request = convert.chat_request(body, request_id)
        else:
            grpc_request = convert.completion_request(body, request_id)
        return _GenerationResponse(
            Generation(
                self.core, authorization, body, grpc_request, method, self.options.force_usage
            )
        )


def _model(model: gen.Model) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": 0,
        "owned_by": "tokenyard",
        "context_length": model.context_length,
    }


class _GenerationResponse(Response):
    """A Starlette response whose body and status the generation decides."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.status_code = 200

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.generation(scope, receive, send)


class _Call(Response):
    """One HTTP call: everything, the body included, runs with its request id and span."""

    def __init__(self, api: _Api, route: str, handler: Handler, request: Request) -> None:
        self.api, self.route, self.handler, self.request = api, route, handler, request
        self.status_code = 200

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = self.request
        given = request.headers.get("x-request-id", "")
        request_id = given if valid_request_id(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 499  # cancelled before a response went out
        try:
            with self.api.tracer.start_as_current_span(f"HTTP {self.route}") as span:
                span.set_attribute("tokenyard.request_id", request_id)
                response = await self.api._respond(request, self.handler, request_id)
                status = response.status_code
                try:
                    await response(scope, receive, send)
                finally:
                    if isinstance(response, _GenerationResponse):
                        outcome = response.generation.outcome
                        status = outcome.status
                        if outcome.error is not None:
                            request.state.reason = outcome.error.reason
                    span.set_attribute("http.response.status_code", status)
        finally:
            _access(self.route, request, status, start)
            request_id_var.reset(token)


def _access(route: str, request: Request, status: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    HTTP_REQUESTS.labels(route, str(status)).inc()
    HTTP_SECONDS.labels(route).observe(elapsed)
    level = logging.DEBUG if route == "health" else logging.INFO
    client = request.client
    log.log(
        level,
        "HTTP %s %s %d",
        request.method,
        request.url.path,
        status,
        extra={
            "method": f"http.{route}",
            "protocol": "http",
            "code": status,
            "reason": getattr(request.state, "reason", ""),
            "duration_ms": round(elapsed * 1000, 3),
            "peer": f"{client.host}:{client.port}" if client else "",
            "request_id": request_id_var.get(),
        },
    )
