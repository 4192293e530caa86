"""The per-request async iterator handed out by `Engine.generate`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from services.inference.engine.types import TokenEvent

if TYPE_CHECKING:
    from services.inference.engine.scheduler import Sequence


class RequestStream:
    """Buffers one request's events on its event loop and yields them in batches.

    Each `__anext__` returns every event produced since the previous one. Closing the
    stream (`aclose`), cancelling the task awaiting it, or dropping it marks the
    sequence aborted, and the engine frees its slot at the next step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._seq: Sequence | None = None
        self._buffer: list[TokenEvent] = []
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False  # the last event was handed out
        self._ended = False  # the last event (or an error) arrived

    def bind(self, seq: Sequence) -> None:
        """Attach the engine-side sequence this stream reports on."""
        self._seq = seq

    # -- called on the loop by the engine --------------------------------------

    def push(self, item: list[TokenEvent] | BaseException) -> None:
        """Receive events (or the error ending the stream) and wake the reader."""
        if isinstance(item, BaseException):
            self._error = item
            self._ended = True
        else:
            self._buffer.extend(item)
            if item and item[-1].finish is not None:
                self._ended = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @staticmethod
    def push_many(items: list[tuple[RequestStream, list[TokenEvent]]]) -> None:
        """Deliver one engine step's events to many streams at once."""
        for stream, events in items:
            stream.push(events)

    # -- async iterator --------------------------------------------------------

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> list[TokenEvent]:
        if self._finished:
            raise StopAsyncIteration
        while not self._buffer and self._error is None:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self._abort()
                raise
            finally:
                self._waiter = None
        if self._buffer:
            events, self._buffer = self._buffer, []
            if events[-1].finish is not None:
                self._finished = True
            return events
        self._finished = True
        assert self._error is not None
        raise self._error

    async def aclose(self) -> None:
        """Stop consuming: the request is aborted and its slot freed within one step."""
        self._abort()

    def _abort(self) -> None:
        if not self._finished:
            self._finished = True
            if self._seq is not None and not self._ended:
                self._seq.aborted = True

    def __del__(self) -> None:
        # Only a flag write: safe from any thread, even inside the engine's locks.
        if not self._ended and self._seq is not None:
            self._seq.aborted = True
