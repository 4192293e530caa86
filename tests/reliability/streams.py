"""Client-side helpers of the reliability suite: streams, outcomes, usage, idleness."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.auth.v1 import usage_service_pb2_grpc as usage_grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from tests.conftest import WAIT_TIMEOUT, eventually
from tests.integration.router.conftest import Proc, bearer
from tests.reliability.conftest import MODEL, load_of
from tests.reliability.fake_engine_worker import expected_text

# Statuses a stream may end with on purpose (anything else is a defect).
CLEAN = frozenset({"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"})


def request(prompt: str, max_tokens: int) -> gen.StreamGenerateRequest:
    """A StreamGenerate request for the fake model."""
    req = gen.StreamGenerateRequest(model=MODEL, prompt=prompt)
    req.sampling.max_tokens = max_tokens
    return req


@dataclass
class Outcome:
    """How one stream ended: status name, text and token count received, usage."""

    prompt: str
    max_tokens: int
    status: str = "OK"
    text: str = ""
    tokens: int = 0
    completion_tokens: int = 0
    hung: bool = False

    @property
    def exact(self) -> bool:
        """True when the stream completed with exactly the tokens the engine makes."""
        return self.status == "OK" and self.text == expected_text(self.prompt, self.max_tokens)


async def run_stream(
    stub: gen_grpc.GenerationServiceStub,
    prompt: str,
    max_tokens: int,
    key: str,
    *,
    hang_after: float = 60.0,
    on_message: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """Stream one generation; a stream still open after `hang_after` s counts as hung."""
    out = Outcome(prompt, max_tokens)
    call = stub.StreamGenerate(request(prompt, max_tokens), metadata=bearer(key))

    async def consume() -> None:
        async for msg in call:
            out.text += msg.text
            out.tokens += len(msg.token_ids)
            if msg.finish_reason:
                out.completion_tokens = msg.usage.completion_tokens
            if on_message is not None:
                on_message(out)

    try:
        await asyncio.wait_for(consume(), hang_after)
    except grpc.aio.AioRpcError as exc:
        out.status = exc.code().name
    except TimeoutError:
        out.status, out.hung = "HUNG", True
        call.cancel()
    return out


def tally(outcomes: Iterable[Outcome]) -> Counter[str]:
    """Outcomes counted by status."""
    return Counter(o.status for o in outcomes)


async def get_usage(
    auth: Proc, admin: str, user_id: str, end_user: str = ""
) -> usage_pb.GetUsageResponse:
    """Auth's usage totals for `user_id` (on behalf of `end_user`, when given)."""
    async with grpc.aio.insecure_channel(auth.address) as channel:
        reply: usage_pb.GetUsageResponse = await usage_grpc.UsageServiceStub(channel).GetUsage(
            usage_pb.GetUsageRequest(user_id=user_id, end_user=end_user),
            metadata=bearer(admin),
            timeout=10,
        )
    return reply


async def usage_after(
    auth: Proc,
    admin: str,
    user_id: str,
    requests: int,
    end_user: str = "",
    timeout: float = WAIT_TIMEOUT,
) -> usage_pb.GetUsageResponse:
    """Auth's totals once at least `requests` records arrived (fails the test otherwise)."""
    replies = [await get_usage(auth, admin, user_id, end_user)]

    async def arrived() -> bool:
        if replies[-1].total_requests < requests:
            replies.append(await get_usage(auth, admin, user_id, end_user))
        return replies[-1].total_requests >= requests

    await eventually(arrived, timeout, interval=0.05, what=f"{requests} usage records")
    return replies[-1]


async def settled_usage(
    auth: Proc, admin: str, user_id: str, requests: int, timeout: float = WAIT_TIMEOUT
) -> usage_pb.GetUsageResponse:
    """Usage once `requests` records arrived, re-read after more flushes (no late doubles)."""
    await usage_after(auth, admin, user_id, requests, timeout=timeout)
    await asyncio.sleep(1.5)  # several router flush intervals: a retried batch would show now
    return await get_usage(auth, admin, user_id)


async def wait_idle(workers: Iterable[Proc], timeout: float = 15.0) -> dict[str, int]:
    """Poll each worker's WatchLoad until nothing runs or waits; returns what is left."""
    left: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    for worker in workers:
        while True:
            load = await asyncio.to_thread(load_of, worker)
            busy = load.running + load.queued
            if busy == 0 or time.monotonic() >= deadline:
                left[worker.address] = busy
                break
            await asyncio.sleep(0.1)
    return left


@dataclass
class Progress:
    """Counts streams that received at least `threshold` tokens."""

    threshold: int
    reached: set[int] = field(default_factory=set)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    total: int = 0

    def watcher(self, index: int) -> Callable[[Outcome], None]:
        """An `on_message` callback for stream `index`."""

        def seen(out: Outcome) -> None:
            if out.tokens >= self.threshold and index not in self.reached:
                self.reached.add(index)
                if len(self.reached) >= self.total:
                    self.event.set()

        return seen


async def lanes(
    stub: gen_grpc.GenerationServiceStub,
    key: str,
    stop: asyncio.Event,
    n: int,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """`n` clients each streaming short generations back to back until `stop`.

    Outcomes are appended to `outcomes` (a new list by default) as streams end,
    so a caller can wait for progress with `more_outcomes`.
    """
    outcomes = [] if outcomes is None else outcomes

    async def lane(i: int) -> None:
        k = 0
        while not stop.is_set():
            outcomes.append(await run_stream(stub, f"lane {i} call {k}", 20, key))
            k += 1

    await asyncio.gather(*(lane(i) for i in range(n)))
    return outcomes


async def more_outcomes(outcomes: list[Outcome], count: int, timeout: float = 120.0) -> None:
    """Wait until `count` more streams ended than now (the load is flowing)."""
    target = len(outcomes) + count
    await eventually(lambda: len(outcomes) >= target, timeout, 0.05, f"{target} ended streams")
