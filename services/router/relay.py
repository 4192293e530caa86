"""The stream relay: pick a worker, forward its tokens, fail over, resume.

Worker messages arrive as raw bytes and, unless they must be merged, go to the
client as the same bytes: each is parsed once (to track tokens) and never
re-serialized. A worker that fails, refuses (RESOURCE_EXHAUSTED) or cannot be
reached before its first token is replaced by the next one the policy ranks,
invisibly. A worker that dies mid-stream is replaced too, with the original
request plus `continuation_token_ids` = every token already relayed, so the
client's stream continues without a gap or a repeat. Where no worker can take
over, the stream ends with UNAVAILABLE. A failed worker is ejected.

A request of n > 1 samples fails over before its first token only: mid-stream it
ends with UNAVAILABLE (STREAM_INTERRUPTED), since resuming n interleaved samples
needs each one's continuation. Its stream ends once every sample has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    TokenyardError,
    Unavailable,
)
from services.common.interceptors import REQUEST_ID_HEADER
from services.common.logs import request_id_var
from services.common.status import details_of
from services.common.telemetry import trace_metadata
from services.router import metrics
from services.router.policies import (
    PrefixTable,
    affinity_key,
    least_load,
    prefix_affinity,
    prefix_blocks,
    round_robin,
)
from services.router.workers import Worker, WorkerPool
from services.router.writer import Emit, Writer, merge

log = logging.getLogger("tokenyard.router.relay")

# Worker statuses that are the request's fault: passed to the client as they are.
PASS_THROUGH = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)

_parse = gen.StreamGenerateResponse.FromString


@dataclass(slots=True)
class StreamState:
    """What one request has produced so far (read by the caller for usage)."""

    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    finish_reason: int = 0
    first_token_at: float = 0.0
    attempts: int = 0
    samples_ended: int = 0  # samples whose last message was relayed
    revision: str = ""  # model revision of the worker that finished the stream
    resumed: bool = False  # tokens of more than one worker (a mid-stream resume)
    cached_tokens: int = 0  # completion tokens replayed from the response cache (a hit)


class WorkerError(TokenyardError):
    """A worker's own error status, passed on to the client unchanged."""

    def __init__(self, exc: grpc.aio.AioRpcError) -> None:
        details = details_of(exc)
        super().__init__(
            details.message,
            reason=details.reason or None,
            field=details.metadata.get("field"),
            retry_after=details.retry_after,
        )
        self.code = exc.code()


class Chooser:
    """Applies the configured routing policy to the pool's workers."""

    def __init__(self, policy: str, *, threshold: float = 8.0, block_chars: int = 64) -> None:
        self.policy, self.threshold, self.block_chars = policy, threshold, block_chars
        self.table = PrefixTable()
        self._counter = 0

    def blocks(self, request: gen.StreamGenerateRequest) -> list[bytes]:
        """Prefix-block hashes of the request's input (prefix_affinity only)."""
        if self.policy != "prefix_affinity":
            return []
        kind = request.WhichOneof("input")
        if kind == "prompt":
            text = request.prompt
        elif kind == "messages":
            text = "".join(f"\x1e{m.role}\x1f{m.content}" for m in request.messages.messages)
        elif kind == "token_ids":
            text = ",".join(map(str, request.token_ids.ids))
        else:
            text = ""
        return prefix_blocks(text, self.block_chars)

    def pick(
        self, workers: list[Worker], request: gen.StreamGenerateRequest, blocks: list[bytes]
    ) -> Worker:
        """The best worker of `workers` (non-empty) for `request`."""
        if len(workers) == 1:
            chosen = workers[0]
        else:
            by_id = {w.worker_id: w for w in workers}
            candidates = [w.candidate() for w in workers]
            if self.policy == "round_robin":
                self._counter += 1
                ordered = round_robin(candidates, self._counter)
            elif self.policy == "affinity_key":
                ordered = affinity_key(candidates, request.affinity_key)
            elif self.policy == "prefix_affinity":
                ordered = prefix_affinity(candidates, blocks, self.table, self.threshold)
            else:
                ordered = least_load(candidates)
            chosen = by_id[ordered[0].worker_id]
        if blocks:
            self.table.record(blocks, chosen.worker_id)
        return chosen


