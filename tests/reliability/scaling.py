"""The elastic-scaling scenario, shared by tests/reliability/test_scaling.py and
bench/scaling_bench.py.

One real router (`tokenyard router serve`) follows a workers file (re-read on
SIGHUP) in front of fake-engine worker processes whose step time is fixed. The
load (client loops, each streaming one request after another) ramps up while
workers join one by one from 1 to `peak`, then down while they leave back to one.
Leaves take turns among the ways a worker goes: the router first (removed from
the file: no new work, its streams finish, then SIGTERM); the preStop hook
(`tokenyard inference drain`, then SIGTERM, then removed from the file); and
SIGTERM alone (the worker drains itself, its WatchLoad says so, it exits; then
it is removed from the file). Every stream ends counted as completed (OK with exactly
the text the engine makes), failed with a clean status, or lost (hung, an
unexpected status, or OK with a wrong or short text).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from tests.conftest import free_port
from tests.integration.router.conftest import ROOT, TOKENYARD, Proc, base_env
from tests.reliability.conftest import Stack, load_of
from tests.reliability.streams import CLEAN, run_stream

# How a worker leaves, in turn: removed from the router's list first; drained by
# `tokenyard inference drain` (the preStop hook) then SIGTERM; SIGTERM alone.
LEAVES = ("router first", "preStop drain", "SIGTERM first")


@dataclass
class Sizing:
    """Knobs of one run."""

    peak: int = 6  # most workers
    loops_per_worker: int = 4  # client loops added per worker joined
    token_delay: float = 0.05  # the fake engine's fixed step time
    max_tokens: int = 16  # per stream
    max_running: int = 8  # slots per worker
    max_queued: int = 32
    # A join's step ends once the new worker served this many requests (test), or
    # after `share_window` seconds (bench); either way within 10 s or it fails.
    join_requests: int = 10
    share_window: float | None = None


@dataclass
class Step:
    """One row of the table: a worker joined or left, and what the load did meanwhile."""

    action: str
    workers: int
    loops: int
    started: int = 0
    completed: int = 0
    clean_failed: int = 0
    lost: int = 0
    seconds: float = 0.0
    new_share: float | None = None  # a joining worker's share of the requests sent
    queue_p95: float = 0.0  # router's tokenyard_router_model_queue_seconds_p95 at the end


@dataclass
class Counts:
    """Streams by outcome, for the step in progress and overall."""

    started: int = 0
    completed: int = 0
    clean_failed: int = 0
    lost: int = 0
    lost_detail: list[str] = field(default_factory=list)


def router_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The router's Prometheus samples: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sent_to(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """Requests the router sent, by worker address."""
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in metrics.items()
        if name == "tokenyard_router_worker_requests_total"
    }


class Scenario:
    """Runs the ramp and gathers the table."""

    def __init__(self, stack: Stack, sizing: Sizing) -> None:
        self.stack, self.sizing = stack, sizing
        self.counts = Counts()
        self.steps: list[Step] = []
        self.listing = stack.tmp / "workers"
        self.metrics_port = free_port()
        self._stop_loops: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task[None]] = []

    # -- load -------------------------------------------------------------------------

    async def _loop(self, stub: gen_grpc.GenerationServiceStub, key: str, n: int) -> None:
        stop = self._stop_loops[n]
        i = 0
        while not stop.is_set():
            i += 1
            self.counts.started += 1
            out = await run_stream(stub, f"loop {n} req {i}", self.sizing.max_tokens, key)
            if out.exact:
                self.counts.completed += 1
            elif out.status != "OK" and out.status in CLEAN:
                self.counts.clean_failed += 1
            else:
                self.counts.lost += 1
                self.counts.lost_detail.append(f"{out.status} {out.tokens} tokens")

    def _add_loops(self, stub: gen_grpc.GenerationServiceStub, key: str, k: int) -> None:
        for _ in range(k):
            self._stop_loops.append(asyncio.Event())
            n = len(self._stop_loops) - 1
            self._tasks.append(asyncio.create_task(self._loop(stub, key, n)))

    def _remove_loops(self, k: int) -> None:
        running = [e for e in self._stop_loops if not e.is_set()]
        for event in running[-k:]:
            event.set()

    @property
    def loops(self) -> int:
        return sum(1 for e in self._stop_loops if not e.is_set())

    # -- membership -------------------------------------------------------------------

    def _publish(self, members: list[Proc], router: Proc) -> None:
        # Replaced atomically, as a ConfigMap volume does: a poll never reads half a file.
        staged = self.listing.with_suffix(".new")
        staged.write_text("".join(f"{w.address}\n" for w in members))
        os.replace(staged, self.listing)
        router.signal(signal.SIGHUP)

    async def _metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return await asyncio.to_thread(router_metrics, self.metrics_port)

    async def _sent(self) -> dict[str, float]:
        return sent_to(await self._metrics())

    async def _step(
        self, action: str, members: list[Proc], body: Callable[[Step], Awaitable[None]]
    ) -> None:
        before = Counts(**{k: v for k, v in vars(self.counts).items() if k != "lost_detail"})
        step = Step(action, len(members), self.loops)
        started = time.monotonic()
        await body(step)
        step.seconds = time.monotonic() - started
        for name in ("started", "completed", "clean_failed", "lost"):
            setattr(step, name, getattr(self.counts, name) - getattr(before, name))
        metrics = await self._metrics()
        key = ("tokenyard_router_model_queue_seconds_p95", (("model", "fake-model"),))
        step.queue_p95 = metrics.get(key, 0.0)
        self.steps.append(step)

    async def _join(self, worker: Proc, members: list[Proc], router: Proc, wait: Waiter) -> None:
        async def body(step: Step) -> None:
            before = await self._sent()
            members.append(worker)
            step.workers = len(members)
            self._publish(members, router)
            joined = time.monotonic()
            if self.sizing.share_window is None:
                goal = self.sizing.join_requests

                async def served() -> bool:
                    return (await self._sent()).get(worker.address, 0.0) >= goal

                await wait(served, 10.0, f"{worker.address} took {goal} requests")
            else:
                await asyncio.sleep(max(self.sizing.share_window - (time.monotonic() - joined), 0))
            after = await self._sent()
            total = sum(after.values()) - sum(before.values())
            step.new_share = after.get(worker.address, 0.0) / total if total else 0.0

        await self._step(f"join {worker.port}", members, body)

    async def _leave(self, worker: Proc, members: list[Proc], router: Proc, wait: Waiter) -> None:
        mode = LEAVES[sum(1 for s in self.steps if s.action.startswith("leave")) % len(LEAVES)]

        async def exited() -> None:
            await wait(lambda: worker.popen.poll() is not None, 30.0, f"{worker.address} exited")

        async def body(step: Step) -> None:
            members.remove(worker)
            step.workers = len(members)
            if mode == "router first":
                self._publish(members, router)

                async def idle() -> bool:
                    load = await asyncio.to_thread(load_of, worker)
                    return load.running + load.queued == 0

                await wait(idle, 30.0, f"{worker.address} idle after removal")
                worker.signal(signal.SIGTERM)
                await exited()
                return
            if mode == "preStop drain":
                # What the StatefulSet's preStop hook runs, then the kubelet's SIGTERM.
                args = [TOKENYARD, "inference", "drain", worker.address, "--timeout", "30"]
                done = await asyncio.to_thread(
                    subprocess.run, args, cwd=ROOT, env=base_env(), capture_output=True, timeout=60
                )
                assert done.returncode == 0, done.stderr.decode()
            worker.signal(signal.SIGTERM)  # drains itself (at once, after the hook), then exits
            await exited()
            self._publish(members, router)

        await self._step(f"leave {worker.port} ({mode})", members, body)

    # -- the run ----------------------------------------------------------------------

    async def run(self, wait: Waiter) -> list[Step]:
        """Ramp up to `peak` workers and back to one; returns the table."""
        sizing, stack = self.sizing, self.stack
        flags = ["--max-running", str(sizing.max_running), "--max-queued", str(sizing.max_queued)]
        pending = [
            stack.engine_worker(*flags, delay=sizing.token_delay, wait=False)
            for _ in range(sizing.peak)
        ]
        url = f"sqlite:///{stack.tmp / 'auth.db'}"
        admin = await asyncio.to_thread(stack.bootstrap, url)
        auth = await asyncio.to_thread(stack.auth_url, url)
        user = await asyncio.to_thread(stack.user, auth, admin)
        workers = [await asyncio.to_thread(stack.wait_serving, w) for w in pending]
        members = [workers[0]]
        self.listing.write_text(f"{workers[0].address}\n")
        router = await asyncio.to_thread(
            stack.router,
            auth,
            [],
            TOKENYARD_ROUTER_WORKERS_FILE=str(self.listing),
            TOKENYARD_ROUTER_DNS_INTERVAL="1.0",  # the file is polled too (SIGHUP is faster)
            TOKENYARD_ROUTER_METRICS_PORT=str(self.metrics_port),
            TOKENYARD_ROUTER_WORKER_DRAIN_TIMEOUT="30",
            TOKENYARD_LOG_LEVEL="warning",
        )
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            step = Step("start", 1, 0)
            self._add_loops(stub, user.key, sizing.loops_per_worker)
            step.loops = self.loops
            self.steps.append(step)
            for worker in workers[1:]:
                self._add_loops(stub, user.key, sizing.loops_per_worker)
                await self._join(worker, members, router, wait)
            for worker in reversed(workers[1:]):
                self._remove_loops(sizing.loops_per_worker)
                await self._leave(worker, members, router, wait)
            self._remove_loops(self.loops)
            await asyncio.gather(*self._tasks)
        return self.steps


Waiter = Callable[[Callable[[], object], float, str], Awaitable[None]]


def table(steps: list[Step], counts: Counts) -> str:
    """The steps as a fixed-width table, with totals."""
    head = (
        f"{'step':<30} {'workers':>7} {'loops':>5} {'started':>7} {'completed':>9} "
        f"{'clean-failed':>12} {'lost':>4} {'new share':>9} {'q p95 s':>7} {'secs':>5}"
    )
    lines = [head, "-" * len(head)]
    for s in steps:
        share = f"{s.new_share:.0%}" if s.new_share is not None else ""
        lines.append(
            f"{s.action:<30} {s.workers:>7} {s.loops:>5} {s.started:>7} {s.completed:>9} "
            f"{s.clean_failed:>12} {s.lost:>4} {share:>9} {s.queue_p95:>7.3f} {s.seconds:>5.1f}"
        )
    lines.append(
        f"{'total':<30} {'':>7} {'':>5} {counts.started:>7} {counts.completed:>9} "
        f"{counts.clean_failed:>12} {counts.lost:>4}"
    )
    return "\n".join(lines)


def write_table(path: Path, text: str) -> None:
    """Keep the table next to the logs (the test's tmp folder)."""
    path.write_text(text + "\n")
