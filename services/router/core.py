"""What the router does for each call, in order, free of gRPC server types.

authenticate → validate → authorize (permission, model) → limits and quota →
response cache (a hit replays a stored answer) or relay across workers → settle
limits and record usage. A request never reaches a worker before it passed every
check. Usage is recorded for every stream that
was admitted, whether it completed, was cancelled or failed, billing the tokens
the client received.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TokenyardError,
    Unavailable,
)
from services.common.requests import (
    DEFAULT_MAX_N,
    GenerationRequest,
    check_model,
    check_size,
    generation_request_off_loop,
    input_of,
    page_size_of,
)
from services.router import metrics
from services.router.admission import (
    admission,
    effective_max_tokens,
    requests_only,
    reservation,
)
from services.router.auth_client import AuthClient, CachedPrincipal, bearer_credential
from services.router.limits import Limits, Slot
from services.router.relay import PASS_THROUGH, Relay, StreamState, WorkerError
from services.router.response_cache import Lookup, ResponseCache, complete, recording, replay
from services.router.usage import UsageReporter
from services.router.workers import WorkerPool
from services.router.writer import Emit

log = logging.getLogger("tokenyard.router")


@dataclass
class Deps:
    """The router's collaborators, built by `services.router.app`."""

    auth: AuthClient
    limits: Limits
    pool: WorkerPool
    relay: Relay
    usage: UsageReporter
    max_n: int = DEFAULT_MAX_N  # samples per request (`n`)
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias → the model's name
    cache: ResponseCache | None = None  # the response cache (None: off)


