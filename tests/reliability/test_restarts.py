"""Auth and router restarted under load: cached keys, fail-closed, usage, orphans."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from tests.conftest import WAIT_TIMEOUT
from tests.reliability.conftest import Proc, Stack, stack_for
from tests.reliability.streams import (
    Outcome,
    Progress,
    lanes,
    more_outcomes,
    run_stream,
    settled_usage,
    tally,
    wait_idle,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[Proc]]]:
    """A Stack for the module and three workers starting in the background."""
    with stack_for(tmp_path_factory.mktemp("restarts")) as stack:
        yield stack, [stack.engine_worker(delay=0.02, wait=False) for _ in range(3)]


async def test_auth_stopped_under_load_and_restarted(
    base: tuple[Stack, list[Proc]], report: dict[str, object]
) -> None:
    stack, pending = base
    url = f"sqlite:///{stack.tmp / 'auth-restart.db'}"
    admin = stack.bootstrap(url)
    # Auth grants a 60 s cache: a key used before the outage stays usable through it.
    auth = stack.auth_url(url, TOKENYARD_AUTH_CACHE_TTL="60", TOKENYARD_AUTH_GRACE_PERIOD="1")
    cached, unknown = stack.user(auth, admin), stack.user(auth, admin)
    worker = stack.wait_serving(pending[0])
    router = stack.start_router(auth, [worker])
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        assert (await run_stream(stub, "warm the cache", 3, cached.key)).exact
        stop = asyncio.Event()
        outcomes: list[Outcome] = []
        load = asyncio.create_task(lanes(stub, cached.key, stop, 16, outcomes))
        try:
            await more_outcomes(outcomes, 32)  # the load flows
            assert auth.stop() == 0
            # Streams end while auth is down: their usage batches fail and wait in the router.
            await more_outcomes(outcomes, 32)
            refused = await run_stream(stub, "never seen before", 3, unknown.key)
            await more_outcomes(outcomes, 16)
            auth = stack.restart(auth)
            await more_outcomes(outcomes, 32)  # and the load goes on after the restart
        finally:
            stop.set()
            await load
        back = time.monotonic()
        after = await run_stream(stub, "after the restart", 3, unknown.key)
        while after.status == "UNAVAILABLE" and time.monotonic() - back < 60:
            await asyncio.sleep(0.2)  # the router reconnects to auth within its backoff
            after = await run_stream(stub, "after the restart", 3, unknown.key)
        recovered = time.monotonic() - back
    counts = tally(outcomes)
    report["auth stopped and restarted under load"] = dict(
        counts, streams=len(outcomes), unknown_key_ok_after_s=round(recovered, 2)
    )
    assert refused.status == "UNAVAILABLE"  # fail closed
    assert after.exact
    assert all(o.exact for o in outcomes), counts  # the cached key never stopped working
    usage = await settled_usage(auth, admin, cached.user_id, len(outcomes) + 1)
    assert usage.total_requests == len(outcomes) + 1  # no record lost, none counted twice
    assert usage.total_completion_tokens == sum(o.tokens for o in outcomes) + 3


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_router_restarted_clients_retry_and_no_generation_is_orphaned(
    base: tuple[Stack, list[Proc]], sig: signal.Signals, report: dict[str, object]
) -> None:
    stack, pending = base
    url = f"sqlite:///{stack.tmp / f'auth-{sig.name}.db'}"
    admin = stack.bootstrap(url)
    auth = stack.auth_url(url)
    user = stack.user(auth, admin)
    worker = stack.wait_serving(pending[1 if sig == signal.SIGKILL else 2])
    router = stack.start_router(auth, [worker], TOKENYARD_ROUTER_GRACE_PERIOD="0.5")
    n = 8
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        progress = Progress(threshold=5, total=n)
        tasks = [
            asyncio.create_task(
                run_stream(stub, f"long {i}", 400, user.key, on_message=progress.watcher(i))
            )
            for i in range(n)
        ]
        await asyncio.wait_for(progress.event.wait(), 60)
        router.signal(sig)
        cut = await asyncio.gather(*tasks)
        router.popen.wait(30)
        down = await run_stream(stub, "while down", 3, user.key)
        orphans = await wait_idle([worker])
        router = stack.restart(router)
        retried: list[Outcome] = []
        for out in cut:
            deadline = time.monotonic() + WAIT_TIMEOUT
            again = await run_stream(stub, out.prompt, 30, user.key)
            while again.status == "UNAVAILABLE" and time.monotonic() < deadline:
                await asyncio.sleep(0.25)  # the client retries while the router comes back
                again = await run_stream(stub, out.prompt, 30, user.key)
            retried.append(again)
    report[f"router restarted ({sig.name})"] = dict(
        tally(cut), streams=n, retried_ok=sum(o.exact for o in retried)
    )
    assert {o.status for o in cut} == {"UNAVAILABLE"}, tally(cut)
    assert down.status == "UNAVAILABLE"
    assert orphans == {worker.address: 0}  # the worker stopped every cut generation
    assert all(o.exact for o in retried), tally(retried)
    assert await wait_idle([worker]) == {worker.address: 0}
    if sig == signal.SIGTERM:  # a graceful stop flushes usage, the cut streams included
        usage = await settled_usage(auth, admin, user.user_id, 2 * n, timeout=30)
        assert usage.total_requests == 2 * n
        received = sum(o.tokens for o in cut + retried)
        # Billed = what the router relayed. A message the router had handed to gRPC
        # when the stop cut the call may never reach the client, so a cut stream may
        # be billed for at most that one in-flight message (one token at this pace).
        assert received <= usage.total_completion_tokens <= received + n, (
            usage.total_completion_tokens,
            received,
        )
