"""The client side of a relayed stream: one write at a time, merging what waits.

Worker messages go to the client as the raw bytes the worker sent while the
client keeps up. While a write is in flight (the client reads slower than the
worker produces) later messages are merged into one, written next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tokenyard.generation.v1 import generation_service_pb2 as gen

Emit = Callable[[bytes | gen.StreamGenerateResponse], Awaitable[None]]


class Writer:
    """Writes to the client one message at a time, merging what arrives meanwhile.

    While a write is in flight (the client reads slower than the worker produces),
    further messages are merged into one pending message, written when the current
    write completes. So a slow client gets fewer, larger messages and the router
    spends less per token; a fast one gets every message as it came, unchanged.
    Messages of different samples (`index`, n > 1) are never merged together.
    """

    __slots__ = ("emit", "error", "pending", "task")

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.task: asyncio.Future[None] | None = None
        self.pending: list[gen.StreamGenerateResponse] = []
        self.error: BaseException | None = None

    def send(self, raw: bytes | None, msg: gen.StreamGenerateResponse) -> None:
        """Queue one message (raw bytes when unchanged from the worker)."""
        if self.task is None and self.error is None:
            self._start(raw or msg)
        elif self.pending and _mergeable(self.pending[-1], msg):
            merge(self.pending[-1], msg)
        else:
            self.pending.append(msg)

    async def write_now(self, raw: bytes | None, msg: gen.StreamGenerateResponse) -> None:
        """Write without a task hop when nothing is in flight (the first token's latency)."""
        if self.task is None and not self.pending and self.error is None:
            await self.emit(raw or msg)
        else:
            self.send(raw, msg)

    def _start(self, payload: bytes | gen.StreamGenerateResponse) -> None:
        self.task = asyncio.ensure_future(self.emit(payload))
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        self.task = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.error = error
            return
        if self.pending:
            self._start(self.pending.pop(0))

    async def flush(self) -> None:
        """Wait until everything sent is written; raise a write's error."""
        while self.task is not None:
            await asyncio.wait([self.task])
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Drop what is not written (the client went away)."""
        self.pending = []
        if self.task is not None:
            self.task.cancel()


def _mergeable(into: gen.StreamGenerateResponse, msg: gen.StreamGenerateResponse) -> bool:
    """Whether `msg` may join `into`: the same sample, which has not ended yet."""
    return into.index == msg.index and not into.finish_reason


def merge(into: gen.StreamGenerateResponse, msg: gen.StreamGenerateResponse) -> None:
    """Append `msg` to `into` (text, tokens, logprobs; the end when `msg` is the last)."""
    into.text += msg.text
    into.token_ids.extend(msg.token_ids)
    if msg.logprobs:
        into.logprobs.extend(msg.logprobs)
    if msg.finish_reason:
        into.finish_reason = msg.finish_reason
        into.usage.CopyFrom(msg.usage)
