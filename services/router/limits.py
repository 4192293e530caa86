"""Limits: requests and tokens per minute, concurrent streams and token quota.

Who is counted: a user's role limits (`Principal.user_limits`) count for the user,
over all their keys and sessions together; a key's own, tighter limits count for
that key (`services.router.admission` builds both subjects from a principal).

Tokens are reserved at admission (prompt bound + max_tokens) in the minute's
counter and the quota period's counter, and the difference to what the request
really used is settled when it ends; a failure refunds what it did not use. A
request is admitted while the counters (reserved + settled) are under the limit,
so a burst exceeds a limit by at most one request. The quota counter starts from
auth's `quota_used_tokens` (the larger of the two counts), so tokens other
routers recorded since are seen at the next Authenticate.

`LocalLimits` counts in this process; `services.router.redis_limits` counts in
Redis so limits hold across router replicas. Both take an injected clock.
"""

from __future__ import annotations

import calendar
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import ResourceExhausted
from services.router import metrics

WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """The per-minute and concurrency limits of one subject (None: no limit)."""

    subject: str  # "user:<id>" or "credential:<id>"
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @property
    def unlimited(self) -> bool:
        """True when no counter needs touching."""
        return self.rpm is None and self.tpm is None and self.concurrency is None


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """A user's token quota for the current period, and what auth counted of it."""

    subject: str
    limit: int
    monthly: bool
    used: int  # auth's quota_used_tokens when it answered


@dataclass(frozen=True, slots=True)
class Admission:
    """One request to admit: its subjects, tokens to reserve, whether it holds a slot."""

    tag: str  # groups the subjects' counters (the user id): one Redis Cluster slot
    member: str  # unique id of the request
    specs: tuple[LimitSpec, ...] = ()
    quota: QuotaSpec | None = None
    reserve: int = 0
    stream: bool = True  # holds a concurrency slot until settled


class Slot(Protocol):
    """An admitted request: settle it exactly once when it ends."""

    async def settle(self, tokens: int) -> None:
        """Free the concurrency slot; replace the reservation by `tokens` used."""


class Limits(Protocol):
    """A counter backend."""

    async def admit(self, admission: Admission) -> Slot:
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
        quota_subject=spec.subject,
        quota_description=f"requests_per_minute={spec.rpm}",
    )


def tpm_exceeded(spec: LimitSpec, now: float) -> ResourceExhausted:
    """The error for the tokens-per-minute limit."""
    metrics.RATE_LIMITED.labels("tpm").inc()
    return ResourceExhausted(
        "rate limit exceeded: tokens per minute",
        reason="RATE_LIMIT_TOKENS",
        retry_after=window_retry(now),
        quota_subject=spec.subject,
        quota_description=f"tokens_per_minute={spec.tpm}",
    )


def concurrency_exceeded(spec: LimitSpec) -> ResourceExhausted:
    """The error for the concurrent-streams limit."""
    metrics.RATE_LIMITED.labels("concurrency").inc()
    return ResourceExhausted(
        "too many concurrent streams",
        reason="CONCURRENCY_LIMIT",
        retry_after=1.0,
        quota_subject=spec.subject,
        quota_description=f"concurrent_streams={spec.concurrency}",
    )


def quota_exceeded(quota: QuotaSpec, now: float) -> ResourceExhausted:
    """The error for the token quota."""
    metrics.RATE_LIMITED.labels("quota").inc()
    return ResourceExhausted(
        "token quota used up for this period",
        reason="QUOTA_EXHAUSTED",
        retry_after=quota_period_end(now, monthly=quota.monthly) - now,
        quota_subject=quota.subject,
        quota_description=f"token_quota={quota.limit} per {'month' if quota.monthly else 'day'}",
    )


