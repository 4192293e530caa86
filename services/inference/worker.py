"""The worker's domain layer: one model behind the engine, as the router needs it.

Requests are checked and rendered here, run through the engine, and turned into
stream messages; drain, load reports and the description live here too. Nothing
in this module knows about gRPC: the servicers translate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.requests import (
    DEFAULT_MAX_N,
    HasInput,
    Input,
    Sampling,
    check_model,
    check_token_ids,
    generation_request_off_loop,
    input_of,
    resolve_max_tokens,
)
from services.common.telemetry import tracer
from services.inference import metrics
from services.inference.engine.engine import Engine
from services.inference.engine.grammar import CompiledGrammar, GrammarError
from services.inference.engine.types import (
    FINISH_CANCELLED,
    EngineClosed,
    EngineError,
    EngineFull,
    EngineRequest,
    EngineSaturated,
    EngineStats,
    TokenEvent,
)
from services.inference.inputs import RenderedInput, render_input
from services.inference.streaming import ResponseAssembler, SampleSet

log = logging.getLogger("tokenyard.inference")
_tracer = tracer("tokenyard.inference")
FULL_RETRY_AFTER_S = 0.5


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[Any]) -> AsyncIterator[None]:
    """Close an engine stream on exit: the engine then frees the request's slot."""
    try:
        yield
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def tokenyard_version() -> str:
    """The installed tokenyard version (0.0.0 when run from a bare checkout)."""
    try:
        return importlib.metadata.version("tokenyard")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class WorkerInfo:
    """What Describe reports: the model, the limits and where it runs."""

    model: str
    context_length: int
    vocab_size: int
    max_running: int
    max_queued: int
    device: str
    dtype: str
    prefix_cache: bool
    version: str
    execution_path: str = "fast"  # "fast" (the engine's forward pass) or "generic"
    model_revision: str = ""  # content hash of the weights (LoadedModel.revision)
    quantization: str = "none"  # "none", "int8" or "int4" (the engine's weights)