class Relay:
    """Runs one generation across workers, emitting tokens as they come."""

    def __init__(
        self, pool: WorkerPool, chooser: Chooser, *, max_attempts: int = 4, interval: int = 1
    ) -> None:
        self.pool, self.chooser = pool, chooser
        self.max_attempts, self.interval = max_attempts, interval

    async def run(
        self,
        request: gen.StreamGenerateRequest,
        emit: Emit,
        state: StreamState,
        *,
        deadline: float | None,
        started: float,
    ) -> None:
        """Relay `request` until its last message; raise a domain error otherwise."""
        out = Writer(emit)
        try:
            await self._run(request, out, state, deadline=deadline, started=started)
        except TokenyardError:
            with contextlib.suppress(Exception):
                await out.flush()  # the tokens relayed so far reach the client first
            raise
        except BaseException:
            out.cancel()
            raise
        await out.flush()

    async def _run(
        self,
        request: gen.StreamGenerateRequest,
        out: Writer,
        state: StreamState,
        *,
        deadline: float | None,
        started: float,
    ) -> None:
        model = request.model
        tried: set[str] = set()
        full: list[float] = []
        blocks = self.chooser.blocks(request)
        base = list(request.continuation_token_ids)
        while True:
            workers = [w for w in self.pool.for_model(model) if w.address not in tried]
            if not workers or state.attempts >= self.max_attempts:
                raise self._exhausted(model, state, full)
            worker = self.chooser.pick(workers, request, blocks)
            tried.add(worker.address)
            state.attempts += 1
            attempt = request
            if state.tokens:
                state.resumed = True
                attempt = gen.StreamGenerateRequest()
                attempt.CopyFrom(request)
                del attempt.continuation_token_ids[:]
                attempt.continuation_token_ids.extend(base + state.tokens)
            timeout = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise DeadlineExceeded("deadline exceeded")
            if state.tokens and (request.n or 1) > 1:
                raise Unavailable(
                    "the stream was interrupted; a request with n > 1 cannot be resumed",
                    reason="STREAM_INTERRUPTED",
                )
            relayed_before = len(state.tokens)
            try:
                if await self._attempt(
                    worker, attempt, out, state, timeout=timeout, started=started
                ):
                    worker.succeeded()
                    state.revision = worker.revision
                    return
                # The worker ended the stream without a last message: as if it failed.
                worker.eject("stream ended early")
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in PASS_THROUGH:
                    raise WorkerError(exc) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and (
                    deadline is not None and time.monotonic() >= deadline - 0.001
                ):
                    raise DeadlineExceeded("deadline exceeded") from None
                if (
                    code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    and len(state.tokens) == relayed_before
                ):
                    details = details_of(exc)
                    full.append(details.retry_after or 0.5)
                    metrics.FAILOVERS.labels("full").inc()
                    continue
                worker.eject(code.name)
                log.warning(
                    "worker call failed",
                    extra={"worker": worker.address, "code": code.name, "detail": exc.details()},
                )
            kind = "mid_stream" if state.tokens else "before_first_token"
            metrics.FAILOVERS.labels(kind).inc()
            log.warning(
                "worker failed; moving the request",
                extra={"worker": worker.address, "kind": kind, "relayed": len(state.tokens)},
            )

    def _exhausted(self, model: str, state: StreamState, full: list[float]) -> TokenyardError:
        if state.tokens:
            return Unavailable(
                "the stream was interrupted and no worker could resume it",
                reason="STREAM_INTERRUPTED",
            )
        if full:
            return ResourceExhausted(
                f"every worker for model {model!r} is full",
                reason="WORKERS_FULL",
                retry_after=min(full),
            )
        return Unavailable(
            f"no healthy worker for model {model!r}", reason="NO_HEALTHY_WORKER", retry_after=1.0
        )

    async def _attempt(
        self,
        worker: Worker,
        request: gen.StreamGenerateRequest,
        out: Writer,
        state: StreamState,
        *,
        timeout: float | None,
        started: float,
    ) -> bool:
        """Relay one worker's stream; True when its last message was handed to `out`."""
        metadata = (*worker.metadata, *trace_metadata(), (REQUEST_ID_HEADER, request_id_var.get()))
        call = worker.stream_generate(request, timeout=timeout, metadata=metadata)
        worker.inflight += 1
        worker.dispatched += 1
        worker.attempts += 1
        samples = request.n or 1
        # Gathering would merge messages of different samples: n > 1 streams as it comes.
        interval = self.interval if samples == 1 else 1
        held: gen.StreamGenerateResponse | None = None  # stream_interval accumulation
        tokens = state.tokens
        model = request.model
        itl = metrics.INTER_TOKEN.labels(model)
        last = time.perf_counter()
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return False
                assert isinstance(raw, bytes)
                msg = _parse(raw)
                ids = msg.token_ids
                now = time.perf_counter()
                first = not tokens
                if ids:
                    if first:
                        state.first_token_at = now
                        metrics.TTFT.labels(model).observe(now - started)
                    else:
                        itl.observe(now - last)
                    last = now
                    tokens.extend(ids)
                if msg.finish_reason:
                    state.samples_ended += 1
                if msg.finish_reason and state.samples_ended >= samples:
                    forward: bytes | None = raw
                    state.finish_reason = msg.finish_reason
                    state.prompt_tokens = msg.usage.prompt_tokens
                    if msg.usage.completion_tokens != len(tokens):
                        # The client is shown what the ledger records: the tokens relayed.
                        msg.usage.completion_tokens = len(tokens)
                        forward = None
                    if held is not None:
                        merge(held, msg)
                        out.send(None, held)
                        held = None
                    elif first:
                        await out.write_now(forward, msg)
                    else:
                        out.send(forward, msg)
                    # Read the status the worker sends with its last message: cheaper than
                    # cancelling, and the worker sees a clean end rather than a cancel.
                    with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                        await asyncio.wait_for(call.read(), 5.0)
                    return True
                if interval > 1:
                    if held is None:
                        held = msg
                    else:
                        merge(held, msg)
                    if len(held.token_ids) >= interval:
                        out.send(None, held)
                        held = None
                    continue
                if first:
                    await out.write_now(raw, msg)
                else:
                    out.send(raw, msg)
        finally:
            worker.inflight -= 1
            if not call.done():
                call.cancel()
            if held is not None:
                # Tokens already counted as relayed reach the client before any resume.
                out.send(None, held)
