"""Per-key limits: requests and tokens per minute, concurrent streams, quota, max_tokens.

Counting is per credential (API key or session), in fixed one-minute windows.
`LocalLimits` counts in this process; `services.router.redis_limits` counts in
Redis so limits hold across router replicas, and falls back to a `LocalLimits`
when Redis is down. Tokens (prompt + completion) are settled when a stream
ends; a request is admitted while the window's settled tokens are under the
limit. The token quota is auth's `quota_used_tokens` plus what this router
settled since auth answered; it is checked here, and enforced exactly by auth's
records over time.

max_tokens above the key's `max_tokens_per_request` is INVALID_ARGUMENT naming
`sampling.max_tokens` (asking again cannot help); an unset max_tokens is capped
at the limit instead.
"""

from __future__ import annotations

import calendar
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tokenyard.auth.v1 import resources_pb2 as res

from services.common.errors import InvalidArgument, ResourceExhausted
from services.router import metrics

WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """The limits of one credential that counters enforce (None: no limit)."""

    subject: str
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @classmethod
    def of(cls, subject: str, limits: res.Limits) -> LimitSpec:
        """From a principal's effective limits."""
        return cls(
            subject=subject,
            rpm=limits.requests_per_minute if limits.HasField("requests_per_minute") else None,
            tpm=limits.tokens_per_minute if limits.HasField("tokens_per_minute") else None,
            concurrency=limits.concurrent_streams
            if limits.HasField("concurrent_streams")
            else None,
        )

    @property
    def unlimited(self) -> bool:
        """True when no counter needs touching."""
        return self.rpm is None and self.tpm is None and self.concurrency is None


class Slot(Protocol):
    """An admitted request: settle it exactly once when it ends."""

    async def settle(self, tokens: int) -> None:
        """Free the concurrency slot and add `tokens` to the minute's count."""


class Limits(Protocol):
    """A counter backend."""

    async def admit(self, spec: LimitSpec, member: str) -> Slot:
        """Admit one request or raise ResourceExhausted."""

    async def close(self) -> None:
        """Release resources."""


def window_retry(now: float) -> float:
    """Seconds until the current one-minute window ends."""
    return WINDOW - (now % WINDOW)


def rpm_exceeded(spec: LimitSpec, now: float) -> ResourceExhausted:
    """The error for the requests-per-minute limit."""
    metrics.RATE_LIMITED.labels("rpm").inc()
    return ResourceExhausted(
        "rate limit exceeded: requests per minute",
        reason="RATE_LIMIT_REQUESTS",
        retry_after=window_retry(now),
        quota_subject=f"credential:{spec.subject}",
        quota_description=f"requests_per_minute={spec.rpm}",
    )


def tpm_exceeded(spec: LimitSpec, now: float) -> ResourceExhausted:
    """The error for the tokens-per-minute limit."""
    metrics.RATE_LIMITED.labels("tpm").inc()
    return ResourceExhausted(
        "rate limit exceeded: tokens per minute",
        reason="RATE_LIMIT_TOKENS",
        retry_after=window_retry(now),
        quota_subject=f"credential:{spec.subject}",
        quota_description=f"tokens_per_minute={spec.tpm}",
    )


def concurrency_exceeded(spec: LimitSpec) -> ResourceExhausted:
    """The error for the concurrent-streams limit."""
    metrics.RATE_LIMITED.labels("concurrency").inc()
    return ResourceExhausted(
        "too many concurrent streams for this key",
        reason="CONCURRENCY_LIMIT",
        retry_after=1.0,
        quota_subject=f"credential:{spec.subject}",
        quota_description=f"concurrent_streams={spec.concurrency}",
    )


class _LocalSlot:
    __slots__ = ("limits", "released", "spec")

    def __init__(self, limits: LocalLimits, spec: LimitSpec) -> None:
        self.limits, self.spec, self.released = limits, spec, False

    async def settle(self, tokens: int) -> None:
        if not self.released:
            self.released = True
            self.limits.release(self.spec, tokens)


class LocalLimits:
    """Limits counted in this process (one router, or Redis down)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._requests: dict[str, tuple[int, int]] = {}  # subject -> (window, count)
        self._tokens: dict[str, tuple[int, int]] = {}
        self._streams: dict[str, int] = {}

    def streams(self, subject: str) -> int:
        """Concurrent streams held by `subject` now."""
        return self._streams.get(subject, 0)

    def admit_now(self, spec: LimitSpec) -> _LocalSlot:
        """Admit synchronously or raise ResourceExhausted."""
        now = self._clock()
        window = int(now // WINDOW)
        if spec.tpm is not None:
            w, used = self._tokens.get(spec.subject, (window, 0))
            if w == window and used >= spec.tpm:
                raise tpm_exceeded(spec, now)
        if spec.concurrency is not None and self.streams(spec.subject) >= spec.concurrency:
            raise concurrency_exceeded(spec)
        if spec.rpm is not None:
            w, count = self._requests.get(spec.subject, (window, 0))
            count = count if w == window else 0
            if count >= spec.rpm:
                raise rpm_exceeded(spec, now)
            self._requests[spec.subject] = (window, count + 1)
        self._streams[spec.subject] = self.streams(spec.subject) + 1
        return _LocalSlot(self, spec)

    async def admit(self, spec: LimitSpec, member: str) -> Slot:
        return self.admit_now(spec)

    def release(self, spec: LimitSpec, tokens: int) -> None:
        """Free one stream of `spec.subject` and count its tokens."""
        left = self._streams.get(spec.subject, 1) - 1
        if left > 0:
            self._streams[spec.subject] = left
        else:
            self._streams.pop(spec.subject, None)
        if spec.tpm is not None and tokens > 0:
            window = int(self._clock() // WINDOW)
            w, used = self._tokens.get(spec.subject, (window, 0))
            self._tokens[spec.subject] = (window, (used if w == window else 0) + tokens)

    async def close(self) -> None:
        return None


def check_quota(limits: res.Limits, used: int, subject: str, now: float) -> None:
    """ResourceExhausted when `used` tokens reach the key's token quota for the period."""
    if not limits.HasField("token_quota") or used < limits.token_quota:
        return
    metrics.RATE_LIMITED.labels("quota").inc()
    monthly = limits.quota_period == res.QUOTA_PERIOD_MONTH
    raise ResourceExhausted(
        "token quota used up for this period",
        reason="QUOTA_EXHAUSTED",
        retry_after=quota_period_end(now, monthly=monthly) - now,
        quota_subject=f"credential:{subject}",
        quota_description=f"token_quota={limits.token_quota} per {'month' if monthly else 'day'}",
    )


def quota_period_end(now: float, *, monthly: bool) -> float:
    """Unix time when the UTC day (or month) containing `now` ends."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if monthly:
        days = calendar.monthrange(day.year, day.month)[1]
        end = day.replace(day=1) + dt.timedelta(days=days)
    else:
        end = day + dt.timedelta(days=1)
    return dt.datetime(end.year, end.month, end.day, tzinfo=dt.UTC).timestamp()


def effective_max_tokens(requested: int | None, limits: res.Limits) -> int | None:
    """max_tokens to send the worker; INVALID_ARGUMENT when over the key's limit."""
    if not limits.HasField("max_tokens_per_request"):
        return requested
    cap = limits.max_tokens_per_request
    if requested is None:
        return cap
    if requested > cap:
        metrics.RATE_LIMITED.labels("max_tokens").inc()
        raise InvalidArgument(
            "sampling.max_tokens", f"at most {cap} for this key", reason="MAX_TOKENS_LIMIT"
        )
    return requested
