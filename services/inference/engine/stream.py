"""The per-request async iterator handed out by `Engine.generate`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from services.inference.engine.types import TokenEvent

if TYPE_CHECKING:
    from services.inference.engine.sequence import Sequence


class RequestStream:
    """Buffers one request's events on its event loop and yields them in batches.

    Each `__anext__` returns every event produced since the previous one. Closing the
    stream (`aclose`), cancelling the task awaiting it, or dropping it marks the
    request's sequences aborted, and the engine frees their slots at the next step.
    A request of n samples ends once each of its n sequences sent its last event.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._seqs: list[Sequence] = []
        self._ends_in = 0  # last events arrived
        self._ends_out = 0  # last events handed out
        self._buffer: list[TokenEvent] = []
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False  # the last event was handed out
        self._ended = False  # the last event (or an error) arrived

    def bind(self, seqs: list[Sequence]) -> None:
        """Attach the engine-side sequences (one per sample) this stream reports on."""
        self._seqs = seqs

    def abort_sample(self, index: int) -> None:
        """Stop one sample (a stop string ended it): its slot is freed, silently."""
        if 0 <= index < len(self._seqs):
            self._seqs[index].aborted = True

    # -- called on the loop by the engine --------------------------------------

    def push(self, item: list[TokenEvent] | BaseException) -> None:
        """Receive events (or the error ending the stream) and wake the reader."""
        if isinstance(item, BaseException):
            self._error = item
            self._ended = True
        else:
            self._buffer.extend(item)
            self._ends_in += sum(1 for event in item if event.finish is not None)
            if self._ends_in >= len(self._seqs):
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
            self._ends_out += sum(1 for event in events if event.finish is not None)
            if self._ends_out >= len(self._seqs):
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
            if not self._ended:
                for seq in self._seqs:
                    seq.aborted = True

    def __del__(self) -> None:
        # Only flag writes: safe from any thread, even inside the engine's locks.
        if not self._ended:
            for seq in self._seqs:
                seq.aborted = True