def quota_period(now: float, *, monthly: bool) -> int:
    """Number of the UTC day (or month) containing `now`: the quota counter's name."""
    if not monthly:
        return int(now // 86400)
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    return day.year * 12 + day.month - 1


def quota_period_end(now: float, *, monthly: bool) -> float:
    """Unix time when the UTC day (or month) containing `now` ends."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if monthly:
        days = calendar.monthrange(day.year, day.month)[1]
        end = day.replace(day=1) + dt.timedelta(days=days)
    else:
        end = day + dt.timedelta(days=1)
    return dt.datetime(end.year, end.month, end.day, tzinfo=dt.UTC).timestamp()


class _LocalSlot:
    __slots__ = ("admission", "limits", "period", "released", "window")

    def __init__(self, limits: LocalLimits, admission: Admission, window: int, period: int) -> None:
        self.limits, self.admission = limits, admission
        self.window, self.period, self.released = window, period, False

    async def settle(self, tokens: int) -> None:
        if not self.released:
            self.released = True
            self.limits.release(self, tokens)


class LocalLimits:
    """Limits counted in this process (one router, or Redis down)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._requests: dict[str, tuple[int, int]] = {}  # subject -> (window, count)
        self._tokens: dict[str, tuple[int, int]] = {}  # subject -> (window, reserved+used)
        self._quota: dict[str, tuple[int, int]] = {}  # subject -> (period, reserved+used)
        self._streams: dict[str, int] = {}

    def streams(self, subject: str) -> int:
        """Concurrent streams held by `subject` now."""
        return self._streams.get(subject, 0)

    def tokens(self, subject: str) -> int:
        """Tokens reserved or used by `subject` in the current minute."""
        window = int(self._clock() // WINDOW)
        w, used = self._tokens.get(subject, (window, 0))
        return used if w == window else 0

    def admit_now(self, admission: Admission) -> _LocalSlot:
        """Check every counter, then count the request in all of them, or raise."""
        now = self._clock()
        window = int(now // WINDOW)
        for spec in admission.specs:
            if spec.tpm is not None and self.tokens(spec.subject) >= spec.tpm:
                raise tpm_exceeded(spec, now)
            if (
                admission.stream
                and spec.concurrency is not None
                and self.streams(spec.subject) >= spec.concurrency
            ):
                raise concurrency_exceeded(spec)
            if spec.rpm is not None:
                w, count = self._requests.get(spec.subject, (window, 0))
                if (count if w == window else 0) >= spec.rpm:
                    raise rpm_exceeded(spec, now)
        quota, period = admission.quota, 0
        if quota is not None:
            period = quota_period(now, monthly=quota.monthly)
            p, used = self._quota.get(quota.subject, (period, 0))
            used = max(used if p == period else 0, quota.used)
            if used >= quota.limit:
                raise quota_exceeded(quota, now)
            self._quota[quota.subject] = (period, used + admission.reserve)
        for spec in admission.specs:
            if spec.rpm is not None:
                w, count = self._requests.get(spec.subject, (window, 0))
                self._requests[spec.subject] = (window, (count if w == window else 0) + 1)
            if spec.tpm is not None:
                self._tokens[spec.subject] = (window, self.tokens(spec.subject) + admission.reserve)
            if admission.stream and spec.concurrency is not None:
                self._streams[spec.subject] = self.streams(spec.subject) + 1
        return _LocalSlot(self, admission, window, period)

    async def admit(self, admission: Admission) -> Slot:
        return self.admit_now(admission)

    def release(self, slot: _LocalSlot, tokens: int) -> None:
        """Free the slot's streams and replace its reservation by `tokens`."""
        admission = slot.admission
        delta = tokens - admission.reserve
        for spec in admission.specs:
            if admission.stream and spec.concurrency is not None:
                left = self._streams.get(spec.subject, 1) - 1
                if left > 0:
                    self._streams[spec.subject] = left
                else:
                    self._streams.pop(spec.subject, None)
            if spec.tpm is not None:
                w, used = self._tokens.get(spec.subject, (slot.window, 0))
                if w == slot.window:  # a later minute does not pay for this one
                    self._tokens[spec.subject] = (w, max(0, used + delta))
        quota = admission.quota
        if quota is not None:
            p, used = self._quota.get(quota.subject, (slot.period, 0))
            if p == slot.period:
                self._quota[quota.subject] = (p, max(0, used + delta))

    async def close(self) -> None:
        return None
