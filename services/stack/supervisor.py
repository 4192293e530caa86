"""Run a set of services as child processes: start in order, watch, restart, stop.

Each child starts in its own session (so a terminal's Ctrl-C reaches only the
supervisor, which then stops the children in order: router first so it drains,
then workers, then auth), its output is prefixed with its name, and it counts as
started once its gRPC health reports SERVING. A child that dies is restarted
with doubling backoff, a bounded number of times in a row; past that the whole
stack stops with a message naming the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Credentials = Callable[[], grpc.ChannelCredentials | None]
_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """The stack cannot start or keep running; the message says which child and why."""


@dataclass(frozen=True)
class ChildSpec:
    """How to run one service: its command, environment and health address."""

    name: str
    argv: Sequence[str]
    env: dict[str, str]
    health_target: str
    credentials: Credentials = field(default=lambda: None)
    start_order: int = 0  # lower starts first; equal ones start together
    stop_order: int = 0  # lower stops first
    server_name: str | None = None


@dataclass(frozen=True)
class Policy:
    """Restart and timing policy (docs/local-stack.md, "when a service dies")."""

    max_restarts: int = 3
    backoff: float = 1.0
    stable_after: float = 60.0  # a child up this long has its restart count reset
    startup_timeout: float = 300.0
    stop_timeout: float = 30.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the child if the supervisor itself is killed."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One running (or restarting) service process."""

    def __init__(self, spec: ChildSpec, out: IO[str]) -> None:
        self.spec = spec
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None
        self.pump: asyncio.Task[None] | None = None
        self.started_at = 0.0
        self.restarts = 0

    async def spawn(self) -> None:
        """Start the process and the task copying its output, prefixed."""
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = await asyncio.create_subprocess_exec(
            *self.spec.argv,
            env=self.spec.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,  # prctl only: safe between fork and exec
        )
        self.started_at = time.monotonic()
        self.pump = asyncio.create_task(self._copy_output(self.proc))

    async def _copy_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        prefix = f"{self.spec.name:<9}| "
        while line := await proc.stdout.readline():
            self.out.write(prefix + line.decode(errors="replace").rstrip("\n") + "\n")
            self.out.flush()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_healthy(self, timeout: float) -> None:
        """Return once health reports SERVING; raise StackError if the child exits first."""
        deadline = time.monotonic() + timeout
        options = (
            [("grpc.ssl_target_name_override", self.spec.server_name)]
            if self.spec.server_name
            else []
        )
        creds = self.spec.credentials()
        channel = (
            grpc.aio.secure_channel(self.spec.health_target, creds, options=options)
            if creds is not None
            else grpc.aio.insecure_channel(self.spec.health_target, options=options)
        )
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.running:
                    raise StackError(f"{self.spec.name} exited with code {self.returncode()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise StackError(f"{self.spec.name} was not SERVING after {timeout:.0f} s")
                await asyncio.sleep(0.2)

    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's whole process group."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the service drains), then SIGKILL after `timeout`."""
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.out.write(f"{self.spec.name:<9}| did not stop in {timeout:.0f} s; killing\n")
            self.signal(signal.SIGKILL)
            await self.proc.wait()
        if self.pump is not None:
            await self.pump


class Supervisor:
    """Starts children in order, restarts the ones that die, stops them in order."""

    def __init__(self, specs: Sequence[ChildSpec], policy: Policy, out: IO[str]) -> None:
        self.children = [Child(spec, out) for spec in specs]
        self.policy = policy
        self.out = out
        self._stop = asyncio.Event()
        self._exits: asyncio.Queue[Child] = asyncio.Queue()
        self._watchers: list[asyncio.Task[None]] = []

    def say(self, message: str) -> None:
        """A line from the supervisor itself."""
        self.out.write(f"{'tokenyard':<9}| {message}\n")
        self.out.flush()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Begin stopping (what SIGTERM and Ctrl-C do)."""
        self._stop.set()

    async def _launch(self, child: Child) -> None:
        await child.spawn()
        self._watchers.append(asyncio.create_task(self._watch(child)))

    async def _watch(self, child: Child) -> None:
        assert child.proc is not None
        await child.proc.wait()
        if not self._stop.is_set():
            await self._exits.put(child)

    async def start(self) -> None:
        """Start the children group by group (start order), each group once SERVING."""
        for order in sorted({c.spec.start_order for c in self.children}):
            if self._stop.is_set():
                return
            group = [c for c in self.children if c.spec.start_order == order]
            for child in group:
                await self._launch(child)
            await self._until_stop(self._all_healthy(group))

    async def _all_healthy(self, group: Sequence[Child]) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                for child in group:
                    tasks.create_task(child.wait_healthy(self.policy.startup_timeout))
        except* StackError as failed:
            raise failed.exceptions[0] from None

    async def _until_stop(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` unless a stop is requested first (then cancel it)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        task.result()

    async def run(self) -> None:
        """Watch the running stack until a stop is requested; restart children that die."""
        while not self._stop.is_set():
            exited = asyncio.create_task(self._exits.get())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([exited, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not exited.done():
                exited.cancel()
                return
            await self._restart(exited.result())

    async def _restart(self, child: Child) -> None:
        code = child.returncode()
        if time.monotonic() - child.started_at >= self.policy.stable_after:
            child.restarts = 0
        if child.restarts >= self.policy.max_restarts:
            raise StackError(
                f"{child.spec.name} exited with code {code} and was restarted "
                f"{child.restarts} times in a row; stopping the stack"
            )
        delay = self.policy.backoff * 2**child.restarts
        child.restarts += 1
        self.say(
            f"{child.spec.name} exited with code {code}; restarting in {delay:.0f} s "
            f"(restart {child.restarts} of {self.policy.max_restarts})"
        )
        if child.pump is not None:
            await child.pump
        await self._until_stop(asyncio.sleep(delay))
        if self._stop.is_set():
            return
        await self._launch(child)
        try:
            await self._until_stop(child.wait_healthy(self.policy.startup_timeout))
        except StackError:
            if child.running:
                raise
            return  # it died again: its watcher queues the exit, handled as the next crash
        if not self._stop.is_set():
            self.say(f"{child.spec.name} is SERVING again")

    async def stop(self) -> None:
        """Stop every child, in stop order (router, workers, auth), each group at once."""
        self._stop.set()
        for order in sorted({c.spec.stop_order for c in self.children}):
            group = [c for c in self.children if c.spec.stop_order == order]
            await asyncio.gather(*(c.stop(self.policy.stop_timeout) for c in group))
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