class RouterCore:
    """Authorizes, limits, relays and accounts each generation request."""

    def __init__(self, deps: Deps) -> None:
        self.auth, self.limits, self.pool = deps.auth, deps.limits, deps.pool
        self.relay, self.usage = deps.relay, deps.usage
        self.aliases = deps.aliases
        self.max_n = deps.max_n
        self.cache = deps.cache
        self._background: set[asyncio.Task[None]] = set()
        self._active = 0  # generations between their start and their settlement spawn
        self._idle = asyncio.Event()
        self._idle.set()

    # -- checks -----------------------------------------------------------------

    def canonical(self, model: str) -> str:
        """The model's own name for an alias (itself otherwise): roles, limits, routing
        and usage rows see one name per model, whichever name the caller used."""
        return self.aliases.get(model, model)

    async def principal(self, authorization: str | None) -> CachedPrincipal:
        """The caller's principal (UNAUTHENTICATED / UNAVAILABLE otherwise)."""
        return await self.auth.authenticate(bearer_credential(authorization))

    def authorize_model(self, entry: CachedPrincipal, model: str, permission: str) -> None:
        """PERMISSION_DENIED unless `entry` holds `permission` and may use `model`."""
        if not entry.may(permission):
            raise PermissionDenied(
                f"this credential lacks the {permission!r} permission", reason="PERMISSION_MISSING"
            )
        if not entry.may_use(model):
            raise PermissionDenied(
                f"model {model!r} is not allowed for this credential", reason="MODEL_NOT_ALLOWED"
            )
        if not self.pool.model_known(model):
            if self.pool.undescribed() or not self.pool.workers:
                raise Unavailable("no worker is reachable yet", reason="NO_HEALTHY_WORKER")
            raise NotFound(
                f"model {model!r} is not served", reason="MODEL_NOT_FOUND", field="model"
            )

    # -- generation -------------------------------------------------------------

    async def generate(
        self,
        authorization: str | None,
        request: gen.StreamGenerateRequest,
        emit: Emit,
        *,
        deadline: float | None,
        method: str,
    ) -> StreamState:
        """Run one generation, emitting its messages; the state says what was produced."""
        self._active += 1
        self._idle.clear()
        try:
            return await self._generate(
                authorization, request, emit, deadline=deadline, method=method
            )
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _generate(
        self,
        authorization: str | None,
        request: gen.StreamGenerateRequest,
        emit: Emit,
        *,
        deadline: float | None,
        method: str,
    ) -> StreamState:
        started = time.perf_counter()
        wall_start = time.time()
        try:
            entry, slot, router_id, checked = await self._admit(authorization, request, wall_start)
        except TokenyardError as exc:
            metrics.REQUESTS.labels(method, "", exc.code.name).inc()  # refused before routing
            raise
        state = StreamState()
        code = grpc.StatusCode.OK
        lookup = self._lookup(entry, request, checked)
        try:
            if await self._replay(lookup, request, emit, state):
                return state
            recorded: list[bytes] = []
            if lookup is not None:
                emit = recording(emit, recorded)
            await self.relay.run(request, emit, state, deadline=deadline, started=started)
            if lookup is not None and complete(state, checked.n):
                # Before the call ends, so the caller's next request finds the entry.
                await self._store(lookup, state.revision, recorded)
        except TokenyardError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            if (
                code == grpc.StatusCode.CANCELLED
                and deadline is not None
                and time.monotonic() >= deadline
            ):
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            metrics.REQUESTS.labels(method, request.model, code.name).inc()
            self._spawn(
                self._settle(
                    entry=entry,
                    request=request,
                    state=state,
                    slot=slot,
                    router_id=router_id,
                    wall_start=wall_start,
                    code=code,
                )
            )
        return state

    def _lookup(
        self, entry: CachedPrincipal, request: gen.StreamGenerateRequest, checked: GenerationRequest
    ) -> Lookup | None:
        """The request's response cache lookup; None when the cache must not be used."""
        if self.cache is None:
            return None
        return self.cache.plan(
            limits=entry.principal.limits,
            user_id=entry.principal.user_id,
            request=request,
            sampling=checked.sampling,
            mode=checked.cache,
        )

    async def _replay(
        self,
        lookup: Lookup | None,
        request: gen.StreamGenerateRequest,
        emit: Emit,
        state: StreamState,
    ) -> bool:
        """Answer from the cache when it may and an entry exists (True); no worker runs."""
        if self.cache is None or lookup is None or not lookup.read:
            return False
        revisions = {w.revision for w in self.pool.for_model(request.model)}
        messages = await self.cache.find(lookup, revisions)
        if messages is None:
            return False
        await replay(messages, request.request_id, emit, state)
        return True

    async def _store(self, lookup: Lookup, revision: str, recorded: list[bytes]) -> None:
        assert self.cache is not None
        await self.cache.store_answer(lookup, revision, recorded)

    async def _admit(
        self, authorization: str | None, request: gen.StreamGenerateRequest, wall_start: float
    ) -> tuple[CachedPrincipal, Slot, str, GenerationRequest]:
        """Every check before routing; the principal, its limit slot and the router's id."""
        entry = await self.principal(authorization)
        request.model = self.canonical(request.model)
        checked = await generation_request_off_loop(request, from_caller=True, max_n=self.max_n)
        self.authorize_model(entry, checked.model, "generate")
        context_length = self.pool.context_length(checked.model)
        check_size(checked.input, context_length)
        requested = checked.sampling.max_tokens
        max_tokens = effective_max_tokens(requested, entry.principal.limits)
        if max_tokens is not None and max_tokens != requested:
            request.sampling.max_tokens = max_tokens
        router_id = uuid.uuid4().hex
        if not request.request_id:
            request.request_id = router_id
        reserve = reservation(request, context_length, checked.n)
        slot = await self.limits.admit(admission(entry.principal, router_id, reserve=reserve))
        return entry, slot, router_id, checked

    async def _settle(
        self,
        *,
        entry: CachedPrincipal,
        request: gen.StreamGenerateRequest,
        state: StreamState,
        slot: Slot,
        router_id: str,
        wall_start: float,
        code: grpc.StatusCode,
    ) -> None:
        """Free the limit slot and record usage (after the stream, off the client's path).

        Whatever is raised while counting, the slot is settled and usage recorded. A
        cache hit counts as a request of no tokens: no worker read or wrote any.
        """
        cached = state.cached_tokens
        completion = 0 if cached else len(state.tokens)
        prompt = 0 if cached else (state.prompt_tokens or 0)
        try:
            if state.prompt_tokens is None and state.attempts:
                prompt = await self._count_prompt(request)
        finally:
            try:
                await slot.settle(prompt + completion)
            finally:
                metrics.TOKENS_IN.labels(request.model).inc(prompt)
                metrics.TOKENS_OUT.labels(request.model).inc(completion)
                self.usage.record(
                    request_id=router_id,
                    credential_id=entry.credential_id,
                    user_id=entry.principal.user_id,
                    model=request.model,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    start_time=wall_start,
                    status=code.name,
                    end_user=request.end_user,
                    cached_completion_tokens=cached,
                )

    async def _count_prompt(self, request: gen.StreamGenerateRequest) -> int:
        """Prompt tokens of a stream that ended before the worker said (cancel, failure)."""
        if request.WhichOneof("input") == "token_ids":
            return len(request.token_ids.ids)
        count = gen.CountTokensRequest(model=request.model)
        if request.WhichOneof("input") == "prompt":
            count.prompt = request.prompt
        else:
            count.messages.CopyFrom(request.messages)
        try:
            raw = await self.count_tokens_raw(count, timeout=2.0)
            return gen.CountTokensResponse.FromString(raw).token_count
        except TokenyardError:
            return 0
        except Exception:
            log.exception("counting the prompt of a cut stream failed; billed without it")
            return 0

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("settling a request failed", exc_info=task.exception())

    async def drain_background(self, timeout: float = 5.0) -> None:
        """Wait for pending settlements (graceful stop, tests).

        Streams the server cancelled at stop settle only once their handlers have
        unwound, which can be after `server.stop` returned: wait for those first.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

    # -- side calls ---------------------------------------------------------------

    async def count_tokens_raw(self, request: gen.CountTokensRequest, timeout: float) -> bytes:
        """A worker's CountTokens answer (raw bytes), failing over between workers."""
        tried: set[str] = set()
        for _ in range(self.relay.max_attempts):
            workers = [w for w in self.pool.for_model(request.model) if w.address not in tried]
            if not workers:
                break
            worker = min(workers, key=lambda w: w.inflight)
            tried.add(worker.address)
            try:
                raw = await worker.count_tokens(request, timeout=timeout, metadata=worker.metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in PASS_THROUGH:
                    raise WorkerError(exc) from None
                worker.eject(exc.code().name)
                continue
            assert isinstance(raw, bytes)
            return raw
        raise Unavailable(
            f"no healthy worker for model {request.model!r}", reason="NO_HEALTHY_WORKER"
        )

    async def count_tokens(
        self, authorization: str | None, request: gen.CountTokensRequest, timeout: float | None
    ) -> bytes:
        """CountTokens, checked and limited as a generation (it holds a stream slot)."""
        entry = await self.principal(authorization)
        request.model = self.canonical(request.model)
        model = check_model(request.model)
        given = input_of(request)
        self.authorize_model(entry, model, "generate")
        check_size(given, self.pool.context_length(model))
        slot = await self.limits.admit(admission(entry.principal, uuid.uuid4().hex))
        try:
            return await self.count_tokens_raw(request, timeout or 10.0)
        finally:
            await slot.settle(0)

    async def list_models(
        self, authorization: str | None, request: gen.ListModelsRequest
    ) -> gen.ListModelsResponse:
        """The models the caller may use, with the capacity behind them, by name."""
        entry = await self.principal(authorization)
        if not (entry.may("models.list") or entry.may("generate")):
            raise PermissionDenied(
                "this credential lacks the 'models.list' permission", reason="PERMISSION_MISSING"
            )
        await self.limits.admit(requests_only(entry.principal, uuid.uuid4().hex))
        size = page_size_of(request.page_size)
        after = ""
        if request.page_token:
            try:
                after = base64.urlsafe_b64decode(request.page_token.encode()).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise InvalidArgument("page_token", "not a token this service issued") from None
        names = sorted(name for name in self.pool.models() if entry.may_use(name) and name > after)
        by_model = self.pool.models()
        reply = gen.ListModelsResponse()
        for name in names[:size]:
            workers = by_model[name]
            reply.models.append(
                gen.Model(
                    name=name,
                    context_length=max(w.context_length for w in workers),
                    workers=len(workers),
                    max_running=sum(w.max_running for w in workers),
                    running=sum(w.running for w in workers),
                    queued=sum(w.queued for w in workers),
                )
            )
        if len(names) > size:
            reply.next_page_token = base64.urlsafe_b64encode(names[size - 1].encode()).decode()
        return reply
