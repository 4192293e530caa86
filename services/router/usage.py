"""Usage reporting: one record per request, sent to auth's RecordUsage in batches.

Records wait in a bounded buffer and go out every `interval` seconds or as soon
as `batch_size` are waiting. When auth is down they stay (the oldest dropped past
`capacity`, with a logged count) and go out once it returns. Each record carries
the router's own unique request id, so a batch retried after a lost reply is
never counted twice. `close()` flushes what it can before the router stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

import grpc
from google.protobuf import timestamp_pb2
from tokenyard.auth.v1 import usage_service_pb2 as usage
from tokenyard.auth.v1 import usage_service_pb2_grpc as usage_grpc

from services.router import metrics

log = logging.getLogger("tokenyard.router.usage")

MAX_BATCH = 1000


def timestamp(unix: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for a Unix time."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


class UsageReporter:
    """Buffers usage records and ships them to auth."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        interval: float = 1.0,
        batch_size: int = 100,
        capacity: int = 100_000,
        timeout: float = 5.0,
    ) -> None:
        self._stub = usage_grpc.UsageServiceStub(channel)
        self.interval, self.timeout = interval, timeout
        self.batch_size = min(batch_size, MAX_BATCH)
        self.capacity = capacity
        self._buffer: deque[usage.UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.sent = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def record(
        self,
        *,
        request_id: str,
        credential_id: str,
        user_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        start_time: float,
        status: str,
        end_user: str = "",
        cached_completion_tokens: int = 0,
    ) -> None:
        """Queue the usage of one finished request (a cache hit: its replayed tokens in
        `cached_completion_tokens`, none in prompt or completion)."""
        if len(self._buffer) >= self.capacity:
            self._buffer.popleft()
            self.dropped += 1
            metrics.USAGE_DROPPED.inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error(
                    "usage buffer full while auth is unreachable: oldest records dropped",
                    extra={"dropped_total": self.dropped},
                )
        self._buffer.append(
            usage.UsageRecord(
                request_id=request_id,
                credential_id=credential_id,
                user_id=user_id,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                start_time=timestamp(start_time),
                end_time=timestamp(time.time()),
                status=status,
                end_user=end_user,
                cached_completion_tokens=cached_completion_tokens,
            )
        )
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    def start(self) -> None:
        """Start the background sender."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-reporter")

    async def _run(self) -> None:
        backoff = self.interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            self._wake.clear()
            delivered = await self.flush()
            backoff = self.interval if delivered else min(backoff * 2, max(self.interval, 2.0))

    async def flush(self) -> bool:
        """Send every waiting record; False when auth could not take them (they stay)."""
        while self._buffer:
            batch = [self._buffer[i] for i in range(min(len(self._buffer), MAX_BATCH))]
            try:
                await self._stub.RecordUsage(
                    usage.RecordUsageRequest(records=batch), timeout=self.timeout
                )
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "usage not recorded yet; will retry",
                    extra={"code": exc.code().name, "waiting": len(self._buffer)},
                )
                return False
            # Only the records sent leave; any appended (or dropped) meanwhile are kept apart.
            sent = {id(r) for r in batch}
            while self._buffer and id(self._buffer[0]) in sent:
                self._buffer.popleft()
            self.sent += len(batch)
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the sender after one last flush (bounded by `timeout`)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        if self._buffer:
            log.error("usage records not delivered at stop", extra={"lost": len(self._buffer)})