@dataclass(frozen=True)
class LoadReport:
    """One WatchLoad report."""

    stats: EngineStats
    draining: bool
    queue_p50: float = 0.0  # seconds, over the requests admitted in the last minute
    queue_p95: float = 0.0

    def key(self) -> tuple[int, int, int, bool]:
        """The part of the report whose change triggers a report at once."""
        return (self.stats.running, self.stats.queued, self.stats.free_slots, self.draining)


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request, ready for the engine: `sampling.max_tokens` is resolved."""

    request_id: str
    prompt_ids: list[int]
    continuation_ids: list[int]
    sampling: Sampling
    n: int = 1  # samples sharing the prompt's prefill
    grammar: CompiledGrammar | None = None  # the response_format, compiled
    priority: int = 0  # higher runs first, preempting lower; negative is sheddable
    tenant: str = ""  # the router's user id: tenants take turns inside one priority

    @property
    def max_tokens(self) -> int:
        """The resolved token budget (prompt plus it fit the context)."""
        assert self.sampling.max_tokens is not None
        return self.sampling.max_tokens


class Worker:
    """Serves one loaded model: checks, generation, counting, load and drain."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        info: WorkerInfo,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
        max_n: int = DEFAULT_MAX_N,
        on_drained: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.info = info
        self.worker_id = ""
        self.eos_token_ids = eos_token_ids
        # A request's samples run at once: no more than the running slots.
        self.max_n = min(max_n, info.max_running)
        self.draining = False
        self._on_drained = on_drained
        self._drain_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._watches_ended = False
        self.queue_times = metrics.QueueWindow()
        # One thread tokenizes, so requests never use the (Rust) tokenizer concurrently.
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    # -- requests ------------------------------------------------------------------

    async def prepare(
        self, request: gen.GenerateRequest | gen.StreamGenerateRequest
    ) -> PreparedRequest:
        """Check a Generate/StreamGenerate request and render its prompt ids."""
        checked = await generation_request_off_loop(request, from_caller=False, max_n=self.max_n)
        self._check_served(checked.model)
        vocab = self.info.vocab_size
        check_token_ids(request.sampling.stop_token_ids, "sampling.stop_token_ids", vocab)
        continuation = check_token_ids(checked.continuation_ids, "continuation_token_ids", vocab)
        rendered = await self._render(checked.input)
        grammar = None
        if checked.response_format is not None:
            grammar = await self._compile(checked.response_format.grammar(), continuation)
        max_tokens = resolve_max_tokens(
            checked.sampling.max_tokens,
            input_field=rendered.field,
            prompt_tokens=len(rendered.token_ids),
            continuation_tokens=len(continuation),
            context_length=self.info.context_length,
        )
        return PreparedRequest(
            checked.request_id or uuid.uuid4().hex,
            rendered.token_ids,
            list(continuation),
            dataclasses.replace(checked.sampling, max_tokens=max_tokens),
            checked.n,
            grammar,
            checked.priority,
            checked.tenant,
        )

    async def _compile(self, grammar: str, continuation: tuple[int, ...]) -> CompiledGrammar:
        """The format compiled for this model's tokens (off the event loop and compute thread).

        The router checked it without a tokenizer; what only the vocabulary can refuse
        is refused here, still before any token is generated.
        """
        try:
            compiled = await self.engine.grammars.compile_async(grammar)
        except GrammarError as exc:
            raise InvalidArgument(
                "response_format", f"cannot constrain this model's output: {exc}"
            ) from None
        if continuation:
            try:
                compiled.start(continuation)
            except GrammarError as exc:
                raise InvalidArgument("continuation_token_ids", str(exc)) from None
        return compiled

    def _check_served(self, model: str) -> None:
        if check_model(model) != self.info.model:
            raise NotFound(
                f"model: {model!r} is not served by this worker (it serves {self.info.model!r})",
                reason="MODEL_NOT_FOUND",
                field="model",
            )

    async def _render(self, given: Input) -> RenderedInput:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenize, render_input, given, self.tokenizer, self.info.vocab_size
        )

    async def count_tokens(self, request: HasInput) -> int:
        """Tokens of an input under this model's tokenizer (and chat template)."""
        self._check_served(request.model)
        rendered = await self._render(input_of(request))
        return len(rendered.token_ids)

    async def generate(
        self, prep: PreparedRequest, deadline: float | None
    ) -> AsyncGenerator[gen.StreamGenerateResponse, None]:
        """Run a prepared request; yields stream messages, the last with finish and usage.

        `deadline` is a `time.monotonic()` instant; past it the engine drops the
        request. Closing the iterator aborts the request within one engine step.
        """
        if self.draining:
            raise Unavailable("worker is draining: send new work elsewhere", reason="DRAINING")
        samples = SampleSet(
            [
                ResponseAssembler(
                    tokenizer=self.tokenizer,
                    request_id=prep.request_id,
                    model=self.info.model,
                    prompt_ids=prep.prompt_ids,
                    continuation_ids=prep.continuation_ids,
                    stops=prep.sampling.stop,
                    stop_token_ids=prep.sampling.stop_token_ids,
                    eos_token_ids=self.eos_token_ids,
                    ignore_eos=prep.sampling.ignore_eos,
                    logprobs=prep.sampling.logprobs is not None,
                )
                for _ in range(prep.n)
            ]
        )
        if samples.finished:  # the continuation had already ended the generation
            yield samples.assemblers[0].final()
            return
        attributes: dict[str, str | int] = {
            "tokenyard.request_id": prep.request_id,
            "gen_ai.request.model": self.info.model,
            "gen_ai.request.max_tokens": prep.max_tokens,
            "gen_ai.usage.input_tokens": len(prep.prompt_ids),
        }
        with _tracer.start_as_current_span("inference.generate", attributes=attributes) as span:
            run = self._run(prep, samples, deadline, attributes, span)
            async with contextlib.aclosing(run):
                async for message in run:
                    yield message

    async def _run(
        self,
        prep: PreparedRequest,
        samples: SampleSet,
        deadline: float | None,
        attributes: dict[str, str | int],
        span: Span,
    ) -> AsyncGenerator[gen.StreamGenerateResponse, None]:
        events = self._submit(prep, deadline)
        started = time.monotonic()
        metrics.PROMPT_TOKENS.inc(len(prep.prompt_ids))
        self._changed.set()
        # Queueing ends when the engine admits the request (the first event says
        # when); prefill runs from there to the first token; decode after it.
        phase = _tracer.start_span("inference.queue", attributes=attributes)
        last = started
        first = True
        try:
            async with _closing(events):
                async for batch in events:
                    now = time.monotonic()
                    produced = sum(1 for e in batch if e.token_id >= 0)
                    if first and produced:
                        first = False
                        metrics.TTFT.observe(now - started)
                        admitted = batch[0].admitted_at
                        admitted = now if admitted is None else min(max(admitted, started), now)
                        metrics.QUEUE_TIME.observe(admitted - started)
                        self.queue_times.add(admitted - started)
                        at = time.time_ns() - int((now - admitted) * 1e9)
                        phase.end(end_time=at)
                        prefill = _tracer.start_span(
                            "inference.prefill", attributes=attributes, start_time=at
                        )
                        prefill.end()
                        phase = _tracer.start_span("inference.decode", attributes=attributes)
                        # Tokens that arrived with the first one (the event loop was
                        # busy): each is one more token, delivered with no gap.
                        for _ in range(produced - 1):
                            metrics.INTER_TOKEN.observe(0.0)
                    elif produced:
                        for _ in range(produced):
                            metrics.INTER_TOKEN.observe((now - last) / produced)
                    last = now
                    if _deadline_passed(batch, deadline, now):
                        # The caller's deadline, not a cancel: say so, rather than
                        # racing the client's own timer with an OK "CANCELLED" reply.
                        raise DeadlineExceeded("deadline passed before the generation finished")
                    for message in samples.feed(batch):
                        metrics.GENERATED_TOKENS.inc(len(message.token_ids))
                        if samples.assemblers[message.index].stopped_by_string:
                            abort = getattr(events, "abort_sample", None)
                            if abort is not None and not samples.finished:
                                abort(message.index)  # the others go on
                        yield message
                    if samples.finished:
                        break  # leaving the `async with` aborts a request a stop string ended
        except EngineError as exc:
            log.error("generation failed", extra={"request_id": prep.request_id, "error": str(exc)})
            span.set_status(Status(StatusCode.ERROR, "model computation failed"))
            raise Unavailable(
                "model computation failed on this worker", reason="ENGINE_ERROR"
            ) from None
        finally:
            phase.end()
            self._changed.set()
            lead = samples.assemblers[0]
            reason = gen.FinishReason.Name(lead.finish_reason) if samples.finished else ""
            metrics.REQUESTS.labels(reason.removeprefix("FINISH_REASON_") or "ABORTED").inc()
            span.set_attribute("gen_ai.usage.output_tokens", samples.totals().completion_tokens)
            span.set_attribute("tokenyard.finish_reason", reason or "ABORTED")

    def _submit(self, prep: PreparedRequest, deadline: float | None) -> AsyncIterator[Any]:
        request = EngineRequest(
            request_id=prep.request_id,
            prompt_ids=prep.prompt_ids,
            sampling=prep.sampling,
            continuation_ids=prep.continuation_ids,
            deadline=deadline,
            n=prep.n,
            grammar=prep.grammar,
            priority=prep.priority,
            tenant=prep.tenant,
        )
        try:
            return self.engine.generate(request)
        except EngineSaturated:
            raise ResourceExhausted(
                "worker is saturated: a sheddable request (negative priority) is not queued",
                reason="SHED",
                retry_after=FULL_RETRY_AFTER_S,
            ) from None
        except EngineFull:
            raise ResourceExhausted(
                "worker is full: every slot and queue place is taken",
                reason="WORKER_FULL",
                retry_after=FULL_RETRY_AFTER_S,
            ) from None
        except EngineClosed:
            raise Unavailable("worker is shutting down", reason="SHUTTING_DOWN") from None
        # InvalidRequest is not caught: prepare() met the engine's preconditions, so it
        # is a bug, answered INTERNAL by the error interceptor, never a user's mistake.

    # -- load and drain ---------------------------------------------------------------

    def load(self) -> LoadReport:
        """The engine's load now, with the drain flag."""
        p50, p95 = self.queue_times.quantiles()
        return LoadReport(self.engine.stats(), self.draining, p50, p95)

    async def load_reports(self, interval: float) -> AsyncIterator[LoadReport]:
        """One report at once, then on every change and at least every `interval` while busy.

        While idle, a report still goes out every 20 intervals as a heartbeat. The
        reports end (the stream closes cleanly) once `end_watches` is called.
        """
        tick = min(interval, 0.05)
        report = self.load()
        yield report
        sent_at, sent_key = time.monotonic(), report.key()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), tick)
            self._changed.clear()
            if self._watches_ended:
                return
            report = self.load()
            now = time.monotonic()
            busy = report.stats.running > 0 or report.stats.queued > 0
            due = interval if busy else 20 * interval
            if report.key() != sent_key or now - sent_at >= due:
                yield report
                sent_at, sent_key = now, report.key()

    def end_watches(self) -> None:
        """End every WatchLoad stream, so a graceful stop need not wait out its grace."""
        self._watches_ended = True
        self._changed.set()

    def drain(self) -> int:
        """Refuse new work from now on; returns how many requests still run or wait."""
        stats = self.engine.stats()
        if not self.draining:
            self.draining = True
            self._changed.set()
            log.info("draining", extra={"remaining": stats.running + stats.queued})
            self._drain_task = asyncio.get_running_loop().create_task(self._finish_drain())
        return stats.running + stats.queued

    async def drained(self, timeout: float) -> bool:
        """Drain and wait (bounded) until nothing runs or waits; True when idle in time."""
        self.drain()
        try:
            await asyncio.wait_for(asyncio.shield(self.engine.wait_idle()), timeout)
        except TimeoutError:
            return False
        return True

    async def _finish_drain(self) -> None:
        await self.engine.wait_idle()
        log.info("drained: reporting NOT_SERVING")
        if self._on_drained is not None:
            await self._on_drained()

    async def close(self) -> None:
        """Cancel background work (a pending drain) and stop the tokenizer thread."""
        self._tokenize.shutdown(wait=False, cancel_futures=True)
        task, self._drain_task = self._drain_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _deadline_passed(batch: list[TokenEvent], deadline: float | None, now: float) -> bool:
    """Whether the engine dropped the request because its deadline passed."""
    return (
        deadline is not None
        and now >= deadline
        and any(event.finish == FINISH_CANCELLED for event in batch)
    )
